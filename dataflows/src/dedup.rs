//! Dedup: the set of distinct source events, one winning version per dedup key.
//!
//! The input holds `(DedupKey, EventVersion)` with multiplicity: every source partition contributes
//! each key at most once, so a replayed or resent event only raises a count, and a source's later
//! retraction removes exactly what it added. The output does not depend on multiplicities or on
//! arrival order: for each key it holds the greatest version present (highest `revision`, ties
//! broken by content hash) and how many distinct versions are present, which is what makes every
//! table downstream replay-proof.
//!
//! This is `reduce` specialised to a totally ordered time, the way differential's own
//! `threshold_total` specialises `distinct`: the winner before a batch is read from the input
//! arrangement itself, so no output arrangement is built. At batch-ingest sizes that output trace
//! (a second copy of every event) was a third of the dataflow's memory and time.

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::{Cursor, TraceReader};
use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{CapabilitySet, Operator};
use timely::progress::Antichain;

use crate::batching::RunBatcher;
use crate::model::{DedupKey, Epoch, EventVersion};

/// One key's winning version and how many distinct versions it has (more than one is a conflict).
pub type Deduped<'scope> = VecCollection<'scope, Epoch, (DedupKey, (EventVersion, u32)), isize>;

type VersionTrace = TraceAgent<ValSpine<DedupKey, EventVersion, Epoch, isize>>;

/// The greatest present version and the number of present versions, if any is present.
fn winner(present: &[(EventVersion, isize)]) -> Option<(EventVersion, u32)> {
    let mut present = present.iter().filter(|(_, count)| *count > 0);
    let first = present.next()?;
    Some(present.fold((first.0, 1), |(best, n), (v, _)| (best.max(*v), n + 1)))
}

fn add(present: &mut Vec<(EventVersion, isize)>, version: EventVersion, diff: isize) {
    match present.iter().position(|(v, _)| *v == version) {
        Some(i) => {
            present[i].1 += diff;
            if present[i].1 == 0 {
                present.swap_remove(i);
            }
        }
        None => present.push((version, diff)),
    }
}

/// Reduces a multiset of keyed event versions to one winner per key.
pub fn dedup<'scope>(
    input: VecCollection<'scope, Epoch, (DedupKey, EventVersion), isize>,
) -> Deduped<'scope> {
    let arranged: Arranged<'scope, VersionTrace> =
        input.arrange_named::<RunBatcher<DedupKey, EventVersion, Epoch, isize>, _>(
            "Arrange: Dedup",
            RunBatcher::new,
        );
    let mut trace = arranged.trace.clone();
    arranged
        .stream
        .unary_frontier(Pipeline, "Dedup", move |_, _| {
            let mut lower = Antichain::from_elem(0 as Epoch);
            let mut upper = Antichain::from_elem(0 as Epoch);
            let mut present: Vec<(EventVersion, isize)> = Vec::new();
            let mut updates: Vec<(Epoch, EventVersion, isize)> = Vec::new();

            move |(input, _frontier), output| {
                lower.clone_from(&upper);
                let mut batches = Vec::new();
                let mut caps = CapabilitySet::new();
                input.for_each(|capability, data| {
                    for capability in capability.retain_stamp(0).iter() {
                        caps.insert(capability.clone());
                    }
                    for batch in data.drain(..) {
                        upper.clone_from(batch.upper()); // batches arrive in order
                        batches.push(batch);
                    }
                });

                if !caps.is_empty() {
                    let mut session = output.session(&caps);
                    let (mut batch_cursor, batch_storage) =
                        cursor_list(batches.into_iter().filter_map(|b| b.inner).collect());
                    let (mut trace_cursor, trace_storage) = cursor_list(
                        trace
                            .batches_through(lower.borrow())
                            .expect("the trace is compacted only up to `lower`"),
                    );

                    while let Some(key) = batch_cursor.get_key(&batch_storage) {
                        // The versions present before this batch.
                        present.clear();
                        trace_cursor.seek_key(&trace_storage, key);
                        if trace_cursor.get_key(&trace_storage) == Some(key) {
                            while let Some(version) = trace_cursor.get_val(&trace_storage) {
                                let mut count = 0isize;
                                trace_cursor.map_times(&trace_storage, |_, diff| count += *diff);
                                if count != 0 {
                                    present.push((*version, count));
                                }
                                trace_cursor.step_val(&trace_storage);
                            }
                        }

                        // This batch's changes to the key, applied time by time.
                        updates.clear();
                        while let Some(version) = batch_cursor.get_val(&batch_storage) {
                            batch_cursor.map_times(&batch_storage, |time, diff| {
                                updates.push((*time, *version, *diff))
                            });
                            batch_cursor.step_val(&batch_storage);
                        }
                        updates.sort_unstable_by_key(|(time, _, _)| *time);

                        let mut current = winner(&present);
                        let mut i = 0;
                        while i < updates.len() {
                            let time = updates[i].0;
                            while i < updates.len() && updates[i].0 == time {
                                add(&mut present, updates[i].1, updates[i].2);
                                i += 1;
                            }
                            let next = winner(&present);
                            if next != current {
                                if let Some(old) = current {
                                    session.give(((*key, old), time, -1));
                                }
                                if let Some(new) = next {
                                    session.give(((*key, new), time, 1));
                                }
                                current = next;
                            }
                        }
                        batch_cursor.step_key(&batch_storage);
                    }
                }

                // Only the accumulation up to `upper` is ever read again.
                trace.advance_upper(&mut upper);
                trace.set_logical_compaction(upper.borrow());
                trace.set_physical_compaction(upper.borrow());
            }
        })
        .as_collection()
}
