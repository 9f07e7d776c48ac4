//! A process's runs reuse the journal, ledger and raw listing its last run left (a stream's
//! epochs do), and read the warehouse afresh when another writer changed it in between: the
//! tables come out as a from-scratch recompute either way.

mod common;

use adsmetrics::delete::{delete, DeleteRequest};
use adsmetrics::ledger::RunKind;
use adsmetrics::runtime::{ingest_inline, InlineRun, OpenCache};
use adsmetrics::source::identify;
use adsmetrics::warehouse::Warehouse;
use common::*;

fn run(wh: &Warehouse, file: &std::path::Path, cache: &mut OpenCache) -> u64 {
    let sources = identify(&[file.to_path_buf()], 1).unwrap();
    let run = InlineRun {
        kind: RunKind::Stream,
        command: format!("test {}", file.display()),
        message_times_ms: None,
    };
    ingest_inline(wh, sources, run, options(), cache)
        .unwrap()
        .partitions_published
}

#[test]
fn runs_reuse_what_the_last_left_unless_another_writer_came_between() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(3000, 17);
    let (a, b, c) = (
        dir.path().join("a.parquet"),
        dir.path().join("b.parquet"),
        dir.path().join("c.parquet"),
    );
    write_parquet(&a, &events[..1000]);
    write_parquet(&b, &events[1000..2000]);
    write_parquet(&c, &events[2000..]);
    let wh = Warehouse::new(dir.path().join("wh"));
    // With raw-file columns, as a stream keeps them: a delete rewrites raw files in place.
    let mut cache = OpenCache::with_columns(1 << 20);

    assert!(run(&wh, &a, &mut cache) > 0);
    assert!(cache.is_warm());
    // Nothing between: the second run starts from what the first left.
    assert!(run(&wh, &b, &mut cache) > 0);
    assert!(published_tables(&wh) == expected_tables(&events[..2000]));
    assert!(
        cache.column_rows() > 0,
        "the second run's rebuild scanned the first's raw files"
    );

    // Another writer: a delete of one user publishes, tombstones, rewrites raw files.
    let user = events[0].user_id;
    let request = DeleteRequest {
        request_id: "GDPR-CACHE".into(),
        reason: "test".into(),
        user_ids: vec![user],
        event_ids: vec![],
    };
    delete(&wh, &request, options()).unwrap();
    assert!(cache.is_warm(), "the cache does not know of the delete");
    // The next run must see the delete: its tombstones, its publish, the rewritten raw layer.
    run(&wh, &c, &mut cache);
    // Deleted: the user's events ingested so far, by key (a resend in c is one of them; the
    // user's new events in c are not).
    let deleted: std::collections::BTreeSet<_> = events[..2000]
        .iter()
        .filter(|e| e.user_id == user)
        .map(|e| e.dedup_key())
        .collect();
    let kept: Vec<_> = events
        .iter()
        .filter(|e| !deleted.contains(&e.dedup_key()))
        .cloned()
        .collect();
    assert!(
        published_tables(&wh) == expected_tables(&kept),
        "tables differ from a recompute without the deleted user"
    );
    assert!(cache.is_warm());
    // And a replay of a file already consumed changes nothing.
    assert_eq!(run(&wh, &a, &mut cache), 0);
    assert!(published_tables(&wh) == expected_tables(&kept));
    assert_ledger_accounts_for_tables(&wh);
}
