//! The Arrow schema of events in Parquet, and the encoder from decoded events to a record batch.
//!
//! The same columns are written by the generator and (with extra columns) by the raw layer, and read
//! back by the Parquet decoder. `event_time` is `TIMESTAMP(µs, UTC)`, never INT96.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringBuilder, TimestampMicrosecondArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::event::Event;

/// The UTC timestamp type used for every time column this project writes.
pub fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The event columns, in file order.
pub fn event_fields() -> Vec<Field> {
    vec![
        Field::new("event_id", DataType::Utf8, true),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("event_time", utc_micros(), false),
        Field::new("ad_id", DataType::Int64, false),
        Field::new("campaign_id", DataType::Int64, false),
        Field::new("advertiser_id", DataType::Int64, false),
        Field::new("country", DataType::Utf8, false),
        Field::new("user_id", DataType::Int64, false),
        Field::new("ip", DataType::Utf8, false),
        Field::new("cost_micros", DataType::Int64, true),
        Field::new("revenue_micros", DataType::Int64, true),
        Field::new("producer", DataType::Utf8, false),
        Field::new("revision", DataType::UInt32, false),
    ]
}

/// The schema of an event file.
pub fn event_schema() -> SchemaRef {
    Arc::new(Schema::new(event_fields()))
}

/// The event columns of `events`, in the order of [`event_fields`].
pub fn event_columns(events: &[&Event]) -> Vec<ArrayRef> {
    let ints = |f: fn(&Event) -> i64| -> ArrayRef {
        Arc::new(events.iter().map(|e| f(e)).collect::<Int64Array>())
    };
    // Sized before they are filled: collected, a column grew by doubling and copying.
    let strings = |f: fn(&Event) -> Option<&str>| -> ArrayRef {
        let bytes = events.iter().map(|e| f(e).map_or(0, str::len)).sum();
        let mut column = StringBuilder::with_capacity(events.len(), bytes);
        for e in events {
            column.append_option(f(e));
        }
        Arc::new(column.finish())
    };
    vec![
        strings(|e| e.event_id.as_deref()),
        strings(|e| Some(e.event_type.as_str())),
        Arc::new(
            TimestampMicrosecondArray::from(
                events.iter().map(|e| e.event_time_us).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        ints(|e| e.ad_id),
        ints(|e| e.campaign_id),
        ints(|e| e.advertiser_id),
        strings(|e| Some(e.country.as_str())),
        ints(|e| e.user_id),
        strings(|e| Some(e.ip.as_str())),
        Arc::new(events.iter().map(|e| e.cost_micros).collect::<Int64Array>()),
        Arc::new(
            events
                .iter()
                .map(|e| e.revenue_micros)
                .collect::<Int64Array>(),
        ),
        strings(|e| Some(e.producer.as_str())),
        Arc::new(events.iter().map(|e| e.revision).collect::<UInt32Array>()),
    ]
}

/// `events` as one record batch of [`event_schema`].
pub fn events_to_batch(events: &[Event]) -> RecordBatch {
    let events: Vec<&Event> = events.iter().collect();
    RecordBatch::try_new(event_schema(), event_columns(&events))
        .expect("columns are built from the schema's own field list")
}
