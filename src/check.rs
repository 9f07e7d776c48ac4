//! `adsmetrics check`: data-quality checks an orchestrator can gate on.
//!
//! **reconcile** recomputes every curated partition in a day range from the raw layer by a
//! separate, plain code path — the raw files' `(key, version)` rows, minus tombstones, deduplicated
//! and aggregated by [`adsmetrics_dataflows::reference`] (sorted maps, no dataflow, no mirror, no
//! rehydration) — and compares the result exactly with what the journal published and what the
//! partition files hold: a partition missing, one that should not be there, a file whose rows are
//! not the version the journal names (edited, or stuck mid-publish), and rows that differ, the
//! first few of which are listed.
//!
//! A key's versions may lie in other event days than the range (a revision that moved an event):
//! the range's days are read whole, and every other day whose key index may hold one of their
//! keys is read for those keys only, so the winners are the real ones.
//!
//! Read-only: an interrupted publish is reported (as partitions that differ), never finished here.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use adsmetrics_dataflows::batching::BuildFastHasher;
use adsmetrics_dataflows::model::{Dims, Grain, MetricRow};
use adsmetrics_dataflows::{reference, DedupKey, EventVersion, PartitionId};
use serde::Serialize;

use crate::journal::CommitJournal;
use crate::scope::raw_day;
use crate::sink::raw;
use crate::tombstones::Tombstones;
use crate::warehouse::{day_path, day_string, partition_path, table_name, Warehouse};

/// The exit code of a failed reconciliation (other checks get their own).
pub const EXIT_RECONCILE: u8 = 12;

/// How many differing rows a partition's finding lists.
const FIRST_DIFFERENCES: usize = 5;

/// Which days a check covers (event days, inclusive); `None`: unbounded.
#[derive(Clone, Copy, Debug, Default)]
pub struct DayRange {
    /// First day, days since the Unix epoch.
    pub from: Option<i64>,
    /// Last day.
    pub to: Option<i64>,
}

impl DayRange {
    fn contains(&self, day: i64) -> bool {
        self.from.is_none_or(|f| day >= f) && self.to.is_none_or(|t| day <= t)
    }
}

/// A check could not run (as opposed to: it ran and found something).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The tombstones could not be read.
    #[error(transparent)]
    Tombstones(#[from] crate::tombstones::TombstoneError),
    /// The retention horizons could not be read.
    #[error(transparent)]
    Run(#[from] crate::runtime::RunError),
    /// A raw file could not be read or is damaged.
    #[error(transparent)]
    Raw(#[from] crate::scope::ScopeError),
}

/// One row that differs: its dimensions, and its metrics as recomputed and as published.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RowDifference {
    /// The row's dimensions.
    pub dims: Dims,
    /// From the raw layer; `None`: the published partition has a row that should not be there.
    pub expected: Option<MetricRow>,
    /// As published; `None`: the row is missing.
    pub published: Option<MetricRow>,
}

/// What is wrong with one partition.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The raw layer has events for it; nothing is published.
    Missing,
    /// Published, but the raw layer has no event for it.
    Unexpected,
    /// The file is gone or unreadable.
    Unreadable {
        /// Why.
        error: String,
    },
    /// The file's rows are not the version the journal published (edited, or a publish
    /// stopped midway).
    NotTheJournalsVersion {
        /// What the journal names.
        journal: String,
        /// What the file's rows hash to.
        file: String,
    },
    /// Rows differ from the recompute.
    RowsDiffer {
        /// How many rows differ.
        rows: usize,
        /// The first of them, by dimensions.
        first: Vec<RowDifference>,
    },
}

/// One partition that failed.
#[derive(Debug, Serialize)]
pub struct Finding {
    /// `ads_metrics_hourly/dt=…/hr=…` or `ads_metrics_daily/dt=…`.
    pub partition: String,
    /// What is wrong.
    #[serde(flatten)]
    pub problem: Problem,
}

/// Where the raw rows of a range go: `raw_rows - deleted - superseded = curated_events`, where
/// superseded rows are duplicates and older revisions (and versions whose winner lies outside
/// the range) and curated events are the published hourly partitions' impressions, clicks and
/// conversions. Quarantined events never reach the raw layer; they are counted beside it.
#[derive(Debug, Serialize)]
pub struct Accounting {
    /// Raw rows in the range's event days.
    pub raw_rows: u64,
    /// Of them, rows of deleted keys (tombstones).
    pub deleted: u64,
    /// Of them, rows that lost dedup.
    pub superseded: u64,
    /// Events in the published hourly partitions of the range.
    pub curated_events: u64,
    /// Whether the line adds up.
    pub balanced: bool,
    /// Events quarantined by the sources committed (all days: quarantine has no event day).
    pub quarantined: u64,
}

/// The result of `check reconcile`.
#[derive(Debug, Serialize)]
pub struct Reconciliation {
    /// `reconcile`.
    pub check: &'static str,
    /// Whether every partition in range matched.
    pub passed: bool,
    /// First and last day checked (`None`: unbounded).
    pub from: Option<String>,
    /// Last day checked.
    pub to: Option<String>,
    /// Raw files read.
    pub raw_files: usize,
    /// Raw rows read (all versions, before dedup).
    pub raw_rows: usize,
    /// Distinct keys after dedup and tombstones, with their winner in range.
    pub events: usize,
    /// Raw rows of the range's days → curated events, line by line.
    pub accounting: Accounting,
    /// Partitions compared.
    pub partitions: usize,
    /// Partitions that matched.
    pub matched: usize,
    /// The others.
    pub findings: Vec<Finding>,
}

impl Reconciliation {
    /// A few lines for a terminal.
    pub fn text(&self) -> String {
        let mut out = format!(
            "reconcile {}: {} of {} partitions match the recompute from the raw layer \
             ({} raw files, {} raw rows, {} events)\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.matched,
            self.partitions,
            self.raw_files,
            self.raw_rows,
            self.events
        );
        let a = &self.accounting;
        out.push_str(&format!(
            "  raw rows {} - deleted {} - superseded {} = {} {} curated events {}; {} quarantined \
             before the raw layer\n",
            a.raw_rows,
            a.deleted,
            a.superseded,
            a.raw_rows - a.deleted - a.superseded,
            if a.balanced { "=" } else { "!=" },
            a.curated_events,
            a.quarantined
        ));
        for f in &self.findings {
            let what = match &f.problem {
                Problem::Missing => "missing: the raw layer has events for it".to_string(),
                Problem::Unexpected => "unexpected: no raw event belongs to it".to_string(),
                Problem::Unreadable { error } => format!("unreadable: {error}"),
                Problem::NotTheJournalsVersion { journal, file } => {
                    format!("file is version {file}, the journal published {journal}")
                }
                Problem::RowsDiffer { rows, first } => {
                    let mut s = format!("{rows} rows differ");
                    for d in first {
                        s.push_str(&format!(
                            "\n    {:?}: expected {:?}, published {:?}",
                            d.dims, d.expected, d.published
                        ));
                    }
                    s
                }
            };
            out.push_str(&format!("  {}: {what}\n", f.partition));
        }
        out
    }
}

fn partition_name(id: &PartitionId) -> String {
    format!("{}/{}", table_name(id.grain), partition_path(id))
}

/// The raw files the journal has committed (a crashed run's uncommitted files are ignored).
fn committed_raw<'a>(
    warehouse: &Warehouse,
    journal: &'a CommitJournal,
) -> impl Iterator<Item = PathBuf> + 'a {
    raw::list_raw_files(warehouse)
        .into_iter()
        .filter(|p| raw::source_hash_of(p).is_some_and(|h| journal.consumed().contains(h)))
}

fn read_versions(
    paths: &[&PathBuf],
    threads: usize,
) -> Result<Vec<Vec<(DedupKey, EventVersion)>>, CheckError> {
    Ok(crate::rehydrate::par_map(paths, threads, |path| {
        let bytes = crate::rehydrate::read_bytes(path)?;
        Ok::<_, crate::scope::ScopeError>(raw::RawFile::open(path, bytes)?.all_versions()?)
    })?)
}

/// Per committed raw file of the event days of `range`: the `dedup_key`, `producer` and event
/// hour of each row. (A file's day is its `dt=` folder; hours come from the rows, whether the
/// file holds a day or, in the older layout, an hour.)
fn key_producer_hours(
    warehouse: &Warehouse,
    journal: &CommitJournal,
    range: DayRange,
    threads: usize,
) -> Result<Vec<raw::KeyProducerHours>, CheckError> {
    let files: Vec<PathBuf> = committed_raw(warehouse, journal)
        .filter(|p| raw_day(warehouse, p).is_some_and(|day| range.contains(day)))
        .collect();
    Ok(crate::rehydrate::par_map(&files, threads, |path| {
        let file = raw::RawFile::open(path, crate::rehydrate::read_bytes(path)?)?;
        Ok::<_, crate::scope::ScopeError>(file.key_producer_hours()?)
    })?)
}

/// Every row of `columns`: its event hour, key and producer.
fn rows_of(columns: &[raw::KeyProducerHours]) -> impl Iterator<Item = (i64, &u128, &String)> + '_ {
    columns.iter().flat_map(|c| {
        c.hours
            .iter()
            .zip(&c.keys)
            .zip(&c.producers)
            .map(|((hour, key), producer)| (*hour, key, producer))
    })
}

/// The reference's partitions of the event days `wanted` accepts, from the raw files of the
/// sources `consumed` names, minus tombstones; with the counts reconciliation balances.
struct Expected {
    tables: BTreeMap<PartitionId, Vec<(Dims, MetricRow)>>,
    raw_files: usize,
    raw_rows: usize,
    range_rows: u64,
    deleted: u64,
    live_in_range: u64,
    events: usize,
}

fn expected_tables(
    warehouse: &Warehouse,
    consumed: &BTreeSet<String>,
    tombstones: &Tombstones,
    wanted: &dyn Fn(i64) -> bool,
    threads: usize,
) -> Result<Expected, CheckError> {
    // The raw files of the consumed sources, by event day (files outside a dt= folder: always
    // read, they cannot be placed).
    let mut by_day: BTreeMap<Option<i64>, Vec<PathBuf>> = BTreeMap::new();
    for path in raw::list_raw_files(warehouse)
        .into_iter()
        .filter(|p| raw::source_hash_of(p).is_some_and(|h| consumed.contains(h)))
    {
        by_day
            .entry(raw_day(warehouse, &path))
            .or_default()
            .push(path);
    }
    let in_range = |day: &Option<i64>| day.is_none_or(wanted);
    let files: Vec<&PathBuf> = by_day
        .iter()
        .filter(|(day, _)| in_range(day))
        .flat_map(|(_, files)| files)
        .collect();
    let mut rows: Vec<(DedupKey, EventVersion)> = read_versions(&files, threads)?.concat();
    let mut raw_files = files.len();
    let range_rows = rows.len() as u64;
    rows.retain(|(key, _)| !tombstones.contains(key));
    let deleted = range_rows - rows.len() as u64;
    let live_in_range = rows.len() as u64;

    // Other versions of the range's keys in other days.
    let keys: HashSet<DedupKey, BuildFastHasher> = rows.iter().map(|(k, _)| *k).collect();
    let mut prefixes: Vec<u64> = keys
        .iter()
        .map(|k| crate::keyindex::prefix(k.0.get()))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    for (day, files) in by_day.iter().filter(|(day, _)| !in_range(day)) {
        let Some(day) = *day else { continue };
        let files: Vec<&PathBuf> = files.iter().collect();
        if prefixes.is_empty()
            || !crate::keyindex::day_may_hold(warehouse, day, &files, &prefixes)
                .map_err(crate::scope::ScopeError::from)?
        {
            continue;
        }
        raw_files += files.len();
        for file in read_versions(&files, threads)? {
            rows.extend(file.into_iter().filter(|(k, _)| keys.contains(k)));
        }
    }
    let raw_rows = rows.len();

    let mut winners = reference::dedup(&rows);
    drop(rows);
    winners.retain(|_, v| wanted(v.day()));
    let events = winners.len();
    Ok(Expected {
        tables: reference::tables(&winners),
        raw_files,
        raw_rows,
        range_rows,
        deleted,
        live_in_range,
        events,
    })
}

/// The publish gate (`--gate`): recomputes by the reference the partitions a publish is about to
/// change — from the raw layer as it will be once the publish commits (`consumed_after`: the
/// sources the journal will then hold) — and compares them with the staged files. Returns what
/// differs; empty when the publish may go ahead.
pub fn gate(
    warehouse: &Warehouse,
    consumed_after: &BTreeSet<String>,
    changes: &[crate::journal::PartitionChange],
    threads: usize,
) -> Result<Vec<Finding>, CheckError> {
    // A week's change needs its seven days recomputed.
    let days: BTreeSet<i64> = changes.iter().flat_map(|c| c.partition.days()).collect();
    if days.is_empty() {
        return Ok(Vec::new());
    }
    let tombstones = Tombstones::open(&warehouse.tombstones_path())?;
    let expected = expected_tables(
        warehouse,
        consumed_after,
        &tombstones,
        &|d| days.contains(&d),
        threads,
    )?;
    // A week with days past the raw layer's retention horizon cannot be recomputed from it.
    let raw_horizon = crate::retention::horizons(warehouse)?.raw_day;
    let mut findings = Vec::new();
    for change in changes {
        let id = &change.partition;
        if id.grain == Grain::Weekly && id.days().any(|d| raw_horizon.is_some_and(|h| d < h)) {
            continue;
        }
        let staged = match &change.staged {
            None => None,
            Some(relative) => {
                let path = warehouse.root().join(relative);
                match crate::sink::curated::read_partition(&path) {
                    Ok(rows) => Some(rows),
                    Err(e) => {
                        findings.push(Finding {
                            partition: partition_name(id),
                            problem: Problem::Unreadable {
                                error: format!("{}: {e}", path.display()),
                            },
                        });
                        continue;
                    }
                }
            }
        };
        let problem = match (expected.tables.get(id), staged) {
            (Some(_), None) => Some(Problem::Missing),
            (None, Some(_)) => Some(Problem::Unexpected),
            (None, None) => None,
            (Some(want), Some(have)) => differences(want, &have),
        };
        if let Some(problem) = problem {
            findings.push(Finding {
                partition: partition_name(id),
                problem,
            });
        }
    }
    Ok(findings)
}

/// Recomputes the partitions of `range` from the raw layer and compares them with what is
/// published; see the module doc. `threads` read raw files in parallel.
pub fn reconcile(
    warehouse: &Warehouse,
    range: DayRange,
    threads: usize,
) -> Result<Reconciliation, CheckError> {
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
    let tombstones = Tombstones::open(&warehouse.tombstones_path())?;
    let horizons = crate::retention::horizons(warehouse)?;
    let range = DayRange {
        from: range.from.max(horizons.curated_day).max(horizons.raw_day),
        to: range.to,
    };
    let Expected {
        tables: mut expected,
        raw_files,
        raw_rows,
        range_rows,
        deleted,
        live_in_range,
        events,
    } = expected_tables(
        warehouse,
        journal.consumed(),
        &tombstones,
        &|d| range.contains(d),
        threads,
    )?;

    // A week is compared only when the range holds all its days: the recompute has the range's
    // raw rows only, so a week the range cuts would come out short.
    let in_range = |id: &PartitionId| id.days().all(|d| range.contains(d));
    expected.retain(|id, _| in_range(id));
    let published: BTreeMap<&PartitionId, &crate::journal::Published> = journal
        .published()
        .iter()
        .filter(|(id, _)| in_range(id))
        .collect();
    let ids: BTreeSet<&PartitionId> = expected.keys().chain(published.keys().copied()).collect();
    let mut findings = Vec::new();
    let mut curated_events = 0u64;
    for id in &ids {
        let partition = partition_name(id);
        let problem = match (expected.get(*id), published.get(*id)) {
            (Some(_), None) => Some(Problem::Missing),
            (None, Some(_)) => Some(Problem::Unexpected),
            (None, None) => None,
            (Some(want), Some(current)) => {
                let path = warehouse.partition_file(id);
                match crate::sink::curated::read_partition(&path) {
                    Err(e) => Some(Problem::Unreadable {
                        error: format!("{}: {e}", path.display()),
                    }),
                    Ok(have) => {
                        if id.grain == Grain::Hourly {
                            curated_events += have
                                .iter()
                                .map(|(_, r)| (r.impressions + r.clicks + r.conversions) as u64)
                                .sum::<u64>();
                        }
                        let file = crate::sink::curated::content_version(id, &have);
                        if file != current.version {
                            Some(Problem::NotTheJournalsVersion {
                                journal: current.version.clone(),
                                file,
                            })
                        } else {
                            differences(want, &have)
                        }
                    }
                }
            }
        };
        if let Some(problem) = problem {
            findings.push(Finding { partition, problem });
        }
    }
    let superseded = live_in_range - events as u64;
    let accounting = Accounting {
        raw_rows: range_rows,
        deleted,
        superseded,
        curated_events,
        balanced: range_rows - deleted - superseded == curated_events,
        quarantined: journal
            .committed()
            .iter()
            .flat_map(|p| &p.sources)
            .map(|s| s.quarantined)
            .sum(),
    };
    Ok(Reconciliation {
        check: "reconcile",
        passed: findings.is_empty() && accounting.balanced,
        accounting,
        from: range.from.map(day_string),
        to: range.to.map(day_string),
        raw_files,
        raw_rows,
        events,
        partitions: ids.len(),
        matched: ids.len() - findings.len(),
        findings,
    })
}

/// The rows of two sorted partitions that differ, or `None`.
fn differences(want: &[(Dims, MetricRow)], have: &[(Dims, MetricRow)]) -> Option<Problem> {
    let want: BTreeMap<&Dims, &MetricRow> = want.iter().map(|(d, r)| (d, r)).collect();
    let have: BTreeMap<&Dims, &MetricRow> = have.iter().map(|(d, r)| (d, r)).collect();
    let dims: BTreeSet<&Dims> = want.keys().chain(have.keys()).copied().collect();
    let differing: Vec<RowDifference> = dims
        .into_iter()
        .filter(|d| want.get(d) != have.get(d))
        .map(|d| RowDifference {
            dims: *d,
            expected: want.get(d).map(|r| **r),
            published: have.get(d).map(|r| **r),
        })
        .collect();
    if differing.is_empty() {
        return None;
    }
    let rows = differing.len();
    Some(Problem::RowsDiffer {
        rows,
        first: differing.into_iter().take(FIRST_DIFFERENCES).collect(),
    })
}

/// The exit code of a failed duplicates check.
pub const EXIT_DUPLICATES: u8 = 10;

/// When the duplicate rate of an hour and producer alerts.
#[derive(Clone, Copy, Debug)]
pub struct DuplicateThresholds {
    /// Above this rate (0 to 1), whatever the history.
    pub max_rate: f64,
    /// Above this many times the median rate of the producer's hours in the week before the
    /// hour (`None`: off; an hour with no earlier hour in that week has no median).
    pub vs_median: Option<f64>,
}

impl Default for DuplicateThresholds {
    fn default() -> Self {
        DuplicateThresholds {
            max_rate: 0.10,
            vs_median: Some(3.0),
        }
    }
}

/// One event hour of one producer in the raw layer.
#[derive(Debug, Serialize)]
pub struct HourDuplicates {
    /// `YYYY-MM-DDTHH`.
    pub hour: String,
    /// The producer.
    pub producer: String,
    /// Raw rows (after each source's own dedup).
    pub raw_rows: u64,
    /// Distinct dedup keys among them.
    pub distinct_keys: u64,
    /// `1 - distinct / rows`.
    pub rate: f64,
    /// Why it alerts, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<String>,
}

/// The result of `check duplicates`.
#[derive(Debug, Serialize)]
pub struct Duplicates {
    /// `duplicates`.
    pub check: &'static str,
    /// No hour alerts.
    pub passed: bool,
    /// Raw rows in range.
    pub raw_rows: u64,
    /// Distinct keys per hour and producer, summed.
    pub distinct_keys: u64,
    /// Duplicates every source dropped within itself before the raw layer (the journal's count,
    /// over all sources).
    pub in_source_duplicates: u64,
    /// Every hour and producer, by hour.
    pub hours: Vec<HourDuplicates>,
}

impl Duplicates {
    /// A few lines for a terminal: the totals and the hours that alert.
    pub fn text(&self) -> String {
        let rate = 1.0 - self.distinct_keys as f64 / (self.raw_rows.max(1)) as f64;
        let mut out = format!(
            "duplicates {}: {} raw rows, {} distinct keys per hour and producer ({:.2}% \
             duplicates), {} more dropped inside their sources\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.raw_rows,
            self.distinct_keys,
            100.0 * rate,
            self.in_source_duplicates
        );
        for h in self.hours.iter().filter(|h| h.alert.is_some()) {
            out.push_str(&format!(
                "  {} {}: {:.2}% ({} rows, {} keys): {}\n",
                h.hour,
                h.producer,
                100.0 * h.rate,
                h.raw_rows,
                h.distinct_keys,
                h.alert.as_deref().unwrap_or_default()
            ));
        }
        out
    }
}

/// The newest event hour in the committed raw layer: the greatest `event_time` among the
/// files of its newest event day, from their footers.
fn newest_raw_hour(
    warehouse: &Warehouse,
    journal: &CommitJournal,
) -> Result<Option<i64>, CheckError> {
    let by_day: Vec<(i64, PathBuf)> = committed_raw(warehouse, journal)
        .filter_map(|p| Some((raw_day(warehouse, &p)?, p)))
        .collect();
    let Some(newest) = by_day.iter().map(|(day, _)| *day).max() else {
        return Ok(None);
    };
    let files: Vec<&PathBuf> = by_day
        .iter()
        .filter(|(day, _)| *day == newest)
        .map(|(_, p)| p)
        .collect();
    let newest = crate::rehydrate::par_map(&files, 2, |path| {
        Ok::<_, crate::scope::ScopeError>(raw::newest_event_time(path)?)
    })?;
    Ok(newest
        .into_iter()
        .flatten()
        .max()
        .map(|t| t.div_euclid(adsmetrics_dataflows::MICROS_PER_HOUR)))
}

/// Duplicate rates of the raw layer per event hour and producer, in `range`: raw rows against
/// distinct dedup keys (resends across sources, replays, revisions of an event).
pub fn duplicates(
    warehouse: &Warehouse,
    range: DayRange,
    thresholds: DuplicateThresholds,
    threads: usize,
) -> Result<Duplicates, CheckError> {
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
    let columns = key_producer_hours(warehouse, &journal, with_trailing_week(range), threads)?;
    Ok(duplicates_of(&journal, &columns, range, thresholds))
}

/// The days `check duplicates` reads for `range`: the week before it too, since each hour is
/// compared with its producer's trailing week.
fn with_trailing_week(range: DayRange) -> DayRange {
    DayRange {
        from: range.from.map(|f| f - TRAILING_DAYS),
        to: range.to,
    }
}

fn duplicates_of(
    journal: &CommitJournal,
    columns: &[raw::KeyProducerHours],
    range: DayRange,
    thresholds: DuplicateThresholds,
) -> Duplicates {
    let mut groups: BTreeMap<(String, i64), (u64, HashSet<u128, BuildFastHasher>)> =
        BTreeMap::new();
    for (hour, key, producer) in rows_of(columns) {
        let (rows, distinct) = groups.entry((producer.clone(), hour)).or_default();
        *rows += 1;
        distinct.insert(*key);
    }
    // Per producer, its hours in order with their rates.
    let mut by_producer: BTreeMap<String, Vec<(i64, u64, u64, f64)>> = BTreeMap::new();
    for ((producer, hour), (rows, keys)) in groups {
        let distinct = keys.len() as u64;
        let rate = 1.0 - distinct as f64 / rows.max(1) as f64;
        by_producer
            .entry(producer)
            .or_default()
            .push((hour, rows, distinct, rate));
    }
    let mut hours = Vec::new();
    for (producer, series) in &by_producer {
        for (i, &(hour, rows, distinct, rate)) in series.iter().enumerate() {
            if !range.contains(hour.div_euclid(24)) {
                continue;
            }
            // The median of the producer's hours in the week before this one.
            let mut week: Vec<f64> = series[..i]
                .iter()
                .rev()
                .take_while(|(h, ..)| *h >= hour - 24 * TRAILING_DAYS)
                .map(|(.., r)| *r)
                .collect();
            week.sort_by(f64::total_cmp);
            let median = week.get(week.len() / 2).copied();
            let alert = if rate > thresholds.max_rate {
                Some(format!("above {:.2}%", 100.0 * thresholds.max_rate))
            } else {
                match (thresholds.vs_median, median) {
                    (Some(factor), Some(median)) if median > 0.0 && rate > factor * median => {
                        Some(format!(
                            "{:.1}x the producer's median hour of the trailing week ({:.2}%)",
                            rate / median,
                            100.0 * median
                        ))
                    }
                    _ => None,
                }
            };
            hours.push(HourDuplicates {
                hour: hour_string(hour),
                producer: producer.clone(),
                raw_rows: rows,
                distinct_keys: distinct,
                rate,
                alert,
            });
        }
    }
    hours.sort_by(|a, b| (&a.hour, &a.producer).cmp(&(&b.hour, &b.producer)));
    let in_source_duplicates = journal
        .committed()
        .iter()
        .flat_map(|p| &p.sources)
        .map(|s| s.in_source_duplicates)
        .sum();
    Duplicates {
        check: "duplicates",
        passed: hours.iter().all(|h| h.alert.is_none()),
        raw_rows: hours.iter().map(|h| h.raw_rows).sum(),
        distinct_keys: hours.iter().map(|h| h.distinct_keys).sum(),
        in_source_duplicates,
        hours,
    }
}

/// Every check's report, as `check all` runs them.
pub struct All {
    /// `check duplicates` with its default thresholds.
    pub duplicates: Duplicates,
    /// `check partitions`.
    pub partitions: Partitions,
    /// `check reconcile`.
    pub reconcile: Reconciliation,
    /// `check freshness` at `now_us` against `max_age_s`.
    pub freshness: Freshness,
}

/// The four checks over `range`, reading the raw layer's keys and producers once for both
/// `duplicates` and `partitions`.
pub fn all(
    warehouse: &Warehouse,
    range: DayRange,
    now_us: i64,
    max_age_s: i64,
    threads: usize,
) -> Result<All, CheckError> {
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
    let columns = key_producer_hours(warehouse, &journal, with_trailing_week(range), threads)?;
    let duplicates = duplicates_of(&journal, &columns, range, DuplicateThresholds::default());
    let partitions = partitions_of(warehouse, &journal, &columns, range)?;
    drop(columns);
    Ok(All {
        duplicates,
        partitions,
        reconcile: reconcile(warehouse, range, threads)?,
        freshness: freshness(warehouse, now_us, max_age_s)?,
    })
}

/// How far back `check duplicates` looks for a producer's usual rate: a week.
pub const TRAILING_DAYS: i64 = 7;

/// The exit code of a failed partitions check.
pub const EXIT_PARTITIONS: u8 = 11;

/// Hours of one producer with no raw rows.
#[derive(Debug, Serialize)]
pub struct Gap {
    /// The producer.
    pub producer: String,
    /// Its empty hours, `YYYY-MM-DDTHH`.
    pub hours: Vec<String>,
}

/// The result of `check partitions`.
#[derive(Debug, Serialize)]
pub struct Partitions {
    /// `partitions`.
    pub check: &'static str,
    /// No gap, nothing missing, nothing stuck.
    pub passed: bool,
    /// The calendar checked: first and last hour.
    pub first_hour: Option<String>,
    /// Last hour.
    pub last_hour: Option<String>,
    /// Producers seen in the raw layer.
    pub producers: Vec<String>,
    /// Per producer, the hours of the calendar without raw rows.
    pub gaps: Vec<Gap>,
    /// Curated partitions absent although the raw layer has events for them.
    pub missing_curated: Vec<String>,
    /// A publish prepared and not committed (a stopped run; the next run finishes it).
    pub stuck_publish: Option<u64>,
    /// Files left in the staging area.
    pub staged_files: usize,
}

fn hour_string(hour: i64) -> String {
    format!(
        "{}T{:02}",
        day_string(hour.div_euclid(24)),
        hour.rem_euclid(24)
    )
}

impl Partitions {
    /// A few lines for a terminal.
    pub fn text(&self) -> String {
        let mut out = format!(
            "partitions {}: hours {} .. {}, producers {}\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.first_hour.as_deref().unwrap_or("-"),
            self.last_hour.as_deref().unwrap_or("-"),
            self.producers.join(",")
        );
        for g in &self.gaps {
            out.push_str(&format!(
                "  {}: {} empty hours: {}\n",
                g.producer,
                g.hours.len(),
                g.hours.join(" ")
            ));
        }
        for m in &self.missing_curated {
            out.push_str(&format!("  missing: {m}\n"));
        }
        if let Some(seq) = self.stuck_publish {
            out.push_str(&format!(
                "  publish {seq} prepared and not committed: run any ingest (or `check` after \
                 it) to finish it\n"
            ));
        }
        if self.staged_files > 0 {
            out.push_str(&format!("  {} files left in staging\n", self.staged_files));
        }
        out
    }
}

/// The expected calendar (every hour of `range`, or of the raw layer's first to last hour) per
/// producer against the raw layer, the curated partitions the raw layer calls for against the
/// journal, and publishes stuck midway.
pub fn partitions(
    warehouse: &Warehouse,
    range: DayRange,
    threads: usize,
) -> Result<Partitions, CheckError> {
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
    let columns = key_producer_hours(warehouse, &journal, range, threads)?;
    partitions_of(warehouse, &journal, &columns, range)
}

fn partitions_of(
    warehouse: &Warehouse,
    journal: &CommitJournal,
    columns: &[raw::KeyProducerHours],
    range: DayRange,
) -> Result<Partitions, CheckError> {
    let tombstones = Tombstones::open(&warehouse.tombstones_path())?;
    let mut present: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut hours_with_rows = BTreeSet::new();
    for (hour, key, producer) in rows_of(columns) {
        if range.contains(hour.div_euclid(24)) && !tombstones.contains(&DedupKey((*key).into())) {
            present.entry(producer.clone()).or_default().insert(hour);
            hours_with_rows.insert(hour);
        }
    }
    let first = range
        .from
        .map(|d| d * 24)
        .or_else(|| hours_with_rows.first().copied());
    let last = range
        .to
        .map(|d| d * 24 + 23)
        .or_else(|| hours_with_rows.last().copied());
    let mut gaps = Vec::new();
    if let (Some(first), Some(last)) = (first, last) {
        for (producer, hours) in &present {
            let empty: Vec<String> = (first..=last)
                .filter(|h| !hours.contains(h))
                .map(hour_string)
                .collect();
            if !empty.is_empty() {
                gaps.push(Gap {
                    producer: producer.clone(),
                    hours: empty,
                });
            }
        }
    }
    let published = journal.published();
    let mut missing_curated = Vec::new();
    let days: BTreeSet<i64> = hours_with_rows.iter().map(|h| h.div_euclid(24)).collect();
    let wanted = hours_with_rows
        .iter()
        .map(|&h| PartitionId {
            grain: Grain::Hourly,
            period: h,
        })
        .chain(days.into_iter().map(|d| PartitionId {
            grain: Grain::Daily,
            period: d,
        }));
    for id in wanted {
        if !published.contains_key(&id) || !warehouse.partition_file(&id).exists() {
            missing_curated.push(partition_name(&id));
        }
    }
    let staged_files = walkdir::WalkDir::new(warehouse.staging_dir())
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .count();
    let stuck_publish = journal.pending_publish();
    Ok(Partitions {
        check: "partitions",
        passed: gaps.is_empty()
            && missing_curated.is_empty()
            && stuck_publish.is_none()
            && staged_files == 0,
        first_hour: first.map(hour_string),
        last_hour: last.map(hour_string),
        producers: present.keys().cloned().collect(),
        gaps,
        missing_curated,
        stuck_publish,
        staged_files,
    })
}

/// The exit code of a failed freshness check.
pub const EXIT_FRESHNESS: u8 = 13;

/// How fresh one curated table is.
#[derive(Debug, Serialize)]
pub struct TableFreshness {
    /// The table.
    pub table: &'static str,
    /// Its newest partition.
    pub newest_partition: Option<String>,
    /// Seconds from the end of that partition's period to now (0 while it is still open).
    pub age_seconds: Option<i64>,
    /// Whether the age is above the limit (or the table is empty).
    pub stale: bool,
}

/// The result of `check freshness`.
#[derive(Debug, Serialize)]
pub struct Freshness {
    /// `freshness`.
    pub check: &'static str,
    /// Every table within the limit.
    pub passed: bool,
    /// The time the ages are measured at, RFC 3339.
    pub now: String,
    /// The limit, seconds.
    pub max_age_seconds: i64,
    /// Per table.
    pub tables: Vec<TableFreshness>,
    /// The newest event hour in the raw layer.
    pub newest_raw_hour: Option<String>,
    /// Hours from the newest raw hour to the newest hourly partition (0: everything read is
    /// published; more: events sit in the raw layer unpublished).
    pub curated_lag_hours: Option<i64>,
    /// Seconds since the last run that published anything (the ledger's record).
    pub last_publish_age_seconds: Option<i64>,
}

impl Freshness {
    /// A few lines for a terminal.
    pub fn text(&self) -> String {
        let mut out = format!(
            "freshness {}: at {}, limit {} s; last publish {} s ago; raw layer up to {}, curated \
             {} hours behind it\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.now,
            self.max_age_seconds,
            self.last_publish_age_seconds
                .map_or("-".to_string(), |s| s.to_string()),
            self.newest_raw_hour.as_deref().unwrap_or("-"),
            self.curated_lag_hours
                .map_or("-".to_string(), |h| h.to_string()),
        );
        for t in &self.tables {
            out.push_str(&format!(
                "  {}: newest {}, age {} s{}\n",
                t.table,
                t.newest_partition.as_deref().unwrap_or("(none)"),
                t.age_seconds.map_or("-".to_string(), |s| s.to_string()),
                if t.stale { "  STALE" } else { "" }
            ));
        }
        out
    }
}

/// The age of each table's newest partition at `now_us` (microseconds since the Unix epoch)
/// against `max_age_seconds`, the lag of the curated tables behind the raw layer, and the time
/// since the last publish.
pub fn freshness(
    warehouse: &Warehouse,
    now_us: i64,
    max_age_seconds: i64,
) -> Result<Freshness, CheckError> {
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
    let now_s = now_us.div_euclid(1_000_000);
    let mut tables = Vec::new();
    let mut newest_hour = None;
    for grain in Grain::ALL {
        let newest = journal
            .published()
            .keys()
            .filter(|id| id.grain == grain)
            .max_by_key(|id| id.period);
        // When the newest partition's period ended.
        let end_s = |id: &PartitionId| {
            let next = PartitionId {
                grain,
                period: id.period + 1,
            };
            crate::warehouse::period_start_micros(&next).div_euclid(1_000_000)
        };
        if grain == Grain::Hourly {
            newest_hour = newest.map(|id| id.period);
        }
        let age = newest.map(|id| (now_s - end_s(id)).max(0));
        tables.push(TableFreshness {
            table: table_name(grain),
            newest_partition: newest.map(partition_name),
            age_seconds: age,
            stale: age.is_none_or(|a| a > max_age_seconds),
        });
    }
    let newest_raw = newest_raw_hour(warehouse, &journal)?;
    let last_publish = crate::ledger::Ledger::open(&warehouse.ledger_path())
        .ok()
        .and_then(|ledger| {
            ledger
                .entries()
                .iter()
                .rev()
                .find(|e| !e.body.publishes.is_empty())
                .and_then(|e| chrono::DateTime::parse_from_rfc3339(&e.body.at).ok())
                .map(|at| at.timestamp())
        });
    Ok(Freshness {
        check: "freshness",
        passed: tables.iter().all(|t| !t.stale),
        now: chrono::DateTime::from_timestamp(now_s, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        max_age_seconds,
        tables,
        newest_raw_hour: newest_raw.map(hour_string),
        curated_lag_hours: newest_raw.zip(newest_hour).map(|(r, c)| (r - c).max(0)),
        last_publish_age_seconds: last_publish.map(|t| (now_s - t).max(0)),
    })
}

/// One row of the `dq_results` table: one check of one run.
#[derive(Debug, Clone)]
pub struct ResultRow {
    /// `duplicates`, `partitions`, `reconcile` or `freshness`.
    pub check: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// How many things it found (alerting hours, failing partitions, empty hours, stale tables).
    pub findings: i64,
    /// Its whole report, JSON.
    pub report: String,
    /// Figures for alerting, exported by [`metrics_text`] as `adsmetrics_check_<name>`.
    pub measures: Vec<Measure>,
}

/// One figure of a check, for a Prometheus gauge.
#[derive(Clone, Debug, PartialEq)]
pub struct Measure {
    /// The gauge's name after `adsmetrics_check_`.
    pub name: &'static str,
    /// A `table` label, for per-table figures.
    pub table: Option<&'static str>,
    /// The value.
    pub value: f64,
}

fn measure(name: &'static str, value: impl Into<f64>) -> Measure {
    Measure {
        name,
        table: None,
        value: value.into(),
    }
}

impl ResultRow {
    /// The row of a report.
    pub fn of<R: Serialize>(
        check: &'static str,
        passed: bool,
        findings: usize,
        report: &R,
    ) -> Self {
        ResultRow {
            check,
            passed,
            findings: findings as i64,
            report: serde_json::to_string(report).expect("reports serialize"),
            measures: Vec::new(),
        }
    }

    fn with(mut self, measures: impl IntoIterator<Item = Measure>) -> Self {
        self.measures.extend(measures);
        self
    }
}

/// The results of a check run in Prometheus text format, for node_exporter's textfile collector
/// (or a Pushgateway): per check `adsmetrics_check_passed`, `adsmetrics_check_findings` and
/// `adsmetrics_check_last_run_timestamp_seconds`, then each check's own figures. The alert rules
/// in `deploy/prometheus/alerts.yml` are written against these names.
pub fn metrics_text(run_at_us: i64, rows: &[ResultRow]) -> String {
    use std::fmt::Write as _;
    let mut families: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut gauge = |name: &str, labels: String, value: f64| {
        families
            .entry(format!("adsmetrics_check_{name}"))
            .or_default()
            .push(format!("{{{labels}}} {value}"));
    };
    for row in rows {
        let check = format!("check=\"{}\"", row.check);
        gauge("passed", check.clone(), f64::from(u8::from(row.passed)));
        gauge("findings", check.clone(), row.findings as f64);
        gauge(
            "last_run_timestamp_seconds",
            check.clone(),
            run_at_us as f64 / 1e6,
        );
        for m in &row.measures {
            let labels = match m.table {
                Some(t) => format!("{check},table=\"{t}\""),
                None => check.clone(),
            };
            gauge(m.name, labels, m.value);
        }
    }
    let mut out = String::new();
    for (name, samples) in families {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for sample in samples {
            let _ = writeln!(out, "{name}{sample}");
        }
    }
    out
}

/// What every check's report offers the command line: a pass/fail, lines for a terminal, its
/// `dq_results` row, and the exit code it fails with.
pub trait Report: Serialize {
    /// The exit code of a failure.
    const EXIT: u8;
    /// Whether it passed.
    fn passed(&self) -> bool;
    /// A few lines for a terminal.
    fn text(&self) -> String;
    /// Its `dq_results` row.
    fn row(&self) -> ResultRow;
}

macro_rules! report {
    ($t:ty, $exit:expr) => {
        impl Report for $t {
            const EXIT: u8 = $exit;
            fn passed(&self) -> bool {
                self.passed
            }
            fn text(&self) -> String {
                <$t>::text(self)
            }
            fn row(&self) -> ResultRow {
                <$t>::row(self)
            }
        }
    };
}

report!(Duplicates, EXIT_DUPLICATES);
report!(Partitions, EXIT_PARTITIONS);
report!(Reconciliation, EXIT_RECONCILE);
report!(Freshness, EXIT_FRESHNESS);

impl Duplicates {
    /// Its `dq_results` row.
    pub fn row(&self) -> ResultRow {
        let alerts = self.hours.iter().filter(|h| h.alert.is_some()).count();
        let max_rate = self.hours.iter().map(|h| h.rate).fold(0.0, f64::max);
        ResultRow::of(self.check, self.passed, alerts, self).with([
            measure("duplicate_rate_max", max_rate),
            measure("duplicate_alert_hours", alerts as f64),
        ])
    }
}

impl Partitions {
    /// Its `dq_results` row.
    pub fn row(&self) -> ResultRow {
        let found = self.gaps.iter().map(|g| g.hours.len()).sum::<usize>()
            + self.missing_curated.len()
            + usize::from(self.stuck_publish.is_some())
            + self.staged_files;
        let missing_hours = self.gaps.iter().map(|g| g.hours.len()).sum::<usize>();
        ResultRow::of(self.check, self.passed, found, self).with([
            measure("missing_raw_hours", missing_hours as f64),
            measure(
                "missing_curated_partitions",
                self.missing_curated.len() as f64,
            ),
            measure("stuck_publish", u8::from(self.stuck_publish.is_some())),
            measure("staged_files", self.staged_files as f64),
        ])
    }
}

impl Reconciliation {
    /// Its `dq_results` row.
    pub fn row(&self) -> ResultRow {
        ResultRow::of(self.check, self.passed, self.findings.len(), self).with([
            measure("mismatched_partitions", self.findings.len() as f64),
            measure("accounting_unbalanced", u8::from(!self.accounting.balanced)),
        ])
    }
}

impl Freshness {
    /// Its `dq_results` row.
    pub fn row(&self) -> ResultRow {
        let stale = self.tables.iter().filter(|t| t.stale).count();
        let ages = self.tables.iter().filter_map(|t| {
            Some(Measure {
                name: "table_age_seconds",
                table: Some(t.table),
                value: t.age_seconds? as f64,
            })
        });
        ResultRow::of(self.check, self.passed, stale, self)
            .with(ages)
            .with([measure("max_age_seconds", self.max_age_seconds as f64)])
    }
}

/// The `dq_results` table's directory.
pub fn results_dir(warehouse: &Warehouse) -> PathBuf {
    warehouse.root().join("dq_results")
}

/// Appends a run's checks to the `dq_results` table (`dq_results/dt=<run date>/`, one Parquet
/// file per run, placed by rename so a reader never sees half of one): `run_at` TIMESTAMP(µs,
/// UTC), `check`, `passed`, `from_day`/`to_day` (the range, null when open), `findings`, and the
/// whole report as JSON. Returns the file.
pub fn record(
    warehouse: &Warehouse,
    run_at_us: i64,
    range: DayRange,
    rows: &[ResultRow],
) -> Result<PathBuf, crate::sink::files::WriteError> {
    use arrow::array::{
        ArrayRef, BooleanArray, Int64Array, StringArray, TimestampMicrosecondArray,
    };
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let n = rows.len();
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "run_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("check", DataType::Utf8, false),
        Field::new("passed", DataType::Boolean, false),
        Field::new("from_day", DataType::Utf8, true),
        Field::new("to_day", DataType::Utf8, true),
        Field::new("findings", DataType::Int64, false),
        Field::new("report", DataType::Utf8, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMicrosecondArray::from(vec![run_at_us; n]).with_timezone("UTC")),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.check))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.passed)))),
        Arc::new(StringArray::from(vec![range.from.map(day_string); n])),
        Arc::new(StringArray::from(vec![range.to.map(day_string); n])),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.findings),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.report.as_str()),
        )),
    ];
    let batch = arrow::record_batch::RecordBatch::try_new(schema, columns)
        .expect("columns match the schema");
    let day = run_at_us.div_euclid(adsmetrics_dataflows::MICROS_PER_DAY);
    let name = format!("part-{run_at_us}-{}.parquet", std::process::id());
    let dest = results_dir(warehouse).join(day_path(day)).join(&name);
    let bytes = crate::sink::files::parquet_bytes(
        &batch,
        crate::sink::files::base_writer_properties().build(),
        &dest,
    )?;
    let staged = warehouse.meta_dir().join("dq-staging").join(&name);
    crate::sink::files::replace(&staged, &dest, &bytes)?;
    Ok(dest)
}
