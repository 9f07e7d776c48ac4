//! Runtime: a planned run (ingest, backfill, delete) as epochs on timely workers, from source
//! files to published partitions.
//!
//! ```text
//!  open: recover journal, catch the ledger up, read tombstones and retention horizons
//!  plan (ingest | backfill | delete): batches of new sources, withdrawn sources, adoptions
//!  rebuild: the raw rows of the keys and user-days the run changes (crate::rehydrate),
//!           or, for a delete, the event days it touches (crate::scope); on a cluster, the
//!           keyed rebuild is found in the run, from the keys each worker sends of its own
//!           share of the sources (`seed_in_run`)
//!                                                                    │
//!  every worker:  epoch 0  its share of the rebuilt rows (found in a cluster's run: worker 0's
//!                          alone) ──▶ dataflow (+1); keyed: the mirror
//!                          ignores epoch 0 and seeds a partition from its published rows
//!                          when a later epoch first touches it
//!                 epoch k  withdrawn sources' raw rows ──▶ dataflow (−1)
//!                          the next of its process's sources (one queue, largest first):
//!                            decode ─▶ in-source dedup ─▶ tombstones, retention ─▶ dataflow
//!                            (+1 per key) ─▶ its raw files; its quarantine and late rows
//!                            to the process's side rows; the last one's raw files written on
//!                            a helper thread while the dataflow computes
//!                 advance input, step until the probe passes k
//!                 stage its touched partitions whose version changed; join the writer
//!  ── barrier ──  the process's first worker stages its side rows (a quarantine and a
//!                 late_arrivals file); worker 0 publishes the epoch (prepare → renames of
//!                 partitions and side files → commit) ── barrier ──
//!  the run's ledger entry, whatever happened
//! ```
//!
//! A run over more source days (`dt=` folders) than the hot window is cut, at day boundaries,
//! into generations that each go through all of the above with a fresh dataflow and a fresh
//! open of the warehouse ([`IngestOptions::hot_window_days`]); dropping a generation's dataflow
//! is the eviction, and the next generation's keyed rebuild is the rehydration of whatever cold
//! keys and user-days its sources touch.
//!
//! Every worker runs the same sequence of barriers whatever happens, and stops at the same one
//! when any worker failed, so an error never leaves a worker waiting alone. Which worker handles
//! which source changes nothing in the output: the dataflow's result depends only on the set of
//! source events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use adsmetrics_dataflows::batching::BuildFastHasher;
use adsmetrics_dataflows::pipeline::{self, Pipeline};
use adsmetrics_dataflows::{
    DedupKey, Dims, EventType, EventVersion, Grain, MetricRow, MirrorError, PartitionId,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::cluster::{Control, ExitClass, Followed, Json, Message, Order, RemoteError};
use crate::event::Event;
use crate::journal::{
    CommitJournal, JournalError, LedgerAnchor, PartitionChange, Published, RetiredSource, SideFile,
    SourceRecord,
};
use crate::ledger::{Ledger, LedgerError, RunKind, RunRecord};
use crate::rehydrate;
use crate::retention::Horizons;
use crate::scope::{self, ScopeError};
use crate::sink::files::{sync_filesystem, WriteError};
use crate::sink::publish::{
    publish_epoch, stage_partition, FailPoint, PublishError, PublishOrigin,
};
use crate::sink::{late, quarantine, raw};
use crate::source::{self, SourceError, SourceFile};
use crate::tombstones::{TombstoneError, Tombstones};
use crate::warehouse::Warehouse;

/// How to run an ingest.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Timely worker threads.
    pub workers: usize,
    /// New sources per epoch; 0 puts all of a run's new sources in one epoch.
    pub epoch_sources: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Tests only: stop the publish of the first epoch that publishes, at this step.
    pub fail_point: Option<FailPoint>,
    /// The hot window, in days of source partitions (`dt=` folders): a run's dataflow holds the
    /// state of at most this many consecutive source days; a run over more is cut into
    /// generations at day boundaries, each a fresh dataflow that rebuilds from the raw layer
    /// only the keys and user-days its own sources touch. `None`: one dataflow for the run.
    pub hot_window_days: Option<u32>,
    /// The publish gate: before each publish, recompute the partitions it changes by the
    /// reference (`check reconcile`'s code path) and publish only if every one matches; else the
    /// epoch stays unpublished, its staged files are kept under `_adsmetrics/gated/`, and the run
    /// fails with [`RunError::Gated`].
    pub gate: bool,
    /// Tests only: one click too many in the first row of each staged partition, as a dataflow
    /// bug would publish — what the gate is there to stop.
    pub tamper_for_test: bool,
    /// Counters for `/metrics`, added to as each generation finishes.
    pub metrics: Option<Arc<crate::metrics::RunCounters>>,
    /// Cluster mode ([`crate::cluster`]): this process is the coordinator of these processes,
    /// each with [`IngestOptions::workers`] workers. `None`: this process alone.
    pub cluster: Option<crate::cluster::Cluster>,
    /// How the run computes its tables' changes.
    pub engine: Engine,
}

/// How a run computes its tables' changes (`--engine`). The tables are the same either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// A generation of one epoch after its keyed rebuild on the batch engine (sorts in a timely
    /// dataflow, on one process or a cluster); anything else (a stream's session, several
    /// epochs, a rebuild of whole days) on the differential dataflow.
    // The batch engine: `adsmetrics_dataflows::batch`.
    #[default]
    Auto,
    /// Every run on the timely/differential dataflow.
    Dataflow,
}

impl IngestOptions {
    /// ` --processes N` for a cluster run, as the ledger records its command; else nothing.
    pub(crate) fn cluster_flag(&self) -> String {
        self.cluster
            .as_ref()
            .map(|c| format!(" --processes {}", c.processes))
            .unwrap_or_default()
    }
}

/// The default hot window: 48 hours of source days.
pub const DEFAULT_HOT_WINDOW_DAYS: u32 = 2;

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            workers: 1,
            epoch_sources: 0,
            progress: false,
            fail_point: None,
            hot_window_days: Some(DEFAULT_HOT_WINDOW_DAYS),
            gate: false,
            tamper_for_test: false,
            metrics: None,
            cluster: None,
            engine: Engine::Auto,
        }
    }
}

/// What one generation of a run (see [`IngestOptions::hot_window_days`]) left in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationMemory {
    /// The newest source day the generation ingested (days since the Unix epoch), if its
    /// sources have one.
    pub last_day: Option<i64>,
    /// Source days the run had covered when the generation ended.
    pub days_done: u32,
    /// The process's resident set when the generation's dataflow had been dropped, bytes: what
    /// it freed is kept for the next generation (see `memory`), so this is near the peak.
    pub rss_bytes: u64,
    /// The process's peak resident set so far, bytes.
    pub peak_rss_bytes: u64,
}

/// What an ingest run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestSummary {
    /// Files found under the inputs.
    pub sources_found: u64,
    /// Of those, already consumed by an earlier run, or a copy of another file in this run.
    pub sources_skipped: u64,
    /// Sources decoded and committed by this run.
    pub sources_ingested: u64,
    /// Bytes of the ingested sources.
    pub source_bytes: u64,
    /// Records of ingested sources accepted as events (after in-source dedup).
    pub events_accepted: u64,
    /// The accepted events by event type and producer (`impression`, `web`).
    #[serde(with = "pairs")]
    pub accepted_by_kind: BTreeMap<(String, String), u64>,
    /// Records dropped because the same key appeared again in the same source.
    pub in_source_duplicates: u64,
    /// Records (or whole files) quarantined.
    pub quarantined: u64,
    /// Raw-layer rows written.
    pub raw_rows_written: u64,
    /// Accepted events whose partitions an earlier epoch had already published, counted once per
    /// partition they fall in (hourly and daily); see the `late_arrivals` table.
    pub late_events: u64,
    /// Raw-layer rows read back to rebuild state (epoch 0).
    pub rehydrated_rows: u64,
    /// Raw files read back to rebuild state: those of the event days the run touches.
    pub rehydrated_files: u64,
    /// Raw files committed before the run (the whole history).
    pub committed_raw_files: u64,
    /// Raw-layer rows retracted because their source partition was replaced (backfill).
    pub retracted_rows: u64,
    /// Records of new sources not accepted because their key was deleted (tombstoned).
    pub tombstoned: u64,
    /// Epochs run (including each generation's rehydration epoch).
    pub epochs: u64,
    /// Dataflow generations the run was cut into by the hot window (1 for a run within it).
    pub generations: u64,
    /// Of its generations, those computed on the batch engine rather than the dataflow
    /// ([`Engine::Auto`]).
    #[serde(default)]
    pub batch_engine_runs: u64,
    /// Memory after each generation, when the run had more than one.
    pub memory: Vec<GenerationMemory>,
    /// Partition versions published (including removals).
    pub partitions_published: u64,
    /// Partitions touched by an epoch whose contents came out unchanged.
    pub partitions_unchanged: u64,
    /// Dedup keys that currently have more than one distinct version (upstream corrections).
    pub conflicted_keys: i64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// A map with tuple keys as a list of pairs (JSON keys are strings).
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<
        'de,
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    >(
        d: D,
    ) -> Result<BTreeMap<K, V>, D::Error> {
        Vec::<(K, V)>::deserialize(d).map(|pairs| pairs.into_iter().collect())
    }
}

/// Why a run stopped. `Source`, `Write` and I/O failures may be retried by running the same
/// command again: the journal makes a retry converge to the same tables.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A source could not be listed or read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A raw, quarantine or staged file could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A publish failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The dataflow produced an inconsistent partition (a bug).
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The audit ledger could not be read, verified or appended to.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The part of the raw layer to rebuild could not be determined.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    /// The tombstones could not be read or written.
    #[error(transparent)]
    Tombstones(#[from] TombstoneError),
    /// A published partition could not be read back, or is not the version the journal says
    /// (the warehouse was changed behind the journal's back).
    #[error("published partition unreadable: {0}")]
    Published(String),
    /// The publish gate found partitions that do not match the reference: nothing of the epoch
    /// was published; the staged files and the findings are kept in `dir`.
    #[error(
        "publish gate: {count} partitions do not match a recompute from the raw layer; the epoch \
         was not published (staged files and findings kept in {dir}); first: {first}"
    )]
    Gated {
        /// How many partitions failed.
        count: usize,
        /// The first, with its problem.
        first: String,
        /// Where the staged files and `findings.json` are.
        dir: String,
    },
    /// Another writer held the warehouse for longer than the lock wait.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// The run was refused before it changed anything (the reason says why and what to do).
    #[error("{0}")]
    Refused(String),
    /// Timely could not start or a worker died.
    #[error("dataflow runtime: {0}")]
    Runtime(String),
    /// Another process of the cluster failed (its error as it said it, and how it ends the run).
    #[error("{0}")]
    Cluster(crate::cluster::RemoteError),
}

impl RunError {
    /// Another writer held the warehouse past the lock wait, or published under this run (a
    /// fenced publish): nothing was published, and running again converges.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            RunError::Lock(crate::lock::LockError::Busy { .. })
                | RunError::Journal(JournalError::Fenced { .. })
                | RunError::Publish(PublishError::Journal(JournalError::Fenced { .. }))
        ) || self.remote_class() == Some(ExitClass::Temporary)
    }

    /// The publish gate held an epoch back, here or on the process that published.
    pub fn is_gated(&self) -> bool {
        matches!(self, RunError::Gated { .. }) || self.remote_class() == Some(ExitClass::Gated)
    }

    fn remote_class(&self) -> Option<ExitClass> {
        match self {
            RunError::Cluster(remote) => Some(remote.class),
            _ => None,
        }
    }

    /// How this error ends the command (its exit code).
    pub fn exit_class(&self) -> ExitClass {
        if self.is_gated() {
            ExitClass::Gated
        } else if self.is_temporary() {
            ExitClass::Temporary
        } else {
            ExitClass::Failed
        }
    }

    /// This error as another process of the cluster is told it.
    pub fn remote(&self) -> RemoteError {
        RemoteError {
            message: self.to_string(),
            class: self.exit_class(),
        }
    }
}

/// The sources of one epoch, shared out by [`assign`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct EpochPlan {
    /// Each worker's share (by global worker index): which process ingests a source (its
    /// workers take them from one queue: [`EpochPlan::take_source`]), and which worker decodes
    /// it ahead for a cluster's keyed rebuild.
    by_worker: Vec<Vec<SourceFile>>,
    /// Raw files whose rows this epoch retracts (replaced source partitions).
    retract: Vec<PathBuf>,
    /// Recorded with this epoch's publish.
    retired: Vec<RetiredSource>,
    /// Sources recorded with this epoch's publish without being read (already contributing).
    adopt: Vec<SourceRecord>,
    /// Which of its process's sources its workers have taken ([`EpochPlan::take_source`]):
    /// each process's own, not part of the plan a follower is sent.
    #[serde(skip)]
    taken: SourceQueue,
}

/// A process's sources of an epoch as its workers take them, largest first.
#[derive(Debug, Default)]
struct SourceQueue {
    /// The process's sources (as worker and position in [`EpochPlan::by_worker`]), largest first.
    order: std::sync::OnceLock<Vec<(usize, usize)>>,
    /// How many have been taken.
    next: std::sync::atomic::AtomicUsize,
}

impl Clone for SourceQueue {
    /// A copy of a plan starts with none taken.
    fn clone(&self) -> Self {
        SourceQueue::default()
    }
}

impl EpochPlan {
    /// The next source for a worker of the process of worker `index` (of `workers` per process)
    /// to ingest, `None` once its process's are all taken.
    ///
    /// `assign` gives each worker a share of about equal bytes, but a worker's sources take
    /// more or less time than their bytes say, and the epoch's step waits for the last worker
    /// to be done: the others idled for 10–20 ms of every hot-window generation. So a process's
    /// workers take its sources (every one `assign` gave any of them: a source held by this
    /// process stays in it) from one queue, largest first, each its next one once it has fed
    /// the last to the dataflow (before writing that one's files, to know whether it was its
    /// last). Which worker ingests a source changes nothing written: its files are its own,
    /// and its keys go to their workers in the dataflow.
    fn take_source(&self, index: usize, workers: usize) -> Option<&SourceFile> {
        let first = index - index % workers;
        let order = self.taken.order.get_or_init(|| {
            let mut order: Vec<(usize, usize)> = (first..first + workers)
                .flat_map(|w| (0..self.by_worker.get(w).map_or(0, Vec::len)).map(move |i| (w, i)))
                .collect();
            let source = |&(w, i): &(usize, usize)| &self.by_worker[w][i];
            order.sort_by(|a, b| largest_first(source(a), source(b)));
            order
        });
        let n = self
            .taken
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        order.get(n).map(|&(w, i)| &self.by_worker[w][i])
    }
}

/// State shared by the workers of one run.
struct Shared {
    warehouse: Warehouse,
    run_id: String,
    started_at_us: i64,
    ledger_anchor: LedgerAnchor,
    tombstones: Tombstones,
    horizons: Horizons,
    rebuild: Rebuild,
    /// The rebuild's rows are found in the run ([`KeyedInRun`]).
    keyed_in_run: Option<KeyedInRun>,
    /// Worker 0's, when it finds them: the coordinator's [`rehydrate::ColumnCache`], if it
    /// keeps one (a stream), given back after the run.
    columns: Mutex<Option<rehydrate::ColumnCache>>,
    /// New sources already decoded while planning, by content hash (taken by the epoch that
    /// ingests them).
    predecoded: Mutex<HashMap<String, rehydrate::Predecoded>>,
    /// Backfill: the source partition of each new source, by content hash.
    partition_of: HashMap<String, String>,
    /// The progress bar counts sources (backfill) rather than bytes.
    progress_in_sources: bool,
    /// Events accepted by the run's earlier generations (for the bar's events/s).
    progress_events_before: u64,
    /// [`IngestOptions::gate`].
    gate: bool,
    /// [`IngestOptions::tamper_for_test`].
    tamper: bool,
    /// Threads the gate reads raw files with.
    threads: usize,
    epochs: Vec<EpochPlan>,
    /// Raw files of the older hourly layout that the sources of these epochs left (see
    /// [`raw::write_source`]), by source hash.
    hourly_layout: HashMap<String, Vec<PathBuf>>,
    /// Between this process's workers.
    barrier: Barrier,
    /// A run of one change epoch on the batch engine ([`Engine::Auto`]) rather than the
    /// differential dataflow.
    batch: bool,
    /// Cluster mode: this process's part in it.
    cluster: Option<Role>,
    progress: ProgressBar,
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    journal: Option<CommitJournal>,
    published: Arc<BTreeMap<PartitionId, Published>>,
    changes: Vec<PartitionChange>,
    sources: Vec<SourceRecord>,
    errors: Vec<RunError>,
    summary: IngestSummary,
    fail_point: Option<FailPoint>,
    /// Per event day: the raw files this run wrote and their keys' index prefixes, to bring the
    /// day's key index up to date at the end of the run.
    written: BTreeMap<i64, (Vec<PathBuf>, Vec<u64>)>,
    /// Hourly-layout raw files this run removed ([`raw::RawWritten::removed`]): gone from the
    /// raw layer's listing the run leaves for the next.
    removed_raw: Vec<PathBuf>,
    /// A follower's: how far its (hidden) progress bar was when it last reported.
    progress_reported: u64,
    /// This epoch's side-table rows, to be staged as one file per table ([`stage_side_tables`]).
    side: SideRows,
    /// Side-table files staged for this epoch's publish.
    side_files: Vec<SideFile>,
}

/// The rows a process's sources bring to the side tables in an epoch: written as one file per
/// table when the epoch is staged, not one per source (thousands of files of a few rows each).
#[derive(Default)]
struct SideRows {
    /// Quarantined records, with their source's content hash.
    quarantine: Vec<(String, crate::event::Quarantined)>,
    /// Their bytes (raw bytes and text), to stage them early past [`QUARANTINE_SPILL_BYTES`].
    quarantine_bytes: usize,
    /// Sources' late events.
    late: Vec<late::SourceLateness>,
}

/// Quarantined bytes a process holds before it stages them as a file of their own (rejected
/// files are kept up to 1 MiB each, so a run of bad files would otherwise be held to the epoch's
/// end).
const QUARANTINE_SPILL_BYTES: usize = 64 << 20;

impl SharedState {
    /// Adds raw files written (and their keys' index prefixes), by event day, to the run's.
    fn add_written(&mut self, written: BTreeMap<i64, (Vec<PathBuf>, Vec<u64>)>) {
        for (day, (paths, prefixes)) in written {
            let entry = self.written.entry(day).or_default();
            entry.0.extend(paths);
            entry.1.extend(prefixes);
        }
    }
}

/// A process's part in a cluster run ([`crate::cluster`]).
struct Role {
    cluster: crate::cluster::Cluster,
    /// Worker threads of each process.
    workers: usize,
    /// The coordinator's: the plan it sends the followers.
    job: Option<Job>,
    /// A follower's: its read-only view of the journal, caught up after each publish.
    journal: Option<Mutex<CommitJournal>>,
}

impl Role {
    /// This worker's index among its process's workers.
    fn local(&self, index: usize) -> usize {
        index % self.workers
    }
}

/// A generation as the coordinator planned it, for the followers: what they need to run their
/// part (they read the tombstones themselves; a keyed rebuild's rows stay on the coordinator,
/// whose workers feed them all, and the dataflow sends each row to its key's worker; or, found
/// in the run from the keys every process sends of its input files, its worker 0:
/// [`KeyedInRun`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Job {
    /// The coordinator's build (every process must run the same: they exchange its types).
    version: String,
    /// The journal's length when the coordinator planned: a follower whose `--warehouse` is not
    /// the same directory sees another.
    journal_bytes: u64,
    run_id: String,
    started_at_us: i64,
    ledger_anchor: LedgerAnchor,
    horizons: Horizons,
    /// A whole-day rebuild's files and days; `None` for a keyed rebuild.
    rebuild_files: Option<(Vec<PathBuf>, BTreeSet<i64>)>,
    /// A keyed rebuild found in the run ([`KeyedInRun`]): which user-days the workers send.
    keyed_in_run: Option<rehydrate::SeedScope>,
    partition_of: HashMap<String, String>,
    progress_in_sources: bool,
    tamper: bool,
    epochs: Vec<EpochPlan>,
    /// [`Shared::hourly_layout`].
    hourly_layout: HashMap<String, Vec<PathBuf>>,
    /// [`Shared::batch`].
    batch: bool,
}

/// A follower's part of an epoch, for worker 0's publish: what its workers staged and ingested.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Report {
    process: usize,
    changes: Vec<PartitionChange>,
    sources: Vec<SourceRecord>,
    summary: IngestSummary,
    errors: Vec<RemoteError>,
    written: BTreeMap<i64, (Vec<PathBuf>, Vec<u64>)>,
    /// Hourly-layout raw files its workers removed.
    #[serde(default)]
    removed_raw: Vec<PathBuf>,
    /// The side-table files its workers staged.
    #[serde(default)]
    side_files: Vec<SideFile>,
    /// Its work done since its last report, in the coordinator's progress bar's unit (sources
    /// or bytes), so that the bar counts the whole cluster's.
    progress: u64,
}

/// A warehouse opened for a run: the journal recovered, the ledger verified and caught up, the
/// tombstones read.
pub(crate) struct Opened {
    pub(crate) journal: CommitJournal,
    pub(crate) ledger: Ledger,
    pub(crate) tombstones: Tombstones,
    pub(crate) horizons: Horizons,
    committed_before: u64,
    started: Instant,
    pub(crate) started_at_us: i64,
    /// The raw layer's files, listed on another thread while the journal and ledger are read.
    raw_listing: std::thread::JoinHandle<Vec<PathBuf>>,
    /// Held until the run's ledger entry is written: no other writer reads or changes the
    /// warehouse meanwhile.
    pub(crate) lock: crate::lock::WriterLock,
    /// The run key of the run's ledger entry.
    run_key: Option<String>,
    /// The interrupted publish startup finished, if any.
    pub(crate) finished_publish: Option<u64>,
    /// Publishes startup found committed without a ledger entry, and recorded.
    pub(crate) recorded_publishes: Vec<u64>,
}

/// What a process keeps of a warehouse it opened, for its next run (a stream's next epoch, a
/// long run's next hot-window generation): the commit journal, the audit ledger and the raw
/// layer's listing as its last run left them. Reading those again is what an open costs, and it
/// grows with the warehouse's history (every epoch of a stream adds a journal record, a ledger
/// entry and raw files), so a stream that opened afresh for every epoch slowed down by the hour.
///
/// Used only when no other writer touched the warehouse since: the next open takes the writer
/// lock and compares the length and modification time of the journal, the ledger, the
/// tombstones and the retention horizons with what they were when the last run ended (it held
/// the lock then too); any difference, or a failed run, and the warehouse is read afresh.
///
/// With [`OpenCache::with_columns`] it also keeps the key, user and ad columns of the raw files
/// its runs scanned for the keyed rebuild ([`rehydrate::ColumnCache`]): a stream's epochs look
/// at the same day's files again and again.
#[derive(Default)]
pub struct OpenCache {
    kept: Option<Reusable>,
    columns: Option<rehydrate::ColumnCache>,
    /// [`OpenCache::with_session`]: the most rows a session's dataflow may take in before it is
    /// dropped and the next run starts a new one.
    session_rows: Option<u64>,
    session: Option<Session>,
}

/// A stream's dataflow, kept alive across its runs ([`OpenCache::with_session`]): timely workers
/// started once, each holding its pipeline (dedup, aggregates, the partition mirror) and the
/// partitions it has seeded, waiting for the next run.
///
/// A run in the session rebuilds only what the dataflow does not hold yet: rows of the raw files
/// committed before the session began, of keys and user-days it has not covered
/// ([`rehydrate::Coverage`]); the session's own files are in the dataflow already. So a run
/// costs what it adds, where a fresh dataflow per run rebuilt, every time, every user-day and
/// key of the day its events touched (and tested every row of the day's files to find them).
///
/// Times: a run's epoch 0 (its rebuild) is the session's next time, its epoch `k` that plus `k`;
/// the mirror ignores the rebuild's time, whose changes the published partitions already hold.
/// The session ends (its workers stop, its state is dropped) when a run fails, when another
/// writer changed the warehouse (the open finds it), when a run withdraws rows or needs another
/// worker count, and when it has taken in its rows; the next run then starts a new one.
struct Session {
    workers: usize,
    jobs: Vec<std::sync::mpsc::Sender<Arc<Shared>>>,
    done: std::sync::mpsc::Receiver<i64>,
    guards: Option<timely::communication::WorkerGuards<()>>,
    /// The raw files committed when the session began (the only ones a run rebuilds from).
    before: Vec<PathBuf>,
    coverage: rehydrate::Coverage,
    /// Rows the dataflow has taken in (new events and rebuilt rows).
    rows: u64,
}

impl Session {
    /// Starts `workers` timely workers, each with its pipeline, waiting for runs.
    fn start(workers: usize, before: Vec<PathBuf>) -> Result<Self, RunError> {
        let (jobs, receivers): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| std::sync::mpsc::channel::<Arc<Shared>>())
            .unzip();
        let receivers: Vec<Mutex<Option<std::sync::mpsc::Receiver<Arc<Shared>>>>> =
            receivers.into_iter().map(|r| Mutex::new(Some(r))).collect();
        let (done_tx, done) = std::sync::mpsc::channel();
        let done_tx = Mutex::new(done_tx);
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            let jobs = receivers[worker.index()]
                .lock()
                .expect("lock")
                .take()
                .expect("one worker per index");
            let done = done_tx.lock().expect("lock").clone();
            let mut pipeline = pipeline::build(worker);
            let mut seeded = BTreeSet::new();
            let mut time = 0;
            // Each run is the same sequence of steps on every worker; the last worker to hand
            // in its result does not start the next run before the session sends it.
            while let Ok(shared) = jobs.recv() {
                let conflicted = run_epochs(
                    worker,
                    &mut pipeline,
                    Some(&mut seeded),
                    &shared,
                    time,
                    None,
                );
                time += shared.epochs.len() as u64 + 1;
                drop(shared);
                if done.send(conflicted).is_err() {
                    break;
                }
            }
        })
        .map_err(RunError::Runtime)?;
        Ok(Session {
            workers,
            jobs,
            done,
            guards: Some(guards),
            before,
            coverage: rehydrate::Coverage::default(),
            rows: 0,
        })
    }

    /// Runs `shared`'s epochs on the session's workers. Returns the conflicted keys they found.
    fn run(&mut self, shared: &Arc<Shared>) -> Result<i64, RunError> {
        for jobs in &self.jobs {
            jobs.send(shared.clone())
                .map_err(|_| RunError::Runtime("a session worker stopped".into()))?;
        }
        let mut conflicted = 0;
        for _ in 0..self.workers {
            conflicted += self
                .done
                .recv()
                .map_err(|_| RunError::Runtime("a session worker stopped".into()))?;
        }
        Ok(conflicted)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing the channels ends every worker's loop; then they are joined.
        self.jobs.clear();
        if let Some(guards) = self.guards.take() {
            for result in guards.join() {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "a session worker failed");
                }
            }
        }
    }
}

struct Reusable {
    journal: CommitJournal,
    ledger: Ledger,
    listing: Vec<PathBuf>,
    fingerprint: MetaFingerprint,
}

/// Length and modification time of each metadata file an open reads (`None`: absent).
#[derive(Debug, PartialEq, Eq)]
struct MetaFingerprint(Vec<Option<(u64, std::time::SystemTime)>>);

impl MetaFingerprint {
    fn of(warehouse: &Warehouse) -> Self {
        MetaFingerprint(
            [
                warehouse.journal_path(),
                warehouse.ledger_path(),
                warehouse.tombstones_path(),
                crate::retention::horizons_path(warehouse),
            ]
            .iter()
            .map(|path| {
                let meta = std::fs::metadata(path).ok()?;
                Some((meta.len(), meta.modified().ok()?))
            })
            .collect(),
        )
    }
}

impl OpenCache {
    /// Whether the last run through this cache ended well and left its state for the next.
    pub fn is_warm(&self) -> bool {
        self.kept.is_some()
    }

    /// A cache that also keeps up to `max_rows` rows of raw files' key, user and ad columns.
    pub fn with_columns(max_rows: usize) -> Self {
        OpenCache {
            columns: Some(rehydrate::ColumnCache::new(max_rows)),
            ..Default::default()
        }
    }

    /// Also keeps the dataflow alive from one run to the next ([`Session`]), until it has taken
    /// in `max_rows` rows (new events and rebuilt rows; its memory grows with them).
    pub fn with_session(mut self, max_rows: u64) -> Self {
        self.session_rows = Some(max_rows);
        self
    }

    /// Rows of raw-file columns held.
    pub fn column_rows(&self) -> usize {
        self.columns
            .as_ref()
            .map_or(0, rehydrate::ColumnCache::rows)
    }

    /// Forgets the raw files' columns (they may have been rewritten) and ends the session (its
    /// state may no longer be the published one).
    fn forget(&mut self) {
        if let Some(columns) = &mut self.columns {
            columns.clear();
        }
        self.session = None;
    }

    /// Keeps what a run that ended well leaves, while it still holds the writer lock.
    fn keep(
        &mut self,
        warehouse: &Warehouse,
        journal: CommitJournal,
        ledger: Ledger,
        mut listing: Vec<PathBuf>,
    ) {
        listing.sort_unstable();
        listing.dedup();
        self.kept = Some(Reusable {
            journal,
            ledger,
            listing,
            fingerprint: MetaFingerprint::of(warehouse),
        });
    }
}

impl Opened {
    /// Opens `warehouse` for a run, from `cache` when nothing changed since this process's last
    /// run (see [`OpenCache`]); else as [`Opened::open`] does.
    pub(crate) fn open_cached(
        warehouse: &Warehouse,
        cache: &mut OpenCache,
    ) -> Result<Self, RunError> {
        let Some(kept) = cache.kept.take() else {
            // The first run, or one after a failure: nothing known of what happened since.
            cache.forget();
            return Self::open(warehouse);
        };
        let started = Instant::now();
        let lock = crate::lock::WriterLock::acquire(warehouse)?;
        if MetaFingerprint::of(warehouse) != kept.fingerprint {
            tracing::info!("another writer changed the warehouse since this process's last run: reading it afresh");
            cache.forget();
            return Self::open_locked(warehouse, lock, started);
        }
        let listing = kept.listing;
        Ok(Opened {
            horizons: crate::retention::horizons(warehouse)?,
            tombstones: Tombstones::open(&warehouse.tombstones_path())?,
            committed_before: kept.journal.committed().last().map_or(0, |p| p.seq),
            journal: kept.journal,
            ledger: kept.ledger,
            started,
            started_at_us: chrono::Utc::now().timestamp_micros(),
            raw_listing: std::thread::spawn(move || listing),
            lock,
            run_key: warehouse.run_key().map(str::to_string),
            finished_publish: None,
            recorded_publishes: Vec::new(),
        })
    }

    /// Opens `warehouse` for a run: recovers an interrupted publish, and records on the ledger any
    /// publish an earlier run committed without recording it.
    pub(crate) fn open(warehouse: &Warehouse) -> Result<Self, RunError> {
        let started = Instant::now();
        let lock = crate::lock::WriterLock::acquire(warehouse)?;
        Self::open_locked(warehouse, lock, started)
    }

    fn open_locked(
        warehouse: &Warehouse,
        lock: crate::lock::WriterLock,
        started: Instant,
    ) -> Result<Self, RunError> {
        // Nothing below writes raw files (recovery renames curated partitions and side-table
        // files only).
        let raw_listing = {
            let warehouse = warehouse.clone();
            std::thread::spawn(move || raw::list_raw_files(&warehouse))
        };
        // The ledger is read (and its chain checked) while the journal is.
        let (journal, ledger) = std::thread::scope(|scope| {
            let ledger = scope.spawn(|| Ledger::open(&warehouse.ledger_path()));
            let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path());
            let ledger = ledger
                .join()
                .unwrap_or_else(|_| Ledger::open(&warehouse.ledger_path()));
            (journal, ledger)
        });
        let mut journal = journal?;
        let finished_publish =
            journal.recover(&warehouse.staging_dir(), |id| warehouse.partition_file(id))?;
        if let Some(seq) = finished_publish {
            tracing::warn!(seq, "finished a publish interrupted by an earlier crash");
        }
        let mut ledger = ledger?;
        let mut recorded_publishes = Vec::new();
        if let Some(entry) = ledger.cover(journal.committed(), warehouse.run_key())? {
            tracing::warn!(
                publishes = ?entry.body.publishes,
                "recorded publishes of an earlier run that stopped before its ledger entry"
            );
            recorded_publishes = entry.body.publishes.clone();
        }
        let tombstones = Tombstones::open(&warehouse.tombstones_path())?;
        let horizons = crate::retention::horizons(warehouse)?;
        Ok(Opened {
            horizons,
            committed_before: journal.committed().last().map_or(0, |p| p.seq),
            journal,
            ledger,
            tombstones,
            started,
            started_at_us: chrono::Utc::now().timestamp_micros(),
            raw_listing,
            lock,
            run_key: warehouse.run_key().map(str::to_string),
            finished_publish,
            recorded_publishes,
        })
    }

    /// A run record of `kind` for `command`, with this run's id.
    pub(crate) fn record(&self, kind: RunKind, command: String) -> RunRecord {
        RunRecord {
            kind,
            run_id: format!("run-{}-{}", self.started_at_us, std::process::id()),
            run_key: self.run_key.clone(),
            command,
            sources_skipped: 0,
            error: None,
            request: None,
            dropped: Vec::new(),
            message_times_ms: None,
        }
    }
}

/// One epoch of a planned run: what it adds, withdraws and records. Published as one.
#[derive(Default)]
pub(crate) struct Batch {
    /// Sources to read, decode and add.
    pub(crate) sources: Vec<SourceFile>,
    /// Sources whose contribution is withdrawn.
    pub(crate) retired: Vec<RetiredSource>,
    /// The content hashes whose raw rows leave with them.
    pub(crate) retract_hashes: BTreeSet<String>,
    /// Sources recorded without being read (their content already contributes).
    pub(crate) adopt: Vec<SourceRecord>,
    /// The source day (`dt=` folder) of its sources, where they have one: where the hot window
    /// may cut the run.
    pub(crate) day: Option<i64>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.retired.is_empty() && self.adopt.is_empty()
    }
}

/// What a run will do, decided before any worker starts.
pub(crate) struct Plan {
    /// Its ledger record.
    pub(crate) run: RunRecord,
    /// Its epochs after rehydration, in order.
    pub(crate) batches: Vec<Batch>,
    /// Backfill: the source partition of each new source, by content hash.
    pub(crate) partition_of: HashMap<String, String>,
    /// Count progress in sources instead of bytes.
    pub(crate) progress_in_sources: bool,
    /// How it rebuilds the state its changes need.
    pub(crate) rehydration: Rehydration,
    /// Counts decided while planning.
    pub(crate) summary: IngestSummary,
}

/// How a run rebuilds, at epoch 0, the state its changes need.
pub(crate) enum Rehydration {
    /// The raw rows of the keys and user-days it changes ([`crate::rehydrate`]); partitions are
    /// seeded from their published rows. Ingest and backfill.
    Keyed,
    /// Whole event days, closed over keys ([`crate::scope`]): these days besides those its changes
    /// touch, and the dataflow runs even with nothing new, since the rebuild itself is the change
    /// (a delete: the days without the deleted keys).
    Days(BTreeSet<i64>),
}

/// What epoch 0 feeds each worker.
enum Rebuild {
    /// Every raw row of these files (their share of them), which rebuild these event days whole.
    Files(Vec<PathBuf>, BTreeSet<i64>),
    /// These rows (their share of them): found while planning, or in a cluster's run by its
    /// worker 0 ([`KeyedInRun`]).
    Rows(std::sync::OnceLock<Vec<(DedupKey, EventVersion)>>),
}

/// Cluster mode, a keyed run: its rebuild's rows are found in the run, once every worker of every
/// process has read its share of the new sources (input files, or the stream's ranges its
/// process cut) and of the raw files the run withdraws, and sent the coordinator what they ask
/// of the rebuild ([`seed_in_run`]), rather than by the coordinator reading them all before the
/// run.
struct KeyedInRun {
    /// Which user-days a worker sends.
    scope: rehydrate::SeedScope,
    /// The coordinator's: the committed raw files to look in (a follower's is empty).
    committed: Vec<PathBuf>,
}

/// `files` identified (content hash and size): by this process, or shared out over the cluster.
pub(crate) fn identify(
    files: &[PathBuf],
    options: &IngestOptions,
) -> Result<Vec<SourceFile>, RunError> {
    match &options.cluster {
        Some(cluster) => crate::cluster::identify(cluster, options.workers.max(1), files),
        None => Ok(source::identify(files, options.workers)?),
    }
}

/// Ingests the files under `inputs` into `warehouse`; rerun-safe.
pub fn ingest(
    warehouse: &Warehouse,
    inputs: &[PathBuf],
    options: IngestOptions,
) -> Result<IngestSummary, RunError> {
    let opened = Opened::open(warehouse)?;
    let run = opened.record(
        RunKind::Ingest,
        format!(
            "ingest --workers {}{} --hot-window {} {}",
            options.workers,
            options.cluster_flag(),
            hot_window_flag(options.hot_window_days),
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    tracing::debug!("opened");
    let files = source::discover(inputs)?;
    let identified = identify(&files, &options)?;
    tracing::debug!("identified");
    let (new_sources, summary) = skip_consumed(&opened, identified);
    // Under a hot window the sources go in source-day order (a source with no `dt=` folder in
    // its path first), cut into groups of at most the window's days; each group is its epochs.
    let groups: Vec<(Option<i64>, Vec<SourceFile>)> = match options.hot_window_days {
        None => vec![(None, new_sources)],
        Some(window) => {
            let mut dated: Vec<(Option<i64>, SourceFile)> = new_sources
                .into_iter()
                .map(|s| (crate::backfill::day_of_path(&s.path.to_string_lossy()), s))
                .collect();
            dated.sort_by_key(|(day, _)| *day);
            cut_by_window(dated, Some(window), |(day, _)| *day)
                .into_iter()
                .map(|(first, group)| (first, group.into_iter().map(|(_, s)| s).collect()))
                .collect()
        }
    };
    let mut batches = Vec::new();
    for (day, sources) in groups {
        let per_epoch = match options.epoch_sources {
            0 => sources.len().max(1),
            n => n,
        };
        batches.extend(sources.chunks(per_epoch).map(|chunk| Batch {
            sources: chunk.to_vec(),
            day,
            ..Default::default()
        }));
    }
    let plan = Plan {
        run,
        batches,
        partition_of: HashMap::new(),
        progress_in_sources: false,
        rehydration: Rehydration::Keyed,
        summary,
    };
    execute(warehouse, opened, plan, options)
}

/// The sources not yet consumed (by content hash, and not a copy of an earlier one in the same
/// list), with the run's counts of sources found and skipped.
fn skip_consumed(opened: &Opened, sources: Vec<SourceFile>) -> (Vec<SourceFile>, IngestSummary) {
    let mut summary = IngestSummary {
        sources_found: sources.len() as u64,
        ..Default::default()
    };
    let mut seen = opened.journal.consumed().clone();
    let mut new_sources = Vec::new();
    for s in sources {
        if seen.insert(s.content_hash.clone()) {
            new_sources.push(s);
        } else {
            summary.sources_skipped += 1;
        }
    }
    (new_sources, summary)
}

/// How an [`ingest_inline`] run is recorded on the ledger.
pub struct InlineRun {
    /// Its kind.
    pub kind: RunKind,
    /// What ran.
    pub command: String,
    /// The Kafka timestamps of its oldest and newest messages, ms.
    pub message_times_ms: Option<(i64, i64)>,
}

/// Ingests sources that are not files (ranges of Kafka partitions, decoded by the caller) as one
/// run of one epoch, recorded on the ledger as `kind` with `command`; sources already consumed
/// (by their content hash) are skipped. The stream's unit of work: its epochs are these runs.
pub fn ingest_inline(
    warehouse: &Warehouse,
    sources: Vec<SourceFile>,
    run: InlineRun,
    options: IngestOptions,
    cache: &mut OpenCache,
) -> Result<IngestSummary, RunError> {
    let opened = Opened::open_cached(warehouse, cache)?;
    let mut record = opened.record(run.kind, run.command);
    record.message_times_ms = run.message_times_ms;
    let run = record;
    let (new_sources, summary) = skip_consumed(&opened, sources);
    let plan = Plan {
        run,
        batches: vec![Batch {
            sources: new_sources,
            ..Default::default()
        }],
        partition_of: HashMap::new(),
        progress_in_sources: false,
        rehydration: Rehydration::Keyed,
        summary,
    };
    execute_cached(warehouse, opened, plan, options, cache)
}

/// Every source the warehouse's journal has committed, after finishing any interrupted publish
/// (so what a crashed run prepared counts as consumed).
pub fn committed_sources(warehouse: &Warehouse) -> Result<Vec<SourceRecord>, RunError> {
    let opened = Opened::open(warehouse)?;
    Ok(opened
        .journal
        .committed()
        .iter()
        .flat_map(|p| p.sources.iter().cloned())
        .collect())
}

/// What `adsmetrics recover` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The interrupted publish it finished (rolled forward), if any.
    pub finished_publish: Option<u64>,
    /// Committed publishes it recorded on the ledger (their run stopped before its entry).
    pub recorded_publishes: Vec<u64>,
}

/// Brings the warehouse to a clean state after a crash without running anything else: finishes
/// an interrupted publish, removes staging leftovers, records uncovered publishes on the ledger.
/// Every writer does this when it starts; this is the same step on its own, for the runbook.
pub fn recover(warehouse: &Warehouse) -> Result<Recovered, RunError> {
    let opened = Opened::open(warehouse)?;
    Ok(Recovered {
        finished_publish: opened.finished_publish,
        recorded_publishes: opened.recorded_publishes.clone(),
    })
}

/// Recomputes every curated partition of the event days `days` from the raw layer and publishes
/// the ones that differ from what is published: the re-run after a bad deploy (a build that
/// published wrong aggregates). Sources are not read again; a second run changes nothing.
pub fn reprocess(
    warehouse: &Warehouse,
    days: BTreeSet<i64>,
    options: IngestOptions,
) -> Result<IngestSummary, RunError> {
    let opened = Opened::open(warehouse)?;
    let (first, last) = match (days.first(), days.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Err(RunError::Refused("reprocess: no days given".to_string())),
    };
    let run = opened.record(
        RunKind::Reprocess,
        format!(
            "reprocess --from {} --to {} --workers {}{}",
            crate::warehouse::day_string(first),
            crate::warehouse::day_string(last),
            options.workers,
            options.cluster_flag()
        ),
    );
    let plan = Plan {
        run,
        batches: Vec::new(),
        partition_of: HashMap::new(),
        progress_in_sources: false,
        rehydration: Rehydration::Days(days),
        summary: IngestSummary::default(),
    };
    execute(warehouse, opened, plan, options)
}

/// The `--hot-window` value a run was given, as the ledger records its command.
pub(crate) fn hot_window_flag(days: Option<u32>) -> String {
    days.map_or_else(|| "off".to_string(), |d| format!("{d}d"))
}

/// Whether a hot window of `window` days that starts at source day `first` must end before a
/// batch of source day `day`. Undated batches never cut.
fn window_cut(window: u32, first: Option<i64>, day: Option<i64>) -> bool {
    match (first, day) {
        (Some(first), Some(day)) => day - first >= i64::from(window.max(1)),
        _ => false,
    }
}

/// Cuts `items` (in order) into runs of at most `window` source days each, a new one starting at
/// the first dated item `window` days or more after its run's first dated day; each run comes
/// with that first day. The same cut serves an ingest's sources and a run's batches, so the
/// generations fall exactly on the ingest's groups. `None` keeps everything in one run.
fn cut_by_window<T>(
    items: Vec<T>,
    window: Option<u32>,
    day_of: impl Fn(&T) -> Option<i64>,
) -> Vec<(Option<i64>, Vec<T>)> {
    let mut out: Vec<(Option<i64>, Vec<T>)> = Vec::new();
    for item in items {
        let day = day_of(&item);
        match out.last_mut() {
            Some((first, group)) if !window.is_some_and(|w| window_cut(w, *first, day)) => {
                if first.is_none() {
                    *first = day;
                }
                group.push(item);
            }
            _ => out.push((day, vec![item])),
        }
    }
    out
}

/// Whether a keyed run's batches (a backfill's days) each make a generation of their own, so that
/// each generation has one epoch, which `execute_generation` then computes on the batch engine
/// (`adsmetrics_dataflows::batch`): [`Engine::Auto`], not a stream's (whose session takes
/// several epochs), and no `--epoch-sources` (which asks for several epochs in one dataflow).
fn batch_per_generation(options: &IngestOptions, cache: &OpenCache) -> bool {
    options.engine == Engine::Auto && options.epoch_sources == 0 && cache.session_rows.is_none()
}

/// Runs a planned run, cut into generations by the hot window: each generation is a whole run
/// of its own batches (a fresh dataflow, rebuilt by key from the raw layer the generations
/// before it wrote), so the state in memory is that of at most one window of source days,
/// however many days the run covers. The generations share the run's id on the ledger, one
/// entry each; a failure stops the run after the generation it happened in, and the same
/// command again finishes it (each generation's sources are then already committed).
pub(crate) fn execute(
    warehouse: &Warehouse,
    opened: Opened,
    plan: Plan,
    options: IngestOptions,
) -> Result<IngestSummary, RunError> {
    execute_cached(warehouse, opened, plan, options, &mut OpenCache::default())
}

/// [`execute`], keeping in `cache` what the next run of this process may reuse.
fn execute_cached(
    warehouse: &Warehouse,
    opened: Opened,
    plan: Plan,
    options: IngestOptions,
    cache: &mut OpenCache,
) -> Result<IngestSummary, RunError> {
    let Plan {
        run,
        batches,
        partition_of,
        progress_in_sources,
        rehydration,
        summary,
    } = plan;
    let batches: Vec<Batch> = batches.into_iter().filter(|b| !b.is_empty()).collect();
    let mut generations = match rehydration {
        // On the batch engine, a window's epochs (a backfill's days) are generations of their
        // own: the engine computes a generation of one epoch, the dataflow one of several. A
        // 30-day backfill (5M events, 2 workers) took 6.1 s in 200 MB so, 7.0 s in 440 MB as
        // two-day generations on the dataflow.
        Rehydration::Keyed
            if options.hot_window_days.is_some() && batch_per_generation(&options, cache) =>
        {
            batches.into_iter().map(|b| vec![b]).collect()
        }
        Rehydration::Keyed => cut_by_window(batches, options.hot_window_days, |b| b.day)
            .into_iter()
            .map(|(_, group)| group)
            .collect(),
        Rehydration::Days(_) => vec![batches],
    };
    if generations.len() <= 1 {
        let plan = Plan {
            run,
            batches: generations.pop().unwrap_or_default(),
            partition_of,
            progress_in_sources,
            rehydration,
            summary,
        };
        let mut summary = execute_generation(warehouse, opened, plan, options, None, cache)?;
        summary.generations = 1;
        return Ok(summary);
    }
    let started = opened.started;
    let count = generations.len();
    let total_work = generations
        .iter()
        .flatten()
        .flat_map(|b| &b.sources)
        .map(|s| if progress_in_sources { 1 } else { s.bytes })
        .sum();
    let bar = progress_bar(options.progress, progress_in_sources, total_work);
    // Measured on 2 cores, 2 workers, 30 days in 16 generations: peak RSS 333 MB creeping up
    // with trimming alone, 238 MB flat from the second generation with two arenas.
    crate::memory::limit_arenas(options.workers.max(2));
    // A batch command's process ends with its run; a stream's lives on after a catch-up of
    // several generations and keeps glibc's own thresholds (see `keep_freed_memory`).
    if cache.session_rows.is_none() {
        let kept = crate::memory::keep_freed_memory();
        tracing::debug!(kept, "allocator keeps freed memory for the next generation");
    }
    let mut total = summary;
    let mut opened = Some(opened);
    let mut days = BTreeSet::new();
    for (i, batches) in generations.into_iter().enumerate() {
        let opened = match opened.take() {
            Some(opened) => opened,
            None => Opened::open_cached(warehouse, cache)?,
        };
        let first = batches.iter().find_map(|b| b.day);
        let last = batches.iter().rev().find_map(|b| b.day);
        for b in &batches {
            days.extend(b.day);
            days.extend(
                b.sources
                    .iter()
                    .filter_map(|s| crate::backfill::day_of_path(&s.path.to_string_lossy())),
            );
        }
        let mut run = run.clone();
        run.command = format!(
            "{} [hot window generation {}/{count}{}]",
            run.command,
            i + 1,
            match (first, last) {
                (Some(f), Some(l)) => format!(
                    ", source days {}..{}",
                    crate::warehouse::day_string(f),
                    crate::warehouse::day_string(l)
                ),
                _ => String::new(),
            }
        );
        let plan = Plan {
            run,
            batches,
            partition_of: partition_of.clone(),
            progress_in_sources,
            rehydration: Rehydration::Keyed,
            summary: IngestSummary::default(),
        };
        let generation = execute_generation(
            warehouse,
            opened,
            plan,
            options.clone(),
            Some((bar.clone(), total.events_accepted)),
            cache,
        );
        let generation = match generation {
            Ok(summary) => summary,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        total.absorb(&generation);
        // What the generation's threads freed stays in glibc's arenas, resident, and the next
        // generation's allocations reuse it: the arenas are capped (above), so it is one
        // generation's worth and the peak does not creep. Handing it back after every
        // generation kept the resident set between generations at a third, but every page came
        // back as a page fault in the next: 0.7 s of system time, 5% of a 30-day load, for no
        // lower peak. Handed back once, after the last (a stream or a follower lives on).
        if i + 1 == count {
            crate::memory::release_free_memory();
        }
        let (rss_bytes, peak_rss_bytes) = crate::memory::process_memory();
        tracing::info!(
            generation = i + 1,
            of = count,
            last_day = ?last.map(crate::warehouse::day_string),
            rss_mb = rss_bytes >> 20,
            peak_rss_mb = peak_rss_bytes >> 20,
            "hot window generation done, its state dropped"
        );
        total.memory.push(GenerationMemory {
            last_day: last,
            days_done: days.len() as u32,
            rss_bytes,
            peak_rss_bytes,
        });
    }
    bar.finish_and_clear();
    total.generations = count as u64;
    total.elapsed = started.elapsed();
    Ok(total)
}

impl IngestSummary {
    /// Adds the counts of a later generation of the same run.
    pub(crate) fn absorb(&mut self, g: &IngestSummary) {
        self.sources_found += g.sources_found;
        self.sources_skipped += g.sources_skipped;
        self.sources_ingested += g.sources_ingested;
        self.source_bytes += g.source_bytes;
        self.events_accepted += g.events_accepted;
        for (kind, n) in &g.accepted_by_kind {
            *self.accepted_by_kind.entry(kind.clone()).or_default() += n;
        }
        self.in_source_duplicates += g.in_source_duplicates;
        self.quarantined += g.quarantined;
        self.raw_rows_written += g.raw_rows_written;
        self.late_events += g.late_events;
        self.rehydrated_rows += g.rehydrated_rows;
        self.rehydrated_files += g.rehydrated_files;
        self.committed_raw_files = g.committed_raw_files.max(self.committed_raw_files);
        self.retracted_rows += g.retracted_rows;
        self.tombstoned += g.tombstoned;
        self.epochs += g.epochs;
        self.partitions_published += g.partitions_published;
        self.partitions_unchanged += g.partitions_unchanged;
        self.conflicted_keys += g.conflicted_keys;
        self.batch_engine_runs += g.batch_engine_runs;
    }
}

/// A progress bar over `total` sources or bytes, or a hidden one.
fn progress_bar(show: bool, in_sources: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let template = if in_sources {
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} source partitions {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}"
    };
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Runs one generation of a planned run: rehydrate (epoch 0), then the new sources in epochs,
/// publishing each; records it on the ledger whatever happens. `progress`: the run's bar and the
/// events its earlier generations accepted, when it has more than one generation.
fn execute_generation(
    warehouse: &Warehouse,
    opened: Opened,
    plan: Plan,
    options: IngestOptions,
    progress: Option<(ProgressBar, u64)>,
    cache: &mut OpenCache,
) -> Result<IngestSummary, RunError> {
    let Opened {
        journal,
        mut ledger,
        tombstones,
        horizons,
        committed_before,
        started,
        started_at_us,
        raw_listing,
        lock: _lock,
        ..
    } = opened;
    let Plan {
        mut run,
        batches,
        partition_of,
        progress_in_sources,
        rehydration,
        mut summary,
    } = plan;
    run.sources_skipped = summary.sources_skipped;
    let batches: Vec<Batch> = batches.into_iter().filter(|b| !b.is_empty()).collect();
    let always = matches!(rehydration, Rehydration::Days(_));
    if batches.is_empty() && !always {
        ledger.append_run(&run, &[])?;
        let listing = raw_listing
            .join()
            .unwrap_or_else(|_| raw::list_raw_files(warehouse));
        cache.keep(warehouse, journal, ledger, listing);
        summary.elapsed = started.elapsed();
        return Ok(summary);
    }
    summary.source_bytes = batches
        .iter()
        .flat_map(|b| &b.sources)
        .map(|s| s.bytes)
        .sum();
    let source_count = batches.iter().map(|b| b.sources.len() as u64).sum();

    let workers = options.workers.max(1);
    // Sources are spread over the workers of every process of a cluster.
    let processes = options.cluster.as_ref().map_or(1, |c| c.processes);
    // Committed raw files, of days retention has not dropped (a retention run that stopped
    // before deleting them must not have them rebuilt into curated partitions it removed).
    let listed = raw_listing
        .join()
        .unwrap_or_else(|_| raw::list_raw_files(warehouse));
    tracing::debug!(files = listed.len(), "walked the raw layer");
    let committed_raw: Vec<PathBuf> = listed
        .iter()
        .filter(|p| raw::source_hash_of(p).is_some_and(|h| journal.consumed().contains(h)))
        .filter(|p| {
            horizons
                .raw_day
                .is_none_or(|horizon| scope::raw_day(warehouse, p).is_none_or(|day| day >= horizon))
        })
        .cloned()
        .collect();
    tracing::debug!("listed raw files");
    let scoping = Instant::now();
    // Each epoch's raw files to retract, found once: the scope needs them all, the epochs each
    // their own.
    let retracts: Vec<Vec<PathBuf>> = batches
        .iter()
        .map(|batch| {
            committed_raw
                .iter()
                .filter(|p| {
                    raw::source_hash_of(p).is_some_and(|h| batch.retract_hashes.contains(h))
                })
                .cloned()
                .collect()
        })
        .collect();
    let no_days = BTreeSet::new();
    let new_sources: Vec<&SourceFile> = batches.iter().flat_map(|b| &b.sources).collect();
    // What an older version's crashed runs left of this generation's sources, for the writers
    // to remove (a warehouse that never had the hourly layout has none).
    let mut hourly_layout = raw::hourly_layout(&listed);
    if !hourly_layout.is_empty() {
        let new: std::collections::HashSet<&str> = new_sources
            .iter()
            .map(|s| s.content_hash.as_str())
            .collect();
        hourly_layout.retain(|hash, _| new.contains(hash.as_str()));
    }
    let all_retracts = retracts.concat();
    let mut session = session_for(
        cache,
        workers,
        &rehydration,
        all_retracts.is_empty(),
        &committed_raw,
    )
    .map_err(|e| fail(&mut ledger, &run, e))?;
    // In a session, only the files committed before it began hold rows its dataflow may lack
    // (they stay committed while it lives: a run that withdraws any ends it).
    let (rebuild_from, coverage) = match session.as_mut() {
        Some(s) => (&s.before, Some(&mut s.coverage)),
        None => (&committed_raw, None),
    };
    let changes = scope::Changes {
        committed: rebuild_from,
        new_sources: &new_sources,
        retract: &all_retracts,
        extra_days: match &rehydration {
            Rehydration::Days(days) => days,
            Rehydration::Keyed => &no_days,
        },
        tombstones: &tombstones,
        horizons: &horizons,
    };
    let mut predecoded = HashMap::new();
    let mut keyed_in_run = None;
    // The columns a stream keeps of the raw files it scanned, for worker 0 to use and give back
    // when the rebuild is found in the run.
    let mut columns = Mutex::new(None);
    let rebuild = match &rehydration {
        Rehydration::Days(_) => {
            let scope = scope::rehydration_scope(warehouse, &changes, workers)
                .map_err(|e| fail(&mut ledger, &run, e.into()))?;
            tracing::info!(
                files = scope.files.len(),
                days = scope.days.len(),
                of = committed_raw.len(),
                took = ?scoping.elapsed(),
                "rehydration scope (whole days)"
            );
            summary.rehydrated_files = scope.files.len() as u64;
            Rebuild::Files(scope.files, scope.days)
        }
        Rehydration::Keyed => {
            if let Some(pending) = unfinished_delete(warehouse, &tombstones) {
                return Err(fail(
                    &mut ledger,
                    &run,
                    RunError::Refused(format!(
                        "delete request {pending:?} is not finished (its tombstones are written, \
                         its certificate is not): run the same `adsmetrics delete --request-id \
                         {pending} ...` again first, then this command"
                    )),
                ));
            }
            // A cluster's sources (input files, or a stream's ranges, which the process that
            // cut them holds) are read by the workers they are assigned to, each of which sends
            // what its share asks of the rebuild, in the run. (A cluster keeps no session.)
            let in_run =
                options.cluster.is_some() && coverage.is_none() && !rebuild_from.is_empty();
            if in_run {
                keyed_in_run = Some(KeyedInRun {
                    scope: rehydrate::SeedScope::of(warehouse, rebuild_from),
                    committed: rebuild_from.clone(),
                });
                *columns.get_mut().expect("not shared yet") = cache.columns.take();
                Rebuild::Rows(std::sync::OnceLock::new())
            } else {
                let state = rehydrate::keyed_state(
                    warehouse,
                    &changes,
                    workers,
                    cache.columns.as_mut(),
                    coverage,
                    &[],
                )
                .map_err(|e| fail(&mut ledger, &run, e.into()))?;
                log_keyed_state(&state, committed_raw.len(), scoping);
                summary.rehydrated_files = state.files_decoded;
                predecoded = state.decoded;
                Rebuild::Rows(state.rows.into())
            }
        }
    };
    drop(new_sources);
    summary.committed_raw_files = committed_raw.len() as u64;
    let epochs: Vec<EpochPlan> = batches
        .into_iter()
        .zip(retracts)
        .map(|(batch, retract)| EpochPlan {
            retract,
            retired: batch.retired,
            adopt: batch.adopt,
            ..assign(&batch.sources, workers, processes)
        })
        .collect();

    let owns_progress = progress.is_none();
    let (progress, progress_events_before) = progress.unwrap_or_else(|| {
        let total = if progress_in_sources {
            source_count
        } else {
            summary.source_bytes
        };
        (
            progress_bar(options.progress, progress_in_sources, total),
            0,
        )
    });

    let ledger_anchor = ledger.anchor();
    let shared_journal_bytes = journal.bytes_read();
    // One change epoch on a dataflow dropped after it: the same changes with sorts, in about
    // half the differential dataflow's time (see `adsmetrics_dataflows::batch`).
    let batch = options.engine == Engine::Auto
        && session.is_none()
        && matches!(rebuild, Rebuild::Rows(_))
        && epochs.len() == 1;
    tracing::debug!(batch, "engine chosen");
    let role = options.cluster.clone().map(|cluster| Role {
        job: Some(Job {
            version: env!("CARGO_PKG_VERSION").to_string(),
            journal_bytes: shared_journal_bytes,
            run_id: run.run_id.clone(),
            started_at_us,
            ledger_anchor: ledger_anchor.clone(),
            horizons,
            rebuild_files: match &rebuild {
                Rebuild::Files(files, days) => Some((files.clone(), days.clone())),
                Rebuild::Rows(_) => None,
            },
            keyed_in_run: keyed_in_run.as_ref().map(|k: &KeyedInRun| k.scope.clone()),
            partition_of: partition_of.clone(),
            progress_in_sources,
            tamper: options.tamper_for_test,
            epochs: epochs.clone(),
            hourly_layout: hourly_layout.clone(),
            batch,
        }),
        cluster,
        workers,
        journal: None,
    });
    let shared = Arc::new(Shared {
        warehouse: warehouse.clone(),
        run_id: run.run_id.clone(),
        started_at_us,
        ledger_anchor,
        tombstones,
        horizons,
        rebuild,
        keyed_in_run,
        columns,
        predecoded: Mutex::new(predecoded),
        partition_of,
        progress_in_sources,
        gate: options.gate,
        tamper: options.tamper_for_test,
        threads: workers.max(2),
        epochs,
        hourly_layout,
        barrier: Barrier::new(workers),
        batch,
        cluster: role,
        progress,
        progress_events_before,
        state: Mutex::new(SharedState {
            published: Arc::new(journal.published().clone()),
            journal: Some(journal),
            summary,
            fail_point: options.fail_point,
            ..Default::default()
        }),
    });

    let mut conflicted = 0;
    let ran = match session.as_mut() {
        Some(session) => session.run(&shared).map(|c| conflicted = c),
        None => {
            let worker_shared = shared.clone();
            let work =
                move |worker: &mut timely::worker::Worker| run_worker(worker, &worker_shared);
            match &options.cluster {
                Some(cluster) => cluster.execute(workers, work),
                None => timely::execute(timely::Config::process(workers), work),
            }
            .map_err(RunError::Runtime)
            .and_then(|guards| {
                for result in guards.join() {
                    conflicted += result.map_err(RunError::Runtime)?;
                }
                if let Some(cluster) = &options.cluster {
                    cluster.followers_are_back();
                }
                Ok(())
            })
        }
    };
    if let Some(columns) = shared
        .columns
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        cache.columns = Some(columns);
    }
    if let Err(e) = ran {
        // Workers that died committed nothing after their last publish; what the journal holds
        // is recorded with the failure.
        let state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let publishes: Vec<_> = state
            .journal
            .as_ref()
            .map(|j| {
                j.committed()
                    .iter()
                    .filter(|p| p.seq > committed_before)
                    .collect()
            })
            .unwrap_or_default();
        let _ = ledger.append_run(
            &RunRecord {
                error: Some(e.to_string()),
                ..run
            },
            &publishes,
        );
        return Err(e);
    }
    if owns_progress {
        shared.progress.finish_and_clear();
    }

    let mut state = shared
        .state
        .lock()
        .expect("no worker panicked holding the lock");
    let error = state.errors.drain(..).next();
    // Whatever the run committed goes on the ledger, also when it stopped with an error.
    if let Some(journal) = state.journal.as_ref() {
        let publishes: Vec<_> = journal
            .committed()
            .iter()
            .filter(|p| p.seq > committed_before)
            .collect();
        ledger.append_run(
            &RunRecord {
                error: error.as_ref().map(|e| e.to_string()),
                ..run
            },
            &publishes,
        )?;
    }
    if let Some(error) = error {
        return Err(error);
    }
    // Every staged file has been renamed into place; drop the empty staging folders.
    let staging = warehouse.staging_dir();
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|source| WriteError::Io {
            path: staging,
            source,
        })?;
    }
    // Raw files of withdrawn sources are read by nothing once the journal committed their
    // retirement; remove them (a crash before this leaves files every run ignores).
    for path in shared.epochs.iter().flat_map(|e| &e.retract) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a retired raw file");
        }
    }
    // The key index of every day this run wrote to, brought up to date now rather than by the
    // next run that needs it (from the keys just written, when the day's index was current).
    let retracted: BTreeSet<&PathBuf> = shared.epochs.iter().flat_map(|e| &e.retract).collect();
    let mut before: BTreeMap<Option<i64>, Vec<&PathBuf>> = BTreeMap::new();
    for path in &committed_raw {
        before
            .entry(scope::raw_day(warehouse, path))
            .or_default()
            .push(path);
    }
    // The raw layer as this run leaves it, for the next open in this process.
    let removed: BTreeSet<PathBuf> = std::mem::take(&mut state.removed_raw).into_iter().collect();
    let mut listing: Vec<PathBuf> = listed
        .into_iter()
        .filter(|p| !retracted.contains(p) && !removed.contains(p))
        .collect();
    let written: Vec<_> = std::mem::take(&mut state.written).into_iter().collect();
    // A session's runs look up keys only in the files from before it began (whose index is
    // left as it was): rewriting a day's whole index at every run grew with the day. Each day's
    // on a thread of its own (a load's generation writes two or three), before the next
    // generation looks keys up in them.
    if session.is_none() {
        let extended = rehydrate::par_map(&written, shared.threads, |(day, (files, prefixes))| {
            let before = before
                .get(&Some(*day))
                .map(Vec::as_slice)
                .unwrap_or_default();
            crate::keyindex::extend(warehouse, *day, before, &retracted, files, prefixes.clone());
            Ok::<_, std::convert::Infallible>(())
        });
        let Ok(_) = extended;
    }
    for (_, (files, _)) in written {
        listing.extend(files);
    }
    let mut summary = std::mem::take(&mut state.summary);
    summary.batch_engine_runs = shared.batch as u64;
    if let Some(journal) = state.journal.take() {
        cache.keep(warehouse, journal, ledger, listing);
        if let Some(mut session) = session {
            session.rows += summary.rehydrated_rows + summary.events_accepted;
            cache.session = Some(session);
        }
    }
    summary.conflicted_keys += conflicted;
    summary.elapsed = started.elapsed();
    if let Some(metrics) = &options.metrics {
        metrics.add(&summary);
    }
    Ok(summary)
}

/// The session a run goes through, taken out of `cache` (a run that fails drops it): the live
/// one, or a new one when `cache` keeps sessions and the live one (if any) cannot take this run
/// (see [`Session`]); `None` for a run on a dataflow of its own.
fn session_for(
    cache: &mut OpenCache,
    workers: usize,
    rehydration: &Rehydration,
    no_retracts: bool,
    committed: &[PathBuf],
) -> Result<Option<Session>, RunError> {
    let live = cache.session.take();
    let Some(max_rows) = cache.session_rows else {
        return Ok(None);
    };
    if !matches!(rehydration, Rehydration::Keyed) || !no_retracts {
        return Ok(None);
    }
    if let Some(session) = live {
        if session.workers == workers && session.rows < max_rows {
            return Ok(Some(session));
        }
        tracing::warn!(
            rows = session.rows,
            keys_covered = session.coverage.keys(),
            "the stream's dataflow took in its --dataflow-rows: a new one starts, and rebuilds \
             from the raw layer what its epochs touch of the rows before (slower if it is \
             mid-day; raise --dataflow-rows if memory allows)"
        );
    }
    Ok(Some(Session::start(workers, committed.to_vec())?))
}

/// The request id of a delete whose tombstones are written but whose certificate is not: the
/// published partitions may still count its events, so a keyed run (which starts from them) must
/// wait for it to finish.
fn unfinished_delete(warehouse: &Warehouse, tombstones: &Tombstones) -> Option<String> {
    tombstones
        .requests()
        .iter()
        .map(|r| &r.request_id)
        .find(|id| !crate::delete::certificate_path(warehouse, id).exists())
        .cloned()
}

/// Records a run that failed before its workers started (it changed nothing), and hands the
/// error back.
fn fail(ledger: &mut Ledger, run: &RunRecord, e: RunError) -> RunError {
    let failed = RunRecord {
        error: Some(e.to_string()),
        ..run.clone()
    };
    if let Err(ledger_error) = ledger.append_run(&failed, &[]) {
        tracing::warn!(error = %ledger_error, "could not record the failed run on the ledger");
    }
    e
}

/// The order sources are shared out and taken in: largest first, then by path (deterministic).
fn largest_first(a: &SourceFile, b: &SourceFile) -> std::cmp::Ordering {
    b.bytes.cmp(&a.bytes).then_with(|| a.path.cmp(&b.path))
}

/// Spreads sources over the workers of `processes` processes of `workers` each, largest first
/// onto the least-loaded worker (deterministic). A source held in memory (a stream's range) goes
/// to a worker of the process that holds it: this one's (the coordinator's), or its
/// [`SourceFile::held_by`]'s. Within a process, its workers then take their sources from one
/// queue ([`EpochPlan::take_source`]): the share says which process ingests a source, and
/// which of its workers decodes it ahead for a cluster's keyed rebuild.
fn assign(sources: &[SourceFile], workers: usize, processes: usize) -> EpochPlan {
    let mut order: Vec<&SourceFile> = sources.iter().collect();
    order.sort_by(|a, b| largest_first(a, b));
    let mut by_worker: Vec<Vec<SourceFile>> = vec![Vec::new(); workers * processes];
    let mut load = vec![0u64; workers * processes];
    for s in order {
        let candidates = match (&s.held_by, &s.inline) {
            (Some(held), _) => held.process * workers..(held.process + 1) * workers,
            (None, Some(_)) => 0..workers,
            (None, None) => 0..workers * processes,
        };
        let w = candidates.min_by_key(|&w| (load[w], w)).unwrap_or(0);
        load[w] += s.bytes.max(1);
        by_worker[w].push(s.clone());
    }
    EpochPlan {
        by_worker,
        retract: Vec::new(),
        retired: Vec::new(),
        adopt: Vec::new(),
        taken: SourceQueue::default(),
    }
}

/// One worker's whole run on a dataflow of its own. Returns the worker's count of conflicted keys.
fn run_worker(worker: &mut timely::worker::Worker, shared: &Shared) -> i64 {
    // In a cluster, the control dataflow first, on every process (see `follow_once`).
    let mut control = shared.cluster.as_ref().map(|_| Control::build(worker));
    let mut pipeline = match shared.cluster {
        Some(_) => ClusterPipelines::build(worker).take(shared.batch),
        None if shared.batch => pipeline::build_batch(worker),
        None => pipeline::build(worker),
    };
    if let (Some(control), Some(role)) = (control.as_mut(), shared.cluster.as_ref()) {
        // Round 0: the plan, to every worker of the followers.
        let plan = (worker.index() == 0)
            .then(|| role.job.as_ref().map(|job| Order::Run(Json::encode(job))))
            .flatten();
        control.order(worker, role.workers, plan);
        seed_in_run(worker, control, shared);
    }
    // Keyed rehydration: the partitions given their published rows so far.
    let mut seeded = matches!(shared.rebuild, Rebuild::Rows(_)).then(BTreeSet::new);
    run_epochs(
        worker,
        &mut pipeline,
        seeded.as_mut(),
        shared,
        0,
        control.as_mut(),
    )
}

/// The pipelines every worker of a cluster builds, in this order, right after its control
/// dataflow: a follower builds its dataflows before the coordinator's plan says which one a run
/// takes ([`Job::batch`]).
pub(crate) struct ClusterPipelines {
    dataflow: Pipeline,
    engine: Pipeline,
}

impl ClusterPipelines {
    pub(crate) fn build(worker: &mut timely::worker::Worker) -> Self {
        ClusterPipelines {
            dataflow: pipeline::build(worker),
            engine: pipeline::build_batch(worker),
        }
    }

    /// The batch engine's if `batch`, else the differential dataflow's; the other one is
    /// dropped, its input closed, and idles.
    fn take(self, batch: bool) -> Pipeline {
        if batch {
            self.engine
        } else {
            self.dataflow
        }
    }
}

/// A follower's part in one timely run of its cluster ([`crate::cluster::follow`]): what the
/// coordinator orders at round 0 — a generation, run like the coordinator's workers run theirs;
/// its share of the input files to identify; a stream's start, or its share of a stream's epoch
/// to cut (`part`: this process's part of the stream); or the end of the command.
pub(crate) fn follow_once(
    warehouse: &Warehouse,
    cluster: &crate::cluster::Cluster,
    workers: usize,
    part: Option<Arc<dyn crate::cluster::StreamPart>>,
) -> Result<Followed, RunError> {
    // As the coordinator's generations (see `ingest`): arenas capped, so that what one run
    // frees serves the next.
    crate::memory::limit_arenas(workers.max(2));
    let done: Arc<Mutex<Option<Followed>>> = Arc::default();
    let state: Arc<std::sync::OnceLock<Arc<Shared>>> = Arc::default();
    let (warehouse, role) = (warehouse.clone(), cluster.clone());
    let (told, run) = (done.clone(), state.clone());
    let guards = cluster
        .execute(workers, move |worker| {
            let mut control = Control::build(worker);
            let pipelines = ClusterPipelines::build(worker);
            match control.order(worker, workers, None) {
                Some(Order::Run(job)) => {
                    let shared = run
                        .get_or_init(|| {
                            Arc::new(follower_shared(
                                &warehouse,
                                &role,
                                workers,
                                &job,
                                part.as_deref(),
                            ))
                        })
                        .clone();
                    let mut pipeline = pipelines.take(shared.batch);
                    seed_in_run(worker, &mut control, &shared);
                    let mut seeded = matches!(shared.rebuild, Rebuild::Rows(_)).then(BTreeSet::new);
                    run_epochs(
                        worker,
                        &mut pipeline,
                        seeded.as_mut(),
                        &shared,
                        0,
                        Some(&mut control),
                    );
                }
                Some(Order::Identify(files)) => {
                    let (n, _) = crate::cluster::share_of_identify(
                        worker,
                        &mut control,
                        &role,
                        workers,
                        &files,
                    );
                    let mut told = told.lock().expect("lock");
                    let before = match *told {
                        Some(Followed::Identified(before)) => before,
                        _ => 0,
                    };
                    *told = Some(Followed::Identified(before + n));
                }
                Some(Order::Search(files, sought)) => {
                    let (n, _) = crate::cluster::share_of_search(
                        worker,
                        &mut control,
                        &role,
                        workers,
                        &files,
                        &sought,
                    );
                    let mut told = told.lock().expect("lock");
                    let before = match *told {
                        Some(Followed::Searched(before)) => before,
                        _ => 0,
                    };
                    *told = Some(Followed::Searched(before + n));
                }
                Some(Order::Stream(start)) => {
                    *told.lock().expect("lock") = Some(Followed::Stream(start))
                }
                Some(Order::Cut) => {
                    crate::cluster::share_of_cut(worker, &mut control, workers, part.as_deref());
                    *told.lock().expect("lock") = Some(Followed::Cut);
                }
                Some(Order::Done(error)) => {
                    *told.lock().expect("lock") = Some(Followed::Done(error))
                }
                None => {
                    *told.lock().expect("lock") = Some(Followed::Done(Some(RemoteError::failed(
                        "the coordinator sent this worker no order",
                    ))))
                }
            }
        })
        .map_err(RunError::Runtime)?;
    for result in guards.join() {
        result.map_err(RunError::Runtime)?;
    }
    // As after a process's own last hot-window generation: what the dataflow freed is handed
    // back once the command is over, and kept for the next run until then.
    let done = done.lock().expect("lock").take();
    if matches!(done, Some(Followed::Done(_))) {
        crate::memory::release_free_memory();
    }
    // No other word from round 0: it was a generation.
    let ran = state.get();
    Ok(done.unwrap_or(Followed::Generation {
        batch: ran.is_some_and(|shared| shared.batch),
        // Seeded from its own sources' keys only when the run went through: a follower that
        // failed may have sent empty or partial seeds (and the run stopped at its report).
        seeded: ran.is_some_and(|shared| {
            shared.keyed_in_run.is_some() && shared.state.lock().expect("lock").errors.is_empty()
        }),
    }))
}

/// A follower's state for a generation the coordinator planned. What it cannot read goes on its
/// errors (reported at the first epoch's report, which stops the whole run there).
fn follower_shared(
    warehouse: &Warehouse,
    cluster: &crate::cluster::Cluster,
    workers: usize,
    job: &Json,
    part: Option<&dyn crate::cluster::StreamPart>,
) -> Shared {
    let mut errors = Vec::new();
    let mut job: Job = job.decode().unwrap_or_else(|e| {
        // Then nothing to run: the first report says why, and the run stops there.
        errors.push(RunError::Runtime(e));
        Job::default()
    });
    // A stream's ranges this process cut are ingested from the messages it holds.
    let mine = cluster.process * workers..(cluster.process + 1) * workers;
    for epoch in &mut job.epochs {
        for source in epoch
            .by_worker
            .get_mut(mine.clone())
            .into_iter()
            .flatten()
            .flatten()
        {
            source.inline = part.and_then(|p| p.messages(&source.content_hash));
            if source.inline.is_none() && source.label.starts_with(crate::stream::SOURCE_PREFIX) {
                errors.push(RunError::Refused(format!(
                    "process {} does not hold the messages of {} (it was restarted since it \
                     cut them): run every process of the stream again",
                    cluster.process, source.label
                )));
            }
        }
    }
    let tombstones = Tombstones::open(&warehouse.tombstones_path()).unwrap_or_else(|e| {
        errors.push(RunError::from(e));
        Tombstones::default()
    });
    let journal = CommitJournal::follow(warehouse.root(), &warehouse.journal_path())
        .unwrap_or_else(|e| {
            errors.push(RunError::from(e));
            CommitJournal::empty(warehouse.root(), &warehouse.journal_path())
        });
    if errors.is_empty() && job.version != env!("CARGO_PKG_VERSION") {
        errors.push(RunError::Refused(format!(
            "this process runs adsmetrics {}, the coordinator {}: every process of a cluster must \
             run the same build",
            env!("CARGO_PKG_VERSION"),
            job.version
        )));
    }
    if errors.is_empty() && journal.bytes_read() != job.journal_bytes {
        errors.push(RunError::Refused(format!(
            "the commit journal at {} is {} bytes here and {} bytes on the coordinator: every \
             process needs the same warehouse (one directory on a filesystem all of them see)",
            warehouse.journal_path().display(),
            journal.bytes_read(),
            job.journal_bytes
        )));
    }
    let published = Arc::new(journal.published().clone());
    Shared {
        warehouse: warehouse.clone(),
        run_id: job.run_id,
        started_at_us: job.started_at_us,
        ledger_anchor: job.ledger_anchor,
        tombstones,
        horizons: job.horizons,
        rebuild: match job.rebuild_files {
            Some((files, days)) => Rebuild::Files(files, days),
            None => Rebuild::Rows(std::sync::OnceLock::new()),
        },
        keyed_in_run: job.keyed_in_run.map(|scope| KeyedInRun {
            scope,
            committed: Vec::new(),
        }),
        columns: Mutex::default(),
        predecoded: Mutex::default(),
        partition_of: job.partition_of,
        progress_in_sources: job.progress_in_sources,
        progress_events_before: 0,
        gate: false,
        tamper: job.tamper,
        threads: workers.max(2),
        epochs: job.epochs,
        hourly_layout: job.hourly_layout,
        barrier: Barrier::new(workers),
        batch: job.batch,
        cluster: Some(Role {
            cluster: cluster.clone(),
            workers,
            job: None,
            journal: Some(Mutex::new(journal)),
        }),
        progress: ProgressBar::hidden(),
        state: Mutex::new(SharedState {
            published,
            errors,
            ..Default::default()
        }),
    }
}

/// Cluster mode, once this process's workers have staged `epoch`: the followers report what they
/// staged and ingested to worker 0, which publishes it all as one epoch; then everyone hears how
/// it went, so every process stops at the same epoch when anything failed.
fn publish_in_cluster(
    worker: &mut timely::worker::Worker,
    control: &mut Control,
    shared: &Shared,
    epoch: u64,
) {
    let Some(role) = &shared.cluster else {
        return;
    };
    let index = worker.index();
    let reports_for_process = role.local(index) == 0 && !role.cluster.is_coordinator();
    let out = if reports_for_process {
        // What this process wrote is on disk before worker 0 commits an epoch that names it (it
        // syncs only its own filesystem view).
        let synced = sync_filesystem(shared.warehouse.root());
        let mut state = shared.state.lock().expect("lock");
        if let Err(e) = synced {
            state.errors.push(RunError::Runtime(format!(
                "could not sync {}: {e}",
                shared.warehouse.root().display()
            )));
        }
        let position = shared.progress.position();
        let progress = position - state.progress_reported;
        state.progress_reported = position;
        let report = Report {
            process: role.cluster.process,
            progress,
            changes: std::mem::take(&mut state.changes),
            sources: std::mem::take(&mut state.sources),
            summary: std::mem::take(&mut state.summary),
            errors: state.errors.drain(..).map(|e| e.remote()).collect(),
            written: std::mem::take(&mut state.written),
            removed_raw: std::mem::take(&mut state.removed_raw),
            side_files: std::mem::take(&mut state.side_files),
        };
        vec![(0, Message::Report(Json::encode(&report)))]
    } else {
        Vec::new()
    };
    let mut reports: Vec<Report> = control
        .round(worker, out)
        .into_iter()
        .filter_map(|m| match m {
            Message::Report(report) => Some(report.decode().unwrap_or_else(|e| Report {
                errors: vec![RemoteError::failed(e)],
                ..Report::default()
            })),
            _ => None,
        })
        .collect();
    let mut outcome = Vec::new();
    if index == 0 {
        reports.sort_by_key(|r| r.process);
        {
            let mut state = shared.state.lock().expect("lock");
            let heard: BTreeSet<usize> = reports.iter().map(|r| r.process).collect();
            let silent: Vec<usize> = (1..role.cluster.processes)
                .filter(|p| !heard.contains(p))
                .collect();
            if !silent.is_empty() {
                state
                    .errors
                    .push(RunError::Cluster(RemoteError::failed(format!(
                        "process(es) {silent:?} sent no report of epoch {epoch}: they are not \
                     running this plan (another build, or a plan they could not read)"
                    ))));
            }
            for report in reports {
                shared.progress.inc(report.progress);
                state.changes.extend(report.changes);
                state.sources.extend(report.sources);
                state.summary.absorb(&report.summary);
                for e in report.errors {
                    let process = format!("process {}", report.process);
                    state.errors.push(RunError::Cluster(e.context(process)));
                }
                state.add_written(report.written);
                state.removed_raw.extend(report.removed_raw);
                state.side_files.extend(report.side_files);
            }
        }
        publish(shared, epoch);
        let errors: Vec<RemoteError> = shared
            .state
            .lock()
            .expect("lock")
            .errors
            .iter()
            .map(RunError::remote)
            .collect();
        outcome = (role.workers..worker.peers())
            .step_by(role.workers)
            .map(|to| (to, Message::Outcome(errors.clone())))
            .collect();
    }
    let heard = control.round(worker, outcome);
    if reports_for_process {
        let mut state = shared.state.lock().expect("lock");
        for message in heard {
            if let Message::Outcome(errors) = message {
                state
                    .errors
                    .extend(errors.into_iter().map(RunError::Cluster));
            }
        }
        if let Some(journal) = &role.journal {
            let mut journal = journal.lock().expect("lock");
            if let Err(e) = journal.catch_up() {
                // The other processes go on to the next epoch: stopping only this one's workers
                // would leave them waiting; a lost peer stops them all.
                eprintln!("error: process {}: {e}", role.cluster.process);
                std::process::exit(i32::from(crate::cluster::EXIT_PEER_LOST));
            }
            state.published = Arc::new(journal.published().clone());
        }
    }
}

/// A run's epochs on a worker's `pipeline`, the run's epoch `k` at dataflow time `base + k`
/// (the pipeline's input is at `base`). With `seeded` (a keyed run), the partitions the worker's
/// mirror has been given their published rows for (a batch run's have left the mirror once
/// staged: `stage_touched`), and the mirror ignores the rebuild (epoch 0).
/// Returns the conflicted keys the run found.
fn run_epochs(
    worker: &mut timely::worker::Worker,
    pipeline: &mut Pipeline,
    mut seeded: Option<&mut BTreeSet<PartitionId>>,
    shared: &Shared,
    base: u64,
    mut control: Option<&mut Control>,
) -> i64 {
    let index = worker.index();
    let peers = worker.peers();
    // Its index among its process's workers.
    let local = shared
        .cluster
        .as_ref()
        .map_or(index, |role| role.local(index));
    // A keyed rebuild's rows are the coordinator's alone, fed by its workers; found in the run,
    // by its worker 0, which feeds them all (see `seed_in_run`).
    let (feed_index, feed_peers) = match &shared.cluster {
        Some(_) if shared.keyed_in_run.is_some() => (0, 1),
        Some(role) => (local, role.workers),
        None => (index, peers),
    };
    let conflicted_before = pipeline.conflicted_keys.get();
    if seeded.is_some() {
        pipeline.ignore_before(base + 1);
    }
    // A run that rebuilds whole days: the weeks it has seeded (see `seed_week`).
    let mut weeks = seeded.is_none().then(BTreeSet::new);

    for epoch in 0..=shared.epochs.len() as u64 {
        let started = Instant::now();
        if let (0, Rebuild::Rows(rows)) = (epoch, &shared.rebuild) {
            // A keyed rebuild publishes nothing (the mirror ignores epoch 0), so epoch 1 starts
            // at once: the dataflow digests the rebuilt state while the first sources are read.
            let rows = match rows.get() {
                Some(rows) if shared.keyed_in_run.is_none() || index == 0 => rows.as_slice(),
                _ => &[],
            };
            let fed = feed_rows(rows, feed_index, feed_peers, worker, pipeline);
            pipeline.input.advance_to(base + 1);
            pipeline.input.flush();
            let mut state = shared.state.lock().expect("lock");
            state.summary.rehydrated_rows += fed;
            if index == 0 {
                state.summary.epochs += 1;
            }
            continue;
        }
        // A follower that could not set up (see `follower_shared`) writes nothing; it still takes
        // every step and round, and its first report stops the run.
        let failed =
            shared.cluster.is_some() && !shared.state.lock().expect("lock").errors.is_empty();
        let (fed, computed, staged) = std::thread::scope(|scope| {
            let (local, writing) = if failed {
                (Ok(()), None)
            } else if epoch == 0 {
                let files = match &shared.rebuild {
                    Rebuild::Files(files, _) => files.as_slice(),
                    Rebuild::Rows(_) => &[],
                };
                let read = read_raw(shared, files, 1, index, peers, worker, pipeline)
                    .map(|rows| shared.state.lock().expect("lock").summary.rehydrated_rows += rows);
                (read, None)
            } else {
                // Withdrawn sources leave in the same epoch as their replacements arrive, so the
                // dataflow sees (and publishes) only the difference.
                let plan = &shared.epochs[epoch as usize - 1];
                let retracted = if !plan.retract.is_empty() {
                    read_raw(shared, &plan.retract, -1, index, peers, worker, pipeline)
                } else {
                    Ok(0)
                };
                match retracted.and_then(|rows| {
                    shared.state.lock().expect("lock").summary.retracted_rows += rows;
                    let workers = shared.cluster.as_ref().map_or(peers, |role| role.workers);
                    // After an error (this process's) the epoch will not publish: none more.
                    let sources = || {
                        let failed = !shared.state.lock().expect("lock").errors.is_empty();
                        if failed {
                            return None;
                        }
                        plan.take_source(index, workers)
                    };
                    ingest_sources(shared, sources, worker, pipeline, scope)
                }) {
                    Ok(writing) => (Ok(()), writing),
                    Err(e) => (Err(e), None),
                }
            };
            pipeline.input.advance_to(base + epoch + 1);
            pipeline.input.flush();
            let fed = started.elapsed();
            pipeline.complete(worker, base + epoch + 1);
            let computed = started.elapsed();
            // The last source's files are written meanwhile; they must be on disk before the
            // publish names their source (and the publish syncs the filesystem to make sure).
            let staged = local.and_then(|()| {
                if failed {
                    return Ok(Vec::new());
                }
                let emptied = match (epoch, &shared.rebuild) {
                    (0, Rebuild::Files(_, days)) => published_in_days(shared, days, index, peers),
                    _ => Vec::new(),
                };
                stage_touched(
                    shared,
                    pipeline,
                    seeded.as_deref_mut(),
                    weeks.as_mut(),
                    emptied,
                    peers,
                )
            });
            let staged = join_writing(writing).and(staged);
            (fed, computed, staged)
        });
        tracing::info!(worker = index, epoch, ?fed, ?computed, staged = ?started.elapsed(), "epoch done on worker");
        {
            let mut state = shared.state.lock().expect("lock");
            match staged {
                Ok(changes) => state.changes.extend(changes),
                Err(e) => state.errors.push(e),
            }
        }
        shared.barrier.wait();
        if local == 0 {
            stage_side_tables(shared);
        }
        match control.as_deref_mut() {
            Some(control) => publish_in_cluster(worker, control, shared, epoch),
            None if index == 0 => publish(shared, epoch),
            None => {}
        }
        shared.barrier.wait();
        if !shared.state.lock().expect("lock").errors.is_empty() {
            break;
        }
    }
    let conflicted = pipeline.conflicted_keys.get() - conflicted_before;
    match (control, &shared.cluster) {
        // Worker 0 counts the followers' in with its own.
        (Some(control), Some(role)) if !role.cluster.is_coordinator() => {
            control.round(worker, vec![(0, Message::Conflicted(conflicted))]);
            0
        }
        (Some(control), Some(_)) => {
            let heard = control.round(worker, Vec::new());
            conflicted
                + heard
                    .iter()
                    .map(|m| match m {
                        Message::Conflicted(n) => *n,
                        _ => 0,
                    })
                    .sum::<i64>()
        }
        _ => conflicted,
    }
}

/// Feeds this worker's share of `rows` to the dataflow (+1 each). Returns the rows fed.
fn feed_rows(
    rows: &[(DedupKey, EventVersion)],
    index: usize,
    peers: usize,
    worker: &mut timely::worker::Worker,
    pipeline: &mut Pipeline,
) -> u64 {
    let mut fed = 0u64;
    for row in rows.iter().skip(index).step_by(peers) {
        pipeline.input.update(*row, 1);
        fed += 1;
        if fed.is_multiple_of(1 << 16) {
            drain_input(worker, pipeline);
        }
    }
    drain_input(worker, pipeline);
    fed
}

/// Logs what a keyed rebuild found, of `committed` raw files, since `started`.
fn log_keyed_state(state: &rehydrate::KeyedState, committed: usize, started: Instant) {
    tracing::info!(
        rows = state.rows.len(),
        files_scanned = state.files_scanned,
        files_decoded = state.files_decoded,
        rounds = state.rounds,
        of = committed,
        took = ?started.elapsed(),
        "rehydration by key"
    );
}

/// A cluster's keyed rebuild found in the run ([`KeyedInRun`]), before its epochs: every worker
/// decodes its share of the sources (kept, by content hash, for whichever of its process's
/// workers takes them in their epoch, up to its part of
/// [`rehydrate::KEEP_DECODED_EVENTS`]) and reads its share of the withdrawn raw files (read
/// again when its epoch retracts them), and sends their [`rehydrate::Seeds`] to worker 0, which
/// finds the rebuild's rows (and feeds them all) while every other worker goes on to its
/// epochs. A source that cannot be read goes on the worker's errors, as do seeds missing from a
/// worker, and stop the run at its first publish: the other workers may have written their
/// epoch's raw files by then, which no run reads (their sources are not committed) and the next
/// one writes again.
fn seed_in_run(worker: &mut timely::worker::Worker, control: &mut Control, shared: &Shared) {
    let (Some(in_run), Some(role)) = (&shared.keyed_in_run, &shared.cluster) else {
        return;
    };
    let started = Instant::now();
    let index = worker.index();
    // A follower that could not set up (see `follower_shared`) reads nothing; it still sends
    // its (empty) seeds, so that the round completes and its first report stops the run.
    let set_up = shared.state.lock().expect("lock").errors.is_empty();
    let epochs: &[EpochPlan] = if set_up { &shared.epochs } else { &[] };
    let mut seeds = rehydrate::Seeds::default();
    let mut kept = 0;
    let sources = epochs
        .iter()
        .filter_map(|plan| plan.by_worker.get(index))
        .flatten();
    for source in sources {
        let decoded = match source.decode(1) {
            Ok(decoded) => decoded,
            Err(e) => {
                shared.state.lock().expect("lock").errors.push(e.into());
                continue;
            }
        };
        let keyed: Vec<_> = decoded.events.iter().map(Event::keyed_version).collect();
        seeds.add(&keyed, &in_run.scope, &shared.horizons, &shared.tombstones);
        kept += keyed.len();
        if kept <= rehydrate::KEEP_DECODED_EVENTS / role.workers {
            let mut predecoded = shared.predecoded.lock().expect("lock");
            predecoded.insert(source.content_hash.clone(), (decoded, keyed));
        }
    }
    // Its share of the raw files the run withdraws (as its epochs read them).
    let withdrawn = epochs
        .iter()
        .flat_map(|plan| plan.retract.iter().skip(index).step_by(worker.peers()));
    for path in withdrawn {
        match rehydrate::raw_file_rows(path) {
            Ok(rows) => seeds.add_withdrawn(&rows, &in_run.scope, &shared.tombstones),
            Err(e) => shared.state.lock().expect("lock").errors.push(e.into()),
        }
    }
    seeds.finish();
    tracing::debug!(took = ?started.elapsed(), keys = seeds.keys.len(), "seeds of this worker's sources");
    let heard = control.round(worker, vec![(0, Message::Seeds(seeds))]);
    if index == 0 {
        let mut remote = Vec::with_capacity(heard.len());
        let mut out_of_step = Vec::new();
        for message in heard {
            match message {
                Message::Seeds(seeds) => remote.push(seeds),
                // A follower that is not running this round (another build) sent its report.
                Message::Report(report) => out_of_step.extend(
                    report
                        .decode::<Report>()
                        .map(|r| r.errors)
                        .unwrap_or_else(|e| vec![RemoteError::failed(e)]),
                ),
                _ => {}
            }
        }
        if remote.len() != worker.peers() {
            // Rows found from part of the keys would be wrong: the run must not publish.
            let mut state = shared.state.lock().expect("lock");
            state
                .errors
                .extend(out_of_step.into_iter().map(RunError::Cluster));
            state
                .errors
                .push(RunError::Cluster(RemoteError::failed(format!(
                    "{} of {} workers sent the keys of their sources for the keyed rebuild: the \
                 others are not running this plan (another build, or a plan they could not read)",
                    remote.len(),
                    worker.peers()
                ))));
        }
        let no_days = BTreeSet::new();
        let changes = scope::Changes {
            committed: &in_run.committed,
            new_sources: &[],
            retract: &[],
            extra_days: &no_days,
            tombstones: &shared.tombstones,
            horizons: &shared.horizons,
        };
        let mut columns = shared.columns.lock().expect("lock");
        let found = rehydrate::keyed_state(
            &shared.warehouse,
            &changes,
            role.workers,
            columns.as_mut(),
            None,
            &remote,
        );
        drop(columns);
        let mut state = shared.state.lock().expect("lock");
        match found {
            Ok(found) => {
                log_keyed_state(&found, in_run.committed.len(), started);
                state.summary.rehydrated_files = found.files_decoded;
                if let Rebuild::Rows(rows) = &shared.rebuild {
                    let _ = rows.set(found.rows);
                }
            }
            Err(e) => state.errors.push(e.into()),
        }
    }
}

/// Hands what was just fed to the dataflow, so input does not pile up in channel buffers (a
/// whole epoch of updates, waiting for the first step, was gigabytes at ten million events).
fn drain_input(worker: &mut timely::worker::Worker, pipeline: &mut Pipeline) {
    pipeline.input.flush();
    worker.step();
}

/// Feeds this worker's share of the raw files `paths` to the dataflow with difference `diff`
/// (+1 to rehydrate, -1 to retract), skipping deleted keys. Returns the rows fed.
fn read_raw(
    shared: &Shared,
    paths: &[PathBuf],
    diff: isize,
    index: usize,
    peers: usize,
    worker: &mut timely::worker::Worker,
    pipeline: &mut Pipeline,
) -> Result<u64, RunError> {
    let mut rows = 0u64;
    for path in paths.iter().skip(index).step_by(peers) {
        for keyed in rehydrate::raw_file_rows(path)? {
            if !shared.tombstones.contains(&keyed.0) {
                pipeline.input.update(keyed, diff);
                rows += 1;
            }
        }
        drain_input(worker, pipeline);
    }
    Ok(rows)
}

/// A source's files being written on a helper thread while its worker steps the dataflow.
type Writing<'scope> = std::thread::ScopedJoinHandle<'scope, Result<(), RunError>>;

/// Waits for a source's files to be written.
fn join_writing(writing: Option<Writing<'_>>) -> Result<(), RunError> {
    match writing {
        Some(handle) => handle
            .join()
            .unwrap_or_else(|_| Err(RunError::Runtime("a raw-layer writer panicked".into()))),
        None => Ok(()),
    }
}

/// Decodes the sources this worker takes (`take_source`, until `None`) and feeds them to the
/// dataflow, and writes each one's raw files (and hands on its late and quarantine rows): the
/// last one's on a thread of `scope`, returned to be joined once the dataflow has the epoch.
fn ingest_sources<'scope, 'env>(
    shared: &'env Shared,
    mut take_source: impl FnMut() -> Option<&'env SourceFile>,
    worker: &mut timely::worker::Worker,
    pipeline: &mut Pipeline,
    scope: &'scope std::thread::Scope<'scope, 'env>,
) -> Result<Option<Writing<'scope>>, RunError> {
    // What earlier epochs published: events into these partitions arrive late.
    let published = shared.state.lock().expect("lock").published.clone();
    let mut writing = None;
    let mut next = take_source();
    while let Some(source) = next {
        let predecoded = shared
            .predecoded
            .lock()
            .expect("lock")
            .remove(&source.content_hash);
        let (mut decoded, mut keyed) = match predecoded {
            Some(decoded) => decoded,
            None => (source.decode(1)?, Vec::new()),
        };
        if shared.horizons.raw_day.is_some() {
            refuse_expired(&shared.horizons, &source.label, Arc::make_mut(&mut decoded));
            keyed.clear();
        }
        if keyed.len() != decoded.events.len() {
            keyed = decoded.events.iter().map(Event::keyed_version).collect();
        }

        // A source contributes each key at most once: its greatest version.
        let mut best: HashMap<DedupKey, usize, BuildFastHasher> =
            HashMap::with_capacity_and_hasher(keyed.len(), BuildFastHasher::default());
        let mut duplicates = 0u64;
        for (i, (key, version)) in keyed.iter().enumerate() {
            match best.entry(*key) {
                std::collections::hash_map::Entry::Occupied(mut slot) => {
                    duplicates += 1;
                    if *version > keyed[*slot.get()].1 {
                        slot.insert(i);
                    }
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        // In source order: deterministic, and it reads the events front to back. Deleted keys
        // never come back, however old the source that still holds them.
        let mut winners: Vec<usize> = best.into_values().collect();
        let before_tombstones = winners.len();
        if !shared.tombstones.is_empty() {
            winners.retain(|&i| !shared.tombstones.contains(&keyed[i].0));
        }
        let tombstoned = (before_tombstones - winners.len()) as u64;
        winners.sort_unstable();
        // Into the dataflow first: the other workers get their share of the keys at this step
        // and work on it while the files are written. (Nothing is published before the files
        // are written and synced.)
        for &i in &winners {
            pipeline.input.update(keyed[i], 1);
        }
        drain_input(worker, pipeline);
        tracing::debug!("decoded and fed");
        let published = published.clone();
        // Taken before this one is written, to know whether this is the worker's last.
        next = take_source();
        let last = next.is_none();
        let write = move || {
            let accepted: Vec<(DedupKey, &Event)> = winners
                .iter()
                .map(|&i| (keyed[i].0, &decoded.events[i]))
                .collect();
            let counts = SourceCounts {
                quarantined: &decoded.quarantined,
                duplicates,
                tombstoned,
            };
            write_source(shared, source, &published, &accepted, counts)?;
            if last {
                // A head start for the publish's sync, while the dataflow computes (a failure
                // here is that sync's to report).
                if let Err(e) = sync_filesystem(shared.warehouse.root()) {
                    tracing::warn!(error = %e, "early flush of the raw layer failed");
                }
            }
            Ok(())
        };
        // The last source's files are written beside the dataflow's work on the epoch; the
        // others here, between sources (the workers are busy then, and more threads than cores
        // only made a long load slower).
        if last {
            writing = Some(scope.spawn(write));
        } else {
            write()?;
        }
    }
    Ok(writing)
}

/// What a source's in-source dedup and tombstones left out.
struct SourceCounts<'a> {
    quarantined: &'a [crate::event::Quarantined],
    duplicates: u64,
    tombstoned: u64,
}

/// Writes a source's accepted events to the raw layer, adds its late arrivals and quarantined
/// records to the process's side rows (staged as a file when there are many), and counts it in
/// the run's summary.
fn write_source(
    shared: &Shared,
    source: &SourceFile,
    published: &BTreeMap<PartitionId, Published>,
    accepted: &[(DedupKey, &Event)],
    counts: SourceCounts<'_>,
) -> Result<(), RunError> {
    let SourceCounts {
        quarantined,
        duplicates,
        tombstoned,
    } = counts;
    let raw::RawWritten {
        rows: written,
        files,
        removed,
    } = raw::write_source(
        &shared.warehouse,
        &source.label,
        &source.content_hash,
        accepted,
        shared
            .hourly_layout
            .get(&source.content_hash)
            .map_or(&[], Vec::as_slice),
    )?;
    tracing::debug!("raw written");
    let late = late_events(published, accepted);
    let late_written: u64 = late.values().sum();
    let mut written_days: BTreeMap<i64, (Vec<PathBuf>, Vec<u64>)> = BTreeMap::new();
    for (day, path) in files {
        written_days.entry(day).or_default().0.push(path);
    }
    // A source has a handful of producers and three event types: a short list beats a map.
    let mut by_kind: Vec<((EventType, &str), u64)> = Vec::new();
    for (key, event) in accepted {
        let kind = (event.event_type, event.producer.as_str());
        match by_kind.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => by_kind.push((kind, 1)),
        }
        let day = event
            .event_time_us
            .div_euclid(adsmetrics_dataflows::MICROS_PER_DAY);
        written_days
            .entry(day)
            .or_default()
            .1
            .push(crate::keyindex::prefix(key.0.get()));
    }

    let record = SourceRecord {
        source: source.label.clone(),
        content_hash: source.content_hash.clone(),
        accepted: accepted.len() as u64,
        quarantined: quarantined.len() as u64,
        in_source_duplicates: duplicates,
        tombstoned,
        partition: shared.partition_of.get(&source.content_hash).cloned(),
    };
    shared.progress.inc(if shared.progress_in_sources {
        1
    } else {
        source.bytes
    });
    let mut state = shared.state.lock().expect("lock");
    let s = &mut state.summary;
    s.sources_ingested += 1;
    s.events_accepted += record.accepted;
    for ((event_type, producer), n) in by_kind {
        *s.accepted_by_kind
            .entry((event_type.as_str().to_string(), producer.to_string()))
            .or_default() += n;
    }
    s.in_source_duplicates += duplicates;
    s.quarantined += record.quarantined;
    s.raw_rows_written += written;
    s.late_events += late_written;
    s.tombstoned += tombstoned;
    let (events, secs) = (
        s.events_accepted + shared.progress_events_before,
        shared.progress.elapsed().as_secs_f64().max(1e-3),
    );
    shared.progress.set_message(format!(
        "{events} events, {:.0} events/s",
        events as f64 / secs
    ));
    state.sources.push(record);
    state.add_written(written_days);
    state.removed_raw.extend(removed);
    let side = &mut state.side;
    if !late.is_empty() {
        side.late.push(late::SourceLateness {
            source: source.label.clone(),
            source_hash: source.content_hash.clone(),
            late,
        });
    }
    for q in quarantined {
        side.quarantine_bytes += q.raw.len() + q.source.len() + q.position.len() + q.reason.len();
        side.quarantine
            .push((source.content_hash.clone(), q.clone()));
    }
    if side.quarantine_bytes > QUARANTINE_SPILL_BYTES {
        let mut spilled = std::mem::take(&mut side.quarantine);
        side.quarantine_bytes = 0;
        drop(state);
        let staged =
            quarantine::stage_quarantine(&shared.warehouse, &mut spilled, shared.started_at_us)?;
        shared.state.lock().expect("lock").side_files.extend(staged);
    }
    Ok(())
}

/// Stages the side-table rows this process's sources brought in the epoch, one file per table,
/// for the epoch's publish (through the coordinator's, in a cluster). Called by the process's
/// first worker once all its workers have handed in their sources.
fn stage_side_tables(shared: &Shared) {
    let mut side = {
        let mut state = shared.state.lock().expect("lock");
        if !state.errors.is_empty() {
            // The epoch will not publish: its sources are ingested again by the next run.
            state.side = SideRows::default();
            return;
        }
        std::mem::take(&mut state.side)
    };
    let at = shared.started_at_us;
    let staged = quarantine::stage_quarantine(&shared.warehouse, &mut side.quarantine, at)
        .and_then(|q| {
            Ok(q.into_iter()
                .chain(late::stage_late(&shared.warehouse, &mut side.late, at)?))
        });
    let mut state = shared.state.lock().expect("lock");
    match staged {
        Ok(files) => state.side_files.extend(files),
        Err(e) => state.errors.push(e.into()),
    }
}

/// Moves events of days past the raw retention horizon to quarantine, with the reason.
fn refuse_expired(horizons: &Horizons, source: &str, decoded: &mut crate::decode::Decoded) {
    let events = std::mem::take(&mut decoded.events);
    for (i, event) in events.into_iter().enumerate() {
        let day = event
            .event_time_us
            .div_euclid(adsmetrics_dataflows::MICROS_PER_DAY);
        match crate::retention::refusal(horizons, day) {
            None => decoded.events.push(event),
            Some(reason) => decoded.quarantined.push(crate::event::Quarantined {
                source: source.to_string(),
                position: format!("event {i}"),
                raw: serde_json::json!({
                    "event_id": event.event_id.as_deref(),
                    "event_type": event.event_type.as_str(),
                    "event_time": event.event_time_us,
                    "ad_id": event.ad_id,
                    "campaign_id": event.campaign_id,
                    "advertiser_id": event.advertiser_id,
                    "country": event.country.as_str(),
                    "user_id": event.user_id,
                    "ip": event.ip.as_str(),
                    "cost_micros": event.cost_micros,
                    "revenue_micros": event.revenue_micros,
                    "producer": event.producer.as_str(),
                    "revision": event.revision,
                })
                .to_string()
                .into_bytes(),
                reason,
            }),
        }
    }
}

/// Per already-published partition, how many of `accepted` fall into it (each event into its
/// hour's and its day's partition, a click also into its hour of `ads_clicks_minute`).
fn late_events(
    published: &BTreeMap<PartitionId, Published>,
    accepted: &[(DedupKey, &Event)],
) -> BTreeMap<PartitionId, u64> {
    let mut late = BTreeMap::new();
    if published.is_empty() {
        return late;
    }
    // Sources are mostly ordered by time: look each hour up once per run of events in it.
    let mut last: Option<(i64, [Option<PartitionId>; 3])> = None;
    for (_, event) in accepted {
        let hour = event
            .event_time_us
            .div_euclid(adsmetrics_dataflows::MICROS_PER_HOUR);
        let ids = match last {
            Some((h, ids)) if h == hour => ids,
            _ => {
                let ids =
                    PartitionId::of_hour(hour).map(|id| published.contains_key(&id).then_some(id));
                last = Some((hour, ids));
                ids
            }
        };
        let click = event.event_type == EventType::Click;
        for id in ids.into_iter().flatten() {
            if id.grain != Grain::Minute || click {
                *late.entry(id).or_insert(0) += 1;
            }
        }
    }
    late
}

/// The published partitions of the event `days` that this worker's mirror holds: after a
/// whole-day rebuild, those the rebuilt rows did not touch have no rows any more (or, a week,
/// only its other days').
fn published_in_days(
    shared: &Shared,
    days: &BTreeSet<i64>,
    index: usize,
    peers: usize,
) -> Vec<PartitionId> {
    let published = shared.state.lock().expect("lock").published.clone();
    published
        .keys()
        .filter(|id| id.days().any(|d| days.contains(&d)) && id.worker(peers) == index)
        .copied()
        .collect()
}

/// How many cells [`stage_touched`] reads back at a time, about (some 64 bytes each while held).
const STAGE_CELLS: usize = 1 << 18;

/// Stages every partition this worker's mirror saw change whose version differs from the
/// published one. With `seeded` (a keyed run), a partition touched for the first time first gets
/// its published rows; with `weeks` (a run that rebuilds whole days), a week touched for the
/// first time first gets its other days' (`seed_week`).
///
/// A batch run ([`Shared::batch`]) stages each partition once and then drops its pipeline: its
/// partitions' published rows are read lot by lot as they are staged, and each staged partition
/// leaves the mirror, so that a correction touching every day holds a lot's rows at a time, not
/// every touched partition's. A run of several epochs or a stream's session keeps them seeded
/// in the mirror for its next epoch.
fn stage_touched(
    shared: &Shared,
    pipeline: &Pipeline,
    seeded: Option<&mut BTreeSet<PartitionId>>,
    weeks: Option<&mut BTreeSet<PartitionId>>,
    also: Vec<PartitionId>,
    threads: usize,
) -> Result<Vec<PartitionChange>, RunError> {
    let published = shared.state.lock().expect("lock").published.clone();
    let mut touched = pipeline.mirror.borrow_mut().take_touched();
    touched.extend(also);
    touched.sort();
    touched.dedup();
    // Partitions published before and first touched now get their published rows first.
    let once = shared.batch;
    let to_seed: Vec<(PartitionId, &Published)> = match seeded {
        // A partition a batch run staged has left the mirror with its published rows: staged
        // again, it would be staged from its changes alone. A batch run stages once.
        Some(seeded) if once && touched.iter().any(|id| seeded.contains(id)) => {
            return Err(RunError::Runtime(
                "a batch run staged its partitions twice".into(),
            ));
        }
        Some(seeded) => touched
            .iter()
            .filter(|id| seeded.insert(**id))
            .filter_map(|id| published.get(id).map(|current| (*id, current)))
            .collect(),
        None => Vec::new(),
    };
    let mut read_when_staged: HashMap<PartitionId, &Published> = HashMap::new();
    if once {
        read_when_staged.extend(to_seed);
    } else {
        // A few at a time: the rows read are held until seeded.
        for chunk in to_seed.chunks(4 * threads.max(1)) {
            let seeds = rehydrate::par_map(chunk, threads, |(id, current)| {
                read_published(&shared.warehouse, id, current)
            })?;
            for ((id, _), rows) in chunk.iter().zip(seeds) {
                pipeline.mirror.borrow_mut().seed(id, &rows);
            }
        }
    }
    if let Some(weeks) = weeks {
        for id in touched.iter().filter(|id| id.grain == Grain::Weekly) {
            if weeks.insert(*id) {
                seed_week(shared, pipeline, id, &published)?;
            }
        }
    }
    // Read back and written on `threads` threads, largest first (one worker may own a week's
    // or a correction's daily partitions while the others are done), as many at a time as
    // [`STAGE_CELLS`] allows: each partition's rows are held until all of its lot are written.
    let mut sized: Vec<(usize, PartitionId)> = {
        let mirror = pipeline.mirror.borrow();
        let unread = |id| read_when_staged.get(id).map_or(0, |p| p.rows as usize);
        touched
            .iter()
            .map(|id| (mirror.cells(id) + unread(id), *id))
            .collect()
    };
    sized.sort_by(|a, b| b.cmp(a));
    let mut changes = Vec::new();
    let mut unchanged = 0;
    let mut rest = sized.as_slice();
    while !rest.is_empty() {
        let mut cells = 0;
        let take = rest
            .iter()
            .take_while(|(n, _)| {
                cells += n;
                cells <= STAGE_CELLS
            })
            .count()
            .max(1);
        let (lot, after) = rest.split_at(take);
        rest = after;
        // Each partition's rows are read on the thread that encodes them (the mirror is only
        // read meanwhile), then folded into the mirror here, or dropped with it.
        let reading = pipeline.mirror.borrow();
        let mirror = &*reading;
        let staged = rehydrate::par_map(lot, threads, |(_, id)| {
            let rows = match read_when_staged.get(id) {
                Some(current) => {
                    mirror.rows_seeded(id, &read_published(&shared.warehouse, id, current)?)?
                }
                None => mirror.rows(id)?,
            };
            let tampered;
            let published_rows = match (shared.tamper, rows.split_first()) {
                (true, Some(((dims, first), rest))) => {
                    let mut first = *first;
                    first.clicks += 1;
                    tampered = std::iter::once((*dims, first))
                        .chain(rest.iter().copied())
                        .collect::<Vec<_>>();
                    &tampered
                }
                _ => &rows,
            };
            let change = stage_partition(&shared.warehouse, id, published_rows, published.get(id))?;
            Ok::<_, RunError>(((!once).then_some(rows), change))
        })?;
        drop(reading);
        for ((_, id), (rows, change)) in lot.iter().zip(staged) {
            let mut mirror = pipeline.mirror.borrow_mut();
            match rows {
                Some(rows) => mirror.settled(id, &rows),
                None => mirror.forget(id),
            }
            match change {
                Some(change) => changes.push(change),
                None => unchanged += 1,
            }
        }
    }
    shared
        .state
        .lock()
        .expect("lock")
        .summary
        .partitions_unchanged += unchanged;
    Ok(changes)
}

/// Keeps a gated epoch's staged files and findings under `_adsmetrics/gated/<run>-e<epoch>/`
/// (staging is cleared by the next writer's start), and says so.
fn hold_gated(
    shared: &Shared,
    epoch: u64,
    changes: &[PartitionChange],
    side_files: &[SideFile],
    findings: &[crate::check::Finding],
) -> RunError {
    let dir = shared
        .warehouse
        .meta_dir()
        .join("gated")
        .join(format!("{}-e{epoch}", shared.run_id));
    // The report first, then each file on its own: one that cannot be moved is logged and
    // left (the held sources are not consumed, so a rerun reads them again), not the end of
    // the others.
    let report = serde_json::json!({
        "run_id": shared.run_id,
        "epoch": epoch,
        "findings": findings,
        "changes": changes,
        "side_files": side_files,
    });
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            dir.join("findings.json"),
            serde_json::to_vec_pretty(&report).unwrap_or_default(),
        )
    });
    if let Err(e) = written {
        tracing::warn!(error = %e, dir = %dir.display(), "could not keep the gated epoch's report");
    }
    let staged = changes
        .iter()
        .filter_map(|c| c.staged.as_ref())
        .filter_map(|staged| {
            let name = Path::new(staged).file_name()?;
            Some((staged.as_str(), dir.join(name)))
        });
    // The side tables' rows of the held sources, under their destination paths (a quarantine
    // and a late_arrivals file can share a name).
    let side = side_files
        .iter()
        .map(|f| (f.staged.as_str(), dir.join(&f.dest)));
    for (from, to) in staged.chain(side) {
        let moved = to
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::rename(shared.warehouse.root().join(from), &to));
        if let Err(e) = moved {
            tracing::warn!(error = %e, file = from, to = %to.display(), "could not keep a gated file");
        }
    }
    let first = findings
        .first()
        .map(|f| format!("{} {:?}", f.partition, f.problem))
        .unwrap_or_default();
    RunError::Gated {
        count: findings.len(),
        first,
        dir: dir
            .strip_prefix(shared.warehouse.root())
            .unwrap_or(&dir)
            .display()
            .to_string(),
    }
}

/// In a run that rebuilds whole days (or adds days never published), a week's cells in the
/// mirror are the sums of the run's days of it only, whole. So before the run first stages the
/// week, the mirror gets the published daily rows of the week's other days: what they contribute.
/// Sums are linear, so the week comes out exact (it has no distinct users to get wrong), whether
/// or not the week was published before (a warehouse older than the weekly table).
fn seed_week(
    shared: &Shared,
    pipeline: &Pipeline,
    week: &PartitionId,
    published: &BTreeMap<PartitionId, Published>,
) -> Result<(), RunError> {
    let rebuilt = match &shared.rebuild {
        Rebuild::Files(_, days) => days,
        Rebuild::Rows(_) => return Ok(()),
    };
    for day in week.days().filter(|d| !rebuilt.contains(d)) {
        let id = PartitionId {
            grain: Grain::Daily,
            period: day,
        };
        if let Some(current) = published.get(&id) {
            let rows: Vec<(Dims, MetricRow)> = read_published(&shared.warehouse, &id, current)?
                .into_iter()
                .map(|(dims, row)| {
                    let row = MetricRow {
                        unique_users: 0,
                        ..row
                    };
                    (dims, row)
                })
                .collect();
            pipeline.mirror.borrow_mut().seed(week, &rows);
        }
    }
    Ok(())
}

/// The rows of a published partition, checked against the version the journal has for it.
fn read_published(
    warehouse: &Warehouse,
    id: &PartitionId,
    current: &Published,
) -> Result<Vec<(Dims, MetricRow)>, RunError> {
    crate::sink::curated::read_published(&warehouse.partition_file(id), id, &current.version)
        .map_err(|e| RunError::Published(e.to_string()))
}

/// Worker 0, between the barriers: publishes what all workers staged for `epoch`, with the
/// epoch's retired and adopted sources, so a replaced source partition leaves in the same
/// publish its replacement arrives in.
fn publish(shared: &Shared, epoch: u64) {
    let mut guard = shared.state.lock().expect("lock");
    let state = &mut *guard;
    state.summary.epochs += 1;
    if !state.errors.is_empty() {
        return;
    }
    let mut sources = std::mem::take(&mut state.sources);
    let mut side_files = std::mem::take(&mut state.side_files);
    side_files.sort_by(|a, b| a.dest.cmp(&b.dest));
    let retired = match epoch
        .checked_sub(1)
        .and_then(|i| shared.epochs.get(i as usize))
    {
        Some(plan) => {
            sources.extend(plan.adopt.iter().cloned());
            plan.retired.clone()
        }
        None => Vec::new(),
    };
    sources.sort_by(|a, b| a.source.cmp(&b.source));
    // In partition order, whichever worker staged what when (the gate's findings follow it).
    let mut changes = std::mem::take(&mut state.changes);
    changes.sort_by_key(|c| c.partition);
    if sources.is_empty() && changes.is_empty() && retired.is_empty() {
        return;
    }
    let published = changes.len() as u64;
    if epoch == 0 && published > 0 {
        // Rebuilding complete days reproduces what is published, unless something was deleted
        // (tombstones) since; anything else here is worth a look.
        tracing::warn!(
            partitions = published,
            "rebuilding state changed published partitions (expected only after a delete, or in a reprocess of a bad build's output)"
        );
    }
    let fail = state.fail_point.take();
    let Some(journal) = state.journal.as_mut() else {
        return;
    };
    if shared.gate && !changes.is_empty() {
        // The raw layer as it will be once this publish commits.
        let mut consumed = journal.consumed().clone();
        consumed.extend(sources.iter().map(|s| s.content_hash.clone()));
        for r in retired.iter().filter(|r| r.rows_withdrawn) {
            consumed.remove(&r.content_hash);
        }
        match crate::check::gate(&shared.warehouse, &consumed, &changes, shared.threads) {
            Ok(findings) if findings.is_empty() => {}
            Ok(findings) => {
                let error = hold_gated(shared, epoch, &changes, &side_files, &findings);
                state.errors.push(error);
                return;
            }
            Err(e) => {
                state.errors.push(RunError::Refused(format!(
                    "publish gate could not run: {e}"
                )));
                return;
            }
        }
    }
    match publish_epoch(
        journal,
        &shared.warehouse,
        PublishOrigin {
            run_id: &shared.run_id,
            run_key: shared.warehouse.run_key(),
            epoch,
            ledger: Some(shared.ledger_anchor.clone()),
            retired,
            side_files,
        },
        sources,
        changes,
        fail,
    ) {
        Ok(_) => {
            state.published = Arc::new(journal.published().clone());
            state.summary.partitions_published += published;
        }
        Err(e) => state.errors.push(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::HeldBy;

    fn source(n: u64, held_by: Option<usize>) -> SourceFile {
        SourceFile {
            path: PathBuf::from(format!("in/s{n}.parquet")),
            label: format!("in/s{n}.parquet"),
            content_hash: format!("{n:032x}"),
            bytes: 1_000 + (n * 389) % 700,
            inline: None,
            held_by: held_by.map(|process| Arc::new(HeldBy { process })),
        }
    }

    /// Each process's workers, taking from their queue on threads of their own, ingest exactly
    /// the sources `assign` gave that process (those another process holds included), each once
    /// and each worker largest first; a copy of a plan (a follower's, the job's) starts with
    /// none taken.
    #[test]
    fn a_process_s_workers_take_each_of_its_sources_once() {
        let (workers, processes) = (2, 2);
        let sources: Vec<SourceFile> = (0..41)
            .map(|n| source(n, [Some(1), Some(0), None, None][n as usize % 4]))
            .collect();
        let plan = assign(&sources, workers, processes);
        let mut all = Vec::new();
        for process in 0..processes {
            let plan = plan.clone();
            let given: BTreeSet<&str> = plan.by_worker[process * workers..][..workers]
                .iter()
                .flatten()
                .map(|s| s.label.as_str())
                .collect();
            let taken: Vec<Vec<&SourceFile>> = std::thread::scope(|scope| {
                let threads: Vec<_> = (0..workers)
                    .map(|local| {
                        let plan = &plan;
                        scope.spawn(move || {
                            let mut mine = Vec::new();
                            while let Some(s) = plan.take_source(process * workers + local, workers)
                            {
                                mine.push(s);
                            }
                            mine
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            for mine in &taken {
                assert!(mine.windows(2).all(|w| w[0].bytes >= w[1].bytes));
            }
            let labels: Vec<&str> = taken.iter().flatten().map(|s| s.label.as_str()).collect();
            assert_eq!(labels.len(), given.len(), "each source once");
            assert_eq!(labels.iter().copied().collect::<BTreeSet<_>>(), given);
            for s in taken.iter().flatten() {
                assert!(s.held_by.as_ref().is_none_or(|h| h.process == process));
            }
            all.extend(labels.into_iter().map(str::to_owned));
        }
        all.sort();
        let mut expected: Vec<String> = sources.iter().map(|s| s.label.clone()).collect();
        expected.sort();
        assert_eq!(all, expected, "every source in some process");
    }
}
