//! Arranging an epoch with one sort: a batcher for totally ordered time that sorts once per seal.
//!
//! Differential's merge batcher cuts its input into runs of one timely buffer (8 KiB, about 70 of
//! our ~120-byte updates), sorts each and merges them geometrically, then copies the merged chain
//! once more into ready chunks before the builder copies it into the batch: at a few million
//! updates per epoch every update is moved some fifteen times, and each move fills fresh memory.
//! Profiles of a batch ingest put 40% of the run in those merges. [`SortBatcher`] instead keeps
//! the updates it is given in one vector and, when the arrangement seals an epoch, sorts and
//! consolidates the ready ones in place and hands them to the builder: one sort and one copy
//! (when updates for later times are pending too, they are first split off into a vector of their
//! own, one more copy; the runtime seals each epoch before feeding the next, so it never does).
//! The batch it produces is the same as the merge batcher's (sorted, consolidated, the same
//! updates); only the work differs.
//!
//! The cost of this choice is that an epoch's updates are held unconsolidated until it is sealed:
//! an update that cancels or repeats another in the same epoch takes memory until then, where the
//! merge batcher would have folded it within a few thousand updates. For this dataflow that is a
//! few percent (resent events, several events of one user in one hour); an epoch's memory is
//! bounded by the epoch's size either way, which is what `--epoch-sources` is for.

use std::cell::Cell as StdCell;
use std::collections::btree_map::BTreeMap;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::rc::Rc;

use differential_dataflow::batcher::merge::Sealer;
use differential_dataflow::batcher::{Batcher, Extract};
use differential_dataflow::consolidation::consolidate_updates;
use differential_dataflow::difference::Semigroup;
use differential_dataflow::logging::Logger;
use differential_dataflow::trace::implementations::ValBuilder;
use differential_dataflow::{AsCollection, ExchangeData, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::progress::frontier::AntichainRef;
use timely::progress::{Antichain, Timestamp};

use crate::model::Epoch;

/// A batcher that sorts the updates of each sealed interval once; see the module doc.
///
/// `S` builds the batch from the sorted, consolidated updates (for example a [`ValBuilder`]).
pub struct SortBatcher<D, T, R, S> {
    pending: Vec<(D, T, R)>,
    frontier: Antichain<T>,
    sealer: PhantomData<S>,
}

impl<D, T, R, S> SortBatcher<D, T, R, S> {
    /// A batcher with nothing pending; the signature `arrange_named` asks for.
    pub fn new(_logger: Option<Logger>, _operator_id: usize) -> Self {
        SortBatcher {
            pending: Vec::new(),
            frontier: Antichain::new(),
            sealer: PhantomData,
        }
    }
}

impl<D, T, R, S> Batcher<Vec<(D, T, R)>> for SortBatcher<D, T, R, S>
where
    D: Ord,
    T: Timestamp,
    R: Semigroup,
    S: Sealer<Vec<(D, T, R)>>,
{
    fn insert(&mut self, container: &mut Vec<(D, T, R)>) {
        if self.pending.is_empty() {
            std::mem::swap(&mut self.pending, container);
        } else {
            self.pending.append(container);
        }
    }
}

impl<D, T, R, S> Extract for SortBatcher<D, T, R, S>
where
    D: Ord,
    T: Timestamp,
    R: Semigroup,
    S: Sealer<Vec<(D, T, R)>>,
{
    type Time = T;
    type Output = S::Output;

    fn extract<'a>(
        &'a mut self,
        upper: AntichainRef<'_, T>,
    ) -> (Option<S::Output>, AntichainRef<'a, T>) {
        let mut ready = std::mem::take(&mut self.pending);
        if ready.iter().any(|(_, time, _)| upper.less_equal(time)) {
            let (later, now): (Vec<_>, Vec<_>) = ready
                .into_iter()
                .partition(|(_, time, _)| upper.less_equal(time));
            self.pending = later;
            ready = now;
        }
        self.frontier.clear();
        for (_, time, _) in &self.pending {
            self.frontier.insert_ref(time);
        }
        consolidate_updates(&mut ready);
        let batch = if ready.is_empty() {
            None
        } else {
            S::seal(&mut vec![ready])
        };
        (batch, self.frontier.borrow())
    }
}

/// A [`SortBatcher`] for `(key, val)` updates into a value spine.
pub type RunBatcher<K, V, T, R> = SortBatcher<(K, V), T, R, ValBuilder<K, V, T, R>>;

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
/// the time's state `S` (a map, say) by `add`, and once the input frontier has passed the time,
/// `finish` turns the state into output updates. For linear aggregates (sums and counts), so that
/// a skewed cell costs one update per worker and epoch instead of one per event.
///
/// What `finish` emits must not depend on the order in which it emits it (every consumer adds the
/// differences up).
pub fn fold_per_time<'scope, D, R, S, D2, R2>(
    input: VecCollection<'scope, Epoch, D, R>,
    name: &str,
    from: Rc<StdCell<Epoch>>,
    mut add: impl FnMut(D, R, &mut S) + 'static,
    finish: impl FnMut(S, &mut Vec<(D2, R2)>) + 'static,
) -> VecCollection<'scope, Epoch, D2, R2>
where
    D: ExchangeData,
    R: ExchangeData + Semigroup,
    S: Default + 'static,
    D2: ExchangeData,
    R2: ExchangeData + Semigroup,
{
    let (folded, _nothing) = fold_and_pass_per_time::<_, _, S, _, _, (), R>(
        input,
        name,
        from,
        move |record, diff, state, _pass| {
            if let Some(state) = state {
                add(record, diff, state)
            }
        },
        finish,
    );
    folded
}

/// [`fold_per_time`] with a second output in the same pass: `add` may also push records, each
/// with a difference of its own, to pass on at once with the update's time to a second
/// collection. Where one stream feeds both a fold and another operator, this reads it once
/// instead of timely copying every update for a second consumer.
///
/// Only times from `from` on are folded (`add` gets no state for earlier ones, and nothing is
/// emitted for them); every time is passed. A keyed rebuild feeds the state it rebuilds at an
/// epoch whose changes the mirror ignores: this spares folding and exchanging them.
///
/// The state of a time is any `S` (a map, or several: one per kind of key).
pub fn fold_and_pass_per_time<'scope, D, R, S, D2, R2, P, RP>(
    input: VecCollection<'scope, Epoch, D, R>,
    name: &str,
    from: Rc<StdCell<Epoch>>,
    mut add: impl FnMut(D, R, Option<&mut S>, &mut Vec<(P, RP)>) + 'static,
    mut finish: impl FnMut(S, &mut Vec<(D2, R2)>) + 'static,
) -> (
    VecCollection<'scope, Epoch, D2, R2>,
    VecCollection<'scope, Epoch, P, RP>,
)
where
    D: ExchangeData,
    R: ExchangeData + Semigroup,
    S: Default + 'static,
    D2: ExchangeData,
    R2: ExchangeData + Semigroup,
    P: ExchangeData,
    RP: ExchangeData + Semigroup,
{
    let mut builder = OperatorBuilder::new(name.to_owned(), input.inner.scope());
    let mut input = builder.new_input(input.inner, Pipeline);
    let (folded, folded_stream) = builder.new_output();
    let (passed, passed_stream) = builder.new_output();
    let mut folded =
        OutputBuilder::<_, CapacityContainerBuilder<Vec<(D2, Epoch, R2)>>>::from(folded);
    let mut passed =
        OutputBuilder::<_, CapacityContainerBuilder<Vec<(P, Epoch, RP)>>>::from(passed);
    builder.build(move |_initial_capabilities| {
        let mut stash: BTreeMap<Epoch, (Capability<Epoch>, S)> = BTreeMap::new();
        let mut pass = Vec::new();
        let mut out = Vec::new();
        move |frontiers| {
            let mut folded = folded.activate();
            let mut passed = passed.activate();
            input.for_each(|capability, data| {
                let mut session = passed.session_with_builder(&capability);
                // A batch's updates are mostly of one time: a lookup per update was a BTreeMap
                // search per event.
                let mut current: Option<(Epoch, Option<&mut S>)> = None;
                for (record, time, diff) in data.drain(..) {
                    if current.as_ref().is_none_or(|(t, _)| *t != time) {
                        let state = (time >= from.get()).then(|| {
                            &mut stash
                                .entry(time)
                                .or_insert_with(|| (capability.delayed(&time, 0), S::default()))
                                .1
                        });
                        current = Some((time, state));
                    }
                    let map = current.as_mut().and_then(|(_, state)| state.as_deref_mut());
                    add(record, diff, map, &mut pass);
                    for (record, diff) in pass.drain(..) {
                        session.give((record, time, diff));
                    }
                }
            });
            while let Some(entry) = stash.first_entry() {
                if frontiers[0].less_equal(entry.key()) {
                    break;
                }
                let (time, (capability, map)) = entry.remove_entry();
                finish(map, &mut out);
                let mut session = folded.session_with_builder(&capability);
                for (record, diff) in out.drain(..) {
                    if !diff.is_zero() {
                        session.give((record, time, diff));
                    }
                }
            }
        }
    });
    (folded_stream.as_collection(), passed_stream.as_collection())
}

#[cfg(test)]
mod tests {
    use differential_dataflow::trace::cursor::Cursor;
    use differential_dataflow::trace::Navigable;

    use super::*;

    type Updates = Vec<((u64, u8), Epoch, isize)>;

    fn updates_of(
        batch: Option<<RunBatcher<u64, u8, Epoch, isize> as Extract>::Output>,
    ) -> Updates {
        let mut out = Vec::new();
        if let Some(batch) = batch {
            let mut cursor = batch.cursor();
            while let Some(key) = cursor.get_key(&batch) {
                while let Some(val) = cursor.get_val(&batch) {
                    cursor.map_times(&batch, |time, diff| out.push(((*key, *val), *time, *diff)));
                    cursor.step_val(&batch);
                }
                cursor.step_key(&batch);
            }
        }
        out
    }

    #[test]
    fn extract_seals_only_times_before_upper_sorted_and_consolidated() {
        let mut batcher = RunBatcher::<u64, u8, Epoch, isize>::new(None, 0);
        batcher.insert(&mut vec![((5, 1), 0, 1), ((2, 1), 2, 1), ((5, 1), 0, 1)]);
        batcher.insert(&mut vec![
            ((3, 0), 1, 1),
            ((2, 1), 0, 1),
            ((4, 0), 0, 1),
            ((4, 0), 0, -1),
        ]);

        let (batch, lower) = batcher.extract(Antichain::from_elem(1).borrow());
        assert_eq!(lower.to_owned(), Antichain::from_elem(1));
        assert_eq!(updates_of(batch), [((2, 1), 0, 1), ((5, 1), 0, 2)]);

        let (batch, lower) = batcher.extract(Antichain::from_elem(2).borrow());
        assert_eq!(lower.to_owned(), Antichain::from_elem(2));
        assert_eq!(updates_of(batch), [((3, 0), 1, 1)]);

        let (batch, lower) = batcher.extract(Antichain::from_elem(5).borrow());
        assert!(lower.is_empty());
        assert_eq!(updates_of(batch), [((2, 1), 2, 1)]);

        let (batch, _) = batcher.extract(Antichain::from_elem(6).borrow());
        assert!(batch.is_none());
    }
}
