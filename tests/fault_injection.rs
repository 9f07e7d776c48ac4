//! Atomic publish (invariant 4): stop the publish after each of its steps, restart, and the
//! tables equal those of the uninterrupted run; in between, readers see old or new, never half.

mod common;

use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::sink::publish::FailPoint;
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::Warehouse;
use common::*;

#[test]
fn a_publish_stopped_after_any_step_recovers_to_the_uninterrupted_tables() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(2000, 5);
    write_parquet(&dir.path().join("one/a.parquet"), &events[..1200]);
    write_parquet(&dir.path().join("two/b.parquet"), &events[1200..]);
    // Bad records in the second ingest: its quarantine file is published with its partitions.
    std::fs::write(
        dir.path().join("two/bad.jsonl"),
        b"{not json\n{\"event_id\": 7}\n",
    )
    .unwrap();
    let inputs = |w: &str| vec![dir.path().join(w)];

    // The uninterrupted run: two ingests.
    let clean = Warehouse::new(dir.path().join("clean"));
    ingest(&clean, &inputs("one"), IngestOptions::default()).unwrap();
    ingest(&clean, &inputs("two"), IngestOptions::default()).unwrap();
    let expected = TableSnapshot::take(&clean).unwrap().fingerprint();
    assert_eq!(published_tables(&clean), expected_tables(&events));
    let clean_side = side_tables(&clean);
    assert_eq!(clean_side.0.len(), 2, "{:?}", clean_side.0);
    assert!(
        !clean_side.1.is_empty(),
        "the second ingest brought no late events"
    );

    let mut points = vec![
        FailPoint::AfterStage,
        FailPoint::AfterPrepare,
        FailPoint::AfterCommit,
    ];
    points.extend((0..6).map(FailPoint::AfterRename));
    // The second ingest's quarantine and late_arrivals files, renamed after its partitions.
    points.extend((0..2).map(FailPoint::AfterSideRename));
    for point in points {
        let wh = Warehouse::new(dir.path().join(format!("crash-{point:?}")));
        ingest(&wh, &inputs("one"), IngestOptions::default()).unwrap();
        let old = published_tables(&wh);
        let crashed = ingest(
            &wh,
            &inputs("two"),
            IngestOptions {
                fail_point: Some(point),
                workers: 2,
                ..Default::default()
            },
        );
        assert!(
            crashed.is_err(),
            "{point:?} did not stop the run: {crashed:?} {:?}",
            published_tables(&wh).keys().collect::<Vec<_>>()
        );

        // What a reader sees right after the crash: for every partition, old or new, whole.
        let new = expected_tables(&events);
        let visible = TableSnapshot::take(&wh).unwrap();
        for (path, state) in &visible.files {
            let rows = adsmetrics::sink::curated::read_partition(&wh.root().join(path)).unwrap();
            let is_old = old.values().any(|r| *r == rows);
            let is_new = new.values().any(|r| *r == rows);
            assert!(
                is_old || is_new,
                "{point:?}: {path:?} holds neither version ({:?})",
                state.version
            );
        }

        // The second ingest's quarantine rows show once their file is renamed into place (the
        // last rename, after the late_arrivals file's; recovery rolls a prepared publish
        // forward, so what is renamed stays), whole: not before, and never in part.
        let (quarantined, _) = side_tables(&wh);
        let renamed = matches!(
            point,
            FailPoint::AfterSideRename(1) | FailPoint::AfterCommit
        );
        assert_eq!(quarantined.len(), if renamed { 2 } else { 0 }, "{point:?}");

        // Restart: the same command again converges to the uninterrupted tables.
        let rerun = ingest(&wh, &inputs("two"), IngestOptions::default()).unwrap();
        assert_eq!(
            TableSnapshot::take(&wh).unwrap().fingerprint(),
            expected,
            "{point:?}: {rerun:?}"
        );
        // And its side tables hold each source's rows once, as the uninterrupted run's do.
        assert_eq!(side_tables(&wh), clean_side, "{point:?}");
        // The audit ledger accounts for every version the crashed and the restarted run made.
        assert_ledger_accounts_for_tables(&wh);
        assert!(
            !wh.staging_dir().exists()
                || std::fs::read_dir(wh.staging_dir())
                    .unwrap()
                    .next()
                    .is_none()
        );
        // And a further rerun is a no-op.
        let before = TableSnapshot::take(&wh).unwrap();
        let noop = ingest(&wh, &inputs("two"), IngestOptions::default()).unwrap();
        assert_eq!(noop.partitions_published, 0);
        assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&before));
    }
}

#[test]
fn a_torn_last_journal_line_is_cut_and_the_run_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(500, 6);
    write_parquet(&dir.path().join("in/a.parquet"), &events);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("in")], IngestOptions::default()).unwrap();
    let good = TableSnapshot::take(&wh).unwrap();
    let mut journal = std::fs::read(wh.journal_path()).unwrap();
    journal.extend_from_slice(b"{\"record\":\"prep");
    std::fs::write(wh.journal_path(), journal).unwrap();
    let rerun = ingest(&wh, &[dir.path().join("in")], IngestOptions::default()).unwrap();
    assert_eq!(rerun.sources_skipped, 1);
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&good));
}
