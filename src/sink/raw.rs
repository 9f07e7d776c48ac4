//! The raw layer: every accepted event, once per source partition, partitioned by event day.
//!
//! It is the system of record for rebuilds, reconciliation and rehydration. A source partition
//! writes one immutable file per event day it touches, named by the source's content hash:
//! `raw/dt=…/src-<hash>.parquet` (a row's hour is in its `event_time`; warehouses written before
//! this layout hold `raw/dt=…/hr=…/src-<hash>.parquet`, one file per event hour, which every
//! reader here reads the same way). A file per day rather than per hour: a source's late and
//! early events spread it over a few hours, and a file per hour made three to four small files
//! of each source, whose creation and Parquet set-up were a tenth of a full load's time.
//! A committed source is never read again (the journal knows its hash), so its files are written
//! once; a source whose run crashed before its commit rewrites the same files (the same rows; the
//! same bytes by the same build) and, if an older version wrote them, removes its hourly files
//! ([`write_source`]), which is why they need no fsync of their own: the publish syncs the
//! filesystem before the journal names the source. The exceptions to "written
//! once" are a compliance delete, which rewrites the files that held deleted events without them
//! ([`rewrite_without`]), a backfill, which removes the files of a source it replaced, and
//! retention, which removes expired days. Rows carry their dedup key, the key
//! algorithm (in the file metadata; `dedup_key` is 16 big-endian bytes), the source path and the
//! source's content hash, in source order (the order the source's winning rows were read in).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adsmetrics_dataflows::{Country, DedupKey, EventType, EventVersion};
use arrow::array::{Array, AsArray};
use arrow::array::{
    ArrayRef, BooleanArray, DictionaryArray, FixedSizeBinaryArray, Int32Array, Int64Array,
    StringArray,
};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType, UInt32Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::event::{Event, EventView, KEY_ALGORITHM};
use crate::schema::{event_columns, event_fields};
use crate::sink::files::{base_writer_properties, parquet_bytes, replace, WriteError};
use crate::warehouse::{day_path, Warehouse};

/// File name prefix of raw files; the rest is the source content hash.
pub const RAW_FILE_PREFIX: &str = "src-";

/// The raw file of one source for one event day.
pub fn raw_file(warehouse: &Warehouse, day: i64, source_hash: &str) -> PathBuf {
    warehouse
        .raw_dir()
        .join(day_path(day))
        .join(format!("{RAW_FILE_PREFIX}{source_hash}.parquet"))
}

/// The source content hash a raw file belongs to, from its name.
pub fn source_hash_of(path: &Path) -> Option<&str> {
    path.file_name()?
        .to_str()?
        .strip_prefix(RAW_FILE_PREFIX)?
        .strip_suffix(".parquet")
}

/// The writer settings of raw files (fixed, so the same rows give the same bytes).
pub fn properties() -> WriterProperties {
    // Dictionary pages only pay off for repetitive columns; on near-unique ones they cost an
    // interner lookup per value for nothing.
    let unique = [
        "dedup_key",
        "event_id",
        "ip",
        "user_id",
        "event_time",
        "cost_micros",
    ];
    // Min/max of a random hash or an id string prunes nothing, and comparing every value for
    // them was 6% of the raw layer's encoding. Nor do they of the event type and the country: a
    // source's file of a day holds every type and dozens of countries, so its min and max span
    // the whole range (comparing their strings was 1.2% of a load's time). The producer keeps
    // them: a source is usually one producer's.
    let unprunable = ["dedup_key", "event_id", "ip", "event_type", "country"];
    let builder = unique.iter().fold(base_writer_properties(), |b, c| {
        b.set_column_dictionary_enabled((*c).into(), false)
    });
    // Compressed size over encoded size, 5M events over 30 days: the dedup key 1.00 (random
    // bytes), country 0.99, event type 0.94, revenue 0.91, the source columns, producer and
    // revision 1.03-1.05. LZ4 over them was 1% of a load's instructions for nothing.
    let incompressible = [
        "dedup_key",
        "country",
        "event_type",
        "revenue_micros",
        "source",
        "source_hash",
        "revision",
        "producer",
    ];
    let builder = incompressible.iter().fold(builder, |b, c| {
        b.set_column_compression((*c).into(), parquet::basic::Compression::UNCOMPRESSED)
    });
    unprunable
        .iter()
        .fold(builder, |b, c| {
            b.set_column_statistics_enabled((*c).into(), EnabledStatistics::None)
        })
        // Min/max per column chunk is what readers prune with; per-page statistics on every
        // column cost a tenth of the raw write for nothing they use.
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_compression(parquet::basic::Compression::LZ4_RAW)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "adsmetrics.key_algorithm".to_string(),
            KEY_ALGORITHM.to_string(),
        )]))
        .build()
}

/// What [`write_source`] did.
#[derive(Debug, Default)]
pub struct RawWritten {
    /// Rows written.
    pub rows: u64,
    /// The files written, each with its event day.
    pub files: Vec<(i64, PathBuf)>,
    /// Files of the hourly layout it removed (see [`write_source`]), for a listing of the raw
    /// layer made before to drop.
    pub removed: Vec<PathBuf>,
}

/// Writes the accepted events of one source into the raw layer, one file per event day, in the
/// order given (which must not depend on anything but the source's bytes); events must already
/// be unique per dedup key.
///
/// A source whose run crashed before its commit under the hourly layout (an older version) may
/// have left files of that layout, `hourly` (see [`hourly_layout`]): its day files replace them,
/// so they are removed once those are written, every one, so that no row is in the raw layer
/// twice and none comes back (also of an hour, or a day, none of whose events is written now,
/// every one deleted by a compliance delete since the crash).
pub fn write_source(
    warehouse: &Warehouse,
    source: &str,
    source_hash: &str,
    events: &[(DedupKey, &Event)],
    hourly: &[PathBuf],
) -> Result<RawWritten, WriteError> {
    let mut by_day: BTreeMap<i64, Vec<(DedupKey, &Event)>> = BTreeMap::new();
    for &(key, event) in events {
        by_day
            .entry(
                event
                    .event_time_us
                    .div_euclid(adsmetrics_dataflows::MICROS_PER_DAY),
            )
            .or_default()
            .push((key, event));
    }
    let mut written = RawWritten::default();
    for (day, rows) in by_day {
        let dest = raw_file(warehouse, day, source_hash);
        let events: Vec<&Event> = rows.iter().map(|(_, e)| *e).collect();
        let mut fields = event_fields();
        fields.push(Field::new(
            "dedup_key",
            DataType::FixedSizeBinary(16),
            false,
        ));
        let constant = || DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        fields.push(Field::new("source", constant(), false));
        fields.push(Field::new("source_hash", constant(), false));
        let mut columns = event_columns(&events);
        let keys =
            FixedSizeBinaryArray::try_from_iter(rows.iter().map(|(k, _)| k.0.get().to_be_bytes()))
                .expect("every key is 16 bytes");
        columns.push(Arc::new(keys) as ArrayRef);
        columns.push(constant_column(source, rows.len()));
        columns.push(constant_column(source_hash, rows.len()));
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .expect("columns follow fields");
        let bytes = parquet_bytes(&batch, properties(), &dest)?;
        let staged = warehouse
            .staging_dir()
            .join(format!("raw-{day}-{source_hash}.parquet"));
        replace(&staged, &dest, &bytes)?;
        written.rows += rows.len() as u64;
        written.files.push((day, dest));
    }
    for old in hourly {
        match std::fs::remove_file(old) {
            Ok(()) => {
                tracing::info!(path = %old.display(), "removed an hourly-layout raw file its source now writes by day");
                written.removed.push(old.clone());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(WriteError::Io {
                    path: old.clone(),
                    source,
                })
            }
        }
    }
    Ok(written)
}

/// The files of the raw layer's hourly layout among `listed` (an older version kept a source's
/// events of an event hour in `raw/dt=…/hr=…/src-<hash>.parquet`), by source hash: what
/// [`write_source`] removes when it writes a source that had some.
pub fn hourly_layout(listed: &[PathBuf]) -> HashMap<String, Vec<PathBuf>> {
    let mut by_source: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for path in listed {
        let in_hour = path
            .parent()
            .and_then(Path::file_name)
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("hr="));
        if let (true, Some(hash)) = (in_hour, source_hash_of(path)) {
            by_source
                .entry(hash.to_string())
                .or_default()
                .push(path.clone());
        }
    }
    by_source
}

/// A column holding `value` in each of `rows` rows, as a one-entry dictionary: the per-row cost is
/// a 4-byte key, not a copy of the string.
fn constant_column(value: &str, rows: usize) -> ArrayRef {
    let keys = Int32Array::from(vec![0; rows]);
    Arc::new(DictionaryArray::new(
        keys,
        Arc::new(StringArray::from(vec![value])),
    ))
}

/// Every raw file in the warehouse, sorted by path (as bytes).
///
/// The top-level folders (`dt=…`) are walked on a few threads: a month of history is some ten
/// thousand files, and every run lists them.
pub fn list_raw_files(warehouse: &Warehouse) -> Vec<PathBuf> {
    let walk = |root: &Path| -> Vec<PathBuf> {
        walkdir::WalkDir::new(root)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file() && source_hash_of(e.path()).is_some())
            .map(|e| e.into_path())
            .collect()
    };
    let roots: Vec<PathBuf> = match std::fs::read_dir(warehouse.raw_dir()) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => return Vec::new(),
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(roots.len().max(1));
    let chunk = roots.len().div_ceil(threads).max(1);
    let mut files: Vec<PathBuf> = std::thread::scope(|scope| {
        let handles: Vec<_> = roots
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().flat_map(|r| walk(r)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("listing threads do not panic"))
            .collect()
    });
    files.sort_unstable_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    files
}

/// The dedup keys in a raw file, read from its `dedup_key` column only.
pub fn keys_of(path: &Path) -> Result<Vec<DedupKey>, RawReadError> {
    let err = |detail: String| RawReadError {
        path: path.to_path_buf(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(e.to_string()))?;
    let column = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.name() == "dedup_key")
        .ok_or_else(|| err("no dedup_key column".into()))?;
    let mask = ProjectionMask::leaves(builder.parquet_schema(), [column]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut keys = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let column = batch
            .column(0)
            .as_any()
            .downcast_ref::<FixedSizeBinaryArray>()
            .ok_or_else(|| err("dedup_key is not 16-byte binary".into()))?;
        for bytes in column.iter().flatten() {
            let bytes: [u8; 16] = bytes
                .try_into()
                .map_err(|_| err("a dedup_key is not 16 bytes".into()))?;
            keys.push(DedupKey(u128::from_be_bytes(bytes).into()));
        }
    }
    Ok(keys)
}

/// The greatest `event_time` in the raw file at `path`, from its footer's column statistics (the
/// rows are not read; raw files are written with them), or `None` if it holds no rows.
pub fn newest_event_time(path: &Path) -> Result<Option<i64>, RawReadError> {
    use parquet::file::reader::FileReader;
    use parquet::file::statistics::Statistics;
    let err = |detail: String| RawReadError {
        path: path.to_path_buf(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let reader =
        parquet::file::reader::SerializedFileReader::new(file).map_err(|e| err(e.to_string()))?;
    let meta = reader.metadata();
    let column = meta
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.name() == "event_time")
        .ok_or_else(|| err("no event_time column".into()))?;
    let mut newest = None;
    for group in meta.row_groups() {
        match group.column(column).statistics() {
            Some(Statistics::Int64(s)) => newest = newest.max(s.max_opt().copied()),
            _ if group.num_rows() == 0 => {}
            _ => return Err(err("event_time has no min/max statistics".into())),
        }
    }
    Ok(newest)
}

/// The columns of a raw file that `check` counts by event hour and producer, row by row.
#[derive(Debug, Default)]
pub struct KeyProducerHours {
    /// `dedup_key`, as a big-endian `u128`.
    pub keys: Vec<u128>,
    /// `producer`.
    pub producers: Vec<String>,
    /// The event hour (from `event_time`), hours since the Unix epoch.
    pub hours: Vec<i64>,
}

/// A raw file opened for a keyed rehydration: its bytes and its parsed footer, shared by the pass
/// over its key and user columns and the read of the rows that pass wants.
pub struct RawFile<'a> {
    path: &'a Path,
    bytes: bytes::Bytes,
    meta: ArrowReaderMetadata,
}

/// The columns of a raw file that a keyed rehydration tests, row by row.
#[derive(Debug, Default)]
pub struct KeyUserColumns {
    /// `dedup_key`, as a big-endian `u128`.
    pub keys: Vec<u128>,
    /// `user_id`.
    pub users: Vec<i64>,
    /// `ad_id`: with the user and the file's day, most of a user-day (the rest is implied by
    /// the ad or checked once the row is decoded).
    pub ads: Vec<i64>,
}

impl<'a> RawFile<'a> {
    /// Parses the footer of the raw file at `path`, whose contents are `bytes`.
    pub fn open(path: &'a Path, bytes: bytes::Bytes) -> Result<Self, RawReadError> {
        // The Arrow schema embedded in the footer (an IPC message in base64) is not needed: every
        // column read here has the type the Parquet schema gives it (the dictionary-typed ones,
        // which would differ, are never read), and decoding it was half the cost of opening.
        let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
        let meta = guarded(path, || {
            ArrowReaderMetadata::load(&bytes, options).map_err(|e| RawReadError {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        })?;
        Ok(RawFile { path, bytes, meta })
    }

    fn err(&self, detail: String) -> RawReadError {
        RawReadError {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    /// A reader of the columns `names`, in batches of `batch` rows, of the rows `selection` (all
    /// when `None`).
    fn reader(
        &self,
        names: &[&str],
        selection: Option<RowSelection>,
        batch: usize,
    ) -> Result<ParquetRecordBatchReader, RawReadError> {
        let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(
            self.bytes.clone(),
            self.meta.clone(),
        );
        let leaves = names
            .iter()
            .map(|name| {
                builder
                    .parquet_schema()
                    .columns()
                    .iter()
                    .position(|c| c.name() == *name)
                    .ok_or_else(|| self.err(format!("no {name} column")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mask = ProjectionMask::leaves(builder.parquet_schema(), leaves);
        let builder = builder.with_projection(mask).with_batch_size(batch);
        let builder = match selection {
            Some(selection) => builder.with_row_selection(selection),
            None => builder,
        };
        builder.build().map_err(|e| self.err(e.to_string()))
    }

    /// The `dedup_key` (as `u128`), `user_id` and `ad_id` columns, row by row: enough to tell
    /// which rows a keyed rehydration wants.
    pub fn key_user_columns(&self) -> Result<KeyUserColumns, RawReadError> {
        guarded(self.path, || self.scan_key_user())
    }

    /// Appends a batch's `dedup_key` column to `keys`, as `u128`; a missing or malformed key is
    /// damage.
    fn push_keys(
        &self,
        batch: &arrow::record_batch::RecordBatch,
        keys: &mut Vec<u128>,
    ) -> Result<(), RawReadError> {
        let key_array = batch
            .column_by_name("dedup_key")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
            .ok_or_else(|| self.err("dedup_key is not 16-byte binary".into()))?;
        for bytes in key_array.iter() {
            let bytes: [u8; 16] = bytes
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| self.err("a dedup_key is missing or not 16 bytes".into()))?;
            keys.push(u128::from_be_bytes(bytes));
        }
        Ok(())
    }

    fn scan_key_user(&self) -> Result<KeyUserColumns, RawReadError> {
        let reader = self.reader(&["dedup_key", "user_id", "ad_id"], None, 1 << 20)?;
        let mut out = KeyUserColumns::default();
        for batch in reader {
            let batch = batch.map_err(|e| self.err(e.to_string()))?;
            let int_column = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                    .ok_or_else(|| self.err(format!("{name} is not a 64-bit integer")))
            };
            let (user_array, ad_array) = (int_column("user_id")?, int_column("ad_id")?);
            if user_array.null_count() > 0 || ad_array.null_count() > 0 {
                return Err(self.err("a user_id or ad_id is missing".into()));
            }
            self.push_keys(&batch, &mut out.keys)?;
            out.users.extend(user_array.values().iter().copied());
            out.ads.extend(ad_array.values().iter().copied());
        }
        Ok(out)
    }

    /// The `dedup_key` (as `u128`), `producer` and event hour of each row (`check duplicates`
    /// and `check partitions`).
    pub fn key_producer_hours(&self) -> Result<KeyProducerHours, RawReadError> {
        guarded(self.path, || {
            let reader = self.reader(&["dedup_key", "producer", "event_time"], None, 1 << 20)?;
            let mut out = KeyProducerHours::default();
            for batch in reader {
                let batch = batch.map_err(|e| self.err(e.to_string()))?;
                self.push_keys(&batch, &mut out.keys)?;
                let producer_array = batch
                    .column_by_name("producer")
                    .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
                    .ok_or_else(|| self.err("producer is not a string".into()))?;
                out.producers
                    .extend(producer_array.iter().map(|p| p.unwrap_or("").to_string()));
                let times = batch
                    .column_by_name("event_time")
                    .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                    .filter(|t| t.null_count() == 0)
                    .ok_or_else(|| self.err("event_time is missing or not a timestamp".into()))?;
                out.hours.extend(
                    times
                        .values()
                        .iter()
                        .map(|t| t.div_euclid(adsmetrics_dataflows::MICROS_PER_HOUR)),
                );
            }
            Ok(out)
        })
    }

    /// The `(key, version)` of the rows at the ascending, distinct indices `rows`, in order: the
    /// stored key, and the version computed from the columns ([`EventView::version`], as for the
    /// event the row was written from). Rows are not validated again (the raw layer holds only
    /// events that were), but a row that is not one (a missing value, an unknown event type) is
    /// damage and an error.
    pub fn versions(&self, rows: &[usize]) -> Result<Vec<(DedupKey, EventVersion)>, RawReadError> {
        let mut selectors = Vec::new();
        let mut next = 0;
        for &row in rows {
            if row < next {
                return Err(self.err("rows wanted out of order".into()));
            }
            if row > next {
                selectors.push(RowSelector::skip(row - next));
            }
            match selectors.last_mut() {
                Some(last) if !last.skip => last.row_count += 1,
                _ => selectors.push(RowSelector::select(1)),
            }
            next = row + 1;
        }
        if selectors.is_empty() {
            return Ok(Vec::new());
        }
        self.read_versions(Some(selectors.into()), rows.len())
    }

    /// The `(key, version)` of every row, in order (see [`RawFile::versions`]).
    pub fn all_versions(&self) -> Result<Vec<(DedupKey, EventVersion)>, RawReadError> {
        let rows = usize::try_from(self.meta.metadata().file_metadata().num_rows())
            .map_err(|_| self.err("a negative row count".into()))?;
        self.read_versions(None, rows)
    }

    /// The versions of the rows `selection` selects (all when `None`), which must be `expected`.
    fn read_versions(
        &self,
        selection: Option<RowSelection>,
        expected: usize,
    ) -> Result<Vec<(DedupKey, EventVersion)>, RawReadError> {
        guarded(self.path, || self.decode_versions(selection, expected))
    }

    fn decode_versions(
        &self,
        selection: Option<RowSelection>,
        expected: usize,
    ) -> Result<Vec<(DedupKey, EventVersion)>, RawReadError> {
        // The event's columns and the stored key.
        let fields = event_fields();
        let names: Vec<&str> = fields
            .iter()
            .map(|f| f.name().as_str())
            .chain(["dedup_key"])
            .collect();
        let reader = self.reader(&names, selection, 8192)?;
        let mut out = Vec::with_capacity(expected);
        for batch in reader {
            let batch = batch.map_err(|e| self.err(e.to_string()))?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| self.err(format!("no {name} column")))
            };
            let strings = |name: &str| {
                column(name)?
                    .as_string_opt::<i32>()
                    .ok_or_else(|| self.err(format!("{name} is not a string column")))
            };
            let ints = |name: &str| {
                column(name)?
                    .as_primitive_opt::<Int64Type>()
                    .ok_or_else(|| self.err(format!("{name} is not a 64-bit integer column")))
            };
            let (event_id, event_type, country, ip, producer) = (
                strings("event_id")?,
                strings("event_type")?,
                strings("country")?,
                strings("ip")?,
                strings("producer")?,
            );
            let (ad, campaign, advertiser, user, cost, revenue) = (
                ints("ad_id")?,
                ints("campaign_id")?,
                ints("advertiser_id")?,
                ints("user_id")?,
                ints("cost_micros")?,
                ints("revenue_micros")?,
            );
            let time = column("event_time")?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| self.err("event_time is not a microsecond timestamp".into()))?;
            let revision = column("revision")?
                .as_primitive_opt::<UInt32Type>()
                .ok_or_else(|| self.err("revision is not a 32-bit unsigned integer".into()))?;
            let key = column("dedup_key")?
                .as_fixed_size_binary_opt()
                .filter(|k| k.value_length() == 16)
                .ok_or_else(|| self.err("dedup_key is not 16-byte binary".into()))?;
            let required: [&dyn Array; 12] = [
                event_type, country, ip, producer, ad, campaign, advertiser, user, time, revision,
                key, key,
            ];
            if required.iter().any(|c| c.null_count() > 0) {
                return Err(self.err("a required value is missing".into()));
            }
            let optional =
                |a: &arrow::array::Int64Array, i: usize| a.is_valid(i).then(|| a.value(i));
            for i in 0..batch.num_rows() {
                let view = EventView {
                    event_id: event_id.is_valid(i).then(|| event_id.value(i)),
                    event_type: EventType::parse(event_type.value(i))
                        .ok_or_else(|| self.err("an event_type is unknown".into()))?,
                    event_time_us: time.value(i),
                    ad_id: ad.value(i),
                    campaign_id: campaign.value(i),
                    advertiser_id: advertiser.value(i),
                    country: Country::parse(country.value(i))
                        .ok_or_else(|| self.err("a country is not a country code".into()))?,
                    user_id: user.value(i),
                    ip: ip.value(i),
                    cost_micros: optional(cost, i),
                    revenue_micros: optional(revenue, i),
                    producer: producer.value(i),
                    revision: revision.value(i),
                };
                let stored: [u8; 16] = key.value(i).try_into().expect("16-byte keys, checked");
                out.push((DedupKey(u128::from_be_bytes(stored).into()), view.version()));
            }
        }
        if out.len() != expected {
            return Err(self.err("fewer rows than its key column".into()));
        }
        Ok(out)
    }
}

/// Runs a read of the raw file at `path`. The Parquet reader is a third-party library, and a
/// raw file is not synced on its own (a crash can tear it): a panic in the reader is reported as
/// the file being damaged, not carried into the run's threads.
fn guarded<T>(
    path: &Path,
    read: impl FnOnce() -> Result<T, RawReadError>,
) -> Result<T, RawReadError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|_| {
        Err(RawReadError {
            path: path.to_path_buf(),
            detail: "raw layer file is damaged: the Parquet reader panicked".into(),
        })
    })
}

/// A raw file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading raw file {path}: {detail}")]
pub struct RawReadError {
    /// The file.
    pub path: PathBuf,
    /// What failed.
    pub detail: String,
}

/// Rewrites the raw file at `path` without the rows whose key `drop` selects, atomically through
/// `staged`; removes the file when no row is left. Returns the rows removed.
pub fn rewrite_without(
    path: &Path,
    staged: &Path,
    drop: impl Fn(&DedupKey) -> bool,
) -> Result<u64, RawRewriteError> {
    let read = |detail: String| {
        RawRewriteError::Read(RawReadError {
            path: path.to_path_buf(),
            detail,
        })
    };
    let file = std::fs::File::open(path).map_err(|e| read(e.to_string()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.with_batch_size(1 << 20).build())
        .map_err(|e| read(e.to_string()))?;
    let mut kept = Vec::new();
    let mut removed = 0u64;
    let mut schema = None;
    for batch in reader {
        let batch = batch.map_err(|e| read(e.to_string()))?;
        schema.get_or_insert_with(|| batch.schema());
        let keys = batch
            .column_by_name("dedup_key")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
            .ok_or_else(|| read("no 16-byte dedup_key column".into()))?;
        let keep: BooleanArray = keys
            .iter()
            .map(|k| {
                let k: Option<[u8; 16]> = k.and_then(|b| b.try_into().ok());
                Some(!k.is_some_and(|b| drop(&DedupKey(u128::from_be_bytes(b).into()))))
            })
            .collect();
        removed += keep.iter().filter(|k| *k == Some(false)).count() as u64;
        kept.push(filter_record_batch(&batch, &keep).map_err(|e| read(e.to_string()))?);
    }
    if removed == 0 {
        return Ok(0);
    }
    let rows: usize = kept.iter().map(RecordBatch::num_rows).sum();
    if rows == 0 {
        std::fs::remove_file(path).map_err(|source| {
            RawRewriteError::Write(WriteError::Io {
                path: path.to_path_buf(),
                source,
            })
        })?;
        return Ok(removed);
    }
    let schema = schema.expect("a file with removed rows had a batch");
    let batch = concat_batches(&schema, &kept).map_err(|e| read(e.to_string()))?;
    let bytes = parquet_bytes(&batch, properties(), path)?;
    replace(staged, path, &bytes)?;
    Ok(removed)
}

/// A raw file could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RawRewriteError {
    /// Reading it failed.
    #[error(transparent)]
    Read(#[from] RawReadError),
    /// Writing it failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}
