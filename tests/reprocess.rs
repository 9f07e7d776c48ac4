//! `reprocess` after a bad build: every partition of the event days it is given comes back to
//! what the raw layer says — wrong values rewritten, and partitions the raw layer does not call
//! for (a bad build put events in the wrong hour) removed — and a second run changes nothing.

mod common;

use std::collections::BTreeSet;

use adsmetrics::journal::CommitJournal;
use adsmetrics::runtime::{ingest, reprocess};
use adsmetrics::sink::publish::{publish_epoch, stage_partition, PublishOrigin};
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::{Grain, PartitionId};
use common::*;

#[test]
fn reprocess_rewrites_wrong_partitions_and_removes_phantom_ones() {
    let dir = tempfile::tempdir().unwrap();
    // Events from 22:00 on 2026-11-02 to 03:00 on 2026-11-03: the later hours of the 3rd are empty.
    let events = sample_events(800, 21);
    write_parquet(&dir.path().join("in/a.parquet"), &events);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("in")], options()).unwrap();
    let clean = published_tables(&wh);

    // A bad build: one partition with a click too many, and an hour the raw layer has no event
    // in published with another hour's rows.
    let mut journal = CommitJournal::open(wh.root(), &wh.journal_path()).unwrap();
    let published = journal.published().clone();
    let (wrong, current) = published
        .iter()
        .find(|(id, _)| id.grain == Grain::Hourly)
        .map(|(id, p)| (*id, p.clone()))
        .unwrap();
    let mut rows = clean[&wrong].clone();
    rows[0].1.clicks += 1;
    let day = wrong.period.div_euclid(24);
    let phantom = (0..48)
        .map(|h| PartitionId {
            grain: Grain::Hourly,
            period: day * 24 + h,
        })
        .find(|id| !published.contains_key(id))
        .expect("an hour without events");
    let mut changes = Vec::new();
    changes.extend(stage_partition(&wh, &wrong, &rows, Some(&current)).unwrap());
    changes.extend(stage_partition(&wh, &phantom, &rows, None).unwrap());
    let origin = PublishOrigin {
        run_id: "run-bad-build",
        run_key: None,
        epoch: 0,
        ledger: None,
        retired: Vec::new(),
        side_files: Vec::new(),
    };
    publish_epoch(&mut journal, &wh, origin, Vec::new(), changes, None).unwrap();
    drop(journal);
    assert_ne!(published_tables(&wh), clean);

    let days: BTreeSet<i64> = [day, phantom.period.div_euclid(24)].into_iter().collect();
    let fixed = reprocess(&wh, days.clone(), options()).unwrap();
    assert_eq!(
        fixed.partitions_published, 2,
        "the wrong one and the phantom"
    );
    let tables = published_tables(&wh);
    assert!(
        !tables.contains_key(&phantom),
        "the phantom partition is removed"
    );
    assert!(tables == clean, "tables differ from the clean run's");
    assert!(
        tables == expected_tables(&events),
        "tables differ from a recompute"
    );

    let again = reprocess(&wh, days, options()).unwrap();
    assert_eq!(
        again.partitions_published, 0,
        "a second reprocess changes nothing"
    );
}
