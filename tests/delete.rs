//! Compliance deletes: the events leave every table and the raw layer, stay gone when an old
//! source is replayed, a certificate says what changed, and the same request twice is a no-op.

mod common;

use std::collections::BTreeSet;

use adsmetrics::delete::{delete, DeleteRequest};
use adsmetrics::event::Event;
use adsmetrics::ledger::{Outcome, RunKind};
use adsmetrics::runtime::ingest;
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::{DedupKey, EventType};
use common::*;

/// Every event left in the raw layer.
fn raw_events(wh: &Warehouse) -> Vec<Event> {
    adsmetrics::sink::raw::list_raw_files(wh)
        .iter()
        .flat_map(|p| decode_dir(p))
        .collect()
}

fn keys_where(events: &[Event], pick: impl Fn(&Event) -> bool) -> BTreeSet<DedupKey> {
    events
        .iter()
        .filter(|e| pick(e))
        .map(Event::dedup_key)
        .collect()
}

fn without(events: &[Event], keys: &BTreeSet<DedupKey>) -> Vec<Event> {
    events
        .iter()
        .filter(|e| !keys.contains(&e.dedup_key()))
        .cloned()
        .collect()
}

fn setup(dir: &std::path::Path) -> (Warehouse, Vec<Event>) {
    let events = sample_events(2500, 40);
    write_parquet(&dir.join("in/a.parquet"), &events[..1400]);
    write_jsonl(&dir.join("in/b.jsonl"), &events[1400..]);
    let wh = Warehouse::new(dir.join("wh"));
    ingest(&wh, &[dir.join("in")], options()).unwrap();
    (wh, events)
}

#[test]
fn a_delete_by_user_removes_the_events_everywhere_once() {
    let dir = tempfile::tempdir().unwrap();
    let (wh, events) = setup(dir.path());
    let request = DeleteRequest {
        request_id: "GDPR-7".into(),
        reason: "user asked".into(),
        user_ids: vec![7, 11],
        event_ids: vec![],
    };
    let gone = keys_where(&events, |e| e.user_id == 7 || e.user_id == 11);
    assert!(gone.len() > 20, "the sample has events of users 7 and 11");

    let first = delete(&wh, &request, options()).unwrap();
    assert!(!first.already_applied);
    let c = &first.certificate;
    assert_eq!(c.events_deleted, gone.len() as u64);
    assert!(c.raw_rows_removed >= gone.len() as u64);
    assert!(!c.raw_files_rewritten.is_empty());
    assert!(!c.partitions.is_empty());
    assert!(
        published_tables(&wh) == expected_tables(&without(&events, &gone)),
        "tables differ from a recompute without the deleted events"
    );
    assert!(raw_events(&wh)
        .iter()
        .all(|e| e.user_id != 7 && e.user_id != 11));
    let entries = assert_ledger_accounts_for_tables(&wh);
    let last = entries.last().unwrap();
    assert_eq!(
        (
            last.body.kind,
            last.body.outcome,
            last.body.request.as_deref()
        ),
        (RunKind::Delete, Outcome::Changed, Some("GDPR-7"))
    );
    assert_eq!(last.body.partitions.len(), c.partitions.len());

    // The same request again: nothing changes, and it says so.
    let snapshot = TableSnapshot::take(&wh).unwrap();
    let raw_before = adsmetrics::sink::raw::list_raw_files(&wh);
    let again = delete(&wh, &request, options()).unwrap();
    assert!(again.already_applied);
    assert_eq!(again.certificate, first.certificate);
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
    assert_eq!(adsmetrics::sink::raw::list_raw_files(&wh), raw_before);
    let entries = assert_ledger_accounts_for_tables(&wh);
    assert_eq!(entries.last().unwrap().body.outcome, Outcome::Unchanged);
}

#[test]
fn a_delete_by_event_id_survives_a_replay_of_an_old_source() {
    let dir = tempfile::tempdir().unwrap();
    let (wh, events) = setup(dir.path());
    let ids: Vec<String> = events
        .iter()
        .filter_map(|e| e.event_id.as_deref().map(str::to_string))
        .step_by(97)
        .take(6)
        .collect();
    let gone = keys_where(&events, |e| {
        e.event_id
            .as_deref()
            .is_some_and(|id| ids.iter().any(|i| i == id))
    });
    delete(
        &wh,
        &DeleteRequest {
            request_id: "ticket-42".into(),
            reason: "fraud".into(),
            user_ids: vec![],
            event_ids: ids.clone(),
        },
        options(),
    )
    .unwrap();
    let expected = expected_tables(&without(&events, &gone));
    assert!(published_tables(&wh) == expected, "tables after the delete");

    // An old copy of the source, resent under a new name with one new event: the deleted events
    // stay deleted, the new one counts.
    let mut old = events[..1400].to_vec();
    let mut fresh = old[0].clone();
    fresh.event_id = Some("after-the-delete".into());
    old.push(fresh.clone());
    write_parquet(&dir.path().join("replay/a-again.parquet"), &old);
    let replay = ingest(&wh, &[dir.path().join("replay")], options()).unwrap();
    assert!(replay.tombstoned > 0, "{replay:?}");
    let mut all = events.clone();
    all.push(fresh);
    assert!(
        published_tables(&wh) == expected_tables(&without(&all, &gone)),
        "a replay brought a deleted event back"
    );
    assert!(raw_events(&wh)
        .iter()
        .all(|e| !gone.contains(&e.dedup_key())));
    assert_ledger_accounts_for_tables(&wh);

    // The replay again: no file changes.
    let snapshot = TableSnapshot::take(&wh).unwrap();
    let raw_before = adsmetrics::sink::raw::list_raw_files(&wh);
    ingest(&wh, &[dir.path().join("replay")], options()).unwrap();
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
    assert_eq!(adsmetrics::sink::raw::list_raw_files(&wh), raw_before);
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (wh, _) = setup(dir.path());
    for (id, users) in [("../etc", vec![1]), ("", vec![1]), ("ok-id", vec![])] {
        let err = delete(
            &wh,
            &DeleteRequest {
                request_id: id.into(),
                reason: "x".into(),
                user_ids: users,
                event_ids: vec![],
            },
            options(),
        )
        .unwrap_err();
        assert!(
            matches!(err, adsmetrics::delete::DeleteError::Usage(_)),
            "{err}"
        );
    }
}

/// The `raw` bytes of every quarantine row in the warehouse.
fn quarantined_raw(wh: &Warehouse) -> Vec<String> {
    quarantine_rows(wh)
        .into_iter()
        .map(|(_, _, _, raw)| String::from_utf8_lossy(&raw).into_owned())
        .collect()
}

#[test]
fn a_delete_also_removes_the_quarantined_records_that_name_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let (wh, _) = setup(dir.path());
    // Invalid records: two of user 7 (one JSON with a bad country, one broken line), one of
    // user 70 and one of nobody in particular.
    std::fs::create_dir_all(dir.path().join("bad")).unwrap();
    let lines = [
        r#"{"event_id":"x1","event_type":"click","event_time":1793750400000000,"ad_id":1,"campaign_id":1,"advertiser_id":1,"country":"??","user_id":7,"ip":"10.0.0.1","producer":"web","revision":0}"#,
        r#"{"event_id":"x2","user_id": 7, "country": "DE", "#,
        r#"{"event_id":"x3","event_type":"click","event_time":1793750400000000,"ad_id":1,"campaign_id":1,"advertiser_id":1,"country":"??","user_id":70,"ip":"10.0.0.1","producer":"web","revision":0}"#,
        "not json",
    ];
    std::fs::write(dir.path().join("bad/c.jsonl"), lines.join("\n")).unwrap();
    ingest(&wh, &[dir.path().join("bad")], options()).unwrap();
    let before = quarantined_raw(&wh);
    assert!(
        before.iter().filter(|r| r.contains("\"x")).count() == 3,
        "{before:?}"
    );

    let request = DeleteRequest {
        request_id: "GDPR-q".into(),
        reason: "user asked".into(),
        user_ids: vec![7],
        event_ids: vec![],
    };
    let outcome = delete(&wh, &request, options()).unwrap();
    assert_eq!(outcome.certificate.quarantine_rows_removed, 2);
    assert_eq!(outcome.certificate.quarantine_files_rewritten.len(), 1);
    let after = quarantined_raw(&wh);
    assert_eq!(after.len(), before.len() - 2);
    assert!(after
        .iter()
        .all(|r| !r.contains("\"x1\"") && !r.contains("\"x2\"")));
    assert!(
        after.iter().any(|r| r.contains("\"x3\"")),
        "user 70 is not user 7"
    );
    assert!(after.iter().any(|r| r == "not json"));
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let target = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_delete_that_crashed_after_its_publish_still_certifies_the_partitions_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (wh, events) = setup(dir.path());
    let request = DeleteRequest {
        request_id: "GDPR-9".into(),
        reason: "user asked".into(),
        user_ids: vec![3],
        event_ids: vec![],
    };
    let gone = keys_where(&events, |e| e.user_id == 3);
    let raw_backup = dir.path().join("raw-backup");
    copy_tree(&wh.raw_dir(), &raw_backup);
    let applied = delete(&wh, &request, options()).unwrap();
    assert!(!applied.certificate.partitions.is_empty());

    // Back to the moment after the journal committed the delete's publish: the ledger entry,
    // the raw-layer rewrite and the certificate not yet done.
    std::fs::remove_dir_all(wh.raw_dir()).unwrap();
    copy_tree(&raw_backup, &wh.raw_dir());
    std::fs::remove_file(adsmetrics::delete::certificate_path(&wh, "GDPR-9")).unwrap();
    let ledger = std::fs::read_to_string(wh.ledger_path()).unwrap();
    let mut lines: Vec<&str> = ledger.lines().collect();
    lines.pop();
    std::fs::write(wh.ledger_path(), lines.join("\n") + "\n").unwrap();

    let finished = delete(&wh, &request, options()).unwrap();
    assert!(!finished.already_applied);
    let c = &finished.certificate;
    assert_eq!(c.partitions, applied.certificate.partitions);
    assert!(c.raw_rows_removed >= gone.len() as u64);
    assert!(
        published_tables(&wh) == expected_tables(&without(&events, &gone)),
        "tables differ from a recompute without the deleted events"
    );
    assert!(raw_events(&wh).iter().all(|e| e.user_id != 3));
    let entries = assert_ledger_accounts_for_tables(&wh);
    let recovery = entries
        .iter()
        .find(|e| e.body.kind == RunKind::Recovery)
        .expect("the next run recorded the crashed run's publish");
    assert!(c.ledger_entries.contains(&recovery.body.seq));
}

#[test]
fn deleting_every_event_of_an_hour_removes_its_partition() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = sample_events(300, 9);
    // One hour of its own, every event in it by user 424242.
    let lone_hour =
        events[0].event_time_us.div_euclid(3_600_000_000) * 3_600_000_000 - 5 * 3_600_000_000;
    for (i, e) in events.iter_mut().take(3).enumerate() {
        e.event_time_us = lone_hour + i as i64;
        e.user_id = 424242;
    }
    for e in events.iter_mut().skip(3) {
        if e.user_id == 424242 {
            e.user_id = 1;
        }
    }
    write_parquet(&dir.path().join("in/a.parquet"), &events);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("in")], options()).unwrap();
    let before = published_tables(&wh);

    let request = DeleteRequest {
        request_id: "GDPR-HOUR".into(),
        reason: "user asked".into(),
        user_ids: vec![424242],
        event_ids: vec![],
    };
    let gone = keys_where(&events, |e| e.user_id == 424242);
    delete(&wh, &request, options()).unwrap();
    let after = published_tables(&wh);
    let expected = expected_tables(&without(&events, &gone));
    assert!(
        after == expected,
        "tables differ from a recompute without the deleted events"
    );
    // Its hourly partition, and its hour of ads_clicks_minute if it had clicks.
    let lone = 1 + events[..3].iter().any(|e| e.event_type == EventType::Click) as usize;
    assert_eq!(
        after.len() + lone,
        before.len(),
        "the lone hour's partitions are gone"
    );
}
