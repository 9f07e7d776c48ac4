//! The warehouse directory layout: where every table, partition, staging file and journal lives.
//!
//! ```text
//! <warehouse>/
//!   ads_metrics_hourly/dt=YYYY-MM-DD/hr=HH/data.parquet   curated, one file per partition
//!   ads_metrics_daily/dt=YYYY-MM-DD/data.parquet
//!   raw/dt=YYYY-MM-DD/src-<source hash>.parquet             raw layer, one file per (source, day)
//!   quarantine/dt=YYYY-MM-DD/sources-<hash>.parquet         rejected input, by ingest date,
//!                                                            one file per publish (and process)
//!   late_arrivals/dt=YYYY-MM-DD/sources-<hash>.parquet      lateness record, by arrival date
//!   _adsmetrics/journal.jsonl                                commit journal
//!   _adsmetrics/ledger.jsonl                                 audit ledger (hash-chained)
//!   _adsmetrics/tombstones.jsonl                             keys of deleted events
//!   _adsmetrics/deletions/<request id>.json                  deletion certificates
//!   _adsmetrics/keyindex/dt=YYYY-MM-DD.keys                  each day's sorted keys (a cache)
//!   _adsmetrics/retention.json                               retention horizons
//!   _adsmetrics/writer.lock                                  the writer lock (crate::lock)
//!   _adsmetrics/staging/                                     files on their way into a table
//! ```
//! Staging lives outside every table directory: DuckDB's `read_parquet('table/**/*.parquet')`
//! reads `_`- and `.`-prefixed files inside a table, so nothing but current data may be there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use adsmetrics_dataflows::{
    first_day_of_week, Grain, PartitionId, MICROS_PER_DAY, MICROS_PER_HOUR,
};
use chrono::{DateTime, NaiveDate};

/// The fixed name of the one data file of a curated partition.
pub const PARTITION_FILE: &str = "data.parquet";

/// Paths inside one warehouse root, and how this process writes to it.
#[derive(Clone, Debug)]
pub struct Warehouse {
    root: PathBuf,
    /// The orchestrator's name for the logical run (`--run-key`), recorded with every publish
    /// and ledger entry this process writes.
    run_key: Option<String>,
    /// How long a writer waits for the writer lock.
    lock_wait: Duration,
}

/// How long a writer waits for another to release the writer lock, by default.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(600);

/// `YYYY-MM-DD` of a day index since the Unix epoch.
pub fn day_string(day: i64) -> String {
    DateTime::from_timestamp_micros(day * MICROS_PER_DAY)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| format!("day{day}"))
}

/// Day index of a `YYYY-MM-DD` string.
pub fn parse_day(s: &str) -> Option<i64> {
    // The canonical `YYYY-MM-DD` (every path this program writes) without a format parser: raw
    // file paths are parsed by the ten thousand per run.
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let canonical = || match (b.len(), b.get(4), b.get(7)) {
        (10, Some(b'-'), Some(b'-')) => {
            NaiveDate::from_ymd_opt(digits(0..4)? as i32, digits(5..7)?, digits(8..10)?)
        }
        _ => None,
    };
    let date = match canonical() {
        Some(date) => date,
        None => NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?,
    };
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    Some((date - epoch).num_days())
}

/// The table name of a grain.
pub fn table_name(grain: Grain) -> &'static str {
    match grain {
        Grain::Hourly => "ads_metrics_hourly",
        Grain::Daily => "ads_metrics_daily",
        Grain::Minute => "ads_clicks_minute",
        Grain::Weekly => "ads_metrics_weekly",
    }
}

/// The grain of a table name.
pub fn grain_of_table(name: &str) -> Option<Grain> {
    Grain::ALL.into_iter().find(|g| table_name(*g) == name)
}

/// The Hive path of a partition inside its table: `dt=…/hr=…` or `dt=…`.
pub fn partition_path(id: &PartitionId) -> String {
    match id.grain {
        Grain::Hourly | Grain::Minute => {
            let day = id.period.div_euclid(24);
            format!("{}/hr={:02}", day_path(day), id.period.rem_euclid(24))
        }
        Grain::Daily => day_path(id.period),
        Grain::Weekly => format!("week={}", day_string(first_day_of_week(id.period))),
    }
}

/// The `dt=` folder of a day index (days since the Unix epoch), as every day-partitioned layer
/// names it.
pub fn day_path(day: i64) -> String {
    format!("dt={}", day_string(day))
}

/// `dt`/`hr` of an hour index: an hourly partition's path, and the folder in which the raw
/// layer's older hourly layout kept a source's events of that hour.
pub fn hour_path(hour: i64) -> String {
    partition_path(&PartitionId {
        grain: Grain::Hourly,
        period: hour,
    })
}

/// Start of a partition's period, UTC micros.
pub fn period_start_micros(id: &PartitionId) -> i64 {
    match id.grain {
        Grain::Hourly | Grain::Minute => id.period * MICROS_PER_HOUR,
        Grain::Daily => id.period * MICROS_PER_DAY,
        Grain::Weekly => first_day_of_week(id.period) * MICROS_PER_DAY,
    }
}

impl Warehouse {
    /// A warehouse rooted at `root` (not created until written to).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Warehouse {
            root: root.into(),
            run_key: None,
            lock_wait: DEFAULT_LOCK_WAIT,
        }
    }

    /// The same warehouse, its writes recorded under `run_key`.
    pub fn with_run_key(mut self, run_key: Option<String>) -> Self {
        self.run_key = run_key;
        self
    }

    /// The same warehouse, its writers waiting up to `wait` for the writer lock.
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// The run key this process's writes are recorded under.
    pub fn run_key(&self) -> Option<&str> {
        self.run_key.as_deref()
    }

    /// How long a writer waits for the writer lock.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// The writer lock's file ([`crate::lock`]).
    pub fn writer_lock_path(&self) -> PathBuf {
        self.meta_dir().join("writer.lock")
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A curated table's directory.
    pub fn table_dir(&self, grain: Grain) -> PathBuf {
        self.root.join(table_name(grain))
    }

    /// The one data file of a curated partition.
    pub fn partition_file(&self, id: &PartitionId) -> PathBuf {
        self.table_dir(id.grain)
            .join(partition_path(id))
            .join(PARTITION_FILE)
    }

    /// The raw layer's directory.
    pub fn raw_dir(&self) -> PathBuf {
        self.root.join("raw")
    }

    /// The quarantine table's directory.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join(crate::sink::quarantine::QUARANTINE)
    }

    /// Private state: journal, staging.
    pub fn meta_dir(&self) -> PathBuf {
        self.root.join("_adsmetrics")
    }

    /// Where files are written before an atomic rename into place.
    pub fn staging_dir(&self) -> PathBuf {
        self.meta_dir().join("staging")
    }

    /// The commit journal.
    pub fn journal_path(&self) -> PathBuf {
        self.meta_dir().join("journal.jsonl")
    }

    /// Compliance-delete tombstones.
    pub fn tombstones_path(&self) -> PathBuf {
        self.meta_dir().join("tombstones.jsonl")
    }

    /// Deletion certificates, one JSON file per request.
    pub fn deletions_dir(&self) -> PathBuf {
        self.meta_dir().join("deletions")
    }

    /// The audit ledger.
    pub fn ledger_path(&self) -> PathBuf {
        self.meta_dir().join("ledger.jsonl")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_paths_are_hive_style() {
        let hour = parse_day("2026-11-01").unwrap() * 24 + 5;
        assert_eq!(
            partition_path(&PartitionId {
                grain: Grain::Hourly,
                period: hour
            }),
            "dt=2026-11-01/hr=05"
        );
        assert_eq!(
            partition_path(&PartitionId {
                grain: Grain::Daily,
                period: hour / 24
            }),
            "dt=2026-11-01"
        );
        assert_eq!(day_string(0), "1970-01-01");
    }

    #[test]
    fn parse_day_agrees_with_the_format_parser() {
        let chrono_day = |s: &str| {
            let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            Some((date - NaiveDate::from_ymd_opt(1970, 1, 1)?).num_days())
        };
        for s in [
            "2026-11-01",
            "1970-01-01",
            "2024-02-29",
            "2023-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-11-31",
            "0000-01-01",
            "9999-12-31",
            "2026-1-01",
            "2026-01-1",
            "2026/01/01",
            "2026-0a-01",
            "+026-01-01",
            "2026-01-01x",
            "",
            "20260101xx",
        ] {
            assert_eq!(parse_day(s), chrono_day(s), "{s:?}");
        }
        assert_eq!(parse_day("1970-01-02"), Some(1));
    }
}
