//! Dedup: the set of distinct source events, one winning version per dedup key.
//!
//! The input holds `(DedupKey, EventVersion)` with multiplicity: every source partition contributes
//! each key at most once, so a replayed or resent event only raises a count, and a source's later
//! retraction removes exactly what it added. The output does not depend on multiplicities or on
//! arrival order: for each key it holds the greatest version present (highest `revision`, ties
//! broken by content hash), which is what makes every table downstream replay-proof.

use differential_dataflow::VecCollection;
use timely::progress::Timestamp;

use crate::model::{DedupKey, EventVersion};
use differential_dataflow::lattice::Lattice;

/// One key's winning version and how many distinct versions it has (more than one is a conflict).
pub type Deduped<'scope, T> = VecCollection<'scope, T, (DedupKey, (EventVersion, u32)), isize>;

/// Extension trait: reduce a multiset of keyed event versions to one winner per key.
pub trait Dedup<'scope, T: Timestamp + Lattice + Ord> {
    /// Keeps, for every key with any version present, the greatest present version, with the
    /// number of distinct versions present.
    fn dedup(self) -> Deduped<'scope, T>;
}

impl<'scope, T: Timestamp + Lattice + Ord> Dedup<'scope, T>
    for VecCollection<'scope, T, (DedupKey, EventVersion), isize>
{
    fn dedup(self) -> Deduped<'scope, T> {
        crate::batching::reduce_by_key(self, "Dedup", |_key, versions, output| {
            // Versions arrive sorted ascending; only those with a positive count are present.
            let mut present = versions.iter().filter(|(_, count)| *count > 0);
            if let Some(first) = present.next() {
                let mut winner = *first.0;
                let mut distinct = 1u32;
                for (version, _) in present {
                    winner = **version;
                    distinct += 1;
                }
                output.push(((winner, distinct), 1));
            }
        })
    }
}
