//! The whole ingest against the in-memory reference on random input (invariants 1 and 3): the same
//! events cut into random files (Parquet or JSON lines), duplicated, shuffled, spread over random
//! runs and epochs on 1–3 workers always publish exactly the reference tables, byte-identical to a
//! single clean run.

mod common;

use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::Warehouse;
use common::*;
use proptest::prelude::*;

/// One way to deliver events: files of (start, len, as JSON?) over a shuffled, duplicated feed,
/// grouped into runs; each run with its worker count and epoch size.
#[derive(Debug, Clone)]
struct Delivery {
    seed: u64,
    files: Vec<(usize, usize, bool)>,
    runs: Vec<(usize, usize, usize)>,
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        any::<u64>(),
        proptest::collection::vec((0usize..100, 1usize..60, any::<bool>()), 1..8),
        proptest::collection::vec((1usize..4, 0usize..3), 1..4),
    )
        .prop_map(|(seed, files, runs)| {
            let n = files.len();
            let runs = runs
                .iter()
                .enumerate()
                .map(|(i, (workers, epoch))| (i * n / runs.len(), *workers, *epoch))
                .collect();
            Delivery { seed, files, runs }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn any_delivery_of_the_same_events_publishes_the_reference(d in delivery()) {
        let events = sample_events(600, 11);
        let dir = tempfile::tempdir().unwrap();

        // The reference and a clean single run over one file holding every event.
        write_parquet(&dir.path().join("clean/all.parquet"), &events);
        let clean = Warehouse::new(dir.path().join("wh-clean"));
        ingest(&clean, &[dir.path().join("clean")], IngestOptions::default()).unwrap();
        let expected = TableSnapshot::take(&clean).unwrap().fingerprint();

        // A shuffled feed: every event at least once, then random windows of it as files.
        let mut feed: Vec<_> = events.clone();
        let len = feed.len();
        for i in (1..len).rev() {
            let j = (d.seed.wrapping_mul(i as u64 + 7).rotate_left(17) % (i as u64 + 1)) as usize;
            feed.swap(i, j);
        }
        let mut files = vec![(0, len, false)];
        files.extend(d.files.iter().map(|(start, size, json)| ((start * len / 100).min(len - 1), *size, *json)));
        let wh = Warehouse::new(dir.path().join("wh"));
        let mut runs = d.runs.clone();
        runs.push((files.len(), 1, 0));
        let mut next = 0;
        for (r, (until, workers, epoch)) in runs.iter().enumerate() {
            let run_dir = dir.path().join(format!("run-{r}"));
            for (i, (start, size, json)) in files.iter().enumerate().take(*until.max(&next)).skip(next) {
                let chunk = &feed[*start..(*start + *size).min(len)];
                if *json {
                    write_jsonl(&run_dir.join(format!("f{i}.jsonl")), chunk);
                } else {
                    write_parquet(&run_dir.join(format!("f{i}.parquet")), chunk);
                }
            }
            next = next.max(*until);
            if run_dir.exists() {
                let options = IngestOptions { workers: *workers, epoch_sources: *epoch, ..Default::default() };
                ingest(&wh, &[run_dir], options).unwrap();
            }
        }
        prop_assert_eq!(published_tables(&wh), expected_tables(&events));
        prop_assert_eq!(TableSnapshot::take(&wh).unwrap().fingerprint(), expected);
    }
}
