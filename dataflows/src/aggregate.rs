//! Aggregate: exact hourly and daily metrics per (period, dims), incrementally.
//!
//! Each distinct event touches two cells, one per grain. Its sums are a difference of type
//! [`Sums`] on each cell; its user is a `(cell, user)` pair whose presence is maintained exactly,
//! so `unique_users` of a day is counted over the day's users, never summed from hours.

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::operators::ThresholdTotal;
use differential_dataflow::trace::implementations::KeySpine;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};

use crate::batching::RunKeyBatcher;
use crate::dedup::Deduped;
use crate::model::{Cell, Epoch, EventType, EventVersion, Grain};

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

fn cells(event: &EventVersion) -> [Cell; 2] {
    Grain::ALL.map(|grain| Cell {
        grain,
        period: grain.period_of(event),
        dims: event.dims,
    })
}

/// From the deduplicated events to the changes of every cell's metrics.
///
/// Sums are linear, so they need no state here: each event's contribution flows straight on, and
/// the sink adds it up. Distinct users are not: `(cell, user)` pairs are arranged and
/// `distinct_total` reports when a pair appears or disappears, which is a ±1 on the cell's users.
pub fn aggregate<'scope>(deduped: Deduped<'scope>) -> CellChanges<'scope> {
    let sums = deduped.clone().explode(|(_key, (event, _versions))| {
        let delta = CellDelta {
            sums: Sums::of(&event),
            users: 0,
        };
        cells(&event).map(|cell| (cell, delta))
    });
    let users = deduped
        .flat_map(|(_key, (event, _versions))| cells(&event).map(|cell| ((cell, event.user_id), ())))
        .arrange_named::<RunKeyBatcher<(Cell, i64), Epoch, isize>, KeySpine<(Cell, i64), Epoch, isize>>(
            "Arrange: CellUsers",
            RunKeyBatcher::new,
        )
        .distinct_total()
        .explode(|(cell, _user)| Some((cell, CellDelta { sums: Sums::default(), users: 1 })));
    sums.concat(users)
}
