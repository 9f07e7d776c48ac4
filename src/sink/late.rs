//! The `late_arrivals` table: events that arrived after their partition was first published.
//!
//! Nothing is dropped for being late — a late event is counted into its event-time partition like
//! any other, and the partition gets a new version. This table is the lateness record beside it:
//! `late_arrivals/dt=<arrival date>/sources-<hash>.parquet`, one row per (source, partition)
//! with columns `target_table`, `target_dt`, `target_hr` (null for daily partitions),
//! `late_events`, `arrived_at`, `source`, `source_hash`. An event is late for a partition when its
//! source is ingested after an epoch that published the partition; it is counted once per
//! partition it falls in (its hour's and its day's). A resend of an event already counted arrives
//! late too and is counted here (it changes no metric): the record says what arrived when, the
//! tables what it came to.
//!
//! One file holds the records of the sources a publish commits (per process, in a cluster), and
//! that publish renames it into place ([`crate::journal::SideFile`]); the hash in its name is of
//! those sources' content hashes. Readers still count only rows of committed sources.

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

use crate::journal::SideFile;
use crate::schema::utc_micros;
use crate::sink::files::{base_writer_properties, parquet_bytes, stage_side_file, WriteError};
use crate::warehouse::{day_path, day_string, parse_day, table_name, Warehouse};

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

/// One source's late events per partition, as ingested.
#[derive(Clone, Debug)]
pub struct SourceLateness {
    /// The source (its label).
    pub source: String,
    /// Its content hash.
    pub source_hash: String,
    /// Late events per partition (counted once per partition).
    pub late: BTreeMap<PartitionId, u64>,
}

/// Stages the lateness records of a process's sources in an epoch as one file, for the publish
/// that commits those sources to rename into place (written by source hash, then partition).
/// `arrived_at_us` is the run's wall-clock start. `None` when no source brought late events.
pub fn stage_late(
    warehouse: &Warehouse,
    sources: &mut [SourceLateness],
    arrived_at_us: i64,
) -> Result<Option<SideFile>, WriteError> {
    sources.sort_by(|a, b| a.source_hash.cmp(&b.source_hash));
    let rows: Vec<(&SourceLateness, &PartitionId, u64)> = sources
        .iter()
        .flat_map(|s| s.late.iter().map(move |(id, n)| (s, id, *n)))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let n = rows.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            rows.iter()
                .map(|(_, id, _)| Some(table_name(id.grain)))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|(_, id, _)| Some(day_string(id.day())))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|(_, id, _)| id.grain.by_hour().then(|| id.period.rem_euclid(24) as i32))
                .collect::<Int32Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|(_, _, n)| *n as i64)
                .collect::<Int64Array>(),
        ),
        Arc::new(TimestampMicrosecondArray::from(vec![arrived_at_us; n]).with_timezone("UTC")),
        Arc::new(
            rows.iter()
                .map(|(s, _, _)| Some(s.source.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|(s, _, _)| Some(s.source_hash.as_str()))
                .collect::<StringArray>(),
        ),
    ];
    let batch = RecordBatch::try_new(schema(), columns).expect("columns follow schema");
    let table = dir_of(warehouse);
    let bytes = parquet_bytes(&batch, base_writer_properties().build(), &table)?;
    let day_dir = day_path(arrived_at_us.div_euclid(MICROS_PER_DAY));
    let hashes = sources
        .iter()
        .filter(|s| !s.late.is_empty())
        .map(|s| s.source_hash.as_str());
    stage_side_file(warehouse, LATE_ARRIVALS, &day_dir, hashes, &bytes).map(Some)
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

/// The lateness record of every partition that has one, from the rows of `committed` sources
/// (content hashes; rows of a source whose publish never committed, as a build before side files
/// could leave, are not counted).
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
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "parquet"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    // Per source and partition, its newest record: a source's record can be in two files (one an
    // earlier build left beside this one's, or a source a backfill withdrew and read again).
    let mut newest: BTreeMap<(String, PartitionId), (i64, u64)> = BTreeMap::new();
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
            let source = column("source_hash")?
                .as_any()
                .downcast_ref::<StringArray>();
            let (Some(table), Some(dt), Some(hr), Some(events), Some(at), Some(source)) =
                (table, dt, hr, events, at, source)
            else {
                return Err(err("unexpected column types".into()));
            };
            for i in 0..batch.num_rows() {
                if !committed.contains(source.value(i)) {
                    continue;
                }
                let grain = crate::warehouse::grain_of_table(table.value(i))
                    .ok_or_else(|| err(format!("unknown table {}", table.value(i))))?;
                let day =
                    parse_day(dt.value(i)).ok_or_else(|| err(format!("bad dt {}", dt.value(i))))?;
                let period = match grain.by_hour() {
                    true if hr.is_valid(i) => day * 24 + i64::from(hr.value(i)),
                    true => return Err(err("hourly row without hr".into())),
                    false => day,
                };
                let id = PartitionId { grain, period };
                let record = (at.value(i), u64::try_from(events.value(i)).unwrap_or(0));
                newest
                    .entry((source.value(i).to_string(), id))
                    .and_modify(|kept| *kept = (*kept).max(record))
                    .or_insert(record);
            }
        }
    }
    for ((_, id), (at, events)) in newest {
        let record = out.entry(id).or_default();
        record.events += events;
        record.sources += 1;
        record.last_arrival_us = record.last_arrival_us.max(at);
    }
    Ok(out)
}
