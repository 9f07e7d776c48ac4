//! Backfill with replace semantics: a source partition's current contents replace what it
//! contributed before, only the difference is published, and a second run changes nothing.

mod common;

use std::path::Path;

use adsmetrics::backfill::{backfill, BackfillOptions};
use adsmetrics::ledger::RunKind;
use adsmetrics::runtime::{ingest, IngestOptions, IngestSummary};
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::{parse_day, Warehouse};
use common::*;

fn run(wh: &Warehouse, dir: &Path, from: &str, to: &str) -> IngestSummary {
    backfill(
        wh,
        BackfillOptions {
            source: dir.join("logs"),
            from_day: parse_day(from).unwrap(),
            to_day: parse_day(to).unwrap(),
            run: IngestOptions {
                workers: 2,
                ..Default::default()
            },
        },
    )
    .unwrap()
}

#[test]
fn a_thirty_day_backfill_replayed_twice_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = thirty_days(dir.path(), 3000);
    let wh = Warehouse::new(dir.path().join("wh"));
    let first = run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert!(first.sources_ingested > 30, "{first:?}");
    assert!(
        published_tables(&wh) == expected_tables(&events),
        "tables differ from the reference"
    );

    let before = TableSnapshot::take(&wh).unwrap();
    let raw_before = adsmetrics::sink::raw::list_raw_files(&wh);
    let second = run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert_eq!(second.sources_ingested, 0);
    assert_eq!(second.sources_skipped, first.sources_found);
    assert_eq!(second.partitions_published, 0);
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&before));
    assert_eq!(adsmetrics::sink::raw::list_raw_files(&wh), raw_before);
    let entries = assert_ledger_accounts_for_tables(&wh);
    // Two commands: the first one entry per hot-window generation, the rerun one.
    let runs: std::collections::BTreeSet<&str> =
        entries.iter().map(|e| e.body.run_id.as_str()).collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(entries.len() as u64, first.generations + 1);
    assert!(entries.iter().all(|e| e.body.kind == RunKind::Backfill));
}

#[test]
fn a_changed_or_removed_source_partition_replaces_exactly_its_contribution() {
    let dir = tempfile::tempdir().unwrap();
    let events = thirty_days(dir.path(), 3000);
    let wh = Warehouse::new(dir.path().join("wh"));
    run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    let before = published_tables(&wh);

    // One day's web file: rows removed, rows added, one corrected by a higher revision.
    let logs = dir.path().join("logs");
    let web: Vec<_> = walkdir::WalkDir::new(&logs)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.path().to_string_lossy().contains("producer=web"))
        .map(|e| e.into_path())
        .filter(|p| p.is_file())
        .collect();
    let changed = &web[3];
    let mut rows = changed_rows(changed);
    let template = rows[0].clone();
    for i in 0..5 {
        let mut e = template.clone();
        e.event_id = Some(format!("backfilled-{i}").into());
        e.user_id = 7_000 + i;
        rows.push(e);
    }
    write_parquet(changed, &rows);
    // And another day's web file is gone.
    std::fs::remove_file(&web[7]).unwrap();

    let second = run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert_eq!(second.sources_ingested, 1, "{second:?}");
    assert!(second.retracted_rows > 0);
    // Withdrawn rows on the batch engine: each generation has one epoch after its rebuild.
    assert_eq!(second.batch_engine_runs, second.generations, "{second:?}");
    let now = decode_dir(&logs);
    let after = published_tables(&wh);
    assert!(
        after == expected_tables(&now),
        "tables differ from a recompute over the logs"
    );
    assert_ne!(after, before);
    assert_ne!(expected_tables(&now), expected_tables(&events));
    let differing = after
        .iter()
        .filter(|(id, rows)| before.get(id) != Some(rows))
        .count()
        + before.keys().filter(|id| !after.contains_key(id)).count();
    assert_eq!(second.partitions_published, differing as u64);
    let entries = assert_ledger_accounts_for_tables(&wh);
    let last_run = &entries.last().unwrap().body.run_id;
    let retired: usize = entries
        .iter()
        .filter(|e| &e.body.run_id == last_run)
        .map(|e| e.body.retired.len())
        .sum();
    assert_eq!(retired, 2);

    // Replayed: nothing changes.
    let snapshot = TableSnapshot::take(&wh).unwrap();
    let third = run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert_eq!((third.sources_ingested, third.partitions_published), (0, 0));
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
}

#[test]
fn a_backfill_over_ingested_logs_adopts_them_and_then_replaces_changes() {
    let dir = tempfile::tempdir().unwrap();
    let events = thirty_days(dir.path(), 1500);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("logs")], IngestOptions::default()).unwrap();
    let snapshot = TableSnapshot::take(&wh).unwrap();
    let raw_before = adsmetrics::sink::raw::list_raw_files(&wh);

    let adopt = run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert_eq!((adopt.sources_ingested, adopt.partitions_published), (0, 0));
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
    assert_eq!(adsmetrics::sink::raw::list_raw_files(&wh), raw_before);
    assert!(
        published_tables(&wh) == expected_tables(&events),
        "tables differ from the reference"
    );

    // Outside the range nothing is touched; inside it, the change is applied.
    let logs = dir.path().join("logs");
    let mut rewritten = events.clone();
    rewritten.retain(|e| e.user_id != 3);
    std::fs::remove_dir_all(&logs).unwrap();
    write_logs(&logs, &rewritten);
    // User 3's events span two days (the sample straddles midnight): backfill just those.
    let days: Vec<i64> = events
        .iter()
        .filter(|e| e.user_id == 3)
        .map(|e| e.event_time_us.div_euclid(DAY_US))
        .collect();
    let (from, to) = (
        adsmetrics::warehouse::day_string(*days.iter().min().unwrap()),
        adsmetrics::warehouse::day_string(*days.iter().max().unwrap()),
    );
    let narrow = run(&wh, dir.path(), &from, &to);
    assert!(narrow.retracted_rows > 0, "{narrow:?}");
    assert!(
        published_tables(&wh) == expected_tables(&rewritten),
        "tables differ from a recompute over the rewritten logs"
    );
    assert_ledger_accounts_for_tables(&wh);
}

#[test]
fn copies_and_moves_across_days_are_counted_once_and_withdrawn_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = thirty_days(dir.path(), 1500);
    let wh = Warehouse::new(dir.path().join("wh"));
    let logs = dir.path().join("logs");
    // The same bytes under two days' folders.
    let files: Vec<_> = walkdir::WalkDir::new(&logs)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    let (a, b) = (&files[2], &files[40]);
    let copy = logs.join("dt=2026-11-20/producer=copy/part-0.parquet");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(a, &copy).unwrap();
    run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert!(
        published_tables(&wh) == expected_tables(&events),
        "a copy counted twice"
    );

    // Both copies change (the shared content is withdrawn once), and another file moves to
    // another day's folder (its content is kept).
    let mut changed = decode_dir(a);
    changed.truncate(changed.len() / 2);
    write_parquet(a, &changed);
    let mut other = decode_dir(&copy);
    other.drain(..other.len() / 3);
    write_parquet(&copy, &other);
    let moved = logs.join("dt=2026-11-25/producer=moved/part-0.parquet");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(b, &moved).unwrap();
    run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert!(
        published_tables(&wh) == expected_tables(&decode_dir(&logs)),
        "tables differ from a recompute over the logs"
    );
    assert_ledger_accounts_for_tables(&wh);
    let snapshot = TableSnapshot::take(&wh).unwrap();
    run(&wh, dir.path(), "2026-11-01", "2026-12-31");
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
}
