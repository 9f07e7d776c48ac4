//! The audit ledger: every run is on it, its deltas account for the tables, and `verify` finds
//! any edited, removed or reordered entry.

mod common;

use adsmetrics::journal::CommitJournal;
use adsmetrics::ledger::{self, LedgerError, Outcome, RunKind};
use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::sink::publish::FailPoint;
use adsmetrics::warehouse::Warehouse;
use common::*;

fn verify(warehouse: &Warehouse) -> Result<ledger::VerifyReport, LedgerError> {
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    ledger::verify(&warehouse.ledger_path(), journal.committed())
}

fn lines(warehouse: &Warehouse) -> Vec<String> {
    std::fs::read_to_string(warehouse.ledger_path())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(warehouse: &Warehouse, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(warehouse.ledger_path(), text).unwrap();
}

/// A warehouse with three entries: two ingests that changed tables and a rerun that did not.
fn three_runs(dir: &std::path::Path) -> Warehouse {
    let events = sample_events(1500, 21);
    write_parquet(&dir.join("one/a.parquet"), &events[..900]);
    write_jsonl(&dir.join("two/b.jsonl"), &events[900..]);
    let wh = Warehouse::new(dir.join("wh"));
    ingest(&wh, &[dir.join("one")], IngestOptions::default()).unwrap();
    ingest(&wh, &[dir.join("two")], IngestOptions::default()).unwrap();
    ingest(
        &wh,
        &[dir.join("one"), dir.join("two")],
        IngestOptions::default(),
    )
    .unwrap();
    wh
}

#[test]
fn every_run_is_on_the_ledger_and_its_deltas_add_up_to_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let wh = three_runs(dir.path());
    let entries = assert_ledger_accounts_for_tables(&wh);
    let summary: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.body.kind,
                e.body.outcome,
                e.body.publishes.clone(),
                e.body.sources.len(),
                e.body.sources_skipped,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (RunKind::Ingest, Outcome::Changed, vec![1], 1, 0),
            (RunKind::Ingest, Outcome::Changed, vec![2], 1, 0),
            (RunKind::Ingest, Outcome::Unchanged, vec![], 0, 2),
        ]
    );
    assert!(entries[2].body.partitions.is_empty());
    // Each source is named with its content hash.
    let journal = CommitJournal::open(wh.root(), &wh.journal_path()).unwrap();
    for entry in &entries[..2] {
        assert!(journal
            .consumed()
            .contains(&entry.body.sources[0].content_hash));
    }
    // The lineage of one partition lists exactly the entries that made its versions.
    let partition = &entries[1].body.partitions[0].partition;
    let log = ledger::render_log(&entries, Some(partition));
    assert!(log.contains(partition.as_str()), "{log}");
    assert!(
        !log.contains("#3 "),
        "the unchanged rerun is not in a lineage: {log}"
    );
    assert!(verify(&wh).is_ok());
}

#[test]
fn verify_fails_on_an_edited_removed_reordered_or_cut_off_entry() {
    let dir = tempfile::tempdir().unwrap();
    let wh = three_runs(dir.path());
    let good = lines(&wh);
    assert_eq!(good.len(), 3);
    let report = verify(&wh).unwrap();
    assert_eq!((report.entries, report.publishes), (3, 2));

    // An edited metric delta (the hash no longer matches the body).
    let edited: Vec<String> = good
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                l.replacen("\"impressions\":", "\"impressions\":1", 1)
            } else {
                l.clone()
            }
        })
        .collect();
    assert_ne!(edited, good);
    write_lines(&wh, &edited);
    let err = verify(&wh).unwrap_err();
    assert!(matches!(err, LedgerError::Broken { line: 1, .. }), "{err}");

    // An edit that recomputes the entry's own hash still breaks the next entry's link.
    let mut entry: ledger::Entry = serde_json::from_str(&good[0]).unwrap();
    entry.body.actor = "mallory".to_string();
    entry.hash = ledger::body_hash(&entry.body);
    let mut forged = good.clone();
    forged[0] = serde_json::to_string(&entry).unwrap();
    write_lines(&wh, &forged);
    let err = verify(&wh).unwrap_err();
    assert!(matches!(err, LedgerError::Broken { line: 2, .. }), "{err}");

    // A removed entry.
    write_lines(&wh, &[good[0].clone(), good[2].clone()]);
    assert!(matches!(
        verify(&wh).unwrap_err(),
        LedgerError::Broken { line: 2, .. }
    ));

    // Two entries swapped.
    write_lines(&wh, &[good[1].clone(), good[0].clone(), good[2].clone()]);
    assert!(matches!(
        verify(&wh).unwrap_err(),
        LedgerError::Broken { line: 1, .. }
    ));

    // Entries cut off the end: publish 2 was prepared after entry 1, which is gone.
    write_lines(&wh, &[]);
    assert!(matches!(
        verify(&wh).unwrap_err(),
        LedgerError::Broken { line: 1, .. }
    ));

    // An ingest refuses to append to a broken ledger, and says which entry is wrong.
    write_lines(&wh, &edited);
    let err = ingest(&wh, &[dir.path().join("one")], IngestOptions::default()).unwrap_err();
    assert!(err.to_string().contains("entry 1"), "{err}");

    write_lines(&wh, &good);
    assert!(verify(&wh).is_ok());
}

#[test]
fn a_run_that_stopped_after_committing_is_recorded_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let wh = three_runs(dir.path());
    // The newest entry cut off looks exactly like a crash between commit and ledger append:
    // publish 2 is pending, and the next run records it.
    let good = lines(&wh);
    write_lines(&wh, &good[..1]);
    assert_eq!(verify(&wh).unwrap().pending, vec![2]);
    ingest(&wh, &[dir.path().join("one")], IngestOptions::default()).unwrap();
    let entries = assert_ledger_accounts_for_tables(&wh);
    assert_eq!(entries[1].body.kind, RunKind::Recovery);
    assert_eq!(entries[1].body.publishes, vec![2]);
    assert_eq!(entries[2].body.outcome, Outcome::Unchanged);
}

#[test]
fn a_publish_stopped_at_any_step_ends_up_on_the_ledger_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(1200, 22);
    write_parquet(&dir.path().join("one/a.parquet"), &events[..700]);
    write_parquet(&dir.path().join("two/b.parquet"), &events[700..]);
    for point in [
        FailPoint::AfterStage,
        FailPoint::AfterPrepare,
        FailPoint::AfterRename(0),
        FailPoint::AfterCommit,
    ] {
        let wh = Warehouse::new(dir.path().join(format!("wh-{point:?}")));
        ingest(&wh, &[dir.path().join("one")], IngestOptions::default()).unwrap();
        let crashed = ingest(
            &wh,
            &[dir.path().join("two")],
            IngestOptions {
                fail_point: Some(point),
                ..Default::default()
            },
        );
        assert!(crashed.is_err());
        let failed = lines(&wh).len();
        assert_eq!(failed, 2, "{point:?}: the failed run has its entry");
        ingest(&wh, &[dir.path().join("two")], IngestOptions::default()).unwrap();
        let entries = assert_ledger_accounts_for_tables(&wh);
        assert_eq!(entries[1].body.outcome, Outcome::Failed, "{point:?}");
        let publish_2: Vec<_> = entries
            .iter()
            .filter(|e| e.body.publishes.contains(&2))
            .map(|e| e.body.kind)
            .collect();
        assert_eq!(publish_2.len(), 1, "{point:?}: {publish_2:?}");
    }
}

#[test]
fn a_torn_last_line_is_cut_and_the_chain_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let wh = three_runs(dir.path());
    let mut text = std::fs::read(wh.ledger_path()).unwrap();
    text.extend_from_slice(b"{\"v\":1,\"seq\":4,\"prev\":\"ab");
    std::fs::write(wh.ledger_path(), &text).unwrap();
    assert!(verify(&wh).is_ok(), "a torn append is not tampering");
    ingest(&wh, &[dir.path().join("one")], IngestOptions::default()).unwrap();
    assert_eq!(lines(&wh).len(), 4);
    assert_eq!(verify(&wh).unwrap().entries, 4);
}

#[test]
fn a_run_that_fails_before_its_workers_start_is_on_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(800, 23);
    write_parquet(&dir.path().join("one/a.parquet"), &events[..400]);
    write_parquet(&dir.path().join("two/b.parquet"), &events[400..]);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("one")], IngestOptions::default()).unwrap();
    // A damaged raw file: the next run cannot work out what to rebuild.
    let raw = adsmetrics::sink::raw::list_raw_files(&wh);
    std::fs::write(&raw[0], b"not parquet").unwrap();
    let err = ingest(&wh, &[dir.path().join("two")], IngestOptions::default()).unwrap_err();
    let ledger = adsmetrics::ledger::Ledger::open(&wh.ledger_path()).unwrap();
    let last = ledger.entries().last().unwrap();
    assert_eq!(last.body.outcome, Outcome::Failed);
    assert_eq!(last.body.error.as_deref(), Some(err.to_string().as_str()));
    assert!(verify(&wh).is_ok());
}
