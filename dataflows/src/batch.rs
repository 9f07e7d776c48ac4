//! One change epoch computed with sorts instead of differential's operators: the same cell
//! changes, for a run that is done after it.
//!
//! A batch run of the runtime (an ingest's hot-window generation, a correction, a backfill's day)
//! builds a dataflow, feeds it the rebuilt state at epoch 0 and its sources at epoch 1, takes the
//! changes of epoch 1 into the partition mirror, and drops it. Nothing is incremental across
//! runs: the arrangements, batchers and cursors that let a stream's dataflow take epoch after
//! epoch are built and merged once and thrown away. So for such a run, [`build_dataflow`] makes a
//! timely dataflow of three plain operators instead, each of which holds what it receives until
//! its input is complete, computes once with sorts, and hands its output on through timely's
//! exchange (between the workers of a process, and of a cluster's processes):
//!
//! 1. every version of a key to one worker (by key): in 256 buckets by the key's top byte, each
//!    sorted in cache by key and version, and each key's winner before and after (the greatest
//!    version whose count is positive, as [`crate::dedup`]); a click's minute cell changes by its
//!    winner's change, added up per worker;
//! 2. each winner before, and each winner's change, as its user day's hour, to the worker of its
//!    daily cell: sorted, a daily cell's user days come together, and their hours present before
//!    and after give the ±1 users of the hourly and daily cells, the changes their sums (a week:
//!    its days' sums). Each hourly and daily cell is changed by one worker, once;
//! 3. every cell change to the worker that owns its partition (as the dataflow routes it), which
//!    adds it to its mirror.
//!
//! Sums are linear, so a cell's change is the sum of its events' changes however they were cut
//! and routed; users are counted per user day, whose every row is on one worker in step 2; the
//! mirror adds every change up. So the mirror ends as the dataflow's would, and the tables are
//! the same bytes (`tests/reference.rs` checks the changes against the reference, the runtime's
//! `tests/corrections.rs` the two engines' files). It computes one change epoch: the runtime uses
//! it for runs with one epoch after a keyed rebuild, and the differential dataflow for the rest (a
//! stream's session, a run of several epochs, a rebuild of whole days). `benches/stages.rs`
//! measures the difference on one core (`dataflow/dedup_aggregate` against
//! `dataflow/batch_engine`).

use std::cell::{Cell as StdCell, RefCell};
use std::rc::Rc;

use differential_dataflow::difference::{IsZero, Multiply, Semigroup};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Concat, Exchange as _, Input, Inspect, Probe};
use timely::dataflow::InputHandleVec;
use timely::worker::Worker;

use crate::aggregate::{cell_of, CellDelta, Sums, UserDay};
use crate::batching::FastMap;
use crate::dedup::winner;
use crate::mirror::{PartitionId, PartitionMirror};
use crate::model::{AdDims, Cell, DedupKey, Epoch, EventVersion, Grain};

/// One fed update: a key's version, the epoch it was fed at, and its count.
type Update = (DedupKey, EventVersion, Epoch, isize);

/// A user day's events in one hour: their sums, and whether that is the state before (`false`)
/// or a change (`true`).
type HourUpdate = (UserDay, u8, Sums, bool);

/// `lots` in 256 buckets by `bucket` (below 256), each sorted by `order`: one pass that copies
/// every item once, then sorts small enough to stay in cache (a generation's share of a worker
/// is tens of megabytes). Items that `bucket` puts together and `order` ranks equal stay together.
fn bucket_sort<T>(
    lots: Vec<Vec<T>>,
    bucket: impl Fn(&T) -> usize,
    order: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Vec<Vec<T>> {
    let mut counts = [0usize; 256];
    for item in lots.iter().flatten() {
        counts[bucket(item)] += 1;
    }
    let mut buckets: Vec<Vec<T>> = counts.iter().map(|&n| Vec::with_capacity(n)).collect();
    for lot in lots {
        for item in lot {
            buckets[bucket(&item)].push(item);
        }
    }
    for items in &mut buckets {
        items.sort_unstable_by(&order);
    }
    buckets
}

/// Step 1 on one worker, over every version of its keys (`updates`, in lots): each key's winner
/// before `from` and after, as [`crate::dedup`] picks it. Hands `hour` each winner before, and
/// each winner's change, as its user day's hour; adds a click's minute cell's change to `clicks`.
/// Returns the keys with more than one version present at the end.
fn winners(
    updates: Vec<Vec<Update>>,
    from: Epoch,
    mut hour: impl FnMut(HourUpdate),
    clicks: &mut FastMap<Cell, Sums>,
) -> i64 {
    // In key order by the key's top byte, then by key and version.
    let buckets = bucket_sort(
        updates,
        |u| (u.0 .0.get() >> 120) as usize,
        |a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)),
    );
    let mut conflicts = 0;
    let mut hour_of = |version: &EventVersion, sums: Sums, change: bool| {
        let (user, h) = UserDay::of(version);
        hour((user, h, sums, change));
    };
    // A key's versions with their counts before `from` and in all: `dedup`'s winner of each.
    let (mut counts_before, mut counts) = (Vec::new(), Vec::new());
    for key in buckets.iter().flat_map(|b| b.chunk_by(|a, b| a.0 == b.0)) {
        counts_before.clear();
        counts.clear();
        for version in key.chunk_by(|a, b| a.1 == b.1) {
            let (mut count_before, mut count) = (0, 0);
            for &(_, _, time, diff) in version {
                count += diff;
                if time < from {
                    count_before += diff;
                }
            }
            counts_before.push((version[0].1, count_before));
            counts.push((version[0].1, count));
        }
        let before = winner(&counts_before).map(|(version, _)| version);
        let after = winner(&counts);
        conflicts += after.is_some_and(|(_, present)| present > 1) as i64;
        let after = after.map(|(version, _)| version);
        if let Some(old) = &before {
            hour_of(old, Sums::of(old), false);
        }
        if before == after {
            continue;
        }
        for (version, sign) in [(before, -1), (after, 1)] {
            let Some(version) = version else { continue };
            let sums = Sums::of(&version).multiply(&sign);
            hour_of(&version, sums, true);
            if Grain::Minute.counts(&version) {
                clicks
                    .entry(cell_of(&version, Grain::Minute))
                    .or_default()
                    .plus_equals(&sums);
            }
        }
    }
    conflicts
}

/// Step 2 on one worker, over every hour of the user days of its daily cells (`hours`, in lots):
/// hands `emit` the changes of those hourly and daily cells, then of their weeks (the sums of
/// their days). Handed on as made rather than gathered: a vector of them grew by copies into
/// fresh pages, 3% of a load's time.
fn day_cells(hours: Vec<Vec<HourUpdate>>, mut emit: impl FnMut(Cell, CellDelta)) {
    // A daily cell's users together (by the cell's hash), in user-day and hour order.
    let buckets = bucket_sort(
        hours,
        |u| (u.0.cell_hash() >> 24) as usize & 0xff,
        |a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)),
    );
    // Per daily cell (its users come together): its hours' and its day's changes in an
    // array, its week's sums in a map.
    let mut weeks: FastMap<Cell<AdDims>, Sums> = FastMap::default();
    for daily in buckets
        .iter()
        .flat_map(|b| b.chunk_by(|a, b| a.0.same_cell(&b.0)))
    {
        let (mut hourly, mut day) = ([CellDelta::default(); 24], CellDelta::default());
        for user in daily.chunk_by(|a, b| a.0 == b.0) {
            let (mut present_before, mut present_after) = (0u32, 0u32);
            for hour in user.chunk_by(|a, b| a.1 == b.1) {
                let (mut before, mut change) = (Sums::default(), Sums::default());
                for (_, _, sums, is_change) in hour {
                    if *is_change {
                        change.plus_equals(sums);
                    } else {
                        before.plus_equals(sums);
                    }
                }
                let h = hour[0].1;
                let mut after = before;
                after.plus_equals(&change);
                present_before |= ((before.events > 0) as u32) << h;
                present_after |= ((after.events > 0) as u32) << h;
                hourly[h as usize].sums.plus_equals(&change);
                day.sums.plus_equals(&change);
            }
            // The hours the user entered or left, and the day if it did.
            let mut flipped = present_before ^ present_after;
            while flipped != 0 {
                let h = flipped.trailing_zeros();
                flipped &= flipped - 1;
                hourly[h as usize].users += if present_after >> h & 1 == 1 { 1 } else { -1 };
            }
            if (present_before == 0) != (present_after == 0) {
                day.users += if present_after != 0 { 1 } else { -1 };
            }
        }
        let user = &daily[0].0;
        for (h, delta) in hourly.into_iter().enumerate() {
            if !delta.is_zero() {
                emit(user.cell(Grain::Hourly, h as u8).widen(), delta);
            }
        }
        if !day.is_zero() {
            emit(user.cell(Grain::Daily, 0).widen(), day);
        }
        if !day.sums.is_zero() {
            weeks
                .entry(user.cell(Grain::Weekly, 0))
                .or_default()
                .plus_equals(&day.sums);
        }
    }
    drop(buckets);
    for (week, sums) in weeks {
        if !sums.is_zero() {
            emit(week.widen(), CellDelta { sums, users: 0 });
        }
    }
}

/// Items per lot: timely moves a lot of items bound for one worker as one item of its stream, so
/// what it costs per message (a buffer, a channel push, progress counts) is paid per lot, not
/// per 8 KB of items as with items sent one by one (which took 4% longer on a 30-day load).
/// Lots of 8192 were no faster than of 1024 and, between processes, doubled the peak memory.
const LOT: usize = 1 << 10;

/// A lot of items and the worker they are bound for (timely's exchange sends it there: the
/// index is below the worker count).
type Lot<T> = (u64, Vec<T>);

/// Items bound for each worker, gathered in lots of [`LOT`].
struct Lots<T> {
    lots: Vec<Vec<T>>,
}

impl<T> Lots<T> {
    fn new(peers: usize) -> Self {
        Lots {
            lots: (0..peers).map(|_| Vec::new()).collect(),
        }
    }

    /// Adds `item` for worker `to`; its lot, once full, to send.
    fn push(&mut self, to: usize, item: T) -> Option<Lot<T>> {
        let lot = &mut self.lots[to];
        if lot.capacity() == 0 {
            lot.reserve_exact(LOT);
        }
        lot.push(item);
        (lot.len() == LOT).then(|| (to as u64, std::mem::take(lot)))
    }

    /// The lots not sent yet.
    fn rest(&mut self) -> impl Iterator<Item = Lot<T>> + '_ {
        self.lots
            .iter_mut()
            .enumerate()
            .filter(|(_, lot)| !lot.is_empty())
            .map(|(to, lot)| (to as u64, std::mem::take(lot)))
    }
}

/// The worker that holds every version of `key` (keys are uniform hashes; step 1's buckets take
/// the top byte).
fn key_worker(key: &DedupKey, peers: usize) -> usize {
    ((key.0.get() >> 64) as u64 % peers as u64) as usize
}

/// The worker that holds every user of `user`'s daily cell (a multiply-rotate hash: its top bits
/// mix best; step 2's buckets take bits 24–31), so that each of its cells is changed by one
/// worker.
fn cell_worker(user: &UserDay, peers: usize) -> usize {
    ((user.cell_hash() >> 32) % peers as u64) as usize
}

/// A worker's input into the engine ([`build_dataflow`]): updates gathered into lots by the
/// worker of their key.
pub struct BatchInput {
    handle: Option<InputHandleVec<Epoch, Lot<Update>>>,
    lots: Lots<Update>,
    peers: usize,
}

impl BatchInput {
    /// Adds `diff` copies of `(key, version)` at the current epoch.
    pub fn update(&mut self, (key, version): (DedupKey, EventVersion), diff: isize) {
        let handle = self
            .handle
            .as_mut()
            .expect("the batch engine takes one change epoch");
        let time = *handle.time();
        if let Some(lot) = self
            .lots
            .push(key_worker(&key, self.peers), (key, version, time, diff))
        {
            handle.send(lot);
        }
    }

    /// Sends the lots gathered so far.
    pub fn flush(&mut self) {
        if let Some(handle) = &mut self.handle {
            for lot in self.lots.rest() {
                handle.send(lot);
            }
            handle.flush();
        }
    }

    /// Moves on to epoch `time`.
    pub fn advance_to(&mut self, time: Epoch) {
        self.flush();
        if let Some(handle) = &mut self.handle {
            handle.advance_to(time);
        }
    }

    /// Sends what is left and closes the input: the steps compute once every worker's is closed.
    pub fn close(&mut self) {
        self.flush();
        self.handle = None;
    }
}

/// The engine's three steps (see the module doc) as a timely dataflow on `worker`, adding to
/// `mirror` the change of every cell from the updates fed before epoch `from` to all of them,
/// and to `conflicted` the worker's keys with more than one version present at the end. Feed the
/// rebuild at epoch 0 and the change at epoch 1, set `from`, close the input on every worker,
/// and step until `probe` is done: each step computes once its input is complete.
pub fn build_dataflow(
    worker: &mut Worker,
    from: Rc<StdCell<Epoch>>,
    mirror: Rc<RefCell<PartitionMirror>>,
    conflicted: Rc<StdCell<i64>>,
    probe: &ProbeHandle<Epoch>,
) -> BatchInput {
    let peers = worker.peers();
    let mut input = InputHandleVec::new();
    worker.dataflow_named::<Epoch, _, _>("adsmetrics-batch", |scope| {
        let updates = scope.input_from(&mut input);
        // Step 1, with two outputs: the user days' hours, and the minute cells' changes.
        let mut builder = OperatorBuilder::new("winners".to_owned(), scope);
        let mut updates = builder.new_input(updates, Exchange::new(|lot: &Lot<Update>| lot.0));
        let (hours, hours_stream) = builder.new_output::<Vec<Lot<HourUpdate>>>();
        let (clicks, clicks_stream) = builder.new_output::<Vec<Lot<(Cell, CellDelta)>>>();
        let mut hours =
            OutputBuilder::<_, CapacityContainerBuilder<Vec<Lot<HourUpdate>>>>::from(hours);
        let mut clicks =
            OutputBuilder::<_, CapacityContainerBuilder<Vec<Lot<(Cell, CellDelta)>>>>::from(clicks);
        builder.build(move |_| {
            let mut stash = Vec::new();
            let mut capabilities = None;
            move |frontiers| {
                updates.for_each(|cap, data| {
                    if capabilities.is_none() {
                        capabilities = cap.retain_least(0).zip(cap.retain_least(1));
                    }
                    stash.extend(data.drain(..).map(|(_, lot)| lot));
                });
                if !frontiers[0].is_empty() {
                    return;
                }
                let Some((for_hours, for_clicks)) = capabilities.take() else {
                    return;
                };
                let (mut hours, mut clicks) = (hours.activate(), clicks.activate());
                let mut hours = hours.session_with_builder(&for_hours);
                let mut lots = Lots::new(peers);
                let mut changes = FastMap::default();
                let conflicts = winners(
                    std::mem::take(&mut stash),
                    from.get(),
                    |hour| {
                        if let Some(lot) = lots.push(cell_worker(&hour.0, peers), hour) {
                            hours.give(lot);
                        }
                    },
                    &mut changes,
                );
                hours.give_iterator(lots.rest());
                conflicted.set(conflicted.get() + conflicts);
                let mut clicks = clicks.session_with_builder(&for_clicks);
                let mut lots = Lots::new(peers);
                for (cell, sums) in changes {
                    if !sums.is_zero() {
                        let to = PartitionId::of(&cell).worker(peers);
                        if let Some(lot) = lots.push(to, (cell, CellDelta { sums, users: 0 })) {
                            clicks.give(lot);
                        }
                    }
                }
                clicks.give_iterator(lots.rest());
            }
        });
        hours_stream
            .unary_frontier(
                Exchange::new(|lot: &Lot<HourUpdate>| lot.0),
                "cells",
                move |_, _| {
                    let mut stash = Vec::new();
                    let mut capability = None;
                    move |(input, frontier), output| {
                        input.for_each(|cap, data| {
                            if capability.is_none() {
                                capability = cap.retain_least(0);
                            }
                            stash.extend(data.drain(..).map(|(_, lot)| lot));
                        });
                        if !frontier.is_empty() {
                            return;
                        }
                        let Some(capability) = capability.take() else {
                            return;
                        };
                        let mut session = output.session(&capability);
                        let mut lots = Lots::new(peers);
                        day_cells(std::mem::take(&mut stash), |cell, delta| {
                            let to = PartitionId::of(&cell).worker(peers);
                            if let Some(lot) = lots.push(to, (cell, delta)) {
                                session.give(lot);
                            }
                        });
                        session.give_iterator(lots.rest());
                    }
                },
            )
            .container::<Vec<Lot<(Cell, CellDelta)>>>()
            .concat(clicks_stream)
            .exchange(|lot: &Lot<(Cell, CellDelta)>| lot.0)
            .inspect(move |(_, cells)| {
                let mut mirror = mirror.borrow_mut();
                for (cell, delta) in cells {
                    mirror.apply(cell, delta);
                }
            })
            .probe_with(probe);
    });
    BatchInput {
        handle: Some(input),
        lots: Lots::new(peers),
        peers,
    }
}
