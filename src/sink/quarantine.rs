//! The quarantine table: input that is not a valid event, with the reason, by ingest date.
//!
//! `quarantine/dt=<ingest date>/src-<source hash>.parquet`, columns `source`, `source_hash`,
//! `position`, `reason`, `raw` (the bytes), `ingested_at`. One immutable file per source.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

use crate::event::Quarantined;
use crate::schema::utc_micros;
use crate::sink::files::{base_writer_properties, parquet_bytes, replace, WriteError};
use crate::warehouse::{day_string, Warehouse};

/// The quarantine table's columns.
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("source", DataType::Utf8, false),
        Field::new("source_hash", DataType::Utf8, false),
        Field::new("position", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Binary, false),
        Field::new("ingested_at", utc_micros(), false),
    ]))
}

/// Writes a source's quarantined records; `ingested_at_us` is the run's wall-clock start.
/// Returns how many rows were written.
pub fn write_quarantine(
    warehouse: &Warehouse,
    source_hash: &str,
    records: &[Quarantined],
    ingested_at_us: i64,
) -> Result<u64, WriteError> {
    if records.is_empty() {
        return Ok(0);
    }
    let day = ingested_at_us.div_euclid(adsmetrics_dataflows::MICROS_PER_DAY);
    let dest = warehouse
        .quarantine_dir()
        .join(format!("dt={}", day_string(day)))
        .join(format!("src-{source_hash}.parquet"));
    let schema = schema();
    let n = records.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            records
                .iter()
                .map(|q| Some(q.source.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(StringArray::from(vec![source_hash; n])),
        Arc::new(
            records
                .iter()
                .map(|q| Some(q.position.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            records
                .iter()
                .map(|q| Some(q.reason.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            records
                .iter()
                .map(|q| Some(q.raw.as_slice()))
                .collect::<BinaryArray>(),
        ),
        Arc::new(TimestampMicrosecondArray::from(vec![ingested_at_us; n]).with_timezone("UTC")),
    ];
    let batch = RecordBatch::try_new(schema, columns).expect("columns follow schema");
    let props = base_writer_properties().build();
    let bytes = parquet_bytes(&batch, props, &dest)?;
    let staged = warehouse
        .staging_dir()
        .join(format!("quarantine-{source_hash}.parquet"));
    replace(&staged, &dest, &bytes)?;
    Ok(n as u64)
}
