//! `adsmetrics backfill`: replace source partitions with their current contents.
//!
//! A backfill reads Hive-style logs in place (`<source>/…/dt=YYYY-MM-DD/…`, Parquet or JSON
//! lines; the layout a team already has on HDFS or an object store) for a range of days. Each file
//! is a *source partition*, identified by its path below `--source`; the journal remembers which
//! content hash each source partition currently contributes. Per source partition in the range:
//!
//! - same content hash as recorded: skipped (hashed, never decoded);
//! - new or changed: its new contents are read; a changed one's old contribution is withdrawn
//!   in the same epoch (its raw rows enter the dataflow with −1, the new rows with +1), so the
//!   dataflow and the tables see only the difference;
//! - recorded but gone from the source: its contribution is withdrawn.
//!
//! Content that already contributes (a file ingested before with `adsmetrics ingest`, or a copy of
//! another source partition) is adopted: recorded as the partition's content without being read
//! again. Each day of the range with any change is one epoch and one publish, oldest first, so a
//! 30-day backfill shows progress day by day and a crash loses at most the day in flight; the
//! same command again finishes the job and then changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use crate::journal::{RetiredSource, SourceRecord};
use crate::ledger::RunKind;
use crate::runtime::{
    execute, Batch, IngestOptions, IngestSummary, Opened, Plan, Rehydration, RunError,
};
use crate::source::{self, SourceFile};
use crate::warehouse::{day_string, parse_day, Warehouse};

/// What to backfill.
#[derive(Clone, Debug)]
pub struct BackfillOptions {
    /// The root of the Hive-style logs.
    pub source: PathBuf,
    /// First day (inclusive), days since the Unix epoch.
    pub from_day: i64,
    /// Last day (inclusive).
    pub to_day: i64,
    /// Workers, progress, fault injection.
    pub run: IngestOptions,
}

/// The day of a `dt=YYYY-MM-DD` component of `relative`, if it has one.
pub fn day_of_path(relative: &str) -> Option<i64> {
    relative
        .split('/')
        .find_map(|part| part.strip_prefix("dt=").and_then(parse_day))
}

/// `path` below `root`, with `/` separators: the source partition's identity.
fn identity(root: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path);
    relative
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Replaces the source partitions of `options.source` whose day lies in the range; see the
/// module doc. Rerun-safe: a second run over unchanged logs reads nothing and publishes nothing.
pub fn backfill(
    warehouse: &Warehouse,
    options: BackfillOptions,
) -> Result<IngestSummary, RunError> {
    let opened = Opened::open(warehouse)?;
    if let Some(horizon) = opened.horizons.raw_day {
        if options.from_day < horizon {
            return Err(RunError::Refused(format!(
                "--from {} is before the raw retention horizon {}: those days' raw layer was \
                 dropped, so they cannot be backfilled exactly; start at {} or later",
                day_string(options.from_day),
                day_string(horizon),
                day_string(horizon)
            )));
        }
    }
    let mut run = opened.record(
        RunKind::Backfill,
        format!(
            "backfill --source {} --from {} --to {} --hot-window {}{}",
            options.source.display(),
            day_string(options.from_day),
            day_string(options.to_day),
            crate::runtime::hot_window_flag(options.run.hot_window_days),
            options.run.cluster_flag()
        ),
    );
    run.sources_skipped = 0;
    let in_range = |day: i64| (options.from_day..=options.to_day).contains(&day);

    let files: Vec<PathBuf> = source::discover(std::slice::from_ref(&options.source))?
        .into_iter()
        .filter(|p| day_of_path(&identity(&options.source, p)).is_some_and(in_range))
        .collect();
    let mut identified = crate::runtime::identify(&files, &options.run)?;
    // Day order, then path: when two source partitions hold the same content, the earlier day's
    // epoch reads it and later ones adopt it, so no adoption commits before its content does.
    identified.sort_by_cached_key(|f| {
        let id = identity(&options.source, &f.path);
        (day_of_path(&id), id)
    });
    let mut summary = IngestSummary {
        sources_found: identified.len() as u64,
        ..Default::default()
    };

    let recorded: BTreeMap<&String, &String> = opened
        .journal
        .source_partitions()
        .iter()
        .filter(|(p, _)| day_of_path(p).is_some_and(in_range))
        .collect();
    // After this backfill, which source partitions (anywhere) map to which content.
    let mut after: BTreeMap<String, String> = opened.journal.source_partitions().clone();
    let mut batches: BTreeMap<i64, Batch> = BTreeMap::new();
    let mut partition_of = HashMap::new();
    let mut planned: BTreeSet<String> = BTreeSet::new();
    let mut present = BTreeSet::new();
    for file in identified {
        let id = identity(&options.source, &file.path);
        let day = day_of_path(&id).expect("filtered on its day");
        present.insert(id.clone());
        let current = recorded.get(&id).map(|h| h.as_str());
        if current == Some(file.content_hash.as_str()) {
            summary.sources_skipped += 1;
            continue;
        }
        let batch = batches.entry(day).or_default();
        if let Some(old) = current {
            batch.retired.push(RetiredSource {
                partition: id.clone(),
                content_hash: old.to_string(),
                rows_withdrawn: false,
            });
        }
        after.insert(id.clone(), file.content_hash.clone());
        if opened.journal.consumed().contains(&file.content_hash)
            || !planned.insert(file.content_hash.clone())
        {
            // Its content already contributes: record it as this partition's, unread.
            summary.sources_skipped += 1;
            batch.adopt.push(adopted(&file, &id));
        } else {
            partition_of.insert(file.content_hash.clone(), id);
            batch.sources.push(file);
        }
    }
    for (id, old) in &recorded {
        if !present.contains(*id) {
            after.remove(*id);
            let day = day_of_path(id).expect("filtered on its day");
            batches.entry(day).or_default().retired.push(RetiredSource {
                partition: (*id).clone(),
                content_hash: (*old).clone(),
                rows_withdrawn: false,
            });
        }
    }
    // A withdrawn content's raw rows leave once, in the last epoch that retires it, and only when
    // no source partition contributes it after the backfill; that retirement says so in the
    // journal, which is what takes the content out of the committed set.
    let still: BTreeSet<&String> = after.values().collect();
    let mut last_retiring: BTreeMap<String, i64> = BTreeMap::new();
    for (day, batch) in &batches {
        for r in &batch.retired {
            last_retiring.insert(r.content_hash.clone(), *day);
        }
    }
    for (day, batch) in batches.iter_mut() {
        batch.day = Some(*day);
        let mut withdrawn = BTreeSet::new();
        for r in batch.retired.iter_mut() {
            let h = &r.content_hash;
            if last_retiring.get(h) == Some(day)
                && !still.contains(h)
                && !planned.contains(h)
                && withdrawn.insert(h.clone())
            {
                r.rows_withdrawn = true;
            }
        }
        batch.retract_hashes = withdrawn;
    }

    let plan = Plan {
        run,
        batches: batches.into_values().collect(),
        partition_of,
        progress_in_sources: true,
        rehydration: Rehydration::Keyed,
        summary,
    };
    execute(warehouse, opened, plan, options.run)
}

fn adopted(file: &SourceFile, id: &str) -> SourceRecord {
    SourceRecord {
        source: file.label.clone(),
        content_hash: file.content_hash.clone(),
        accepted: 0,
        quarantined: 0,
        in_source_duplicates: 0,
        tombstoned: 0,
        partition: Some(id.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_partitions_are_named_by_their_path_below_the_root() {
        let root = Path::new("logs");
        let id = identity(
            root,
            Path::new("logs/dt=2026-11-03/hr=01/producer=web/part-0.parquet"),
        );
        assert_eq!(id, "dt=2026-11-03/hr=01/producer=web/part-0.parquet");
        assert_eq!(day_of_path(&id), parse_day("2026-11-03"));
        assert_eq!(day_of_path("hr=01/part-0.parquet"), None);
        assert_eq!(day_of_path("dt=yesterday/part-0.parquet"), None);
    }
}
