//! Aggregate: exact hourly and daily metrics per (period, dims), incrementally.
//!
//! Each distinct event becomes two records, one per grain, of the form `(Cell, user_id)` carrying
//! its contribution as a difference of type [`Sums`]. Differential consolidates those differences
//! per `(cell, user)` inside the arrangement, so the reduce sees one accumulated `Sums` per distinct
//! user of a cell: the sums of the cell are the sum of those, and `unique_users` is how many users
//! are present. Daily uniques are thus counted over the day's users, never summed from hours.

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::lattice::Lattice;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use timely::progress::Timestamp;

use crate::dedup::Deduped;
use crate::model::{Cell, EventType, EventVersion, Grain, MetricRow};

/// The additive part of an event's metrics, used as a differential difference type.
///
/// `events` counts contributing events, so a present user never accumulates to zero.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
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

/// Metric rows keyed by their cell, both grains in one collection.
pub type Metrics<'scope, T> = VecCollection<'scope, T, (Cell, MetricRow), isize>;

/// Extension trait: from the deduplicated events to exact metric rows per cell.
pub trait Aggregate<'scope, T: Timestamp + Lattice + Ord> {
    /// One row per non-empty cell of every grain.
    fn aggregate(self) -> Metrics<'scope, T>;
}

impl<'scope, T: Timestamp + Lattice + Ord> Aggregate<'scope, T> for Deduped<'scope, T> {
    fn aggregate(self) -> Metrics<'scope, T> {
        let contributions = self.explode(|(_key, (event, _versions))| {
            let sums = Sums::of(&event);
            Grain::ALL.map(|grain| {
                let cell = Cell { grain, period: grain.period_of(&event), dims: event.dims };
                ((cell, event.user_id), sums)
            })
        });
        crate::batching::reduce_by_key(contributions, "Metrics", |_cell, users, output| {
            let mut total = Sums::default();
            let mut unique_users = 0i64;
            for (_user, sums) in users {
                total.plus_equals(sums);
                unique_users += (sums.events > 0) as i64;
            }
            if total.events > 0 {
                let row = MetricRow {
                    impressions: total.impressions,
                    clicks: total.clicks,
                    conversions: total.conversions,
                    cost_micros: total.cost_micros,
                    revenue_micros: total.revenue_micros,
                    unique_users,
                };
                output.push((row, 1));
            }
        })
    }
}
