//! Curated partition files: rows of one partition → deterministic Parquet bytes, and back.
//!
//! Same rows → same bytes: rows arrive sorted by dims, the writer properties are fixed (no
//! timestamps, a fixed `created_by`), and the version is a content hash of the rows, stored in the
//! file's key-value metadata (`adsmetrics.version`) and in the commit journal. Time columns are
//! `TIMESTAMP(µs, UTC)` and `DATE`, never INT96, and carry the partition key for readers that
//! ignore the `dt=`/`hr=` path.

use std::fmt::Write as _;
use std::fs::File;
use std::sync::Arc;

use adsmetrics_dataflows::{
    ClickDims, Country, Dims, Grain, Ip, MetricRow, PartitionId, MICROS_PER_MINUTE,
};
use arrow::array::{
    ArrayRef, Date32Array, Int64Array, StringArray, StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use xxhash_rust::xxh3::Xxh3;

use crate::schema::utc_micros;
use crate::sink::files::{base_writer_properties, parquet_bytes, WriteError};
use crate::warehouse::{partition_path, period_start_micros, table_name};

/// Metadata key holding the partition version (content hash of the rows).
pub const VERSION_KEY: &str = "adsmetrics.version";

/// The columns of a curated table; hourly tables lead with `event_hour`, hourly and daily carry
/// `event_date` and `unique_users`, the weekly table `week_start` (a Monday) and no users.
/// `ads_clicks_minute` leads with `event_minute` and has the click dimensions `ip` and
/// `user_id`, and only the click metrics.
pub fn table_schema(grain: Grain) -> SchemaRef {
    let mut fields = Vec::new();
    if grain == Grain::Minute {
        return Arc::new(Schema::new(vec![
            Field::new("event_minute", utc_micros(), false),
            Field::new("event_date", DataType::Date32, false),
            Field::new("advertiser_id", DataType::Int64, false),
            Field::new("campaign_id", DataType::Int64, false),
            Field::new("ad_id", DataType::Int64, false),
            Field::new("country", DataType::Utf8, false),
            Field::new("ip", DataType::Utf8, false),
            Field::new("user_id", DataType::Int64, false),
            Field::new("clicks", DataType::Int64, false),
            Field::new("cost_micros", DataType::Int64, false),
            Field::new("revenue_micros", DataType::Int64, false),
        ]));
    }
    if grain == Grain::Hourly {
        fields.push(Field::new("event_hour", utc_micros(), false));
    }
    let date = if grain == Grain::Weekly {
        "week_start"
    } else {
        "event_date"
    };
    fields.extend([
        Field::new(date, DataType::Date32, false),
        Field::new("advertiser_id", DataType::Int64, false),
        Field::new("campaign_id", DataType::Int64, false),
        Field::new("ad_id", DataType::Int64, false),
        Field::new("country", DataType::Utf8, false),
        Field::new("impressions", DataType::Int64, false),
        Field::new("clicks", DataType::Int64, false),
        Field::new("conversions", DataType::Int64, false),
        Field::new("cost_micros", DataType::Int64, false),
        Field::new("revenue_micros", DataType::Int64, false),
    ]);
    if grain.has_unique_users() {
        fields.push(Field::new("unique_users", DataType::Int64, false));
    }
    Arc::new(Schema::new(fields))
}

/// The version of a partition's contents: XXH3-128 over a canonical encoding of its identity and
/// sorted rows, as 32 hex digits. Equal rows ⇔ equal version.
pub fn content_version(id: &PartitionId, rows: &[(Dims, MetricRow)]) -> String {
    let mut h = Xxh3::new();
    h.update(b"adsmetrics/partition/v1\0");
    h.update(table_name(id.grain).as_bytes());
    h.update(&id.period.to_le_bytes());
    // The rows' encoding goes through a buffer, hashed a few kilobytes at a time: the digest of a
    // stream does not depend on how it is cut, and an update per field was a fifth of staging's
    // own time.
    /// Hashed when this full; a row encodes to at most 99 bytes, so it never outgrows the
    /// buffer's first allocation.
    const FLUSH_AT: usize = (8 << 10) - 128;
    let mut buf: Vec<u8> = Vec::with_capacity(8 << 10);
    for (d, r) in rows {
        for v in [d.advertiser_id, d.campaign_id, d.ad_id] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(&d.country.0);
        if id.grain == Grain::Minute {
            // Only this table's cells have click dimensions: the other tables' versions stay
            // what they were before it existed.
            buf.push(d.click.minute);
            buf.extend_from_slice(&d.click.ip.0);
            buf.extend_from_slice(&d.click.user_id.to_le_bytes());
        }
        for v in [
            r.impressions,
            r.clicks,
            r.conversions,
            r.cost_micros,
            r.revenue_micros,
            r.unique_users,
        ] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        if buf.len() >= FLUSH_AT {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    format!("{:032x}", h.digest128())
}

fn writer_properties(id: &PartitionId, version: &str) -> WriterProperties {
    // Dictionary pages only where they make the pages smaller: the country and the small
    // counts. On the ids, times and amounts (near-unique, or sorted runs) they cost an interner
    // lookup per value for nothing: `encode/curated_partition` −19% without them, and a month of
    // tables about the same size (66.4 → 65.4 MB at 5M events).
    let repetitive = [
        "country",
        "impressions",
        "clicks",
        "conversions",
        "unique_users",
    ];
    repetitive
        .iter()
        .fold(
            base_writer_properties().set_dictionary_enabled(false),
            |b, c| b.set_column_dictionary_enabled((*c).into(), true),
        )
        // Min/max per column chunk, which readers prune row groups with; a partition's column
        // is one page, so a page index would repeat them (and cost 0.35% of a load).
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(VERSION_KEY.to_string(), version.to_string()),
            KeyValue::new(
                "adsmetrics.table".to_string(),
                table_name(id.grain).to_string(),
            ),
            KeyValue::new("adsmetrics.partition".to_string(), partition_path(id)),
        ]))
        .build()
}

/// The record batch of a partition's rows (in the given order).
pub fn rows_to_batch(id: &PartitionId, rows: &[(Dims, MetricRow)]) -> RecordBatch {
    let start = period_start_micros(id);
    let date = (start.div_euclid(adsmetrics_dataflows::MICROS_PER_DAY)) as i32;
    let n = rows.len();
    let int = |f: &dyn Fn(&(Dims, MetricRow)) -> i64| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Int64Array>())
    };
    let mut columns: Vec<ArrayRef> = Vec::new();
    if id.grain == Grain::Minute {
        let minute = |d: &Dims| start + i64::from(d.click.minute) * MICROS_PER_MINUTE;
        columns.push(Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|(d, _)| minute(d)))
                .with_timezone("UTC"),
        ));
    }
    if id.grain == Grain::Hourly {
        columns.push(Arc::new(
            TimestampMicrosecondArray::from(vec![start; n]).with_timezone("UTC"),
        ));
    }
    columns.push(Arc::new(Date32Array::from(vec![date; n])));
    columns.push(int(&|(d, _)| d.advertiser_id));
    columns.push(int(&|(d, _)| d.campaign_id));
    columns.push(int(&|(d, _)| d.ad_id));
    // Strings go straight into builders sized for them: collected from an iterator of options,
    // or formatted into a `String` each, they were a third of building the batch.
    let mut country = StringBuilder::with_capacity(n, 2 * n);
    for (d, _) in rows {
        country.append_value(d.country.as_str());
    }
    columns.push(Arc::new(country.finish()));
    if id.grain == Grain::Minute {
        let mut ip = StringBuilder::with_capacity(n, 16 * n);
        for (d, _) in rows {
            write!(ip, "{}", d.click.ip).expect("writing to a string builder does not fail");
            ip.append_value("");
        }
        columns.push(Arc::new(ip.finish()));
        columns.push(int(&|(d, _)| d.click.user_id));
        columns.push(int(&|(_, r)| r.clicks));
        columns.push(int(&|(_, r)| r.cost_micros));
        columns.push(int(&|(_, r)| r.revenue_micros));
    } else {
        columns.push(int(&|(_, r)| r.impressions));
        columns.push(int(&|(_, r)| r.clicks));
        columns.push(int(&|(_, r)| r.conversions));
        columns.push(int(&|(_, r)| r.cost_micros));
        columns.push(int(&|(_, r)| r.revenue_micros));
        if id.grain.has_unique_users() {
            columns.push(int(&|(_, r)| r.unique_users));
        }
    }
    RecordBatch::try_new(table_schema(id.grain), columns).expect("columns follow table_schema")
}

/// Encodes a partition as Parquet bytes carrying `version` in its metadata; `path` names the
/// destination in errors.
pub fn encode_partition(
    id: &PartitionId,
    rows: &[(Dims, MetricRow)],
    version: &str,
    path: &std::path::Path,
) -> Result<Vec<u8>, WriteError> {
    parquet_bytes(
        &rows_to_batch(id, rows),
        writer_properties(id, version),
        path,
    )
}

/// The version recorded in a partition file's metadata, or `None` if absent or unreadable.
pub fn file_version(path: &std::path::Path) -> Option<String> {
    let reader = SerializedFileReader::new(File::open(path).ok()?).ok()?;
    let kv = reader.metadata().file_metadata().key_value_metadata()?;
    kv.iter()
        .find(|k| k.key == VERSION_KEY)
        .and_then(|k| k.value.clone())
}

/// Why a published partition's file could not be taken as the version the journal has for it.
#[derive(Debug, thiserror::Error)]
pub enum PublishedReadError {
    /// The file could not be read as a curated partition.
    #[error("{path}: {detail}")]
    Unreadable {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// Its rows are another version (a publish replaced it after the journal was read, or it
    /// was altered).
    #[error("{path}: its rows are version {file}, the journal published {journal}")]
    OtherVersion {
        /// The file.
        path: std::path::PathBuf,
        /// The version of its rows.
        file: String,
        /// The version the journal has.
        journal: String,
    },
}

/// Reads the file of published partition `id` and checks that its rows are `version`, the one
/// the journal has for it.
pub fn read_published(
    path: &std::path::Path,
    id: &PartitionId,
    version: &str,
) -> Result<Vec<(Dims, MetricRow)>, PublishedReadError> {
    let rows = read_partition(path).map_err(|e| PublishedReadError::Unreadable {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let file = content_version(id, &rows);
    if file != version {
        return Err(PublishedReadError::OtherVersion {
            path: path.to_path_buf(),
            file,
            journal: version.to_string(),
        });
    }
    Ok(rows)
}

/// Reads a partition file back into rows (a run's staging, `show`, `check` and the gate). Every
/// column is decoded, the period columns too, so that a damaged page anywhere in the file is
/// an error here.
pub fn read_partition(
    path: &std::path::Path,
) -> Result<Vec<(Dims, MetricRow)>, Box<dyn std::error::Error + Send + Sync>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    let mut rows = Vec::with_capacity(builder.metadata().file_metadata().num_rows() as usize);
    let reader = builder.build()?;
    for batch in reader {
        let batch = batch?;
        let int = |name: &str| -> Result<Int64Array, Box<dyn std::error::Error + Send + Sync>> {
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| format!("column {name} missing"))?;
            Ok(col
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| format!("column {name} is not Int64"))?
                .clone())
        };
        let country = batch
            .column_by_name("country")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
            .ok_or("column country missing or not Utf8")?;
        let (adv, camp, ad) = (int("advertiser_id")?, int("campaign_id")?, int("ad_id")?);
        let (clk, cost, rev) = (int("clicks")?, int("cost_micros")?, int("revenue_micros")?);
        // `ads_clicks_minute` has its click dimensions and no impression, conversion or user
        // counts; the other tables have no click dimensions.
        let click = match batch.column_by_name("event_minute") {
            Some(minute) => {
                let minute = minute
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .ok_or("column event_minute is not a timestamp")?
                    .clone();
                let ip = batch
                    .column_by_name("ip")
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
                    .ok_or("column ip missing or not Utf8")?;
                Some((minute, ip, int("user_id")?))
            }
            None => None,
        };
        let counts = match click {
            Some(_) => None,
            None => Some((int("impressions")?, int("conversions")?)),
        };
        // The weekly table has no distinct users.
        let users = match batch.column_by_name("unique_users") {
            Some(_) => Some(int("unique_users")?),
            None => None,
        };
        for i in 0..batch.num_rows() {
            let click = match &click {
                Some((minute, ip, user)) => ClickDims {
                    minute: minute.value(i).div_euclid(MICROS_PER_MINUTE).rem_euclid(60) as u8,
                    ip: Ip::parse(ip.value(i)).ok_or("bad ip in curated file")?,
                    user_id: user.value(i),
                },
                None => ClickDims::default(),
            };
            let dims = Dims {
                advertiser_id: adv.value(i),
                campaign_id: camp.value(i),
                ad_id: ad.value(i),
                country: Country::parse(country.value(i)).ok_or("bad country in curated file")?,
                click,
            };
            let (impressions, conversions) = match &counts {
                Some((imp, conv)) => (imp.value(i), conv.value(i)),
                None => (0, 0),
            };
            let unique_users = users.as_ref().map_or(0, |uu| uu.value(i));
            let row = MetricRow {
                impressions,
                clicks: clk.value(i),
                conversions,
                cost_micros: cost.value(i),
                revenue_micros: rev.value(i),
                unique_users,
            };
            rows.push((dims, row));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The version as it was first defined: one hash update per field.
    fn version_field_by_field(id: &PartitionId, rows: &[(Dims, MetricRow)]) -> String {
        let mut h = Xxh3::new();
        h.update(b"adsmetrics/partition/v1\0");
        h.update(table_name(id.grain).as_bytes());
        h.update(&id.period.to_le_bytes());
        for (d, r) in rows {
            for v in [d.advertiser_id, d.campaign_id, d.ad_id] {
                h.update(&v.to_le_bytes());
            }
            h.update(&d.country.0);
            if id.grain == Grain::Minute {
                h.update(&[d.click.minute]);
                h.update(&d.click.ip.0);
                h.update(&d.click.user_id.to_le_bytes());
            }
            for v in [
                r.impressions,
                r.clicks,
                r.conversions,
                r.cost_micros,
                r.revenue_micros,
                r.unique_users,
            ] {
                h.update(&v.to_le_bytes());
            }
        }
        format!("{:032x}", h.digest128())
    }

    /// Published versions are in every journal: hashing through a buffer must not change one,
    /// for partitions of every size around the buffer's and for every table's encoding.
    #[test]
    fn buffered_version_is_the_field_by_field_one() {
        for grain in [Grain::Hourly, Grain::Daily, Grain::Weekly, Grain::Minute] {
            let id = PartitionId {
                grain,
                period: 493_000,
            };
            // The buffer is hashed after 109 rows (82 of the minute table's).
            for n in [0, 1, 81, 82, 83, 108, 109, 110, 164, 218, 1000, 5000] {
                let rows: Vec<(Dims, MetricRow)> = (0..n as i64)
                    .map(|i| {
                        let dims = Dims {
                            advertiser_id: i % 7,
                            campaign_id: i * 3,
                            ad_id: i * 11 + 5,
                            country: Country(*b"DE"),
                            click: match grain {
                                Grain::Minute => ClickDims {
                                    minute: (i % 60) as u8,
                                    ip: Ip([i as u8; 16]),
                                    user_id: -i,
                                },
                                _ => ClickDims::default(),
                            },
                        };
                        let row = MetricRow {
                            impressions: i,
                            clicks: i / 2,
                            conversions: i / 3,
                            cost_micros: i * 1_000_003,
                            revenue_micros: i * 7,
                            unique_users: i % 5,
                        };
                        (dims, row)
                    })
                    .collect();
                assert_eq!(
                    content_version(&id, &rows),
                    version_field_by_field(&id, &rows),
                    "{grain:?}, {n} rows"
                );
            }
        }
    }
}
