//! Streaming from Kafka (invariant 5), against librdkafka's mock cluster in-process: the same
//! Kafka protocol over TCP as a real cluster, one cluster per test on a random port.
//!
//! - the stream and the batch path publish byte-identical tables for the same generated events;
//! - a broker re-delivering a range (the consumer seeking back) and a producer resending events
//!   change no table file;
//! - undecodable messages are quarantined with topic, partition and offset;
//! - a crash at any step of an epoch's publish, then a restart, ends in the tables of an
//!   uninterrupted run, with the journal's offsets at the log end.

mod common;

use std::time::Duration;

use adsmetrics::broker::{produce, DevBroker, ProduceOptions};
use adsmetrics::generate::{generate, generate_events, GenerateConfig};
use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::sink::publish::FailPoint;
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::stream::{committed_positions, log_end_offsets, stream, StreamOptions};
use adsmetrics::warehouse::Warehouse;
use common::*;

const TOPIC: &str = "ads-events";

fn broker(partitions: i32) -> DevBroker {
    DevBroker::start(&[TOPIC.to_string()], partitions).expect("mock cluster starts")
}

fn send(broker: &DevBroker, events: &[adsmetrics::event::Event], bad_every: Option<u64>) {
    produce(
        &ProduceOptions {
            bad_every,
            ..ProduceOptions::new(broker.bootstrap_servers(), TOPIC)
        },
        events,
        &|_| {},
    )
    .expect("produced");
}

/// Small epochs (many of them), a short idle stop, two workers.
fn options(broker: &DevBroker) -> StreamOptions {
    let mut o = StreamOptions::new(broker.bootstrap_servers(), vec![TOPIC.to_string()]);
    o.epoch = Duration::from_millis(200);
    o.epoch_events = 1500;
    o.until_idle = Some(Duration::from_millis(1500));
    o.ingest.workers = 2;
    o
}

fn journal_positions(warehouse: &Warehouse) -> std::collections::BTreeMap<(String, i32), i64> {
    committed_positions(&adsmetrics::runtime::committed_sources(warehouse).unwrap())
}

fn small_generated() -> GenerateConfig {
    GenerateConfig {
        events: 6000,
        hours: 6,
        ads: 50,
        users: 2000,
        late_rate: 0.05,
        correction_rate: 0.01,
        seed: 11,
        ..GenerateConfig::default()
    }
}

/// `config`'s events generated as files under `dir` and ingested by the batch path into
/// `dir/batch`.
fn batch_ingested(config: &GenerateConfig, dir: &std::path::Path) -> Warehouse {
    generate(config, &dir.join("files"), &|_| {}).unwrap();
    let batch = Warehouse::new(dir.join("batch"));
    ingest(
        &batch,
        &[dir.join("files")],
        IngestOptions {
            workers: 2,
            ..IngestOptions::default()
        },
    )
    .unwrap();
    batch
}

#[test]
fn stream_and_batch_publish_identical_tables() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_generated();
    let batch = batch_ingested(&config, dir.path());

    let events = generate_events(&config);
    let broker = broker(4);
    send(&broker, &events, None);
    let streamed = Warehouse::new(dir.path().join("stream"));
    let summary = stream(&streamed, &options(&broker)).unwrap();
    assert!(summary.epochs > 1, "the test wants several epochs");
    assert_eq!(summary.messages, events.len() as u64);

    assert_eq!(published_tables(&streamed), expected_tables(&events));
    assert_eq!(
        TableSnapshot::take(&streamed).unwrap().fingerprint(),
        TableSnapshot::take(&batch).unwrap().fingerprint(),
        "stream and batch tables differ"
    );
    let ends = log_end_offsets(&broker.bootstrap_servers(), &[TOPIC.to_string()]).unwrap();
    assert_eq!(summary.positions, ends);
    assert_eq!(journal_positions(&streamed), ends);
    // Every epoch is a `stream` entry whose partition versions carry their latency.
    let entries = assert_ledger_accounts_for_tables(&streamed);
    let epochs: Vec<_> = entries
        .iter()
        .filter(|e| e.body.kind == adsmetrics::ledger::RunKind::Stream)
        .collect();
    assert_eq!(epochs.len() as u64, summary.epochs);
    for e in epochs {
        let latency = e
            .body
            .latency_ms
            .expect("a stream epoch records its latency");
        assert!(
            0 <= latency.newest && latency.newest <= latency.oldest,
            "{latency:?}"
        );
    }
}

/// A stream keeps its dataflow from epoch to epoch: restarted part-way (a new process, a new
/// dataflow), it rebuilds from the raw layer what its events need of the earlier process's
/// rows, each at most once, not again at every epoch; and it ends in the batch path's tables.
#[test]
fn a_restarted_stream_rebuilds_each_earlier_row_at_most_once_and_ends_in_the_batch_tables() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_generated();
    let batch = batch_ingested(&config, dir.path());

    let events = generate_events(&config);
    let (before, after) = events.split_at(events.len() / 2);
    let broker = broker(4);
    let streamed = Warehouse::new(dir.path().join("stream"));
    send(&broker, before, None);
    let first = stream(&streamed, &options(&broker)).unwrap();
    assert_eq!(first.ingest.rehydrated_rows, 0, "nothing to rebuild from");
    send(&broker, after, None);
    let second = stream(&streamed, &options(&broker)).unwrap();
    assert!(second.epochs > 1, "the test wants several epochs");
    // The second half corrects and repeats users of the first: their rows are rebuilt, once.
    assert!(second.ingest.rehydrated_rows > 0);
    assert!(
        second.ingest.rehydrated_rows <= first.ingest.raw_rows_written,
        "rebuilt {} rows of {} written before the restart",
        second.ingest.rehydrated_rows,
        first.ingest.raw_rows_written
    );

    assert_eq!(published_tables(&streamed), expected_tables(&events));
    assert_eq!(
        TableSnapshot::take(&streamed).unwrap().fingerprint(),
        TableSnapshot::take(&batch).unwrap().fingerprint(),
        "stream and batch tables differ"
    );
    assert_ledger_accounts_for_tables(&streamed);
}

/// A stream whose dataflow has taken in its rows drops it and starts another mid-stream: the
/// tables come out the same.
#[test]
fn a_stream_that_starts_new_dataflows_as_they_fill_ends_in_the_expected_tables() {
    let dir = tempfile::tempdir().unwrap();
    let events = generate_events(&small_generated());
    let broker = broker(4);
    send(&broker, &events, None);
    let streamed = Warehouse::new(dir.path().join("stream"));
    let mut options = options(&broker);
    options.dataflow_rows = 1000;
    let summary = stream(&streamed, &options).unwrap();
    assert!(summary.epochs > 2, "the test wants several dataflows");
    assert!(
        summary.ingest.rehydrated_rows > 0,
        "later dataflows rebuild"
    );
    assert_eq!(published_tables(&streamed), expected_tables(&events));
    assert_ledger_accounts_for_tables(&streamed);
}

#[test]
fn redelivered_ranges_and_resent_events_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(4000, 21);
    let broker = broker(3);
    send(&broker, &events, None);
    let warehouse = Warehouse::new(dir.path().join("wh"));
    let first = stream(&warehouse, &options(&broker)).unwrap();
    assert_eq!(first.messages, events.len() as u64);
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    let tables = TableSnapshot::take(&warehouse).unwrap();
    let raw = adsmetrics::sink::raw::list_raw_files(&warehouse);
    let journal = std::fs::read(warehouse.journal_path()).unwrap();

    // The broker re-delivers everything (the consumer seeks back to the start).
    let mut rewind = options(&broker);
    rewind.rewind = true;
    let again = stream(&warehouse, &rewind).unwrap();
    assert_eq!(again.redelivered, events.len() as u64);
    assert_eq!(again.epochs, 0);
    assert!(TableSnapshot::take(&warehouse)
        .unwrap()
        .untouched_since(&tables));
    assert_eq!(adsmetrics::sink::raw::list_raw_files(&warehouse), raw);
    assert_eq!(std::fs::read(warehouse.journal_path()).unwrap(), journal);

    // A producer resends a third of the events: new offsets, old dedup keys.
    send(&broker, &events[..events.len() / 3], None);
    let resent = stream(&warehouse, &options(&broker)).unwrap();
    assert_eq!(resent.messages, (events.len() / 3) as u64);
    assert!(resent.epochs >= 1);
    assert_eq!(resent.ingest.partitions_published, 0);
    assert!(
        TableSnapshot::take(&warehouse)
            .unwrap()
            .untouched_since(&tables),
        "a resend rewrote a table file"
    );
    let ends = log_end_offsets(&broker.bootstrap_servers(), &[TOPIC.to_string()]).unwrap();
    assert_eq!(journal_positions(&warehouse), ends);
}

#[test]
fn undecodable_messages_are_quarantined_with_their_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let events = sample_events(500, 5);
    let broker = broker(1);
    send(&broker, &events, Some(100));
    let warehouse = Warehouse::new(dir.path().join("wh"));
    let summary = stream(&warehouse, &options(&broker)).unwrap();
    assert_eq!(summary.messages, 505);
    assert_eq!(summary.ingest.quarantined, 5);
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    let rows = quarantine_rows(&warehouse);
    assert_eq!(rows.len(), 5);
    for (source, position, reason, _) in &rows {
        assert!(source.starts_with(&format!("kafka:{TOPIC}/0/")), "{source}");
        assert!(position.starts_with("offset "), "{position}");
        assert!(reason.contains("JSON"), "{reason}");
    }
    // Every 100th event is followed by its cut copy: offsets 100, 201, 302, …
    let offsets: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    assert!(offsets.contains(&"offset 100".to_string()), "{offsets:?}");
}

#[test]
fn a_crash_at_any_publish_step_recovers_to_the_uninterrupted_tables() {
    let events = sample_events(3000, 33);
    let broker = broker(2);
    send(&broker, &events, None);
    let expected = expected_tables(&events);
    for fail in [
        FailPoint::AfterStage,
        FailPoint::AfterPrepare,
        FailPoint::AfterRename(0),
        FailPoint::AfterCommit,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let warehouse = Warehouse::new(dir.path().join("wh"));
        let mut crashing = options(&broker);
        crashing.ingest.fail_point = Some(fail);
        crashing.group_id = format!("crash-{fail:?}");
        let crashed = stream(&warehouse, &crashing);
        assert!(
            crashed.is_err(),
            "{fail:?}: the injected fault stops the stream"
        );
        let resumed = stream(&warehouse, &options(&broker)).unwrap();
        assert_eq!(published_tables(&warehouse), expected, "{fail:?}");
        let ends = log_end_offsets(&broker.bootstrap_servers(), &[TOPIC.to_string()]).unwrap();
        assert_eq!(journal_positions(&warehouse), ends, "{fail:?}");
        assert_eq!(resumed.positions, ends, "{fail:?}");
        // Every raw file belongs to a committed source: the re-cut epoch rewrote the crashed
        // attempt's files rather than leaving orphans beside them.
        let consumed =
            adsmetrics::journal::CommitJournal::open(warehouse.root(), &warehouse.journal_path())
                .unwrap()
                .consumed()
                .clone();
        for path in adsmetrics::sink::raw::list_raw_files(&warehouse) {
            let hash = adsmetrics::sink::raw::source_hash_of(&path)
                .unwrap()
                .to_string();
            assert!(
                consumed.contains(&hash),
                "{fail:?}: orphan raw file {path:?}"
            );
        }
        assert_ledger_accounts_for_tables(&warehouse);
    }
}

/// One sample of `/metrics`, by its full name with labels as printed.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_show_lag_until_the_stream_catches_up_and_latency_per_message() {
    let dir = tempfile::tempdir().unwrap();
    // Twice what an epoch can hold (twice `epoch_events`), so one epoch cannot take them all.
    let events = sample_events(6000, 31);
    let broker = broker(3);
    send(&broker, &events, None);
    let warehouse = Warehouse::new(dir.path().join("wh"));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = adsmetrics::metrics::StreamMetrics::register(&mut registry);
    let server =
        adsmetrics::metrics::MetricsServer::start("127.0.0.1:0", std::sync::Arc::new(registry))
            .unwrap();
    let scrape = || {
        ureq::get(format!("http://{}/metrics", server.local_addr()))
            .call()
            .expect("GET /metrics")
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    let lag = |text: &str| -> f64 {
        (0..3)
            .map(|p| {
                sample(
                    text,
                    &format!(
                        "adsmetrics_kafka_consumer_lag{{topic=\"{TOPIC}\",partition=\"{p}\"}}"
                    ),
                )
            })
            .sum()
    };
    let mut o = options(&broker);
    o.metrics = Some(metrics.clone());

    // One small epoch, then stop: the rest is lag.
    o.max_epochs = Some(1);
    let first = stream(&warehouse, &o).unwrap();
    let text = scrape();
    assert!(first.messages > 0 && first.messages < events.len() as u64);
    assert_eq!(
        lag(&text),
        (events.len() as u64 - first.messages) as f64,
        "{text}"
    );
    assert_eq!(sample(&text, "adsmetrics_stream_epochs_total"), 1.0);

    // To the log end: no lag, every message counted and timed once.
    o.max_epochs = None;
    let rest = stream(&warehouse, &o).unwrap();
    let text = scrape();
    assert_eq!(lag(&text), 0.0, "{text}");
    let n = events.len() as f64;
    assert_eq!(sample(&text, "adsmetrics_stream_messages_total"), n);
    assert_eq!(sample(&text, "adsmetrics_stream_latency_seconds_count"), n);
    assert_eq!(
        sample(&text, "adsmetrics_events_accepted_total"),
        (first.ingest.events_accepted + rest.ingest.events_accepted) as f64
    );
    // By event type and producer: every kind the events have, adding up to the total.
    let by_kind: Vec<(String, f64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("adsmetrics_events_accepted_by_kind_total{"))
        .map(|rest| {
            let (labels, value) = rest.split_once("} ").unwrap();
            (labels.to_string(), value.trim().parse().unwrap())
        })
        .collect();
    let kinds: std::collections::BTreeSet<String> = events
        .iter()
        .map(|e| {
            format!(
                "event_type=\"{}\",producer=\"{}\"",
                e.event_type.as_str(),
                e.producer
            )
        })
        .collect();
    assert_eq!(
        by_kind
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<std::collections::BTreeSet<_>>(),
        kinds,
        "{text}"
    );
    assert_eq!(
        by_kind.iter().map(|(_, n)| n).sum::<f64>(),
        (first.ingest.events_accepted + rest.ingest.events_accepted) as f64
    );
    let ends = log_end_offsets(&broker.bootstrap_servers(), &[TOPIC.to_string()]).unwrap();
    for ((topic, partition), end) in ends {
        let name = format!(
            "adsmetrics_kafka_committed_offset{{topic=\"{topic}\",partition=\"{partition}\"}}"
        );
        assert_eq!(sample(&text, &name), end as f64);
    }
    assert!(sample(&text, "adsmetrics_partitions_published_total") > 0.0);
}
