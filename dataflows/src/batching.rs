//! Arranging with long sorted runs: a chunker that hands the merge batcher big sorted runs.
//!
//! Differential's default chunker cuts the input into runs of one timely buffer (8 KiB, about 70
//! of our ~120-byte updates) and its merge ladder then merges them geometrically: for an epoch of
//! a few million updates every update is moved some fifteen times. Profiles of a batch ingest put
//! 40% of the run in those merges. Sorting runs of [`RUN_UPDATES`] updates first leaves a handful
//! of merge levels, for the same result: the batcher's output does not depend on how its input
//! was cut.

use std::collections::btree_map::BTreeMap;
use std::collections::hash_map::{Entry, HashMap};
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

/// Updates per sorted run handed to the merge ladder.
pub const RUN_UPDATES: usize = 1 << 16;

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
            if self.pending.capacity() == 0 {
                self.pending.reserve_exact(RUN_UPDATES);
            }
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

/// Differences of one time, added up per record.
type Consolidating<D, R> = HashMap<D, R, BuildFastHasher>;

/// Consolidates a collection per time on this worker before it is exchanged: updates are held
/// until the input frontier passes their time, then sent once per distinct record. Only for
/// records whose differences add up (sums and counts): a skewed key then costs one update per
/// worker and epoch instead of one per event.
pub fn consolidate_per_time<'scope, D, R>(
    input: VecCollection<'scope, Epoch, D, R>,
    name: &str,
) -> VecCollection<'scope, Epoch, D, R>
where
    D: ExchangeData + std::hash::Hash,
    R: ExchangeData + Semigroup,
{
    input
        .inner
        .unary_frontier(Pipeline, name, |_, _| {
            // Iteration order of this map never reaches the output's contents: the sink adds the
            // differences up, and every consumer consolidates.
            let mut stash: BTreeMap<Epoch, (Capability<Epoch>, Consolidating<D, R>)> =
                BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each(|capability, data| {
                    for (record, time, diff) in data.drain(..) {
                        let (_, sums) = stash
                            .entry(time)
                            .or_insert_with(|| (capability.delayed(&time, 0), HashMap::default()));
                        match sums.entry(record) {
                            Entry::Occupied(mut e) => e.get_mut().plus_equals(&diff),
                            Entry::Vacant(e) => {
                                e.insert(diff);
                            }
                        }
                    }
                });
                while let Some(entry) = stash.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (time, (capability, sums)) = entry.remove_entry();
                    let mut session = output.session(&capability);
                    for (record, diff) in sums {
                        if !diff.is_zero() {
                            session.give((record, time, diff));
                        }
                    }
                }
            }
        })
        .as_collection()
}
