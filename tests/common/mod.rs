//! Shared helpers for the integration tests: small event sets, writing them as files, and
//! reading both the expected (reference) and the published tables.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use adsmetrics::decode::decode_source;
use adsmetrics::event::Event;
use adsmetrics::schema::events_to_batch;
use adsmetrics::sink::curated::read_partition;
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::{reference, Country, Dims, EventType, MetricRow, PartitionId};
use parquet::arrow::ArrowWriter;

/// Tables by partition, rows sorted by dims.
pub type Tables = BTreeMap<PartitionId, Vec<(Dims, MetricRow)>>;

/// `n` events over a few hours around a day boundary, with resends of earlier events (same id,
/// same content), missing ids, and corrections (same id, higher revision). Deterministic.
pub fn sample_events(n: usize, seed: u64) -> Vec<Event> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |m: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) % m
    };
    let base = 1_793_750_400_000_000i64; // 2026-11-03T00:00:00Z
    let mut events: Vec<Event> = Vec::with_capacity(n);
    for i in 0..n {
        let roll = next(100);
        if roll < 10 && !events.is_empty() {
            let j = next(events.len() as u64) as usize;
            let mut e = events[j].clone();
            if roll < 2 && e.event_id.is_some() {
                e.revision += 1;
                e.cost_micros = Some(next(5000) as i64);
            }
            events.push(e);
            continue;
        }
        let ad = next(12) as i64;
        let kind = next(20);
        let event_type = match kind {
            0 => EventType::Conversion,
            1..=3 => EventType::Click,
            _ => EventType::Impression,
        };
        let producer = ["web", "ios", "android", "server"][next(4) as usize].to_string();
        events.push(Event {
            event_id: if roll < 13 {
                None
            } else {
                Some(format!("{producer}-{seed}-{i}").into())
            },
            event_type,
            event_time_us: base - 2 * 3_600_000_000 + next(5 * 3_600_000_000) as i64,
            ad_id: ad,
            campaign_id: ad / 3,
            advertiser_id: ad / 6,
            country: Country([*b"DE", *b"US", *b"FR", *b"JP"][next(4) as usize]),
            user_id: next(40) as i64,
            ip: format!("10.0.{}.{}", next(4), next(250)).into(),
            cost_micros: if event_type == EventType::Conversion {
                None
            } else {
                Some(next(2000) as i64)
            },
            revenue_micros: if event_type == EventType::Conversion {
                Some(next(90_000) as i64)
            } else {
                None
            },
            producer: producer.into(),
            revision: 0,
        });
    }
    events
}

/// Writes events as one Parquet file.
pub fn write_parquet(path: &Path, events: &[Event]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let batch = events_to_batch(events);
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// Writes events as JSON lines (event_time as epoch micros).
pub fn write_jsonl(path: &Path, events: &[Event]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut out = String::new();
    for e in events {
        let v = serde_json::json!({
            "event_id": e.event_id, "event_type": e.event_type.as_str(), "event_time": e.event_time_us,
            "ad_id": e.ad_id, "campaign_id": e.campaign_id, "advertiser_id": e.advertiser_id,
            "country": e.country.as_str(), "user_id": e.user_id, "ip": e.ip,
            "cost_micros": e.cost_micros, "revenue_micros": e.revenue_micros,
            "producer": e.producer, "revision": e.revision,
        });
        out.push_str(&v.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// The tables a from-scratch computation over these events gives.
pub fn expected_tables(events: &[Event]) -> Tables {
    let versions: Vec<_> = events.iter().map(Event::keyed_version).collect();
    reference::tables(&reference::dedup(&versions))
}

/// Decodes every file under `dir` the way ingest does, for the expectation side.
pub fn decode_dir(dir: &Path) -> Vec<Event> {
    let mut events = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            events.extend(decode_source(&entry.path().to_string_lossy(), &bytes).events);
        }
    }
    events
}

/// Reads every published partition back from its Parquet file.
pub fn published_tables(warehouse: &Warehouse) -> Tables {
    let journal =
        adsmetrics::journal::CommitJournal::open(warehouse.root(), &warehouse.journal_path())
            .unwrap();
    let mut tables = Tables::new();
    for id in journal.published().keys() {
        let path = warehouse.partition_file(id);
        tables.insert(*id, read_partition(&path).unwrap());
    }
    // Nothing but the journal's partitions may be visible to a directory reader.
    let visible = adsmetrics::snapshot::TableSnapshot::take(warehouse).unwrap();
    assert_eq!(
        visible.files.len(),
        tables.len(),
        "files in table dirs: {:?}",
        visible.files.keys()
    );
    tables
}

/// The audit ledger verifies, has nothing pending, and accounts for the tables: for every
/// partition, the metric deltas of all its ledger entries add up to its published totals (and to
/// zero for a partition that is gone). Returns the ledger's entries.
pub fn assert_ledger_accounts_for_tables(warehouse: &Warehouse) -> Vec<adsmetrics::ledger::Entry> {
    use adsmetrics::journal::{CommitJournal, MetricTotals};
    use adsmetrics::warehouse::{partition_path, table_name};
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    let report = adsmetrics::ledger::verify(&warehouse.ledger_path(), journal.committed()).unwrap();
    assert!(report.pending.is_empty(), "pending: {:?}", report.pending);
    let ledger = adsmetrics::ledger::Ledger::open(&warehouse.ledger_path()).unwrap();
    let mut summed: std::collections::BTreeMap<String, MetricTotals> = Default::default();
    for entry in ledger.entries() {
        for p in &entry.body.partitions {
            let delta = p.delta.expect("this build records totals");
            let total = summed.entry(p.partition.clone()).or_default();
            *total = total.plus(&delta);
        }
    }
    let mut expected: std::collections::BTreeMap<String, MetricTotals> = summed
        .keys()
        .map(|k| (k.clone(), MetricTotals::default()))
        .collect();
    for (id, rows) in published_tables(warehouse) {
        let name = format!("{}/{}", table_name(id.grain), partition_path(&id));
        expected.insert(name, MetricTotals::of(&rows));
    }
    assert_eq!(
        summed, expected,
        "ledger deltas do not add up to the tables"
    );
    ledger.entries().to_vec()
}

/// Microseconds in a day.
pub const DAY_US: i64 = 86_400_000_000;

/// `n` sample events spread over 30 days (by user, so a resend or a correction stays on its
/// original's day), written as `logs/dt=<day>/producer=<p>/part-0.parquet`.
pub fn thirty_days(dir: &Path, n: usize) -> Vec<Event> {
    let mut events = sample_events(n, 30);
    for e in &mut events {
        e.event_time_us += (e.user_id % 30) * DAY_US;
    }
    write_logs(&dir.join("logs"), &events);
    events
}

/// The rows of a source partition as a later delivery changes them: three dropped, one
/// corrected by a higher revision (at the end).
pub fn changed_rows(path: &Path) -> Vec<Event> {
    let mut rows = decode_dir(path);
    rows.drain(..3);
    let mut corrected = rows.iter().find(|e| e.event_id.is_some()).cloned().unwrap();
    corrected.revision += 5;
    corrected.cost_micros = Some(123_456);
    rows.push(corrected);
    rows
}

pub fn write_logs(root: &Path, events: &[Event]) {
    let mut files: std::collections::BTreeMap<(i64, String), Vec<Event>> = Default::default();
    for e in events {
        files
            .entry((e.event_time_us.div_euclid(DAY_US), e.producer.to_string()))
            .or_default()
            .push(e.clone());
    }
    for ((day, producer), events) in files {
        let path = root
            .join(format!("dt={}", adsmetrics::warehouse::day_string(day)))
            .join(format!("producer={producer}"))
            .join("part-0.parquet");
        write_parquet(&path, &events);
    }
}

/// The side tables as readers see them: every quarantine row (as [`quarantine_rows`], sorted)
/// and, per partition, the late events and sources of its committed sources' lateness records.
pub type SideTables = (
    Vec<(String, String, String, Vec<u8>)>,
    BTreeMap<PartitionId, (u64, u64)>,
);

/// The side tables of `wh` (see [`SideTables`]).
pub fn side_tables(wh: &Warehouse) -> SideTables {
    let mut quarantined = quarantine_rows(wh);
    quarantined.sort();
    let journal = adsmetrics::journal::CommitJournal::open(wh.root(), &wh.journal_path()).unwrap();
    let late = adsmetrics::sink::late::read_lateness(wh, journal.consumed())
        .unwrap()
        .into_iter()
        .map(|(id, l)| (id, (l.events, l.sources)))
        .collect();
    (quarantined, late)
}

/// Every quarantine row: (source, position, reason, raw bytes), in file order (none before the
/// table's first file).
pub fn quarantine_rows(wh: &Warehouse) -> Vec<(String, String, String, Vec<u8>)> {
    let mut rows = Vec::new();
    if !wh.quarantine_dir().exists() {
        return rows;
    }
    for entry in walkdir::WalkDir::new(wh.quarantine_dir()).sort_by_file_name() {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(entry.path()).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let s = |n: &str| {
                batch
                    .column_by_name(n)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .unwrap()
                    .clone()
            };
            let raw = batch
                .column_by_name("raw")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::BinaryArray>()
                .unwrap()
                .clone();
            let (source, position, reason) = (s("source"), s("position"), s("reason"));
            for i in 0..batch.num_rows() {
                rows.push((
                    source.value(i).to_string(),
                    position.value(i).to_string(),
                    reason.value(i).to_string(),
                    raw.value(i).to_vec(),
                ));
            }
        }
    }
    rows
}

/// `adsmetrics dev-broker` in a process of its own, so a stream can die while the log lives on;
/// killed when dropped.
pub struct Broker {
    child: std::process::Child,
    /// Its bootstrap address.
    pub bootstrap: String,
}

impl Broker {
    /// Starts one with `topic` in `partitions` partitions.
    pub fn start(topic: &str, partitions: u32) -> Broker {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_adsmetrics"))
            .args(["dev-broker", "--topics", topic, "--partitions"])
            .arg(partitions.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dev-broker starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Broker {
            child,
            bootstrap: line.trim().to_string(),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keyring signing with `signing`, of `(id, hex fill, retired)` keys: each secret is the fill
/// repeated to 64 hex digits.
pub fn keyring(signing: &str, keys: &[(&str, &str, bool)]) -> adsmetrics::token::Keyring {
    use adsmetrics::token::{KeyEntry, Keyring, KeyringFile};
    Keyring::from_file(&KeyringFile {
        signing: signing.into(),
        keys: keys
            .iter()
            .map(|(id, fill, retired)| KeyEntry {
                id: id.to_string(),
                secret_hex: fill.repeat(64 / fill.len()),
                retired: *retired,
            })
            .collect(),
    })
    .unwrap()
}

/// Ingest on two workers, everything else as the defaults: what most tests run with.
pub fn options() -> adsmetrics::runtime::IngestOptions {
    adsmetrics::runtime::IngestOptions {
        workers: 2,
        ..Default::default()
    }
}
