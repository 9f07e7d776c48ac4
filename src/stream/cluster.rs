//! `stream` in cluster mode ([`crate::cluster`]): every process reads its share of the Kafka
//! partitions on a consumer of its own, and the epochs are cut and published by the whole
//! cluster as one.
//!
//! ```text
//!  process 0, the coordinator                       processes 1..N, the followers
//!  journal ─▶ positions; intent ─▶ ranges to cut again; the topics' partitions, sorted
//!  ── round: the start (partitions, positions, ranges) ──────────▶
//!  every process: a consumer assigned the partitions i with i % N == its index, at the
//!     journal's positions; a reader thread polling them into its intake
//!  every --epoch-ms (or sooner, its own intake full):
//!  ── round: cut ────────────────────────────────────────────────▶ each process cuts what it
//!     has read (a crashed epoch's ranges exactly, waiting for them), decodes it, keeps the
//!     messages ◀── the ranges' sources and Kafka timestamps, idle or not
//!  the intent (every range), then one run of the cluster ([`crate::runtime::ingest_inline`]):
//!     the keyed rebuild from the keys each worker sends of the ranges its process holds, each
//!     range ingested by a worker of the process holding it, one publish naming every range
//!     (the offsets commit with it)
//!  stop (--until-idle): a cut in which nothing was read and every process is idle at its
//!     partitions' log ends; then the command's end, as for every command of a cluster
//! ```
//!
//! The tables depend only on the set of events, so which process reads which partition and
//! where the epochs are cut change nothing: a cluster's stream publishes the bytes one process
//! would. A restart with another number of processes re-cuts an uncommitted epoch's ranges on
//! whichever process now reads their partitions. The stream's dataflow is not kept across epochs
//! in a cluster (each epoch is a run of its own, rebuilding by key what its events need, as a
//! process alone does when its dataflow is full).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use serde::{Deserialize, Serialize};

use super::{
    assign_partitions, behind, client_config, commit_to_group, decode_epoch, kafka, last_metrics,
    lock, run_epoch, spawn_readers, status_line, topic_partitions, EpochRun, Intake, Range,
    SharedIntake, StopOnDrop, StreamError, StreamOptions, StreamSummary, TopicPartition,
    STREAM_COLUMN_CACHE_ROWS,
};
use crate::cluster::{Cluster, CutShare, CutSource, Followed, Json, Order, StreamPart};
use crate::decode::Decoded;
use crate::runtime::{self, RunError};
use crate::source::{HeldBy, SourceFile};
use crate::warehouse::Warehouse;

/// What the coordinator tells every process when the stream starts.
#[derive(Debug, Serialize, Deserialize)]
struct Start {
    /// Every partition of the topics, sorted: process `p` reads those at indexes `i % N == p`.
    partitions: Vec<TopicPartition>,
    /// The next offset of every partition the journal has committed ranges of.
    next: Vec<(TopicPartition, i64)>,
    /// The ranges of the epoch cut before a crash and not committed: cut again exactly.
    intended: Vec<Range>,
    /// The coordinator's `--brokers` and `--topics`: a follower given others refuses to start
    /// (it would read another cluster's partitions into this journal).
    brokers: String,
    topics: Vec<String>,
    /// The coordinator's `--until-idle`, ms, which every process's idle report follows.
    until_idle_ms: Option<u64>,
}

impl Start {
    /// Why a process started with `options` cannot take part in this stream, if it cannot.
    fn mismatch(&self, options: &StreamOptions) -> Option<String> {
        let mut topics = options.topics.clone();
        topics.sort();
        topics.dedup();
        let mut theirs = self.topics.clone();
        theirs.sort();
        theirs.dedup();
        (options.brokers != self.brokers || topics != theirs).then(|| {
            format!(
                "this process was started with --brokers {} --topics {}, the coordinator with \
                 --brokers {} --topics {}: run the same command on every process",
                options.brokers,
                options.topics.join(","),
                self.brokers,
                self.topics.join(",")
            )
        })
    }
}

/// Process `process`'s share of `partitions` in a cluster of `processes`.
fn share(partitions: &[TopicPartition], process: usize, processes: usize) -> Vec<TopicPartition> {
    partitions
        .iter()
        .skip(process)
        .step_by(processes)
        .cloned()
        .collect()
}

/// This process's part of the stream: its consumer of its share of the partitions, what it has
/// read, and the messages of its last cut.
struct Part {
    process: usize,
    consumer: BaseConsumer,
    partitions: Vec<TopicPartition>,
    intake: SharedIntake,
    /// Of its partitions: the last offset of a crashed epoch's range, to cut again exactly.
    recovering: Mutex<BTreeMap<TopicPartition, i64>>,
    /// The messages of its last cut, by content hash, until the run that ingests them.
    held: Mutex<HashMap<String, Arc<Decoded>>>,
    /// The next offset of each partition after its last cut, committed to the consumer group
    /// at the next cut (which comes only once the last was published).
    cut_to: Mutex<BTreeMap<TopicPartition, i64>>,
    threads: usize,
    until_idle: Option<Duration>,
    /// Messages it has cut, in all.
    messages: Mutex<u64>,
    /// Where it reports its partitions' positions (their lag is refreshed from them).
    metrics: Option<Arc<crate::metrics::StreamMetrics>>,
}

impl Part {
    /// Process `process`'s part of the stream `start` describes, its partitions assigned.
    fn start(
        options: &StreamOptions,
        consumer: BaseConsumer,
        process: usize,
        processes: usize,
        start: &Start,
    ) -> Result<Part, StreamError> {
        let partitions = share(&start.partitions, process, processes);
        let next: BTreeMap<TopicPartition, i64> = start.next.iter().cloned().collect();
        let wanted = assign_partitions(&consumer, &partitions, &next, options.rewind)?;
        if let Some(metrics) = &options.metrics {
            for ((topic, partition), at) in wanted.iter().filter(|(tp, _)| partitions.contains(tp))
            {
                metrics.set_position(topic, *partition, *at);
            }
        }
        let recovering: BTreeMap<TopicPartition, i64> = start
            .intended
            .iter()
            .map(|r| ((r.topic.clone(), r.partition), r.last))
            .filter(|(tp, _)| partitions.contains(tp))
            .collect();
        if !recovering.is_empty() {
            tracing::warn!(
                ranges = recovering.len(),
                "re-cutting the uncommitted epoch of an earlier run"
            );
        }
        tracing::info!(process, partitions = partitions.len(), "stream assigned");
        Ok(Part {
            process,
            consumer,
            intake: (
                Mutex::new(Intake::new(wanted, !recovering.is_empty())),
                Default::default(),
            ),
            partitions,
            recovering: Mutex::new(recovering),
            held: Mutex::default(),
            cut_to: Mutex::default(),
            threads: options.ingest.workers.max(1),
            until_idle: start.until_idle_ms.map(Duration::from_millis),
            messages: Mutex::new(0),
            metrics: options.metrics.clone(),
        })
    }

    /// Runs `work` while the process's reader (and, with metrics, lag) threads read its
    /// partitions into its intake; they stop when it returns, or panics.
    fn reading<R>(&self, options: &StreamOptions, work: impl FnOnce() -> R) -> R {
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            spawn_readers(
                scope,
                &self.consumer,
                &self.partitions,
                options,
                &self.intake,
                &stop,
            );
            let _stop = StopOnDrop(&stop);
            work()
        })
    }

    /// Commits the last cut's positions to the consumer group, and to the metrics (it was
    /// published).
    fn commit_last_cut(&self) {
        let cut_to = self.cut_to.lock().unwrap_or_else(PoisonError::into_inner);
        commit_to_group(&self.consumer, &cut_to);
        if let Some(metrics) = &self.metrics {
            for ((topic, partition), at) in cut_to.iter() {
                metrics.set_position(topic, *partition, *at);
            }
        }
    }
}

impl StreamPart for Part {
    fn cut(&self) -> Result<CutShare, String> {
        self.commit_last_cut();
        let (intake, ready) = &self.intake;
        let mut g = lock(intake);
        let mut recovering = self
            .recovering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let waiting = Instant::now();
        while !g.holds(&recovering) && g.failed.is_none() {
            if waiting.elapsed() > super::RECOVERY_WAIT {
                tracing::warn!("an uncommitted epoch's ranges are no longer on the broker in full");
                break;
            }
            g = ready
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if let Some(e) = g.failed.take() {
            return Err(format!("process {}: {e}", self.process));
        }
        let epoch = g.cut(&std::mem::take(&mut *recovering));
        drop(recovering);
        let quiet = epoch.is_empty()
            && g.count == 0
            && self
                .until_idle
                .is_some_and(|idle| g.last_message.elapsed() >= idle);
        let wanted = g.wanted.clone();
        drop(g);
        let idle = quiet && {
            let behind = behind(&self.consumer, &self.partitions, &wanted);
            if let Some(tp) = behind {
                // As alone: idle is not done while the log holds more; asked again only after
                // another --until-idle without a message.
                tracing::info!(
                    topic = tp.0,
                    partition = tp.1,
                    "idle but behind the log end; reading on"
                );
                lock(&self.intake.0).last_message = Instant::now();
            }
            behind.is_none()
        };

        let (ranges, sources) = decode_epoch(&epoch, self.threads);
        let mut held = HashMap::new();
        let mut out = Vec::new();
        let mut cut_to = self.cut_to.lock().unwrap_or_else(PoisonError::into_inner);
        for ((range, source), (_, records)) in ranges.iter().zip(sources).zip(&epoch) {
            let decoded = source.inline.clone().unwrap_or_default();
            held.insert(source.content_hash.clone(), decoded);
            cut_to.insert((range.topic.clone(), range.partition), range.last + 1);
            out.push(CutSource {
                source: SourceFile {
                    inline: None,
                    ..source
                },
                times_ms: records.iter().filter_map(|r| r.timestamp_ms).collect(),
                messages: records.len() as u64,
            });
        }
        *self.messages.lock().unwrap_or_else(PoisonError::into_inner) +=
            out.iter().map(|s| s.messages).sum::<u64>();
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = held;
        Ok(CutShare {
            process: self.process,
            sources: out,
            idle,
        })
    }

    fn messages(&self, content_hash: &str) -> Option<Arc<Decoded>> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(content_hash)
            .cloned()
    }
}

/// A follower's part that could not start: it answers every cut with why, so the coordinator
/// stops the stream (and with it every process) rather than wait for it.
struct Broken(String);

impl StreamPart for Broken {
    fn cut(&self) -> Result<CutShare, String> {
        Err(self.0.clone())
    }

    fn messages(&self, _: &str) -> Option<Arc<Decoded>> {
        None
    }
}

/// The coordinator's stream ([`super::stream`] in cluster mode).
pub(super) fn coordinate(
    warehouse: &Warehouse,
    options: &StreamOptions,
    cluster: &Cluster,
) -> Result<StreamSummary, StreamError> {
    let started = Instant::now();
    let workers = options.ingest.workers.max(1);
    let committed = runtime::committed_sources(warehouse)?;
    let mut next = super::committed_positions(&committed);
    drop(committed);
    let intended = super::uncommitted_intent(warehouse, &next);
    let consumer: BaseConsumer = client_config(options)
        .create()
        .map_err(kafka("creating the consumer"))?;
    let partitions = topic_partitions(&consumer, &options.topics, &options.brokers)?;
    let start = Start {
        partitions,
        next: next.iter().map(|(tp, at)| (tp.clone(), *at)).collect(),
        intended,
        brokers: options.brokers.clone(),
        topics: options.topics.clone(),
        until_idle_ms: options.until_idle.map(|d| d.as_millis() as u64),
    };
    crate::cluster::announce(cluster, workers, Order::Stream(Json::encode(&start)))
        .map_err(RunError::Runtime)?;
    let part = Arc::new(Part::start(
        options,
        consumer,
        cluster.process,
        cluster.processes,
        &start,
    )?);
    let mut summary = StreamSummary::default();
    let outcome = part.reading(options, || {
        cut_and_publish(
            warehouse,
            options,
            cluster,
            &part,
            &mut next,
            &mut summary,
            started,
        )
    });
    summary.redelivered = lock(&part.intake.0).redelivered;
    if outcome.is_ok() {
        part.commit_last_cut();
    }
    last_metrics(
        options,
        &part.consumer,
        &part.partitions,
        summary.redelivered,
    );
    outcome?;
    summary.positions = next;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The coordinator's epoch loop: a cut of the whole cluster every `--epoch-ms` (sooner when its
/// own intake is full), published as one run when anything was read; stops when a cut finds
/// every process idle (`--until-idle`).
fn cut_and_publish(
    warehouse: &Warehouse,
    options: &StreamOptions,
    cluster: &Cluster,
    part: &Arc<Part>,
    next: &mut BTreeMap<TopicPartition, i64>,
    summary: &mut StreamSummary,
    started: Instant,
) -> Result<(), StreamError> {
    let workers = options.ingest.workers.max(1);
    let mut cache = runtime::OpenCache::with_columns(STREAM_COLUMN_CACHE_ROWS);
    let mut last_cut: Option<Instant> = None;
    let mut last_status = Instant::now();
    loop {
        wait_for_cut(options, part, last_cut)?;
        last_cut = Some(Instant::now());
        // From the first cut on, every follower is in its loop (see `Cluster::execute`).
        let shares = crate::cluster::cut(cluster, workers, part.clone())?;
        let idle = shares.iter().all(|s| s.idle);
        let mut ranges = Vec::new();
        let mut sources = Vec::new();
        let mut times_ms = Vec::new();
        let mut messages = 0;
        for share in shares {
            for cut in share.sources {
                let Some(range) = Range::parse(&cut.source.label) else {
                    return Err(
                        RunError::Cluster(crate::cluster::RemoteError::failed(format!(
                            "process {} cut a range labelled {:?}, which is not a Kafka range's",
                            share.process, cut.source.label
                        )))
                        .into(),
                    );
                };
                ranges.push(range);
                messages += cut.messages;
                times_ms.extend(cut.times_ms);
                let mut source = cut.source;
                if share.process == cluster.process {
                    source.inline = part.messages(&source.content_hash);
                } else {
                    source.held_by = Some(Arc::new(HeldBy {
                        process: share.process,
                    }));
                }
                sources.push(source);
            }
        }
        if sources.is_empty() {
            if options.until_idle.is_some() && idle {
                return Ok(());
            }
            continue;
        }
        run_epoch(
            warehouse,
            options,
            EpochRun {
                ranges: &ranges,
                sources,
                times_ms: &times_ms,
                messages,
            },
            summary,
            &mut cache,
        )?;
        for range in &ranges {
            next.insert((range.topic.clone(), range.partition), range.last + 1);
        }
        if options.verbose || last_status.elapsed() >= Duration::from_secs(10) {
            eprintln!("{}", status_line(summary, started.elapsed()));
            last_status = Instant::now();
        }
        if options.max_epochs.is_some_and(|m| summary.epochs >= m) {
            return Ok(());
        }
    }
}

/// Waits until the cluster's next cut is due: at once the first time, then `--epoch-ms` after
/// the last, or sooner when this process's intake holds a full epoch or its oldest message has
/// waited an epoch.
fn wait_for_cut(
    options: &StreamOptions,
    part: &Part,
    last_cut: Option<Instant>,
) -> Result<(), StreamError> {
    let (intake, ready) = &part.intake;
    let mut g = lock(intake);
    loop {
        if let Some(e) = g.failed.take() {
            return Err(e);
        }
        let Some(last_cut) = last_cut else {
            return Ok(());
        };
        let due = [Some(last_cut), g.first_at]
            .into_iter()
            .flatten()
            .map(|at| options.epoch.saturating_sub(at.elapsed()))
            .min()
            .unwrap_or_default();
        if due.is_zero() || g.count >= options.epoch_events.max(1) {
            return Ok(());
        }
        g = ready
            .wait_timeout(g, due.min(Duration::from_millis(100)))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// What a follower did in a stream.
#[derive(Clone, Debug, Default)]
pub struct FollowerStream {
    /// Its partitions.
    pub partitions: usize,
    /// Messages it read and cut.
    pub messages: u64,
    /// Epochs it ran (those with anything to ingest, its or another process's).
    pub epochs: u64,
    /// Messages it dropped as re-delivered (below the journal's offsets).
    pub redelivered: u64,
}

/// A follower's stream: waits for the coordinator's start, reads its share of the partitions,
/// cuts them when told and ingests its ranges in the cluster's runs, until the coordinator says
/// the stream is over (or failed: its error, with its exit class).
pub fn follow(
    warehouse: &Warehouse,
    options: &StreamOptions,
    cluster: &Cluster,
) -> Result<FollowerStream, StreamError> {
    let workers = options.ingest.workers.max(1);
    // Refused here too: a follower's consumer must not skip or re-read either. The coordinator
    // hears of it at its first cut (this process answers with it), and stops every process.
    let refused = super::refuse_owned_settings(options);
    let start: Result<Start, String> = loop {
        match runtime::follow_once(warehouse, cluster, workers, None)? {
            Followed::Stream(start) => break start.decode::<Start>(),
            Followed::Done(error) => return finished(error, FollowerStream::default()),
            Followed::Generation { .. } | Followed::Identified(_) | Followed::Searched(_) => {
                return Err(RunError::Refused(
                    "the coordinator (process 0) runs another command than `stream`: run the \
                     same command on every process"
                        .into(),
                )
                .into())
            }
            Followed::Cut => {}
        }
    };
    let part = refused
        .and_then(|()| {
            let start = start.as_ref().map_err(|e| RunError::Runtime(e.clone()))?;
            match start.mismatch(options) {
                Some(why) => Err(StreamError::Config(why)),
                None => Ok(start),
            }
        })
        .and_then(|start| {
            let consumer = client_config(options)
                .create()
                .map_err(kafka("creating the consumer"))?;
            Part::start(options, consumer, cluster.process, cluster.processes, start)
        });
    let part = match part {
        Ok(part) => Arc::new(part),
        Err(e) => {
            // Told at the next cut, which stops the stream on every process.
            let broken: Arc<dyn StreamPart> =
                Arc::new(Broken(format!("process {}: {e}", cluster.process)));
            loop {
                if let Followed::Done(error) =
                    runtime::follow_once(warehouse, cluster, workers, Some(broken.clone()))?
                {
                    finished(error, FollowerStream::default())?;
                    return Err(e);
                }
            }
        }
    };
    let mut work = FollowerStream {
        partitions: part.partitions.len(),
        ..Default::default()
    };
    let outcome = part.reading(options, || loop {
        let as_part: Arc<dyn StreamPart> = part.clone();
        match runtime::follow_once(warehouse, cluster, workers, Some(as_part))? {
            Followed::Generation { .. } => work.epochs += 1,
            Followed::Done(error) => return Ok::<_, StreamError>(error),
            _ => {}
        }
    });
    work.messages = *part.messages.lock().unwrap_or_else(PoisonError::into_inner);
    work.redelivered = lock(&part.intake.0).redelivered;
    if matches!(outcome, Ok(None)) {
        part.commit_last_cut();
    }
    last_metrics(options, &part.consumer, &part.partitions, work.redelivered);
    let error = outcome?;
    finished(error, work)
}

/// The follower's end: what it did, or the coordinator's error.
fn finished(
    error: Option<crate::cluster::RemoteError>,
    work: FollowerStream,
) -> Result<FollowerStream, StreamError> {
    match error {
        None => Ok(work),
        Some(e) => Err(RunError::Cluster(e.context("the coordinator (process 0) failed")).into()),
    }
}
