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

/// The batch engine (the default for a run of one epoch after its rebuild) and the dataflow
/// publish the same bytes: a 30-day load in hot-window generations, then a correction with late
/// events, revisions (one moving an event to another day) and resends.
#[test]
fn batch_engine_and_dataflow_publish_the_same_bytes() {
    use adsmetrics::runtime::{Engine, IngestOptions};
    let dir = tempfile::tempdir().unwrap();
    let events = thirty_days(dir.path(), 4000);
    let mut correction: Vec<_> = events.iter().step_by(37).cloned().collect();
    for (i, e) in correction.iter_mut().enumerate() {
        match i % 3 {
            0 => e.revision += 1,
            1 => {
                e.revision += 1;
                e.event_time_us += 2 * DAY_US;
            }
            _ => e.event_id = Some(format!("late-{i}").into()),
        }
    }
    write_parquet(&dir.path().join("fix/correction.parquet"), &correction);
    let run = |engine: Engine| {
        let wh = Warehouse::new(dir.path().join(format!("wh-{engine:?}")));
        let options = || IngestOptions {
            workers: 2,
            engine,
            ..IngestOptions::default()
        };
        let load = ingest(&wh, &[dir.path().join("logs")], options()).unwrap();
        assert!(load.generations > 1, "the load is cut into generations");
        let fix = ingest(&wh, &[dir.path().join("fix")], options()).unwrap();
        assert!(fix.rehydrated_rows > 0 && fix.partitions_published > 0);
        // Each engine ran where it was asked to.
        let batch = (engine == Engine::Auto) as u64;
        assert_eq!(load.batch_engine_runs, batch * load.generations);
        assert_eq!(fix.batch_engine_runs, batch);
        let files = TableSnapshot::take(&wh).unwrap();
        let counts = |s: &adsmetrics::runtime::IngestSummary| {
            (
                s.events_accepted,
                s.conflicted_keys,
                s.rehydrated_rows,
                s.partitions_published,
            )
        };
        (files, counts(&load), counts(&fix), published_tables(&wh))
    };
    let batch = run(Engine::Auto);
    let dataflow = run(Engine::Dataflow);
    assert!(!batch.0.files.is_empty());
    assert_eq!(
        batch.0.fingerprint(),
        dataflow.0.fingerprint(),
        "the tables' files differ"
    );
    assert_eq!(batch.1, dataflow.1);
    assert_eq!(batch.2, dataflow.2);
    let mut all = events;
    all.extend(correction);
    assert!(batch.3 == expected_tables(&all));
}
