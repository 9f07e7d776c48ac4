//! The decode stage against good and bad input: JSON lines and Parquet round trips, then every
//! kind of bad record or file the pipeline must quarantine instead of accepting or crashing.
//!
//! Every test checks the accounting invariant: each input record is exactly one event or one
//! quarantine record, or the whole source is exactly one `file` quarantine record.

use std::sync::Arc;

use adsmetrics::decode::{
    decode_json_lines, decode_parquet, decode_source, Decoded, MAX_RAW_FILE_BYTES,
};
use adsmetrics::event::{Event, MAX_AMOUNT_MICROS};
use adsmetrics::schema::{event_fields, events_to_batch};
use adsmetrics_dataflows::{Country, EventType};
use arrow::array::{
    Array, ArrayRef, DictionaryArray, Int32Array, Int64Array, LargeStringArray, StringArray,
    StringViewArray, TimestampMillisecondArray, TimestampNanosecondArray, TimestampSecondArray,
    UInt64Array,
};
use arrow::datatypes::{Field, Int32Type, Schema};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A varied, valid sample: with and without ids and amounts, all types, several producers.
fn sample(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let i64i = i as i64;
            Event {
                event_id: (i % 5 != 0).then(|| format!("ev-{i}").into()),
                event_type: [
                    EventType::Impression,
                    EventType::Click,
                    EventType::Conversion,
                ][i % 3],
                event_time_us: 1_700_000_000_000_000 + i64i * 1_234_567,
                ad_id: 100 + i64i % 17,
                campaign_id: 10 + i64i % 7,
                advertiser_id: i64i % 3,
                country: [Country(*b"DE"), Country(*b"US"), Country(*b"BR")][i % 3],
                user_id: 1_000 + i64i % 101,
                ip: if i % 2 == 0 {
                    format!("10.0.{}.{}", i % 250, i % 7).into()
                } else {
                    format!("2001:db8::{:x}", i % 0x1_0000).into()
                },
                cost_micros: (i % 4 != 0).then_some(i64i * 10),
                revenue_micros: (i % 3 == 2).then_some(i64i * 1_000),
                producer: ["web", "ios", "android", "server-2"][i % 4].into(),
                revision: (i % 6) as u32,
            }
        })
        .collect()
}

fn rfc3339(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// `e` as a JSON object, its time as RFC 3339 or as epoch microseconds.
fn json_object(e: &Event, time_as_micros: bool) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(id) = &e.event_id {
        m.insert("event_id".into(), json!(id));
    }
    m.insert("event_type".into(), json!(e.event_type.as_str()));
    let time = if time_as_micros {
        json!(e.event_time_us)
    } else {
        json!(rfc3339(e.event_time_us))
    };
    m.insert("event_time".into(), time);
    m.insert("ad_id".into(), json!(e.ad_id));
    m.insert("campaign_id".into(), json!(e.campaign_id));
    m.insert("advertiser_id".into(), json!(e.advertiser_id));
    m.insert("country".into(), json!(e.country.as_str()));
    m.insert("user_id".into(), json!(e.user_id));
    m.insert("ip".into(), json!(e.ip));
    if let Some(c) = e.cost_micros {
        m.insert("cost_micros".into(), json!(c));
    }
    m.insert("revenue_micros".into(), json!(e.revenue_micros)); // null when None
    m.insert("producer".into(), json!(e.producer));
    if e.revision != 0 {
        m.insert("revision".into(), json!(e.revision));
    }
    m
}

fn valid_object() -> Map<String, Value> {
    json_object(&sample(2)[1], false)
}

fn line_of(m: &Map<String, Value>) -> String {
    Value::Object(m.clone()).to_string()
}

/// Decodes one JSON object with `field` set to `value`.
fn decode_with(field: &str, value: Value) -> Decoded {
    let mut m = valid_object();
    m.insert(field.into(), value);
    let d = decode_json_lines("t.jsonl", line_of(&m).as_bytes());
    assert_accounts(&d, 1);
    d
}

/// The one reason for a single rejected JSON object with `field` set to `value`.
fn reason_with(field: &str, value: Value) -> String {
    let d = decode_with(field, value.clone());
    assert_eq!(d.quarantined.len(), 1, "{field} = {value} was accepted");
    d.quarantined[0].reason.clone()
}

fn parquet_bytes(batch: &RecordBatch) -> Vec<u8> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1000))
        .build();
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).expect("writer");
    writer.write(batch).expect("write");
    writer.close().expect("close");
    buf
}

fn decode_pq(bytes: &[u8]) -> Decoded {
    decode_parquet("t.parquet", Bytes::copy_from_slice(bytes))
}

/// `events` as a batch with column `name` replaced (or appended) by `column`.
fn batch_with(events: &[Event], name: &str, column: ArrayRef) -> RecordBatch {
    let batch = events_to_batch(events);
    let mut fields: Vec<Field> = event_fields();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    let field = Field::new(name, column.data_type().clone(), true);
    match fields.iter().position(|f| f.name() == name) {
        Some(i) => {
            fields[i] = field;
            columns[i] = column;
        }
        None => {
            fields.push(field);
            columns.push(column);
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch")
}

/// `events` as a batch without column `name`.
fn batch_without(events: &[Event], name: &str) -> RecordBatch {
    let batch = events_to_batch(events);
    let i = batch.schema().index_of(name).expect("known column");
    let mut batch = batch;
    batch.remove_column(i);
    batch
}

/// The accounting invariant for a source of `records` records.
fn assert_accounts(d: &Decoded, records: usize) {
    if d.quarantined.iter().any(|q| q.position == "file") {
        assert_eq!(d.quarantined.len(), 1, "a file quarantine comes alone");
        assert!(d.events.is_empty(), "a quarantined file yields no events");
    } else {
        assert_eq!(
            d.events.len() + d.quarantined.len(),
            records,
            "every record accounted for once"
        );
    }
}

fn assert_file_quarantine(d: &Decoded, reason_contains: &str) {
    assert!(d.events.is_empty(), "no events from a rejected file");
    assert_eq!(d.quarantined.len(), 1, "{:?}", d.quarantined);
    let q = &d.quarantined[0];
    assert_eq!(q.position, "file");
    assert!(
        q.reason.contains(reason_contains),
        "reason {:?} lacks {reason_contains:?}",
        q.reason
    );
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn json_round_trip() {
    let events = sample(200);
    let text: String = events
        .iter()
        .enumerate()
        .map(|(i, e)| line_of(&json_object(e, i % 2 == 0)) + "\n")
        .collect();
    let d = decode_json_lines("t.jsonl", text.as_bytes());
    assert!(d.quarantined.is_empty(), "{:?}", d.quarantined.first());
    assert_eq!(d.events, events);
    for name in ["a/b/t.jsonl", "t.json", "T.NDJSON"] {
        assert_eq!(decode_source(name, text.as_bytes()), d, "{name}");
    }
}

#[test]
fn parquet_round_trip() {
    let events = sample(2_500); // several row groups and read batches
    let bytes = parquet_bytes(&events_to_batch(&events));
    let d = decode_pq(&bytes);
    assert!(d.quarantined.is_empty(), "{:?}", d.quarantined.first());
    assert_eq!(d.events, events);
    assert_eq!(decode_source("x/y.parquet", &bytes), d);
    assert_eq!(
        decode_source("no-extension", &bytes),
        d,
        "PAR1 magic is sniffed"
    );
}

#[test]
fn empty_sources_have_no_records() {
    assert_eq!(decode_json_lines("t.jsonl", b""), Decoded::default());
    assert_eq!(
        decode_json_lines("t.jsonl", b"\n \r\n\t\n"),
        Decoded::default()
    );
    let bytes = parquet_bytes(&events_to_batch(&[]));
    assert_eq!(decode_pq(&bytes), Decoded::default());
}

#[test]
fn rfc3339_offsets_and_epoch_micros_agree() {
    let us = 1_710_073_800_123_456; // 2024-03-10T12:30:00.123456Z
    let mut times = vec![
        json!(us),
        json!("2024-03-10T12:30:00.123456Z"),
        json!("2024-03-10T14:30:00.123456+02:00"),
        json!("2024-03-10T07:00:00.123456-05:30"),
        json!("2024-03-10t12:30:00.123456z"),
        json!("2024-03-10T12:30:00.123456789Z"), // nanoseconds truncate
    ];
    let text: String = times
        .drain(..)
        .map(|t| {
            let mut m = valid_object();
            m.insert("event_time".into(), t);
            line_of(&m) + "\n"
        })
        .collect();
    let d = decode_json_lines("t.jsonl", text.as_bytes());
    assert!(d.quarantined.is_empty(), "{:?}", d.quarantined);
    assert_eq!(d.events.len(), 6);
    assert!(d.events.iter().all(|e| e.event_time_us == us));
}

#[test]
fn json_lines_layout() {
    let events = sample(3);
    let lines: Vec<String> = events
        .iter()
        .map(|e| line_of(&json_object(e, false)))
        .collect();
    // BOM, CRLF, blank and whitespace-only lines, no final newline.
    let text = format!(
        "\u{feff}{}\r\n\r\n   \t\n{}\n\n{}",
        lines[0], lines[1], lines[2]
    );
    let d = decode_json_lines("t.jsonl", text.as_bytes());
    assert!(d.quarantined.is_empty(), "{:?}", d.quarantined);
    assert_eq!(d.events, events);

    // Line numbers count blank lines too; raw is the line without its terminator.
    let text = format!("{}\r\n\nnot json\r\n{}\n", lines[0], lines[1]);
    let d = decode_json_lines("t.jsonl", text.as_bytes());
    assert_accounts(&d, 3);
    assert_eq!(d.quarantined.len(), 1);
    let q = &d.quarantined[0];
    assert_eq!(
        (q.source.as_str(), q.position.as_str(), q.raw.as_slice()),
        ("t.jsonl", "line 3", &b"not json"[..])
    );
    assert!(
        q.reason.starts_with("line is not valid JSON"),
        "{}",
        q.reason
    );
}

// ---------------------------------------------------------------------------------------------
// Bad files

#[test]
fn truncated_parquet_is_one_file_quarantine() {
    let bytes = parquet_bytes(&events_to_batch(&sample(3_000)));
    let half = &bytes[..bytes.len() / 2];
    let d = decode_pq(half);
    assert_file_quarantine(&d, "not a readable Parquet file");
    assert_eq!(d.quarantined[0].raw, half);
    assert_eq!(d.quarantined[0].source, "t.parquet");
    assert_eq!(decode_source("t.parquet", half), d);
    // Every cut, not just the half: never a panic, never a partial file.
    for len in (0..bytes.len()).step_by(97) {
        let d = decode_pq(&bytes[..len]);
        assert_file_quarantine(&d, "not a readable Parquet file");
    }
}

#[test]
fn corrupted_parquet_is_rejected_whole_or_decoded_whole() {
    let events = sample(1_500);
    let bytes = parquet_bytes(&events_to_batch(&events));
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..300 {
        let mut bad = bytes.clone();
        for _ in 0..1 + round % 4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % bad.len() as u64) as usize;
            bad[at] ^= (state >> 32) as u8 | 1;
        }
        let d = decode_pq(&bad);
        assert_accounts(&d, events.len());
    }
}

#[test]
fn garbage_bytes() {
    let garbage: Vec<u8> = (0..10_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();

    let d = decode_source("in/blob.bin", &garbage);
    assert_file_quarantine(&d, "\"in/blob.bin\"");
    assert_eq!(d.quarantined[0].raw, garbage);

    assert_file_quarantine(
        &decode_source("in/blob.parquet", &garbage),
        "not a readable Parquet file",
    );
    let mut magic = b"PAR1".to_vec();
    magic.extend_from_slice(&garbage);
    assert_file_quarantine(
        &decode_source("in/blob", &magic),
        "not a readable Parquet file",
    );
    assert_file_quarantine(
        &decode_source("in/blob", b"PAR1"),
        "not a readable Parquet file",
    );
    assert_file_quarantine(&decode_source("in/blob", b""), "\"in/blob\"");

    // As JSON lines, garbage is quarantined line by line.
    let d = decode_source("in/blob.jsonl", &garbage);
    assert!(d.events.is_empty());
    assert_eq!(d.quarantined.len(), records_in(&garbage));
}

#[test]
fn big_rejected_files_keep_only_the_first_mebibyte() {
    let big = vec![b'x'; MAX_RAW_FILE_BYTES * 2 + 3];
    let d = decode_source("big.csv", &big);
    assert_file_quarantine(&d, "raw holds the first 1048576 of 2097155 bytes");
    assert_eq!(d.quarantined[0].raw.len(), MAX_RAW_FILE_BYTES);
}

#[test]
fn parquet_wrong_column_type() {
    let events = sample(10);
    let ad_ids: ArrayRef = Arc::new(StringArray::from(vec!["abc"; 10]));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "ad_id", ad_ids)));
    assert_file_quarantine(&d, "column `ad_id` has type Utf8, expected an integer type");

    let times: ArrayRef = Arc::new(StringArray::from(vec!["2024-01-01T00:00:00Z"; 10]));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "event_time", times)));
    assert_file_quarantine(&d, "column `event_time`");

    let countries: ArrayRef = Arc::new(Int64Array::from(vec![1; 10]));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "country", countries)));
    assert_file_quarantine(
        &d,
        "column `country` has type Int64, expected a string type",
    );
}

/// The fields an event cannot do without, in either format.
const REQUIRED_FIELDS: [&str; 9] = [
    "event_type",
    "event_time",
    "ad_id",
    "campaign_id",
    "advertiser_id",
    "country",
    "user_id",
    "ip",
    "producer",
];

#[test]
fn parquet_missing_columns() {
    let events = sample(10);
    for name in REQUIRED_FIELDS {
        let d = decode_pq(&parquet_bytes(&batch_without(&events, name)));
        assert_file_quarantine(&d, &format!("required column `{name}` is missing"));
    }
    // Optional columns may be left out entirely.
    let mut batch = events_to_batch(&events);
    for name in ["event_id", "cost_micros", "revenue_micros", "revision"] {
        let i = batch.schema().index_of(name).expect("column");
        batch.remove_column(i);
    }
    let d = decode_pq(&parquet_bytes(&batch));
    assert!(d.quarantined.is_empty(), "{:?}", d.quarantined);
    let expected: Vec<Event> = events
        .into_iter()
        .map(|e| Event {
            event_id: None,
            cost_micros: None,
            revenue_micros: None,
            revision: 0,
            ..e
        })
        .collect();
    assert_eq!(d.events, expected);
}

#[test]
fn parquet_duplicate_column_is_ambiguous() {
    let events = sample(4);
    let batch = events_to_batch(&events);
    let mut fields = event_fields();
    fields.push(Field::new(
        "user_id",
        arrow::datatypes::DataType::Int64,
        false,
    ));
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(Int64Array::from(vec![9; 4])));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch");
    assert_file_quarantine(
        &decode_pq(&parquet_bytes(&batch)),
        "column `user_id` appears more than once",
    );
}

// ---------------------------------------------------------------------------------------------
// Bad records

#[test]
fn json_missing_required_fields() {
    for field in REQUIRED_FIELDS {
        let mut m = valid_object();
        m.remove(field);
        let d = decode_json_lines("t.jsonl", line_of(&m).as_bytes());
        assert_accounts(&d, 1);
        assert_eq!(d.quarantined.len(), 1, "accepted without {field}");
        assert_eq!(d.quarantined[0].reason, format!("{field} is missing"));
        assert_eq!(reason_with(field, Value::Null), format!("{field} is null"));
    }
    // Optional ones may be missing or null.
    for field in ["event_id", "cost_micros", "revenue_micros", "revision"] {
        let mut m = valid_object();
        m.remove(field);
        let d = decode_json_lines("t.jsonl", line_of(&m).as_bytes());
        assert_eq!(d.events.len(), 1, "{field}: {:?}", d.quarantined);
        assert_eq!(
            decode_with(field, Value::Null).events.len(),
            1,
            "{field} null"
        );
    }
}

#[test]
fn non_utf8_line() {
    let good = line_of(&valid_object());
    let mut text = good.clone().into_bytes();
    text.extend_from_slice(b"\n{\"event_type\":\"cl\xffick\"}\n");
    text.extend_from_slice(good.as_bytes());
    let d = decode_json_lines("t.jsonl", &text);
    assert_accounts(&d, 3);
    assert_eq!(d.events.len(), 2);
    let q = &d.quarantined[0];
    assert_eq!(q.position, "line 2");
    assert_eq!(q.raw, b"{\"event_type\":\"cl\xffick\"}");
    assert_eq!(
        q.reason,
        "line is not valid UTF-8 (invalid byte at offset 17)"
    );
}

#[test]
fn not_an_object() {
    for (line, reason) in [
        ("[1,2]", "line is JSON but not an object: an array"),
        ("42", "line is JSON but not an object: a number"),
        ("\"x\"", "line is JSON but not an object: a string"),
        ("null", "line is JSON but not an object: null"),
    ] {
        let d = decode_json_lines("t.jsonl", line.as_bytes());
        assert_accounts(&d, 1);
        assert_eq!(d.quarantined[0].reason, reason);
    }
    let good = line_of(&valid_object());
    for bad in [
        format!("{good} {good}"),
        format!("{good},"),
        good[..good.len() - 1].to_owned(),
    ] {
        let d = decode_json_lines("t.jsonl", bad.as_bytes());
        assert_accounts(&d, 1);
        assert!(
            d.quarantined[0]
                .reason
                .starts_with("line is not a valid JSON object"),
            "{}",
            d.quarantined[0].reason
        );
    }
    // A field given twice is ambiguous.
    let twice = good.replacen('{', "{\"ad_id\":1,", 1);
    let d = decode_json_lines("t.jsonl", twice.as_bytes());
    assert!(
        d.quarantined[0].reason.contains("duplicate field `ad_id`"),
        "{}",
        d.quarantined[0].reason
    );
}

#[test]
fn negative_and_excessive_amounts() {
    assert_eq!(
        reason_with("cost_micros", json!(-5)),
        "cost_micros -5 is negative"
    );
    assert_eq!(
        reason_with("revenue_micros", json!(-1)),
        "revenue_micros -1 is negative"
    );
    assert_eq!(
        reason_with("cost_micros", json!(MAX_AMOUNT_MICROS + 1)),
        format!(
            "cost_micros {} exceeds the maximum of {MAX_AMOUNT_MICROS}",
            MAX_AMOUNT_MICROS + 1
        )
    );
    assert_eq!(
        decode_with("cost_micros", json!(MAX_AMOUNT_MICROS)).events[0].cost_micros,
        Some(MAX_AMOUNT_MICROS)
    );
    assert_eq!(
        decode_with("revenue_micros", json!(0)).events[0].revenue_micros,
        Some(0)
    );

    // The same rule, and the same reason, in Parquet; the rejected row is kept as JSON.
    let events = sample(5);
    let costs: ArrayRef = Arc::new(Int64Array::from(vec![
        Some(1),
        None,
        Some(-5),
        Some(3),
        Some(4),
    ]));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "cost_micros", costs)));
    assert_accounts(&d, 5);
    assert_eq!(d.quarantined.len(), 1);
    let q = &d.quarantined[0];
    assert_eq!(
        (q.position.as_str(), q.reason.as_str()),
        ("row 2", "cost_micros -5 is negative")
    );
    let row: Value = serde_json::from_slice(&q.raw).expect("raw row is JSON");
    assert_eq!(row["cost_micros"], json!(-5));
    assert_eq!(row["ad_id"], json!(events[2].ad_id));
    assert_eq!(row["event_time"], json!(rfc3339(events[2].event_time_us)));
    // ...and decoding the rendered row as a JSON line gives the same verdict.
    assert_eq!(
        decode_json_lines("t.jsonl", &q.raw).quarantined[0].reason,
        q.reason
    );
}

#[test]
fn integers_out_of_range_or_not_integers() {
    assert_eq!(
        reason_with(
            "ad_id",
            serde_json::from_str("9223372036854775808").expect("json")
        ),
        "ad_id 9223372036854775808 is out of the signed 64-bit integer range"
    );
    assert_eq!(
        reason_with(
            "user_id",
            serde_json::from_str("-9223372036854775809").expect("json")
        ),
        "user_id -9.223372036854776e18 is not a 64-bit integer"
    );
    let line = line_of(&valid_object()).replace(
        "\"campaign_id\":11",
        "\"campaign_id\":100000000000000000000000000000",
    );
    let d = decode_json_lines("t.jsonl", line.as_bytes());
    assert_accounts(&d, 1);
    assert_eq!(
        d.quarantined[0].reason,
        "campaign_id 1e29 is not a 64-bit integer"
    );
    assert_eq!(
        reason_with("ad_id", json!(1.5)),
        "ad_id 1.5 is not a 64-bit integer"
    );
    assert_eq!(
        reason_with("ad_id", json!(7.0)),
        "ad_id 7.0 is not a 64-bit integer"
    );
    assert_eq!(
        reason_with("ad_id", json!("7")),
        "ad_id \"7\" is not an integer"
    );
    assert_eq!(
        reason_with("ad_id", json!(true)),
        "ad_id true is not an integer"
    );
    assert_eq!(
        reason_with("ad_id", json!([1])),
        "ad_id […] is not an integer"
    );
    assert_eq!(reason_with("ip", json!({"v": 4})), "ip {…} is not a string");
    assert_eq!(
        reason_with("advertiser_id", json!(-1)),
        "advertiser_id -1 is negative"
    );
    assert_eq!(
        decode_with("ad_id", json!(i64::MAX)).events[0].ad_id,
        i64::MAX
    );
    assert_eq!(decode_with("ad_id", json!(0)).events[0].ad_id, 0);

    // Parquet: narrower and unsigned integer columns work, UInt64 beyond i64 fails the row.
    let events = sample(3);
    let ad_ids: ArrayRef = Arc::new(UInt64Array::from(vec![1, u64::MAX, 3]));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "ad_id", ad_ids)));
    assert_accounts(&d, 3);
    assert_eq!(d.quarantined[0].position, "row 1");
    assert_eq!(
        d.quarantined[0].reason,
        "ad_id 18446744073709551615 is out of the signed 64-bit integer range"
    );
    let users: ArrayRef = Arc::new(Int32Array::from(vec![7, 8, -9]));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "user_id", users)));
    assert_eq!(
        d.events.iter().map(|e| e.user_id).collect::<Vec<_>>(),
        [7, 8]
    );
    assert_eq!(d.quarantined[0].reason, "user_id -9 is negative");
}

#[test]
fn countries() {
    assert_eq!(
        reason_with("country", json!("../x")),
        r#"country "../x" is not an ISO 3166 alpha-2 code"#
    );
    for bad in ["us", "USA", "U", "", "Ü1", "D\u{0}"] {
        assert!(
            reason_with("country", json!(bad)).starts_with("country "),
            "{bad}"
        );
    }
    assert_eq!(
        decode_with("country", json!("FR")).events[0].country,
        Country(*b"FR")
    );

    // Same reason from Parquet, from a dictionary-encoded column.
    let events = sample(3);
    let dict: DictionaryArray<Int32Type> = vec!["DE", "../x", "DE"].into_iter().collect();
    let d = decode_pq(&parquet_bytes(&batch_with(
        &events,
        "country",
        Arc::new(dict),
    )));
    assert_accounts(&d, 3);
    assert_eq!(
        d.quarantined[0].reason,
        r#"country "../x" is not an ISO 3166 alpha-2 code"#
    );
    assert!(d.events.iter().all(|e| e.country == Country(*b"DE")));
}

#[test]
fn other_field_rules() {
    assert_eq!(reason_with("event_id", json!("")), "event_id is empty");
    assert!(reason_with("event_id", json!("x".repeat(257))).contains("is longer than 256 bytes"));
    assert_eq!(
        decode_with("event_id", json!("x".repeat(256))).events.len(),
        1
    );
    assert_eq!(
        reason_with("event_id", json!(12)),
        "event_id 12 is not a string"
    );
    assert_eq!(
        reason_with("event_type", json!("Click")),
        r#"event_type "Click" is not one of impression, click, conversion"#
    );
    assert_eq!(
        reason_with("ip", json!("10.0.0.256")),
        r#"ip "10.0.0.256" is not an IPv4 or IPv6 address"#
    );
    assert_eq!(
        decode_with("ip", json!("::ffff:1.2.3.4")).events[0].ip,
        "::ffff:1.2.3.4"
    );
    for bad in ["Web", "", "a b", "x".repeat(33).as_str(), "wéb"] {
        assert!(
            reason_with("producer", json!(bad)).starts_with("producer "),
            "{bad}"
        );
    }
    assert_eq!(
        decode_with("producer", json!("a".repeat(32))).events.len(),
        1
    );
    assert_eq!(
        decode_with("producer", json!("my_app-2")).events[0].producer,
        "my_app-2"
    );
    // Escaped strings are decoded.
    assert_eq!(
        decode_with("event_id", json!("a\"b\\c\u{e9}")).events[0]
            .event_id
            .as_deref(),
        Some("a\"b\\c\u{e9}")
    );
    let escaped = line_of(&valid_object()).replace("\"ios\"", "\"i\\u006fs\"");
    let d = decode_json_lines("t.jsonl", escaped.as_bytes());
    assert_eq!(d.events.len(), 1, "{:?}", d.quarantined);
}

#[test]
fn event_time_rules() {
    assert!(
        reason_with("event_time", json!("1969-12-31T23:59:59.999999Z"))
            .contains("outside the accepted range")
    );
    assert!(reason_with("event_time", json!("2200-01-01T00:00:00Z"))
        .contains("outside the accepted range"));
    assert!(reason_with("event_time", json!(-1)).contains("outside the accepted range"));
    assert_eq!(
        decode_with("event_time", json!("2199-12-31T23:59:59.999999Z"))
            .events
            .len(),
        1
    );
    assert_eq!(
        decode_with("event_time", json!("1970-01-01T00:00:00Z")).events[0].event_time_us,
        0
    );
    assert_eq!(
        reason_with("event_time", json!("2024-13-01T00:00:00Z")),
        r#"event_time "2024-13-01T00:00:00Z" is not an RFC 3339 timestamp (input is out of range)"#
    );
    assert!(reason_with("event_time", json!("2024-01-01")).contains("is not an RFC 3339 timestamp"));
    assert!(reason_with("event_time", json!(1.5e15))
        .contains("neither an RFC 3339 string nor an integer"));
}

#[test]
fn parquet_timestamp_units_agree() {
    let events = sample(50);
    let us: Vec<i64> = events
        .iter()
        .map(|e| e.event_time_us - e.event_time_us % 1_000_000)
        .collect();
    let events: Vec<Event> = events
        .into_iter()
        .zip(&us)
        .map(|(e, &t)| Event {
            event_time_us: t,
            ..e
        })
        .collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampSecondArray::from(us.iter().map(|t| t / 1_000_000).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(TimestampSecondArray::from(
            us.iter().map(|t| t / 1_000_000).collect::<Vec<_>>(),
        )),
        Arc::new(TimestampMillisecondArray::from(
            us.iter().map(|t| t / 1_000).collect::<Vec<_>>(),
        )),
        Arc::new(
            TimestampMillisecondArray::from(us.iter().map(|t| t / 1_000).collect::<Vec<_>>())
                .with_timezone("+02:00"),
        ),
        Arc::new(TimestampNanosecondArray::from(
            us.iter().map(|t| t * 1_000 + 999).collect::<Vec<_>>(),
        )),
        Arc::new(
            TimestampNanosecondArray::from(us.iter().map(|t| t * 1_000).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(Int64Array::from(us.clone())),
    ];
    for column in columns {
        let data_type = column.data_type().clone();
        let d = decode_pq(&parquet_bytes(&batch_with(&events, "event_time", column)));
        assert!(d.quarantined.is_empty(), "{data_type}: {:?}", d.quarantined);
        assert_eq!(d.events, events, "{data_type}");
    }
    // A time that overflows when converted to microseconds fails its row, not the file.
    let seconds: Vec<i64> = us
        .iter()
        .enumerate()
        .map(|(i, t)| if i == 3 { i64::MAX } else { t / 1_000_000 })
        .collect();
    let d = decode_pq(&parquet_bytes(&batch_with(
        &events,
        "event_time",
        Arc::new(TimestampSecondArray::from(seconds)),
    )));
    assert_accounts(&d, events.len());
    assert_eq!(d.quarantined.len(), 1);
    assert_eq!(d.quarantined[0].position, "row 3");
    assert!(
        d.quarantined[0]
            .reason
            .contains("9223372036854775807 seconds since the epoch"),
        "{}",
        d.quarantined[0].reason
    );
}

#[test]
fn revision_limits() {
    assert_eq!(
        reason_with("revision", json!(4_294_967_296_i64)),
        "revision 4294967296 exceeds the maximum of 4294967295"
    );
    assert_eq!(
        reason_with("revision", json!(u64::MAX)),
        "revision 18446744073709551615 exceeds the maximum of 4294967295"
    );
    assert_eq!(
        reason_with("revision", json!(-1)),
        "revision -1 is negative"
    );
    assert_eq!(
        decode_with("revision", json!(u32::MAX)).events[0].revision,
        u32::MAX
    );

    let events = sample(3);
    let revisions: ArrayRef = Arc::new(Int64Array::from(vec![Some(0), Some(4_294_967_296), None]));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "revision", revisions)));
    assert_accounts(&d, 3);
    assert_eq!(
        d.quarantined[0].reason,
        "revision 4294967296 exceeds the maximum of 4294967295"
    );
    assert_eq!(
        d.events.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [0, 0]
    );
}

#[test]
fn unknown_fields_and_columns_are_ignored() {
    let mut m = valid_object();
    m.insert("dedup_key".into(), json!("00ff"));
    m.insert(
        "future_field".into(),
        json!({"nested": [1, {"deep": null}], "n": 1.5}),
    );
    m.insert("tags".into(), json!(["a", "b"]));
    let d = decode_json_lines("t.jsonl", line_of(&m).as_bytes());
    assert_eq!(d.events, vec![sample(2)[1].clone()]);

    // The raw layer's extra columns, plus one of a type no event column could use.
    let events = sample(20);
    let n = events.len();
    let mut batch = events_to_batch(&events);
    for (name, column) in [
        (
            "dedup_key",
            Arc::new(StringArray::from(vec!["k"; n])) as ArrayRef,
        ),
        ("source", Arc::new(LargeStringArray::from(vec!["s"; n]))),
        ("source_hash", Arc::new(UInt64Array::from(vec![1; n]))),
        (
            "key_algorithm",
            Arc::new(StringViewArray::from(vec!["adsmetrics-key-v1"; n])),
        ),
        (
            "weird",
            Arc::new(arrow::array::BooleanArray::from(vec![true; n])),
        ),
    ] {
        batch = batch_with_batch(batch, name, column);
    }
    let d = decode_pq(&parquet_bytes(&batch));
    assert!(d.quarantined.is_empty(), "{:?}", d.quarantined);
    assert_eq!(d.events, events);
}

fn batch_with_batch(batch: RecordBatch, name: &str, column: ArrayRef) -> RecordBatch {
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut columns = batch.columns().to_vec();
    fields.push(Field::new(name, column.data_type().clone(), false));
    columns.push(column);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch")
}

#[test]
fn parquet_string_encodings() {
    let events = sample(30);
    let n = events.len();
    let ips: ArrayRef = Arc::new(LargeStringArray::from(
        events.iter().map(|e| e.ip.as_str()).collect::<Vec<_>>(),
    ));
    let producers: ArrayRef = Arc::new(StringViewArray::from(
        events
            .iter()
            .map(|e| e.producer.as_str())
            .collect::<Vec<_>>(),
    ));
    let batch = batch_with(&events, "ip", ips);
    let batch = replace(batch, "producer", producers);
    let d = decode_pq(&parquet_bytes(&batch));
    assert!(d.quarantined.is_empty(), "{:?}", d.quarantined);
    assert_eq!(d.events, events);

    // Nulls in required columns fail their rows.
    let types: ArrayRef = Arc::new(StringArray::from(
        (0..n)
            .map(|i| (i != 4).then(|| events[i].event_type.as_str()))
            .collect::<Vec<_>>(),
    ));
    let d = decode_pq(&parquet_bytes(&batch_with(&events, "event_type", types)));
    assert_accounts(&d, n);
    assert_eq!(d.quarantined[0].reason, "event_type is null");
    assert_eq!(d.quarantined[0].position, "row 4");
}

fn replace(batch: RecordBatch, name: &str, column: ArrayRef) -> RecordBatch {
    let i = batch.schema().index_of(name).expect("column");
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut columns = batch.columns().to_vec();
    fields[i] = Field::new(name, column.data_type().clone(), true);
    columns[i] = column;
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch")
}

#[test]
fn same_record_same_verdict_in_both_formats() {
    // Each row breaks one rule; the JSON line and the Parquet row must give the same reason.
    let mut bad = sample(6);
    bad[0].event_id = Some(Default::default());
    bad[1].ip = "nope".into();
    bad[2].producer = "Web".into();
    bad[3].ad_id = -4;
    bad[4].event_time_us = -1;
    bad[5].revenue_micros = Some(MAX_AMOUNT_MICROS + 1);
    let from_parquet = decode_pq(&parquet_bytes(&events_to_batch(&bad)));
    let text: String = bad
        .iter()
        .map(|e| line_of(&json_object(e, true)) + "\n")
        .collect();
    let from_json = decode_json_lines("t.jsonl", text.as_bytes());
    assert_accounts(&from_parquet, 6);
    assert_accounts(&from_json, 6);
    assert_eq!(from_parquet.quarantined.len(), 6);
    for (p, j) in from_parquet.quarantined.iter().zip(&from_json.quarantined) {
        // Times differ in how they are quoted (a Parquet timestamp vs a JSON integer).
        if p.reason.starts_with("event_time") {
            assert!(
                j.reason.starts_with("event_time -1 is outside"),
                "{}",
                j.reason
            );
            assert!(p.reason.contains("is outside"), "{}", p.reason);
        } else {
            assert_eq!(p.reason, j.reason);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Non-blank lines, as the JSON lines decoder counts them.
fn records_in(bytes: &[u8]) -> usize {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(|&b| b == b' ' || b == b'\t' || b == b'\r'))
        .count()
}

fn arb_json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-zA-Z0-9:./_-]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        Just(json!("2024-05-01T10:00:00+01:00")),
        Just(json!("click")),
        Just(json!("DE")),
        Just(json!("::1")),
        Just(json!("web")),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), name in 0..4usize) {
        let source = ["x.parquet", "x.jsonl", "x.bin", "x"][name];
        let d = decode_source(source, &bytes);
        if source == "x.jsonl" {
            prop_assert_eq!(d.events.len() + d.quarantined.len(), records_in(&bytes));
            prop_assert!(d.quarantined.iter().all(|q| q.position.starts_with("line ")));
        } else {
            prop_assert!(d.events.is_empty());
            prop_assert_eq!(d.quarantined.len(), 1);
            prop_assert_eq!(d.quarantined[0].position.as_str(), "file");
        }
    }

    #[test]
    fn parquet_magic_with_arbitrary_bytes_is_one_file_quarantine(tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = b"PAR1".to_vec();
        bytes.extend_from_slice(&tail);
        bytes.extend_from_slice(b"PAR1");
        let d = decode_source("x", &bytes);
        prop_assert!(d.events.is_empty());
        prop_assert_eq!(d.quarantined.len(), 1);
    }

    #[test]
    fn arbitrary_lines_are_each_accounted_for_once(lines in prop::collection::vec(any::<String>(), 0..20)) {
        let text = lines.join("\n");
        let d = decode_json_lines("t.jsonl", text.as_bytes());
        prop_assert_eq!(d.events.len() + d.quarantined.len(), records_in(text.as_bytes()));
        for q in &d.quarantined {
            prop_assert!(q.position.starts_with("line "));
            prop_assert!(!q.reason.is_empty());
        }
    }

    #[test]
    fn arbitrary_field_values_are_accepted_or_quarantined(
        values in prop::collection::vec((0..13usize, arb_json_value()), 0..6),
        remove in prop::collection::vec(0..13usize, 0..3),
    ) {
        const FIELDS: [&str; 13] = ["event_id", "event_type", "event_time", "ad_id", "campaign_id",
            "advertiser_id", "country", "user_id", "ip", "cost_micros", "revenue_micros", "producer", "revision"];
        let mut m = valid_object();
        for (field, value) in values {
            m.insert(FIELDS[field].into(), value);
        }
        for field in remove {
            m.remove(FIELDS[field]);
        }
        let line = line_of(&m);
        let d = decode_json_lines("t.jsonl", line.as_bytes());
        prop_assert_eq!(d.events.len() + d.quarantined.len(), 1);
        // An accepted record survives a round trip through the Parquet writer and reader.
        if let Some(e) = d.events.first() {
            let back = decode_pq(&parquet_bytes(&events_to_batch(std::slice::from_ref(e))));
            prop_assert_eq!(&back.events, &d.events);
        }
    }

    #[test]
    fn mutated_parquet_is_rejected_whole_or_decoded_whole(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 1..4),
    ) {
        let events = sample(40);
        let mut bytes = parquet_bytes(&events_to_batch(&events));
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        let d = decode_pq(&bytes);
        assert_accounts(&d, events.len());
    }
}
