//! The sink's view of the metrics: the current rows of each curated partition this worker owns.
//!
//! The cell changes are exchanged by partition before they reach the mirror, so every partition
//! lives whole on exactly one worker (its designated writer). The mirror adds up each cell's
//! changes (sums and distinct-user counts are both additive at this point) and remembers which
//! partitions they touched; once the frontier passes the epoch, the sink reads those partitions
//! whole, in sorted order, and publishes them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use differential_dataflow::difference::{IsZero, Semigroup};

use crate::aggregate::CellDelta;
use crate::batching::BuildFastHasher;
use crate::model::{first_day_of_week, Cell, Dims, Epoch, Grain, MetricRow};

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
        PartitionId {
            grain: cell.grain,
            period: cell.period,
        }
    }

    /// The partitions an event in hour `hour` (since the Unix epoch) counts into: its hourly
    /// partition, its daily one, and (a click) its hour of `ads_clicks_minute`.
    pub fn of_hour(hour: i64) -> [Self; 3] {
        [
            PartitionId {
                grain: Grain::Hourly,
                period: hour,
            },
            PartitionId {
                grain: Grain::Daily,
                period: hour.div_euclid(24),
            },
            PartitionId {
                grain: Grain::Minute,
                period: hour,
            },
        ]
    }

    /// The event day the partition lies in: its day, or its hour's day; a week's last day (a
    /// week is past a horizon when all its days are).
    pub fn day(&self) -> i64 {
        match self.grain {
            Grain::Hourly | Grain::Minute => self.period.div_euclid(24),
            Grain::Daily => self.period,
            Grain::Weekly => first_day_of_week(self.period) + 6,
        }
    }

    /// The event days the partition covers: one, or a week's seven.
    pub fn days(&self) -> std::ops::RangeInclusive<i64> {
        match self.grain {
            Grain::Weekly => first_day_of_week(self.period)..=self.day(),
            _ => self.day()..=self.day(),
        }
    }

    /// The worker (of `peers`) whose mirror holds the partition: where the exchange on
    /// [`PartitionId::route`] sends its cells (timely takes the route modulo the workers).
    pub fn worker(&self, peers: usize) -> usize {
        (self.route() % peers.max(1) as u64) as usize
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
        write!(
            f,
            "partition {:?} is inconsistent: {}",
            self.partition, self.detail
        )
    }
}

impl std::error::Error for MirrorError {}

/// Current rows of the partitions one worker owns, and the partitions changed since last taken.
#[derive(Default, Debug)]
pub struct PartitionMirror {
    partitions: HashMap<PartitionId, Partition, BuildFastHasher>,
    /// Since the last [`PartitionMirror::take_touched`], in the order first touched (an id may
    /// repeat if its partition emptied and came back); a partition's own flag says it is here.
    touched: Vec<PartitionId>,
    floor: Epoch,
    /// Changes are logged and added up when taken ([`PartitionMirror::logging`]).
    logging: bool,
}

/// One partition's cells: a sorted base (a seeded partition's published rows, else nothing) and
/// the changes since, by cell.
///
/// Changes go to a hash map, sorted when the partition is read: a busy hour holds a million
/// cells, and an epoch applies millions of changes but reads each touched partition once. (A
/// [`PartitionMirror::logging`] mirror appends them to a log instead, sorted and added up once.) A
/// seeded partition keeps its published rows as they were read (already sorted) and merges the
/// changes into them when read, so a correction that touches a few cells of a large partition
/// neither hashes nor sorts the rest.
#[derive(Default, Debug)]
struct Partition {
    base: Vec<(Dims, CellDelta)>,
    changes: HashMap<Dims, CellDelta, BuildFastHasher>,
    /// A logging mirror's changes as applied, and as added up by [`PartitionMirror::take_touched`]
    /// (sorted by cell, one per cell, none zero).
    log: Vec<(Dims, CellDelta)>,
    summed: Vec<(Dims, CellDelta)>,
    /// In [`PartitionMirror::touched`].
    touched: bool,
}

impl Partition {
    fn is_empty(&self) -> bool {
        self.base.is_empty()
            && self.changes.is_empty()
            && self.log.is_empty()
            && self.summed.is_empty()
    }

    fn changed_cells(&self) -> usize {
        self.changes.len() + self.log.len() + self.summed.len()
    }

    /// Adds a change to a cell: to the log, for a logging mirror; else to the cell's sum in the
    /// map, which leaves the map when it cancels.
    fn add(&mut self, logging: bool, dims: Dims, delta: &CellDelta) {
        if logging {
            self.log.push((dims, *delta));
            return;
        }
        let state = self.changes.entry(dims).or_default();
        state.plus_equals(delta);
        if state.is_zero() {
            self.changes.remove(&dims);
        }
    }
}

/// `changes` sorted by cell and added up, without the cells whose changes cancel.
fn summed(mut changes: Vec<(Dims, CellDelta)>) -> Vec<(Dims, CellDelta)> {
    changes.sort_unstable_by_key(|(dims, _)| *dims);
    let mut out: Vec<(Dims, CellDelta)> = Vec::with_capacity(changes.len());
    for (dims, delta) in changes {
        match out.last_mut() {
            Some((last, sum)) if *last == dims => sum.plus_equals(&delta),
            _ => {
                if out.last().is_some_and(|(_, sum)| sum.is_zero()) {
                    out.pop();
                }
                out.push((dims, delta));
            }
        }
    }
    if out.last().is_some_and(|(_, sum)| sum.is_zero()) {
        out.pop();
    }
    out
}

impl PartitionMirror {
    /// A mirror for a run that applies its changes and then reads each partition once (the batch
    /// engine's): each change is appended to its partition's log, and the logs are sorted and
    /// added up when the touched partitions are taken. A hash map per partition instead costs a
    /// lookup per change, and a sort of the map's entries when read.
    pub fn logging() -> Self {
        PartitionMirror {
            logging: true,
            ..Self::default()
        }
    }

    /// Adds one change to a cell.
    pub fn apply(&mut self, cell: &Cell, delta: &CellDelta) {
        // Called once per cell change (millions per epoch): a hash lookup for the partition and
        // one for the cell, where an ordered map and an ordered set of touched partitions cost
        // about twice as many instructions.
        let id = PartitionId::of(cell);
        let partition = self.partitions.entry(id).or_default();
        if !partition.touched {
            partition.touched = true;
            self.touched.push(id);
        }
        partition.add(self.logging, cell.dims, delta);
        if partition.is_empty() {
            self.partitions.remove(&id);
        }
    }

    /// Adds a partition's published `rows` to whatever changes it already holds, without marking
    /// it touched: after a keyed rehydration, the mirror holds only the changes since the
    /// published state, and a partition gets its published rows when first touched.
    pub fn seed(&mut self, id: &PartitionId, rows: &[(Dims, MetricRow)]) {
        let partition = self.partitions.entry(*id).or_default();
        let mut base: Vec<(Dims, CellDelta)> = rows
            .iter()
            .map(|(dims, row)| (*dims, CellDelta::of_row(row)))
            .collect();
        if !base.is_sorted_by_key(|(dims, _)| *dims) {
            base.sort_by_key(|(dims, _)| *dims);
        }
        if partition.base.is_empty() {
            partition.base = base;
        } else {
            // Seeded twice: the second rows count as changes.
            for (dims, delta) in base {
                partition.add(self.logging, dims, &delta);
            }
        }
        if partition.is_empty() {
            self.partitions.remove(id);
        }
    }

    /// Ignores changes at epochs before `epoch` from now on: a keyed rehydration feeds only part
    /// of each partition's state at epoch 0, and what that makes of the cells is not theirs.
    pub fn ignore_before(&mut self, epoch: Epoch) {
        self.floor = epoch;
    }

    /// Adds one change at `epoch` to a cell, unless the epoch is ignored.
    pub fn apply_at(&mut self, cell: &Cell, epoch: Epoch, delta: &CellDelta) {
        if epoch >= self.floor {
            self.apply(cell, delta);
        }
    }

    /// The partitions touched since the last call, in order and each once; forgets them.
    pub fn take_touched(&mut self) -> Vec<PartitionId> {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for id in &touched {
            if let Some(partition) = self.partitions.get_mut(id) {
                partition.touched = false;
                if !partition.log.is_empty() {
                    let mut log = std::mem::take(&mut partition.log);
                    log.append(&mut partition.summed);
                    partition.summed = summed(log);
                }
                if partition.is_empty() {
                    self.partitions.remove(id);
                }
            }
        }
        touched
    }

    /// The partition's rows sorted by dims; empty if the partition has no rows (any more). Only
    /// meaningful once the frontier has passed every change applied.
    pub fn rows(&self, id: &PartitionId) -> Result<Vec<(Dims, MetricRow)>, MirrorError> {
        let base = self.partitions.get(id).map_or(&[][..], |p| &p.base);
        self.merged(id, base.iter().copied())
    }

    /// The partition's rows as [`PartitionMirror::rows`] gives them once [`PartitionMirror::seed`]
    /// has given it `published`, without keeping them: a run that stages a partition once and
    /// then drops its mirror reads each partition's published rows only while it stages it,
    /// rather than holding every touched partition's at once. An error for a partition that was
    /// seeded (its published rows would count twice).
    pub fn rows_seeded(
        &self,
        id: &PartitionId,
        published: &[(Dims, MetricRow)],
    ) -> Result<Vec<(Dims, MetricRow)>, MirrorError> {
        if self.partitions.get(id).is_some_and(|p| !p.base.is_empty()) {
            return Err(MirrorError {
                partition: *id,
                detail: "its published rows were given twice".to_string(),
            });
        }
        let as_delta = |(dims, row): &(Dims, MetricRow)| (*dims, CellDelta::of_row(row));
        if published.is_sorted_by_key(|(dims, _)| *dims) {
            self.merged(id, published.iter().map(as_delta))
        } else {
            let mut base: Vec<(Dims, CellDelta)> = published.iter().map(as_delta).collect();
            base.sort_by_key(|(dims, _)| *dims);
            self.merged(id, base.into_iter())
        }
    }

    /// Drops the partition: its cells and changes.
    pub fn forget(&mut self, id: &PartitionId) {
        self.partitions.remove(id);
    }

    /// The rows of `base` (sorted by dims) with the partition's changes added.
    fn merged(
        &self,
        id: &PartitionId,
        base: impl Iterator<Item = (Dims, CellDelta)>,
    ) -> Result<Vec<(Dims, MetricRow)>, MirrorError> {
        let Some(partition) = self.partitions.get(id) else {
            return Self::merge(id, base, Vec::new());
        };
        if !partition.log.is_empty() {
            // Read before the touched partitions were taken: added up here.
            let mut log = partition.log.clone();
            log.extend_from_slice(&partition.summed);
            let log = summed(log);
            return Self::merge(id, base, log.iter().map(|(d, c)| (d, c)).collect());
        }
        if !partition.summed.is_empty() {
            let summed = partition.summed.iter().map(|(d, c)| (d, c)).collect();
            return Self::merge(id, base, summed);
        }
        // Sorted as references (16 bytes) rather than copies (112 bytes): the sort moves its
        // elements about, and a partition's map is small enough to stay in cache for the
        // comparisons' reads.
        let mut changes: Vec<(&Dims, &CellDelta)> = partition.changes.iter().collect();
        changes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Self::merge(id, base, changes)
    }

    /// The rows of `base` (sorted by dims) with `changes` (sorted by dims, one per cell) added.
    fn merge(
        id: &PartitionId,
        base: impl Iterator<Item = (Dims, CellDelta)>,
        changes: Vec<(&Dims, &CellDelta)>,
    ) -> Result<Vec<(Dims, MetricRow)>, MirrorError> {
        let mut out = Vec::with_capacity(base.size_hint().0 + changes.len());
        let mut push = |dims: Dims, state: CellDelta| -> Result<(), MirrorError> {
            if state.is_zero() {
                return Ok(());
            }
            let s = &state.sums;
            // A cell with events has users and a cell with users has events (in a table with
            // distinct users; a click cell has none); anything else is a half-applied epoch or a
            // bug upstream.
            let users_ok = if id.grain.has_unique_users() {
                state.users > 0
            } else {
                state.users == 0 && (id.grain != Grain::Minute || s.clicks == s.events)
            };
            if s.events <= 0 || !users_ok || s.impressions + s.clicks + s.conversions != s.events {
                return Err(MirrorError {
                    partition: *id,
                    detail: format!("cell {dims:?} is inconsistent: {state:?}"),
                });
            }
            out.push((
                dims,
                MetricRow {
                    impressions: s.impressions,
                    clicks: s.clicks,
                    conversions: s.conversions,
                    cost_micros: s.cost_micros,
                    revenue_micros: s.revenue_micros,
                    unique_users: state.users,
                },
            ));
            Ok(())
        };
        // Merge the sorted base and the sorted changes.
        let mut changes = changes.into_iter().peekable();
        for (dims, base) in base {
            while let Some((d, c)) = changes.next_if(|(d, _)| **d < dims) {
                push(*d, *c)?;
            }
            let mut state = base;
            if let Some((_, c)) = changes.next_if(|(d, _)| **d == dims) {
                state.plus_equals(c);
            }
            push(dims, state)?;
        }
        for (d, c) in changes {
            push(*d, *c)?;
        }
        Ok(out)
    }

    /// The partition's rows, as [`PartitionMirror::rows`], folded into its base once its changes
    /// are an eighth of it or more: the changes since are then only the next ones, so a
    /// partition read after every epoch (a stream's daily partition) sorts each change about
    /// once, not every change since it was first touched at every read. A correction's few
    /// changes to a large seeded partition leave it as it is (folding would copy it whole).
    pub fn settle(&mut self, id: &PartitionId) -> Result<Vec<(Dims, MetricRow)>, MirrorError> {
        let rows = self.rows(id)?;
        self.settled(id, &rows);
        Ok(rows)
    }

    /// The second half of [`PartitionMirror::settle`], for rows read with
    /// [`PartitionMirror::rows`] (by several threads at once: it takes `&self`) and nothing applied
    /// since: drops an emptied partition, or folds the rows into its base as `settle` does.
    pub fn settled(&mut self, id: &PartitionId, rows: &[(Dims, MetricRow)]) {
        if rows.is_empty() {
            self.partitions.remove(id);
            return;
        }
        if let Some(partition) = self
            .partitions
            .get_mut(id)
            .filter(|p| p.changed_cells().saturating_mul(8) >= p.base.len())
        {
            partition.changes.clear();
            partition.log.clear();
            partition.summed.clear();
            partition.base.clear();
            partition.base.extend(
                rows.iter()
                    .map(|(dims, row)| (*dims, CellDelta::of_row(row))),
            );
        }
    }

    /// How many cells the partition holds, counting a changed cell of a seeded one twice: what
    /// reading it costs, about.
    pub fn cells(&self, id: &PartitionId) -> usize {
        self.partitions
            .get(id)
            .map_or(0, |p| p.base.len() + p.changed_cells())
    }

    /// Every partition currently held, in order.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionId> {
        let mut ids: Vec<&PartitionId> = self.partitions.keys().collect();
        ids.sort_unstable();
        ids.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Sums;
    use crate::model::Country;

    fn cell(period: i64, ad_id: i64) -> Cell {
        let dims = Dims {
            advertiser_id: 1,
            campaign_id: 2,
            ad_id,
            country: Country(*b"US"),
            click: Default::default(),
        };
        Cell {
            grain: Grain::Hourly,
            period,
            dims,
        }
    }

    fn impression(users: i64) -> CellDelta {
        CellDelta {
            sums: Sums {
                events: 1,
                impressions: 1,
                cost_micros: 10,
                ..Default::default()
            },
            users,
        }
    }

    proptest::proptest! {
        /// A logging mirror reads as the hashing one does, whatever the order and mix of changes
        /// (cells that cancel, partitions that empty, a read before the touched are taken).
        #[test]
        fn a_logging_mirror_reads_as_a_hashing_one(
            changes in proptest::collection::vec((0i64..3, 0i64..6, proptest::bool::ANY), 0..60),
        ) {
            let (mut hashing, mut logging) = (PartitionMirror::default(), PartitionMirror::logging());
            // An impression with one user, or its retraction (only of one added before, so that
            // every read is consistent).
            let mut held = std::collections::HashMap::new();
            for (period, ad, retract) in changes {
                let count = held.entry((period, ad)).or_insert(0i64);
                let mut delta = impression(1);
                if retract && *count > 0 {
                    differential_dataflow::difference::Abelian::negate(&mut delta);
                    *count -= 1;
                } else {
                    *count += 1;
                }
                hashing.apply(&cell(period, ad), &delta);
                logging.apply(&cell(period, ad), &delta);
            }
            let ids: Vec<PartitionId> = (0..3).map(|period| PartitionId { grain: Grain::Hourly, period }).collect();
            for id in &ids {
                proptest::prop_assert_eq!(logging.rows(id).unwrap(), hashing.rows(id).unwrap());
            }
            proptest::prop_assert_eq!(logging.take_touched(), hashing.take_touched());
            for id in &ids {
                proptest::prop_assert_eq!(logging.rows(id).unwrap(), hashing.rows(id).unwrap());
                proptest::prop_assert_eq!(logging.cells(id), hashing.cells(id));
            }
            proptest::prop_assert_eq!(logging.partitions().count(), hashing.partitions().count());
        }
    }

    #[test]
    fn changes_add_up_and_mark_partition() {
        let mut mirror = PartitionMirror::default();
        mirror.apply(&cell(5, 1), &impression(1));
        assert_eq!(mirror.take_touched().len(), 1);
        mirror.apply(&cell(5, 1), &impression(0));
        let id = PartitionId {
            grain: Grain::Hourly,
            period: 5,
        };
        assert_eq!(mirror.take_touched(), vec![id]);
        let rows = mirror.rows(&id).unwrap();
        assert_eq!(
            rows[0].1,
            MetricRow {
                impressions: 2,
                cost_micros: 20,
                unique_users: 1,
                ..Default::default()
            }
        );
        assert!(mirror.take_touched().is_empty());
    }

    #[test]
    fn a_cell_with_events_but_no_users_is_reported() {
        let mut mirror = PartitionMirror::default();
        mirror.apply(&cell(5, 1), &impression(0));
        let id = PartitionId {
            grain: Grain::Hourly,
            period: 5,
        };
        assert!(mirror.rows(&id).is_err());
    }

    #[test]
    fn retracting_everything_empties_the_partition() {
        let mut mirror = PartitionMirror::default();
        mirror.apply(&cell(5, 1), &impression(1));
        let mut minus = impression(1);
        differential_dataflow::difference::Abelian::negate(&mut minus);
        mirror.apply(&cell(5, 1), &minus);
        let id = PartitionId {
            grain: Grain::Hourly,
            period: 5,
        };
        assert!(mirror.rows(&id).unwrap().is_empty());
        assert_eq!(mirror.partitions().count(), 0);
    }

    #[test]
    fn touched_partitions_come_once_in_order_however_often_they_empty() {
        let mut mirror = PartitionMirror::default();
        let mut minus = impression(1);
        differential_dataflow::difference::Abelian::negate(&mut minus);
        mirror.apply(&cell(9, 1), &impression(1));
        mirror.apply(&cell(5, 1), &impression(1));
        // Hour 5 empties (and is dropped), then comes back within the same epoch.
        mirror.apply(&cell(5, 1), &minus);
        mirror.apply(&cell(5, 2), &impression(1));
        mirror.apply(&cell(9, 2), &impression(1));
        let hour = |period| PartitionId {
            grain: Grain::Hourly,
            period,
        };
        assert_eq!(mirror.take_touched(), vec![hour(5), hour(9)]);
        assert!(mirror.take_touched().is_empty());
        // Taken means forgotten: the next change marks the partition again.
        mirror.apply(&cell(9, 3), &impression(1));
        assert_eq!(mirror.take_touched(), vec![hour(9)]);
        assert_eq!(
            mirror.partitions().copied().collect::<Vec<_>>(),
            vec![hour(5), hour(9)]
        );
    }

    #[test]
    fn a_seeded_partition_merges_its_changes_into_its_published_rows() {
        let mut mirror = PartitionMirror::default();
        let id = PartitionId {
            grain: Grain::Hourly,
            period: 5,
        };
        let row = |impressions: i64, users: i64| MetricRow {
            impressions,
            cost_micros: 10 * impressions,
            unique_users: users,
            ..Default::default()
        };
        let published = [(cell(5, 1).dims, row(2, 1)), (cell(5, 3).dims, row(1, 1))];
        // The same changes to a mirror that is never seeded, read with the published rows.
        let mut unseeded = PartitionMirror::default();
        let mut minus = CellDelta::of_row(&row(2, 1));
        differential_dataflow::difference::Abelian::negate(&mut minus);
        for (i, mirror) in [&mut mirror, &mut unseeded].into_iter().enumerate() {
            // A change that arrives before the seed counts too.
            mirror.apply(&cell(5, 4), &impression(1));
            if i == 0 {
                mirror.seed(&id, &published);
            }
            mirror.apply(&cell(5, 2), &impression(1));
            mirror.apply(&cell(5, 3), &impression(1));
            mirror.apply(&cell(5, 1), &minus);
        }
        let rows = mirror.rows(&id).unwrap();
        let ads: Vec<i64> = rows.iter().map(|(d, _)| d.ad_id).collect();
        assert_eq!(ads, vec![2, 3, 4]);
        assert_eq!(rows[1].1, row(2, 2));
        assert_eq!(rows[0].1, row(1, 1));

        assert_eq!(unseeded.rows_seeded(&id, &published).unwrap(), rows);
        // Given them twice, the published rows would count twice.
        assert!(mirror.rows_seeded(&id, &published).is_err());
        let unsorted = [published[1], published[0]];
        assert_eq!(unseeded.rows_seeded(&id, &unsorted).unwrap(), rows);
        // Without its published rows, the partition's changes alone are inconsistent (ad 1
        // loses events it never had).
        assert!(unseeded.rows(&id).is_err());
        unseeded.forget(&id);
        assert_eq!(unseeded.partitions().count(), 0);
    }

    #[test]
    fn a_settled_partition_reads_the_same_and_takes_later_changes() {
        let mut mirror = PartitionMirror::default();
        let id = PartitionId {
            grain: Grain::Hourly,
            period: 5,
        };
        for ad in [3, 1, 2] {
            mirror.apply(&cell(5, ad), &impression(1));
        }
        let before = mirror.rows(&id).unwrap();
        assert_eq!(mirror.settle(&id).unwrap(), before);
        assert_eq!(mirror.rows(&id).unwrap(), before);
        // After settling: one more impression of ad 2, ad 1 leaves, ad 0 arrives.
        mirror.apply(&cell(5, 2), &impression(0));
        let mut minus = impression(1);
        differential_dataflow::difference::Abelian::negate(&mut minus);
        mirror.apply(&cell(5, 1), &minus);
        mirror.apply(&cell(5, 0), &impression(1));
        let rows = mirror.settle(&id).unwrap();
        let ads: Vec<(i64, i64)> = rows.iter().map(|(d, r)| (d.ad_id, r.impressions)).collect();
        assert_eq!(ads, vec![(0, 1), (2, 2), (3, 1)]);
        // Everything leaves: the partition is gone.
        for (ad, n) in [(0, 1), (2, 2), (3, 1)] {
            let mut minus = impression(1);
            minus.sums.events = n;
            minus.sums.impressions = n;
            minus.sums.cost_micros = 10 * n;
            differential_dataflow::difference::Abelian::negate(&mut minus);
            mirror.apply(&cell(5, ad), &minus);
        }
        assert!(mirror.settle(&id).unwrap().is_empty());
        assert_eq!(mirror.partitions().count(), 0);
    }

    #[test]
    fn route_spreads_consecutive_hours() {
        let owners: std::collections::BTreeSet<u64> = (0..64)
            .map(|period| {
                PartitionId {
                    grain: Grain::Hourly,
                    period,
                }
                .route()
                    % 4
            })
            .collect();
        assert_eq!(owners.len(), 4);
    }
}
