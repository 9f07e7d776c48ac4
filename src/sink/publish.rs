//! Publishing an epoch: stage the changed partitions, then prepare → rename → commit.
//!
//! A partition whose rows hash to its published version is unchanged and is not written at all;
//! that is what makes a rerun a no-op (invariant 2). The order of steps, and what recovery does
//! after a crash at each, is described in [`crate::journal`]; [`FailPoint`] lets tests stop the
//! publish after any step to prove it (invariant 4).

use std::path::PathBuf;

use adsmetrics_dataflows::{Dims, MetricRow, PartitionId};

use crate::journal::{
    CommitJournal, JournalError, LedgerAnchor, MetricTotals, PartitionChange, Published, Renamed,
    RetiredSource, SideFile, SourceRecord,
};
use crate::sink::curated::{content_version, encode_partition};
use crate::sink::files::{sync_filesystem, write_file, WriteError};
use crate::warehouse::{partition_path, table_name, Warehouse};

/// Where a test makes the publish stop, as if the process died there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPoint {
    /// After the changed partitions are written to staging, before the journal's `Prepare`.
    AfterStage,
    /// After `Prepare`, before any rename.
    AfterPrepare,
    /// After the rename of the n-th (0-based) changed partition.
    AfterRename(usize),
    /// After the rename of the n-th (0-based) side-table file, which follow the partitions'.
    AfterSideRename(usize),
    /// After the journal's `Commit`.
    AfterCommit,
}

/// Errors of a publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Writing a staged file failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The journal failed (or a fault was injected).
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Decides whether `rows` are a new version of partition `id` and, if so, writes them to staging.
/// Returns `None` when the partition is unchanged.
pub fn stage_partition(
    warehouse: &Warehouse,
    id: &PartitionId,
    rows: &[(Dims, MetricRow)],
    published: Option<&Published>,
) -> Result<Option<PartitionChange>, WriteError> {
    let old_version = published.map(|p| p.version.clone());
    let old_totals = published
        .map(|p| p.totals)
        .unwrap_or(Some(MetricTotals::default()));
    if rows.is_empty() {
        return Ok(old_version.map(|old| PartitionChange {
            partition: *id,
            old_version: Some(old),
            new_version: None,
            rows: 0,
            staged: None,
            old_totals,
            new_totals: Some(MetricTotals::default()),
        }));
    }
    let version = content_version(id, rows);
    if old_version.as_deref() == Some(version.as_str()) {
        return Ok(None);
    }
    let name = format!(
        "{}/{}-{}.parquet",
        table_name(id.grain),
        partition_path(id).replace('/', "_"),
        version
    );
    let staged = warehouse.staging_dir().join(&name);
    let bytes = encode_partition(id, rows, &version, &staged)?;
    write_file(&staged, &bytes)?;
    let relative: PathBuf = staged
        .strip_prefix(warehouse.root())
        .unwrap_or(&staged)
        .to_path_buf();
    Ok(Some(PartitionChange {
        partition: *id,
        old_version,
        new_version: Some(version),
        rows: rows.len() as u64,
        staged: Some(relative.to_string_lossy().into_owned()),
        old_totals,
        new_totals: Some(MetricTotals::of(rows)),
    }))
}

/// Crash tests of whole processes: `ADSMETRICS_PAUSE_AFTER_PREPARE_MS` holds every publish
/// between its journal `Prepare` and its renames for that long (unset in production).
pub const PAUSE_AFTER_PREPARE_ENV: &str = "ADSMETRICS_PAUSE_AFTER_PREPARE_MS";

fn pause_after_prepare() -> Option<u64> {
    std::env::var(PAUSE_AFTER_PREPARE_ENV).ok()?.parse().ok()
}

/// Drills of whole processes (an orchestrator's retry, a runbook's recovery): with
/// `ADSMETRICS_FAIL_AT=after-stage|after-prepare|after-rename-<n>|after-side-rename-<n>|after-commit`,
/// the process exits
/// with [`FAIL_AT_EXIT_CODE`] at that point of its first publish, as if it were killed there
/// (unset in production).
pub const FAIL_AT_ENV: &str = "ADSMETRICS_FAIL_AT";

/// The exit code of a process stopped by [`FAIL_AT_ENV`].
pub const FAIL_AT_EXIT_CODE: i32 = 86;

impl FailPoint {
    /// Parses `after-stage`, `after-prepare`, `after-rename-<n>`, `after-side-rename-<n>`,
    /// `after-commit`.
    pub fn parse(s: &str) -> Option<FailPoint> {
        match s {
            "after-stage" => Some(FailPoint::AfterStage),
            "after-prepare" => Some(FailPoint::AfterPrepare),
            "after-commit" => Some(FailPoint::AfterCommit),
            _ => {
                if let Some(n) = s.strip_prefix("after-side-rename-") {
                    n.parse().ok().map(FailPoint::AfterSideRename)
                } else {
                    s.strip_prefix("after-rename-")?
                        .parse()
                        .ok()
                        .map(FailPoint::AfterRename)
                }
            }
        }
    }
}

/// Exits the process when [`FAIL_AT_ENV`] names `at`.
fn drill_exit(at: FailPoint) {
    let Ok(value) = std::env::var(FAIL_AT_ENV) else {
        return;
    };
    let Some(point) = FailPoint::parse(&value) else {
        eprintln!(
            "{FAIL_AT_ENV}={value:?} is not a point (after-stage, after-prepare, after-rename-<n>, after-commit): ignored"
        );
        return;
    };
    if point == at {
        eprintln!("{FAIL_AT_ENV}={value}: exiting with code {FAIL_AT_EXIT_CODE} as if killed here");
        std::process::exit(FAIL_AT_EXIT_CODE);
    }
}

fn injected(at: FailPoint) -> JournalError {
    JournalError::Injected(format!("{at:?}"))
}

/// Which run and epoch a publish belongs to, as the journal records it.
#[derive(Clone, Debug)]
pub struct PublishOrigin<'a> {
    /// The run.
    pub run_id: &'a str,
    /// The run's `--run-key`.
    pub run_key: Option<&'a str>,
    /// Its epoch.
    pub epoch: u64,
    /// The audit ledger's newest entry when the run started.
    pub ledger: Option<LedgerAnchor>,
    /// Sources whose contribution the publish withdraws.
    pub retired: Vec<RetiredSource>,
    /// Side-table files (quarantine, late arrivals) it makes visible with its sources.
    pub side_files: Vec<SideFile>,
}

/// Publishes one epoch: its consumed sources and its staged partition changes, atomically.
/// Returns the journal sequence number of the publish.
pub fn publish_epoch(
    journal: &mut CommitJournal,
    warehouse: &Warehouse,
    origin: PublishOrigin<'_>,
    sources: Vec<SourceRecord>,
    mut changes: Vec<PartitionChange>,
    fail: Option<FailPoint>,
) -> Result<u64, PublishError> {
    changes.sort_by_key(|c| c.partition);
    drill_exit(FailPoint::AfterStage);
    if fail == Some(FailPoint::AfterStage) {
        return Err(injected(FailPoint::AfterStage).into());
    }
    // Raw and staged files become durable before the journal names them.
    sync_filesystem(warehouse.root()).map_err(|source| WriteError::Io {
        path: warehouse.root().to_path_buf(),
        source,
    })?;
    // A `Prepare` must name only files it can rename: one gone from staging (another writer's
    // recovery cleared it, as a writer that bypassed the lock could) would leave a publish that
    // no recovery can finish. Fenced: nothing is published, and a rerun stages them again.
    let staged = changes.iter().filter_map(|c| c.staged.as_deref());
    let side = origin.side_files.iter().map(|f| f.staged.as_str());
    if let Some(gone) = staged
        .chain(side)
        .find(|f| !warehouse.root().join(f).exists())
    {
        return Err(PublishError::Journal(JournalError::Fenced {
            path: warehouse.journal_path(),
            detail: format!("staged file {gone} is gone before the publish prepared"),
        }));
    }
    let seq = journal.prepare(origin, sources, changes)?;
    tracing::debug!(seq, "publish prepared");
    drill_exit(FailPoint::AfterPrepare);
    if fail == Some(FailPoint::AfterPrepare) {
        return Err(injected(FailPoint::AfterPrepare).into());
    }
    if let Some(ms) = pause_after_prepare() {
        // Crash tests only: hold the publish open so a SIGKILL lands inside it.
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let mut after_each = |renamed: Renamed| {
        let at = match renamed {
            Renamed::Partition(i) => FailPoint::AfterRename(i),
            Renamed::Side(i) => FailPoint::AfterSideRename(i),
        };
        drill_exit(at);
        match fail {
            Some(point) if point == at => Err(injected(at)),
            _ => Ok(()),
        }
    };
    journal.commit(seq, |id| warehouse.partition_file(id), &mut after_each)?;
    drill_exit(FailPoint::AfterCommit);
    if fail == Some(FailPoint::AfterCommit) {
        return Err(injected(FailPoint::AfterCommit).into());
    }
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::FailPoint;

    #[test]
    fn drill_points_parse_as_documented() {
        let parsed: Vec<_> = [
            "after-stage",
            "after-prepare",
            "after-rename-3",
            "after-side-rename-1",
            "after-commit",
            "after-rename-x",
            "after-lunch",
        ]
        .iter()
        .map(|s| FailPoint::parse(s))
        .collect();
        assert_eq!(
            parsed,
            [
                Some(FailPoint::AfterStage),
                Some(FailPoint::AfterPrepare),
                Some(FailPoint::AfterRename(3)),
                Some(FailPoint::AfterSideRename(1)),
                Some(FailPoint::AfterCommit),
                None,
                None,
            ]
        );
    }
}
