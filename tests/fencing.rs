//! Fencing and run keys: what makes an orchestrator's retries safe. One writer at a time (the
//! writer lock), a publish that refuses to replace a version it did not read (the journal's
//! compare-and-swap), and one run key across every try of a task, recovery included.

mod common;

use std::process::Command;
use std::time::Duration;

use adsmetrics::journal::{CommitJournal, JournalError, PartitionChange, SideFile};
use adsmetrics::ledger::{Ledger, RunKind};
use adsmetrics::lock::{LockError, WriterLock};
use adsmetrics::runtime::{ingest, IngestOptions, RunError};
use adsmetrics::sink::publish::{publish_epoch, FailPoint, PublishError, PublishOrigin};
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::Warehouse;
use common::*;

fn quiet() -> IngestOptions {
    IngestOptions {
        workers: 1,
        ..IngestOptions::default()
    }
}

#[test]
fn a_second_writer_waits_for_the_lock_and_gives_up_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(800, 3);
    write_parquet(
        &dir.path().join("in/dt=2026-11-03/hr=00/a.parquet"),
        &events,
    );
    let warehouse =
        Warehouse::new(dir.path().join("wh")).with_lock_wait(Duration::from_millis(300));

    let held = WriterLock::acquire(&warehouse).unwrap();
    let refused = ingest(&warehouse, &[dir.path().join("in")], quiet()).unwrap_err();
    assert!(
        matches!(refused, RunError::Lock(LockError::Busy { .. })),
        "{refused}"
    );
    assert!(refused.is_temporary());
    assert!(
        refused.to_string().contains("locked by another writer"),
        "{refused}"
    );
    assert!(
        !warehouse.journal_path().exists(),
        "the refused run wrote a journal"
    );
    assert!(adsmetrics::sink::raw::list_raw_files(&warehouse).is_empty());

    drop(held);
    ingest(&warehouse, &[dir.path().join("in")], quiet()).unwrap();
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
}

#[test]
fn a_publish_over_a_journal_that_moved_or_a_version_it_did_not_read_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(800, 4);
    write_parquet(
        &dir.path().join("in/dt=2026-11-03/hr=00/a.parquet"),
        &events,
    );
    let warehouse = Warehouse::new(dir.path().join("wh"));
    ingest(&warehouse, &[dir.path().join("in")], quiet()).unwrap();

    // A stale writer: it read the journal, then another writer published more.
    let mut stale = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    let (id, current) = stale
        .published()
        .iter()
        .next()
        .map(|(id, p)| (*id, p.clone()))
        .unwrap();
    let more = sample_events(300, 5);
    write_parquet(&dir.path().join("in/dt=2026-11-03/hr=01/b.parquet"), &more);
    ingest(&warehouse, &[dir.path().join("in")], quiet()).unwrap();
    let snapshot = TableSnapshot::take(&warehouse).unwrap();
    let journal_bytes = std::fs::read(warehouse.journal_path()).unwrap();

    let origin = || PublishOrigin {
        run_id: "stale",
        run_key: None,
        epoch: 0,
        ledger: None,
        retired: Vec::new(),
        side_files: Vec::new(),
    };
    let change = |old: Option<String>| PartitionChange {
        partition: id,
        old_version: old,
        new_version: None,
        rows: 0,
        staged: None,
        old_totals: None,
        new_totals: None,
    };
    let moved = stale
        .prepare(
            origin(),
            Vec::new(),
            vec![change(Some(current.version.clone()))],
        )
        .unwrap_err();
    assert!(matches!(moved, JournalError::Fenced { .. }), "{moved}");
    assert!(moved.to_string().contains("bytes"), "{moved}");

    // A fresh handle, but a change that does not replace the current version.
    let mut fresh = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    let wrong = fresh
        .prepare(
            origin(),
            Vec::new(),
            vec![change(Some("not-the-version".into()))],
        )
        .unwrap_err();
    assert!(matches!(wrong, JournalError::Fenced { .. }), "{wrong}");
    assert!(wrong.to_string().contains("not-the-version"), "{wrong}");

    // A publish whose staged file is gone (another writer cleared staging) prepares nothing.
    let gone = SideFile {
        staged: "_adsmetrics/staging/quarantine-sources-0.parquet".into(),
        dest: "quarantine/dt=2026-11-03/sources-0.parquet".into(),
    };
    let refused = publish_epoch(
        &mut fresh,
        &warehouse,
        PublishOrigin {
            side_files: vec![gone],
            ..origin()
        },
        Vec::new(),
        Vec::new(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(refused, PublishError::Journal(JournalError::Fenced { .. })),
        "{refused}"
    );
    assert!(refused.to_string().contains("is gone"), "{refused}");

    assert_eq!(
        std::fs::read(warehouse.journal_path()).unwrap(),
        journal_bytes
    );
    assert_eq!(TableSnapshot::take(&warehouse).unwrap(), snapshot);
    let mut all = events;
    all.extend(more);
    assert_eq!(published_tables(&warehouse), expected_tables(&all));
}

#[test]
fn a_retry_after_a_crash_mid_publish_converges_under_the_same_run_key() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(1200, 6);
    write_parquet(
        &dir.path().join("in/dt=2026-11-03/hr=00/a.parquet"),
        &events,
    );
    let warehouse =
        Warehouse::new(dir.path().join("wh")).with_run_key(Some("ads_metrics/2026-11-03".into()));

    let crashed = ingest(
        &warehouse,
        &[dir.path().join("in")],
        IngestOptions {
            fail_point: Some(FailPoint::AfterPrepare),
            ..quiet()
        },
    );
    assert!(crashed.is_err());
    // The retry is another process in production; a new handle with the same key here.
    let retry =
        Warehouse::new(dir.path().join("wh")).with_run_key(Some("ads_metrics/2026-11-03".into()));
    ingest(&retry, &[dir.path().join("in")], quiet()).unwrap();
    assert_eq!(published_tables(&warehouse), expected_tables(&events));

    let ledger = Ledger::open(&warehouse.ledger_path()).unwrap();
    let kinds: Vec<RunKind> = ledger.entries().iter().map(|e| e.body.kind).collect();
    assert!(kinds.contains(&RunKind::Ingest), "{kinds:?}");
    for entry in ledger.entries() {
        assert_eq!(
            entry.body.run_key.as_deref(),
            Some("ads_metrics/2026-11-03"),
            "{:?}",
            entry.body
        );
    }
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    assert!(journal
        .committed()
        .iter()
        .all(|p| p.run_key.as_deref() == Some("ads_metrics/2026-11-03")));
}

#[test]
fn the_cli_drill_exits_86_mid_publish_and_a_locked_warehouse_exits_75() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(600, 7);
    write_parquet(
        &dir.path().join("in/dt=2026-11-03/hr=00/a.parquet"),
        &events,
    );
    let wh = dir.path().join("wh");
    let cli = |env: Option<(&str, &str)>, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_adsmetrics"));
        c.arg("--warehouse").arg(&wh).args(args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let input = dir.path().join("in");
    let input = input.to_str().unwrap();

    let drill = cli(
        Some(("ADSMETRICS_FAIL_AT", "after-prepare")),
        &["--run-key", "k/1", "ingest", "--quiet", input],
    );
    assert_eq!(drill.status.code(), Some(86), "{drill:?}");
    let warehouse = Warehouse::new(&wh);
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    assert!(
        journal.pending_publish().is_some(),
        "the drill stopped before its Prepare"
    );

    let held = WriterLock::acquire(&warehouse).unwrap();
    let busy = cli(None, &["--lock-wait", "0", "ingest", "--quiet", input]);
    assert_eq!(busy.status.code(), Some(75), "{busy:?}");
    assert!(String::from_utf8_lossy(&busy.stderr).contains("locked by another writer"));
    drop(held);

    let retry = cli(None, &["--run-key", "k/1", "ingest", "--quiet", input]);
    assert!(retry.status.success(), "{retry:?}");
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    let audit = cli(None, &["audit", "verify"]);
    assert!(audit.status.success(), "{audit:?}");
    // `audit log --json` prints the entries as the ledger holds them, hashes and all.
    let log = cli(None, &["audit", "log", "--json"]);
    assert!(log.status.success(), "{log:?}");
    assert_eq!(
        String::from_utf8(log.stdout).unwrap(),
        std::fs::read_to_string(warehouse.ledger_path()).unwrap()
    );
}

#[test]
fn the_publish_gate_passes_clean_epochs_and_holds_back_one_that_does_not_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(1500, 8);
    let (a, b) = events.split_at(900);
    write_parquet(&dir.path().join("in/dt=2026-11-03/hr=00/a.parquet"), a);
    let warehouse = Warehouse::new(dir.path().join("wh"));
    let gated = |tamper| IngestOptions {
        gate: true,
        tamper_for_test: tamper,
        ..quiet()
    };

    // A clean epoch passes the gate.
    ingest(&warehouse, &[dir.path().join("in")], gated(false)).unwrap();
    assert_eq!(published_tables(&warehouse), expected_tables(a));

    // A buggy epoch (one click too many per staged partition) is held back whole.
    write_parquet(&dir.path().join("in/dt=2026-11-03/hr=01/b.parquet"), b);
    std::fs::write(
        dir.path().join("in/dt=2026-11-03/hr=01/junk.txt"),
        b"not events",
    )
    .unwrap();
    let snapshot = TableSnapshot::take(&warehouse).unwrap();
    let journal_bytes = std::fs::read(warehouse.journal_path()).unwrap();
    let held = ingest(&warehouse, &[dir.path().join("in")], gated(true)).unwrap_err();
    let RunError::Gated {
        count, dir: kept, ..
    } = &held
    else {
        panic!("not gated: {held}");
    };
    assert!(*count > 0);
    assert_eq!(TableSnapshot::take(&warehouse).unwrap(), snapshot);
    assert_eq!(
        std::fs::read(warehouse.journal_path()).unwrap(),
        journal_bytes
    );
    let kept = warehouse.root().join(kept);
    let findings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kept.join("findings.json")).unwrap()).unwrap();
    assert_eq!(findings["findings"].as_array().unwrap().len(), *count);
    let staged = std::fs::read_dir(&kept)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "parquet")
        })
        .count();
    assert!(staged >= *count, "the held-back staged files are not kept");
    // So are the held sources' side-table files (their bad file's quarantine row; their late
    // arrivals into the hour already published), under their destination paths.
    let side: Vec<&str> = findings["side_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["dest"].as_str().unwrap())
        .collect();
    assert_eq!(side.len(), 2, "{side:?}");
    assert!(side[0].starts_with("late_arrivals/"), "{side:?}");
    assert!(side[1].starts_with("quarantine/"), "{side:?}");
    for dest in &side {
        assert!(kept.join(dest).is_file(), "{dest}");
        assert!(!warehouse.root().join(dest).exists(), "{dest}");
    }
    assert!(quarantine_rows(&warehouse).is_empty());

    // The same epoch without the bug passes and converges, its bad file quarantined once.
    ingest(&warehouse, &[dir.path().join("in")], gated(false)).unwrap();
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    assert_eq!(quarantine_rows(&warehouse).len(), 1);

    // Without the gate, the bug would have been published (and only reconcile would say so).
    let other = Warehouse::new(dir.path().join("ungated"));
    ingest(
        &other,
        &[dir.path().join("in")],
        IngestOptions {
            tamper_for_test: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_ne!(published_tables(&other), expected_tables(&events));
}
