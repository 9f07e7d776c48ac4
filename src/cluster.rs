//! Cluster mode: one run on several processes, as a timely cluster (`--processes N --process
//! I --hostfile F --workers W`, timely's `-n -p -h -w`), the dataflow exchanging rows by key over
//! TCP between them. Every process runs the same command with its own `--process`. The processes
//! connect to each other themselves ([`Cluster::connect`]) and hand timely the sockets.
//!
//! ```text
//!  process 0, the coordinator                        processes 1..N, the followers
//!  writer lock, recovery, the input files listed     wait for the coordinator
//!  ── timely cluster: every worker builds the control dataflow, then both pipelines ──
//!  round 0: identify these files ────────────────▶  hash every N-th
//!  round 1: ◀──────────────────────── (index, content hash, size) of each
//!  the plan (as alone, from the identified files)
//!  ── the next timely cluster, one per hot-window generation ──
//!  round 0: the plan ─────────────────────────────▶  a run state of their own from it
//!  a keyed rebuild: every worker decodes its share of the new sources (input files, or the
//!     stream ranges its process cut; kept for its process's epochs) and reads its share of the
//!     raw files the run withdraws, and sends their keys and the user-days that may have raw
//!     rows ─▶ worker 0, which finds and feeds the rebuild's rows while every other worker
//!     starts its epochs
//!  every epoch: each process the sources `assign` gave its workers (by global worker index),
//!     which they take from one queue, largest first; every worker its share of the raw files
//!     to rebuild or retract; the dataflow exchanges by key; each curated partition has one
//!     writer in the cluster (its mirror's worker), which stages it
//!  report round: each follower's staged changes, sources, counts, progress, errors (with
//!     their exit class) ─▶ worker 0
//!  worker 0 publishes (journal, renames) ─▶ outcome round: errors ─▶ every follower,
//!     which catches its read-only view of the journal up
//!  end of the run: conflicted-key counts ─▶ worker 0; the coordinator's ledger entry
//!  end of the command: round 0 of one last cluster says "done" (and the error, if any, with
//!     its class: every process exits with the code the coordinator exits with)
//! ```
//!
//! Commands: `ingest`, `backfill`, `reprocess`, `delete` (whose search of the raw layer, in up to
//! two rounds of [`Order::Search`] — for the keys, then for the files that hold them — and
//! rebuild run on the cluster; rewriting the raw files that held the events is the
//! coordinator's) and `stream` (each process reads its share of the Kafka
//! partitions; two more kinds of round, [`Order::Stream`] and [`Order::Cut`]: see
//! [`crate::stream::cluster`]).
//!
//! The journal is the cluster's one commit point, written by worker 0 only: a follower never
//! takes the writer lock, never writes the journal or the ledger, and publishes nothing itself.
//! The warehouse must be the same directory (path) on every process: one filesystem, or a
//! shared mount. A process that loses a peer stops at once (exit 70): what was published
//! stays, what was staged is cleared by the next writer, and running every process again
//! converges to the same tables (the journal skips what was committed).

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use timely::dataflow::operators::{Exchange, Input, Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

use crate::runtime::RunError;
use crate::source::SourceFile;

/// The exit code of a process that lost the connection to another process of its cluster.
pub const EXIT_PEER_LOST: u8 = 70;

/// Opens every connection between the processes of a cluster ([`Cluster::connect`]).
/// (03: the keyed rebuild's seeds and a delete's search rounds; a process of an older build is
/// refused as it connects.)
const HELLO: u64 = u64::from_be_bytes(*b"adsmcl03");

/// The exit code of a process whose cluster's processes were started with settings that cannot
/// run together (another `--workers`, or one runs `stream` and another a batch command):
/// `EX_CONFIG`, not worth retrying as it is.
pub const EXIT_MISCONFIGURED: u8 = 78;

/// What a cluster runs: a batch command's followers and a stream's take different orders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Job {
    /// `ingest`, `backfill`, `reprocess` or `delete`.
    #[default]
    Batch,
    /// `stream`.
    Stream,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Batch => "a batch command (ingest, backfill, reprocess or delete)",
            Job::Stream => "stream",
        }
    }
}

/// What each process says first on a connection it opens, and the accepting process answers:
/// the protocol, and the settings every process of a cluster must share. Two processes that
/// differ in them cannot run together (timely's exchange panics on a peer with another number
/// of workers), so they stop at once and say why.
///
/// Process 0 referees: every other process connects to it first, and it answers only once it
/// has heard them all, naming in `refusing` one that cannot run with it, if any: then every
/// process stops, not only the pair that met (the others would wait for the ones that stopped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    processes: u64,
    process: u64,
    workers: u64,
    job: Job,
    /// In process 0's answer: a process it refused.
    refusing: Option<u64>,
}

impl Hello {
    const LEN: usize = 48;

    fn bytes(&self) -> [u8; Hello::LEN] {
        let mut bytes = [0u8; Hello::LEN];
        bytes[..8].copy_from_slice(&HELLO.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.processes.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.process.to_be_bytes());
        bytes[24..32].copy_from_slice(&self.workers.to_be_bytes());
        bytes[32] = self.job as u8;
        bytes[40..].copy_from_slice(&self.refusing.unwrap_or(u64::MAX).to_be_bytes());
        bytes
    }

    /// Answers `stream` with this hello, and `refusing`.
    fn answer(&self, stream: &mut std::net::TcpStream, refusing: Option<u64>) -> bool {
        use std::io::Write;
        let answer = Hello { refusing, ..*self };
        match stream.write_all(&answer.bytes()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "a process that said hello is gone");
                false
            }
        }
    }

    /// The hello `stream` says next, if it says one of this protocol.
    fn read(stream: &mut std::net::TcpStream) -> Option<Hello> {
        use std::io::Read;
        let mut said = [0u8; Hello::LEN];
        stream.read_exact(&mut said).ok()?;
        Hello::parse(&said)
    }

    /// `None` unless `bytes` are a hello of this protocol.
    fn parse(bytes: &[u8; Hello::LEN]) -> Option<Hello> {
        let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let job = match bytes[32] {
            0 => Job::Batch,
            1 => Job::Stream,
            _ => return None,
        };
        (word(0) == HELLO && bytes[33..40].iter().all(|b| *b == 0)).then_some(Hello {
            processes: word(8),
            process: word(16),
            workers: word(24),
            job,
            refusing: Some(word(40)).filter(|p| *p != u64::MAX),
        })
    }

    /// Why `theirs` (process `theirs.process`) cannot run with this process, if it cannot; or,
    /// in process 0's answer, why it refused another.
    fn mismatch(&self, theirs: &Hello) -> Option<String> {
        if let Some(refused) = theirs.refusing.filter(|p| *p != self.process) {
            return Some(format!(
                "process {refused} of the cluster cannot run with process {} (its output says \
                 which setting differs), so no process of the cluster runs. {SAME_SETTINGS}",
                theirs.process
            ));
        }
        let differs = if theirs.processes != self.processes {
            format!(
                "it runs --processes {}, this process --processes {}",
                theirs.processes, self.processes
            )
        } else if theirs.workers != self.workers {
            format!(
                "it runs --workers {}, this process --workers {}",
                theirs.workers, self.workers
            )
        } else if theirs.job != self.job {
            format!(
                "it runs {}, this process {}",
                theirs.job.name(),
                self.job.name()
            )
        } else {
            return None;
        };
        Some(format!(
            "process {} of the cluster cannot run with process {}: {differs}. {SAME_SETTINGS}",
            theirs.process, self.process
        ))
    }
}

/// How often a process retries connecting to another, and looks for connections to accept.
const POLL: Duration = Duration::from_millis(2);

/// What every refusal of [`Hello::mismatch`] advises.
const SAME_SETTINGS: &str =
    "Start every process with the same command, --processes and --workers (only --process differs)";

/// The first port of the default addresses (`127.0.0.1:2101`, `:2102`, …), as timely's.
const DEFAULT_PORT: u16 = 2101;

/// How long the coordinator waits for the followers at a cluster start once they have finished
/// a run with it (at most `--connect-timeout`): a follower is back within milliseconds of each
/// run's end, so one that is not has stopped, and the coordinator stops too (exit 70) rather
/// than wait the whole `--connect-timeout` (10 minutes by default) between two generations or
/// two epochs.
pub const REJOIN_WAIT: Duration = Duration::from_secs(30);

/// Where this process is in a cluster of processes.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Processes in the cluster.
    pub processes: usize,
    /// This process's index, `0..processes`; 0 is the coordinator.
    pub process: usize,
    /// `host:port` of every process, in process order.
    pub addresses: Vec<String>,
    /// How long to wait for the other processes to connect, each time the cluster starts.
    pub connect_timeout: Duration,
    /// What the cluster runs (every process must run the same).
    pub job: Job,
    /// The followers have finished a run with this coordinator and wait for its next one, so
    /// a start waits at most [`REJOIN_WAIT`] for them (shared by this process's copies).
    followers_back: Arc<AtomicBool>,
}

impl PartialEq for Cluster {
    fn eq(&self, other: &Self) -> bool {
        (
            self.processes,
            self.process,
            &self.addresses,
            self.connect_timeout,
            self.job,
        ) == (
            other.processes,
            other.process,
            &other.addresses,
            other.connect_timeout,
            other.job,
        )
    }
}

impl Eq for Cluster {}

impl Cluster {
    /// Process `process` of `processes`, at the addresses of `hostfile` (one `host:port` per
    /// line, in process order; blank lines and `#` comments skipped) or, without one, at
    /// `127.0.0.1:2101`, `:2102`, …. `None` for a cluster of one process.
    pub fn new(
        processes: usize,
        process: usize,
        hostfile: Option<&Path>,
        connect_timeout: Duration,
    ) -> Result<Option<Self>, String> {
        if processes == 0 {
            return Err("--processes must be at least 1".into());
        }
        if process >= processes {
            return Err(format!(
                "--process {process} is not one of 0..{processes} (--processes {processes})"
            ));
        }
        let addresses: Vec<String> = match hostfile {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("--hostfile {}: {e}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_string)
                .collect(),
            None => (0..processes)
                .map(|i| format!("127.0.0.1:{}", DEFAULT_PORT as usize + i))
                .collect(),
        };
        if addresses.len() < processes {
            return Err(format!(
                "--hostfile has {} addresses, --processes {processes} needs one per process",
                addresses.len()
            ));
        }
        if let Some(bad) = addresses.iter().find(|a| {
            a.rsplit_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        }) {
            return Err(format!("--hostfile: {bad:?} is not host:port"));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = addresses[..processes].iter().find(|a| !seen.insert(*a)) {
            return Err(format!("--hostfile: {twice} is given twice"));
        }
        if processes == 1 {
            return Ok(None);
        }
        Ok(Some(Cluster {
            processes,
            process,
            addresses: addresses.into_iter().take(processes).collect(),
            connect_timeout,
            job: Job::Batch,
            followers_back: Arc::default(),
        }))
    }

    /// The same cluster, running `job`.
    pub fn running(self, job: Job) -> Self {
        Cluster { job, ..self }
    }

    /// Whether this process is the coordinator (process 0: plans, publishes, keeps the ledger).
    pub fn is_coordinator(&self) -> bool {
        self.process == 0
    }

    /// Tells the coordinator that every follower has finished a run with it and is waiting for
    /// the next (true after every order but a stream's start, after which a follower first sets
    /// up its consumer): from now on a start waits at most [`REJOIN_WAIT`] for them.
    pub(crate) fn followers_are_back(&self) {
        if self.is_coordinator() {
            self.followers_back.store(true, Ordering::Relaxed);
        }
    }

    /// Starts this process's `workers` timely workers running `work`, once the cluster's
    /// processes have connected; a process left waiting longer than
    /// [`Cluster::connect_timeout`] stops (exit [`EXIT_PEER_LOST`]) rather than wait forever,
    /// and a coordinator whose followers are back after a run ([`Cluster::followers_are_back`])
    /// waits at most [`REJOIN_WAIT`].
    pub(crate) fn execute<T, F>(
        &self,
        workers: usize,
        work: F,
    ) -> Result<timely::communication::WorkerGuards<T>, String>
    where
        T: Send + 'static,
        F: Fn(&mut Worker) -> T + Send + Sync + 'static,
    {
        let (connected, waiting) = std::sync::mpsc::channel::<()>();
        let rejoin = self.followers_back.load(Ordering::Relaxed);
        let timeout = match rejoin {
            true => self.connect_timeout.min(REJOIN_WAIT),
            false => self.connect_timeout,
        };
        let (process, addresses) = (self.process, self.addresses.clone());
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = waiting.recv_timeout(timeout) {
                if rejoin {
                    eprintln!(
                        "error: process {process}: a follower of the cluster ({}) did not come \
                         back for the next run within {}s of the last: it has stopped. What was \
                         published stays published; run every process again to finish",
                        addresses.join(", "),
                        timeout.as_secs()
                    );
                } else {
                    eprintln!(
                        "error: process {process}: the other processes of the cluster ({}) did \
                         not connect within {}s: is every process running, with the same \
                         --processes, --hostfile and --workers? (--connect-timeout)",
                        addresses.join(", "),
                        timeout.as_secs()
                    );
                }
                std::process::exit(i32::from(EXIT_PEER_LOST));
            }
        });
        let sockets = self.connect(workers);
        let _ = connected.send(());
        if let Err(e) = &sockets {
            if e.kind() == std::io::ErrorKind::InvalidData {
                eprintln!("error: {e}");
                std::process::exit(i32::from(EXIT_MISCONFIGURED));
            }
        }
        let joined = |e: std::io::Error| {
            format!(
                "process {} could not join the cluster at {}: {e}",
                self.process, self.addresses[self.process]
            )
        };
        // As timely's own cluster configuration builds it, from the connected sockets.
        use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
        use timely::communication::allocator::ProcessBuilder;
        let hooks = timely::communication::Hooks::default();
        let local =
            ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
        let (builders, guard) = initialize_networking_from_sockets(
            local,
            sockets.map_err(joined)?,
            self.process,
            workers,
            hooks,
        )
        .map_err(joined)?;
        timely::execute::execute_from(
            builders
                .into_iter()
                .map(timely::communication::AllocatorBuilder::Tcp)
                .collect(),
            Box::new(guard),
            timely::WorkerConfig::default(),
            work,
        )
    }

    /// A TCP connection to every other process of the cluster, at index `p` for process `p`
    /// (`None` at this one's): this process connects to every lower-numbered one and accepts
    /// every higher-numbered one. The connecting process opens with its [`Hello`] and the
    /// accepting one answers with its own; a process whose settings differ (another
    /// `--processes`, `--workers` or job) is an `InvalidData` error on every process (process 0
    /// referees: see [`Hello`]), saying which.
    ///
    /// What timely's cluster configuration does, but polling every 2 ms: timely's sleeps a
    /// second between attempts on both sides, which a cluster that starts a timely run per
    /// generation, and a stream two per epoch, paid at every start (and it printed every retry).
    fn connect(&self, workers: usize) -> std::io::Result<Vec<Option<std::net::TcpStream>>> {
        use std::net::{TcpListener, TcpStream};
        let (processes, me) = (self.processes, self.process);
        let mine = Hello {
            processes: processes as u64,
            process: me as u64,
            workers: workers as u64,
            job: self.job,
            refusing: None,
        };
        let listener = TcpListener::bind(&self.addresses[me])?;
        listener.set_nonblocking(true)?;
        // Set when this process gives up joining, so that the thread accepting stops too.
        let abandoned = Arc::new(AtomicBool::new(false));
        let stop = abandoned.clone();
        let accepting = std::thread::spawn(move || -> std::io::Result<Vec<(usize, TcpStream)>> {
            let mut heard: Vec<(Hello, TcpStream)> = Vec::new();
            while heard.len() < processes - me - 1 {
                if stop.load(Ordering::Relaxed) {
                    return Ok(Vec::new());
                }
                let mut stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(POLL);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                // A connection that is not a higher process of this cluster saying hello within
                // a second (a port scan, another program, a process connected already) is
                // dropped, and the wait goes on for the real one.
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                let theirs = Hello::read(&mut stream).filter(|h| {
                    // Of another size: heard, so that both say why.
                    h.processes != processes as u64
                        || ((me as u64 + 1..processes as u64).contains(&h.process)
                            && heard.iter().all(|(q, _)| q.process != h.process))
                });
                let Some(theirs) = theirs else {
                    tracing::warn!(
                        peer = ?stream.peer_addr().ok(),
                        "dropped a connection that is not another process of this cluster"
                    );
                    continue;
                };
                // Answered in any case, so that a process that cannot run with this one
                // learns why as this one does; process 0 answers once it has heard every one.
                if me != 0 {
                    if !mine.answer(&mut stream, None) {
                        continue;
                    }
                    if let Some(why) = mine.mismatch(&theirs) {
                        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
                    }
                }
                heard.push((theirs, stream));
            }
            if me == 0 {
                // Every other process heard (the others checked each one as it came).
                let refused = heard
                    .iter()
                    .find_map(|(h, _)| mine.mismatch(h).map(|why| (h.process, why)));
                let refusing = refused.as_ref().map(|(process, _)| *process);
                for (_, stream) in &mut heard {
                    mine.answer(stream, refusing);
                }
                if let Some((_, why)) = refused {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
                }
            }
            let mut accepted = Vec::new();
            for (h, stream) in heard {
                stream.set_read_timeout(None)?;
                accepted.push((h.process as usize, stream));
            }
            Ok(accepted)
        });
        let connected = self.connect_lower(&mine);
        if connected.is_err() {
            abandoned.store(true, Ordering::Relaxed);
        }
        let mut sockets = connected?;
        let accepted = accepting
            .join()
            .map_err(|_| std::io::Error::other("the thread accepting connections panicked"))??;
        for (index, stream) in accepted {
            sockets[index] = Some(stream);
        }
        Ok(sockets)
    }

    /// The connections this process opens: to every lower-numbered process, each opened with
    /// `mine` and answered (see [`Hello`]), at index `p` for process `p`.
    fn connect_lower(&self, mine: &Hello) -> std::io::Result<Vec<Option<std::net::TcpStream>>> {
        use std::io::Write;
        use std::net::TcpStream;
        let me = self.process;
        let mut sockets: Vec<Option<TcpStream>> = (0..self.processes).map(|_| None).collect();
        for (index, address) in self.addresses.iter().enumerate().take(me) {
            let mut stream = loop {
                match TcpStream::connect(address) {
                    Ok(stream) => break stream,
                    // Not listening yet (between two of its runs, or not started): again soon.
                    Err(_) => std::thread::sleep(POLL),
                }
            };
            stream.set_nodelay(true)?;
            stream.write_all(&mine.bytes())?;
            let theirs = Hello::read(&mut stream)
                .filter(|h| h.processes != mine.processes || h.process == index as u64);
            let Some(theirs) = theirs else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    format!(
                        "process {index} at {address} did not answer as process {index} of this \
                         cluster: it stopped, or it runs another build, or another process is \
                         there as process {me}"
                    ),
                ));
            };
            if let Some(why) = mine.mismatch(&theirs) {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
            }
            sockets[index] = Some(stream);
        }
        Ok(sockets)
    }
}

/// How an error ends a command, so that every process of a cluster exits as the process that
/// failed would have alone (an orchestrator retries exit 75, and a held-back publish is 12 on
/// every process, not only on the one that published).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitClass {
    /// Any other failure (exit 1).
    #[default]
    Failed,
    /// The writer lock was busy past the wait, or the publish was fenced (exit 75).
    Temporary,
    /// The publish gate held an epoch back (exit 12).
    Gated,
}

/// An error of another process of the cluster: its message as it said it, and its class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// The error as the process that had it printed it.
    pub message: String,
    /// How it ends the command.
    pub class: ExitClass,
}

impl RemoteError {
    /// An error that ends the command with exit 1.
    pub fn failed(message: impl Into<String>) -> Self {
        RemoteError {
            message: message.into(),
            class: ExitClass::Failed,
        }
    }

    /// The same error, its message prefixed with `context` (which process, which role).
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        RemoteError {
            message: format!("{context}: {}", self.message),
            ..self
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What the coordinator tells the cluster at round 0 of each timely run: run this, or stop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Order {
    /// Run a planned generation (a [`crate::runtime::Job`]).
    Run(Json),
    /// Identify these input files ([`identify`]): each process hashes its share.
    Identify(Vec<PathBuf>),
    /// A stream starts ([`crate::stream`]): the partitions, the positions and the ranges to cut
    /// again, for every process to take its share.
    Stream(Json),
    /// Cut the stream's next epoch ([`cut`]): each process what it has read of its partitions.
    Cut,
    /// Search these raw files for a delete ([`search`]): each process its share.
    Search(Vec<PathBuf>, crate::delete::Sought),
    /// The command is over: with the coordinator's error, if it failed.
    Done(Option<RemoteError>),
}

/// A message on the control dataflow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Message {
    /// Round 0: the coordinator's order.
    Order(Order),
    /// A follower's part of an epoch (a [`crate::runtime::Report`]), to worker 0.
    Report(Json),
    /// Worker 0's publish of an epoch: the run's errors so far (none: it published).
    Outcome(Vec<RemoteError>),
    /// A follower worker's conflicted keys at the end of a run.
    Conflicted(i64),
    /// A process's share of an [`Order::Identify`]: each file's index in the order's list and
    /// what it is, or why one could not be read.
    Identified(Result<Vec<(usize, SourceFile)>, String>),
    /// A process's cut of an [`Order::Cut`], or why it could not cut.
    Cut(Result<CutShare, String>),
    /// What a worker's share of a generation's new sources asks of its keyed rebuild, to
    /// worker 0 ([`crate::runtime`]'s `seed_in_run`).
    Seeds(crate::rehydrate::Seeds),
    /// A process's share of an [`Order::Search`]: each file with rows sought, by its index in
    /// the order's list, and their keys; or why a file could not be read.
    Searched(Result<Vec<(usize, Vec<adsmetrics_dataflows::DedupKey>)>, String>),
}

/// What one process cut of its share of a stream's partitions, for the coordinator to plan the
/// epoch: the sources (their messages stay with the process, whose workers ingest them and send
/// the keyed rebuild their keys, in the run), and whether the process is idle.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CutShare {
    /// The process.
    pub process: usize,
    /// Its ranges' sources, one per partition it read from.
    pub sources: Vec<CutSource>,
    /// Nothing is left buffered, no message came for the stream's `--until-idle`, and every
    /// partition of its share is read to its log end.
    pub idle: bool,
}

/// One range of a Kafka partition as cut by the process that read it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CutSource {
    /// Its identity (label, content hash, bytes), without its messages (the workers of the
    /// process that holds them send the keyed rebuild their keys, in the run).
    pub source: SourceFile,
    /// The Kafka timestamp of each message that has one, ms (for the ingest-to-visible latency).
    pub times_ms: Vec<i64>,
    /// Messages in the range.
    pub messages: u64,
}

/// One process's part of a stream in cluster mode: what its workers do at an [`Order::Cut`] and
/// when a run's plan names a range it cut.
pub trait StreamPart: Send + Sync {
    /// Cuts this process's next epoch (waiting, when it is cutting again a crashed epoch's
    /// ranges, until they are complete) and keeps its messages for the run that ingests it.
    fn cut(&self) -> Result<CutShare, String>;
    /// The messages of a range this process cut, by content hash.
    fn messages(&self, content_hash: &str) -> Option<Arc<crate::decode::Decoded>>;
}

/// A value as JSON, inside a control message. Timely encodes its messages with bincode, which
/// cannot read back what serde leaves out (the journal's records skip empty fields), so what the
/// journal's types make up travels as JSON: the format they are written in anyway.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Json(Vec<u8>);

impl Json {
    pub(crate) fn encode<T: Serialize>(value: &T) -> Self {
        Json(serde_json::to_vec(value).expect("control messages serialize to JSON"))
    }

    pub(crate) fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.0).map_err(|e| format!("a control message: {e}"))
    }
}

/// A tiny dataflow beside the pipeline that carries the cluster's control messages, a round at
/// a time: every worker takes part in every round (a barrier of the whole cluster), and gets the
/// messages sent to it in that round. Built on every worker, before the pipelines.
///
/// A message carries its round: a worker that left round `r` may send its round `r + 1`
/// messages while this one is still stepping in round `r`, and they must wait for their round.
pub(crate) struct Control {
    input: InputHandleVec<u64, (u64, u64, Message)>,
    probe: ProbeHandle<u64>,
    /// Messages received, with their round.
    inbox: Rc<RefCell<Vec<(u64, Message)>>>,
    round: u64,
}

impl Control {
    pub(crate) fn build(worker: &mut Worker) -> Self {
        let mut input = InputHandleVec::new();
        let probe = ProbeHandle::new();
        let inbox = Rc::new(RefCell::new(Vec::new()));
        let sink = inbox.clone();
        worker.dataflow_named::<u64, _, _>("adsmetrics-control", |scope| {
            scope
                .input_from(&mut input)
                .exchange(|(to, _, _): &(u64, u64, Message)| *to)
                .inspect(move |(_, round, message): &(u64, u64, Message)| {
                    sink.borrow_mut().push((*round, message.clone()))
                })
                .probe_with(&probe);
        });
        Control {
            input,
            probe,
            inbox,
            round: 0,
        }
    }

    /// Round 0 of a timely run of the cluster: worker 0 sends `order` (the coordinator's, given
    /// there only) to every worker of the other processes, which have `workers` each; returns the
    /// order this worker received (a follower's).
    pub(crate) fn order(
        &mut self,
        worker: &mut Worker,
        workers: usize,
        order: Option<Order>,
    ) -> Option<Order> {
        let out = match order {
            Some(order) => (workers..worker.peers())
                .map(|to| (to, Message::Order(order.clone())))
                .collect(),
            None => Vec::new(),
        };
        self.round(worker, out).into_iter().find_map(|m| match m {
            Message::Order(order) => Some(order),
            _ => None,
        })
    }

    /// Sends `out` (`(worker index, message)`) and waits until every worker of the cluster has
    /// finished this round; returns the messages sent to this worker in it.
    pub(crate) fn round(
        &mut self,
        worker: &mut Worker,
        out: Vec<(usize, Message)>,
    ) -> Vec<Message> {
        let round = self.round;
        for (to, message) in out {
            self.input.send((to as u64, round, message));
        }
        self.round += 1;
        self.input.advance_to(self.round);
        let probe = self.probe.clone();
        worker.step_or_park_while(None, || probe.less_than(&(round + 1)));
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut *self.inbox.borrow_mut())
            .into_iter()
            .partition(|(r, _)| *r == round);
        *self.inbox.borrow_mut() = later;
        now.into_iter().map(|(_, message)| message).collect()
    }
}

/// Makes a lost peer, or any panic, stop this process (exit [`EXIT_PEER_LOST`]) with a message
/// saying what to do, rather than leave workers waiting forever: timely's network threads panic
/// when a connection breaks, and the workers would never hear of it; a worker that panics would
/// leave this process's other workers, and every other process, waiting for its next round.
pub fn stop_when_a_peer_is_lost() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("timely communication error") {
            eprintln!(
                "error: lost the connection to another process of the cluster ({message}); this \
                 process stops. What was published stays published; run every process of the \
                 cluster again to finish (already committed sources are skipped)"
            );
        } else {
            default(info);
            eprintln!(
                "error: a thread of this cluster process panicked (above); the process stops, and \
                 the other processes stop when they lose it. Run every process again to finish"
            );
        }
        std::process::exit(i32::from(EXIT_PEER_LOST));
    }));
}

/// The coordinator's last word at the end of a command: one more cluster round telling every
/// follower that the command is over, with its error if it failed.
pub fn release(
    cluster: &Cluster,
    workers: usize,
    error: Option<RemoteError>,
) -> Result<(), String> {
    announce(cluster, workers, Order::Done(error))
}

/// One cluster round in which the coordinator tells every follower `order`, and nothing else.
pub(crate) fn announce(cluster: &Cluster, workers: usize, order: Order) -> Result<(), String> {
    gather(cluster, workers, order, |_, _| Vec::new()).map(drop)
}

/// One timely run of the cluster in which worker 0 (the coordinator's) orders `order` at round
/// 0, as every follower's [`crate::runtime::follow_once`] expects, and then every worker of this
/// process does `answer` (the rounds that answer the order, such as [`share_of_cut`]). Returns
/// what `answer` returned on worker 0: the messages it heard.
fn gather<A>(
    cluster: &Cluster,
    workers: usize,
    order: Order,
    answer: A,
) -> Result<Vec<Message>, String>
where
    A: Fn(&mut Worker, &mut Control) -> Vec<Message> + Send + Sync + 'static,
{
    let starts_stream = matches!(order, Order::Stream(_));
    let guards = cluster.execute(workers, move |worker| {
        let mut control = Control::build(worker);
        let _pipelines = crate::runtime::ClusterPipelines::build(worker);
        control.order(
            worker,
            workers,
            (worker.index() == 0).then(|| order.clone()),
        );
        let heard = answer(worker, &mut control);
        (worker.index() == 0).then_some(heard)
    })?;
    let mut heard = Vec::new();
    for result in guards.join() {
        heard.extend(result?.into_iter().flatten());
    }
    if !starts_stream {
        cluster.followers_are_back();
    }
    Ok(heard)
}

/// What a follower did in one timely run of its cluster.
pub(crate) enum Followed {
    /// Ran a generation of the coordinator's plan, on the batch engine or not, and sent its
    /// keyed rebuild what its own sources ask of it (`seeded`) or not.
    Generation { batch: bool, seeded: bool },
    /// Hashed its share of the input files: this many.
    Identified(usize),
    /// Was told a stream starts, with this.
    Stream(Json),
    /// Cut its share of a stream's epoch.
    Cut,
    /// Searched its share of a delete's raw files: this many.
    Searched(usize),
    /// The command is over, with the coordinator's error if it failed.
    Done(Option<RemoteError>),
}

/// What a follower did in a command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowerWork {
    /// Generations of the coordinator's plan run.
    pub generations: u64,
    /// Of those, the ones on the batch engine.
    pub batch_engine_runs: u64,
    /// Of those, the ones whose keyed rebuild the coordinator found from what this process's
    /// workers sent of their own sources (the rest rebuilt nothing, or whole days).
    pub seeded: u64,
    /// Input files it identified (read and hashed) for the coordinator's plan.
    pub files_identified: u64,
    /// Raw files it searched for a delete.
    pub files_searched: u64,
}

/// A follower's whole command: runs every generation the coordinator orders, until it says the
/// command is over. Returns what it did, or the coordinator's error.
pub fn follow(
    warehouse: &crate::warehouse::Warehouse,
    cluster: &Cluster,
    workers: usize,
) -> Result<FollowerWork, RunError> {
    let mut work = FollowerWork::default();
    // As the coordinator's batch run: what one generation frees serves the next (a follower of a
    // stream lives on, and keeps glibc's own thresholds).
    crate::memory::keep_freed_memory();
    loop {
        match crate::runtime::follow_once(warehouse, cluster, workers, None)? {
            Followed::Generation { batch, seeded } => {
                work.generations += 1;
                work.batch_engine_runs += batch as u64;
                work.seeded += seeded as u64;
            }
            Followed::Identified(files) => work.files_identified += files as u64,
            Followed::Searched(files) => work.files_searched += files as u64,
            // Answered with an error already: this process runs no stream.
            Followed::Cut => {}
            Followed::Stream(_) => {
                return Err(RunError::Refused(
                    "the coordinator (process 0) runs `stream`, this process another command: \
                     run the same command on every process"
                        .into(),
                ))
            }
            Followed::Done(None) => return Ok(work),
            Followed::Done(Some(error)) => {
                return Err(RunError::Cluster(
                    error.context("the coordinator (process 0) failed"),
                ))
            }
        }
    }
}

/// The input files of a cluster run identified (content hash and size, as
/// [`crate::source::identify`], in the same order) by every process of the cluster: each reads
/// and hashes every `processes`-th file, on its `workers` threads, so that the coordinator does
/// not read every input byte itself before the run (the warehouse's filesystem, and so the
/// inputs, are shared). One cluster round, in which every process answers with
/// [`share_of_identify`].
pub fn identify(
    cluster: &Cluster,
    workers: usize,
    files: &[PathBuf],
) -> Result<Vec<SourceFile>, RunError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    // Paths travel between the processes as text (serde's), which a name that is not UTF-8
    // cannot be: refused here, before any process starts, rather than a panic in the exchange.
    if let Some(odd) = files.iter().find(|p| p.to_str().is_none()) {
        return Err(RunError::Refused(format!(
            "input file {} has a name that is not UTF-8: cluster mode sends file names between \
             the processes as text; rename it, or run in one process",
            odd.to_string_lossy()
        )));
    }
    let list = files.to_vec();
    let role = cluster.clone();
    let heard = gather(
        cluster,
        workers,
        Order::Identify(files.to_vec()),
        move |worker, control| share_of_identify(worker, control, &role, workers, &list).1,
    )
    .map_err(RunError::Runtime)?;
    let mut found: Vec<Option<SourceFile>> = vec![None; files.len()];
    for message in heard {
        match message {
            Message::Identified(Ok(files)) => {
                for (i, file) in files {
                    found[i] = Some(file);
                }
            }
            Message::Identified(Err(e)) => return Err(RunError::Cluster(RemoteError::failed(e))),
            _ => {}
        }
    }
    let missing = found.iter().filter(|f| f.is_none()).count();
    if missing > 0 {
        return Err(RunError::Cluster(RemoteError::failed(format!(
            "{missing} of {} input files were not identified by any process of the cluster",
            found.len()
        ))));
    }
    Ok(found.into_iter().flatten().collect())
}

/// Every process's part in the round after [`Order::Identify`], the coordinator's included: its
/// share of `files` identified on its `workers` threads ([`share_round`]), each with its index
/// in `files`, or why one could not be read. Returns the files this worker identified and what
/// it received (worker 0: every process's share).
pub(crate) fn share_of_identify(
    worker: &mut Worker,
    control: &mut Control,
    cluster: &Cluster,
    workers: usize,
    files: &[PathBuf],
) -> (usize, Vec<Message>) {
    share_round(worker, control, cluster, workers, files, |indices, mine| {
        let identified = crate::source::identify(mine, workers)
            .map(|identified| indices.into_iter().zip(identified).collect())
            .map_err(|e| format!("process {}: {e}", cluster.process));
        Message::Identified(identified)
    })
}

/// A round answering an order about `files`: the first worker of each process does `answer`
/// with its process's share of them (every `processes`-th, from its index: their indices in
/// `files`, and their paths) and sends what it makes to worker 0; the process's other workers
/// take part in the round and send nothing. Returns the files this worker took and what it
/// received (worker 0: every process's answer).
fn share_round(
    worker: &mut Worker,
    control: &mut Control,
    cluster: &Cluster,
    workers: usize,
    files: &[PathBuf],
    answer: impl FnOnce(Vec<usize>, &[PathBuf]) -> Message,
) -> (usize, Vec<Message>) {
    let (out, taken) = if worker.index().is_multiple_of(workers) {
        let (indices, mine): (Vec<usize>, Vec<PathBuf>) = files
            .iter()
            .enumerate()
            .skip(cluster.process)
            .step_by(cluster.processes)
            .map(|(i, path)| (i, path.clone()))
            .unzip();
        (vec![(0, answer(indices, &mine))], mine.len())
    } else {
        (Vec::new(), 0)
    };
    (taken, control.round(worker, out))
}

/// A delete's search of the raw layer ([`crate::delete::search`]) shared out over the processes
/// of the cluster: each searches every `processes`-th of `files` on its `workers` threads, in
/// one cluster round ([`share_of_search`]), so that no process reads the whole raw layer. Per
/// file, in order, the keys of its rows sought.
pub(crate) fn search(
    cluster: &Cluster,
    workers: usize,
    files: &[PathBuf],
    sought: &crate::delete::Sought,
) -> Result<Vec<Vec<adsmetrics_dataflows::DedupKey>>, RunError> {
    let mut found = vec![Vec::new(); files.len()];
    if files.is_empty() {
        return Ok(found);
    }
    let (list, what, role) = (files.to_vec(), sought.clone(), cluster.clone());
    let heard = gather(
        cluster,
        workers,
        Order::Search(files.to_vec(), sought.clone()),
        move |worker, control| share_of_search(worker, control, &role, workers, &list, &what).1,
    )
    .map_err(RunError::Runtime)?;
    let mut answered = 0;
    for message in heard {
        match message {
            Message::Searched(Ok(share)) => {
                answered += 1;
                for (i, keys) in share {
                    found[i] = keys;
                }
            }
            Message::Searched(Err(e)) => return Err(RunError::Cluster(RemoteError::failed(e))),
            _ => {}
        }
    }
    if answered != cluster.processes {
        return Err(RunError::Cluster(RemoteError::failed(format!(
            "{answered} of {} processes searched their share of the raw layer: the others run \
             another command",
            cluster.processes
        ))));
    }
    Ok(found)
}

/// Every process's part in the round after [`Order::Search`], the coordinator's included: its
/// share of `files` searched on its `workers` threads ([`share_round`]): the files with rows
/// sought, by index in `files`, and their keys. Returns the files this worker searched and what
/// it received (worker 0: every process's share).
pub(crate) fn share_of_search(
    worker: &mut Worker,
    control: &mut Control,
    cluster: &Cluster,
    workers: usize,
    files: &[PathBuf],
    sought: &crate::delete::Sought,
) -> (usize, Vec<Message>) {
    share_round(worker, control, cluster, workers, files, |indices, mine| {
        let found = crate::delete::search(mine, sought, workers)
            .map(|found| {
                indices
                    .into_iter()
                    .zip(found)
                    .filter(|(_, keys)| !keys.is_empty())
                    .collect()
            })
            .map_err(|e| format!("process {}: {e}", cluster.process));
        Message::Searched(found)
    })
}

/// The stream's next epoch, cut by every process of the cluster: one cluster round in which each
/// process's first worker cuts what it has read of its partitions ([`StreamPart::cut`], the
/// coordinator's `part` here) and sends it to worker 0. Every process's share, by process.
pub fn cut(
    cluster: &Cluster,
    workers: usize,
    part: Arc<dyn StreamPart>,
) -> Result<Vec<CutShare>, RunError> {
    let heard = gather(cluster, workers, Order::Cut, move |worker, control| {
        share_of_cut(worker, control, workers, Some(part.as_ref()))
    })
    .map_err(RunError::Runtime)?;
    let mut shares = Vec::new();
    for message in heard {
        match message {
            Message::Cut(Ok(share)) => shares.push(share),
            Message::Cut(Err(e)) => return Err(RunError::Cluster(RemoteError::failed(e))),
            _ => {}
        }
    }
    shares.sort_by_key(|s| s.process);
    // Each process once, by its index (a share's index places its sources on its workers).
    let processes: Vec<usize> = shares.iter().map(|s| s.process).collect();
    if processes != (0..cluster.processes).collect::<Vec<_>>() {
        return Err(RunError::Cluster(RemoteError::failed(format!(
            "processes {processes:?} cut their share of the epoch, not each of 0..{} once: the \
             others run another command",
            cluster.processes
        ))));
    }
    Ok(shares)
}

/// Every process's part in the round after [`Order::Cut`]: its first worker cuts the process's
/// share (or, with no `part`, says it runs no stream) and sends it to worker 0. Returns what this
/// worker received (worker 0: every process's share).
pub(crate) fn share_of_cut(
    worker: &mut Worker,
    control: &mut Control,
    workers: usize,
    part: Option<&dyn StreamPart>,
) -> Vec<Message> {
    let out = if worker.index().is_multiple_of(workers) {
        let cut = match part {
            Some(part) => part.cut(),
            None => Err(format!(
                "process {}: runs another command than `stream`: run the same command on every \
                 process",
                worker.index() / workers
            )),
        };
        vec![(0, Message::Cut(cut))]
    } else {
        Vec::new()
    };
    control.round(worker, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(1);

    #[cfg(unix)]
    #[test]
    fn an_input_file_whose_name_is_not_utf8_is_refused_before_the_cluster_starts() {
        use std::os::unix::ffi::OsStrExt;
        let two = Cluster::new(2, 0, None, WAIT).unwrap().unwrap();
        let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"in/part-\xff.parquet"));
        let e = identify(&two, 1, &[PathBuf::from("in/a.parquet"), odd]).unwrap_err();
        assert!(matches!(e, RunError::Refused(_)), "{e}");
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }

    /// A hostfile of `processes` free ports on 127.0.0.1 in `dir`, and the addresses.
    fn free_hostfile(dir: &Path, processes: usize) -> (PathBuf, Vec<String>) {
        let free: Vec<String> = (0..processes)
            .map(|_| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.local_addr().unwrap().to_string()
            })
            .collect();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, free.join("\n")).unwrap();
        (hosts, free)
    }

    /// Process `process` of a cluster of `processes` at the addresses of `hosts`.
    fn member(processes: usize, process: usize, hosts: &Path) -> Cluster {
        Cluster::new(processes, process, Some(hosts), WAIT)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn three_processes_connect_each_to_each_other_once() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let (hosts, _) = free_hostfile(dir.path(), 3);
        // Started in reverse order: the connecting side retries until the other listens.
        let connecting: Vec<_> = (0..3)
            .rev()
            .map(|process| {
                let cluster = member(3, process, &hosts);
                std::thread::spawn(move || cluster.connect(2).unwrap())
            })
            .collect();
        let mut sockets: Vec<Vec<Option<std::net::TcpStream>>> =
            connecting.into_iter().map(|t| t.join().unwrap()).collect();
        sockets.reverse();
        for (process, mine) in sockets.iter().enumerate() {
            assert!(mine[process].is_none(), "no socket to itself");
            assert_eq!(mine.iter().flatten().count(), 2);
        }
        // Each pair's two ends are one connection.
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            sockets[a][b]
                .as_mut()
                .unwrap()
                .write_all(&[a as u8, b as u8])
                .unwrap();
            let mut heard = [0u8; 2];
            sockets[b][a]
                .as_mut()
                .unwrap()
                .read_exact(&mut heard)
                .unwrap();
            assert_eq!(heard, [a as u8, b as u8]);
        }
    }

    #[test]
    fn processes_of_another_size_workers_or_job_both_say_why_they_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let (hosts, _) = free_hostfile(dir.path(), 2);
        let cluster = |process| member(2, process, &hosts);
        let refused = |(a, wa): (Cluster, usize), (b, wb): (Cluster, usize)| {
            let accepting = std::thread::spawn(move || a.connect(wa).unwrap_err());
            let connecting = b.connect(wb).unwrap_err();
            let accepting = accepting.join().unwrap();
            for e in [&accepting, &connecting] {
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
            }
            (accepting.to_string(), connecting.to_string())
        };
        let (coordinator, follower) = refused((cluster(0), 2), (cluster(1), 1));
        assert!(
            coordinator.contains("process 1") && coordinator.contains("--workers 1"),
            "{coordinator}"
        );
        assert!(follower.contains("--workers 2"), "{follower}");
        let stream = cluster(1).running(Job::Stream);
        let (coordinator, follower) = refused((cluster(0), 2), (stream, 2));
        assert!(coordinator.contains("it runs stream"), "{coordinator}");
        assert!(follower.contains("it runs a batch command"), "{follower}");
        // Process 1 of three, at the same address of process 0.
        let three = dir.path().join("three");
        let first_two = std::fs::read_to_string(&hosts).unwrap();
        std::fs::write(&three, format!("{first_two}\n127.0.0.1:1\n")).unwrap();
        let bigger = member(3, 1, &three);
        let (coordinator, follower) = refused((cluster(0), 2), (bigger, 2));
        assert!(coordinator.contains("--processes 3"), "{coordinator}");
        assert!(follower.contains("--processes 2"), "{follower}");
    }

    #[test]
    fn one_process_of_three_with_other_workers_stops_all_three() {
        let dir = tempfile::tempdir().unwrap();
        let (hosts, _) = free_hostfile(dir.path(), 3);
        let joining: Vec<_> = [(2, 1), (1, 2), (0, 2)]
            .into_iter()
            .map(|(process, workers)| {
                let cluster = member(3, process, &hosts);
                std::thread::spawn(move || cluster.connect(workers).unwrap_err())
            })
            .collect();
        let said: Vec<std::io::Error> = joining.into_iter().map(|t| t.join().unwrap()).collect();
        for e in &said {
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        }
        let (two, one, zero) = (
            said[0].to_string(),
            said[1].to_string(),
            said[2].to_string(),
        );
        assert!(
            two.contains("--workers 2, this process --workers 1"),
            "{two}"
        );
        assert!(
            zero.contains("process 2") && zero.contains("--workers 1"),
            "{zero}"
        );
        // Process 1 runs as process 0 does: it stops for process 2, and says so.
        assert!(one.contains("process 2 of the cluster cannot run"), "{one}");
    }

    #[test]
    fn a_connection_that_is_not_a_process_of_the_cluster_is_dropped() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let (hosts, free) = free_hostfile(dir.path(), 2);
        let cluster = |process| member(2, process, &hosts);
        let coordinator = cluster(0);
        let accepting = std::thread::spawn(move || coordinator.connect(2).unwrap());
        // A stranger saying something else, and one saying nothing: both dropped.
        let connect = || loop {
            if let Ok(stream) = std::net::TcpStream::connect(&free[0]) {
                break stream;
            }
            std::thread::sleep(POLL);
        };
        connect().write_all(&[7u8; 24]).unwrap();
        let _silent = connect();
        let follower = cluster(1).connect(2).unwrap();
        let coordinator = accepting.join().unwrap();
        assert!(coordinator[1].is_some() && follower[0].is_some());
        let (a, b) = (
            coordinator[1].as_ref().unwrap(),
            follower[0].as_ref().unwrap(),
        );
        assert_eq!(
            a.peer_addr().unwrap(),
            b.local_addr().unwrap(),
            "the follower's own"
        );
    }

    #[test]
    fn addresses_come_from_the_hostfile_or_default_to_localhost() {
        assert_eq!(Cluster::new(1, 0, None, WAIT), Ok(None));
        let two = Cluster::new(2, 1, None, WAIT).unwrap().unwrap();
        assert_eq!(two.addresses, ["127.0.0.1:2101", "127.0.0.1:2102"]);
        assert!(!two.is_coordinator());
        assert!(Cluster::new(2, 2, None, WAIT).is_err());
        assert!(Cluster::new(0, 0, None, WAIT).is_err());

        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            "# the cluster\nhost-a:4000\n\nhost-b:4000\nhost-c:4000\n",
        )
        .unwrap();
        let c = Cluster::new(2, 0, Some(&hosts), WAIT).unwrap().unwrap();
        assert_eq!(c.addresses, ["host-a:4000", "host-b:4000"]);
        assert!(Cluster::new(4, 0, Some(&hosts), WAIT)
            .unwrap_err()
            .contains("3 addresses"));
        // A hostfile of two processes with these lines: why it is refused.
        let refused = |lines: &str| {
            std::fs::write(&hosts, lines).unwrap();
            Cluster::new(2, 0, Some(&hosts), WAIT).unwrap_err()
        };
        assert!(refused("host-a\nhost-b:1\n").contains("host:port"));
        assert!(refused("host-a:x\nhost-b:1\n").contains("host:port"));
        assert!(refused("host-a:1\nhost-a:1\n").contains("twice"));
    }
}
