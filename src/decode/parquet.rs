//! Parquet: a whole file → events, or one quarantine record per bad row, or the file rejected.
//!
//! Guarantees:
//! - **All or nothing per file.** If the file cannot be opened, any batch fails to read
//!   (truncated, corrupt), the reader panics, or a required column is missing, appears twice or
//!   has a type that cannot hold the field, the result is exactly one quarantine record with
//!   position `file` and no events. The rows of a readable file are never partly read.
//! - Otherwise every row is exactly one event or one quarantine record with position `row N`
//!   (0-based over the file) and `raw` = the row's event columns as one JSON object, in schema
//!   order (a column the file lacks is left out; a timestamp is written as RFC 3339 UTC).
//! - Columns are found by name; other columns are not read at all (forward compatible, and the
//!   raw layer's `dedup_key`, `source`, `source_hash`, `key_algorithm` are ignored).
//!
//! Accepted column types: strings as `Utf8`, `LargeUtf8`, `Utf8View` or a dictionary of those;
//! integers as any signed or unsigned integer type (`UInt64` values above `i64::MAX` fail the row);
//! `event_time` as a timestamp of any unit, with or without a time zone (without one, the values
//! are taken as UTC), or `Int64` epoch microseconds.
//!
//! Speed: the file is decoded column-wise in batches; each batch's columns are downcast once, and
//! a row costs no allocation unless a string of its [`Event`](crate::event::Event) is longer than
//! 24 bytes.

use std::panic::{catch_unwind, AssertUnwindSafe};

use ::parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use ::parquet::arrow::ProjectionMask;
use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, LargeStringArray, StringArray, StringViewArray,
    UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, Schema, TimeUnit, UInt64Type};
use arrow::record_batch::RecordBatchReader;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat};

use super::{file_quarantine, to_micros, validate, Decoded, Raw, RawEvent};
use crate::event::Quarantined;

/// Rows per decoded batch.
const BATCH_ROWS: usize = 8192;

/// What a column must be able to hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Str,
    Int,
    /// A timestamp of any unit, or `Int64` epoch microseconds.
    Time,
}

/// The event columns in the order of [`RawEvent`]: name, what it holds, whether it is required.
const COLUMNS: [(&str, Want, bool); 13] = [
    ("event_id", Want::Str, false),
    ("event_type", Want::Str, true),
    ("event_time", Want::Time, true),
    ("ad_id", Want::Int, true),
    ("campaign_id", Want::Int, true),
    ("advertiser_id", Want::Int, true),
    ("country", Want::Str, true),
    ("user_id", Want::Int, true),
    ("ip", Want::Str, true),
    ("cost_micros", Want::Int, false),
    ("revenue_micros", Want::Int, false),
    ("producer", Want::Str, true),
    ("revision", Want::Int, false),
];

/// Decodes a whole Parquet file. `source` is only a label copied into quarantine records.
///
/// Takes [`Bytes`] so a caller that already holds the file as `Bytes` (or a `Vec<u8>`, via
/// `Bytes::from`) hands it over without a copy; the reader slices it without copying.
pub fn decode_parquet(source: &str, bytes: Bytes) -> Decoded {
    match guarded(|| read(source, bytes.clone(), None)) {
        Ok(decoded) => decoded,
        Err(reason) => file_quarantine(source, &bytes, reason),
    }
}

/// Runs a read of untrusted bytes. The reader is a third-party library: a panic in it is one more
/// way for a file to be unreadable (nothing decoded before the panic is kept).
fn guarded(read: impl FnOnce() -> Result<Decoded, String>) -> Result<Decoded, String> {
    match catch_unwind(AssertUnwindSafe(read)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            Err(format!(
                "not a readable Parquet file: the Parquet reader panicked ({message})"
            ))
        }
    }
}

/// Rows below which a file is decoded on one thread whatever [`decode_parquet_parallel`] is asked.
const MIN_ROWS_PER_PART: usize = 4 * BATCH_ROWS;

/// Like [`decode_parquet`], with the file's rows split into up to `parts` consecutive ranges
/// decoded on as many threads: the same result (events and quarantine records in file order,
/// positions counted over the whole file), sooner when one large file is all there is to decode.
/// A file that any part finds unreadable is decoded again whole, on this thread, so its one
/// quarantine record is exactly [`decode_parquet`]'s.
pub fn decode_parquet_parallel(source: &str, bytes: Bytes, parts: usize) -> Decoded {
    // The footer, parsed once for every part.
    let footer = catch_unwind(AssertUnwindSafe(|| {
        let meta = ArrowReaderMetadata::load(&bytes, Default::default()).ok()?;
        let rows = usize::try_from(meta.metadata().file_metadata().num_rows()).ok()?;
        Some((meta, rows))
    }))
    .ok()
    .flatten();
    let parts = parts
        .min(
            footer
                .as_ref()
                .map_or(0, |(_, rows)| rows / MIN_ROWS_PER_PART),
        )
        .max(1);
    let (Some((meta, rows)), true) = (footer, parts > 1) else {
        return decode_parquet(source, bytes);
    };
    let ranges: Vec<(usize, usize)> = (0..parts)
        .map(|k| (k * rows / parts, (k + 1) * rows / parts))
        .collect();
    let decoded: Vec<Result<Decoded, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|&range| {
                let (bytes, meta) = (bytes.clone(), &meta);
                scope.spawn(move || guarded(|| read(source, bytes, Some((meta, range)))))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a decoding thread panicked".into()))
            })
            .collect()
    });
    let rows: usize = decoded
        .iter()
        .map(|part| part.as_ref().map_or(0, |p| p.events.len()))
        .sum();
    // Into the first part's vectors (the others' events are moved once).
    let mut parts = decoded.into_iter();
    let Some(Ok(mut out)) = parts.next() else {
        return decode_parquet(source, bytes);
    };
    out.events.reserve(rows - out.events.len());
    for part in parts {
        match part {
            Ok(part) => {
                out.events.extend(part.events);
                out.quarantined.extend(part.quarantined);
            }
            Err(_) => return decode_parquet(source, bytes),
        }
    }
    out
}

/// The most events a file's footer can make [`read`] reserve room for before it has decoded any.
const MAX_RESERVED_ROWS: usize = 1 << 18;

fn unreadable(e: impl std::fmt::Display) -> String {
    format!("not a readable Parquet file: {e}")
}

/// The file's decoded rows (with `part`, its footer already parsed and the rows `start..end`;
/// else all), or why the whole file is rejected.
fn read(
    source: &str,
    bytes: Bytes,
    part: Option<(&ArrowReaderMetadata, (usize, usize))>,
) -> Result<Decoded, String> {
    let mut builder = match part {
        Some((meta, _)) => ParquetRecordBatchReaderBuilder::new_with_metadata(bytes, meta.clone()),
        None => ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(unreadable)?,
    };
    let roots = plan(builder.schema())?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let range = part.map(|(_, range)| range);
    // The rows the footer promises, as a capacity (growing the vector copied every event about
    // once more: 1.2% of a load's instructions); capped, since a footer can lie.
    let promised = range.map_or_else(
        || usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0),
        |(start, end)| end - start,
    );
    if let Some((start, end)) = range {
        builder = builder.with_row_selection(RowSelection::from(vec![
            RowSelector::skip(start),
            RowSelector::select(end - start),
        ]));
    }
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(unreadable)?;
    // Where each event column is among the projected ones (`None`: optional and absent).
    let schema = reader.schema();
    let positions = COLUMNS.map(|(name, _, _)| schema.index_of(name).ok());

    let mut out = Decoded {
        events: Vec::with_capacity(promised.min(MAX_RESERVED_ROWS)),
        ..Decoded::default()
    };
    let mut row: u64 = range.map_or(0, |(start, _)| start as u64);
    for batch in reader {
        let batch = batch.map_err(unreadable)?;
        let mut cols: [Col; 13] = Default::default();
        for ((col, &position), &(name, want, _)) in cols.iter_mut().zip(&positions).zip(&COLUMNS) {
            if let Some(position) = position {
                let array = batch
                    .columns()
                    .get(position)
                    .ok_or_else(|| unreadable(format!("column `{name}` lost")))?;
                *col = Col::new(array, want).map_err(|e| format!("column `{name}`: {e}"))?;
            }
        }
        let [event_id, event_type, event_time, ad_id, campaign_id, advertiser_id, country, user_id, ip, cost_micros, revenue_micros, producer, revision] =
            &cols;
        for i in 0..batch.num_rows() {
            let raw = RawEvent {
                event_id: event_id.get(i),
                event_type: event_type.get(i),
                event_time: event_time.get(i),
                ad_id: ad_id.get(i),
                campaign_id: campaign_id.get(i),
                advertiser_id: advertiser_id.get(i),
                country: country.get(i),
                user_id: user_id.get(i),
                ip: ip.get(i),
                cost_micros: cost_micros.get(i),
                revenue_micros: revenue_micros.get(i),
                producer: producer.get(i),
                revision: revision.get(i),
            };
            match validate(&raw) {
                Ok(event) => out.events.push(event),
                Err(reason) => out.quarantined.push(Quarantined {
                    source: source.to_owned(),
                    position: format!("row {row}"),
                    raw: render(&raw),
                    reason,
                }),
            }
            row = row.saturating_add(1);
        }
    }
    Ok(out)
}

/// Checks the file's schema against [`COLUMNS`]; returns the root indices of the columns to read.
fn plan(schema: &Schema) -> Result<Vec<usize>, String> {
    let mut roots = Vec::with_capacity(COLUMNS.len());
    for (name, want, required) in COLUMNS {
        let mut found = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| f.name() == name);
        let Some((index, field)) = found.next() else {
            if required {
                return Err(format!("required column `{name}` is missing"));
            }
            continue;
        };
        if found.next().is_some() {
            return Err(format!("column `{name}` appears more than once"));
        }
        if !usable(want, field.data_type()) {
            let expected = match want {
                Want::Str => "a string type",
                Want::Int => "an integer type",
                Want::Time => "a timestamp or Int64 epoch microseconds",
            };
            return Err(format!(
                "column `{name}` has type {}, expected {expected}",
                field.data_type()
            ));
        }
        roots.push(index);
    }
    roots.sort_unstable();
    Ok(roots)
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn usable(want: Want, t: &DataType) -> bool {
    match want {
        Want::Str => is_string(t) || matches!(t, DataType::Dictionary(_, v) if is_string(v)),
        Want::Int => t.is_integer(),
        Want::Time => matches!(t, DataType::Timestamp(_, _) | DataType::Int64),
    }
}

/// One batch's column, downcast once, so reading a cell is one match.
#[derive(Default)]
enum Col {
    /// An optional column the file does not have.
    #[default]
    Absent,
    Utf8(StringArray),
    LargeUtf8(LargeStringArray),
    Utf8View(StringViewArray),
    I64(Int64Array),
    U64(UInt64Array),
    /// A timestamp's raw values and unit.
    Time(Int64Array, TimeUnit),
}

impl Col {
    fn new(array: &ArrayRef, want: Want) -> Result<Col, String> {
        let cast_to = |t: &DataType| cast(array, t).map_err(|e| e.to_string());
        let int64 = |a: &ArrayRef| {
            a.as_primitive_opt::<Int64Type>()
                .cloned()
                .ok_or("not Int64 after cast")
        };
        let col = match (want, array.data_type()) {
            (Want::Str, DataType::Utf8) => array.as_string_opt::<i32>().cloned().map(Col::Utf8),
            (Want::Str, DataType::LargeUtf8) => {
                array.as_string_opt::<i64>().cloned().map(Col::LargeUtf8)
            }
            (Want::Str, DataType::Utf8View) => {
                array.as_string_view_opt().cloned().map(Col::Utf8View)
            }
            (Want::Str, DataType::Dictionary(_, _)) => cast_to(&DataType::Utf8)?
                .as_string_opt::<i32>()
                .cloned()
                .map(Col::Utf8),
            (Want::Int | Want::Time, DataType::Int64) => {
                array.as_primitive_opt::<Int64Type>().cloned().map(Col::I64)
            }
            (Want::Int, DataType::UInt64) => array
                .as_primitive_opt::<UInt64Type>()
                .cloned()
                .map(Col::U64),
            (Want::Int, t) if t.is_integer() => Some(Col::I64(int64(&cast_to(&DataType::Int64)?)?)),
            (Want::Time, DataType::Timestamp(unit, _)) => {
                // Reinterprets the stored i64 values; no unit conversion.
                Some(Col::Time(int64(&cast_to(&DataType::Int64)?)?, *unit))
            }
            _ => None,
        };
        col.ok_or_else(|| format!("unexpected type {}", array.data_type()))
    }

    /// Row `i` of the batch (`i` < the batch's row count, which every column has).
    #[inline]
    fn get(&self, i: usize) -> Raw<'_> {
        match self {
            Col::Absent => Raw::Absent,
            Col::Utf8(a) if a.is_null(i) => Raw::Null,
            Col::Utf8(a) => Raw::Str(a.value(i)),
            Col::LargeUtf8(a) if a.is_null(i) => Raw::Null,
            Col::LargeUtf8(a) => Raw::Str(a.value(i)),
            Col::Utf8View(a) if a.is_null(i) => Raw::Null,
            Col::Utf8View(a) => Raw::Str(a.value(i)),
            Col::I64(a) if a.is_null(i) => Raw::Null,
            Col::I64(a) => Raw::Int(a.value(i)),
            Col::U64(a) if a.is_null(i) => Raw::Null,
            Col::U64(a) => {
                let v = a.value(i);
                i64::try_from(v).map_or(Raw::UInt(v), Raw::Int)
            }
            Col::Time(a, _) if a.is_null(i) => Raw::Null,
            Col::Time(a, unit) => Raw::Time(a.value(i), *unit),
        }
    }
}

/// A rejected row's event columns as one JSON object, in schema order.
fn render(raw: &RawEvent<'_>) -> Vec<u8> {
    let mut out = String::from("{");
    for (name, value) in raw.fields() {
        if value == Raw::Absent {
            continue;
        }
        if out.len() > 1 {
            out.push(',');
        }
        push_json_str(&mut out, name);
        out.push(':');
        match value {
            Raw::Absent | Raw::Null => out.push_str("null"),
            Raw::Int(v) => out.push_str(&v.to_string()),
            Raw::UInt(v) => out.push_str(&v.to_string()),
            Raw::Float(v) => out.push_str(
                &serde_json::Number::from_f64(v).map_or("null".to_owned(), |n| n.to_string()),
            ),
            Raw::Bool(v) => out.push_str(if v { "true" } else { "false" }),
            Raw::Str(s) => push_json_str(&mut out, s),
            Raw::Time(v, unit) => {
                let rfc3339 = to_micros(v, unit)
                    .and_then(DateTime::from_timestamp_micros)
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
                match rfc3339 {
                    Some(t) => push_json_str(&mut out, &t),
                    None => push_json_str(&mut out, &value.to_string()),
                }
            }
            Raw::Nested(kind) => push_json_str(&mut out, kind),
        }
    }
    out.push('}');
    out.into_bytes()
}

fn push_json_str(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serialising a `str` cannot fail; stay valid JSON regardless.
        Err(_) => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_rows_are_json_objects_in_schema_order() {
        let raw = RawEvent {
            event_id: Raw::Null,
            event_type: Raw::Str("cl\"ick"),
            event_time: Raw::Time(1_700_000_000, TimeUnit::Second),
            ad_id: Raw::Int(-1),
            campaign_id: Raw::UInt(u64::MAX),
            advertiser_id: Raw::Int(1),
            country: Raw::Str("DE"),
            user_id: Raw::Int(2),
            ip: Raw::Str("::1"),
            cost_micros: Raw::Absent,
            revenue_micros: Raw::Null,
            producer: Raw::Str("web"),
            revision: Raw::Time(i64::MAX, TimeUnit::Second),
        };
        let text = String::from_utf8(render(&raw)).unwrap_or_default();
        assert_eq!(
            text,
            r#"{"event_id":null,"event_type":"cl\"ick","event_time":"2023-11-14T22:13:20Z","ad_id":-1,"campaign_id":18446744073709551615,"advertiser_id":1,"country":"DE","user_id":2,"ip":"::1","revenue_micros":null,"producer":"web","revision":"9223372036854775807 seconds since the epoch"}"#
        );
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
    }
}
