//! The synthetic data generator behind `adsmetrics generate`: realistic, messy, reproducible input.
//!
//! # What it writes
//! Hive-style folders keyed by the *delivery* hour (the hour whose batch a record arrived in, not
//! its event time):
//! `out_dir/dt=YYYY-MM-DD/hr=HH/producer=<p>/part-<NNNN>.parquet|.jsonl`, and exact byte copies of
//! a few whole files as `part-<NNNN>-replay.<ext>` next to their original. Producers are `web`,
//! `ios`, `android` and `server`; with [`Format::Mixed`] web and server write Parquet, ios and
//! android write JSON Lines. Files are written under a `.tmp` name and renamed when complete;
//! files that would be empty are not written. Deliveries run up to [`SPILL_HOURS`] hours past the
//! last event hour (late events, resends and corrections of the last hours).
//!
//! # The data
//! `events` distinct logical events spread evenly over `hours` hours starting at `start`, split
//! 35/25/25/15 % over web/ios/android/server and evenly over each producer's files of an hour.
//! Event ids are `<producer>-<n>` with `n` the event's global index (unique per producer). Types are
//! ~90 % impressions, ~9 % clicks, ~1 % conversions; impressions and clicks carry `cost_micros`,
//! conversions `revenue_micros` (the other is null). Ads follow a Zipf law over `1..=ads` (ranks
//! scattered over the id space), campaign and advertiser are functions of the ad
//! ([`campaign_of`], [`advertiser_of`]), countries a Zipf-like law over [`COUNTRIES`], users are
//! uniform over `1..=users` and the IPv4 address is a function of the user ([`ip_of`]).
//!
//! # The mess (each independently, per distinct event)
//! - late (`late_rate`): delivered 1–2 hours after its event hour, in any file of that producer;
//! - resent (`resend_rate`): the identical record again 1–2 hours after its first delivery;
//! - corrected (`correction_rate`, events with an id only): `revision` 1 and a changed amount
//!   (cost, or revenue for conversions) 1–2 hours after its first delivery;
//! - without id (`missing_id_rate`): `event_id` null; its resends are identical, so they share the
//!   content key;
//! - bad (`bad_rate`): one extra invalid record derived from the event (id `<producer>-bad-<n>`)
//!   in the same file as the event's on-time records. JSON Lines files get any of invalid country
//!   `../x`, negative cost, unknown event type `view`, missing `ad_id`, non-UTF-8 bytes in the
//!   country, or a truncated line. Parquet is typed, so Parquet files get only the bad *values*
//!   (country `../x`, negative cost, event type `view`), written as a hand-built batch with the
//!   exact schema of [`schema::event_schema`];
//! - replayed (`replayed_files`): whole files copied byte for byte under a `-replay` name.
//!
//! In JSON Lines, nullable fields are written as `null`, `revision` is omitted when 0 (absent
//! means 0), and `event_time` alternates line by line between an RFC 3339 string with six
//! fractional digits (`2026-11-01T00:12:34.567891Z`) and an integer of epoch microseconds.
//!
//! # Guarantees
//! - Deterministic: the same configuration gives byte-identical files, whatever the number of
//!   threads. Each file's records come from its own ChaCha8 stream (`seed`, stream = file index);
//!   records deferred to a later file are appended after that file's on-time records in a fixed
//!   order (source file, then generation order).
//! - Streaming: records are generated and written in chunks of [`CHUNK_ROWS`]; memory is bounded by
//!   the worker threads' open files (at most one Parquet row group each) and the records deferred
//!   to later hours (a few percent of a few hours), not by the size of the run: 10M events over 24
//!   hours run in about 70 MB.
//! - Never mixes runs: the output directory must be missing or empty.
//! - Consistent: [`generate_events`] returns exactly the valid records the files hold, in delivery
//!   order, and the summary's counts add up:
//!   `records = distinct_events + resends + corrections + replayed_records + bad_records`.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use adsmetrics_dataflows::{Country, EventType, MICROS_PER_HOUR};
use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use rand::distr::Distribution;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Zipf;

use crate::event::Event;
use crate::schema;

/// The producers, in delivery order within an hour.
pub const PRODUCERS: [&str; 4] = ["web", "ios", "android", "server"];

/// Cumulative share of the events of an hour per producer, in percent.
const PRODUCER_SHARE: [u64; 5] = [0, 35, 60, 85, 100];

/// The countries events come from, most frequent first (weight `1/rank`).
pub const COUNTRIES: [&str; 20] = [
    "US", "IN", "GB", "DE", "BR", "FR", "JP", "CA", "MX", "ID", "IT", "ES", "AU", "KR", "NL", "TR",
    "PL", "SE", "ZA", "AR",
];

/// Rows generated and written at a time (one Arrow batch, one progress report).
pub const CHUNK_ROWS: usize = 16_384;

/// Largest delay, in hours, of a late event's delivery after its event hour.
const MAX_LATE_HOURS: u32 = 2;
/// Largest delay, in hours, of a resend or correction after the event's first delivery.
const MAX_REDELIVERY_HOURS: u32 = 2;
/// Hours after the last event hour that can still receive deliveries.
pub const SPILL_HOURS: u32 = MAX_LATE_HOURS + MAX_REDELIVERY_HOURS;

/// Largest `--files-per-hour` (file numbers have four digits).
const MAX_FILES_PER_HOUR: u32 = 10_000;
/// Largest `hours × files_per_hour` (a run of at most 4M files per producer).
const MAX_FILE_SLOTS: u64 = 1 << 22;

/// `event_type` draw thresholds over `u32`: below the first an impression, below the second a click.
const IMPRESSION_BELOW: u32 = (0.90 * 4_294_967_296.0) as u32;
const CLICK_BELOW: u32 = (0.99 * 4_294_967_296.0) as u32;

/// Hours since the Unix epoch of 2200-01-01T00:00:00Z, where the decoder's time range ends.
const LAST_HOUR_END: i64 = 84_006 * 24;

/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 1 << 20;

/// Settings of one `adsmetrics generate` run. Every field is a flag with a default.
#[derive(Clone, Debug, clap::Args)]
pub struct GenerateConfig {
    /// Distinct logical events to generate (before resends, corrections, replays, bad records).
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Seed of the random streams; the same settings and seed give byte-identical files.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// First event hour, RFC 3339 (floored to the hour) or YYYY-MM-DD (midnight UTC).
    #[arg(long, default_value = "2026-11-01")]
    pub start: String,
    /// Hours of event time covered.
    #[arg(long, default_value_t = 24)]
    pub hours: u32,
    /// Number of distinct ads (ids 1..=ads), with Zipf-skewed popularity.
    #[arg(long, default_value_t = 10_000)]
    pub ads: u64,
    /// Exponent of the Zipf law of ad popularity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Number of distinct users (ids 1..=users), uniform.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: u64,
    /// Fraction of events re-sent, identical, in a file of a later hour.
    #[arg(long, default_value_t = 0.05)]
    pub resend_rate: f64,
    /// Number of whole files written again as exact copies (`part-NNNN-replay.<ext>`).
    #[arg(long, default_value_t = 2)]
    pub replayed_files: u32,
    /// Fraction of events delivered in a file of a later hour than their event time.
    #[arg(long, default_value_t = 0.02)]
    pub late_rate: f64,
    /// Fraction of events without an event_id.
    #[arg(long, default_value_t = 0.01)]
    pub missing_id_rate: f64,
    /// Fraction of events (with an id) re-sent later with revision 1 and a changed amount.
    #[arg(long, default_value_t = 0.001)]
    pub correction_rate: f64,
    /// Rate of extra invalid records (bad country, negative cost, unknown type, missing field,
    /// non-UTF-8, broken JSON; Parquet files get only the first three).
    #[arg(long, default_value_t = 0.001)]
    pub bad_rate: f64,
    /// File format: parquet, jsonl, or mixed (web and server Parquet, ios and android JSON Lines).
    #[arg(long, value_enum, default_value_t = Format::Mixed)]
    pub format: Format,
    /// Files per producer per delivery hour.
    #[arg(long, default_value_t = 1)]
    pub files_per_hour: u32,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            events: 100_000,
            seed: 42,
            start: "2026-11-01".into(),
            hours: 24,
            ads: 10_000,
            zipf: 1.1,
            users: 1_000_000,
            resend_rate: 0.05,
            replayed_files: 2,
            late_rate: 0.02,
            missing_id_rate: 0.01,
            correction_rate: 0.001,
            bad_rate: 0.001,
            format: Format::Mixed,
            files_per_hour: 1,
        }
    }
}

/// Which file format each producer writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Every producer writes Parquet.
    Parquet,
    /// Every producer writes JSON Lines.
    Jsonl,
    /// web and server write Parquet, ios and android JSON Lines.
    Mixed,
}

impl Format {
    /// Whether `producer` (an index into [`PRODUCERS`]) writes Parquet under this format.
    fn parquet_for(self, producer: usize) -> bool {
        match self {
            Format::Parquet => true,
            Format::Jsonl => false,
            Format::Mixed => matches!(PRODUCERS[producer], "web" | "server"),
        }
    }
}

/// What a run produced. `records` counts every row of every file written, replays included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GenerateSummary {
    /// Files written, replay copies included.
    pub files: u64,
    /// Rows written over all files (valid and bad, replay copies included).
    pub records: u64,
    /// Distinct logical events (each delivered at least once).
    pub distinct_events: u64,
    /// Identical re-sends of an event in a later file.
    pub resends: u64,
    /// Replay copies written.
    pub replayed_files: u64,
    /// Rows in the replay copies.
    pub replayed_records: u64,
    /// Events whose first delivery is in a later hour than their event time.
    pub late: u64,
    /// Corrected versions (revision 1) sent.
    pub corrections: u64,
    /// Distinct events without an event_id.
    pub missing_ids: u64,
    /// Invalid records written.
    pub bad_records: u64,
    /// Bytes written over all files, replay copies included.
    pub bytes: u64,
}

impl GenerateSummary {
    fn add(&mut self, o: &GenerateSummary) {
        self.files += o.files;
        self.records += o.records;
        self.distinct_events += o.distinct_events;
        self.resends += o.resends;
        self.replayed_files += o.replayed_files;
        self.replayed_records += o.replayed_records;
        self.late += o.late;
        self.corrections += o.corrections;
        self.missing_ids += o.missing_ids;
        self.bad_records += o.bad_records;
        self.bytes += o.bytes;
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A setting is out of range or unparsable.
    #[error("invalid generate settings: {0}")]
    InvalidConfig(String),
    /// The output directory already holds files (the generator never mixes runs).
    #[error("output directory {} is not empty; choose a new or empty directory", .0.display())]
    OutDirNotEmpty(PathBuf),
    /// Reading or writing a file or directory failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("Parquet error writing {}: {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: parquet::errors::ParquetError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GenerateError + '_ {
    move |source| GenerateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn pq_err(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> GenerateError + '_ {
    move |source| GenerateError::Parquet {
        path: path.to_path_buf(),
        source,
    }
}

/// The campaign of an ad: `ad / 10`.
pub fn campaign_of(ad_id: i64) -> i64 {
    ad_id / 10
}

/// The advertiser of an ad: `ad / 100`.
pub fn advertiser_of(ad_id: i64) -> i64 {
    ad_id / 100
}

/// The IPv4 address of a user: a fixed hash of the id, first octet in 1..=223.
pub fn ip_of(user_id: i64) -> String {
    let h = mix64(user_id as u64);
    let a = 1 + (h % 223) as u8;
    let [_, _, _, _, _, b, c, d] = h.to_be_bytes();
    let mut ip = Vec::with_capacity(15);
    for (i, octet) in [a, b, c, d].into_iter().enumerate() {
        if i > 0 {
            ip.push(b'.');
        }
        push_u64(&mut ip, u64::from(octet));
    }
    String::from_utf8(ip).expect("digits and dots are ASCII")
}

/// `<producer>-<n>` without the formatting machinery (this runs once per event).
fn event_id(producer: &str, n: u64) -> String {
    let mut id = Vec::with_capacity(producer.len() + 21);
    id.extend_from_slice(producer.as_bytes());
    id.push(b'-');
    push_u64(&mut id, n);
    String::from_utf8(id).expect("producer names and digits are ASCII")
}

/// SplitMix64's finalizer: a fixed, well-mixing bijection of `u64`.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The fixed writer settings of every Parquet file: Snappy, row groups of 2^20 rows.
///
/// Dictionary encoding is off for the near-unique columns (ids, times, users, addresses,
/// amounts), where it only costs time before falling back to plain encoding.
pub fn writer_properties() -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_max_row_group_bytes(None);
    for column in [
        "event_id",
        "event_time",
        "user_id",
        "ip",
        "cost_micros",
        "revenue_micros",
    ] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    b.build()
}

/// The kinds of invalid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BadKind {
    /// country `../x`.
    Country,
    /// A negative `cost_micros`.
    NegativeCost,
    /// event_type `view`.
    UnknownType,
    /// No `ad_id` key (JSON only).
    MissingField,
    /// Non-UTF-8 bytes in the country (JSON only).
    NonUtf8,
    /// A truncated line (JSON only).
    BrokenJson,
}

const BAD_KINDS: [BadKind; 6] = [
    BadKind::Country,
    BadKind::NegativeCost,
    BadKind::UnknownType,
    BadKind::MissingField,
    BadKind::NonUtf8,
    BadKind::BrokenJson,
];
/// The kinds a typed Parquet file can hold: the first three of [`BAD_KINDS`].
const PARQUET_BAD_KINDS: usize = 3;

/// Largest number of ads sampled from a precomputed table (8 MiB); above, rejection sampling.
const POPULARITY_TABLE_MAX: u64 = 1 << 20;

/// The Zipf law of ad popularity: `P(rank k) ∝ k^-s` over `1..=ads`.
enum Popularity {
    /// Cumulative probabilities of ranks 1..=ads (one draw and a binary search per sample).
    Table(Vec<f64>),
    /// `rand_distr`'s rejection sampler, for ad counts too large for a table.
    Sampler(Zipf<f64>),
}

impl Popularity {
    fn new(ads: u64, s: f64) -> Result<Self, GenerateError> {
        if ads > POPULARITY_TABLE_MAX {
            return Zipf::new(ads as f64, s)
                .map(Popularity::Sampler)
                .map_err(|e| GenerateError::InvalidConfig(format!("zipf: {e}")));
        }
        let mut cdf: Vec<f64> = (1..=ads)
            .scan(0.0, |acc, k| {
                *acc += (k as f64).powf(-s);
                Some(*acc)
            })
            .collect();
        let total = cdf.last().copied().unwrap_or(1.0);
        for c in &mut cdf {
            *c /= total;
        }
        Ok(Popularity::Table(cdf))
    }

    /// A rank in `1..=ads`.
    fn rank(&self, rng: &mut ChaCha8Rng) -> u64 {
        match self {
            Popularity::Table(cdf) => {
                let u: f64 = rng.random();
                cdf.partition_point(|&c| c <= u) as u64 + 1
            }
            Popularity::Sampler(z) => z.sample(rng) as u64,
        }
    }
}

/// A run's validated settings and derived constants.
struct Plan {
    events: u64,
    hours: u32,
    fph: u32,
    start_hour: i64,
    seed: u64,
    ads: u64,
    ad_stride: u64,
    popularity: Popularity,
    users: u64,
    resend_rate: f64,
    late_rate: f64,
    missing_id_rate: f64,
    correction_rate: f64,
    bad_rate: f64,
    format: Format,
    countries: [Country; COUNTRIES.len()],
    country_cdf: [f64; COUNTRIES.len()],
    /// Unit indices whose file gets a replay copy.
    replays: BTreeSet<usize>,
}

/// One output file slot: a delivery hour (index from the start), a producer, a file number.
#[derive(Clone, Copy, Debug)]
struct Unit {
    index: usize,
    hour: u32,
    producer: usize,
    file: u32,
}

fn parse_start(s: &str) -> Result<i64, GenerateError> {
    let secs = if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        t.timestamp()
    } else if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp())
            .ok_or_else(|| GenerateError::InvalidConfig(format!("bad start date {s:?}")))?
    } else {
        return Err(GenerateError::InvalidConfig(format!(
            "--start {s:?} is neither RFC 3339 nor YYYY-MM-DD"
        )));
    };
    if secs < 0 {
        return Err(GenerateError::InvalidConfig(format!(
            "--start {s:?} is before 1970"
        )));
    }
    Ok(secs.div_euclid(3600))
}

impl Plan {
    fn new(c: &GenerateConfig) -> Result<Self, GenerateError> {
        let invalid = |m: String| Err(GenerateError::InvalidConfig(m));
        if c.hours == 0 {
            return invalid("--hours must be at least 1".into());
        }
        if c.files_per_hour == 0 || c.files_per_hour > MAX_FILES_PER_HOUR {
            return invalid(format!(
                "--files-per-hour must be in 1..={MAX_FILES_PER_HOUR}"
            ));
        }
        if u64::from(c.hours) * u64::from(c.files_per_hour) > MAX_FILE_SLOTS {
            return invalid(format!(
                "--hours times --files-per-hour must be at most {MAX_FILE_SLOTS}"
            ));
        }
        if c.ads == 0 || c.ads > 1 << 40 {
            return invalid("--ads must be in 1..=2^40".into());
        }
        if c.users == 0 || c.users > 1 << 62 {
            return invalid("--users must be in 1..=2^62".into());
        }
        if !(c.zipf.is_finite() && c.zipf >= 0.0) {
            return invalid(format!(
                "--zipf must be a finite number >= 0, not {}",
                c.zipf
            ));
        }
        for (name, rate) in [
            ("--resend-rate", c.resend_rate),
            ("--late-rate", c.late_rate),
            ("--missing-id-rate", c.missing_id_rate),
            ("--correction-rate", c.correction_rate),
            ("--bad-rate", c.bad_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return invalid(format!("{name} must be in 0..=1, not {rate}"));
            }
        }
        let start_hour = parse_start(&c.start)?;
        // Every delivery hour must fall before 2200-01-01, the end of the decoder's time range.
        if start_hour + i64::from(c.hours) + i64::from(SPILL_HOURS) > LAST_HOUR_END {
            return invalid("--start plus --hours must end before 2200-01-01".into());
        }
        let popularity = Popularity::new(c.ads, c.zipf)?;
        // Scatter popularity ranks over the ad ids with a stride coprime to `ads`.
        let mut ad_stride = (7919 % c.ads).max(1);
        while gcd(ad_stride, c.ads) != 1 {
            ad_stride += 1;
        }
        let countries =
            COUNTRIES.map(|s| Country::parse(s).expect("the fixed list is valid codes"));
        let mut country_cdf = [0.0; COUNTRIES.len()];
        let mut acc = 0.0;
        for (k, slot) in country_cdf.iter_mut().enumerate() {
            acc += 1.0 / (k + 1) as f64;
            *slot = acc;
        }
        for slot in &mut country_cdf {
            *slot /= acc;
        }
        let mut plan = Plan {
            events: c.events,
            hours: c.hours,
            fph: c.files_per_hour,
            start_hour,
            seed: c.seed,
            ads: c.ads,
            ad_stride,
            popularity,
            users: c.users,
            resend_rate: c.resend_rate,
            late_rate: c.late_rate,
            missing_id_rate: c.missing_id_rate,
            correction_rate: c.correction_rate,
            bad_rate: c.bad_rate,
            format: c.format,
            countries,
            country_cdf,
            replays: BTreeSet::new(),
        };
        plan.replays = plan.pick_replays(c.replayed_files);
        Ok(plan)
    }

    /// Chooses `n` distinct files among those of the event hours that hold on-time events
    /// (Floyd's sampling on a dedicated stream).
    fn pick_replays(&self, n: u32) -> BTreeSet<usize> {
        let candidates: Vec<usize> = (0..self.hours as usize * self.units_per_hour())
            .filter(|&u| !self.event_range(self.unit(u)).is_empty())
            .collect();
        let m = candidates.len();
        let k = (n as usize).min(m);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(u64::MAX);
        let mut chosen = BTreeSet::new();
        for j in m - k..m {
            let t = rng.random_range(0..=j);
            if !chosen.insert(t) {
                chosen.insert(j);
            }
        }
        chosen.into_iter().map(|i| candidates[i]).collect()
    }

    fn units_per_hour(&self) -> usize {
        PRODUCERS.len() * self.fph as usize
    }

    fn total_hours(&self) -> u32 {
        self.hours + SPILL_HOURS
    }

    fn total_units(&self) -> usize {
        self.total_hours() as usize * self.units_per_hour()
    }

    fn unit(&self, index: usize) -> Unit {
        let fph = self.fph as usize;
        Unit {
            index,
            hour: (index / self.units_per_hour()) as u32,
            producer: index / fph % PRODUCERS.len(),
            file: (index % fph) as u32,
        }
    }

    fn unit_index(&self, hour: u32, producer: usize, file: u32) -> usize {
        (hour as usize * PRODUCERS.len() + producer) * self.fph as usize + file as usize
    }

    /// Global indices of the events whose on-time delivery is this unit's file.
    fn event_range(&self, u: Unit) -> Range<u64> {
        if u.hour >= self.hours {
            return 0..0;
        }
        let split = |total: u64, i: u64, n: u64| (total as u128 * i as u128 / n as u128) as u64;
        let (h, hours) = (u.hour as u64, self.hours as u64);
        let hour_start = split(self.events, h, hours);
        let hour_len = split(self.events, h + 1, hours) - hour_start;
        let p = u.producer;
        let p_start = hour_start + split(hour_len, PRODUCER_SHARE[p], 100);
        let p_len = hour_start + split(hour_len, PRODUCER_SHARE[p + 1], 100) - p_start;
        let (f, fph) = (u.file as u64, self.fph as u64);
        p_start + split(p_len, f, fph)..p_start + split(p_len, f + 1, fph)
    }

    /// The file of a unit (or its replay copy), relative to the output directory.
    fn relative_path(&self, u: Unit, replay: bool) -> PathBuf {
        let secs = (self.start_hour + u.hour as i64) * 3600;
        let t =
            chrono::DateTime::from_timestamp(secs, 0).expect("start is validated to 1970..2200");
        let ext = if self.format.parquet_for(u.producer) {
            "parquet"
        } else {
            "jsonl"
        };
        let name = if replay {
            format!("part-{:04}-replay.{ext}", u.file)
        } else {
            format!("part-{:04}.{ext}", u.file)
        };
        PathBuf::from(t.format("dt=%Y-%m-%d").to_string())
            .join(t.format("hr=%H").to_string())
            .join(format!("producer={}", PRODUCERS[u.producer]))
            .join(name)
    }
}

/// A record delivered in a later file than its unit's, ordered by where it was generated.
struct Deferred {
    target: usize,
    tag: (usize, u64),
    event: Event,
}

/// One chunk of a file: valid events, and bad records each placed after a number of them.
#[derive(Default)]
struct Chunk {
    goods: Vec<Event>,
    bad_events: Vec<Event>,
    bad_kinds: Vec<BadKind>,
    bad_after: Vec<usize>,
}

impl Chunk {
    fn rows(&self) -> usize {
        self.goods.len() + self.bad_events.len()
    }
    fn clear(&mut self) {
        self.goods.clear();
        self.bad_events.clear();
        self.bad_kinds.clear();
        self.bad_after.clear();
    }
}

/// Generates the events of one unit from its own random stream.
struct UnitGen<'a> {
    plan: &'a Plan,
    unit: Unit,
    rng: ChaCha8Rng,
    hour_start_us: i64,
}

/// Decides with probability `p` (never for 0, always for 1).
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    rng.random::<f64>() < p
}

impl UnitGen<'_> {
    fn event(&mut self, n: u64, with_id: bool) -> Event {
        let plan = self.plan;
        let rng = &mut self.rng;
        let t: u32 = rng.random();
        let event_type = if t < IMPRESSION_BELOW {
            EventType::Impression
        } else if t < CLICK_BELOW {
            EventType::Click
        } else {
            EventType::Conversion
        };
        let event_time_us = self.hour_start_us + rng.random_range(0..MICROS_PER_HOUR);
        let rank = plan.popularity.rank(rng).clamp(1, plan.ads);
        let ad_id = ((rank - 1) as u128 * plan.ad_stride as u128 % plan.ads as u128) as i64 + 1;
        let c: f64 = rng.random();
        let country = plan.countries[plan
            .country_cdf
            .partition_point(|&x| x <= c)
            .min(COUNTRIES.len() - 1)];
        let user_id = rng.random_range(1..=plan.users) as i64;
        let (cost_micros, revenue_micros) = match event_type {
            EventType::Impression => (Some(rng.random_range(100..=5_000)), None),
            EventType::Click => (Some(rng.random_range(10_000..=2_000_000)), None),
            EventType::Conversion => (None, Some(rng.random_range(500_000..=200_000_000))),
        };
        let producer = PRODUCERS[self.unit.producer];
        Event {
            event_id: with_id.then(|| event_id(producer, n).into()),
            event_type,
            event_time_us,
            ad_id,
            campaign_id: campaign_of(ad_id),
            advertiser_id: advertiser_of(ad_id),
            country,
            user_id,
            ip: ip_of(user_id).into(),
            cost_micros,
            revenue_micros,
            producer: producer.into(),
            revision: 0,
        }
    }

    /// A later delivery: `after_hour + 1..=max` in any file of this producer.
    fn later(&mut self, after_hour: u32, max: u32) -> usize {
        let hour = after_hour + self.rng.random_range(1..=max);
        let file = self.rng.random_range(0..self.plan.fph);
        self.plan.unit_index(hour, self.unit.producer, file)
    }
}

/// Where a unit's records go.
enum Sink {
    /// Not opened yet (no rows so far).
    Closed,
    Parquet(Box<ArrowWriter<File>>),
    Jsonl {
        out: BufWriter<File>,
        line: Vec<u8>,
        lines: u64,
        hour_prefix: (i64, Vec<u8>),
    },
    Memory(Vec<Event>),
}

/// Writes one unit's file (or collects its events in memory).
struct UnitOut<'a> {
    plan: &'a Plan,
    unit: Unit,
    /// `None` in memory mode.
    out_dir: Option<&'a Path>,
    sink: Sink,
    /// The file being written (files mode, once opened).
    tmp: PathBuf,
    rows: u64,
    progress: &'a mpsc::Sender<u64>,
}

impl UnitOut<'_> {
    fn tmp_path(&self) -> PathBuf {
        let dir = self.out_dir.expect("files mode");
        let mut p = dir
            .join(self.plan.relative_path(self.unit, false))
            .into_os_string();
        p.push(".tmp");
        PathBuf::from(p)
    }

    fn open(&mut self) -> Result<(), GenerateError> {
        let path = self.tmp_path();
        self.tmp = path.clone();
        let parent = path.parent().expect("a file path has a folder");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let file = File::create(&path).map_err(io_err(&path))?;
        self.sink = if self.plan.format.parquet_for(self.unit.producer) {
            let w = ArrowWriter::try_new(file, schema::event_schema(), Some(writer_properties()))
                .map_err(pq_err(&path))?;
            Sink::Parquet(Box::new(w))
        } else {
            Sink::Jsonl {
                out: BufWriter::with_capacity(1 << 20, file),
                line: Vec::with_capacity(512),
                lines: 0,
                hour_prefix: (i64::MIN, Vec::new()),
            }
        };
        Ok(())
    }

    fn write(&mut self, chunk: &mut Chunk) -> Result<(), GenerateError> {
        let rows = chunk.rows();
        if rows == 0 {
            return Ok(());
        }
        if self.out_dir.is_some() && matches!(self.sink, Sink::Closed) {
            self.open()?;
        }
        match &mut self.sink {
            Sink::Closed => {
                unreachable!("opened above in files mode; memory mode starts as Memory")
            }
            Sink::Memory(events) => events.append(&mut chunk.goods),
            Sink::Parquet(w) => {
                let path = &self.tmp;
                if !chunk.goods.is_empty() {
                    w.write(&schema::events_to_batch(&chunk.goods))
                        .map_err(pq_err(path))?;
                }
                if !chunk.bad_events.is_empty() {
                    w.write(&bad_batch(&chunk.bad_events, &chunk.bad_kinds))
                        .map_err(pq_err(path))?;
                }
            }
            Sink::Jsonl {
                out,
                line,
                lines,
                hour_prefix,
            } => {
                let mut bad = 0;
                for i in 0..=chunk.goods.len() {
                    while bad < chunk.bad_after.len() && chunk.bad_after[bad] == i {
                        line.clear();
                        json_line(
                            line,
                            &chunk.bad_events[bad],
                            *lines % 2 == 0,
                            hour_prefix,
                            Some(chunk.bad_kinds[bad]),
                        );
                        *lines += 1;
                        bad += 1;
                        out.write_all(line).map_err(io_err(&self.tmp))?;
                    }
                    if let Some(e) = chunk.goods.get(i) {
                        line.clear();
                        json_line(line, e, *lines % 2 == 0, hour_prefix, None);
                        *lines += 1;
                        out.write_all(line).map_err(io_err(&self.tmp))?;
                    }
                }
            }
        }
        chunk.clear();
        self.rows += rows as u64;
        // The receiver only goes away when the run is over; nothing to report then.
        let _ = self.progress.send(rows as u64);
        Ok(())
    }

    /// Closes the file, renames it into place, writes the replay copy if chosen.
    fn finish(mut self, summary: &mut GenerateSummary) -> Result<Vec<Event>, GenerateError> {
        let replay = self.plan.replays.contains(&self.unit.index);
        let sink = std::mem::replace(&mut self.sink, Sink::Closed);
        let file = match sink {
            Sink::Closed => return Ok(Vec::new()),
            Sink::Memory(mut events) => {
                summary.records += self.rows;
                if self.rows > 0 {
                    summary.files += 1;
                }
                if replay && !events.is_empty() {
                    summary.files += 1;
                    summary.replayed_files += 1;
                    summary.replayed_records += self.rows;
                    summary.records += self.rows;
                    events.extend_from_within(..);
                }
                return Ok(events);
            }
            Sink::Parquet(w) => w.into_inner().map_err(pq_err(&self.tmp))?,
            Sink::Jsonl { out, .. } => out
                .into_inner()
                .map_err(|e| io_err(&self.tmp)(e.into_error()))?,
        };
        let tmp = &self.tmp;
        let bytes = file.metadata().map_err(io_err(tmp))?.len();
        drop(file);
        let dir = self.out_dir.expect("files mode");
        let path = dir.join(self.plan.relative_path(self.unit, false));
        fs::rename(tmp, &path).map_err(io_err(&path))?;
        summary.files += 1;
        summary.records += self.rows;
        summary.bytes += bytes;
        if replay {
            let copy = dir.join(self.plan.relative_path(self.unit, true));
            let mut copy_tmp = copy.clone().into_os_string();
            copy_tmp.push(".tmp");
            fs::copy(&path, &copy_tmp).map_err(io_err(&copy))?;
            fs::rename(&copy_tmp, &copy).map_err(io_err(&copy))?;
            summary.files += 1;
            summary.replayed_files += 1;
            summary.replayed_records += self.rows;
            summary.records += self.rows;
            summary.bytes += bytes;
            let _ = self.progress.send(self.rows);
        }
        Ok(Vec::new())
    }
}

/// Parquet rows for bad records: the events' columns with the bad values patched in.
fn bad_batch(events: &[Event], kinds: &[BadKind]) -> RecordBatch {
    let schema = schema::event_schema();
    let refs: Vec<&Event> = events.iter().collect();
    let mut columns = schema::event_columns(&refs);
    let col = |name: &str| schema.index_of(name).expect("a column of the event schema");
    let pairs = || events.iter().zip(kinds.iter().copied());
    columns[col("event_type")] = Arc::new(
        pairs()
            .map(|(e, k)| {
                Some(if k == BadKind::UnknownType {
                    "view"
                } else {
                    e.event_type.as_str()
                })
            })
            .collect::<StringArray>(),
    ) as ArrayRef;
    columns[col("country")] = Arc::new(
        pairs()
            .map(|(e, k)| {
                Some(if k == BadKind::Country {
                    "../x"
                } else {
                    e.country.as_str()
                })
            })
            .collect::<StringArray>(),
    );
    columns[col("cost_micros")] = Arc::new(
        pairs()
            .map(|(e, k)| {
                if k == BadKind::NegativeCost {
                    Some(negative_cost(e))
                } else {
                    e.cost_micros
                }
            })
            .collect::<Int64Array>(),
    );
    RecordBatch::try_new(schema, columns).expect("patched columns keep their types and lengths")
}

fn negative_cost(e: &Event) -> i64 {
    -e.cost_micros.unwrap_or(1_000).max(1)
}

fn push_int(buf: &mut Vec<u8>, v: i64) {
    if v < 0 {
        buf.push(b'-');
    }
    push_u64(buf, v.unsigned_abs());
}

fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

fn push_padded(buf: &mut Vec<u8>, v: u64, width: usize) {
    let mut tmp = [b'0'; 20];
    let mut n = v;
    for slot in tmp[20 - width..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.extend_from_slice(&tmp[20 - width..]);
}

/// `event_time` as RFC 3339 with six fractional digits; the `YYYY-MM-DDTHH:` prefix is cached per
/// hour.
fn push_rfc3339(buf: &mut Vec<u8>, us: i64, hour_prefix: &mut (i64, Vec<u8>)) {
    let hour = us.div_euclid(MICROS_PER_HOUR);
    if hour_prefix.0 != hour {
        let t = chrono::DateTime::from_timestamp(hour * 3600, 0).expect("event times are in range");
        hour_prefix.0 = hour;
        hour_prefix.1 = t.format("%Y-%m-%dT%H:").to_string().into_bytes();
    }
    buf.extend_from_slice(&hour_prefix.1);
    let within = us.rem_euclid(MICROS_PER_HOUR) as u64;
    push_padded(buf, within / 60_000_000, 2);
    buf.push(b':');
    push_padded(buf, within / 1_000_000 % 60, 2);
    buf.push(b'.');
    push_padded(buf, within % 1_000_000, 6);
    buf.push(b'Z');
}

fn push_str(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\":\"");
    buf.extend_from_slice(value);
    buf.push(b'"');
}

fn push_key_int(buf: &mut Vec<u8>, key: &str, value: Option<i64>) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\":");
    match value {
        Some(v) => push_int(buf, v),
        None => buf.extend_from_slice(b"null"),
    }
}

/// One event as a JSON object (no newline), as the JSON-lines files write it with an integer
/// `event_time`: a Kafka message's value for `generate --to-kafka`.
pub fn event_json(e: &Event) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    json_line(&mut buf, e, false, &mut (i64::MIN, Vec::new()), None);
    buf.pop();
    buf
}

/// One JSON line (with its newline). Every string written is plain ASCII without quotes or
/// backslashes (ids, codes, addresses, names), so no escaping is needed.
fn json_line(
    buf: &mut Vec<u8>,
    e: &Event,
    time_as_string: bool,
    hour_prefix: &mut (i64, Vec<u8>),
    bad: Option<BadKind>,
) {
    buf.extend_from_slice(b"{\"event_id\":");
    match &e.event_id {
        Some(id) => {
            buf.push(b'"');
            buf.extend_from_slice(id.as_bytes());
            buf.push(b'"');
        }
        None => buf.extend_from_slice(b"null"),
    }
    let event_type = if bad == Some(BadKind::UnknownType) {
        "view"
    } else {
        e.event_type.as_str()
    };
    push_str(buf, "event_type", event_type.as_bytes());
    if time_as_string {
        buf.extend_from_slice(b",\"event_time\":\"");
        push_rfc3339(buf, e.event_time_us, hour_prefix);
        buf.push(b'"');
    } else {
        push_key_int(buf, "event_time", Some(e.event_time_us));
    }
    if bad != Some(BadKind::MissingField) {
        push_key_int(buf, "ad_id", Some(e.ad_id));
    }
    push_key_int(buf, "campaign_id", Some(e.campaign_id));
    push_key_int(buf, "advertiser_id", Some(e.advertiser_id));
    let country: &[u8] = match bad {
        Some(BadKind::Country) => b"../x",
        Some(BadKind::NonUtf8) => b"\xc3\x28\xff",
        _ => e.country.as_str().as_bytes(),
    };
    push_str(buf, "country", country);
    push_key_int(buf, "user_id", Some(e.user_id));
    push_str(buf, "ip", e.ip.as_bytes());
    let cost = if bad == Some(BadKind::NegativeCost) {
        Some(negative_cost(e))
    } else {
        e.cost_micros
    };
    push_key_int(buf, "cost_micros", cost);
    push_key_int(buf, "revenue_micros", e.revenue_micros);
    push_str(buf, "producer", e.producer.as_bytes());
    if e.revision != 0 {
        push_key_int(buf, "revision", Some(e.revision as i64));
    }
    buf.push(b'}');
    if bad == Some(BadKind::BrokenJson) {
        buf.truncate(buf.len() / 2);
    }
    buf.push(b'\n');
}

/// Coordination between workers: which unit is next, which hours are complete, deferred records.
struct Schedule {
    next: AtomicUsize,
    state: Mutex<ScheduleState>,
    hour_done: Condvar,
}

struct ScheduleState {
    done_in_hour: Vec<usize>,
    /// Every unit of the hours before this one is complete.
    hours_done: u32,
    pending: HashMap<usize, Vec<Deferred>>,
    aborted: bool,
}

impl Schedule {
    fn lock(&self) -> std::sync::MutexGuard<'_, ScheduleState> {
        // A poisoned lock means a worker panicked; the panic is re-raised by the caller anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until all hours before `hour` are complete, then takes the records deferred to `unit`.
    /// `None` if the run was aborted.
    fn wait_and_take(&self, hour: u32, unit: usize) -> Option<Vec<Deferred>> {
        let mut s = self.lock();
        while s.hours_done < hour && !s.aborted {
            s = self.hour_done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.aborted {
            return None;
        }
        Some(s.pending.remove(&unit).unwrap_or_default())
    }

    fn complete(&self, hour: u32, per_hour: usize, deferred: Vec<Deferred>) {
        let mut s = self.lock();
        for d in deferred {
            s.pending.entry(d.target).or_default().push(d);
        }
        s.done_in_hour[hour as usize] += 1;
        while (s.hours_done as usize) < s.done_in_hour.len()
            && s.done_in_hour[s.hours_done as usize] == per_hour
        {
            s.hours_done += 1;
        }
        drop(s);
        self.hour_done.notify_all();
    }

    fn abort(&self) {
        self.lock().aborted = true;
        self.hour_done.notify_all();
    }
}

/// Aborts the run if a worker unwinds, so that no other worker waits for its unit forever.
struct AbortOnPanic<'a>(&'a Schedule);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// Generates and writes one unit. `Ok(None)` if the run was aborted by another worker.
fn run_unit(
    plan: &Plan,
    schedule: &Schedule,
    unit: Unit,
    out_dir: Option<&Path>,
    progress: &mpsc::Sender<u64>,
) -> Result<Option<(GenerateSummary, Vec<Event>)>, GenerateError> {
    let mut summary = GenerateSummary::default();
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    rng.set_stream(unit.index as u64);
    let mut gen = UnitGen {
        plan,
        unit,
        rng,
        hour_start_us: (plan.start_hour + unit.hour as i64) * MICROS_PER_HOUR,
    };
    let mut out = UnitOut {
        plan,
        unit,
        out_dir,
        sink: if out_dir.is_some() {
            Sink::Closed
        } else {
            Sink::Memory(Vec::new())
        },
        tmp: PathBuf::new(),
        rows: 0,
        progress,
    };
    let parquet = plan.format.parquet_for(unit.producer);
    let producer = PRODUCERS[unit.producer];
    let mut deferred = Vec::new();
    let mut defer = |target: usize, event: Event| {
        let seq = deferred.len() as u64;
        deferred.push(Deferred {
            target,
            tag: (unit.index, seq),
            event,
        });
    };
    let mut chunk = Chunk::default();
    for n in plan.event_range(unit) {
        let with_id = !chance(&mut gen.rng, plan.missing_id_rate);
        let event = gen.event(n, with_id);
        summary.distinct_events += 1;
        summary.missing_ids += u64::from(!with_id);
        let late = chance(&mut gen.rng, plan.late_rate);
        let first_hour = if late {
            unit.hour + gen.rng.random_range(1..=MAX_LATE_HOURS)
        } else {
            unit.hour
        };
        let first_target = if late {
            summary.late += 1;
            Some(
                gen.plan
                    .unit_index(first_hour, unit.producer, gen.rng.random_range(0..plan.fph)),
            )
        } else {
            None
        };
        if chance(&mut gen.rng, plan.resend_rate) {
            summary.resends += 1;
            let target = gen.later(first_hour, MAX_REDELIVERY_HOURS);
            defer(target, event.clone());
        }
        if with_id && chance(&mut gen.rng, plan.correction_rate) {
            summary.corrections += 1;
            let target = gen.later(first_hour, MAX_REDELIVERY_HOURS);
            let mut corrected = event.clone();
            corrected.revision = 1;
            match (&mut corrected.cost_micros, &mut corrected.revenue_micros) {
                (Some(c), _) => *c += gen.rng.random_range(1..=*c),
                (None, Some(r)) => *r += gen.rng.random_range(1..=*r),
                (None, None) => unreachable!("every generated event has a cost or a revenue"),
            }
            defer(target, corrected);
        }
        let bad = if chance(&mut gen.rng, plan.bad_rate) {
            let k = gen.rng.random_range(0..BAD_KINDS.len());
            Some(BAD_KINDS[if parquet { k % PARQUET_BAD_KINDS } else { k }])
        } else {
            None
        };
        if let Some(kind) = bad {
            summary.bad_records += 1;
            let mut b = event.clone();
            b.event_id = Some(format!("{producer}-bad-{n}").into());
            chunk.bad_events.push(b);
            chunk.bad_kinds.push(kind);
            chunk
                .bad_after
                .push(chunk.goods.len() + usize::from(first_target.is_none()));
        }
        match first_target {
            Some(target) => defer(target, event),
            None => chunk.goods.push(event),
        }
        if chunk.rows() >= CHUNK_ROWS {
            out.write(&mut chunk)?;
        }
    }
    out.write(&mut chunk)?;
    let Some(mut incoming) = schedule.wait_and_take(unit.hour, unit.index) else {
        return Ok(None);
    };
    incoming.sort_unstable_by_key(|d| d.tag);
    for d in incoming {
        chunk.goods.push(d.event);
        if chunk.goods.len() >= CHUNK_ROWS {
            out.write(&mut chunk)?;
        }
    }
    out.write(&mut chunk)?;
    let events = out.finish(&mut summary)?;
    schedule.complete(unit.hour, plan.units_per_hour(), deferred);
    // Records written are counted by the sink; generation counted the rest.
    Ok(Some((summary, events)))
}

/// Runs every unit on `threads` workers; returns the summary and, in memory mode, the events.
fn run(
    plan: &Plan,
    out_dir: Option<&Path>,
    threads: usize,
    progress: &dyn Fn(u64),
) -> Result<(GenerateSummary, Vec<Event>), GenerateError> {
    let total = plan.total_units();
    let schedule = Schedule {
        next: AtomicUsize::new(0),
        state: Mutex::new(ScheduleState {
            done_in_hour: vec![0; plan.total_hours() as usize],
            hours_done: 0,
            pending: HashMap::new(),
            aborted: false,
        }),
        hour_done: Condvar::new(),
    };
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
    .clamp(1, total.max(1));
    type WorkerResult = Result<Vec<(usize, GenerateSummary, Vec<Event>)>, GenerateError>;
    let results: Vec<std::thread::Result<WorkerResult>> = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<u64>();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let tx = tx.clone();
                let schedule = &schedule;
                scope.spawn(move || -> WorkerResult {
                    let _guard = AbortOnPanic(schedule);
                    let mut done = Vec::new();
                    loop {
                        let index = schedule.next.fetch_add(1, Ordering::Relaxed);
                        if index >= total {
                            return Ok(done);
                        }
                        match run_unit(plan, schedule, plan.unit(index), out_dir, &tx) {
                            Ok(Some((summary, events))) => done.push((index, summary, events)),
                            Ok(None) => return Ok(done),
                            Err(e) => {
                                schedule.abort();
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut written = 0;
        for rows in rx {
            written += rows;
            progress(written);
        }
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut units = Vec::with_capacity(total);
    let mut error = None;
    for r in results {
        match r {
            Ok(Ok(done)) => units.extend(done),
            Ok(Err(e)) => {
                error.get_or_insert(e);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    units.sort_unstable_by_key(|u| u.0);
    let mut summary = GenerateSummary::default();
    let mut events = Vec::new();
    for (_, s, mut e) in units {
        summary.add(&s);
        events.append(&mut e);
    }
    Ok((summary, events))
}

/// Generates the run described by `config` into `out_dir` (created if missing; must be empty),
/// using all cores. Calls `progress` with the number of records written so far.
pub fn generate(
    config: &GenerateConfig,
    out_dir: &Path,
    progress: &dyn Fn(u64),
) -> Result<GenerateSummary, GenerateError> {
    generate_with_threads(config, out_dir, 0, progress)
}

/// [`generate`] on `threads` worker threads (0: one per core). The output does not depend on it.
pub fn generate_with_threads(
    config: &GenerateConfig,
    out_dir: &Path,
    threads: usize,
    progress: &dyn Fn(u64),
) -> Result<GenerateSummary, GenerateError> {
    let plan = Plan::new(config)?;
    match fs::read_dir(out_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(GenerateError::OutDirNotEmpty(out_dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
        }
        Err(e) => return Err(io_err(out_dir)(e)),
    }
    Ok(run(&plan, Some(out_dir), threads, progress)?.0)
}

/// In-memory variant for tests and benchmarks: the valid events of the run (with resends,
/// corrections, late deliveries and replayed files, without bad records) in delivery order —
/// delivery hour, producer in [`PRODUCERS`] order, file number, original before its replay —
/// exactly the valid records [`generate`] writes for the same config. Deterministic for a seed.
///
/// # Panics
/// If the configuration is invalid (see [`GenerateError::InvalidConfig`]).
pub fn generate_events(config: &GenerateConfig) -> Vec<Event> {
    let plan = Plan::new(config).unwrap_or_else(|e| panic!("{e}"));
    match run(&plan, None, 0, &|_| {}) {
        Ok((_, events)) => events,
        Err(e) => unreachable!("memory mode does no I/O: {e}"),
    }
}
