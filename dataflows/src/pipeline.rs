//! The whole adsmetrics dataflow, read top to bottom: input → dedup → aggregate → pre-aggregate
//! per worker → exchange by partition → mirror.
//!
//! [`build`] constructs it on a worker and hands back the input session, the probe that tells when
//! an epoch is complete, and the worker's [`PartitionMirror`]. Every worker must call it, in the same
//! order relative to other dataflows, and must advance (or drop) its input for the frontier to move.
//! [`build_batch`] makes the same pipeline for a run of one change epoch without a dataflow
//! ([`crate::batch`]).

use std::cell::{Cell as StdCell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::AsCollection;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::Exchange;
use timely::worker::Worker;

use crate::aggregate::aggregate;
use crate::batch::{BatchInput, BatchShared};
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

/// A pipeline's input: the dataflow's input session, or a [`BatchInput`] that computes the same
/// changes without a dataflow.
pub enum PipelineInput {
    /// Into the dataflow [`build`] made.
    Dataflow(InputSession<Epoch, (DedupKey, EventVersion), isize>),
    /// Held for [`Pipeline::complete`] ([`build_batch`]).
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

    /// Hands what was fed to the dataflow (a batch input holds it until it computes).
    pub fn flush(&mut self) {
        if let PipelineInput::Dataflow(input) = self {
            input.flush();
        }
    }
}

impl Pipeline {
    /// Returns once every change of the epochs before `time` is in the mirror: steps the worker
    /// until the probe passes `time`, or has a batch input compute (its one epoch; every worker
    /// of the process calls this). `false`: a batch input's fellow worker stopped first, and the
    /// mirror is incomplete.
    pub fn complete(&mut self, worker: &mut Worker, time: Epoch) -> bool {
        match &mut self.input {
            PipelineInput::Dataflow(_) => {
                let probe = self.probe.clone();
                worker.step_or_park_while(None, || probe.less_than(&time));
                true
            }
            PipelineInput::Batch(input) => {
                input.compute(self.changes_from.get(), &self.mirror, &self.conflicted_keys)
            }
        }
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

/// A pipeline without a dataflow for worker `index` of the workers sharing `shared`: it computes
/// one change epoch with sorts ([`crate::batch`]). Builds no dataflow, so either every worker of a
/// process builds its pipeline with this or none does.
pub fn build_batch(index: usize, shared: Arc<BatchShared>) -> Pipeline {
    Pipeline {
        input: PipelineInput::Batch(BatchInput::new(index, shared)),
        probe: ProbeHandle::new(),
        mirror: Rc::new(RefCell::new(PartitionMirror::default())),
        conflicted_keys: Rc::new(StdCell::new(0)),
        changes_from: Rc::new(StdCell::new(0)),
    }
}
