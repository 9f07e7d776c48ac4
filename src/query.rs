//! The query API over `ads_clicks_minute`: an ad's clicks over a range of minutes, and the most
//! clicked ads of the last minutes, each optionally through a named filter.
//!
//! ```text
//!  commit journal ──follow (never written)──▶ the published minute partitions (one file per hour)
//!        │ every refresh: the records appended since; an hour whose version changed is read
//!        │ again, and must be the journal's version (else a newer publish is landing: retried)
//!        ▼
//!  Snapshot, swapped whole (a query never sees half a publish; it names the publish it read)
//!    per hour: per minute and per filter, (ad index, clicks) sorted by ad; the hour's totals
//!    ads: an append-only dictionary ad_id → dense index, so a top-N adds into an array
//!        ▼
//!  GET /v1/ads/{ad_id}/aggregated_count?from&to&filter    GET /v1/ads/popular_ads?count&window&filter
//! ```
//!
//! Ranges are half-open, `[from, to)`, in whole UTC minutes: the default (`from` = now − 1 min,
//! `to` = now) is the last complete minute. Filters are named in a JSON file (`serve --filters`),
//! each a conjunction of equalities on the click's country, IP and user; an unknown name is a 400
//! that lists the known ones. Counts are exact: they are sums of the published rows, which the
//! dataflow keeps exact through duplicates, late clicks, corrections and deletes.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use adsmetrics_dataflows::{Country, Dims, Grain, Ip, MetricRow, PartitionId};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::journal::CommitJournal;
use crate::sink::curated::PublishedReadError;
use crate::warehouse::Warehouse;

/// Most ads one `popular_ads` answer lists.
pub const MAX_COUNT: usize = 1000;

/// What went wrong setting the query API up or refreshing it.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The filters file is unreadable or wrong.
    #[error("filters {path}: {detail}")]
    Filters {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The commit journal could not be read.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// A published partition file could not be read.
    #[error(transparent)]
    Partition(#[from] PublishedReadError),
}

/// One named filter as written in the filters file: every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// ISO 3166 alpha-2 country of the viewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// The viewer's IP address (any textual form; compared as an address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The viewer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
}

/// The filters file: `{"filters": {"<name>": {"country": "US"}, …}}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FiltersFile {
    /// The filters by name.
    pub filters: BTreeMap<String, FilterSpec>,
}

/// A filter, parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Filter {
    country: Option<Country>,
    ip: Option<Ip>,
    user_id: Option<i64>,
}

impl Filter {
    fn matches(&self, dims: &Dims) -> bool {
        self.country.is_none_or(|c| c == dims.country)
            && self.ip.is_none_or(|ip| ip == dims.click.ip)
            && self.user_id.is_none_or(|u| u == dims.click.user_id)
    }
}

/// The named filters. Index 0 of every per-filter table is "no filter"; filter `i` is at `i + 1`.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    names: Vec<String>,
    filters: Vec<Filter>,
}

impl Filters {
    /// Parses and checks the filters file's contents.
    pub fn parse(json: &str) -> Result<Self, String> {
        let file: FiltersFile = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut out = Filters::default();
        for (name, spec) in file.filters {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            {
                return Err(format!(
                    "filter name {name:?}: use letters, digits, '_', '-' and '.'"
                ));
            }
            let filter = Filter {
                country: match &spec.country {
                    None => None,
                    Some(c) => Some(Country::parse(c).ok_or_else(|| {
                        format!("filter {name:?}: country {c:?} is not two upper-case letters")
                    })?),
                },
                ip: match &spec.ip {
                    None => None,
                    Some(ip) => Some(Ip::parse(ip).ok_or_else(|| {
                        format!("filter {name:?}: ip {ip:?} is not an IPv4 or IPv6 address")
                    })?),
                },
                user_id: spec.user_id,
            };
            if filter == Filter::default() {
                return Err(format!(
                    "filter {name:?} sets none of country, ip, user_id (omit the filter instead)"
                ));
            }
            out.names.push(name);
            out.filters.push(filter);
        }
        Ok(out)
    }

    /// Reads the filters file at `path`.
    pub fn load(path: &Path) -> Result<Self, QueryError> {
        let err = |detail: String| QueryError::Filters {
            path: path.to_path_buf(),
            detail,
        };
        let json = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Filters::parse(&json).map_err(err)
    }

    /// The table index of a filter name (`None`: no filter, index 0).
    fn index(&self, name: Option<&str>) -> Result<usize, String> {
        let Some(name) = name else { return Ok(0) };
        match self.names.iter().position(|n| n == name) {
            Some(i) => Ok(i + 1),
            None if self.names.is_empty() => Err(format!(
                "unknown filter {name:?}: this server has no filters (serve --filters FILE)"
            )),
            None => Err(format!(
                "unknown filter {name:?}; known: {}",
                self.names.join(", ")
            )),
        }
    }

    /// The table indexes of the filters a row matches, 0 (no filter) first.
    fn matching<'a>(&'a self, dims: &'a Dims) -> impl Iterator<Item = usize> + 'a {
        std::iter::once(0).chain(
            self.filters
                .iter()
                .enumerate()
                .filter(|(_, f)| f.matches(dims))
                .map(|(i, _)| i + 1),
        )
    }
}

/// Clicks per ad (by dense index), sorted by index. Eight bytes a pair: a `popular_ads` over a
/// day reads every hour's pairs, so their size is its time. One ad's clicks in one hour fit a
/// `u32` by far (4.3 billion; the seed's whole scale is 7.2 billion events an hour).
type Counts = Vec<(u32, u32)>;

/// One published hour of `ads_clicks_minute`, indexed.
#[derive(Debug)]
struct Hour {
    /// The partition version it was read at.
    version: String,
    /// `[minute of the hour][filter]`.
    minutes: Vec<Vec<Counts>>,
    /// `[filter]`: the whole hour.
    total: Vec<Counts>,
}

/// The ad ids seen, each with a dense index that never changes (so an hour indexed once stays
/// valid in later snapshots). Grows with the distinct ads a server has seen; never shrinks.
#[derive(Clone, Debug, Default)]
struct Ads {
    ids: Vec<i64>,
    index: HashMap<i64, u32>,
}

impl Ads {
    /// The index of `ad_id`, added if new. The dictionary is shared with the snapshot being
    /// replaced: it is copied only when an ad is new, not at every refresh.
    fn index_of(ads: &mut Arc<Ads>, ad_id: i64) -> u32 {
        if let Some(&index) = ads.index.get(&ad_id) {
            return index;
        }
        let ads = Arc::make_mut(ads);
        let next = ads.ids.len() as u32;
        ads.ids.push(ad_id);
        ads.index.insert(ad_id, next);
        next
    }
}

/// Sorts and adds up `(ad, clicks)` pairs.
fn compact(mut counts: Vec<(u32, i64)>) -> Counts {
    counts.sort_unstable_by_key(|(ad, _)| *ad);
    let mut out: Vec<(u32, i64)> = Vec::with_capacity(counts.len());
    for (ad, clicks) in counts {
        match out.last_mut() {
            Some((last, sum)) if *last == ad => *sum += clicks,
            _ => out.push((ad, clicks)),
        }
    }
    out.into_iter()
        .map(|(ad, clicks)| (ad, u32::try_from(clicks).unwrap_or(u32::MAX)))
        .collect()
}

impl Hour {
    fn index(
        version: String,
        rows: &[(Dims, MetricRow)],
        filters: &Filters,
        ads: &mut Arc<Ads>,
    ) -> Self {
        let tables = filters.filters.len() + 1;
        let mut minutes: Vec<Vec<Vec<(u32, i64)>>> = vec![vec![Vec::new(); tables]; 60];
        for (dims, row) in rows {
            let ad = Ads::index_of(ads, dims.ad_id);
            let minute = &mut minutes[usize::from(dims.click.minute.min(59))];
            for f in filters.matching(dims) {
                minute[f].push((ad, row.clicks));
            }
        }
        let minutes: Vec<Vec<Counts>> = minutes
            .into_iter()
            .map(|m| m.into_iter().map(compact).collect())
            .collect();
        let total = (0..tables)
            .map(|f| {
                compact(
                    minutes
                        .iter()
                        .flat_map(|m| m[f].iter().map(|&(ad, c)| (ad, i64::from(c))))
                        .collect(),
                )
            })
            .collect();
        Hour {
            version,
            minutes,
            total,
        }
    }

    /// The counts of filter `f` over the minutes `range` (absolute) of this hour (starting at
    /// minute `start`).
    fn parts(&self, start: i64, range: &Range<i64>, f: usize) -> Vec<&Counts> {
        let (from, to) = (range.start.max(start), range.end.min(start + 60));
        if from <= start && to >= start + 60 {
            return vec![&self.total[f]];
        }
        (from..to)
            .map(|m| &self.minutes[(m - start) as usize][f])
            .collect()
    }
}

/// What the query API answers from: every retained hour at one committed publish.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The committed publish it reflects (0: nothing published yet).
    pub publish: u64,
    /// The first minute it holds (older hours are not retained).
    pub first_minute: i64,
    hours: BTreeMap<i64, Arc<Hour>>,
    ads: Arc<Ads>,
}

thread_local! {
    /// A `popular_ads` accumulator per thread: clicks by dense ad index, all zero between uses.
    static ACCUMULATOR: std::cell::RefCell<Vec<i64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Snapshot {
    /// Every part (an hour's totals or one minute's counts) of filter `f` over `range`.
    fn parts(&self, range: &Range<i64>, f: usize) -> Vec<&Counts> {
        if range.is_empty() {
            return Vec::new();
        }
        let hours = range.start.div_euclid(60)..=(range.end - 1).div_euclid(60);
        self.hours
            .range(hours)
            .flat_map(|(hour, data)| data.parts(hour * 60, range, f))
            .collect()
    }

    /// Clicks of `ad_id` in the minutes `range` through filter index `f`.
    fn count(&self, ad_id: i64, range: &Range<i64>, f: usize) -> i64 {
        let Some(&ad) = self.ads.index.get(&ad_id) else {
            return 0;
        };
        self.parts(range, f)
            .into_iter()
            .filter_map(|counts| {
                counts
                    .binary_search_by_key(&ad, |(a, _)| *a)
                    .ok()
                    .map(|i| i64::from(counts[i].1))
            })
            .sum()
    }

    /// The `n` ads with the most clicks in `range` through filter index `f`, most first, ties by
    /// ascending ad id; ads without clicks are not listed.
    ///
    /// Adds every part into an array indexed by ad, then keeps the best `n` in a bounded heap
    /// while reading the sums back (and zeroing them for the next query). A window with few
    /// pairs remembers which ads it touched; a large one reads the whole array back instead
    /// (cheaper than a branch per pair).
    fn popular(&self, n: usize, range: &Range<i64>, f: usize) -> Vec<(i64, i64)> {
        let parts = self.parts(range, f);
        let pairs: usize = parts.iter().map(|p| p.len()).sum();
        let ads = self.ads.ids.len();
        ACCUMULATOR.with_borrow_mut(|sums| {
            if sums.len() < ads {
                sums.resize(ads, 0);
            }
            let mut best = TopN::new(n);
            let mut offer = |ad: u32, sums: &mut Vec<i64>| {
                let clicks = std::mem::take(&mut sums[ad as usize]);
                if clicks > 0 {
                    best.offer(clicks, self.ads.ids[ad as usize]);
                }
            };
            if pairs < ads / 4 {
                let mut touched: Vec<u32> = Vec::with_capacity(pairs);
                for counts in parts {
                    for &(ad, clicks) in counts {
                        let sum = &mut sums[ad as usize];
                        if *sum == 0 {
                            touched.push(ad);
                        }
                        *sum += i64::from(clicks);
                    }
                }
                for ad in touched {
                    offer(ad, sums);
                }
            } else {
                for counts in parts {
                    for &(ad, clicks) in counts {
                        sums[ad as usize] += i64::from(clicks);
                    }
                }
                for ad in 0..ads as u32 {
                    offer(ad, sums);
                }
            }
            best.into_sorted()
        })
    }
}

/// The best `n` (clicks, ad id) seen: most clicks first, ties by the lower ad id.
struct TopN {
    n: usize,
    /// A min-heap on the ranking: its top is the worst of the best `n` so far.
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Ranked>>,
}

/// Orders by clicks, then by the lower ad id first.
#[derive(PartialEq, Eq)]
struct Ranked(i64, i64);

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl TopN {
    fn new(n: usize) -> Self {
        TopN {
            n,
            heap: std::collections::BinaryHeap::with_capacity(n + 1),
        }
    }

    fn offer(&mut self, clicks: i64, ad_id: i64) {
        let candidate = Ranked(clicks, ad_id);
        if self.heap.len() < self.n {
            self.heap.push(std::cmp::Reverse(candidate));
        } else if self
            .heap
            .peek()
            .is_some_and(|std::cmp::Reverse(worst)| candidate > *worst)
        {
            self.heap.pop();
            self.heap.push(std::cmp::Reverse(candidate));
        }
    }

    /// `(ad id, clicks)`, best first.
    fn into_sorted(self) -> Vec<(i64, i64)> {
        let mut out: Vec<Ranked> = self.heap.into_iter().map(|r| r.0).collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        out.into_iter().map(|Ranked(c, ad)| (ad, c)).collect()
    }
}

/// Where "now" comes from: the system clock, or a fixed minute (replays, tests).
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// The system clock.
    System,
    /// Always this minute (minutes since the Unix epoch).
    Fixed(i64),
}

impl Clock {
    /// The current minute since the Unix epoch.
    pub fn minute(&self) -> i64 {
        match self {
            Clock::System => chrono::Utc::now().timestamp().div_euclid(60),
            Clock::Fixed(minute) => *minute,
        }
    }
}

/// How the query API is set up.
#[derive(Clone, Debug)]
pub struct QueryOptions {
    /// The warehouse whose `ads_clicks_minute` it serves.
    pub warehouse: PathBuf,
    /// The named filters.
    pub filters: Filters,
    /// Hours kept in memory, up to and including the current one.
    pub retention_hours: i64,
    /// How often the journal is checked for new publishes.
    pub refresh: Duration,
    /// What "now" is.
    pub clock: Clock,
}

/// The live query state: the current snapshot and how it is refreshed.
pub struct ClickQueries {
    options: QueryOptions,
    warehouse: Warehouse,
    journal: Mutex<CommitJournal>,
    current: RwLock<Arc<Snapshot>>,
    /// The last load did not finish (a read error, or a publish landing): the next refresh loads
    /// again even if the journal did not move.
    stale: std::sync::atomic::AtomicBool,
}

impl ClickQueries {
    /// Follows the warehouse's journal and loads the retained hours. A warehouse with nothing
    /// published yet is an empty snapshot, not an error; so is one whose partitions cannot be
    /// read now (logged, and loaded again at the next refresh): the clicks the same server takes
    /// must not wait for the query API. Only a journal that cannot be read is an error.
    pub fn open(options: QueryOptions) -> Result<Self, QueryError> {
        let warehouse = Warehouse::new(&options.warehouse);
        let journal = CommitJournal::follow(warehouse.root(), &warehouse.journal_path())?;
        let queries = ClickQueries {
            options,
            warehouse,
            journal: Mutex::new(journal),
            current: RwLock::new(Arc::new(Snapshot::default())),
            stale: std::sync::atomic::AtomicBool::new(true),
        };
        if let Err(e) = queries.load() {
            tracing::warn!(error = %e, "the query API starts empty; it loads again at the next refresh");
        }
        Ok(queries)
    }

    /// The snapshot queries read now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .expect("no reader panics holding the lock")
            .clone()
    }

    /// Reads the journal's new records and, if the published minute partitions changed, swaps
    /// in a new snapshot; whether it did.
    pub fn refresh(&self) -> Result<bool, QueryError> {
        let changed = self
            .journal
            .lock()
            .expect("one refresher at a time")
            .catch_up()?;
        let old = self.snapshot();
        let first_hour = self.first_hour();
        let stale = self.stale.load(std::sync::atomic::Ordering::Relaxed);
        if !changed && !stale && old.first_minute == first_hour * 60 {
            return Ok(false);
        }
        self.load()
    }

    /// The first hour held: `retention_hours` hours up to the current one, counted from the
    /// minute before now, so that the default range `[now − 1, now)` is always held.
    fn first_hour(&self) -> i64 {
        (self.options.clock.minute() - 1).div_euclid(60) - (self.options.retention_hours - 1)
    }

    /// Builds the snapshot of the journal's current published state, reusing the hours whose
    /// version did not change. A file that is not the journal's version means a publish landed
    /// after the journal was read: nothing is swapped, and the next refresh tries again.
    fn load(&self) -> Result<bool, QueryError> {
        use std::sync::atomic::Ordering;
        self.stale.store(true, Ordering::Relaxed);
        let journal = self.journal.lock().expect("one refresher at a time");
        let old = self.snapshot();
        let first_hour = self.first_hour();
        let mut ads = old.ads.clone();
        let mut hours = BTreeMap::new();
        let from = PartitionId {
            grain: Grain::Minute,
            period: first_hour,
        };
        let to = PartitionId {
            grain: Grain::Minute,
            period: i64::MAX,
        };
        for (id, published) in journal.published().range(from..=to) {
            if let Some(hour) = old
                .hours
                .get(&id.period)
                .filter(|h| h.version == published.version)
            {
                hours.insert(id.period, hour.clone());
                continue;
            }
            let path = self.warehouse.partition_file(id);
            let rows = match crate::sink::curated::read_published(&path, id, &published.version) {
                Ok(rows) => rows,
                Err(e @ PublishedReadError::OtherVersion { .. }) => {
                    tracing::debug!(error = %e, "a newer publish is landing; retrying");
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            };
            let hour = Hour::index(
                published.version.clone(),
                &rows,
                &self.options.filters,
                &mut ads,
            );
            hours.insert(id.period, Arc::new(hour));
        }
        let snapshot = Snapshot {
            publish: journal.last_commit(),
            first_minute: first_hour * 60,
            hours,
            ads,
        };
        *self
            .current
            .write()
            .expect("no reader panics holding the lock") = Arc::new(snapshot);
        self.stale.store(false, Ordering::Relaxed);
        Ok(true)
    }
}

/// Refreshes `queries` every `options.refresh` until dropped; a failed refresh is logged and
/// the snapshot kept (queries go on answering from the last good publish).
pub fn refresher(queries: Arc<ClickQueries>) -> std::io::Result<crate::periodic::Periodic> {
    let every = queries.options.refresh;
    crate::periodic::Periodic::start("query-refresh", every, move || {
        if let Err(e) = queries.refresh() {
            tracing::warn!(error = %e, "query API refresh failed; serving the last snapshot");
        }
    })
}

/// A minute as RFC 3339, `2026-12-06T09:47:00Z`.
fn minute_string(minute: i64) -> String {
    chrono::DateTime::from_timestamp(minute * 60, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| minute.to_string())
}

/// Parses a minute: RFC 3339 (`2026-12-06T09:47:00Z`, any offset) or a UTC `2026-12-06T09:47`;
/// seconds are floored to their minute.
pub fn parse_minute(s: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp().div_euclid(60));
    }
    for format in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc().timestamp().div_euclid(60));
        }
    }
    Err(format!(
        "{s:?} is not a minute: use RFC 3339 (2026-12-06T09:47:00Z) or UTC 2026-12-06T09:47"
    ))
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// Checks that `range` lies in what the snapshot holds.
fn check_range(snapshot: &Snapshot, range: &Range<i64>) -> Result<(), String> {
    if range.end < range.start {
        return Err(format!(
            "to ({}) is before from ({})",
            minute_string(range.end),
            minute_string(range.start)
        ));
    }
    if range.start < snapshot.first_minute {
        return Err(format!(
            "from ({}) is before {}, the oldest minute this server holds (serve --query-hours)",
            minute_string(range.start),
            minute_string(snapshot.first_minute)
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct CountParams {
    from: Option<String>,
    to: Option<String>,
    filter: Option<String>,
}

#[derive(Serialize)]
struct CountAnswer {
    ad_id: i64,
    count: i64,
    from: String,
    to: String,
    filter: Option<String>,
    publish: u64,
}

async fn aggregated_count(
    State(queries): State<Arc<ClickQueries>>,
    UrlPath(ad_id): UrlPath<String>,
    params: Result<Query<CountParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return bad_request("bad query string".into());
    };
    let Ok(ad_id) = ad_id.parse::<i64>() else {
        return bad_request(format!("ad id {ad_id:?} is not an integer"));
    };
    let now = queries.options.clock.minute();
    let minute = |s: &Option<String>, default: i64| s.as_deref().map_or(Ok(default), parse_minute);
    let (from, to) = match (minute(&params.from, now - 1), minute(&params.to, now)) {
        (Ok(from), Ok(to)) => (from, to),
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    let f = match queries.options.filters.index(params.filter.as_deref()) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    let snapshot = queries.snapshot();
    let range = from..to;
    if let Err(e) = check_range(&snapshot, &range) {
        return bad_request(e);
    }
    axum::Json(CountAnswer {
        ad_id,
        count: snapshot.count(ad_id, &range, f),
        from: minute_string(from),
        to: minute_string(to),
        filter: params.filter,
        publish: snapshot.publish,
    })
    .into_response()
}

#[derive(Deserialize)]
struct PopularParams {
    count: Option<String>,
    window: Option<String>,
    filter: Option<String>,
}

#[derive(Serialize)]
struct AdCount {
    ad_id: i64,
    count: i64,
}

#[derive(Serialize)]
struct PopularAnswer {
    ads: Vec<AdCount>,
    from: String,
    to: String,
    filter: Option<String>,
    publish: u64,
}

async fn popular_ads(
    State(queries): State<Arc<ClickQueries>>,
    params: Result<Query<PopularParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return bad_request("bad query string".into());
    };
    let max_window = queries.options.retention_hours * 60;
    let n = match params.count.as_deref().map_or(Ok(10), str::parse::<usize>) {
        Ok(n) if (1..=MAX_COUNT).contains(&n) => n,
        _ => return bad_request(format!("count must be an integer from 1 to {MAX_COUNT}")),
    };
    let window = match params.window.as_deref().map_or(Ok(1), str::parse::<i64>) {
        Ok(w) if (1..=max_window).contains(&w) => w,
        _ => {
            return bad_request(format!(
                "window must be a number of minutes from 1 to {max_window}"
            ))
        }
    };
    let f = match queries.options.filters.index(params.filter.as_deref()) {
        Ok(f) => f,
        Err(e) => return bad_request(e),
    };
    let now = queries.options.clock.minute();
    let snapshot = queries.snapshot();
    // The window ends at the current minute; retention holds whole hours, so the oldest
    // minute a full window needs is held unless the hour just turned: clip to what is held.
    let range = (now - window).max(snapshot.first_minute)..now;
    let ads = snapshot
        .popular(n, &range, f)
        .into_iter()
        .map(|(ad_id, count)| AdCount { ad_id, count })
        .collect();
    axum::Json(PopularAnswer {
        ads,
        from: minute_string(range.start),
        to: minute_string(range.end),
        filter: params.filter,
        publish: snapshot.publish,
    })
    .into_response()
}

/// The query API's routes, over `queries`.
pub fn router(queries: Arc<ClickQueries>) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/ads/{ad_id}/aggregated_count",
            axum::routing::get(aggregated_count),
        )
        .route("/v1/ads/popular_ads", axum::routing::get(popular_ads))
        .with_state(queries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use adsmetrics_dataflows::ClickDims;

    fn row(minute: u8, ad_id: i64, country: &str, user_id: i64, clicks: i64) -> (Dims, MetricRow) {
        (
            Dims {
                advertiser_id: 1,
                campaign_id: 2,
                ad_id,
                country: Country::parse(country).unwrap(),
                click: ClickDims {
                    minute,
                    ip: Ip::parse("10.0.0.1").unwrap(),
                    user_id,
                },
            },
            MetricRow {
                clicks,
                ..Default::default()
            },
        )
    }

    fn snapshot(filters: &Filters) -> Snapshot {
        let mut ads = Arc::new(Ads::default());
        let rows = [
            row(0, 7, "US", 1, 2),
            row(0, 5, "DE", 1, 1),
            row(1, 5, "US", 2, 3),
            row(59, 9, "US", 3, 3),
        ];
        let hour = Hour::index("v".into(), &rows, filters, &mut ads);
        Snapshot {
            publish: 1,
            first_minute: 0,
            hours: [(10, Arc::new(hour))].into(),
            ads,
        }
    }

    #[test]
    fn counts_and_top_ads_follow_ranges_filters_and_ties() {
        let filters = Filters::parse(r#"{"filters": {"us": {"country": "US"}}}"#).unwrap();
        let s = snapshot(&filters);
        let hour = 600..660;
        assert_eq!(s.count(5, &hour, 0), 4);
        assert_eq!(s.count(5, &hour, 1), 3);
        assert_eq!(s.count(5, &(600..601), 0), 1);
        assert_eq!(s.count(5, &(601..602), 0), 3);
        assert_eq!(s.count(5, &(602..660), 0), 0);
        assert_eq!(s.count(42, &hour, 0), 0);
        // 5 and 9 tie at 3 in the US: the lower id first.
        assert_eq!(s.popular(2, &hour, 1), [(5, 3), (9, 3)]);
        assert_eq!(s.popular(10, &hour, 0), [(5, 4), (9, 3), (7, 2)]);
        assert_eq!(s.popular(10, &(600..601), 0), [(7, 2), (5, 1)]);
        assert!(s.popular(10, &(0..10), 0).is_empty());
    }

    #[test]
    fn filters_are_checked_and_unknown_names_listed() {
        for bad in [
            r#"{"filters": {"x": {}}}"#,
            r#"{"filters": {"x": {"country": "usa"}}}"#,
            r#"{"filters": {"x": {"ip": "1.2.3"}}}"#,
            r#"{"filters": {"x y": {"user_id": 1}}}"#,
            r#"{"filters": {"x": {"city": "Paris"}}}"#,
        ] {
            assert!(Filters::parse(bad).is_err(), "{bad}");
        }
        let filters =
            Filters::parse(r#"{"filters": {"a": {"user_id": 1}, "b": {"ip": "::1"}}}"#).unwrap();
        assert_eq!(filters.index(None), Ok(0));
        assert_eq!(filters.index(Some("b")), Ok(2));
        let e = filters.index(Some("c")).unwrap_err();
        assert!(e.contains("known: a, b"), "{e}");
    }

    #[test]
    fn minutes_parse_in_both_forms_and_floor_seconds() {
        let m = parse_minute("2026-12-06T09:47:00Z").unwrap();
        assert_eq!(parse_minute("2026-12-06T09:47").unwrap(), m);
        assert_eq!(parse_minute("2026-12-06T09:47:59").unwrap(), m);
        assert_eq!(parse_minute("2026-12-06T10:47:00+01:00").unwrap(), m);
        assert_eq!(minute_string(m), "2026-12-06T09:47:00Z");
        assert!(parse_minute("yesterday").is_err());
    }
}
