//! The dataflow against the plain in-memory reference on random input (invariants 1 and 3).
//!
//! Random event versions (few keys, so resends and conflicting revisions are common; hours around
//! a day boundary, so hourly and daily partitions both get several cells) are fed in any order,
//! with duplicates, cut into random epochs, on 1–3 workers. After every epoch the union of the
//! workers' mirrors must equal the reference computed from scratch over everything fed so far.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use adsmetrics_dataflows::pipeline;
use adsmetrics_dataflows::reference;
use adsmetrics_dataflows::*;
use proptest::prelude::*;

type Tables = BTreeMap<PartitionId, Vec<(Dims, MetricRow)>>;
type Updates = Vec<(DedupKey, EventVersion)>;
/// Updates with their counts (`-1` retracts).
type Counted = Vec<((DedupKey, EventVersion), isize)>;

/// What the workers hold together after an epoch.
#[derive(Clone, Default, Debug, PartialEq)]
struct Snapshot {
    tables: Tables,
    conflicted_keys: i64,
}

/// Runs the pipeline over `epochs` of updates on `workers` threads; returns the state after each.
fn run(epochs: Vec<Vec<(DedupKey, EventVersion)>>, workers: usize) -> Vec<Snapshot> {
    let epochs = Arc::new(epochs);
    let snapshots: Arc<Mutex<Vec<Snapshot>>> =
        Arc::new(Mutex::new(vec![Snapshot::default(); epochs.len()]));
    let (e, s) = (epochs.clone(), snapshots.clone());
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let mut p = pipeline::build(worker);
        for (epoch, updates) in e.iter().enumerate() {
            for update in updates.iter().skip(index).step_by(peers) {
                p.input.update(*update, 1);
            }
            let next = epoch as u64 + 1;
            p.input.advance_to(next);
            p.input.flush();
            let probe = p.probe.clone();
            worker.step_or_park_while(None, || probe.less_than(&next));
            let mirror = p.mirror.borrow();
            let mut snapshot = s.lock().unwrap();
            snapshot[epoch].conflicted_keys += p.conflicted_keys.get();
            for id in mirror.partitions() {
                let rows = mirror.rows(id).expect("mirror is consistent");
                assert!(
                    snapshot[epoch].tables.insert(*id, rows).is_none(),
                    "partition {id:?} on two workers"
                );
            }
        }
    })
    .unwrap()
    .join()
    .into_iter()
    .for_each(|r| r.unwrap());
    Arc::try_unwrap(snapshots).unwrap().into_inner().unwrap()
}

fn version_strategy() -> impl Strategy<Value = (DedupKey, EventVersion)> {
    (
        0u128..24,
        0u32..3,
        0u128..3,
        0usize..3,
        22i64..27,
        1i64..4,
        0usize..3,
        0i64..6,
        0i64..1000,
        0i64..50,
    )
        .prop_map(
            |(key, revision, salt, kind, hour, ad, country, user, cost, revenue)| {
                let event_type = [
                    EventType::Impression,
                    EventType::Click,
                    EventType::Conversion,
                ][kind];
                let country = Country([*b"DE", *b"US", *b"FR"][country]);
                let version = EventVersion {
                    revision,
                    content_hash: ContentHash((key * 1000 + salt * 10 + revision as u128).into()),
                    event_type,
                    event_time_us: hour * MICROS_PER_HOUR + (ad * 7 + user) * 1_000_000,
                    advertiser_id: ad / 2,
                    campaign_id: ad,
                    ad_id: ad * 10,
                    country,
                    user_id: user,
                    ip: Ip([
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0xff,
                        0xff,
                        10,
                        0,
                        0,
                        (user % 3) as u8,
                    ]),
                    cost_micros: cost,
                    revenue_micros: revenue,
                };
                (DedupKey(key.into()), version)
            },
        )
}

/// A random multiset of versions, fed in a random order with random duplication, cut into epochs.
fn input_strategy() -> impl Strategy<Value = (Updates, Vec<Updates>)> {
    proptest::collection::vec(version_strategy(), 1..60).prop_flat_map(|distinct| {
        let n = distinct.len();
        (
            Just(distinct.clone()),
            proptest::collection::vec((0..n, 1usize..4), n..3 * n),
            proptest::collection::vec(0usize..5, 0..8),
        )
            .prop_map(|(distinct, picks, cuts)| {
                // Every distinct version appears at least once; picks add resends in random order.
                let mut feed: Vec<_> = distinct.clone();
                for (i, copies) in picks {
                    for _ in 0..copies {
                        feed.push(distinct[i]);
                    }
                }
                // A deterministic shuffle driven by the picks themselves.
                let len = feed.len();
                for i in (1..len).rev() {
                    let j = (i * 7919 + cuts.len() * 31 + len) % (i + 1);
                    feed.swap(i, j);
                }
                let mut epochs = Vec::new();
                let mut rest = feed.as_slice();
                for cut in cuts {
                    let at = (cut * len / 5).min(rest.len());
                    let (head, tail) = rest.split_at(at);
                    epochs.push(head.to_vec());
                    rest = tail;
                }
                epochs.push(rest.to_vec());
                (distinct, epochs)
            })
    })
}

/// The batch engine ([`pipeline::build_batch`]) on `workers` timely workers: `before` fed at epoch
/// 0, `after` (with -1 for retractions) at epoch 1, each worker's mirror seeded with `seed`'s
/// partitions that it owns, then the changes from epoch `from` on computed. The partitions' rows
/// and the conflicted keys.
fn run_batch(
    before: &[(DedupKey, EventVersion)],
    changes: &[((DedupKey, EventVersion), isize)],
    seed: &Tables,
    from: u64,
    workers: usize,
) -> Snapshot {
    let (before, changes, seed) = (
        Arc::new(before.to_vec()),
        Arc::new(changes.to_vec()),
        Arc::new(seed.clone()),
    );
    let results = timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let mut p = pipeline::build_batch(worker);
        for (id, rows) in seed.iter().filter(|(id, _)| id.worker(peers) == index) {
            p.mirror.borrow_mut().seed(id, rows);
        }
        p.ignore_before(from);
        for update in before.iter().skip(index).step_by(peers) {
            p.input.update(*update, 1);
        }
        p.input.advance_to(1);
        for (update, diff) in changes.iter().skip(index).step_by(peers) {
            p.input.update(*update, *diff);
        }
        p.input.advance_to(2);
        p.input.flush();
        p.complete(worker, 2);
        let mirror = p.mirror.borrow();
        let tables: Tables = mirror
            .partitions()
            .map(|id| (*id, mirror.rows(id).expect("mirror is consistent")))
            .filter(|(_, rows)| !rows.is_empty())
            .collect();
        (tables, p.conflicted_keys.get())
    })
    .unwrap()
    .join();
    let mut snapshot = Snapshot::default();
    for result in results {
        let (tables, conflicted) = result.unwrap();
        snapshot.conflicted_keys += conflicted;
        for (id, rows) in tables {
            assert!(
                snapshot.tables.insert(id, rows).is_none(),
                "{id:?} on two workers"
            );
        }
    }
    snapshot
}

/// Versions present (count above zero) in a multiset given as counted updates.
fn present(updates: &[((DedupKey, EventVersion), isize)]) -> Updates {
    let mut counts: BTreeMap<(DedupKey, EventVersion), isize> = BTreeMap::new();
    for (update, diff) in updates {
        *counts.entry(*update).or_default() += diff;
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(update, _)| update)
        .collect()
}

/// A state before (a multiset of versions) and a change to it: more versions, resends,
/// retractions of versions the state holds, and retractions of versions it does not (counts
/// below zero, which must count as absent, as in the dataflow).
fn change_strategy() -> impl Strategy<Value = (Updates, Counted)> {
    (
        proptest::collection::vec(version_strategy(), 0..40),
        proptest::collection::vec(version_strategy(), 0..40),
        proptest::collection::vec(any::<proptest::sample::Index>(), 0..20),
        proptest::collection::vec(version_strategy(), 0..6),
    )
        .prop_map(|(before, added, withdrawn, absent)| {
            let mut changes: Vec<_> = added.into_iter().map(|u| (u, 1)).collect();
            changes.extend(absent.into_iter().map(|u| (u, -1)));
            if !before.is_empty() {
                // Each row of the state at most once: a withdrawn source takes back what it gave.
                let mut rows: Vec<usize> =
                    withdrawn.iter().map(|i| i.index(before.len())).collect();
                rows.sort_unstable();
                rows.dedup();
                changes.extend(rows.into_iter().map(|i| (before[i], -1)));
            }
            (before, changes)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Seeded with the tables before, the batch engine's mirrors hold the tables after: the same
    /// changes the dataflow hands the mirror (which `dataflow_equals_reference_after_every_epoch`
    /// checks), on any number of workers; and from epoch 0 on, the tables after from nothing.
    #[test]
    fn batch_engine_changes_the_tables_before_into_the_tables_after(
        (before, changes) in change_strategy(),
        workers in 1usize..4,
    ) {
        let all: Vec<_> = before.iter().map(|u| (*u, 1)).chain(changes.iter().copied()).collect();
        let after = present(&all);
        let expected = reference::tables(&reference::dedup(&after));
        let mut versions: BTreeMap<DedupKey, std::collections::BTreeSet<EventVersion>> = BTreeMap::new();
        for (key, version) in &after {
            versions.entry(*key).or_default().insert(*version);
        }
        let conflicted = versions.values().filter(|v| v.len() > 1).count() as i64;
        let seed = reference::tables(&reference::dedup(&before));
        let changed = run_batch(&before, &changes, &seed, 1, workers);
        prop_assert_eq!(&changed.tables, &expected);
        prop_assert_eq!(changed.conflicted_keys, conflicted);
        let whole = run_batch(&before, &changes, &Tables::new(), 0, workers);
        prop_assert_eq!(&whole.tables, &expected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn dataflow_equals_reference_after_every_epoch((_distinct, epochs) in input_strategy(), workers in 1usize..4) {
        let snapshots = run(epochs.clone(), workers);
        let mut fed = Vec::new();
        for (epoch, updates) in epochs.iter().enumerate() {
            fed.extend(updates.iter().copied());
            let expected = reference::tables(&reference::dedup(&fed));
            prop_assert_eq!(&snapshots[epoch].tables, &expected, "epoch {} with {} workers", epoch, workers);
            let mut versions: BTreeMap<DedupKey, std::collections::BTreeSet<EventVersion>> = BTreeMap::new();
            for (key, version) in &fed {
                versions.entry(*key).or_default().insert(*version);
            }
            let conflicted = versions.values().filter(|v| v.len() > 1).count() as i64;
            prop_assert_eq!(snapshots[epoch].conflicted_keys, conflicted, "epoch {}", epoch);
        }
    }

    #[test]
    fn any_order_batching_and_workers_give_identical_tables((distinct, epochs) in input_strategy(), workers in 1usize..4) {
        let once = run(vec![distinct.clone()], 1).pop().unwrap();
        let replayed = run(epochs, workers).pop().unwrap();
        prop_assert_eq!(once, replayed);
    }
}

#[test]
fn conflicting_revisions_resolve_to_highest_then_content_hash() {
    let base = EventVersion {
        revision: 0,
        content_hash: ContentHash(5u128.into()),
        event_type: EventType::Click,
        event_time_us: 0,
        advertiser_id: 1,
        campaign_id: 1,
        ad_id: 1,
        country: Country(*b"DE"),
        user_id: 1,
        ip: Ip::default(),
        cost_micros: 100,
        revenue_micros: 0,
    };
    let corrected = EventVersion {
        revision: 1,
        content_hash: ContentHash(1u128.into()),
        cost_micros: 250,
        ..base
    };
    let tie = EventVersion {
        revision: 1,
        content_hash: ContentHash(2u128.into()),
        cost_micros: 300,
        ..base
    };
    for order in [
        vec![base, corrected, tie],
        vec![tie, base, corrected],
        vec![corrected, tie, base],
    ] {
        let epochs = order
            .into_iter()
            .map(|v| vec![(DedupKey(9u128.into()), v)])
            .collect();
        let last = run(epochs, 2).pop().unwrap();
        assert_eq!(last.conflicted_keys, 1);
        let last = last.tables;
        let daily = &last[&PartitionId {
            grain: Grain::Daily,
            period: 0,
        }];
        assert_eq!(daily[0].1.cost_micros, 300);
        assert_eq!(daily[0].1.clicks, 1);
    }
}

/// An epoch bigger than one activation of the dedup operator: its work resumes across
/// activations, and later epochs land on a trace the earlier ones compacted.
#[test]
fn epochs_larger_than_one_activation_match_the_reference() {
    let keys = 2 * adsmetrics_dataflows::reduce_total::KEYS_PER_ACTIVATION as u128 + 1000;
    let version = |key: u128, revision: u32| EventVersion {
        revision,
        content_hash: ContentHash((key * 7 + revision as u128).into()),
        event_type: [
            EventType::Impression,
            EventType::Click,
            EventType::Conversion,
        ][(key % 3) as usize],
        event_time_us: (key % 50) as i64 * MICROS_PER_HOUR,
        advertiser_id: 1,
        campaign_id: (key % 5) as i64,
        ad_id: (key % 17) as i64,
        country: Country(*b"DE"),
        user_id: (key % 1001) as i64,
        ip: Ip::parse("2001:db8::1").unwrap(),
        cost_micros: (key % 997) as i64,
        revenue_micros: 0,
    };
    let first: Updates = (0..keys)
        .map(|k| (DedupKey(k.into()), version(k, 0)))
        .collect();
    // The second epoch resends half of the keys and corrects a tenth of them.
    let second: Updates = (0..keys)
        .filter(|k| k % 2 == 0)
        .map(|k| (DedupKey(k.into()), version(k, (k % 10 == 0) as u32)))
        .collect();
    let snapshots = run(vec![first.clone(), second.clone()], 1);
    assert_eq!(
        snapshots[0].tables,
        reference::tables(&reference::dedup(&first))
    );
    let all: Updates = first.into_iter().chain(second).collect();
    assert_eq!(
        snapshots[1].tables,
        reference::tables(&reference::dedup(&all))
    );
    assert_eq!(
        snapshots[1].conflicted_keys,
        (keys as u64).div_ceil(10) as i64
    );
}
