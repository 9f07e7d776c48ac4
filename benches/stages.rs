//! Per-stage benchmarks of the ingest path, on ~200k generated events held in memory.
//!
//! - `decode/parquet`, `decode/jsonl`: one source of all events, bytes → validated events;
//! - `keys/keyed_version`: dedup key, content hash and compact version of every event;
//! - `dataflow/dedup_aggregate`: the whole dataflow (`adsmetrics_dataflows::pipeline::build`) on
//!   one worker, every keyed version fed in one epoch, stepped until the probe passes it;
//! - `encode/curated_partition`: the largest curated partition the dataflow produced (the daily
//!   one, tens of thousands of rows) encoded as Parquet bytes.
//!
//! Throughput is in elements: events for the first three, rows for the encoder. Input is built
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
use adsmetrics_dataflows::pipeline::build;
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

/// A partition and its rows.
type Partition = (PartitionId, Vec<(Dims, MetricRow)>);

/// Runs the dataflow on one worker over `versions` in one epoch; returns the curated partitions
/// with their rows when `collect` (not timed in the bench).
fn run_dataflow(versions: Arc<Vec<(DedupKey, EventVersion)>>, collect: bool) -> Vec<Partition> {
    timely::execute_directly(move |worker| {
        let mut pipeline = build(worker);
        for kv in versions.iter() {
            pipeline.input.insert(*kv);
        }
        pipeline.input.advance_to(1);
        pipeline.input.flush();
        while pipeline.probe.less_than(&1) {
            worker.step();
        }
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
    let partitions = run_dataflow(versions.clone(), true);
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
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
