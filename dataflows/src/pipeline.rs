//! The whole adsmetrics dataflow, read top to bottom: input → dedup → aggregate → pre-aggregate
//! per worker → exchange by partition → mirror.
//!
//! [`build`] constructs it on a worker and hands back the input session, the probe that tells when
//! an epoch is complete, and the worker's [`PartitionMirror`]. Every worker must call it, in the same
//! order relative to other dataflows, and must advance (or drop) its input for the frontier to move.

use std::cell::{Cell as StdCell, RefCell};
use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::AsCollection;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::Exchange;
use timely::worker::Worker;

use crate::aggregate::aggregate;
use crate::dedup::dedup;
use crate::mirror::{PartitionId, PartitionMirror};
use crate::model::{DedupKey, Epoch, EventVersion};

/// What the runtime holds of one worker's dataflow.
pub struct Pipeline {
    /// Add `(key, version)` with `+1` once per source partition that contains it; `-1` retracts.
    pub input: InputSession<Epoch, (DedupKey, EventVersion), isize>,
    /// Passes an epoch once its every consequence has reached the mirror.
    pub probe: ProbeHandle<Epoch>,
    /// This worker's share of the curated partitions.
    pub mirror: Rc<RefCell<PartitionMirror>>,
    /// Keys (on this worker) that currently have more than one distinct version.
    pub conflicted_keys: Rc<StdCell<i64>>,
    /// The first epoch whose cell changes are wanted.
    changes_from: Rc<StdCell<Epoch>>,
}

impl Pipeline {
    /// Ignores cell changes at epochs before `epoch` from now on: a keyed rebuild feeds part of
    /// each partition's state at epoch 0, and what that makes of the cells is not theirs (the
    /// mirror is seeded with their published rows instead). Those changes are neither folded nor
    /// exchanged; the state they come from is kept.
    pub fn ignore_before(&mut self, epoch: Epoch) {
        self.changes_from.set(epoch);
        self.mirror.borrow_mut().ignore_before(epoch);
    }
}

/// Builds the dataflow on `worker`.
pub fn build(worker: &mut Worker) -> Pipeline {
    let mirror = Rc::new(RefCell::new(PartitionMirror::default()));
    let conflicted_keys = Rc::new(StdCell::new(0i64));
    let changes_from = Rc::new(StdCell::new(0));
    let probe = ProbeHandle::new();

    let input = worker.dataflow_named::<Epoch, _, _>("adsmetrics", |scope| {
        let (input, events) = scope.new_collection::<(DedupKey, EventVersion), isize>();
        let deduped = dedup(events, conflicted_keys.clone());
        let sink = mirror.clone();
        aggregate(deduped, changes_from.clone())
            .inner
            .exchange(|(cell, _time, _delta)| PartitionId::of(cell).route())
            .as_collection()
            .inspect(move |(cell, time, delta)| sink.borrow_mut().apply_at(cell, *time, delta))
            .probe_with(&probe);

        input
    });

    Pipeline {
        input,
        probe,
        mirror,
        conflicted_keys,
        changes_from,
    }
}
