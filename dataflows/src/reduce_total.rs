//! `reduce_total`: a keyed reduction for a totally ordered time that keeps no output arrangement.
//!
//! Differential's `reduce` arranges its output as well as its input, and recomputes a key's whole
//! output whenever the key changes. For the two reductions adsmetrics needs (a key's winning
//! version, a user's set of hours in a day) the output is a small summary of the values present,
//! so this operator reads the summary before a batch straight from the input arrangement, applies
//! the batch's updates time by time, and emits only what changed between consecutive summaries.
//! That is what differential's own `threshold_total` does for `distinct`; this generalises it to
//! any summary. No second copy of the state is built, and an epoch costs work in proportion to the
//! keys it touches. [`reduce_total_with_changes`] also hands each time's changes to the values on,
//! for a summary with a linear part (sums), whose change is a sum over those changes alone.
//!
//! The operator works through at most [`KEYS_PER_ACTIVATION`] keys per activation and then yields,
//! so an epoch's output never piles up in memory ahead of the operators downstream.

use std::collections::VecDeque;
use std::rc::Rc;

use differential_dataflow::difference::Semigroup;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::{Cursor, TraceReader};
use differential_dataflow::{AsCollection, Data, VecCollection};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{CapabilitySet, Operator};
use timely::progress::Antichain;

use crate::model::Epoch;

/// Keys one activation works through before it yields to the operators downstream; bounds the
/// updates in flight (an epoch's whole output at once was gigabytes).
pub const KEYS_PER_ACTIVATION: usize = 1 << 17;

/// An input arrangement `reduce_total` reads: values per key, with counts (or another
/// difference).
pub type ValTrace<K, V, R = isize> = TraceAgent<ValSpine<K, V, Epoch, R>>;

/// The changes of one received batch of input, still to be turned into output.
struct Job<B, K> {
    caps: CapabilitySet<Epoch>,
    batches: Vec<B>,
    lower: Antichain<Epoch>,
    resume: Option<K>,
}

/// Merges `changes` (sorted by value) into `present` (sorted by value, none zero), adding the
/// differences of equal values and dropping those that add up to zero; `merged` is scratch space.
///
/// Linear in both, so a key with many values costs each batch a pass over them, not a search per
/// change.
fn merge<V: Ord + Copy, R: Semigroup>(
    present: &mut Vec<(V, R)>,
    changes: impl Iterator<Item = (V, R)>,
    merged: &mut Vec<(V, R)>,
) {
    merged.clear();
    let mut old = present.drain(..).peekable();
    for (value, diff) in changes {
        while let Some(kept) = old.next_if(|(v, _)| *v < value) {
            merged.push(kept);
        }
        if let Some(same) = old.next_if(|(v, _)| *v == value) {
            merged.push(same);
        }
        match merged.last_mut() {
            Some((v, sum)) if *v == value => sum.plus_equals(&diff),
            _ => merged.push((value, diff)),
        }
        if merged.last().is_some_and(|(_, sum)| sum.is_zero()) {
            merged.pop();
        }
    }
    merged.extend(old);
    std::mem::swap(present, merged);
}

/// For every key whose values change, emits `emit(key, before, after, out)` at each time where
/// `summarize` of the key's present values changes.
///
/// `summarize` sees the values with a non-zero count, in ascending order, each with its count (a
/// negative count is a retraction of something never added, which the caller may treat as
/// absent). `emit` pushes `(data, diff)` pairs that turn the output for `before` into the output
/// for `after`; the operator stamps them with the time of the change.
pub fn reduce_total<'scope, K, V, S, D, R>(
    arranged: Arranged<'scope, ValTrace<K, V>>,
    name: &str,
    summarize: impl FnMut(&[(V, isize)]) -> S + 'static,
    mut emit: impl FnMut(&K, &S, &S, &mut Vec<(D, R)>) + 'static,
) -> VecCollection<'scope, Epoch, D, R>
where
    K: Data + Copy,
    V: Data + Copy,
    S: PartialEq + 'static,
    D: Data,
    R: Semigroup + 'static,
{
    reduce_total_with_changes(
        arranged,
        name,
        summarize,
        move |key, before, after, _changes, out| {
            if before != after {
                emit(key, before, after, out)
            }
        },
    )
}

/// [`reduce_total`] for a summary with a linear part: `emit(key, before, after, changes, out)` is
/// called at every time the key's values change, with that time's changes to them (`(time, value,
/// difference)`, ascending by value), whether or not the summary changed. What is linear in the
/// values (a sum over them) changes by a sum over `changes`, which needs no state beyond the
/// values themselves. The arrangement's difference may be any semigroup, not only a count.
pub fn reduce_total_with_changes<'scope, K, V, RV, S, D, R>(
    arranged: Arranged<'scope, ValTrace<K, V, RV>>,
    name: &str,
    mut summarize: impl FnMut(&[(V, RV)]) -> S + 'static,
    mut emit: impl FnMut(&K, &S, &S, &[(Epoch, V, RV)], &mut Vec<(D, R)>) + 'static,
) -> VecCollection<'scope, Epoch, D, R>
where
    K: Data + Copy,
    V: Data + Copy,
    RV: Semigroup + Ord + Copy + 'static,
    S: PartialEq + 'static,
    D: Data,
    R: Semigroup + 'static,
{
    let mut trace = arranged.trace.clone();
    let scope = arranged.stream.scope();
    arranged
        .stream
        .unary_frontier(Pipeline, name, move |_, info| {
            let activator = scope.activator_for(Rc::clone(&info.address));
            let mut upper = Antichain::from_elem(0 as Epoch);
            let mut jobs = VecDeque::new();
            let mut present: Vec<(V, RV)> = Vec::new();
            let mut merged: Vec<(V, RV)> = Vec::new();
            let mut updates: Vec<(Epoch, V, RV)> = Vec::new();
            let mut changes: Vec<(D, R)> = Vec::new();

            move |(input, _frontier), output| {
                let lower = upper.clone();
                let mut batches = Vec::new();
                let mut caps = CapabilitySet::new();
                input.for_each(|capability, data| {
                    for capability in capability.retain_stamp(0).iter() {
                        caps.insert(capability.clone());
                    }
                    for batch in data.drain(..) {
                        upper.clone_from(batch.upper()); // batches arrive in order
                        batches.extend(batch.inner);
                    }
                });
                if !caps.is_empty() {
                    jobs.push_back(Job {
                        caps,
                        batches,
                        lower,
                        resume: None,
                    });
                }

                let mut fuel = KEYS_PER_ACTIVATION;
                while fuel > 0 {
                    let Some(job) = jobs.front_mut() else { break };
                    let mut session = output.session(&job.caps);
                    let (mut batch_cursor, batch_storage) = cursor_list(job.batches.clone());
                    let (mut trace_cursor, trace_storage) = cursor_list(
                        trace
                            .batches_through(job.lower.borrow())
                            .expect("the trace is compacted only up to a pending job"),
                    );
                    if let Some(resume) = &job.resume {
                        batch_cursor.seek_key(&batch_storage, resume);
                    }
                    while let Some(key) = batch_cursor.get_key(&batch_storage) {
                        if fuel == 0 {
                            break;
                        }
                        fuel -= 1;
                        // The values present before this batch.
                        present.clear();
                        trace_cursor.seek_key(&trace_storage, key);
                        if trace_cursor.get_key(&trace_storage) == Some(key) {
                            while let Some(value) = trace_cursor.get_val(&trace_storage) {
                                let mut sum: Option<RV> = None;
                                trace_cursor.map_times(&trace_storage, |_, diff| match &mut sum {
                                    Some(sum) => sum.plus_equals(diff),
                                    None => sum = Some(*diff),
                                });
                                if let Some(sum) = sum.filter(|sum| !sum.is_zero()) {
                                    present.push((*value, sum));
                                }
                                trace_cursor.step_val(&trace_storage);
                            }
                        }

                        // This batch's changes to the key, applied time by time.
                        updates.clear();
                        while let Some(value) = batch_cursor.get_val(&batch_storage) {
                            batch_cursor.map_times(&batch_storage, |time, diff| {
                                updates.push((*time, *value, *diff))
                            });
                            batch_cursor.step_val(&batch_storage);
                        }
                        updates
                            .sort_unstable_by(|(t1, v1, _), (t2, v2, _)| (t1, v1).cmp(&(t2, v2)));

                        let mut current = summarize(&present);
                        let mut i = 0;
                        while i < updates.len() {
                            let (start, time) = (i, updates[i].0);
                            while i < updates.len() && updates[i].0 == time {
                                i += 1;
                            }
                            let now = updates[start..i].iter().map(|(_, v, d)| (*v, *d));
                            merge(&mut present, now, &mut merged);
                            let next = summarize(&present);
                            emit(key, &current, &next, &updates[start..i], &mut changes);
                            for (data, diff) in changes.drain(..) {
                                session.give((data, time, diff));
                            }
                            current = next;
                        }
                        batch_cursor.step_key(&batch_storage);
                    }
                    match batch_cursor.get_key(&batch_storage) {
                        Some(key) => job.resume = Some(*key),
                        None => {
                            drop(session);
                            jobs.pop_front();
                        }
                    }
                }
                if !jobs.is_empty() {
                    activator.activate();
                }

                // Only the accumulation up to the oldest pending job's lower bound (or, with none
                // pending, up to `upper`) is ever read again.
                trace.advance_upper(&mut upper);
                let compact = jobs
                    .front()
                    .map_or_else(|| upper.clone(), |job| job.lower.clone());
                trace.set_logical_compaction(compact.borrow());
                trace.set_physical_compaction(compact.borrow());
            }
        })
        .as_collection()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::merge;

    proptest! {
        #[test]
        fn merge_equals_adding_up_in_a_map(
            present in prop::collection::btree_map(0u8..40, -3isize..4, 0..20),
            mut changes in prop::collection::vec((0u8..40, -3isize..4), 0..30),
        ) {
            changes.sort_by_key(|(value, _)| *value);
            let mut expected: BTreeMap<u8, isize> =
                present.iter().filter(|(_, c)| **c != 0).map(|(v, c)| (*v, *c)).collect();
            for (value, diff) in &changes {
                *expected.entry(*value).or_default() += diff;
            }
            expected.retain(|_, count| *count != 0);
            let mut merged: Vec<(u8, isize)> =
                present.into_iter().filter(|(_, c)| *c != 0).collect();
            merge(&mut merged, changes.into_iter(), &mut Vec::new());
            prop_assert_eq!(merged, expected.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn merge_adds_equal_values_keeps_order_and_drops_zeros() {
        let mut present = vec![(1, 2), (3, 1), (5, 1), (9, -1)];
        let mut scratch = Vec::new();
        let changes = [(0, 1), (3, -1), (5, 1), (5, 1), (7, 1), (9, 1), (12, -1)];
        merge(&mut present, changes.into_iter(), &mut scratch);
        assert_eq!(present, [(0, 1), (1, 2), (5, 3), (7, 1), (12, -1)]);
        // A value that cancels and comes back within one time's changes.
        merge(&mut present, [(7, -1), (7, 1)].into_iter(), &mut scratch);
        assert_eq!(present, [(0, 1), (1, 2), (5, 3), (7, 1), (12, -1)]);
        merge(&mut present, std::iter::empty(), &mut scratch);
        assert_eq!(present.len(), 5);
    }
}
