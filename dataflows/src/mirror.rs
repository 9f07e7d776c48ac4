//! The sink's view of the metrics: the current rows of each curated partition this worker owns.
//!
//! The metrics collection is exchanged by partition before it reaches the mirror, so every
//! partition lives whole on exactly one worker (its designated writer). The mirror applies the
//! consolidated changes of each epoch and remembers which partitions they touched; once the frontier
//! passes the epoch, the sink reads those partitions whole, in sorted order, and publishes them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{Cell, Dims, Grain, MetricRow};

/// One curated partition: a grain and a period (an hour or a day).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct PartitionId {
    /// Which table.
    pub grain: Grain,
    /// Hour or day index since the Unix epoch.
    pub period: i64,
}

impl PartitionId {
    /// The partition a cell belongs to.
    pub fn of(cell: &Cell) -> Self {
        PartitionId { grain: cell.grain, period: cell.period }
    }

    /// A well-mixed routing hash, the same in every process and build: picks the partition's
    /// writer among the workers. Not persisted.
    pub fn route(&self) -> u64 {
        // splitmix64 finaliser over (period, grain).
        let mut z = (self.period as u64)
            .wrapping_mul(2)
            .wrapping_add(self.grain as u64)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A partition whose accumulated rows are not a set of one row per dims: a bug upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorError {
    /// The partition that failed the check.
    pub partition: PartitionId,
    /// What was wrong.
    pub detail: String,
}

impl std::fmt::Display for MirrorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partition {:?} is inconsistent: {}", self.partition, self.detail)
    }
}

impl std::error::Error for MirrorError {}

/// Current rows of the partitions one worker owns, and the partitions changed since last taken.
#[derive(Default, Debug)]
pub struct PartitionMirror {
    partitions: BTreeMap<PartitionId, BTreeMap<(Dims, MetricRow), isize>>,
    touched: BTreeSet<PartitionId>,
}

impl PartitionMirror {
    /// Applies one change from the metrics collection.
    pub fn apply(&mut self, cell: &Cell, row: &MetricRow, diff: isize) {
        let id = PartitionId::of(cell);
        let rows = self.partitions.entry(id).or_default();
        let count = rows.entry((cell.dims, *row)).or_insert(0);
        *count += diff;
        if *count == 0 {
            rows.remove(&(cell.dims, *row));
        }
        if rows.is_empty() {
            self.partitions.remove(&id);
        }
        self.touched.insert(id);
    }

    /// The partitions touched since the last call, in order; clears the set.
    pub fn take_touched(&mut self) -> Vec<PartitionId> {
        std::mem::take(&mut self.touched).into_iter().collect()
    }

    /// The partition's rows sorted by dims; empty if the partition has no rows (any more).
    pub fn rows(&self, id: &PartitionId) -> Result<Vec<(Dims, MetricRow)>, MirrorError> {
        let Some(rows) = self.partitions.get(id) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<(Dims, MetricRow)> = Vec::with_capacity(rows.len());
        for (&(dims, row), &count) in rows {
            if count != 1 {
                return Err(MirrorError {
                    partition: *id,
                    detail: format!("row {dims:?} has multiplicity {count}"),
                });
            }
            if out.last().is_some_and(|(last, _)| *last == dims) {
                return Err(MirrorError { partition: *id, detail: format!("two rows for {dims:?}") });
            }
            out.push((dims, row));
        }
        Ok(out)
    }

    /// Every partition currently held, in order.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionId> {
        self.partitions.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Country;

    fn cell(period: i64, ad_id: i64) -> Cell {
        let dims = Dims { advertiser_id: 1, campaign_id: 2, ad_id, country: Country(*b"US") };
        Cell { grain: Grain::Hourly, period, dims }
    }

    #[test]
    fn update_replaces_row_and_marks_partition() {
        let mut mirror = PartitionMirror::default();
        let old = MetricRow { impressions: 1, ..Default::default() };
        let new = MetricRow { impressions: 2, ..Default::default() };
        mirror.apply(&cell(5, 1), &old, 1);
        assert_eq!(mirror.take_touched().len(), 1);
        mirror.apply(&cell(5, 1), &new, 1);
        mirror.apply(&cell(5, 1), &old, -1);
        let id = PartitionId { grain: Grain::Hourly, period: 5 };
        assert_eq!(mirror.take_touched(), vec![id]);
        assert_eq!(mirror.rows(&id).unwrap(), vec![(cell(5, 1).dims, new)]);
        assert!(mirror.take_touched().is_empty());
    }

    #[test]
    fn half_applied_update_is_reported() {
        let mut mirror = PartitionMirror::default();
        mirror.apply(&cell(5, 1), &MetricRow::default(), 1);
        mirror.apply(&cell(5, 1), &MetricRow { clicks: 1, ..Default::default() }, 1);
        let id = PartitionId { grain: Grain::Hourly, period: 5 };
        assert!(mirror.rows(&id).is_err());
    }

    #[test]
    fn route_spreads_consecutive_hours() {
        let owners: BTreeSet<u64> = (0..64)
            .map(|period| PartitionId { grain: Grain::Hourly, period }.route() % 4)
            .collect();
        assert_eq!(owners.len(), 4);
    }
}
