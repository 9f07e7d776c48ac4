//! Streaming from Kafka: epochs of ranges of Kafka partitions, each ingested and published as one
//! run, with the offsets it consumed committed in the same publish.
//!
//! ```text
//!  start:  journal ─▶ next offset of every (topic, partition) it committed
//!          intent  ─▶ the ranges of an epoch that was cut but not committed (a crash)
//!          assign every partition of the topics, seek each to its next offset
//!  epoch:  poll until --epoch-ms since its first message or --epoch-events messages
//!          (a recovering epoch: until each intended range is complete, exactly those ranges)
//!          drop what lies below the next offset (a broker re-delivering, a seek back)
//!          per (topic, partition): one source `kafka:<topic>/<partition>/<first>-<last>`,
//!            its content hash over the label and every message, its messages decoded
//!          write the intent (the ranges)
//!          ingest the sources as one run (crate::runtime::ingest_inline): raw layer, dataflow,
//!            publish; the journal's publish names the sources, so the offsets commit with it
//!          next offset = last + 1; commit to the consumer group too (lag monitoring only)
//! ```
//!
//! Exactly-once without Kafka transactions: the journal is the only record of what was consumed.
//! A crash before the publish's commit leaves the ranges uncommitted, and the restart cuts the
//! same ranges again from the intent (same messages, same hash, same raw file names: the raw
//! layer's files of the crashed attempt are rewritten with the same bytes); a crash after it
//! leaves them committed, and the restart seeks past them. A message re-delivered below the
//! next offset is dropped before it is decoded; a producer's resend (the same event at another
//! offset) is a new record with an old dedup key, which the dataflow counts once. Which worker
//! ingests which partition's range and how the epochs are cut change nothing in the tables:
//! they depend only on the set of events. (The messages are decoded on the epoch thread; the
//! workers ingest the decoded sources.)
//!
//! A message's value is one JSON object in the event schema (it may span lines); a message
//! without a `producer` field takes its producer from its `producer` header (the key is not
//! used: producers key by event or user id).
//! A message that does not decode is quarantined with its topic, partition and offset (the
//! source label and `offset N`) and the reason.
//!
//! On a cluster of processes ([`cluster`]) each process reads its share of the partitions and
//! the coordinator cuts every process's epoch at once; the steps above are otherwise the same.

pub mod cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::decode::{decode_json_message, Decoded};
use crate::event::Quarantined;
use crate::journal::SourceRecord;
use crate::ledger::RunKind;
use crate::metrics::StreamMetrics;
use crate::runtime::{self, IngestOptions, IngestSummary, RunError};
use crate::sink::files::WriteError;
use crate::source::SourceFile;
use crate::warehouse::Warehouse;

/// How a Kafka source is labelled in the journal, raw layer and quarantine.
pub const SOURCE_PREFIX: &str = "kafka:";

/// A Kafka partition of a topic.
pub type TopicPartition = (String, i32);

/// A range of one Kafka partition: the messages with offsets `first..=last` that were read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The first offset.
    pub first: i64,
    /// The last offset (inclusive).
    pub last: i64,
}

impl Range {
    /// The source label: `kafka:<topic>/<partition>/<first>-<last>`.
    pub fn label(&self) -> String {
        format!(
            "{SOURCE_PREFIX}{}/{}/{}-{}",
            self.topic, self.partition, self.first, self.last
        )
    }

    /// The range a source label names, if it is a Kafka source's.
    pub fn parse(label: &str) -> Option<Range> {
        let rest = label.strip_prefix(SOURCE_PREFIX)?;
        let (rest, offsets) = rest.rsplit_once('/')?;
        let (topic, partition) = rest.rsplit_once('/')?;
        let (first, last) = offsets.split_once('-')?;
        Some(Range {
            topic: topic.to_string(),
            partition: partition.parse().ok()?,
            first: first.parse().ok()?,
            last: last.parse().ok()?,
        })
    }
}

/// The next offset to read of every partition the committed sources cover: one past the
/// greatest committed offset.
pub fn committed_positions(sources: &[SourceRecord]) -> BTreeMap<TopicPartition, i64> {
    let mut next = BTreeMap::new();
    for range in sources.iter().filter_map(|s| Range::parse(&s.source)) {
        let at = next.entry((range.topic, range.partition)).or_insert(0);
        *at = (*at).max(range.last + 1);
    }
    next
}

/// How to run `adsmetrics stream`.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Bootstrap servers, `host:port,…`.
    pub brokers: String,
    /// Topics to read, every partition of each.
    pub topics: Vec<String>,
    /// Consumer group, for offset commits that monitor lag (never read back for correctness).
    pub group_id: String,
    /// An epoch closes this long after its first message…
    pub epoch: Duration,
    /// …or at this many messages, whichever comes first.
    pub epoch_events: usize,
    /// Stop once no message arrived for this long, every partition is read to its log end and
    /// everything read is published.
    pub until_idle: Option<Duration>,
    /// Further librdkafka settings (security, timeouts) for a real cluster.
    pub kafka_config: Vec<(String, String)>,
    /// Seek every partition to its start instead of the journal's offsets, as a broker
    /// re-delivering does: what the journal holds is then dropped as re-delivered.
    pub rewind: bool,
    /// Tests only: stop after this many epochs.
    pub max_epochs: Option<u64>,
    /// A line on stderr per epoch (otherwise one every 10 s).
    pub verbose: bool,
    /// The ingest of each epoch (workers, hot window; progress is off).
    pub ingest: IngestOptions,
    /// Rows (events, and earlier rows rebuilt for them) the stream's dataflow takes in before it
    /// is dropped and a new one starts ([`runtime::OpenCache::with_session`]): its memory grows
    /// with them.
    pub dataflow_rows: u64,
    /// Where to report lag, latency and counts (served on `/metrics` by the caller).
    pub metrics: Option<Arc<StreamMetrics>>,
}

impl StreamOptions {
    /// Defaults for `brokers` and `topics`: 1 s or 1M-message epochs, group `adsmetrics`.
    pub fn new(brokers: impl Into<String>, topics: Vec<String>) -> Self {
        StreamOptions {
            brokers: brokers.into(),
            topics,
            group_id: "adsmetrics".to_string(),
            epoch: Duration::from_millis(1000),
            epoch_events: 1_000_000,
            until_idle: None,
            kafka_config: Vec::new(),
            rewind: false,
            max_epochs: None,
            verbose: false,
            ingest: IngestOptions {
                progress: false,
                ..IngestOptions::default()
            },
            metrics: None,
            dataflow_rows: DEFAULT_DATAFLOW_ROWS,
        }
    }
}

/// What a stream did.
#[derive(Clone, Debug, Default)]
pub struct StreamSummary {
    /// Epochs published.
    pub epochs: u64,
    /// Messages read and ingested.
    pub messages: u64,
    /// Messages dropped because the journal already holds their offsets (re-delivered).
    pub redelivered: u64,
    /// The epochs' ingests, summed.
    pub ingest: IngestSummary,
    /// Ingest→visible latency of every message: its Kafka timestamp to its epoch's publish.
    pub latency: Latency,
    /// The next offset of every partition, as committed.
    pub positions: BTreeMap<TopicPartition, i64>,
    /// How long it ran.
    pub elapsed: Duration,
}

/// A histogram of latencies in milliseconds (1 ms buckets up to a minute, then one bucket).
#[derive(Clone, Debug)]
pub struct Latency {
    buckets: Vec<u64>,
    count: u64,
    max_ms: u64,
}

const LATENCY_BUCKETS: usize = 60_001;

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: vec![0; LATENCY_BUCKETS],
            count: 0,
            max_ms: 0,
        }
    }
}

impl Latency {
    /// Records one latency.
    pub fn record(&mut self, ms: u64) {
        let i = (ms as usize).min(LATENCY_BUCKETS - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.max_ms = self.max_ms.max(ms);
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q`-quantile (0 to 1) in ms; `None` if nothing was recorded. Above a minute: the max.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (ms, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(if ms == LATENCY_BUCKETS - 1 {
                    self.max_ms
                } else {
                    ms as u64
                });
            }
        }
        Some(self.max_ms)
    }

    /// The largest latency recorded, ms.
    pub fn max(&self) -> u64 {
        self.max_ms
    }
}

/// Why a stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The Kafka client failed in a way that retrying inside the stream cannot fix.
    #[error("kafka ({context}): {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The client's error.
        source: KafkaError,
    },
    /// A topic is not on the cluster.
    #[error("topic {topic:?} does not exist on {brokers} (create it first; `adsmetrics dev-broker --topics` does for the mock)")]
    NoTopic {
        /// The topic.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
    },
    /// Messages the journal has not consumed are gone from the broker: events were lost upstream.
    #[error("offsets {from}..{to} of {topic}/{partition} are no longer on the broker (retention removed them before this warehouse read them): those events are lost upstream; the journal's position is {from}")]
    Gone {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The journal's next offset.
        from: i64,
        /// The broker's log start.
        to: i64,
    },
    /// The thread reading from Kafka panicked (a bug); run `stream` again to resume.
    #[error("the Kafka reader thread panicked; nothing read since the last epoch was committed")]
    Reader,
    /// A setting the exactly-once design owns was given.
    #[error("{0}")]
    Config(String),
    /// An epoch's run failed; running `stream` again resumes from what the journal holds.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The intent file could not be written or read.
    #[error(transparent)]
    Write(#[from] WriteError),
}

fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> StreamError {
    let context = context.into();
    move |source| StreamError::Kafka { context, source }
}

/// One message as read: what the source's identity and decode need.
struct Record {
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    producer: Option<String>,
    timestamp_ms: Option<i64>,
}

/// The ranges of the epoch being published, written before its run starts and read at the next
/// start: a range not committed by then is cut again exactly.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Intent {
    ranges: Vec<Range>,
}

fn intent_path(warehouse: &Warehouse) -> PathBuf {
    warehouse.meta_dir().join("stream-intent.json")
}

fn read_intent(warehouse: &Warehouse) -> Intent {
    let path = intent_path(warehouse);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            // Written by rename, so never torn; unreadable means edited: start without it.
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable stream intent");
            Intent::default()
        }),
        Err(_) => Intent::default(),
    }
}

/// The ranges of the intent that the journal has not committed (`next`: its next offset of each
/// partition): an epoch cut before a crash, to cut again exactly.
fn uncommitted_intent(warehouse: &Warehouse, next: &BTreeMap<TopicPartition, i64>) -> Vec<Range> {
    read_intent(warehouse)
        .ranges
        .into_iter()
        .filter(|r| {
            r.first
                >= next
                    .get(&(r.topic.clone(), r.partition))
                    .copied()
                    .unwrap_or(0)
        })
        .collect()
}

/// Not synced by itself: the epoch's publish syncs the filesystem before its journal record, and
/// an intent lost with a crash before that costs only raw files that no commit names (ignored).
fn write_intent(warehouse: &Warehouse, intent: &Intent) -> Result<(), WriteError> {
    let path = intent_path(warehouse);
    let bytes = serde_json::to_vec(intent).expect("an intent serializes");
    crate::sink::files::replace(&path.with_extension("json.tmp"), &path, &bytes)
}

/// The source of one range: its label, its hash over the label and every message (offset, key,
/// value, producer header), and its messages decoded.
fn range_source(range: &Range, records: &[Record]) -> SourceFile {
    let label = range.label();
    let mut hash = Xxh3::new();
    hash.update(label.as_bytes());
    let mut put = |bytes: Option<&[u8]>| match bytes {
        Some(b) => {
            hash.update(&(b.len() as u64).to_le_bytes());
            hash.update(b);
        }
        None => hash.update(&u64::MAX.to_le_bytes()),
    };
    let mut decoded = Decoded::default();
    let mut bytes = 0u64;
    for r in records {
        put(Some(&r.offset.to_le_bytes()));
        put(r.key.as_deref());
        put(r.value.as_deref());
        put(r.producer.as_deref().map(str::as_bytes));
        let producer = r.producer.as_deref();
        let result = match &r.value {
            None => Err("message has no value".to_string()),
            Some(value) => {
                bytes += value.len() as u64;
                decode_json_message(value, producer)
            }
        };
        match result {
            Ok(event) => decoded.events.push(event),
            Err(reason) => decoded.quarantined.push(Quarantined {
                source: label.clone(),
                position: format!("offset {}", r.offset),
                raw: r.value.clone().unwrap_or_default(),
                reason,
            }),
        }
    }
    SourceFile {
        path: PathBuf::from(&label),
        label,
        content_hash: format!("{:032x}", hash.digest128()),
        bytes,
        inline: Some(Arc::new(decoded)),
        held_by: None,
    }
}

/// librdkafka settings the exactly-once design owns: overriding them could skip or re-read data.
const OWNED_SETTINGS: [&str; 7] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "isolation.level",
    "enable.partition.eof",
];

/// Refuses a `--kafka-config` setting the exactly-once design owns ([`OWNED_SETTINGS`]),
/// before anything is read or written.
fn refuse_owned_settings(options: &StreamOptions) -> Result<(), StreamError> {
    match options
        .kafka_config
        .iter()
        .find(|(k, _)| OWNED_SETTINGS.contains(&k.as_str()))
    {
        Some((key, _)) => Err(StreamError::Config(format!(
            "--kafka-config {key} is set by the stream itself (offsets come from the journal; \
             use --brokers and --group for the address and the group)"
        ))),
        None => Ok(()),
    }
}

/// A Kafka client configuration for `options`.
fn client_config(options: &StreamOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.brokers)
        .set("group.id", &options.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A position the broker no longer has is an error, never a silent jump.
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "50");
    for (k, v) in &options.kafka_config {
        config.set(k, v);
    }
    config
}

/// Reads the topics of `options` into `warehouse`, epoch by epoch, until idle (or forever).
/// Safe to kill at any moment: run it again and it resumes from the journal.
pub fn stream(
    warehouse: &Warehouse,
    options: &StreamOptions,
) -> Result<StreamSummary, StreamError> {
    let started = Instant::now();
    refuse_owned_settings(options)?;
    if let Some(cluster) = &options.ingest.cluster {
        return cluster::coordinate(warehouse, options, cluster);
    }
    let committed = runtime::committed_sources(warehouse)?;
    let mut next = committed_positions(&committed);
    drop(committed);
    // An epoch cut before a crash and not committed: its ranges are cut again, exactly.
    let mut recovering: BTreeMap<TopicPartition, i64> = uncommitted_intent(warehouse, &next)
        .into_iter()
        .map(|r| ((r.topic, r.partition), r.last))
        .collect();
    if !recovering.is_empty() {
        tracing::warn!(
            ranges = recovering.len(),
            "re-cutting the uncommitted epoch of an earlier run"
        );
    }

    let consumer: BaseConsumer = client_config(options)
        .create()
        .map_err(kafka("creating the consumer"))?;
    let partitions = topic_partitions(&consumer, &options.topics, &options.brokers)?;
    let wanted = assign_partitions(&consumer, &partitions, &next, options.rewind)?;
    tracing::info!(
        partitions = partitions.len(),
        resumed = next.len(),
        "stream assigned"
    );
    if let Some(metrics) = &options.metrics {
        for ((topic, partition), at) in &wanted {
            metrics.set_position(topic, *partition, *at);
        }
    }
    // An intended range of a partition no longer read (other topics this time) cannot complete.
    recovering.retain(|tp, _| partitions.contains(tp));
    let intake = Intake::new(wanted, !recovering.is_empty());
    let shared = (std::sync::Mutex::new(intake), std::sync::Condvar::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut summary = StreamSummary::default();
    // The reader polls on while an epoch runs, so fetching the next epoch overlaps this one.
    let outcome = std::thread::scope(|scope| {
        spawn_readers(scope, &consumer, &partitions, options, &shared, &stop);
        // Stops the reader however the epoch loop ends (an error, a panic).
        let _stop = StopOnDrop(&stop);
        cut_epochs(
            warehouse,
            options,
            &consumer,
            &partitions,
            &shared,
            recovering,
            &mut next,
            &mut summary,
            started,
        )
    });
    summary.redelivered = lock(&shared.0).redelivered;
    last_metrics(options, &consumer, &partitions, summary.redelivered);
    outcome?;
    summary.positions = next;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Assigns `partitions` to `consumer`, each at its `next` offset (or its start: without one, or
/// with `rewind`). Returns the next offset wanted of each: `next`'s, or the log start. A next
/// offset the broker no longer has is an error ([`StreamError::Gone`]).
fn assign_partitions(
    consumer: &BaseConsumer,
    partitions: &[TopicPartition],
    next: &BTreeMap<TopicPartition, i64>,
    rewind: bool,
) -> Result<BTreeMap<TopicPartition, i64>, StreamError> {
    let mut assignment = TopicPartitionList::new();
    let mut log_start = BTreeMap::new();
    for (topic, partition) in partitions {
        let (low, _) = watermarks(consumer, topic, *partition)?;
        let at = next.get(&(topic.clone(), *partition)).copied();
        if let Some(at) = at.filter(|at| *at < low) {
            return Err(StreamError::Gone {
                topic: topic.clone(),
                partition: *partition,
                from: at,
                to: low,
            });
        }
        if at.is_none() && low > 0 {
            tracing::warn!(
                topic, partition, low,
                "the partition's log starts at offset {low}: earlier messages were removed by the broker's retention before this warehouse read them"
            );
        }
        log_start.insert((topic.clone(), *partition), low);
        let offset = match (rewind, at) {
            (false, Some(at)) => Offset::Offset(at),
            _ => Offset::Beginning,
        };
        assignment
            .add_partition_offset(topic, *partition, offset)
            .map_err(kafka("assigning partitions"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(kafka("assigning partitions"))?;
    // Per partition, the next offset wanted: past what is committed and what is buffered.
    let mut wanted = next.clone();
    for (tp, low) in log_start {
        wanted.entry(tp).or_insert(low);
    }
    Ok(wanted)
}

/// Spawns the reader thread (which polls on while an epoch runs, so fetching the next epoch
/// overlaps this one) and, with metrics, the thread that refreshes the lag; both stop at `stop`.
fn spawn_readers<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    consumer: &'env BaseConsumer,
    partitions: &'env [TopicPartition],
    options: &'env StreamOptions,
    shared: &'env SharedIntake,
    stop: &'env std::sync::atomic::AtomicBool,
) {
    scope.spawn(move || {
        let _report = ReaderExit(shared);
        read_messages(consumer, options, shared, stop)
    });
    if let Some(metrics) = &options.metrics {
        scope.spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                refresh_lag(consumer, partitions, metrics);
                for _ in 0..LAG_REFRESH_TICKS {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
    }
}

/// The metrics as a stream leaves them: the re-delivered messages it dropped, and the lag of
/// its `partitions` once more.
fn last_metrics(
    options: &StreamOptions,
    consumer: &BaseConsumer,
    partitions: &[TopicPartition],
    redelivered: u64,
) {
    if let Some(metrics) = &options.metrics {
        metrics
            .redelivered
            .inc_by(redelivered.saturating_sub(metrics.redelivered.get()));
        refresh_lag(consumer, partitions, metrics);
    }
}

/// The lag is refreshed every this many tenths of a second.
const LAG_REFRESH_TICKS: u32 = 10;

/// Asks the broker for every partition's log end and sets the lag gauges (a partition whose
/// watermarks cannot be had keeps its last value).
fn refresh_lag(consumer: &BaseConsumer, partitions: &[TopicPartition], metrics: &StreamMetrics) {
    for (topic, partition) in partitions {
        match consumer.fetch_watermarks(topic.as_str(), *partition, Duration::from_secs(5)) {
            Ok((_, high)) => metrics.set_log_end(topic, *partition, high),
            Err(e) => tracing::debug!(topic, partition, error = %e, "no watermarks for the lag"),
        }
    }
}

/// Sets the flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Tells the epoch loop when the reader thread died of a panic, so it stops instead of waiting.
struct ReaderExit<'a>(&'a SharedIntake);

impl Drop for ReaderExit<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            lock(&self.0 .0).failed = Some(StreamError::Reader);
            self.0 .1.notify_all();
        }
    }
}

/// What the reader thread has read and not yet handed to an epoch.
struct Intake {
    buffered: BTreeMap<TopicPartition, Vec<Record>>,
    count: usize,
    /// When the oldest buffered message arrived: the epoch's clock.
    first_at: Option<Instant>,
    last_message: Instant,
    redelivered: u64,
    /// Per partition, the next offset wanted: past what is committed and what is buffered.
    wanted: BTreeMap<TopicPartition, i64>,
    failed: Option<StreamError>,
    /// An uncommitted epoch is being cut again: the reader must not hold off, or the ranges it
    /// waits for may never complete.
    recovering: bool,
}

/// How long a stream waits for the ranges of a crashed epoch to be read in full before it gives
/// them up (the broker no longer has them: retention, a lost mock broker).
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

impl Intake {
    /// Whether every partition of `limits` is buffered up to its last offset there.
    fn holds(&self, limits: &BTreeMap<TopicPartition, i64>) -> bool {
        limits.iter().all(|(tp, last)| {
            self.buffered
                .get(tp)
                .and_then(|r| r.last())
                .is_some_and(|r| r.offset >= *last)
        })
    }

    /// Takes the next epoch: everything buffered, or (`limits`: an uncommitted epoch cut again)
    /// exactly those ranges ([`take_epoch`]); the rest stays, its clock restarted.
    fn cut(
        &mut self,
        limits: &BTreeMap<TopicPartition, i64>,
    ) -> Vec<(TopicPartition, Vec<Record>)> {
        self.recovering = false;
        let epoch = take_epoch(&mut self.buffered, limits);
        self.count = self.buffered.values().map(Vec::len).sum();
        self.first_at = (self.count > 0).then(Instant::now);
        epoch
    }

    /// Nothing read yet; `wanted`: the next offset of each partition; `recovering`: an
    /// uncommitted epoch is to be cut again.
    fn new(wanted: BTreeMap<TopicPartition, i64>, recovering: bool) -> Self {
        Intake {
            buffered: BTreeMap::new(),
            count: 0,
            first_at: None,
            last_message: Instant::now(),
            redelivered: 0,
            wanted,
            failed: None,
            recovering,
        }
    }
}

type SharedIntake = (std::sync::Mutex<Intake>, std::sync::Condvar);

fn lock(m: &std::sync::Mutex<Intake>) -> std::sync::MutexGuard<'_, Intake> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reader thread: polls the consumer into the intake until `stop`, dropping what lies below
/// the wanted offsets; holds off while two epochs' worth are waiting (the rest waits in the
/// client's queue).
fn read_messages(
    consumer: &BaseConsumer,
    options: &StreamOptions,
    (intake, ready): &SharedIntake,
    stop: &std::sync::atomic::AtomicBool,
) {
    let epoch_events = options.epoch_events.max(1);
    let mut last_error: Option<Instant> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let held_off = {
            let g = lock(intake);
            g.count >= 2 * epoch_events && !g.recovering
        };
        if held_off {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let tp = (m.topic().to_string(), m.partition());
                let producer = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "producer")
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map(str::to_string)
                });
                let record = Record {
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    producer,
                    timestamp_ms: m.timestamp().to_millis(),
                };
                drop(m);
                let mut g = lock(intake);
                g.last_message = Instant::now();
                let want = g.wanted.get(&tp).copied().unwrap_or(0);
                if record.offset < want {
                    g.redelivered += 1;
                    continue;
                }
                g.wanted.insert(tp.clone(), record.offset + 1);
                g.buffered.entry(tp).or_default().push(record);
                g.count += 1;
                if g.first_at.is_none() {
                    g.first_at = Some(Instant::now());
                }
                if g.count == epoch_events {
                    ready.notify_one();
                }
            }
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                lock(intake).failed = Some(StreamError::Kafka {
                    context: "reading at the journal's offsets: the broker no longer has them \
                              (retention removed messages this warehouse had not read)"
                        .to_string(),
                    source: KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset),
                });
                ready.notify_one();
                return;
            }
            // Broker trouble is retried by the client; say so now and then.
            Some(Err(e)) if last_error.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) => {
                tracing::warn!(error = %e, "kafka consumer error (retrying)");
                last_error = Some(Instant::now());
            }
            Some(Err(_)) => {}
        }
    }
}

/// Rows of raw files' key, user and ad columns a stream keeps between epochs (32 bytes each:
/// 128 MiB), enough for the current day's files at the rates measured here.
const STREAM_COLUMN_CACHE_ROWS: usize = 1 << 22;

/// The default of [`StreamOptions::dataflow_rows`].
pub const DEFAULT_DATAFLOW_ROWS: u64 = 50_000_000;

/// The epoch loop: waits until the intake holds an epoch (by time or size; recovering, exactly
/// the intended ranges), publishes it, and stops when idle at the log end.
#[allow(clippy::too_many_arguments)]
fn cut_epochs(
    warehouse: &Warehouse,
    options: &StreamOptions,
    consumer: &BaseConsumer,
    partitions: &[TopicPartition],
    (intake, ready_signal): &SharedIntake,
    mut recovering: BTreeMap<TopicPartition, i64>,
    next: &mut BTreeMap<TopicPartition, i64>,
    summary: &mut StreamSummary,
    started: Instant,
) -> Result<(), StreamError> {
    let mut recovery_started = Instant::now();
    let mut last_status = Instant::now();
    // The journal, ledger and raw listing as the last epoch left them, and the raw files' key,
    // user and ad columns the epochs' rebuilds scanned (all read afresh whenever another
    // writer, a delete say, wrote in between).
    // And the dataflow itself, with what it holds, for as long as nothing else writes.
    let mut cache = runtime::OpenCache::with_columns(STREAM_COLUMN_CACHE_ROWS)
        .with_session(options.dataflow_rows.max(1));
    let mut g = lock(intake);
    loop {
        if let Some(e) = g.failed.take() {
            return Err(e);
        }
        let full = g.count >= options.epoch_events.max(1);
        let timed_out = g.first_at.is_some_and(|at| at.elapsed() >= options.epoch);
        let ready = if recovering.is_empty() {
            g.count > 0 && (full || timed_out)
        } else {
            let complete = g.holds(&recovering);
            // A range the broker no longer has in full (retention, a lost mock broker) cannot
            // be cut again: go on with what there is; the crashed attempt's raw files are then
            // never committed, and every reader ignores them.
            let given_up = recovery_started.elapsed() > RECOVERY_WAIT;
            if given_up && !complete {
                tracing::warn!("an uncommitted epoch's ranges are no longer on the broker in full");
            }
            complete || given_up
        };
        if ready {
            let epoch = g.cut(&std::mem::take(&mut recovering));
            drop(g);
            if !epoch.is_empty() {
                publish_epoch(
                    warehouse, options, consumer, epoch, next, summary, &mut cache,
                )?;
            }
            if options.verbose || last_status.elapsed() >= Duration::from_secs(10) {
                eprintln!("{}", status_line(summary, started.elapsed()));
                last_status = Instant::now();
            }
            recovery_started = Instant::now();
            if options.max_epochs.is_some_and(|m| summary.epochs >= m) {
                return Ok(());
            }
            g = lock(intake);
            continue;
        }
        if g.count == 0
            && options
                .until_idle
                .is_some_and(|idle| g.last_message.elapsed() >= idle)
        {
            // Idle is not done while the log holds more (a slow first fetch, a busy broker).
            let wanted = g.wanted.clone();
            drop(g);
            let behind = behind(consumer, partitions, &wanted);
            g = lock(intake);
            match behind {
                None if g.count == 0 => return Ok(()),
                None => {}
                Some(tp) => {
                    tracing::info!(
                        topic = tp.0,
                        partition = tp.1,
                        "idle but behind the log end; reading on"
                    );
                    g.last_message = Instant::now();
                }
            }
            continue;
        }
        let wait = match g.first_at {
            Some(at) => options.epoch.saturating_sub(at.elapsed()),
            None => Duration::from_millis(100),
        };
        g = ready_signal
            .wait_timeout(
                g,
                wait.clamp(Duration::from_millis(1), Duration::from_millis(100)),
            )
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// A partition of `partitions` not yet read to its log end, given the next offset `wanted` of
/// each; `None` when every one is.
fn behind<'a>(
    consumer: &BaseConsumer,
    partitions: &'a [TopicPartition],
    wanted: &BTreeMap<TopicPartition, i64>,
) -> Option<&'a TopicPartition> {
    // Read up to the log end: the consumer's position passes transaction markers, which
    // no message offset does. A failed fetch counts as behind (asked again next time).
    let position: BTreeMap<TopicPartition, i64> = consumer
        .position()
        .map(|tpl| {
            tpl.elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(at) => Some(((e.topic().to_string(), e.partition()), at)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    partitions.iter().find(|tp| {
        let read = wanted
            .get(*tp)
            .copied()
            .unwrap_or(0)
            .max(position.get(*tp).copied().unwrap_or(0));
        watermarks(consumer, &tp.0, tp.1).map_or(true, |(_, high)| high > read)
    })
}

/// The buffered records of the epoch to publish: all of them, or (recovering) exactly the
/// intended ranges of the partitions that have one and nothing of the others.
fn take_epoch(
    buffered: &mut BTreeMap<TopicPartition, Vec<Record>>,
    limits: &BTreeMap<TopicPartition, i64>,
) -> Vec<(TopicPartition, Vec<Record>)> {
    if limits.is_empty() {
        return std::mem::take(buffered)
            .into_iter()
            .filter(|(_, r)| !r.is_empty())
            .collect();
    }
    let mut epoch = Vec::new();
    for (tp, last) in limits {
        if let Some(records) = buffered.get_mut(tp) {
            let cut = records.partition_point(|r| r.offset <= *last);
            let rest = records.split_off(cut);
            let taken = std::mem::replace(records, rest);
            if !taken.is_empty() {
                epoch.push((tp.clone(), taken));
            }
        }
    }
    buffered.retain(|_, r| !r.is_empty());
    epoch
}

/// Ingests one epoch's ranges as one run and advances the positions.
fn publish_epoch(
    warehouse: &Warehouse,
    options: &StreamOptions,
    consumer: &BaseConsumer,
    epoch: Vec<(TopicPartition, Vec<Record>)>,
    next: &mut BTreeMap<TopicPartition, i64>,
    summary: &mut StreamSummary,
    cache: &mut runtime::OpenCache,
) -> Result<(), StreamError> {
    let (ranges, sources) = decode_epoch(&epoch, options.ingest.workers);
    let times: Vec<i64> = epoch
        .iter()
        .flat_map(|(_, records)| records.iter().filter_map(|r| r.timestamp_ms))
        .collect();
    let messages: u64 = epoch.iter().map(|(_, r)| r.len() as u64).sum();
    run_epoch(
        warehouse,
        options,
        EpochRun {
            ranges: &ranges,
            sources,
            times_ms: &times,
            messages,
        },
        summary,
        cache,
    )?;
    for range in &ranges {
        next.insert((range.topic.clone(), range.partition), range.last + 1);
    }
    commit_to_group(consumer, next);
    Ok(())
}

/// An epoch's ranges and their sources, decoded on `threads` threads (decoding is most of an
/// epoch's work outside the dataflow).
fn decode_epoch(
    epoch: &[(TopicPartition, Vec<Record>)],
    threads: usize,
) -> (Vec<Range>, Vec<SourceFile>) {
    let ranges: Vec<Range> = epoch
        .iter()
        .map(|((topic, partition), records)| Range {
            topic: topic.clone(),
            partition: *partition,
            first: records.first().map_or(0, |r| r.offset),
            last: records.last().map_or(0, |r| r.offset),
        })
        .collect();
    let pairs: Vec<(&Range, &[Record])> = ranges
        .iter()
        .zip(epoch)
        .map(|(range, (_, records))| (range, records.as_slice()))
        .collect();
    let sources = crate::rehydrate::par_map(&pairs, threads.max(1), |(range, records)| {
        Ok::<_, std::convert::Infallible>(range_source(range, records))
    })
    .unwrap_or_else(|never| match never {});
    (ranges, sources)
}

/// Commits `next` to the consumer group (lag monitoring only: never read back).
fn commit_to_group(consumer: &BaseConsumer, next: &BTreeMap<TopicPartition, i64>) {
    let mut commit = TopicPartitionList::new();
    for ((topic, partition), at) in next {
        let _ = commit.add_partition_offset(topic, *partition, Offset::Offset(*at));
    }
    if commit.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&commit, CommitMode::Async) {
        tracing::debug!(error = %e, "consumer group commit (lag monitoring only) failed");
    }
}

/// One epoch to publish: its ranges, their sources, and its messages' Kafka timestamps.
struct EpochRun<'a> {
    ranges: &'a [Range],
    sources: Vec<SourceFile>,
    times_ms: &'a [i64],
    messages: u64,
}

/// Writes the epoch's intent, ingests its sources as one run, and counts it: the summary, the
/// latency of each message, the metrics.
fn run_epoch(
    warehouse: &Warehouse,
    options: &StreamOptions,
    epoch: EpochRun<'_>,
    summary: &mut StreamSummary,
    cache: &mut runtime::OpenCache,
) -> Result<(), StreamError> {
    let EpochRun {
        ranges,
        sources,
        times_ms,
        messages,
    } = epoch;
    write_intent(
        warehouse,
        &Intent {
            ranges: ranges.to_vec(),
        },
    )?;
    let command = format!(
        "stream epoch {}: {}",
        summary.epochs + 1,
        ranges
            .iter()
            .map(Range::label)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let message_times_ms = times_ms
        .iter()
        .min()
        .copied()
        .zip(times_ms.iter().max().copied());
    let ingested = runtime::ingest_inline(
        warehouse,
        sources,
        runtime::InlineRun {
            kind: RunKind::Stream,
            command,
            message_times_ms,
        },
        IngestOptions {
            metrics: options.metrics.as_ref().map(|m| m.run.clone()),
            ..options.ingest.clone()
        },
        cache,
    )?;
    let visible_ms = chrono::Utc::now().timestamp_millis();
    for ts in times_ms {
        let ms = visible_ms.saturating_sub(*ts).max(0);
        summary.latency.record(ms as u64);
        if let Some(m) = &options.metrics {
            m.latency.observe(ms as f64 / 1000.0);
        }
    }
    summary.epochs += 1;
    summary.messages += messages;
    summary.ingest.absorb(&ingested);
    if let Some(m) = &options.metrics {
        m.epochs.inc();
        m.messages.inc_by(messages);
        m.epoch_seconds.observe(ingested.elapsed.as_secs_f64());
        m.last_publish.set(visible_ms as f64 / 1000.0);
        for range in ranges {
            m.set_position(&range.topic, range.partition, range.last + 1);
        }
    }
    tracing::info!(
        epoch = summary.epochs,
        messages,
        published = ingested.partitions_published,
        "stream epoch published"
    );
    Ok(())
}

/// One line of progress: epochs, messages, rate, latency so far.
fn status_line(s: &StreamSummary, elapsed: Duration) -> String {
    format!(
        "stream: {} epochs, {} messages ({:.0}/s), {} partitions published, latency p50 {} ms p99 {} ms",
        s.epochs,
        s.messages,
        s.messages as f64 / elapsed.as_secs_f64().max(1e-9),
        s.ingest.partitions_published,
        s.latency.quantile(0.5).unwrap_or(0),
        s.latency.quantile(0.99).unwrap_or(0)
    )
}

/// What `adsmetrics stream` prints when it stops.
pub fn report(s: &StreamSummary) -> String {
    let mut out = format!(
        "stream: {} epochs, {} messages in {:.1} s ({:.0} messages/s); {} re-delivered messages dropped\n",
        s.epochs,
        s.messages,
        s.elapsed.as_secs_f64(),
        s.messages as f64 / s.elapsed.as_secs_f64().max(1e-9),
        s.redelivered
    );
    out.push_str(&format!(
        "events: {} accepted, {} in-source duplicates, {} quarantined; {} partitions published, {} unchanged\n",
        s.ingest.events_accepted,
        s.ingest.in_source_duplicates,
        s.ingest.quarantined,
        s.ingest.partitions_published,
        s.ingest.partitions_unchanged
    ));
    if s.latency.count() > 0 {
        out.push_str(&format!(
            "ingest->visible latency: p50 {} ms, p99 {} ms, max {} ms\n",
            s.latency.quantile(0.5).unwrap_or(0),
            s.latency.quantile(0.99).unwrap_or(0),
            s.latency.max()
        ));
    }
    for ((topic, partition), at) in &s.positions {
        out.push_str(&format!("offset {topic}/{partition}: next {at}\n"));
    }
    out
}

/// The partitions of `topics` and their log-end offsets (high watermarks), for checking that a
/// stream has read everything.
pub fn log_end_offsets(
    brokers: &str,
    topics: &[String],
) -> Result<BTreeMap<TopicPartition, i64>, StreamError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(kafka("creating a metadata client"))?;
    let mut out = BTreeMap::new();
    for (topic, partition) in topic_partitions(&consumer, topics, brokers)? {
        let (_, high) = watermarks(&consumer, &topic, partition)?;
        out.insert((topic, partition), high);
    }
    Ok(out)
}

/// Every partition of `topics`, sorted; a topic the cluster does not have is an error.
fn topic_partitions(
    consumer: &BaseConsumer,
    topics: &[String],
    brokers: &str,
) -> Result<Vec<TopicPartition>, StreamError> {
    let mut partitions = Vec::new();
    let names: BTreeSet<&String> = topics.iter().collect();
    for topic in names {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(kafka(format!("metadata of topic {topic}")))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty());
        let Some(found) = found else {
            return Err(StreamError::NoTopic {
                topic: topic.clone(),
                brokers: brokers.to_string(),
            });
        };
        partitions.extend(found.partitions().iter().map(|p| (topic.clone(), p.id())));
    }
    partitions.sort();
    Ok(partitions)
}

/// A partition's log start and log end (low and high watermarks).
fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), StreamError> {
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(30))
        .map_err(kafka(format!("watermarks of {topic}/{partition}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_for_every_legal_topic_name() {
        for topic in ["ads-events", "ads.click_v2", "a", "x-1.y_2-z"] {
            let range = Range {
                topic: topic.to_string(),
                partition: 17,
                first: 0,
                last: 123_456_789_012,
            };
            assert_eq!(Range::parse(&range.label()), Some(range));
        }
        assert_eq!(Range::parse("raw/dt=2026-11-01/part-0.jsonl"), None);
        assert_eq!(Range::parse("kafka:t/x/1-2"), None);
        assert_eq!(Range::parse("kafka:t/1/2"), None);
    }

    #[test]
    fn positions_are_one_past_the_greatest_committed_offset() {
        let record = |label: &str| SourceRecord {
            source: label.to_string(),
            content_hash: String::new(),
            accepted: 0,
            quarantined: 0,
            in_source_duplicates: 0,
            tombstoned: 0,
            partition: None,
        };
        let sources = [
            record("kafka:t/0/0-9"),
            record("kafka:t/0/10-19"),
            record("kafka:t/1/0-4"),
            record("data/part-0.jsonl"),
        ];
        let next = committed_positions(&sources);
        assert_eq!(next.get(&("t".to_string(), 0)), Some(&20));
        assert_eq!(next.get(&("t".to_string(), 1)), Some(&5));
        assert_eq!(next.len(), 2);
    }

    #[test]
    fn settings_the_stream_owns_are_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let warehouse = Warehouse::new(dir.path().join("wh"));
        let mut options = StreamOptions::new("127.0.0.1:1", vec!["t".to_string()]);
        options.kafka_config = vec![("auto.offset.reset".into(), "latest".into())];
        let err = stream(&warehouse, &options).unwrap_err();
        assert!(matches!(err, StreamError::Config(_)), "{err}");
        assert!(!warehouse.root().exists(), "nothing was written");
    }

    #[test]
    fn latency_quantiles() {
        let mut l = Latency::default();
        assert_eq!(l.quantile(0.5), None);
        for ms in 1..=100 {
            l.record(ms);
        }
        l.record(90_000);
        assert_eq!(l.quantile(0.5), Some(51));
        assert_eq!(l.quantile(0.99), Some(100));
        assert_eq!(l.quantile(1.0), Some(90_000));
        assert_eq!(l.max(), 90_000);
    }
}
