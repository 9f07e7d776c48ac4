//! Arranging with long sorted runs: a chunker that hands the merge batcher big sorted runs.
//!
//! Differential's default chunker cuts the input into runs of one timely buffer (8 KiB, about 70
//! of our ~120-byte updates) and its merge ladder then merges them geometrically: for an epoch of
//! a few million updates every update is moved some fifteen times. Profiles of a batch ingest put
//! 40% of the run in those merges. Sorting runs of [`RUN_UPDATES`] updates first leaves a handful
//! of merge levels, for the same result: the batcher's output does not depend on how its input
//! was cut.

use std::collections::VecDeque;

use differential_dataflow::batcher::merge::vec::VecMerger;
use differential_dataflow::batcher::merge::MergeBatcher;
use differential_dataflow::consolidation::consolidate_updates;
use differential_dataflow::difference::Semigroup;
use differential_dataflow::lattice::Lattice;
use differential_dataflow::operators::arrange::Arranged;
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use differential_dataflow::{ExchangeData, Hashable, VecCollection};
use timely::container::{ContainerBuilder, PushInto};
use timely::progress::Timestamp;

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
        SortedRunChunker { pending: Vec::new(), ready: VecDeque::new(), current: Vec::new() }
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

/// A merge batcher fed by [`SortedRunChunker`], for `(key, val)` updates.
pub type RunBatcher<K, V, T, R> = MergeBatcher<SortedRunChunker<((K, V), T, R)>, VecMerger<(K, V), T, R>, ValBuilder<K, V, T, R>>;

/// `reduce` as differential's own, arranging through [`RunBatcher`]: for every key with any
/// input, `logic` sees the key's values (sorted, with accumulated differences) and says the
/// key's output values.
pub fn reduce_by_key<'scope, T, K, V, R, V2, L>(
    input: VecCollection<'scope, T, (K, V), R>,
    name: &str,
    logic: L,
) -> VecCollection<'scope, T, (K, V2), isize>
where
    T: Timestamp + Lattice + Ord,
    K: ExchangeData + Hashable,
    V: ExchangeData,
    R: ExchangeData + Semigroup,
    V2: ExchangeData,
    L: FnMut(&K, &[(&V, R)], &mut Vec<(V2, isize)>) + 'static,
{
    let arranged: Arranged<'scope, _> =
        input.arrange_named::<RunBatcher<K, V, T, R>, ValSpine<K, V, T, R>>(&format!("Arrange: {name}"), RunBatcher::new);
    arranged
        .reduce_abelian::<_, ValBuilder<K, V2, T, isize>, ValSpine<K, V2, T, isize>, _, _>(
            name,
            logic,
            |vec, key, upds| {
                vec.clear();
                vec.extend(upds.drain(..).map(|(v, t, r)| ((key.clone(), v), t, r)));
            },
        )
        .as_collection(|k, v| (k.clone(), v.clone()))
}
