//! Per-stage benchmarks of the ingest path, on ~200k generated events held in memory.
//!
//! - `decode/parquet`, `decode/jsonl`: one source of all events, bytes → validated events;
//! - `keys/keyed_version`: dedup key, content hash and compact version of every event;
//! - `dataflow/dedup_aggregate`: the whole dataflow (`adsmetrics_dataflows::pipeline::build`) on
//!   one worker, every keyed version fed in one epoch, stepped until the probe passes it;
//! - `dataflow/batch_engine`: the same changes into the same mirror from the batch engine
//!   (`adsmetrics_dataflows::batch`) on one worker (asserted equal to the dataflow's first);
//! - `encode/curated_partition`: the largest curated partition the dataflow produced (the daily
//!   one, tens of thousands of rows) encoded as Parquet bytes;
//! - `encode/raw_layer`: the events cut into sources of `SOURCE_EVENTS` (the size of a generated
//!   30-day input's delivery files), each written to the raw layer of a fresh warehouse in a
//!   temporary directory (one file per source and event hour: encoding, staging, rename).
//!
//! Throughput is in elements: events for the first three and the raw layer, rows for the
//! curated encoder. Input is built
//! once, outside the measurements. Sample sizes are small so the whole run takes a few minutes:
//! `cargo bench --bench stages` (or `-- decode` for one group).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use adsmetrics::decode::{decode_json_lines, decode_parquet};
use adsmetrics::event::Event;
use adsmetrics::generate::{generate_events, writer_properties, GenerateConfig};
use adsmetrics::schema::events_to_batch;
use adsmetrics::sink::curated::{content_version, encode_partition};
use adsmetrics::sink::raw;
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::pipeline::{build, build_batch, Pipeline};
use adsmetrics_dataflows::{DedupKey, Dims, EventVersion, MetricRow, PartitionId};
use chrono::DateTime;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use parquet::arrow::ArrowWriter;

/// The events every bench uses: 200k distinct events over 24 hours (plus resends, corrections,
/// replays), without bad records.
fn events() -> Vec<Event> {
    let config = GenerateConfig {
        events: 200_000,
        hours: 24,
        bad_rate: 0.0,
        ..Default::default()
    };
    generate_events(&config)
}

/// All events as one Parquet file, with the generator's writer settings.
fn parquet_bytes(events: &[Event]) -> Vec<u8> {
    let batch = events_to_batch(events);
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(writer_properties()))
        .expect("in-memory Parquet writer");
    writer.write(&batch).expect("writing the batch");
    writer.close().expect("closing the writer");
    out
}

/// All events as JSON lines, in the generator's style: `event_time` alternates between an
/// RFC 3339 string and epoch microseconds, `revision` is omitted when 0.
fn jsonl_bytes(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let mut line = serde_json::json!({
            "event_id": e.event_id,
            "event_type": e.event_type.as_str(),
            "ad_id": e.ad_id,
            "campaign_id": e.campaign_id,
            "advertiser_id": e.advertiser_id,
            "country": e.country.as_str(),
            "user_id": e.user_id,
            "ip": e.ip,
            "cost_micros": e.cost_micros,
            "revenue_micros": e.revenue_micros,
            "producer": e.producer,
        });
        line["event_time"] = if i % 2 == 0 {
            let t = DateTime::from_timestamp_micros(e.event_time_us).expect("event time in range");
            serde_json::Value::from(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        } else {
            serde_json::Value::from(e.event_time_us)
        };
        if e.revision != 0 {
            line["revision"] = serde_json::Value::from(e.revision);
        }
        serde_json::to_writer(&mut out, &line).expect("writing JSON to memory");
        out.push(b'\n');
    }
    out
}

/// Events per source in `encode/raw_layer`: 5.26M raw rows in 2,894 delivery files, as
/// `generate --events 5000000 --hours 720` writes them.
const SOURCE_EVENTS: usize = 1_800;

/// The events cut into sources of [`SOURCE_EVENTS`], each with its events' dedup keys, unique
/// within the source (the first of each key, as the in-source dedup keeps one).
fn sources(events: &[Event]) -> Vec<Vec<(DedupKey, &Event)>> {
    events
        .chunks(SOURCE_EVENTS)
        .map(|chunk| {
            let mut seen = std::collections::HashSet::new();
            chunk
                .iter()
                .map(|e| (e.keyed_version().0, e))
                .filter(|(key, _)| seen.insert(*key))
                .collect()
        })
        .collect()
}

/// Writes every source to the raw layer of a new warehouse (returned, so that removing it is
/// not timed); the rows written.
fn write_raw_layer(sources: &[Vec<(DedupKey, &Event)>]) -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let warehouse = Warehouse::new(dir.path());
    let mut rows = 0;
    for (i, source) in sources.iter().enumerate() {
        let hash = format!("{i:016x}");
        rows += raw::write_source(
            &warehouse,
            &format!("bench-{i}.parquet"),
            &hash,
            source,
            &[],
        )
        .expect("writing the raw layer")
        .rows;
    }
    (dir, rows)
}

/// A partition and its rows.
type Partition = (PartitionId, Vec<(Dims, MetricRow)>);

/// Every keyed version fed at epoch 0 to the pipeline `build` makes on one worker, and stepped
/// until the epoch is complete: the partitions, if `collect`.
fn run_pipeline(
    versions: Arc<Vec<(DedupKey, EventVersion)>>,
    build: fn(&mut timely::worker::Worker) -> Pipeline,
    collect: bool,
) -> Vec<Partition> {
    timely::execute_directly(move |worker| {
        let mut pipeline = build(worker);
        for kv in versions.iter() {
            pipeline.input.insert(*kv);
        }
        pipeline.input.advance_to(1);
        pipeline.input.flush();
        pipeline.complete(worker, 1);
        if !collect {
            return Vec::new();
        }
        let mirror = pipeline.mirror.borrow();
        mirror
            .partitions()
            .map(|id| (*id, mirror.rows(id).expect("consistent partition")))
            .collect()
    })
}

/// The whole dataflow ([`build`]).
fn run_dataflow(versions: Arc<Vec<(DedupKey, EventVersion)>>, collect: bool) -> Vec<Partition> {
    run_pipeline(versions, build, collect)
}

/// The same partitions as [`run_dataflow`] from the batch engine ([`build_batch`]), from
/// nothing: the changes from epoch 0 on.
fn run_batch(versions: Arc<Vec<(DedupKey, EventVersion)>>, collect: bool) -> Vec<Partition> {
    run_pipeline(versions, build_batch, collect)
}

fn stages(c: &mut Criterion) {
    let events = events();
    let n = events.len() as u64;
    let parquet = bytes::Bytes::from(parquet_bytes(&events));
    let jsonl = jsonl_bytes(&events);
    assert_eq!(
        decode_parquet("bench.parquet", parquet.clone())
            .events
            .len(),
        events.len()
    );
    assert_eq!(
        decode_json_lines("bench.jsonl", &jsonl).events.len(),
        events.len()
    );
    let versions: Arc<Vec<_>> = Arc::new(events.iter().map(Event::keyed_version).collect());
    let mut partitions = run_dataflow(versions.clone(), true);
    partitions.sort_by_key(|(id, _)| *id);
    let mut batch = run_batch(versions.clone(), true);
    batch.sort_by_key(|(id, _)| *id);
    assert!(
        batch == partitions,
        "the batch engine gives the dataflow's partitions"
    );
    let (id, rows) = partitions
        .into_iter()
        .max_by_key(|(_, rows)| rows.len())
        .expect("the dataflow produced partitions");
    let version = content_version(&id, &rows);
    eprintln!(
        "stages: {n} events, Parquet {} MB, JSON lines {} MB, largest partition {id:?} with {} rows",
        parquet.len() / 1_000_000,
        jsonl.len() / 1_000_000,
        rows.len()
    );

    // Flat sampling: an iteration takes 0.1-0.3 s, too long for criterion's linear ramp.
    let mut group = c.benchmark_group("decode");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(n));
    group.bench_function("parquet", |b| {
        b.iter(|| decode_parquet("bench.parquet", black_box(parquet.clone())))
    });
    group.bench_function("jsonl", |b| {
        b.iter(|| decode_json_lines("bench.jsonl", black_box(&jsonl)))
    });
    group.finish();

    let mut group = c.benchmark_group("keys");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(n));
    group.bench_function("keyed_version", |b| {
        b.iter(|| {
            black_box(&events)
                .iter()
                .map(Event::keyed_version)
                .collect::<Vec<_>>()
        })
    });
    group.finish();

    // Flat sampling: an iteration takes 0.1-0.3 s, too long for criterion's linear ramp.
    let mut group = c.benchmark_group("dataflow");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(n));
    group.bench_function("dedup_aggregate", |b| {
        b.iter_batched(
            || versions.clone(),
            |v| run_dataflow(v, false),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("batch_engine", |b| {
        b.iter(|| run_batch(black_box(versions.clone()), false))
    });
    group.finish();

    let mut group = c.benchmark_group("encode");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(rows.len() as u64));
    let path = Path::new("bench/data.parquet");
    group.bench_function("curated_partition", |b| {
        b.iter(|| encode_partition(&id, black_box(&rows), &version, path).expect("encoding"))
    });
    let sources = sources(&events);
    let (dir, written) = write_raw_layer(&sources);
    let files = walkdir(dir.path().join("raw").as_path());
    eprintln!(
        "stages: raw layer of {} sources: {written} rows in {files} files",
        sources.len()
    );
    group.throughput(Throughput::Elements(written));
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("raw_layer", |b| {
        b.iter_batched(
            || (),
            |()| write_raw_layer(&sources),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// Files below `dir`.
fn walkdir(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        walkdir(&path)
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

criterion_group!(benches, stages);
criterion_main!(benches);
