//! The whole adsmetrics dataflow, read top to bottom: input → dedup → aggregate → pre-aggregate
//! per worker → exchange by partition → mirror.
//!
//! [`build`] constructs it on a worker and hands back the input session, the probe that tells when
//! an epoch is complete, and the worker's [`PartitionMirror`]. Every worker must call it, in the same
//! order relative to other dataflows, and must advance (or drop) its input for the frontier to move.
//! [`build_batch`] makes a pipeline that computes the same changes for a run of one change epoch
//! with sorts ([`crate::batch`]).

use std::cell::{Cell as StdCell, RefCell};
use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::AsCollection;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::Exchange;
use timely::worker::Worker;

use crate::aggregate::aggregate;
use crate::batch::BatchInput;
use crate::dedup::dedup;
use crate::mirror::{PartitionId, PartitionMirror};
use crate::model::{DedupKey, Epoch, EventVersion};

/// What the runtime holds of one worker's dataflow.
pub struct Pipeline {
    /// Add `(key, version)` with `+1` once per source partition that contains it; `-1` retracts.
    pub input: PipelineInput,
    /// Passes an epoch once its every consequence has reached the mirror (of a dataflow; see
    /// [`Pipeline::complete`]).
    pub probe: ProbeHandle<Epoch>,
    /// This worker's share of the curated partitions.
    pub mirror: Rc<RefCell<PartitionMirror>>,
    /// Keys (on this worker) that currently have more than one distinct version.
    pub conflicted_keys: Rc<StdCell<i64>>,
    /// The first epoch whose cell changes are wanted.
    changes_from: Rc<StdCell<Epoch>>,
}

/// A pipeline's input: the dataflow's input session, or the batch engine's input.
pub enum PipelineInput {
    /// Into the dataflow [`build`] made.
    Dataflow(InputSession<Epoch, (DedupKey, EventVersion), isize>),
    /// Into the batch engine's dataflow ([`build_batch`]), until [`Pipeline::complete`] closes
    /// it.
    Batch(BatchInput),
}

impl PipelineInput {
    /// Adds `diff` copies of `data` at the current epoch.
    pub fn update(&mut self, data: (DedupKey, EventVersion), diff: isize) {
        match self {
            PipelineInput::Dataflow(input) => input.update(data, diff),
            PipelineInput::Batch(input) => input.update(data, diff),
        }
    }

    /// Adds one copy of `data` at the current epoch.
    pub fn insert(&mut self, data: (DedupKey, EventVersion)) {
        self.update(data, 1);
    }

    /// Moves on to epoch `time`.
    pub fn advance_to(&mut self, time: Epoch) {
        match self {
            PipelineInput::Dataflow(input) => input.advance_to(time),
            PipelineInput::Batch(input) => input.advance_to(time),
        }
    }

    /// Hands what was fed to the dataflow.
    pub fn flush(&mut self) {
        match self {
            PipelineInput::Dataflow(input) => input.flush(),
            PipelineInput::Batch(input) => input.flush(),
        }
    }
}

impl Pipeline {
    /// Returns once every change of the epochs before `time` is in the mirror: steps the worker
    /// until the probe passes `time`. A batch pipeline's input is closed first (its steps compute
    /// once every worker's is), and takes nothing after.
    pub fn complete(&mut self, worker: &mut Worker, time: Epoch) {
        if let PipelineInput::Batch(input) = &mut self.input {
            input.close();
        }
        let probe = self.probe.clone();
        worker.step_or_park_while(None, || probe.less_than(&time));
    }

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
        input: PipelineInput::Dataflow(input),
        probe,
        mirror,
        conflicted_keys,
        changes_from,
    }
}

/// The batch engine's dataflow on `worker` ([`crate::batch`]), for a run of one change epoch: the
/// same changes in the mirror as [`build`]'s, with sorts. Every worker must build it, in the same
/// order relative to other dataflows.
pub fn build_batch(worker: &mut Worker) -> Pipeline {
    let mirror = Rc::new(RefCell::new(PartitionMirror::logging()));
    let conflicted_keys = Rc::new(StdCell::new(0i64));
    let changes_from = Rc::new(StdCell::new(0));
    let probe = ProbeHandle::new();
    let input = crate::batch::build_dataflow(
        worker,
        changes_from.clone(),
        mirror.clone(),
        conflicted_keys.clone(),
        &probe,
    );
    Pipeline {
        input: PipelineInput::Batch(input),
        probe,
        mirror,
        conflicted_keys,
        changes_from,
    }
}
