//! One change epoch computed with sorts instead of the dataflow: the same cell changes, for a
//! run that is done after it.
//!
//! A batch run of the runtime (an ingest's hot-window generation, a correction) builds a dataflow,
//! feeds it the rebuilt state at epoch 0 and its sources at epoch 1, takes the changes of epoch 1
//! into the partition mirror, and drops it. Nothing is incremental across runs: the arrangements,
//! batchers and cursors that let a stream's dataflow take epoch after epoch are built and merged
//! once and thrown away. `benches/stages.rs` measures the difference: the same changes into the
//! same mirror took 170 ms through the dataflow and 95 ms here (`dataflow/dedup_aggregate`
//! against `dataflow/batch_engine`, 216k events on one core).
//!
//! [`BatchInput`] takes the same updates as the dataflow's input session, and
//! [`BatchInput::compute`] hands the mirror the same changes, from the updates fed before `from`
//! (the state before) to all of them (the state after), in three exchanges between the process's
//! workers through shared memory:
//!
//! 1. every version of a key to one worker (by key): in 256 buckets by the key's top byte, each
//!    sorted in cache by key and version, and each key's winner before and after (the greatest
//!    version whose count is positive, as [`crate::dedup`]); a click's minute cell changes by its
//!    winner's change, added up per worker;
//! 2. each winner before, and each winner's change, as its user day's hour, to the worker of its
//!    daily cell: sorted, a daily cell's user days come together, and their hours present before
//!    and after give the ±1 users of the hourly and daily cells, the changes their sums (a week:
//!    its days' sums). Each hourly and daily cell is changed by one worker, once;
//! 3. every cell change to the worker that owns its partition ([`PartitionId::worker`]), which
//!    adds it to its mirror.
//!
//! Sums are linear, so a cell's change is the sum of its events' changes however they were cut
//! and routed; users are counted per user day, whose every row is on one worker in step 2; the
//! mirror adds every change up. So the mirror ends as the dataflow's would, and the tables are
//! the same bytes (`tests/reference.rs` checks the changes against the reference, the runtime's
//! `tests/corrections.rs` the two engines' files). It computes one change epoch: the runtime uses
//! it for runs with one epoch after the rebuild, on one process, and the dataflow for the rest (a
//! stream, a cluster, a run of several epochs).

use std::cell::{Cell as StdCell, RefCell};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use differential_dataflow::difference::{IsZero, Multiply, Semigroup};

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

/// Per worker, the lots the other workers sent it.
struct Mailboxes<T> {
    boxes: Vec<Mutex<Vec<Vec<T>>>>,
}

impl<T> Mailboxes<T> {
    fn new(peers: usize) -> Self {
        Mailboxes {
            boxes: (0..peers).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    fn send(&self, to: usize, lot: Vec<T>) {
        if !lot.is_empty() {
            self.boxes[to]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(lot);
        }
    }

    /// The lots sent to `me`, as they were sent.
    fn take(&self, me: usize) -> Vec<Vec<T>> {
        std::mem::take(
            &mut *self.boxes[me]
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

/// Updates per lot: a worker's share of an epoch is held in lots of this many rather than one
/// vector, which would be copied as it doubled (tens of megabytes at a generation's size).
const LOT: usize = 1 << 13;

/// Items bound for each worker, in lots of [`LOT`].
struct Outgoing<T> {
    lots: Vec<Vec<Vec<T>>>,
}

impl<T> Outgoing<T> {
    fn new(peers: usize) -> Self {
        Outgoing {
            lots: (0..peers).map(|_| Vec::new()).collect(),
        }
    }

    fn push(&mut self, to: usize, item: T) {
        let lots = &mut self.lots[to];
        match lots.last_mut() {
            Some(lot) if lot.len() < LOT => lot.push(item),
            _ => {
                let mut lot = Vec::with_capacity(LOT);
                lot.push(item);
                lots.push(lot);
            }
        }
    }

    /// Sends every lot to its worker.
    fn send(&mut self, mailboxes: &Mailboxes<T>) {
        for (to, lots) in self.lots.iter_mut().enumerate() {
            for lot in lots.drain(..) {
                mailboxes.send(to, lot);
            }
        }
    }
}

/// A barrier that a worker which will not arrive (its input dropped before it computed: a panic)
/// breaks, so the others return instead of waiting for ever.
struct Gate {
    peers: usize,
    /// Arrived at the current round, the round, and whether the gate is broken.
    state: Mutex<(usize, u64, bool)>,
    turned: Condvar,
}

impl Gate {
    /// Waits for every worker; `false` if the gate is broken.
    fn wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.2 {
            return false;
        }
        state.0 += 1;
        if state.0 == self.peers {
            *state = (0, state.1 + 1, false);
            self.turned.notify_all();
            return true;
        }
        let round = state.1;
        while state.1 == round && !state.2 {
            state = self
                .turned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        !state.2
    }

    fn brk(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).2 = true;
        self.turned.notify_all();
    }
}

/// What the workers of one process share to compute together: one per run, made before they
/// start.
pub struct BatchShared {
    peers: usize,
    gate: Gate,
    versions: Mailboxes<Update>,
    hours: Mailboxes<HourUpdate>,
    cells: Mailboxes<(Cell, CellDelta)>,
}

impl BatchShared {
    /// For `peers` workers, each of which must call [`BatchInput::compute`] once.
    pub fn new(peers: usize) -> Arc<Self> {
        let peers = peers.max(1);
        Arc::new(BatchShared {
            peers,
            gate: Gate {
                peers,
                state: Mutex::new((0, 0, false)),
                turned: Condvar::new(),
            },
            versions: Mailboxes::new(peers),
            hours: Mailboxes::new(peers),
            cells: Mailboxes::new(peers),
        })
    }
}

/// A worker's input: the updates it is fed, held per destination worker until the epoch is
/// computed.
pub struct BatchInput {
    index: usize,
    shared: Arc<BatchShared>,
    time: Epoch,
    outgoing: Outgoing<Update>,
    /// [`BatchInput::compute`] began, and finished.
    computed: bool,
    done: bool,
}

/// The worker that holds every version of `key` (keys are uniform hashes: their top bits do).
fn key_worker(key: &DedupKey, peers: usize) -> usize {
    ((key.0.get() >> 64) as u64 % peers as u64) as usize
}

/// The worker that holds every user of `user`'s daily cell (a multiply-rotate hash: its top bits
/// mix best), so that each of its cells is changed by one worker.
fn cell_worker(user: &UserDay, peers: usize) -> usize {
    ((user.cell_hash() >> 32) % peers as u64) as usize
}

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

impl BatchInput {
    /// Worker `index`'s input.
    pub fn new(index: usize, shared: Arc<BatchShared>) -> Self {
        let peers = shared.peers;
        BatchInput {
            index,
            shared,
            time: 0,
            outgoing: Outgoing::new(peers),
            computed: false,
            done: false,
        }
    }

    /// Adds `diff` copies of `(key, version)` at the current epoch.
    pub fn update(&mut self, (key, version): (DedupKey, EventVersion), diff: isize) {
        let to = key_worker(&key, self.shared.peers);
        self.outgoing.push(to, (key, version, self.time, diff));
    }

    /// Moves on to epoch `time`.
    pub fn advance_to(&mut self, time: Epoch) {
        assert!(
            time >= self.time,
            "epochs only move forward ({} to {time})",
            self.time
        );
        self.time = time;
    }

    /// Adds to `mirror` the change of every cell from the updates fed before `from` to all of them,
    /// and to `conflicted` this worker's keys with more than one version present at the end.
    /// Every worker of the process must call it, once: it waits for the others three times. If one
    /// of them drops its input first (a panic), it returns `false`, its mirror partly changed.
    pub fn compute(
        &mut self,
        from: Epoch,
        mirror: &RefCell<PartitionMirror>,
        conflicted: &StdCell<i64>,
    ) -> bool {
        assert!(!self.computed, "a batch input computes one epoch");
        self.computed = true;
        let shared = &*self.shared;
        let (index, peers) = (self.index, shared.peers);

        // 1. Every version of a key here: its winner before and after.
        self.outgoing.send(&shared.versions);
        if !shared.gate.wait() {
            return false;
        }
        // In key order by the key's top byte, then by key and version.
        let buckets = bucket_sort(
            shared.versions.take(index),
            |u| (u.0 .0.get() >> 120) as usize,
            |a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)),
        );
        let mut hours: Outgoing<HourUpdate> = Outgoing::new(peers);
        let mut clicks: FastMap<Cell, Sums> = FastMap::default();
        let mut conflicts = 0;
        let mut hour_of = |version: &EventVersion, sums: Sums, change: bool| {
            let (user, hour) = UserDay::of(version);
            hours.push(cell_worker(&user, peers), (user, hour, sums, change));
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
        drop(buckets);
        conflicted.set(conflicted.get() + conflicts);

        // 2. Every hour of a user day here: its cells' changes, added up per (day, dims).
        hours.send(&shared.hours);
        if !shared.gate.wait() {
            return false;
        }
        // A daily cell's users together (by the cell's hash), in user-day and hour order.
        let buckets = bucket_sort(
            shared.hours.take(index),
            |u| (u.0.cell_hash() >> 24) as usize & 0xff,
            |a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)),
        );
        // Per daily cell (its users come together): its hours' and its day's changes in an
        // array, its week's sums in a map.
        let mut cells = Vec::new();
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
                    cells.push((user.cell(Grain::Hourly, h as u8).widen(), delta));
                }
            }
            if !day.is_zero() {
                cells.push((user.cell(Grain::Daily, 0).widen(), day));
            }
            if !day.sums.is_zero() {
                weeks
                    .entry(user.cell(Grain::Weekly, 0))
                    .or_default()
                    .plus_equals(&day.sums);
            }
        }
        drop(buckets);
        cells.extend(
            weeks
                .into_iter()
                .filter(|(_, sums)| !sums.is_zero())
                .map(|(week, sums)| (week.widen(), CellDelta { sums, users: 0 })),
        );
        cells.extend(
            clicks
                .into_iter()
                .filter(|(_, sums)| !sums.is_zero())
                .map(|(cell, sums)| (cell, CellDelta { sums, users: 0 })),
        );
        // 3. Every change of a partition to its owner's mirror.
        let mut lots: Vec<Vec<(Cell, CellDelta)>> = vec![Vec::new(); peers];
        for (cell, delta) in cells {
            lots[PartitionId::of(&cell).worker(peers)].push((cell, delta));
        }
        for (to, lot) in lots.into_iter().enumerate() {
            shared.cells.send(to, lot);
        }
        if !shared.gate.wait() {
            return false;
        }
        let mut mirror = mirror.borrow_mut();
        for (cell, delta) in shared.cells.take(index).iter().flatten() {
            mirror.apply(cell, delta);
        }
        self.done = true;
        true
    }
}

impl Drop for BatchInput {
    fn drop(&mut self) {
        // A worker that unwinds before it is done: the others must not wait for it.
        if !self.done {
            self.shared.gate.brk();
        }
    }
}
