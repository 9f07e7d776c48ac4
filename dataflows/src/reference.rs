//! A plain in-memory reference for the dataflow: the slow, obvious computation of the same tables.
//!
//! Tests compare the incremental dataflow against it on random input; the `check` commands of a
//! later issue can use it as the independent code path.

use std::collections::{BTreeMap, BTreeSet};

use crate::mirror::PartitionId;
use crate::model::{Cell, DedupKey, Dims, EventType, EventVersion, Grain, MetricRow};

/// The winning version of every key among `versions` (any order, any multiplicity).
pub fn dedup<'a>(
    versions: impl IntoIterator<Item = &'a (DedupKey, EventVersion)>,
) -> BTreeMap<DedupKey, EventVersion> {
    let mut winners: BTreeMap<DedupKey, EventVersion> = BTreeMap::new();
    for (key, version) in versions {
        winners
            .entry(*key)
            .and_modify(|w| {
                if version > w {
                    *w = *version
                }
            })
            .or_insert(*version);
    }
    winners
}

/// Every partition's sorted rows computed from scratch from the winning versions.
pub fn tables(
    winners: &BTreeMap<DedupKey, EventVersion>,
) -> BTreeMap<PartitionId, Vec<(Dims, MetricRow)>> {
    let mut cells: BTreeMap<Cell, (MetricRow, BTreeSet<i64>)> = BTreeMap::new();
    for event in winners.values() {
        for grain in Grain::ALL.into_iter().filter(|g| g.counts(event)) {
            let cell = Cell {
                grain,
                period: grain.period_of(event),
                dims: grain.dims_of(event),
            };
            let (row, users) = cells.entry(cell).or_default();
            match event.event_type {
                EventType::Impression => row.impressions += 1,
                EventType::Click => row.clicks += 1,
                EventType::Conversion => row.conversions += 1,
            }
            row.cost_micros += event.cost_micros;
            row.revenue_micros += event.revenue_micros;
            users.insert(event.user_id);
        }
    }
    let mut tables: BTreeMap<PartitionId, Vec<(Dims, MetricRow)>> = BTreeMap::new();
    for (cell, (mut row, users)) in cells {
        if cell.grain.has_unique_users() {
            row.unique_users = users.len() as i64;
        }
        tables
            .entry(PartitionId::of(&cell))
            .or_default()
            .push((cell.dims, row));
    }
    tables
}
