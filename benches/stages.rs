//! Per-stage benchmarks of the ingest path, on ~200k generated events held in memory.
//!
//! - `decode/parquet`, `decode/jsonl`: one source of all events, bytes → validated events;
//! - `keys/keyed_version`: dedup key, content hash and compact version of every event;
//! - `dataflow/dedup_aggregate`: the whole dataflow (`adsmetrics_dataflows::pipeline::build`) on
//!   one worker, every keyed version fed in one epoch, stepped until the probe passes it;
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

/// The same partitions as [`run_dataflow`], computed from scratch with sorts and no dataflow (one
/// core, one epoch, nothing before it): what the dataflow's machinery costs beyond the work
/// itself. Winners: sorted by key, the greatest version of each. Hourly and daily cells with
/// their users: the winners sorted by (day, dims, user, hour), each daily cell a run with its
/// hours in an array. Weekly: the daily cells' sums sorted by week. Minute: the clicks sorted.
fn plain_batch(versions: &[(DedupKey, EventVersion)]) -> Vec<Partition> {
    use adsmetrics_dataflows::aggregate::Sums;
    use adsmetrics_dataflows::{week_of_day, AdDims, Grain};
    let row = |sums: &Sums, users: i64| MetricRow {
        impressions: sums.impressions,
        clicks: sums.clicks,
        conversions: sums.conversions,
        cost_micros: sums.cost_micros,
        revenue_micros: sums.revenue_micros,
        unique_users: users,
    };
    let add = |a: &mut Sums, b: &Sums| {
        a.events += b.events;
        a.impressions += b.impressions;
        a.clicks += b.clicks;
        a.conversions += b.conversions;
        a.cost_micros += b.cost_micros;
        a.revenue_micros += b.revenue_micros;
    };
    let mut sorted: Vec<&(DedupKey, EventVersion)> = versions.iter().collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
    let mut winners: Vec<(i64, AdDims, i64, i64, Sums)> = Vec::with_capacity(sorted.len());
    let mut clicks: Vec<(i64, Dims, Sums)> = Vec::new();
    let mut last = None;
    for (key, v) in sorted {
        if last == Some(key) {
            continue;
        }
        last = Some(key);
        winners.push((v.day(), v.ad_dims(), v.user_id, v.hour(), Sums::of(v)));
        if Grain::Minute.counts(v) {
            clicks.push((v.hour(), v.click_dims(), Sums::of(v)));
        }
    }
    winners.sort_unstable_by(|a, b| (a.0, a.1, a.2, a.3).cmp(&(b.0, b.1, b.2, b.3)));
    let mut out: std::collections::BTreeMap<PartitionId, Vec<(Dims, MetricRow)>> =
        Default::default();
    let mut weekly: Vec<(i64, AdDims, Sums)> = Vec::new();
    let mut i = 0;
    while i < winners.len() {
        let (day, dims) = (winners[i].0, winners[i].1);
        let (mut daily, mut users) = (Sums::default(), 0);
        let mut hours = [(Sums::default(), 0i64); 24];
        let mut last_user_hour = None;
        let mut last_user = None;
        while i < winners.len() && winners[i].0 == day && winners[i].1 == dims {
            let (_, _, user, hour, sums) = &winners[i];
            add(&mut daily, sums);
            let h = (hour - day * 24) as usize;
            add(&mut hours[h].0, sums);
            if last_user != Some(*user) {
                users += 1;
                last_user = Some(*user);
            }
            if last_user_hour != Some((*user, h)) {
                hours[h].1 += 1;
                last_user_hour = Some((*user, h));
            }
            i += 1;
        }
        out.entry(PartitionId {
            grain: Grain::Daily,
            period: day,
        })
        .or_default()
        .push((dims.widen(), row(&daily, users)));
        for (h, (sums, users)) in hours.iter().enumerate().filter(|(_, (s, _))| s.events > 0) {
            out.entry(PartitionId {
                grain: Grain::Hourly,
                period: day * 24 + h as i64,
            })
            .or_default()
            .push((dims.widen(), row(sums, *users)));
        }
        weekly.push((week_of_day(day), dims, daily));
    }
    weekly.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for run in weekly.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let mut sums = Sums::default();
        run.iter().for_each(|(_, _, s)| add(&mut sums, s));
        out.entry(PartitionId {
            grain: Grain::Weekly,
            period: run[0].0,
        })
        .or_default()
        .push((run[0].1.widen(), row(&sums, 0)));
    }
    clicks.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for run in clicks.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let mut sums = Sums::default();
        run.iter().for_each(|(_, _, s)| add(&mut sums, s));
        out.entry(PartitionId {
            grain: Grain::Minute,
            period: run[0].0,
        })
        .or_default()
        .push((run[0].1, row(&sums, 0)));
    }
    for rows in out.values_mut() {
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    }
    out.into_iter().collect()
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
    let plain = plain_batch(&versions);
    for ((a, ra), (b, rb)) in plain.iter().zip(&partitions) {
        if a != b || ra != rb {
            let first = ra.iter().zip(rb).find(|(x, y)| x != y);
            panic!(
                "{a:?} {} rows vs {b:?} {} rows: {first:?}",
                ra.len(),
                rb.len()
            );
        }
    }
    assert_eq!(plain.len(), partitions.len());
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
    group.bench_function("plain_batch", |b| {
        b.iter(|| plain_batch(black_box(&versions)))
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
