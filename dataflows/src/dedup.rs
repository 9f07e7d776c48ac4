//! Dedup: the set of distinct source events, one winning version per dedup key.
//!
//! The input holds `(DedupKey, EventVersion)` with multiplicity: every source partition contributes
//! each key at most once, so a replayed or resent event only raises a count, and a source's later
//! retraction removes exactly what it added. The output does not depend on multiplicities or on
//! arrival order: for each key it holds the greatest version present (highest `revision`, ties
//! broken by content hash) and how many distinct versions are present, which is what makes every
//! table downstream replay-proof.
//!
//! It is a [`reduce_total`]: the winner before a batch is read from the input arrangement itself,
//! so no output arrangement is built. At batch-ingest sizes that output trace (a second copy of
//! every event) was a third of the dataflow's memory and time.

use std::cell::Cell;
use std::rc::Rc;

use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::VecCollection;

use crate::batching::RunBatcher;
use crate::model::{DedupKey, Epoch, EventVersion};
use crate::reduce_total::reduce_total;

/// One key's winning version and how many distinct versions it has (more than one is a conflict).
pub type Deduped<'scope> = VecCollection<'scope, Epoch, (DedupKey, (EventVersion, u32)), isize>;

/// The greatest present version and the number of present versions, if any is present.
pub(crate) fn winner(present: &[(EventVersion, isize)]) -> Option<(EventVersion, u32)> {
    let mut present = present.iter().filter(|(_, count)| *count > 0);
    let first = present.next()?;
    Some(present.fold((first.0, 1), |(best, n), (v, _)| (best.max(*v), n + 1)))
}

/// Reduces a multiset of keyed event versions to one winner per key.
///
/// `conflicted_keys` counts this worker's keys that have more than one distinct version. It is
/// updated key by key as dedup works through an epoch, so it is exact once the probe has passed
/// the epoch (which is when the runtime and the tests read it).
pub fn dedup<'scope>(
    input: VecCollection<'scope, Epoch, (DedupKey, EventVersion), isize>,
    conflicted_keys: Rc<Cell<i64>>,
) -> Deduped<'scope> {
    let arranged = input
        .arrange_named::<RunBatcher<DedupKey, EventVersion, Epoch, isize>, ValSpine<_, _, _, _>>(
            "Arrange: Dedup",
            RunBatcher::new,
        );
    let conflicted = |winner: &Option<(EventVersion, u32)>| winner.is_some_and(|(_, n)| n > 1);
    reduce_total(arranged, "Dedup", winner, move |key, before, after, out| {
        if let Some(old) = before {
            out.push(((*key, *old), -1));
        }
        if let Some(new) = after {
            out.push(((*key, *new), 1));
        }
        let change = conflicted(after) as i64 - conflicted(before) as i64;
        conflicted_keys.set(conflicted_keys.get() + change);
    })
}
