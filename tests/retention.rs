//! Retention: expired raw days and curated partitions go, on the record; nothing younger is
//! touched; an event of an expired raw day is quarantined instead of half-applied.

mod common;

use adsmetrics::ledger::{Outcome, RunKind};
use adsmetrics::retention::apply;
use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::PartitionId;
use common::*;

#[test]
fn expired_partitions_go_and_nothing_younger_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let events = thirty_days(dir.path(), 2000);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("logs")], IngestOptions::default()).unwrap();
    let full = published_tables(&wh);
    let last = full.keys().map(PartitionId::day).max().unwrap();
    let today = last + 1;
    let (raw_horizon, curated_horizon) = (today - 10, today - 20);
    let before = TableSnapshot::take(&wh).unwrap();

    let report = apply(&wh, 10, 20, today).unwrap();
    assert_eq!(report.horizons.raw_day, Some(raw_horizon));
    assert!(report.partitions_removed > 0);
    assert!(!report.raw_days_dropped.is_empty());

    // Curated: exactly the partitions of days before the horizon are gone; the rest are the same
    // files, untouched.
    let kept = published_tables(&wh);
    let expected: std::collections::BTreeMap<_, _> = full
        .iter()
        .filter(|(id, _)| id.day() >= curated_horizon)
        .map(|(id, rows)| (*id, rows.clone()))
        .collect();
    assert!(
        kept == expected,
        "the kept partitions are not the unexpired ones"
    );
    let after = TableSnapshot::take(&wh).unwrap();
    for (path, state) in &after.files {
        assert_eq!(before.files.get(path), Some(state), "{path:?} was touched");
    }
    // Raw: no file of an expired day is left, every younger one is.
    for path in adsmetrics::sink::raw::list_raw_files(&wh) {
        let day = adsmetrics::scope::raw_day(&wh, &path).unwrap();
        assert!(day >= raw_horizon, "{path:?} survived");
    }
    assert!(adsmetrics::sink::raw::list_raw_files(&wh)
        .iter()
        .any(|p| adsmetrics::scope::raw_day(&wh, p) == Some(raw_horizon)));
    let entries = assert_ledger_accounts_for_tables(&wh);
    let last_entry = entries.last().unwrap();
    assert_eq!(last_entry.body.kind, RunKind::Retention);
    assert_eq!(
        last_entry.body.partitions.len() as u64,
        report.partitions_removed
    );
    assert_eq!(last_entry.body.dropped.len(), report.raw_days_dropped.len());

    // Curated kept shorter than raw would let a rebuild bring dropped partitions back: refused.
    assert!(apply(&wh, 20, 10, today).is_err());

    // Again: nothing more to drop, and the ledger says so.
    let again = apply(&wh, 10, 20, today).unwrap();
    assert_eq!(
        (again.partitions_removed, again.raw_days_dropped.len()),
        (0, 0)
    );
    let entries = assert_ledger_accounts_for_tables(&wh);
    assert_eq!(entries.last().unwrap().body.outcome, Outcome::Unchanged);

    // A late event of a day whose raw layer is gone (its curated partitions are kept) is
    // quarantined, and that day's partitions stay as they were.
    let mut late = events
        .iter()
        .find(|e| {
            let day = e.event_time_us.div_euclid(DAY_US);
            day >= curated_horizon && day < raw_horizon
        })
        .unwrap()
        .clone();
    late.event_id = Some("too-late".into());
    write_parquet(&dir.path().join("late/one.parquet"), &[late]);
    let snapshot = TableSnapshot::take(&wh).unwrap();
    let run = ingest(&wh, &[dir.path().join("late")], IngestOptions::default()).unwrap();
    assert_eq!((run.quarantined, run.events_accepted), (1, 0), "{run:?}");
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
}
