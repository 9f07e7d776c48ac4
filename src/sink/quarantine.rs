//! The quarantine table: input that is not a valid event, with the reason, by ingest date.
//!
//! `quarantine/dt=<ingest date>/sources-<hash>.parquet`, columns `source`, `source_hash`,
//! `position`, `reason`, `raw` (the bytes), `ingested_at`. One file per publish (and process,
//! in a cluster) of the sources it commits, renamed into place by that publish
//! ([`crate::journal::SideFile`]); the hash in its name is of those sources' content hashes.
//! (Before, one file per source, written with its raw files: 2,271 files of about two rows each in
//! a 30-day load of 5M events.)

/// The table's directory name.
pub const QUARANTINE: &str = "quarantine";

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

use crate::event::Quarantined;
use crate::journal::SideFile;
use crate::schema::utc_micros;
use crate::sink::files::{
    base_writer_properties, parquet_bytes, replace, stage_side_file, WriteError,
};
use crate::warehouse::{day_path, Warehouse};

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

/// Stages the quarantined records of a process's sources in an epoch as one file, for the publish
/// that commits those sources to rename into place; `records` are (source content hash, record),
/// in any order (they are written by source hash, each source's in its own order), and
/// `ingested_at_us` is the run's wall-clock start. `None` when there are none.
pub fn stage_quarantine(
    warehouse: &Warehouse,
    records: &mut [(String, Quarantined)],
    ingested_at_us: i64,
) -> Result<Option<SideFile>, WriteError> {
    if records.is_empty() {
        return Ok(None);
    }
    records.sort_by(|a, b| a.0.cmp(&b.0));
    let day = ingested_at_us.div_euclid(adsmetrics_dataflows::MICROS_PER_DAY);
    let n = records.len();
    let strings = |f: fn(&(String, Quarantined)) -> &str| -> ArrayRef {
        Arc::new(records.iter().map(|r| Some(f(r))).collect::<StringArray>())
    };
    let columns: Vec<ArrayRef> = vec![
        strings(|(_, q)| &q.source),
        strings(|(hash, _)| hash),
        strings(|(_, q)| &q.position),
        strings(|(_, q)| &q.reason),
        Arc::new(
            records
                .iter()
                .map(|(_, q)| Some(q.raw.as_slice()))
                .collect::<BinaryArray>(),
        ),
        Arc::new(TimestampMicrosecondArray::from(vec![ingested_at_us; n]).with_timezone("UTC")),
    ];
    let batch = RecordBatch::try_new(schema(), columns).expect("columns follow schema");
    let table = warehouse.quarantine_dir();
    let bytes = parquet_bytes(&batch, base_writer_properties().build(), &table)?;
    let hashes = records.iter().map(|(hash, _)| hash.as_str());
    stage_side_file(warehouse, QUARANTINE, &day_path(day), hashes, &bytes).map(Some)
}

/// What a compliance delete asks the quarantine to forget: rows that name one of these users or
/// event ids.
#[derive(Clone, Debug, Default)]
pub struct Scrub<'a> {
    /// User ids.
    pub user_ids: &'a [i64],
    /// Event ids.
    pub event_ids: &'a [String],
}

impl Scrub<'_> {
    /// Whether a quarantined record names a user or event id of the request. A record that is a
    /// JSON object is matched on its `user_id` and `event_id` fields (numbers or strings); any
    /// other bytes (a broken line, a whole rejected file) are searched for `"user_id": <id>` and
    /// for each event id in quotes. A record that merely mentions them goes too: for a compliance
    /// delete, removing too much quarantine is the safe side.
    pub fn names(&self, raw: &[u8]) -> bool {
        let as_text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(raw) {
            let user = map.get("user_id").and_then(as_text);
            let event = map.get("event_id").and_then(as_text);
            return user.is_some_and(|u| self.user_ids.iter().any(|id| id.to_string() == u))
                || event.is_some_and(|e| self.event_ids.contains(&e));
        }
        let text = String::from_utf8_lossy(raw);
        self.event_ids
            .iter()
            .any(|id| text.contains(&format!("\"{id}\"")))
            || self
                .user_ids
                .iter()
                .any(|id| mentions_user(&text, &id.to_string()))
    }
}

/// Whether `text` has `"user_id"`, a colon, and then `user` (quoted or not) as a whole number.
fn mentions_user(text: &str, user: &str) -> bool {
    let mut rest = text;
    while let Some(at) = rest.find("\"user_id\"") {
        rest = &rest[at + "\"user_id\"".len()..];
        let value = rest.trim_start();
        let Some(value) = value.strip_prefix(':') else {
            continue;
        };
        let value = value.trim_start();
        let value = value.strip_prefix('"').unwrap_or(value);
        if let Some(after) = value.strip_prefix(user) {
            if !after.starts_with(|c: char| c.is_ascii_digit()) {
                return true;
            }
        }
    }
    false
}

/// What scrubbing the quarantine did.
#[derive(Clone, Debug, Default)]
pub struct Scrubbed {
    /// Rows removed.
    pub rows_removed: u64,
    /// Files rewritten or removed, relative to the warehouse.
    pub files: Vec<String>,
}

/// Rewrites every quarantine file that holds rows `scrub` names without them (atomically, through
/// the staging area; a file left with no row is removed). Running it again finds nothing.
pub fn scrub(warehouse: &Warehouse, scrub: &Scrub<'_>) -> Result<Scrubbed, ScrubError> {
    use arrow::array::{Array, BooleanArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let mut out = Scrubbed::default();
    if scrub.user_ids.is_empty() && scrub.event_ids.is_empty() {
        return Ok(out);
    }
    let mut files: Vec<std::path::PathBuf> = walkdir::WalkDir::new(warehouse.quarantine_dir())
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "parquet"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    for path in files {
        let read = |detail: String| ScrubError::Read {
            path: path.clone(),
            detail,
        };
        let file = std::fs::File::open(&path).map_err(|e| read(e.to_string()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| read(e.to_string()))?;
        let mut kept = Vec::new();
        let mut removed = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| read(e.to_string()))?;
            let raw = batch
                .column_by_name("raw")
                .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
                .ok_or_else(|| read("no binary raw column".into()))?;
            let keep: BooleanArray = (0..raw.len())
                .map(|i| Some(raw.is_null(i) || !scrub.names(raw.value(i))))
                .collect();
            removed += keep.iter().filter(|k| *k == Some(false)).count() as u64;
            kept.push(
                arrow::compute::filter_record_batch(&batch, &keep)
                    .map_err(|e| read(e.to_string()))?,
            );
        }
        if removed == 0 {
            continue;
        }
        let rows: usize = kept.iter().map(RecordBatch::num_rows).sum();
        if rows == 0 {
            std::fs::remove_file(&path).map_err(|source| {
                ScrubError::Write(WriteError::Io {
                    path: path.clone(),
                    source,
                })
            })?;
        } else {
            let batch = arrow::compute::concat_batches(&schema(), &kept)
                .map_err(|e| read(e.to_string()))?;
            let bytes = parquet_bytes(&batch, base_writer_properties().build(), &path)?;
            let staged = warehouse.staging_dir().join(format!(
                "scrub-{}",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            replace(&staged, &path, &bytes)?;
        }
        out.rows_removed += removed;
        out.files.push(
            path.strip_prefix(warehouse.root())
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned(),
        );
    }
    Ok(out)
}

/// The quarantine could not be scrubbed; running the same delete again finishes it.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    /// A quarantine file could not be read.
    #[error("reading quarantine file {path}: {detail}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        detail: String,
    },
    /// A rewrite failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrub_names_records_by_field_or_by_mention() {
        let ids = ["ev-7".to_string()];
        let scrub = Scrub {
            user_ids: &[42],
            event_ids: &ids,
        };
        assert!(scrub.names(br#"{"user_id": 42, "country": "??"}"#));
        assert!(scrub.names(br#"{"user_id": "42"}"#));
        assert!(scrub.names(br#"{"event_id": "ev-7", "user_id": 1}"#));
        assert!(!scrub.names(br#"{"user_id": 421, "event_id": "ev-70"}"#));
        // Broken JSON: searched as text.
        assert!(scrub.names(br#"{"user_id" : 42, "country": "#));
        assert!(scrub.names(br#"{"event_id":"ev-7","#));
        assert!(!scrub.names(br#"{"user_id": 4200, "#));
        assert!(!scrub.names(b"not json at all 42"));
    }
}
