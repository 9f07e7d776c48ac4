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

/// Keys one invocation of the dedup operator works through before it yields to the operators
/// downstream; bounds the updates in flight (an epoch's whole output at once was gigabytes).
pub const KEYS_PER_ACTIVATION: usize = 1 << 17;

/// The changes of one received batch of input, still to be turned into output.
struct Job<B> {
    caps: CapabilitySet<Epoch>,
    batches: Vec<B>,
    lower: Antichain<Epoch>,
    resume: Option<DedupKey>,
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
    let scope = arranged.stream.scope();
    arranged
        .stream
        .unary_frontier(Pipeline, "Dedup", move |_, info| {
            let activator = scope.activator_for(std::rc::Rc::clone(&info.address));
            let mut upper = Antichain::from_elem(0 as Epoch);
            let mut jobs = std::collections::VecDeque::new();
            let mut present: Vec<(EventVersion, isize)> = Vec::new();
            let mut updates: Vec<(Epoch, EventVersion, isize)> = Vec::new();

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
