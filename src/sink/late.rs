//! The `late_arrivals` table: events that arrived after their partition was first published.
//!
//! Nothing is dropped for being late — a late event is counted into its event-time partition like
//! any other, and the partition gets a new version. This table is the lateness record beside it:
//! `late_arrivals/dt=<arrival date>/src-<source hash>.parquet`, one row per (source, partition)
//! with columns `target_table`, `target_dt`, `target_hr` (null for daily partitions), `late_events`,
//! `arrived_at`, `source`, `source_hash`. An event is late for a partition when its source is ingested after
//! an epoch that published the partition; it is counted once per partition it falls in (its
//! hour's and its day's). A resend of an event already counted arrives late too and is counted
//! here (it changes no metric): the record says what arrived when, the tables what it came to. The file is written with the source's raw files, named by the source's
//! content hash, so it is committed (or rewritten by a rerun) together with them; readers count
//! only files of committed sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use adsmetrics_dataflows::{PartitionId, MICROS_PER_DAY};
use arrow::array::{
    Array, ArrayRef, Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::schema::utc_micros;
use crate::sink::files::{base_writer_properties, parquet_bytes, replace, WriteError};
use crate::warehouse::{day_string, parse_day, table_name, Warehouse};

/// The table's directory name.
pub const LATE_ARRIVALS: &str = "late_arrivals";

/// A partition's lateness record: what arrived after its first publish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lateness {
    /// Late events, over all sources.
    pub events: u64,
    /// Sources that brought late events.
    pub sources: u64,
    /// When the newest of them arrived (ingest start, UTC micros).
    pub last_arrival_us: i64,
}

/// The table's columns. The curated partition is named by `target_*` columns: the directory's
/// `dt=` is the arrival date, and Hive allows no data column named like a partition column.
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("target_table", DataType::Utf8, false),
        Field::new("target_dt", DataType::Utf8, false),
        Field::new("target_hr", DataType::Int32, true),
        Field::new("late_events", DataType::Int64, false),
        Field::new("arrived_at", utc_micros(), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("source_hash", DataType::Utf8, false),
    ]))
}

fn dir_of(warehouse: &Warehouse) -> PathBuf {
    warehouse.root().join(LATE_ARRIVALS)
}

/// Writes one source's late events per partition (nothing when there are none). `arrived_at_us`
/// is the run's wall-clock start. Returns the late events written (counted once per partition).
pub fn write_late(
    warehouse: &Warehouse,
    source: &str,
    source_hash: &str,
    late: &BTreeMap<PartitionId, u64>,
    arrived_at_us: i64,
) -> Result<u64, WriteError> {
    // A source's record is one file. A run that stopped before its commit and is rerun on a
    // later day would otherwise leave the source's earlier file beside the new one.
    let name = format!("src-{source_hash}.parquet");
    if let Ok(days) = std::fs::read_dir(dir_of(warehouse)) {
        for day in days.flatten() {
            let stale = day.path().join(&name);
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(|source| WriteError::Io {
                    path: stale.clone(),
                    source,
                })?;
            }
        }
    }
    if late.is_empty() {
        return Ok(0);
    }
    let dest = dir_of(warehouse)
        .join(format!(
            "dt={}",
            day_string(arrived_at_us.div_euclid(MICROS_PER_DAY))
        ))
        .join(name);
    let n = late.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            late.keys()
                .map(|id| Some(table_name(id.grain)))
                .collect::<StringArray>(),
        ),
        Arc::new(
            late.keys()
                .map(|id| Some(day_string(id.day())))
                .collect::<StringArray>(),
        ),
        Arc::new(
            late.keys()
                .map(|id| id.grain.by_hour().then(|| id.period.rem_euclid(24) as i32))
                .collect::<Int32Array>(),
        ),
        Arc::new(late.values().map(|n| *n as i64).collect::<Int64Array>()),
        Arc::new(TimestampMicrosecondArray::from(vec![arrived_at_us; n]).with_timezone("UTC")),
        Arc::new(StringArray::from(vec![source; n])),
        Arc::new(StringArray::from(vec![source_hash; n])),
    ];
    let batch = RecordBatch::try_new(schema(), columns).expect("columns follow schema");
    let bytes = parquet_bytes(&batch, base_writer_properties().build(), &dest)?;
    let staged = warehouse
        .staging_dir()
        .join(format!("late-{source_hash}.parquet"));
    replace(&staged, &dest, &bytes)?;
    Ok(late.values().sum())
}

/// Why the lateness record could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {detail}")]
pub struct LateReadError {
    /// The file.
    pub path: String,
    /// What failed.
    pub detail: String,
}

/// The lateness record of every partition that has one, from the files of `committed` sources
/// (content hashes; a crashed run's file of a source never committed is not counted).
pub fn read_lateness(
    warehouse: &Warehouse,
    committed: &BTreeSet<String>,
) -> Result<BTreeMap<PartitionId, Lateness>, LateReadError> {
    let mut out: BTreeMap<PartitionId, Lateness> = BTreeMap::new();
    let dir = dir_of(warehouse);
    if !dir.exists() {
        return Ok(out);
    }
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(&dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .filter(|p| crate::sink::raw::source_hash_of(p).is_some_and(|h| committed.contains(h)))
        .collect();
    files.sort();
    for path in files {
        let err = |detail: String| LateReadError {
            path: path.display().to_string(),
            detail,
        };
        let file = std::fs::File::open(&path).map_err(|e| err(e.to_string()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| err(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| err(format!("no column {name}")))
            };
            let table = column("target_table")?
                .as_any()
                .downcast_ref::<StringArray>();
            let dt = column("target_dt")?.as_any().downcast_ref::<StringArray>();
            let hr = column("target_hr")?.as_any().downcast_ref::<Int32Array>();
            let events = column("late_events")?.as_any().downcast_ref::<Int64Array>();
            let at = column("arrived_at")?
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>();
            let (Some(table), Some(dt), Some(hr), Some(events), Some(at)) =
                (table, dt, hr, events, at)
            else {
                return Err(err("unexpected column types".into()));
            };
            for i in 0..batch.num_rows() {
                let grain = crate::warehouse::grain_of_table(table.value(i))
                    .ok_or_else(|| err(format!("unknown table {}", table.value(i))))?;
                let day =
                    parse_day(dt.value(i)).ok_or_else(|| err(format!("bad dt {}", dt.value(i))))?;
                let period = match grain.by_hour() {
                    true if hr.is_valid(i) => day * 24 + i64::from(hr.value(i)),
                    true => return Err(err("hourly row without hr".into())),
                    false => day,
                };
                let record = out.entry(PartitionId { grain, period }).or_default();
                record.events += u64::try_from(events.value(i)).unwrap_or(0);
                record.sources += 1;
                record.last_arrival_us = record.last_arrival_us.max(at.value(i));
            }
        }
    }
    Ok(out)
}
