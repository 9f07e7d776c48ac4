//! The hot window: a run over many source days is cut into generations of at most the window's
//! days, each a fresh dataflow rebuilt by key from the raw layer. The tables must come out as if
//! the run had held everything at once — exact, with late events days late and corrections that
//! move events across days — and the window must really cut the run.

mod common;

use adsmetrics::backfill::{backfill, BackfillOptions};
use adsmetrics::event::Event;
use adsmetrics::ledger::RunKind;
use adsmetrics::runtime::{ingest, Engine, IngestOptions, IngestSummary};
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::{parse_day, Warehouse};
use common::*;

fn options(hot_window_days: Option<u32>) -> IngestOptions {
    IngestOptions {
        workers: 2,
        hot_window_days,
        ..Default::default()
    }
}

fn run_backfill(
    wh: &Warehouse,
    root: &std::path::Path,
    window: Option<u32>,
    engine: Engine,
) -> IngestSummary {
    backfill(
        wh,
        BackfillOptions {
            source: root.to_path_buf(),
            from_day: parse_day("2026-11-01").unwrap(),
            to_day: parse_day("2026-12-31").unwrap(),
            run: IngestOptions {
                engine,
                ..options(window)
            },
        },
    )
    .unwrap()
}

/// Thirty days of events plus, in the last days' folders, events days late and revisions that
/// move events of early days to other days: what a window must not get wrong.
fn history_with_late_events(dir: &std::path::Path) -> Vec<Event> {
    let mut events = sample_events(3000, 31);
    for e in &mut events {
        e.event_time_us += (e.user_id % 30) * DAY_US;
    }
    let mut late = Vec::new();
    for (i, e) in events.iter().enumerate().step_by(97).take(25) {
        // Arrives in the folder of a day 10-20 days after its event time.
        let mut copy = e.clone();
        copy.event_id = Some(format!("late-{i}").into());
        late.push((
            e.event_time_us.div_euclid(DAY_US) + 10 + (i as i64 % 11),
            copy,
        ));
    }
    for (i, e) in events.iter().enumerate().skip(13).step_by(211).take(10) {
        if e.event_id.is_none() {
            continue;
        }
        // A correction that moves the event five days on, filed in a later folder.
        let mut moved = e.clone();
        moved.revision += 1;
        moved.cost_micros = Some(moved.cost_micros.unwrap_or(0) + 1000);
        moved.event_time_us += 5 * DAY_US;
        late.push((
            moved.event_time_us.div_euclid(DAY_US) + 3 + (i as i64 % 4),
            moved,
        ));
    }
    write_logs(&dir.join("logs"), &events);
    let mut folders: std::collections::BTreeMap<i64, Vec<Event>> = Default::default();
    for (folder, e) in &late {
        folders.entry(*folder).or_default().push(e.clone());
    }
    for (folder, late_events) in folders {
        let path = dir
            .join("logs")
            .join(format!("dt={}", adsmetrics::warehouse::day_string(folder)))
            .join("producer=late/part-0.parquet");
        write_parquet(&path, &late_events);
    }
    events.extend(late.into_iter().map(|(_, e)| e));
    events
}

/// How many windows of `window` days the greedy cut makes of the source folders' days.
fn windows_of(dir: &std::path::Path, window: i64) -> u64 {
    let mut days: Vec<i64> = std::fs::read_dir(dir.join("logs"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("dt=").and_then(parse_day)
        })
        .collect();
    days.sort();
    let (mut windows, mut first) = (0, None);
    for day in days {
        if first.is_none_or(|f| day - f >= window) {
            windows += 1;
            first = Some(day);
        }
    }
    windows
}

#[test]
fn a_windowed_backfill_equals_the_reference_and_reruns_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let events = history_with_late_events(dir.path());
    let windowed = Warehouse::new(dir.path().join("windowed"));
    let first = run_backfill(
        &windowed,
        &dir.path().join("logs"),
        Some(2),
        Engine::Dataflow,
    );
    // 30+ source days in windows of two: 15 or more dataflows, each holding two days.
    assert_eq!(first.generations, windows_of(dir.path(), 2), "{first:?}");
    assert!(first.generations >= 15);
    assert_eq!(first.memory.len() as u64, first.generations);
    assert!(first
        .memory
        .windows(2)
        .all(|m| m[0].days_done < m[1].days_done));
    assert!(
        published_tables(&windowed) == expected_tables(&events),
        "windowed tables differ from a recompute over all events"
    );
    // The later generations rebuilt state from the raw layer their predecessors wrote.
    assert!(first.rehydrated_rows > 0, "{first:?}");

    // The same history in one dataflow gives the same partition versions.
    let whole = Warehouse::new(dir.path().join("whole"));
    let unwindowed = run_backfill(&whole, &dir.path().join("logs"), None, Engine::Auto);
    assert_eq!(unwindowed.generations, 1);
    assert_eq!(
        TableSnapshot::take(&windowed).unwrap().fingerprint(),
        TableSnapshot::take(&whole).unwrap().fingerprint(),
        "same partitions, same bytes"
    );

    // On the batch engine the window's days are generations of their own (an epoch each),
    // every one computed by the engine: the same bytes again.
    let daily = Warehouse::new(dir.path().join("daily"));
    let on_engine = run_backfill(&daily, &dir.path().join("logs"), Some(2), Engine::Auto);
    assert_eq!(
        on_engine.generations,
        windows_of(dir.path(), 1),
        "{on_engine:?}"
    );
    assert_eq!(on_engine.batch_engine_runs, on_engine.generations);
    assert_eq!(
        TableSnapshot::take(&daily).unwrap().fingerprint(),
        TableSnapshot::take(&whole).unwrap().fingerprint(),
        "same partitions, same bytes"
    );

    // Replayed: nothing read, nothing written, one ledger entry for the rerun.
    let before = TableSnapshot::take(&windowed).unwrap();
    let again = run_backfill(
        &windowed,
        &dir.path().join("logs"),
        Some(2),
        Engine::Dataflow,
    );
    assert_eq!(again.sources_ingested, 0);
    assert_eq!(again.partitions_published, 0);
    assert!(TableSnapshot::take(&windowed)
        .unwrap()
        .untouched_since(&before));
    let entries = assert_ledger_accounts_for_tables(&windowed);
    let runs: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.body.run_id.as_str()).collect();
    assert_eq!(runs.len(), 2, "one run id per command");
    assert!(entries.iter().all(|e| e.body.kind == RunKind::Backfill));
    assert!(entries
        .iter()
        .any(|e| e.body.command.contains("hot window generation 15/")));
    assert!(entries
        .iter()
        .all(|e| e.body.command.contains("--hot-window 2d")));
}

#[test]
fn a_windowed_ingest_of_dated_folders_is_exact_and_cut_by_day() {
    let dir = tempfile::tempdir().unwrap();
    let events = history_with_late_events(dir.path());
    let wh = Warehouse::new(dir.path().join("wh"));
    let run = ingest(&wh, &[dir.path().join("logs")], options(Some(7))).unwrap();
    // 30+ days in windows of seven, each generation two more source days at least.
    assert_eq!(run.generations, windows_of(dir.path(), 7), "{run:?}");
    assert!(run.generations >= 5);
    assert!(run
        .memory
        .windows(2)
        .all(|m| m[0].days_done + 1 < m[1].days_done));
    assert!(
        published_tables(&wh) == expected_tables(&events),
        "tables differ from a recompute over all events"
    );
    let before = TableSnapshot::take(&wh).unwrap();
    let again = ingest(&wh, &[dir.path().join("logs")], options(Some(7))).unwrap();
    assert_eq!(again.sources_ingested, 0);
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&before));
    assert_ledger_accounts_for_tables(&wh);
}
