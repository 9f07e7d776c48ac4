//! `adsmetrics retention apply`: drop expired raw-layer days and curated partitions, on the record.
//!
//! With `--raw-days R --curated-days C` and today's date `T` (UTC, or `--today` for a dry
//! calendar), raw-layer days before `T − R` and curated partitions of days before `T − C` expire.
//! In order:
//!
//! 1. the raw horizon `T − R` is written to `_adsmetrics/retention.json` (synced): from then on
//!    every run quarantines events before it ("past the raw retention horizon"), since without
//!    their day's raw layer no change to that day can be computed exactly — the curated
//!    partitions of such a day stay as they are, they are never rebuilt from a partial state;
//! 2. the expired curated partitions are removed in one publish (journal, atomic removal);
//! 3. the expired raw days (and their key indexes) are deleted;
//! 4. the ledger records the run (`retention`): each removed partition with its old version and
//!    metric deltas, and each dropped raw day.
//!
//! Nothing unexpired is touched. A horizon never moves back: applying a shorter retention later
//! drops more, a longer one drops nothing already kept. Running it again drops nothing new and
//! says so; a crash anywhere is finished by running it again.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::journal::{MetricTotals, PartitionChange};
use crate::ledger::RunKind;
use crate::runtime::{Opened, RunError};
use crate::sink::files::{replace, sync_filesystem, WriteError};
use crate::sink::publish::{publish_epoch, PublishOrigin};
use crate::warehouse::{day_path, day_string, Warehouse};

/// The horizons in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Horizons {
    /// Raw-layer days before this one are gone; events before it are refused.
    pub raw_day: Option<i64>,
    /// Curated partitions of days before this one are gone.
    pub curated_day: Option<i64>,
}

/// The horizon file.
pub fn horizons_path(warehouse: &Warehouse) -> PathBuf {
    warehouse.meta_dir().join("retention.json")
}

/// The horizons in force (none if retention was never applied).
pub fn horizons(warehouse: &Warehouse) -> Result<Horizons, RunError> {
    let path = horizons_path(warehouse);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| RunError::Runtime(format!("retention horizons {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Horizons::default()),
        Err(source) => Err(RunError::Write(WriteError::Io { path, source })),
    }
}

/// What a retention run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// The horizons now in force.
    pub horizons: Horizons,
    /// Curated partitions removed.
    pub partitions_removed: u64,
    /// Raw-layer days dropped (`dt=…`) and their file counts.
    pub raw_days_dropped: Vec<(String, u64)>,
}

/// Applies retention; see the module doc. `today` is a day index (days since the Unix epoch).
pub fn apply(
    warehouse: &Warehouse,
    raw_days: u32,
    curated_days: u32,
    today: i64,
) -> Result<RetentionReport, RunError> {
    if curated_days < raw_days {
        // A curated partition dropped while its day's raw layer is kept would be rebuilt (and
        // come back) by the next run that touches the day.
        return Err(RunError::Refused(format!(
            "--curated-days {curated_days} is less than --raw-days {raw_days}: curated \
             partitions are rebuilt from the raw layer, keep them at least as long"
        )));
    }
    let opened = Opened::open(warehouse)?;
    let mut run = opened.record(
        RunKind::Retention,
        format!(
            "retention apply --raw-days {raw_days} --curated-days {curated_days} (today {})",
            day_string(today)
        ),
    );
    let Opened {
        mut journal,
        mut ledger,
        ..
    } = opened;
    let before = journal.committed().last().map_or(0, |p| p.seq);

    // 1. The horizons, never moving back.
    let old = horizons(warehouse)?;
    let horizons = Horizons {
        raw_day: Some(
            old.raw_day
                .unwrap_or(i64::MIN)
                .max(today - i64::from(raw_days)),
        ),
        curated_day: Some(
            old.curated_day
                .unwrap_or(i64::MIN)
                .max(today - i64::from(curated_days)),
        ),
    };
    if horizons != old {
        let path = horizons_path(warehouse);
        let mut text = serde_json::to_string_pretty(&horizons).expect("horizons serialise");
        text.push('\n');
        replace(
            &warehouse.staging_dir().join("retention.json"),
            &path,
            text.as_bytes(),
        )?;
        sync_filesystem(warehouse.root()).map_err(|source| WriteError::Io {
            path: warehouse.root().to_path_buf(),
            source,
        })?;
    }
    let curated_horizon = horizons.curated_day.unwrap_or(i64::MIN);
    let raw_horizon = horizons.raw_day.unwrap_or(i64::MIN);

    // 2. Expired curated partitions, removed in one publish.
    let changes: Vec<PartitionChange> = journal
        .published()
        .iter()
        .filter(|(id, _)| id.day() < curated_horizon)
        .map(|(id, p)| PartitionChange {
            partition: *id,
            old_version: Some(p.version.clone()),
            new_version: None,
            rows: 0,
            staged: None,
            old_totals: p.totals,
            new_totals: Some(MetricTotals::default()),
        })
        .collect();
    let removed = changes.len() as u64;
    if !changes.is_empty() {
        publish_epoch(
            &mut journal,
            warehouse,
            PublishOrigin {
                run_id: &run.run_id,
                run_key: warehouse.run_key(),
                epoch: 0,
                ledger: Some(ledger.anchor()),
                retired: Vec::new(),
                side_files: Vec::new(),
            },
            Vec::new(),
            changes,
            None,
        )?;
    }

    // 3. Expired raw days.
    let mut dropped: BTreeMap<i64, u64> = BTreeMap::new();
    for path in crate::sink::raw::list_raw_files(warehouse) {
        if let Some(day) = crate::scope::raw_day(warehouse, &path) {
            if day < raw_horizon {
                std::fs::remove_file(&path).map_err(|source| WriteError::Io {
                    path: path.clone(),
                    source,
                })?;
                *dropped.entry(day).or_insert(0) += 1;
            }
        }
    }
    for day in dropped.keys() {
        crate::keyindex::invalidate(warehouse, *day);
        // Every file of the day was expired: no directory of it is left for readers to list.
        let _ = std::fs::remove_dir_all(warehouse.raw_dir().join(day_path(*day)));
    }
    let _ = std::fs::remove_dir_all(warehouse.staging_dir());

    // 4. The record.
    let raw_days_dropped: Vec<(String, u64)> = dropped
        .iter()
        .map(|(day, files)| (format!("raw/{}", day_path(*day)), *files))
        .collect();
    run.dropped = raw_days_dropped
        .iter()
        .map(|(day, files)| format!("{day} ({files} files)"))
        .collect();
    let publishes: Vec<_> = journal
        .committed()
        .iter()
        .filter(|p| p.seq > before)
        .collect();
    ledger.append_run(&run, &publishes)?;
    Ok(RetentionReport {
        horizons,
        partitions_removed: removed,
        raw_days_dropped,
    })
}

/// Whether an event of `day` is past the raw horizon, and the quarantine reason if so.
pub fn refusal(horizons: &Horizons, day: i64) -> Option<String> {
    let horizon = horizons.raw_day?;
    (day < horizon).then(|| {
        format!(
            "event day {} is past the raw retention horizon {} (its raw layer was dropped, so \
             no change to that day can be computed exactly)",
            day_string(day),
            day_string(horizon)
        )
    })
}
