//! Corrections into a long history rebuild only the event days they touch, and still come out
//! exact: late events days late, revisions that move an event to another day, and reruns.

mod common;

use adsmetrics::runtime::ingest;
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::Warehouse;
use common::*;

#[test]
fn a_correction_rebuilds_only_the_days_it_touches_and_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = thirty_days(dir.path(), 3000);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("logs")], options()).unwrap();
    assert!(published_tables(&wh) == expected_tables(&events));

    // Late events for one day, days after it; and a revision that moves an event of another day
    // to a third day (its old version must leave its old day).
    let late_day = events[10].event_time_us.div_euclid(DAY_US);
    let mut correction = Vec::new();
    for i in 0..20 {
        let mut e = events[10].clone();
        e.event_id = Some(format!("late-{i}").into());
        e.user_id = 500 + i;
        correction.push(e);
    }
    let moved_from = events
        .iter()
        .position(|e| e.event_id.is_some() && e.event_time_us.div_euclid(DAY_US) != late_day)
        .unwrap();
    let mut moved = events[moved_from].clone();
    moved.revision += 1;
    moved.event_time_us += 9 * DAY_US;
    correction.push(moved);
    write_parquet(&dir.path().join("fix/correction.parquet"), &correction);
    events.extend(correction);

    let before = published_tables(&wh);
    let run = ingest(&wh, &[dir.path().join("fix")], options()).unwrap();
    assert!(
        published_tables(&wh) == expected_tables(&events),
        "tables differ from a recompute over all events"
    );
    // Three event days at most (the late day, the moved event's old and new day) of about 30.
    assert!(
        run.rehydrated_files * 5 < run.committed_raw_files,
        "rebuilt {} of {} raw files",
        run.rehydrated_files,
        run.committed_raw_files
    );
    let after = published_tables(&wh);
    let changed = after
        .iter()
        .filter(|(id, rows)| before.get(id) != Some(rows))
        .count() as u64;
    assert_eq!(run.partitions_published, changed);
    assert_ledger_accounts_for_tables(&wh);

    // The same correction again: nothing.
    let snapshot = TableSnapshot::take(&wh).unwrap();
    ingest(&wh, &[dir.path().join("fix")], options()).unwrap();
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
}
