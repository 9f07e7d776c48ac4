//! Arranging with long sorted runs: a chunker that hands the merge batcher big sorted runs.
//!
//! Differential's default chunker cuts the input into runs of one timely buffer (8 KiB, about 70
//! of our ~120-byte updates) and its merge ladder then merges them geometrically: for an epoch of
//! a few million updates every update is moved some fifteen times. Profiles of a batch ingest put
//! 40% of the run in those merges. This chunker instead collects an epoch's updates (up to
//! [`RUN_UPDATES`]) and sorts them once when the epoch is sealed, so a batch ingest does one sort
//! per arrangement and no merges, and a streaming epoch of a few thousand updates is one small
//! run. The batcher's output does not depend on how its input was cut, only the work does:
//! runs of 64k updates took 2.8 CPU-seconds more than this at 10M events.

use std::collections::btree_map::BTreeMap;
use std::collections::HashMap;
use std::collections::VecDeque;

use differential_dataflow::batcher::merge::vec::VecMerger;
use differential_dataflow::batcher::merge::MergeBatcher;
use differential_dataflow::consolidation::consolidate_updates;
use differential_dataflow::difference::Semigroup;
use differential_dataflow::trace::implementations::{KeyBuilder, ValBuilder};
use differential_dataflow::{AsCollection, ExchangeData, VecCollection};
use timely::container::{ContainerBuilder, PushInto};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};

use crate::model::Epoch;

/// At most this many updates (about 1.9 GB of dedup updates) are sorted as one run; an epoch with
/// more is merged from several.
pub const RUN_UPDATES: usize = 1 << 24;

/// Collects updates into runs of [`RUN_UPDATES`], each sorted and consolidated.
pub struct SortedRunChunker<U> {
    pending: Vec<U>,
    ready: VecDeque<Vec<U>>,
    current: Vec<U>,
}

impl<U> Default for SortedRunChunker<U> {
    fn default() -> Self {
        SortedRunChunker {
            pending: Vec::new(),
            ready: VecDeque::new(),
            current: Vec::new(),
        }
    }
}

impl<D: Ord, T: Ord, R: Semigroup> SortedRunChunker<(D, T, R)> {
    fn seal(&mut self) {
        if !self.pending.is_empty() {
            let mut run = std::mem::take(&mut self.pending);
            consolidate_updates(&mut run);
            if !run.is_empty() {
                self.ready.push_back(run);
            }
        }
    }
}

impl<'a, D: Ord + Clone, T: Ord + Clone, R: Semigroup + Clone> PushInto<&'a mut Vec<(D, T, R)>>
    for SortedRunChunker<(D, T, R)>
{
    fn push_into(&mut self, container: &'a mut Vec<(D, T, R)>) {
        for update in container.drain(..) {
            self.pending.push(update);
            if self.pending.len() >= RUN_UPDATES {
                self.seal();
            }
        }
    }
}

impl<D: Ord, T: Ord, R: Semigroup> ContainerBuilder for SortedRunChunker<(D, T, R)> {
    type Container = Vec<(D, T, R)>;

    fn extract(&mut self) -> Option<&mut Self::Container> {
        self.current = self.ready.pop_front()?;
        Some(&mut self.current)
    }

    fn finish(&mut self) -> Option<&mut Self::Container> {
        self.seal();
        self.extract()
    }
}

/// A merge batcher fed by [`SortedRunChunker`], for `(key, val)` updates into a value spine.
pub type RunBatcher<K, V, T, R> =
    MergeBatcher<SortedRunChunker<((K, V), T, R)>, VecMerger<(K, V), T, R>, ValBuilder<K, V, T, R>>;

/// A merge batcher fed by [`SortedRunChunker`], for `(key, ())` updates into a key spine.
pub type RunKeyBatcher<K, T, R> =
    MergeBatcher<SortedRunChunker<((K, ()), T, R)>, VecMerger<(K, ()), T, R>, KeyBuilder<K, T, R>>;

/// A multiply-rotate hasher (the `FxHash` scheme) for worker-local maps of small fixed-size keys:
/// several times cheaper than std's SipHash, and only ever used in memory, never persisted.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(v as u64);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }
    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }
    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// Builds [`FastHasher`]s.
pub type BuildFastHasher = std::hash::BuildHasherDefault<FastHasher>;

/// A worker-local map of small fixed-size keys, hashed with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildFastHasher>;

/// Folds a collection per time on this worker before it is exchanged: each update is added into
/// the time's map by `add`, and once the input frontier has passed the time, `finish` turns the
/// map into output updates. For linear aggregates (sums and counts), so that a skewed cell costs
/// one update per worker and epoch instead of one per event.
///
/// `finish` sees the map in an arbitrary order; what it emits must not depend on that order's
/// meaning (every consumer adds the differences up).
pub fn fold_per_time<'scope, D, R, K, V, D2, R2>(
    input: VecCollection<'scope, Epoch, D, R>,
    name: &str,
    mut add: impl FnMut(D, R, &mut FastMap<K, V>) + 'static,
    mut finish: impl FnMut(FastMap<K, V>, &mut Vec<(D2, R2)>) + 'static,
) -> VecCollection<'scope, Epoch, D2, R2>
where
    D: ExchangeData,
    R: ExchangeData + Semigroup,
    K: 'static,
    V: 'static,
    D2: ExchangeData,
    R2: ExchangeData + Semigroup,
{
    input
        .inner
        .unary_frontier(Pipeline, name, |_, _| {
            let mut stash: BTreeMap<Epoch, (Capability<Epoch>, FastMap<K, V>)> = BTreeMap::new();
            let mut out = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|capability, data| {
                    for (record, time, diff) in data.drain(..) {
                        let (_, map) = stash
                            .entry(time)
                            .or_insert_with(|| (capability.delayed(&time, 0), HashMap::default()));
                        add(record, diff, map);
                    }
                });
                while let Some(entry) = stash.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (time, (capability, map)) = entry.remove_entry();
                    finish(map, &mut out);
                    let mut session = output.session(&capability);
                    for (record, diff) in out.drain(..) {
                        if !diff.is_zero() {
                            session.give((record, time, diff));
                        }
                    }
                }
            }
        })
        .as_collection()
}
