//! `/metrics`: Prometheus text exposition for long-running commands.
//!
//! The metrics themselves are `prometheus-client` counters, gauges and histograms (atomics, cheap
//! to update from any thread); a command registers the families it keeps in one [`Registry`] and
//! hands it to a [`MetricsServer`], which answers `GET /metrics` with the registry's current
//! values in the text format (version 0.0.4) on its own thread and tokio runtime, so a scrape
//! never waits on the dataflow and the dataflow never waits on a scrape.
//!
//! Families so far: [`RunCounters`] (every command that ingests, `--metrics-listen`, updated as
//! each generation or epoch finishes) and [`StreamMetrics`] (`adsmetrics stream`, which holds them). Names carry the `adsmetrics_` prefix;
//! counters get Prometheus' `_total` suffix from the encoder.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A Kafka partition, as labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The topic.
    pub topic: String,
    /// The partition number.
    pub partition: i64,
}

/// An event type and a producer, as labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `impression`, `click` or `conversion`.
    pub event_type: String,
    /// The producer the event names.
    pub producer: String,
}

/// What `adsmetrics stream` exposes: epochs and messages, what they changed, ingest→visible
/// latency, and per partition the consumer lag (the broker's log end minus the next offset the
/// journal has committed: messages on the broker not yet visible in the tables).
#[derive(Debug)]
pub struct StreamMetrics {
    /// Epochs published.
    pub epochs: Counter,
    /// Messages read and published.
    pub messages: Counter,
    /// Messages dropped because the journal already held their offsets.
    pub redelivered: Counter,
    /// What its epochs' runs did (also what a batch command exposes).
    pub run: Arc<RunCounters>,
    /// Wall time of each epoch's run (raw layer, dataflow, publish, ledger entry), seconds.
    pub epoch_seconds: Histogram,
    /// Ingest→visible latency of each message, seconds: its Kafka timestamp to its epoch's publish.
    pub latency: Histogram,
    /// When the last epoch was published, Unix seconds.
    pub last_publish: Gauge<f64, AtomicU64>,
    /// Per partition: the broker's log end minus the committed next offset.
    pub lag: Family<PartitionLabels, Gauge>,
    /// Per partition: the next offset the journal has committed.
    pub committed_offset: Family<PartitionLabels, Gauge>,
    /// The committed next offsets, for whoever refreshes the lag.
    positions: Mutex<BTreeMap<(String, i32), i64>>,
}

/// What every run that writes exposes, counted as its generations (batch) or epochs (stream)
/// finish: events, what became of them, partitions published, state rebuilt, memory.
#[derive(Debug, Default)]
pub struct RunCounters {
    /// Events accepted into the raw layer.
    pub events_accepted: Counter,
    /// The same, by event type and producer.
    pub events_by_kind: Family<KindLabels, Counter>,
    /// Records quarantined (undecodable or invalid).
    pub quarantined: Counter,
    /// Curated partitions published with new contents.
    pub partitions_published: Counter,
    /// Curated partitions recomputed and found unchanged.
    pub partitions_unchanged: Counter,
    /// Records that repeated a key within their source (producer resends).
    pub duplicates: Counter,
    /// Keys seen with conflicting versions (a producer sent one event id with different
    /// contents; the newest revision wins).
    pub conflicts: Counter,
    /// Events that arrived after their partition's first publish.
    pub late_events: Counter,
    /// Raw-layer rows read back to rebuild the state a run touched.
    pub rehydrated_rows: Counter,
    /// The process's resident memory after the last epoch or generation, bytes.
    pub resident_memory: Gauge,
}

impl RunCounters {
    /// The counters, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let c = RunCounters::default();
        let r = registry;
        r.register(
            "adsmetrics_events_accepted",
            "Events accepted into the raw layer",
            c.events_accepted.clone(),
        );
        r.register(
            "adsmetrics_events_accepted_by_kind",
            "Events accepted into the raw layer, by event type and producer",
            c.events_by_kind.clone(),
        );
        r.register(
            "adsmetrics_events_quarantined",
            "Records quarantined with a reason",
            c.quarantined.clone(),
        );
        r.register(
            "adsmetrics_partitions_published",
            "Curated partitions published with new contents",
            c.partitions_published.clone(),
        );
        r.register(
            "adsmetrics_partitions_unchanged",
            "Curated partitions recomputed and found unchanged",
            c.partitions_unchanged.clone(),
        );
        r.register(
            "adsmetrics_events_duplicate",
            "Records repeating a key within their source (producer resends), dropped by dedup",
            c.duplicates.clone(),
        );
        r.register(
            "adsmetrics_conflicted_keys",
            "Event ids seen with conflicting contents (the newest revision counts)",
            c.conflicts.clone(),
        );
        r.register(
            "adsmetrics_late_events",
            "Events that arrived after their partition's first publish",
            c.late_events.clone(),
        );
        r.register(
            "adsmetrics_rehydrated_rows",
            "Raw-layer rows read back to rebuild the state a run touched",
            c.rehydrated_rows.clone(),
        );
        r.register(
            "adsmetrics_resident_memory_bytes",
            "Resident memory of the process after the last epoch or generation",
            c.resident_memory.clone(),
        );
        Arc::new(c)
    }

    /// Adds what one generation or epoch did.
    pub fn add(&self, s: &crate::runtime::IngestSummary) {
        self.events_accepted.inc_by(s.events_accepted);
        for ((event_type, producer), n) in &s.accepted_by_kind {
            self.events_by_kind
                .get_or_create(&KindLabels {
                    event_type: event_type.clone(),
                    producer: producer.clone(),
                })
                .inc_by(*n);
        }
        self.quarantined.inc_by(s.quarantined);
        self.partitions_published.inc_by(s.partitions_published);
        self.partitions_unchanged.inc_by(s.partitions_unchanged);
        self.duplicates.inc_by(s.in_source_duplicates);
        self.conflicts.inc_by(s.conflicted_keys.max(0) as u64);
        self.late_events.inc_by(s.late_events);
        self.rehydrated_rows.inc_by(s.rehydrated_rows);
        self.resident_memory
            .set(crate::memory::process_memory().0 as i64);
    }
}

/// Latency buckets, seconds: 50 ms to about 7 minutes, doubling (the streaming SLO is 3 minutes).
fn latency_buckets() -> impl Iterator<Item = f64> {
    (0..14).map(|i| 0.05 * f64::powi(2.0, i))
}

impl StreamMetrics {
    /// The stream's metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = StreamMetrics {
            epochs: Counter::default(),
            messages: Counter::default(),
            redelivered: Counter::default(),
            run: RunCounters::register(registry),
            epoch_seconds: Histogram::new(latency_buckets()),
            latency: Histogram::new(latency_buckets()),
            last_publish: Gauge::default(),
            lag: Family::default(),
            committed_offset: Family::default(),
            positions: Mutex::new(BTreeMap::new()),
        };
        let r = registry;
        r.register(
            "adsmetrics_stream_epochs",
            "Stream epochs published",
            m.epochs.clone(),
        );
        r.register(
            "adsmetrics_stream_messages",
            "Kafka messages read and published",
            m.messages.clone(),
        );
        r.register(
            "adsmetrics_stream_redelivered_messages",
            "Messages dropped because the journal already held their offsets",
            m.redelivered.clone(),
        );
        r.register(
            "adsmetrics_stream_epoch_seconds",
            "Wall time of each epoch's run: raw layer, dataflow, publish, ledger",
            m.epoch_seconds.clone(),
        );
        r.register(
            "adsmetrics_stream_latency_seconds",
            "Ingest-to-visible latency per message: Kafka timestamp to its epoch's publish",
            m.latency.clone(),
        );
        r.register(
            "adsmetrics_stream_last_publish_timestamp_seconds",
            "When the last stream epoch was published (Unix time)",
            m.last_publish.clone(),
        );
        r.register(
            "adsmetrics_kafka_consumer_lag",
            "Messages on the broker not yet published: log end minus the journal's next offset",
            m.lag.clone(),
        );
        r.register(
            "adsmetrics_kafka_committed_offset",
            "The next offset the commit journal holds, per partition",
            m.committed_offset.clone(),
        );
        Arc::new(m)
    }

    /// Records the journal's next offset of a partition (after a publish, and at start).
    pub fn set_position(&self, topic: &str, partition: i32, next: i64) {
        self.committed_offset
            .get_or_create(&labels(topic, partition))
            .set(next);
        self.positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((topic.to_string(), partition), next);
    }

    /// Sets each partition's lag from its log end, `high` (the broker's next offset).
    pub fn set_log_end(&self, topic: &str, partition: i32, high: i64) {
        let next = self
            .positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(topic.to_string(), partition))
            .copied()
            .unwrap_or(0);
        self.lag
            .get_or_create(&labels(topic, partition))
            .set((high - next).max(0));
    }
}

fn labels(topic: &str, partition: i32) -> PartitionLabels {
    PartitionLabels {
        topic: topic.to_string(),
        partition: i64::from(partition),
    }
}

/// The registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String does not fail");
    out
}

/// An axum router served on a thread of its own, with a tokio runtime of its own (so requests
/// never wait on the caller's work, nor it on them); handlers see the client's address
/// (`ConnectInfo<SocketAddr>`). Stops, after the requests in flight, when dropped.
pub struct HttpServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on `listen` (`host:port`; port 0 picks a free one) and serves `router` on a thread
    /// named `name`, with `threads` runtime threads (1: the server's own thread only). Fails at
    /// once if the address cannot be bound.
    pub fn start(
        listen: &str,
        name: &str,
        threads: usize,
        router: axum::Router,
    ) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(format!("{name}-worker"))
                .enable_io()
                .enable_time()
                .build()?
        };
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(server = %label, error = %e, "HTTP server could not start");
                            return;
                        }
                    };
                    let served = axum::serve(
                        listener,
                        router.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
                    if let Err(e) = served {
                        tracing::error!(server = %label, error = %e, "HTTP server stopped");
                    }
                });
            })?;
        Ok(HttpServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The answer to `GET /metrics`: the registry in the text format.
pub fn metrics_response(registry: &Registry) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(registry),
    )
}

/// An HTTP server answering `GET /metrics` from a registry ([`HttpServer`]); stops when dropped.
pub struct MetricsServer(HttpServer);

impl MetricsServer {
    /// Listens on `listen` (`host:port`; port 0 picks a free one) and serves `registry`. Fails at
    /// once if the address cannot be bound.
    pub fn start(listen: &str, registry: Arc<Registry>) -> std::io::Result<Self> {
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move { metrics_response(&registry) }
            }),
        );
        HttpServer::start(listen, "metrics-http", 1, router).map(MetricsServer)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }
}

/// A batch run's figures (`ingest`, `backfill`, `reprocess`, `delete`) in Prometheus text, for
/// node_exporter's textfile collector: one gauge per figure of its summary, labelled with the
/// command, and the time it finished. A run that fails writes nothing, so
/// `adsmetrics_run_last_success_timestamp_seconds` is the last success.
pub fn run_metrics_text(command: &str, s: &crate::runtime::IngestSummary, at_s: f64) -> String {
    let mut registry = Registry::default();
    let family = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let g: Family<CommandLabels, Gauge<f64, AtomicU64>> = Family::default();
        g.get_or_create(&CommandLabels {
            command: command.to_string(),
        })
        .set(value);
        registry.register(name, help, g);
    };
    let peak = s
        .memory
        .iter()
        .map(|m| m.peak_rss_bytes)
        .max()
        .unwrap_or_else(|| crate::memory::process_memory().1);
    let figures: [(&str, &str, f64); 15] = [
        (
            "adsmetrics_run_last_success_timestamp_seconds",
            "When the last successful run of the command ended (Unix time)",
            at_s,
        ),
        (
            "adsmetrics_run_duration_seconds",
            "Wall time of the last run",
            s.elapsed.as_secs_f64(),
        ),
        (
            "adsmetrics_run_sources_ingested",
            "Sources decoded and committed by the last run",
            s.sources_ingested as f64,
        ),
        (
            "adsmetrics_run_sources_skipped",
            "Sources the last run found already consumed",
            s.sources_skipped as f64,
        ),
        (
            "adsmetrics_run_events_accepted",
            "Events the last run accepted",
            s.events_accepted as f64,
        ),
        (
            "adsmetrics_run_events_quarantined",
            "Records the last run quarantined",
            s.quarantined as f64,
        ),
        (
            "adsmetrics_run_events_duplicate",
            "Records repeating a key within their source",
            s.in_source_duplicates as f64,
        ),
        (
            "adsmetrics_run_events_tombstoned",
            "Records refused because their event was deleted",
            s.tombstoned as f64,
        ),
        (
            "adsmetrics_run_late_events",
            "Events into partitions already published",
            s.late_events as f64,
        ),
        (
            "adsmetrics_run_conflicted_keys",
            "Keys seen with conflicting versions",
            s.conflicted_keys as f64,
        ),
        (
            "adsmetrics_run_rehydrated_rows",
            "Raw-layer rows read back to rebuild state",
            s.rehydrated_rows as f64,
        ),
        (
            "adsmetrics_run_epochs",
            "Epochs of the last run",
            s.epochs as f64,
        ),
        (
            "adsmetrics_run_partitions_published",
            "Partition versions the last run published",
            s.partitions_published as f64,
        ),
        (
            "adsmetrics_run_partitions_unchanged",
            "Partitions recomputed and found unchanged",
            s.partitions_unchanged as f64,
        ),
        (
            "adsmetrics_run_peak_resident_memory_bytes",
            "Peak resident memory of the last run",
            peak as f64,
        ),
    ];
    for (name, help, value) in figures {
        family(&mut registry, name, help, value);
    }
    let by_kind: Family<RunKindLabels, Gauge<f64, AtomicU64>> = Family::default();
    for ((event_type, producer), n) in &s.accepted_by_kind {
        by_kind
            .get_or_create(&RunKindLabels {
                command: command.to_string(),
                event_type: event_type.clone(),
                producer: producer.clone(),
            })
            .set(*n as f64);
    }
    registry.register(
        "adsmetrics_run_events_accepted_by_kind",
        "Events the last run accepted, by event type and producer",
        by_kind,
    );
    render(&registry)
}

/// The labels of a batch run's events by kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunKindLabels {
    command: String,
    event_type: String,
    producer: String,
}

/// The `command` label of a batch run's figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
}
