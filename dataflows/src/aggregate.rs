//! Aggregate: exact hourly and daily metrics per (period, dims), and clicks per minute,
//! incrementally.
//!
//! Each distinct event touches three cells, hourly, daily and weekly (the week's sums only), and a
//! click a fourth, its cell of `ads_clicks_minute` (whose dims hold the minute, IP and user, so it
//! has no distinct users). Its sums are a difference of type [`Sums`] on each cell. Its user is
//! counted exactly, never summed from hours: one arrangement holds, per [`UserDay`] (a user in a
//! daily cell), the hours of the day the user has events in, each with the [`Sums`] of those
//! events as its difference (their count of events says whether the hour is present), and a
//! [`reduce_total_with_changes`] turns changes of the set of hours present into ±1 users on the
//! hourly cells whose hour entered or left the set, and on the daily cell when the set became
//! (non-)empty. The same pass adds the hours' changed sums to those cells: sums are linear, so
//! they change by the changes alone.
//!
//! The sums ride on the users' arrangement rather than being added up per event in a map of their
//! own because that arrangement is sorted by user day, and so by daily cell: the cell changes of
//! one (day, ad, country) come out together, and adding them up per worker touches a handful of
//! cells at a time instead of one cell at random per event. And each hourly and daily cell leaves
//! the worker as one update carrying both its sums and its users, not one of each.

use std::cell::Cell as StdCell;
use std::rc::Rc;

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};

use crate::batching::{fold_and_pass_per_time, fold_per_time, FastMap, RunBatcher};
use crate::dedup::Deduped;
use crate::model::{
    week_of_day, AdDims, Cell, Country, Epoch, EventType, EventVersion, Grain, MetricRow,
};
use crate::reduce_total::reduce_total_with_changes;

/// The additive part of an event's metrics, used as a differential difference type.
///
/// `events` counts contributing events, so a present user never accumulates to zero.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct Sums {
    /// Number of events.
    pub events: i64,
    /// Number of impressions.
    pub impressions: i64,
    /// Number of clicks.
    pub clicks: i64,
    /// Number of conversions.
    pub conversions: i64,
    /// Sum of cost.
    pub cost_micros: i64,
    /// Sum of revenue.
    pub revenue_micros: i64,
}

impl Sums {
    /// The contribution of one event.
    pub fn of(event: &EventVersion) -> Self {
        Sums {
            events: 1,
            impressions: (event.event_type == EventType::Impression) as i64,
            clicks: (event.event_type == EventType::Click) as i64,
            conversions: (event.event_type == EventType::Conversion) as i64,
            cost_micros: event.cost_micros,
            revenue_micros: event.revenue_micros,
        }
    }
}

impl IsZero for Sums {
    fn is_zero(&self) -> bool {
        *self == Sums::default()
    }
}

impl Semigroup for Sums {
    fn plus_equals(&mut self, rhs: &Self) {
        // Wrapping keeps retraction exact (a + b - b == a) even past i64; amounts are bounded
        // at decode so a real table never gets near it.
        self.events = self.events.wrapping_add(rhs.events);
        self.impressions = self.impressions.wrapping_add(rhs.impressions);
        self.clicks = self.clicks.wrapping_add(rhs.clicks);
        self.conversions = self.conversions.wrapping_add(rhs.conversions);
        self.cost_micros = self.cost_micros.wrapping_add(rhs.cost_micros);
        self.revenue_micros = self.revenue_micros.wrapping_add(rhs.revenue_micros);
    }
}

impl Monoid for Sums {
    fn zero() -> Self {
        Sums::default()
    }
}

impl Abelian for Sums {
    fn negate(&mut self) {
        self.events = self.events.wrapping_neg();
        self.impressions = self.impressions.wrapping_neg();
        self.clicks = self.clicks.wrapping_neg();
        self.conversions = self.conversions.wrapping_neg();
        self.cost_micros = self.cost_micros.wrapping_neg();
        self.revenue_micros = self.revenue_micros.wrapping_neg();
    }
}

impl Multiply<isize> for Sums {
    type Output = Sums;
    fn multiply(self, rhs: &isize) -> Sums {
        let k = *rhs as i64;
        Sums {
            events: self.events.wrapping_mul(k),
            impressions: self.impressions.wrapping_mul(k),
            clicks: self.clicks.wrapping_mul(k),
            conversions: self.conversions.wrapping_mul(k),
            cost_micros: self.cost_micros.wrapping_mul(k),
            revenue_micros: self.revenue_micros.wrapping_mul(k),
        }
    }
}

/// The change to one cell: additive sums, and the change in its number of distinct users.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct CellDelta {
    /// Change of the cell's sums.
    pub sums: Sums,
    /// Change of the cell's distinct-user count.
    pub users: i64,
}

impl CellDelta {
    /// A published row as the state that produced it (its events are its three counts).
    pub fn of_row(row: &MetricRow) -> Self {
        CellDelta {
            sums: Sums {
                events: row.impressions + row.clicks + row.conversions,
                impressions: row.impressions,
                clicks: row.clicks,
                conversions: row.conversions,
                cost_micros: row.cost_micros,
                revenue_micros: row.revenue_micros,
            },
            users: row.unique_users,
        }
    }
}

impl IsZero for CellDelta {
    fn is_zero(&self) -> bool {
        self.sums.is_zero() && self.users == 0
    }
}

impl Semigroup for CellDelta {
    fn plus_equals(&mut self, rhs: &Self) {
        self.sums.plus_equals(&rhs.sums);
        self.users = self.users.wrapping_add(rhs.users);
    }
}

impl Monoid for CellDelta {
    fn zero() -> Self {
        CellDelta::default()
    }
}

impl Abelian for CellDelta {
    fn negate(&mut self) {
        self.sums.negate();
        self.users = self.users.wrapping_neg();
    }
}

impl Multiply<isize> for CellDelta {
    type Output = CellDelta;
    fn multiply(self, rhs: &isize) -> CellDelta {
        CellDelta {
            sums: self.sums.multiply(rhs),
            users: self.users.wrapping_mul(*rhs as i64),
        }
    }
}

/// Changes to every cell of both grains, as differences of type [`CellDelta`].
pub type CellChanges<'scope> = VecCollection<'scope, Epoch, Cell, CellDelta>;

/// The cell of `grain` that `event` falls into.
pub(crate) fn cell_of(event: &EventVersion, grain: Grain) -> Cell {
    Cell {
        grain,
        period: grain.period_of(event),
        dims: grain.dims_of(event),
    }
}

/// The hourly, daily or weekly cell `event` falls into, as the dataflow adds it up: what the tests
/// check [`UserDay::cell`] against.
#[cfg(test)]
fn ad_cell_of(event: &EventVersion, grain: Grain) -> Cell<AdDims> {
    Cell {
        grain,
        period: grain.period_of(event),
        dims: event.ad_dims(),
    }
}

/// One user in one daily cell: the key under which the user's hours of that day are kept.
///
/// Flat rather than `(Cell, user)`, with the day as `i32`: 40 bytes instead of 56, and there are as
/// many of these to sort as there are events.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct UserDay {
    /// Days since the Unix epoch (an `i64` of microseconds spans under 2^27 days).
    day: i32,
    advertiser_id: i64,
    campaign_id: i64,
    ad_id: i64,
    country: Country,
    user_id: i64,
}

impl UserDay {
    /// The user of `event`, in its daily cell, and the event's hour of that day (0–23).
    pub fn of(event: &EventVersion) -> (UserDay, u8) {
        let day = event.day();
        let key = UserDay {
            day: day as i32,
            advertiser_id: event.advertiser_id,
            campaign_id: event.campaign_id,
            ad_id: event.ad_id,
            country: event.country,
            user_id: event.user_id,
        };
        (key, (event.hour() - day * 24) as u8)
    }

    /// Its day, since the Unix epoch.
    pub fn day(&self) -> i64 {
        i64::from(self.day)
    }

    /// Its user.
    pub fn user_id(&self) -> i64 {
        self.user_id
    }

    /// Its ad.
    pub fn ad_id(&self) -> i64 {
        self.ad_id
    }

    /// Its daily cell's day and dimensions: what [`UserDay::cell_hash`] and
    /// [`UserDay::same_cell`] look at.
    fn daily_cell(&self) -> (i32, i64, i64, i64, Country) {
        (
            self.day,
            self.advertiser_id,
            self.campaign_id,
            self.ad_id,
            self.country,
        )
    }

    /// A hash of its daily cell (not persisted): its users are brought together by it.
    pub(crate) fn cell_hash(&self) -> u64 {
        use std::hash::BuildHasher;
        crate::batching::BuildFastHasher::default().hash_one(self.daily_cell())
    }

    /// Whether `other` is a user of the same daily cell (in user-day order, they come together).
    pub(crate) fn same_cell(&self, other: &UserDay) -> bool {
        self.daily_cell() == other.daily_cell()
    }

    pub(crate) fn cell(&self, grain: Grain, hour_of_day: u8) -> Cell<AdDims> {
        let day = i64::from(self.day);
        Cell {
            grain,
            period: match grain {
                Grain::Hourly | Grain::Minute => day * 24 + i64::from(hour_of_day),
                Grain::Daily => day,
                Grain::Weekly => week_of_day(day),
            },
            dims: AdDims {
                advertiser_id: self.advertiser_id,
                campaign_id: self.campaign_id,
                ad_id: self.ad_id,
                country: self.country,
            },
        }
    }
}

/// The hours of the day (bit `h` for hour `h`) in which a user has events: those whose sums count
/// more than zero events.
fn hours_present(present: &[(u8, Sums)]) -> u32 {
    present
        .iter()
        .filter(|(_, sums)| sums.events > 0)
        .fold(0, |hours, (hour, _)| hours | 1 << hour)
}

fn users_delta(users: i64) -> CellDelta {
    CellDelta {
        sums: Sums::default(),
        users,
    }
}

/// The ±1 users on each cell when a user's hours of a day go from `before` to `after`.
fn user_changes(user: &UserDay, before: &u32, after: &u32, out: &mut Vec<(Cell<AdDims>, isize)>) {
    let (before, after) = (*before, *after);
    let mut flipped = before ^ after;
    while flipped != 0 {
        let hour = flipped.trailing_zeros() as u8;
        flipped &= flipped - 1;
        let sign = if after & 1 << hour != 0 { 1 } else { -1 };
        out.push((user.cell(Grain::Hourly, hour), sign));
    }
    if (before == 0) != (after == 0) {
        let sign = if after != 0 { 1 } else { -1 };
        out.push((user.cell(Grain::Daily, 0), sign));
    }
}

/// The changes to a user's hourly and daily cells at one time: the users that [`user_changes`]
/// flips, and the sums that `changes` add to the user's hours, one update per cell.
fn cell_changes(
    user: &UserDay,
    before: &u32,
    after: &u32,
    changes: &[(Epoch, u8, Sums)],
    flips: &mut Vec<(Cell<AdDims>, isize)>,
    out: &mut Vec<(Cell<AdDims>, CellDelta)>,
) {
    let start = out.len();
    let mut day = CellDelta::default();
    // One change per hour, as a batch is consolidated; a repeat would only hand the hour on twice.
    for &(_time, hour, sums) in changes {
        day.sums.plus_equals(&sums);
        out.push((user.cell(Grain::Hourly, hour), CellDelta { sums, users: 0 }));
    }
    user_changes(user, before, after, flips);
    for (cell, users) in flips.drain(..) {
        let users = users as i64;
        if cell.grain == Grain::Daily {
            day.users += users;
        } else {
            match out[start..].iter_mut().find(|(c, _)| *c == cell) {
                Some((_, delta)) => delta.users += users,
                None => out.push((cell, users_delta(users))),
            }
        }
    }
    out.push((user.cell(Grain::Daily, 0), day));
}

/// A worker's cell changes of one epoch, added up as they come: in user-day order, so the changes
/// of one (day, ad, country) arrive together, and its 24 hours and its day are added up in an
/// array and handed on when the next one starts. No cell is looked up in a map but the weeks
/// (one update per day cell). A (day, ad, country) whose changes come in two runs is handed on
/// twice; every consumer adds the changes up.
#[derive(Default)]
struct CellRuns {
    /// The (day, dims) being added up, and its cells: hours 0–23, the day at 24.
    run: Option<(i64, AdDims)>,
    cells: [CellDelta; CellRuns::DAY + 1],
    touched: u32,
    /// What is added up, widened for the exchange.
    done: Vec<(Cell, CellDelta)>,
    weeks: FastMap<Cell<AdDims>, Sums>,
}

impl CellRuns {
    const DAY: usize = 24;

    fn add(&mut self, cell: Cell<AdDims>, delta: CellDelta) {
        let (day, slot) = match cell.grain {
            Grain::Hourly => (
                cell.period.div_euclid(24),
                cell.period.rem_euclid(24) as usize,
            ),
            Grain::Daily => (cell.period, Self::DAY),
            grain => {
                unreachable!("only hourly and daily cells are added up in runs, not {grain:?}")
            }
        };
        if self.run != Some((day, cell.dims)) {
            self.flush();
            self.run = Some((day, cell.dims));
        }
        self.cells[slot].plus_equals(&delta);
        self.touched |= 1 << slot;
    }

    /// Hands on the run's changed cells, and adds its day's sums to its week.
    fn flush(&mut self) {
        let Some((day, dims)) = self.run.take() else {
            return;
        };
        while self.touched != 0 {
            let slot = self.touched.trailing_zeros() as usize;
            self.touched &= self.touched - 1;
            let delta = std::mem::take(&mut self.cells[slot]);
            if delta.is_zero() {
                continue;
            }
            let (grain, period) = match slot {
                Self::DAY => (Grain::Daily, day),
                hour => (Grain::Hourly, day * 24 + hour as i64),
            };
            let cell = Cell {
                grain,
                period,
                dims,
            };
            if grain == Grain::Daily {
                let week = Cell {
                    grain: Grain::Weekly,
                    period: week_of_day(day),
                    dims,
                };
                add_to(&mut self.weeks, week, &delta.sums);
            }
            self.done.push((cell.widen(), delta));
        }
    }

    fn finish(mut self, out: &mut Vec<(Cell, CellDelta)>) {
        self.flush();
        out.append(&mut self.done);
        out.extend(
            self.weeks
                .into_iter()
                .map(|(week, sums)| (week.widen(), CellDelta { sums, users: 0 })),
        );
    }
}

/// Adds `delta` to `key`'s entry.
fn add_to<K: std::hash::Hash + Eq, V: Semigroup + Default>(
    map: &mut FastMap<K, V>,
    key: K,
    delta: &V,
) {
    map.entry(key).or_default().plus_equals(delta);
}

/// From the deduplicated events to the changes of every cell's metrics, added up per worker and
/// epoch so that the exchange to the partition writers carries about one update per cell and
/// worker (two where a (day, ad, country) comes in two runs), not one per event.
///
/// A click's minute cell is added up here per event; every other cell's sums and users come out
/// of the users' reduction (see the module doc), and a weekly cell is the sum of its days.
///
/// Only the changes of epochs from `from` on come out (see [`Pipeline::ignore_before`]); the
/// users' state is kept for every epoch.
///
/// [`Pipeline::ignore_before`]: crate::pipeline::Pipeline::ignore_before
pub fn aggregate<'scope>(
    deduped: Deduped<'scope>,
    from: Rc<StdCell<Epoch>>,
) -> CellChanges<'scope> {
    let (clicks, user_hours) = fold_and_pass_per_time(
        deduped,
        "Preaggregate: Clicks, pass UserHours",
        from.clone(),
        |(_key, (event, _versions)), diff, clicks: Option<&mut FastMap<Cell, Sums>>, users| {
            let sums = Sums::of(&event).multiply(&diff);
            if let Some(clicks) = clicks {
                if Grain::Minute.counts(&event) {
                    add_to(clicks, cell_of(&event, Grain::Minute), &sums);
                }
            }
            users.push((UserDay::of(&event), sums));
        },
        |clicks, out| {
            out.extend(
                clicks
                    .into_iter()
                    .map(|(click, sums)| (click, CellDelta { sums, users: 0 })),
            );
        },
    );
    let user_hours = user_hours
        .arrange_named::<RunBatcher<UserDay, u8, Epoch, Sums>, ValSpine<_, _, _, _>>(
            "Arrange: UserHours",
            RunBatcher::new,
        );
    let mut flips = Vec::new();
    let cells = reduce_total_with_changes(
        user_hours,
        "UsersAndSums",
        hours_present,
        move |user, before, after, events, out| {
            cell_changes(user, before, after, events, &mut flips, out)
        },
    );
    let cells = fold_per_time(
        cells,
        "Preaggregate: Cells",
        from,
        |cell, delta, runs: &mut CellRuns| runs.add(cell, delta),
        CellRuns::finish,
    );
    clicks.concat(cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContentHash, DedupKey, Hash128, MICROS_PER_HOUR};

    fn event_at(event_time_us: i64) -> EventVersion {
        EventVersion {
            revision: 0,
            content_hash: ContentHash(Hash128::from(7)),
            event_type: EventType::Click,
            event_time_us,
            advertiser_id: 1,
            campaign_id: 2,
            ad_id: 3,
            country: Country(*b"DE"),
            user_id: 42,
            ip: Default::default(),
            cost_micros: 0,
            revenue_micros: 0,
        }
    }

    #[test]
    fn user_day_maps_back_to_both_cells_of_the_event() {
        // Before and after the Unix epoch, on hour and day boundaries.
        for t in [
            0,
            1,
            -1,
            5 * MICROS_PER_HOUR - 1,
            -25 * MICROS_PER_HOUR,
            1 << 52,
            -(1 << 52),
        ] {
            let event = event_at(t);
            let (user, hour) = UserDay::of(&event);
            assert!(hour < 24, "hour of day {hour} for t={t}");
            for grain in [Grain::Hourly, Grain::Daily, Grain::Weekly] {
                assert_eq!(
                    user.cell(grain, hour).widen(),
                    cell_of(&event, grain),
                    "t={t}"
                );
                assert_eq!(user.cell(grain, hour), ad_cell_of(&event, grain), "t={t}");
            }
        }
        let _ = DedupKey(Hash128::from(0));
    }

    #[test]
    fn cell_changes_put_sums_and_users_of_a_cell_in_one_update() {
        let (user, _) = UserDay::of(&event_at(0));
        let one = |n| Sums {
            events: n,
            clicks: n,
            cost_micros: 5 * n,
            ..Sums::default()
        };
        let changes = |before: u32, after: u32, hours: &[(u8, i64)]| {
            let hours: Vec<_> = hours.iter().map(|&(h, n)| (1, h, one(n))).collect();
            let mut out = Vec::new();
            cell_changes(&user, &before, &after, &hours, &mut Vec::new(), &mut out);
            out.iter()
                .map(|(cell, d)| (cell.grain, cell.period, d.sums.events, d.users))
                .collect::<Vec<_>>()
        };
        // Hour 0 gains an event, hour 2 its first: users only on hour 2, the day's sums both.
        assert_eq!(
            changes(0b1, 0b101, &[(0, 1), (2, 1)]),
            [
                (Grain::Hourly, 0, 1, 0),
                (Grain::Hourly, 2, 1, 1),
                (Grain::Daily, 0, 2, 0)
            ]
        );
        // The user's last event goes: the hour and the day lose the user and its sums.
        assert_eq!(
            changes(0b100, 0, &[(2, -1)]),
            [(Grain::Hourly, 2, -1, -1), (Grain::Daily, 0, -1, -1)]
        );
        // Nothing changed: the day's update is zero, which the folds drop.
        assert_eq!(changes(0b1, 0b1, &[]), [(Grain::Daily, 0, 0, 0)]);
    }

    #[test]
    fn cell_runs_add_up_each_run_and_hand_on_days_to_their_weeks() {
        let (user, _) = UserDay::of(&event_at(0));
        let other = UserDay::of(&event_at(3 * MICROS_PER_HOUR + 24 * MICROS_PER_HOUR)).0;
        let sums = |events| CellDelta {
            sums: Sums {
                events,
                clicks: events,
                ..Sums::default()
            },
            users: 0,
        };
        let mut runs = CellRuns::default();
        runs.add(user.cell(Grain::Hourly, 5), sums(1));
        runs.add(user.cell(Grain::Daily, 0), sums(1));
        runs.add(user.cell(Grain::Hourly, 5), sums(2));
        runs.add(user.cell(Grain::Hourly, 6), sums(1));
        runs.add(user.cell(Grain::Hourly, 6), sums(-1));
        runs.add(other.cell(Grain::Daily, 0), sums(4));
        // The first day again, in a second run: handed on again.
        runs.add(user.cell(Grain::Daily, 0), sums(1));
        let mut out = Vec::new();
        runs.finish(&mut out);
        let mut got: Vec<_> = out
            .iter()
            .map(|(cell, delta)| (cell.grain, cell.period, delta.sums.events))
            .collect();
        got.sort();
        // Hour 6 added up to nothing and is dropped; both days fall in the week of 1970-01-01.
        let week = week_of_day(0);
        assert_eq!(
            got,
            [
                (Grain::Hourly, 5, 3),
                (Grain::Daily, 0, 1),
                (Grain::Daily, 0, 1),
                (Grain::Daily, 1, 4),
                (Grain::Weekly, week, 6)
            ]
        );
    }

    #[test]
    fn user_changes_flip_exactly_the_hours_and_the_day_that_changed() {
        let (user, _) = UserDay::of(&event_at(0));
        let changes = |before: u32, after: u32| {
            let mut out = Vec::new();
            user_changes(&user, &before, &after, &mut out);
            out.iter()
                .map(|(cell, users)| (cell.grain, cell.period, *users))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            changes(0, 0b101),
            [
                (Grain::Hourly, 0, 1),
                (Grain::Hourly, 2, 1),
                (Grain::Daily, 0, 1)
            ]
        );
        assert_eq!(changes(0b101, 0b100), [(Grain::Hourly, 0, -1)]);
        assert_eq!(
            changes(0b100, 0),
            [(Grain::Hourly, 2, -1), (Grain::Daily, 0, -1)]
        );
        assert_eq!(changes(0b100, 0b100), []);
    }
}
