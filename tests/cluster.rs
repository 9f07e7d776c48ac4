//! Cluster mode ([`adsmetrics::cluster`]): `adsmetrics ingest`, `backfill` and `reprocess` as
//! two processes on 127.0.0.1, exchanging rows over TCP, write the same bytes as one process —
//! every curated partition and every raw-layer file — through several epochs, two hot-window
//! generations, a backfill of late events into published days, a reprocess of every day and a
//! compliance delete; a process killed mid-run stops the other, after which running both again
//! converges to the same tables; and every process exits as the coordinator does.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use adsmetrics::generate::{generate, GenerateConfig};
use adsmetrics::journal::CommitJournal;
use adsmetrics::warehouse::Warehouse;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_adsmetrics");
const TOPIC: &str = "ads-events";

/// Every published partition's bytes, by partition, and every raw file's, by path below the
/// warehouse.
type Contents = (
    BTreeMap<adsmetrics_dataflows::PartitionId, Vec<u8>>,
    BTreeMap<PathBuf, Vec<u8>>,
);

fn contents(root: &Path) -> Contents {
    let warehouse = Warehouse::new(root);
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    let tables = journal
        .published()
        .keys()
        .map(|id| (*id, std::fs::read(warehouse.partition_file(id)).unwrap()))
        .collect();
    let raw = adsmetrics::sink::raw::list_raw_files(&warehouse)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.strip_prefix(root).unwrap().to_path_buf(), bytes)
        })
        .collect();
    (tables, raw)
}

/// Free ports on 127.0.0.1, one per process, as a timely hostfile. Below the ephemeral range
/// (32768 and up on Linux), so no outgoing connection takes one between this check and the
/// cluster's bind; a block of its own per test process and call.
fn hostfile(dir: &Path, processes: usize) -> PathBuf {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 200) as u16 * 50;
    let mut lines = String::new();
    let mut first = None;
    while lines.lines().count() < processes {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 50;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            first.get_or_insert(port);
            lines.push_str(&format!("127.0.0.1:{port}\n"));
        }
    }
    let path = dir.join(format!("hosts-{}", first.unwrap()));
    std::fs::write(&path, lines).unwrap();
    path
}

/// A cluster process; killed if the test stops before it has ended (a failed assertion must not
/// leave a process waiting for its peer).
struct Process {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The commands the test runs, in one process or in a cluster.
#[derive(Clone, Copy)]
enum Job<'a> {
    /// `ingest <dir>`, a dozen sources per epoch.
    Ingest(&'a Path),
    /// `backfill --source <dir>` over 2026-11-01..04.
    Backfill(&'a Path),
    /// `reprocess` 2026-11-01..04.
    Reprocess,
    /// `delete --user-id <user>`, request `forget-<user>`.
    Delete(i64),
    /// `stream` the topic from these brokers until idle, a process holding at most 2,000 messages
    /// at a cut.
    Stream(&'a str),
}

fn command(warehouse: &Path, job: Job<'_>, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--warehouse").arg(warehouse);
    // The three event days, and the day after them that late deliveries land in.
    let days = ["--from", "2026-11-01", "--to", "2026-11-04"];
    match job {
        Job::Ingest(input) => c
            .arg("ingest")
            .arg(input)
            .args(["--quiet", "--epoch-sources", "12"]),
        Job::Backfill(source) => c
            .args(["backfill", "--quiet", "--source"])
            .arg(source)
            .args(days),
        Job::Reprocess => c.arg("reprocess").args(days),
        Job::Delete(user) => c
            .args(["delete", "--reason", "a compliance request"])
            .args(["--user-id", &user.to_string()])
            .args(["--request-id", &format!("forget-{user}")]),
        Job::Stream(brokers) => c
            .args(["stream", "--brokers", brokers, "--topics", TOPIC])
            .args([
                "--epoch-ms",
                "200",
                "--epoch-events",
                "1000",
                "--until-idle",
                "3",
            ]),
    };
    c.args(args).stdout(Stdio::null());
    c
}

/// Starts process `process` of a two-process cluster of two workers each; its stderr goes to a
/// file beside the hostfile (a pipe nobody reads could fill and stall it).
fn start(warehouse: &Path, job: Job<'_>, hosts: &Path, process: usize) -> Process {
    start_with(warehouse, job, hosts, process, &[])
}

/// [`start`], with more arguments.
fn start_with(
    warehouse: &Path,
    job: Job<'_>,
    hosts: &Path,
    process: usize,
    more: &[&str],
) -> Process {
    let stderr = hosts.with_extension(format!("p{process}.log"));
    let log = std::fs::File::create(&stderr).unwrap();
    let process = process.to_string();
    let hosts = hosts.to_str().unwrap();
    let child = command(
        warehouse,
        job,
        &[
            "--workers",
            "2",
            "--processes",
            "2",
            "--process",
            &process,
            "--hostfile",
            hosts,
            "--connect-timeout",
            "120s",
        ],
    )
    .args(more)
    .stderr(log)
    .spawn()
    .unwrap();
    Process { child, stderr }
}

/// Waits for a process (at most ten minutes); its exit status and what it wrote on stderr.
fn finish(mut process: Process, what: &str) -> (ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{what} did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&process.stderr).unwrap_or_default();
    if !status.success() {
        eprintln!("{what}: {stderr}");
    }
    (status, stderr)
}

/// Runs both processes of a cluster to the end; what the follower said.
fn in_cluster(dir: &Path, warehouse: &Path, job: Job<'_>) -> String {
    let hosts = hostfile(dir, 2);
    let follower = start(warehouse, job, &hosts, 1);
    let coordinator = start(warehouse, job, &hosts, 0);
    assert!(finish(coordinator, "process 0").0.success());
    let (status, said) = finish(follower, "process 1");
    assert!(status.success());
    said
}

/// The generations a follower said it ran of the coordinator's run, how many of them on the batch
/// engine, and how many rebuilt keys found from the keys of the follower's own sources.
fn generations_said(said: &str) -> (u64, u64, u64) {
    let line = said
        .lines()
        .find(|l| l.contains("generation(s) of the coordinator's run"))
        .unwrap_or_else(|| panic!("no count of generations in {said}"));
    let number_after = |word: &str| -> u64 {
        let at = line.find(word).expect("the word") + word.len();
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .find(|n| !n.is_empty())
            .and_then(|n| n.parse().ok())
            .expect("a number")
    };
    (
        number_after("ran "),
        number_after("run ("),
        number_after("engine; "),
    )
}

fn alone(warehouse: &Path, job: Job<'_>) {
    let out = command(warehouse, job, &["--workers", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three days of events (two hot-window generations), then a second batch into the same days.
fn two_batches(dir: &Path, events: u64) -> (PathBuf, PathBuf) {
    let (first, second) = (dir.join("first"), dir.join("second"));
    let config = GenerateConfig {
        events,
        hours: 72,
        files_per_hour: 2,
        seed: 11,
        ..GenerateConfig::default()
    };
    generate(&config, &first, &|_| {}).unwrap();
    let late = GenerateConfig {
        events: events / 10,
        seed: 12,
        ..config
    };
    generate(&late, &second, &|_| {}).unwrap();
    (first, second)
}

/// A copy of the source partitions at `from` in `to` with one partition changed (three rows
/// dropped, one corrected by a higher revision) and another removed: what a second backfill
/// replaces.
fn changed_copy(from: &Path, to: &Path) -> PathBuf {
    let files: Vec<PathBuf> = walkdir::WalkDir::new(from)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.into_path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    assert!(files.len() > 4);
    for (i, path) in files.iter().enumerate() {
        let copy = to.join(path.strip_prefix(from).unwrap());
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        match i {
            1 => write_parquet(&copy, &changed_rows(path)),
            3 => {}
            _ => {
                std::fs::copy(path, &copy).unwrap();
            }
        }
    }
    to.to_path_buf()
}

#[test]
fn two_processes_write_the_bytes_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = two_batches(dir.path(), 60_000);
    let changed = changed_copy(&second, &dir.path().join("changed"));

    let single = dir.path().join("alone");
    alone(&single, Job::Ingest(&first));
    alone(&single, Job::Backfill(&second));
    alone(&single, Job::Backfill(&changed));
    alone(&single, Job::Reprocess);

    let clustered = dir.path().join("cluster");
    let said = in_cluster(dir.path(), &clustered, Job::Ingest(&first));
    // Several epochs per generation (`--epoch-sources`): on the differential dataflow.
    // The second generation's rebuild found from both processes' sources; the first had nothing
    // committed to rebuild from.
    assert_eq!(generations_said(&said), (2, 0, 1), "{said}");
    // The follower read and hashed every other input file for the plan (the coordinator the rest).
    let inputs = adsmetrics::source::discover(std::slice::from_ref(&first))
        .unwrap()
        .len();
    assert!(inputs > 10);
    assert!(
        said.contains(&format!("identified {} input file(s)", inputs / 2)),
        "{said}"
    );
    let after_first = contents(&clustered);
    assert!(
        after_first
            .0
            .keys()
            .any(|id| id.grain == adsmetrics_dataflows::Grain::Weekly),
        "every table is written"
    );
    // The backfill's days: a generation each, every one on the batch engine, over timely's
    // channels.
    let said = in_cluster(dir.path(), &clustered, Job::Backfill(&second));
    let (generations, on_engine, seeded) = generations_said(&said);
    assert!(generations >= 4, "{said}");
    assert_eq!(on_engine, generations, "{said}");
    // Every one rebuilt the keys its sources touch in published days, found from what each
    // process read of its own share of them (the coordinator read only its own).
    assert_eq!(seeded, generations, "{said}");
    let after_backfill = contents(&clustered);
    assert!(
        after_backfill.0 != after_first.0,
        "the backfill changed days"
    );
    // A changed and a removed source partition: their raw rows withdrawn, each process reading
    // its share of the withdrawn files for the rebuild.
    let said = in_cluster(dir.path(), &clustered, Job::Backfill(&changed));
    let (generations, _, seeded) = generations_said(&said);
    assert!(generations >= 1 && seeded == generations, "{said}");
    let after_backfill = contents(&clustered);
    // Rebuilding every day from the raw layer, split over both processes, changes nothing.
    in_cluster(dir.path(), &clustered, Job::Reprocess);
    assert!(contents(&clustered) == after_backfill);

    let (alone_tables, alone_raw) = contents(&single);
    let (tables, raw) = contents(&clustered);
    assert_eq!(tables.len(), alone_tables.len());
    assert!(tables == alone_tables, "a curated partition differs");
    assert_eq!(raw.len(), alone_raw.len());
    assert!(raw == alone_raw, "a raw file differs");
    // And both are right: the reference over every event ingested.
    let mut events = decode_dir(&first);
    events.extend(decode_dir(&changed));
    assert_eq!(
        published_tables(&Warehouse::new(&clustered)),
        expected_tables(&events)
    );
    let ledger = assert_ledger_accounts_for_tables(&Warehouse::new(&clustered));
    // The coordinator's ledger says how each run ran.
    for kind in ["ingest", "backfill", "reprocess"] {
        assert!(
            ledger
                .iter()
                .any(|e| e.body.command.starts_with(kind)
                    && e.body.command.contains("--processes 2")),
            "{kind}"
        );
    }

    // A rerun of the cluster over the same input changes nothing.
    in_cluster(dir.path(), &clustered, Job::Ingest(&first));
    assert!(contents(&clustered).0 == tables);
    // The side tables hold the same rows, each process's sources' in files of its own.
    let side = side_tables(&Warehouse::new(&clustered));
    assert!(
        !side.0.is_empty() && !side.1.is_empty(),
        "no quarantine or lateness to compare"
    );
    assert!(
        side == side_tables(&Warehouse::new(&single)),
        "the side tables differ"
    );

    // A compliance delete: the raw layer searched and the days that held the user's events
    // rebuilt on both processes, the raw files rewritten by the coordinator; the same bytes as a
    // process alone, and the tables of every event but the user's. The user with the most
    // events, so that both processes' shares of the raw files hold some.
    let mut per_user: BTreeMap<i64, usize> = BTreeMap::new();
    for e in &events {
        *per_user.entry(e.user_id).or_default() += 1;
    }
    let (&user, &user_events) = per_user.iter().max_by_key(|(_, n)| **n).unwrap();
    assert!(user_events >= 4, "{user_events}");
    alone(&single, Job::Delete(user));
    let raw_files = contents(&clustered).1.len();
    let said = in_cluster(dir.path(), &clustered, Job::Delete(user));
    // A rebuild of whole days: on the differential dataflow.
    assert_eq!(generations_said(&said), (1, 0, 0), "{said}");
    // The raw layer searched by both processes, each every other file: for the user's keys, then
    // for the files holding them.
    assert!(
        said.contains(&format!("searched {} raw file(s)", 2 * (raw_files / 2))),
        "{said} ({raw_files} raw files)"
    );
    let (tables, raw) = contents(&clustered);
    assert!(tables != alone_tables, "the delete changed partitions");
    assert!(tables == contents(&single).0, "a curated partition differs");
    assert!(raw == contents(&single).1, "a raw file differs");
    events.retain(|e| e.user_id != user);
    assert_eq!(
        published_tables(&Warehouse::new(&clustered)),
        expected_tables(&events)
    );
    assert!(clustered
        .join(format!("_adsmetrics/deletions/forget-{user}.json"))
        .exists());
    let ledger = assert_ledger_accounts_for_tables(&Warehouse::new(&clustered));
    assert!(ledger.iter().any(|e| e
        .body
        .command
        .starts_with(&format!("delete --request-id forget-{user} --processes 2"))));
}

/// Starts `job` on two processes into `clustered`, SIGKILLs the follower once the journal holds
/// `commits` commits, and requires the coordinator to stop with exit 70 (had it finished, it
/// would exit 0: the kill came too late to test anything) and the tables to be unfinished
/// (unlike `single`'s, the whole job's).
fn kill_the_follower_after(
    clustered: &Path,
    single: &Path,
    job: Job<'_>,
    hosts: &Path,
    commits: usize,
) {
    let mut follower = start(clustered, job, hosts, 1);
    let coordinator = start(clustered, job, hosts, 0);
    let journal = Warehouse::new(clustered).journal_path();
    let waited = Instant::now();
    while std::fs::read_to_string(&journal)
        .map(|j| j.matches("\"commit\"").count())
        .unwrap_or(0)
        < commits
    {
        assert!(waited.elapsed() < Duration::from_secs(300), "no publish");
        std::thread::sleep(Duration::from_millis(20));
    }
    follower.child.kill().unwrap();
    follower.child.wait().unwrap();
    let (stopped, said) = finish(coordinator, "process 0");
    assert_eq!(
        stopped.code(),
        Some(i32::from(adsmetrics::cluster::EXIT_PEER_LOST)),
        "the coordinator stops when its peer is lost: {said}"
    );
    assert!(
        contents(clustered).0 != contents(single).0,
        "the kill left the job unfinished"
    );
}

#[test]
fn a_process_killed_mid_run_stops_the_other_and_a_rerun_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = two_batches(dir.path(), 400_000);
    let single = dir.path().join("alone");
    alone(&single, Job::Ingest(&first));

    let clustered = dir.path().join("cluster");
    let hosts = hostfile(dir.path(), 2);
    // Kill the follower once the cluster has committed an epoch and is into the next ones.
    kill_the_follower_after(&clustered, &single, Job::Ingest(&first), &hosts, 1);
    in_cluster(dir.path(), &clustered, Job::Ingest(&first));
    assert!(contents(&clustered).0 == contents(&single).0);
    assert_ledger_accounts_for_tables(&Warehouse::new(&clustered));
}

#[test]
fn a_follower_on_another_warehouse_is_refused_and_nothing_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = two_batches(dir.path(), 20_000);
    let warehouse = dir.path().join("shared");
    alone(&warehouse, Job::Ingest(&first));
    let before = contents(&warehouse);

    // The follower is given an empty directory where the coordinator's warehouse should be.
    let hosts = hostfile(dir.path(), 2);
    let elsewhere = dir.path().join("elsewhere");
    let follower = start(&elsewhere, Job::Ingest(&second), &hosts, 1);
    let coordinator = start(&warehouse, Job::Ingest(&second), &hosts, 0);
    let (status, said) = finish(coordinator, "process 0");
    assert!(!status.success());
    assert!(said.contains("same warehouse"), "{said}");
    let (status, said) = finish(follower, "process 1");
    assert!(!status.success());
    assert!(
        said.contains("the coordinator (process 0) failed"),
        "{said}"
    );
    // (The coordinator's own raw files of the refused epoch stay, uncommitted: every run
    // ignores them, as after a crash.)
    assert!(contents(&warehouse).0 == before.0, "nothing was published");
    assert!(
        !elsewhere.join("raw").exists(),
        "the refused follower wrote no raw files"
    );
}

#[test]
fn processes_started_with_other_workers_stop_at_once_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = two_batches(dir.path(), 5_000);
    let warehouse = dir.path().join("shared");
    let hosts = hostfile(dir.path(), 2);
    // As `start`, but each with its own --workers (timely's exchange panicked on such a peer).
    let run = |process: usize, workers: &str| {
        let process = process.to_string();
        command(&warehouse, Job::Ingest(&first), &[])
            .args([
                "--workers",
                workers,
                "--processes",
                "2",
                "--process",
                &process,
            ])
            .arg("--hostfile")
            .arg(&hosts)
            .args(["--connect-timeout", "120s"])
            .output()
            .unwrap()
    };
    let (coordinator, follower) = std::thread::scope(|scope| {
        let follower = scope.spawn(|| run(1, "1"));
        (run(0, "2"), follower.join().unwrap())
    });
    for (out, says) in [(&coordinator, "--workers 1"), (&follower, "--workers 2")] {
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from(adsmetrics::cluster::EXIT_MISCONFIGURED)),
            "{said}"
        );
        assert!(said.contains(says) && !said.contains("panicked"), "{said}");
    }
    assert!(
        !warehouse.join("raw").exists() && !warehouse.join("ads_metrics_hourly").exists(),
        "nothing was written"
    );
}

#[test]
fn every_process_exits_as_the_coordinator_does_when_the_warehouse_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = two_batches(dir.path(), 5_000);
    let warehouse = dir.path().join("shared");
    alone(&warehouse, Job::Ingest(&first));
    let before = contents(&warehouse);

    // Another writer holds the warehouse: the coordinator cannot lock it, and exits 75 (retry
    // later); the follower, told so, exits 75 too, so an orchestrator retries both alike.
    let _held = adsmetrics::lock::WriterLock::acquire(&Warehouse::new(&warehouse)).unwrap();
    let hosts = hostfile(dir.path(), 2);
    let busy = |process| {
        start_with(
            &warehouse,
            Job::Ingest(&second),
            &hosts,
            process,
            &["--lock-wait", "0s"],
        )
    };
    let follower = busy(1);
    let coordinator = busy(0);
    let (status, said) = finish(coordinator, "process 0");
    assert_eq!(status.code(), Some(75), "{said}");
    let (status, said) = finish(follower, "process 1");
    assert_eq!(status.code(), Some(75), "{said}");
    assert!(
        said.contains("the coordinator (process 0) failed"),
        "{said}"
    );
    assert!(contents(&warehouse) == before, "nothing was written");
}

/// `stream` on two processes: each reads its half of the topic's partitions on its own
/// consumer, the cluster cuts and publishes the epochs as one, and the tables are the bytes one
/// process streams; the journal's offsets reach the log end, and a rerun changes nothing.
#[test]
fn a_stream_on_two_processes_publishes_the_tables_one_process_streams() {
    use adsmetrics::broker::{produce, DevBroker, ProduceOptions};
    use adsmetrics::stream::{committed_positions, log_end_offsets};
    let dir = tempfile::tempdir().unwrap();
    let config = GenerateConfig {
        events: 8000,
        hours: 6,
        ads: 50,
        users: 2000,
        late_rate: 0.05,
        correction_rate: 0.01,
        seed: 21,
        ..GenerateConfig::default()
    };
    let events = adsmetrics::generate::generate_events(&config);
    let broker = DevBroker::start(&[TOPIC.to_string()], 4).unwrap();
    let brokers = broker.bootstrap_servers();
    let sending = ProduceOptions {
        bad_every: Some(500),
        ..ProduceOptions::new(&brokers, TOPIC)
    };
    produce(&sending, &events, &|_| {}).unwrap();

    let single = dir.path().join("alone");
    alone(&single, Job::Stream(&brokers));
    let clustered = dir.path().join("cluster");
    let said = in_cluster(dir.path(), &clustered, Job::Stream(&brokers));

    // The follower read partitions 1 and 3 (every other of the sorted four), every message.
    let ends = log_end_offsets(&brokers, &[TOPIC.to_string()]).unwrap();
    let followers: i64 = ends
        .iter()
        .filter(|((_, partition), _)| partition % 2 == 1)
        .map(|(_, end)| end)
        .sum();
    assert!(followers > 0);
    assert!(
        said.contains(&format!("read {followers} message(s) of 2 partition(s)")),
        "{said}"
    );
    let tables = contents(&clustered).0;
    assert_eq!(tables, contents(&single).0, "the cluster's tables differ");
    let warehouse = Warehouse::new(&clustered);
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    let committed = adsmetrics::runtime::committed_sources(&warehouse).unwrap();
    assert_eq!(committed_positions(&committed), ends);
    // At most 2,000 messages a process at a cut (twice --epoch-events: its reader holds off
    // there), so at least three epochs; some name both processes' ranges.
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    let publishes = journal.committed();
    assert!(publishes.len() >= 3, "{} publishes", publishes.len());
    assert!(publishes.iter().any(|p| {
        let partitions: Vec<i32> = p
            .sources
            .iter()
            .filter_map(|s| adsmetrics::stream::Range::parse(&s.source))
            .map(|r| r.partition % 2)
            .collect();
        partitions.contains(&0) && partitions.contains(&1)
    }));
    assert_ledger_accounts_for_tables(&warehouse);

    // Run again: everything is committed, nothing is read, nothing changes.
    let said = in_cluster(dir.path(), &clustered, Job::Stream(&brokers));
    assert!(said.contains("read 0 message(s)"), "{said}");
    assert_eq!(contents(&clustered).0, tables);
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    assert_eq!(journal.committed().len(), publishes.len());
}

/// A stream's follower killed after the cluster has published epochs: the coordinator stops
/// (exit 70, at once or when the follower does not come back for the next cut), and running
/// both processes again re-cuts what was cut and not committed and ends in the tables one
/// process streams.
#[test]
fn a_stream_follower_killed_mid_stream_stops_the_coordinator_and_a_rerun_converges() {
    use adsmetrics::broker::{produce, DevBroker, ProduceOptions};
    use adsmetrics::stream::{committed_positions, log_end_offsets};
    let dir = tempfile::tempdir().unwrap();
    let config = GenerateConfig {
        events: 30_000,
        hours: 6,
        seed: 23,
        ..GenerateConfig::default()
    };
    let events = adsmetrics::generate::generate_events(&config);
    let broker = DevBroker::start(&[TOPIC.to_string()], 4).unwrap();
    let brokers = broker.bootstrap_servers();
    produce(&ProduceOptions::new(&brokers, TOPIC), &events, &|_| {}).unwrap();
    let single = dir.path().join("alone");
    alone(&single, Job::Stream(&brokers));

    let clustered = dir.path().join("cluster");
    let hosts = hostfile(dir.path(), 2);
    // At most 4,000 messages an epoch, so more than eight epochs: kill after the second.
    kill_the_follower_after(&clustered, &single, Job::Stream(&brokers), &hosts, 2);
    in_cluster(dir.path(), &clustered, Job::Stream(&brokers));
    assert!(contents(&clustered).0 == contents(&single).0);
    let warehouse = Warehouse::new(&clustered);
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    let committed = adsmetrics::runtime::committed_sources(&warehouse).unwrap();
    assert_eq!(
        committed_positions(&committed),
        log_end_offsets(&brokers, &[TOPIC.to_string()]).unwrap()
    );
    assert_ledger_accounts_for_tables(&warehouse);
}

/// Streams on two processes, the follower started with `follower_args` besides the command's,
/// and requires both to exit 1 with nothing published; returns what each said (coordinator,
/// follower).
fn a_refused_stream_follower(follower_args: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let broker = adsmetrics::broker::DevBroker::start(&[TOPIC.to_string()], 2).unwrap();
    let brokers = broker.bootstrap_servers();
    let warehouse = dir.path().join("shared");
    let hosts = hostfile(dir.path(), 2);
    let follower = start_with(&warehouse, Job::Stream(&brokers), &hosts, 1, follower_args);
    let coordinator = start(&warehouse, Job::Stream(&brokers), &hosts, 0);
    let (status, coordinator_said) = finish(coordinator, "process 0");
    assert_eq!(status.code(), Some(1), "{coordinator_said}");
    let (status, follower_said) = finish(follower, "process 1");
    assert_eq!(status.code(), Some(1), "{follower_said}");
    let journal = Warehouse::new(&warehouse).journal_path();
    assert!(
        std::fs::read_to_string(journal).map_or(true, |j| !j.contains("\"commit\"")),
        "nothing was published"
    );
    (coordinator_said, follower_said)
}

/// A stream's follower given a Kafka setting the stream owns (one that could skip or re-read
/// messages) refuses it as a process alone does, and the whole stream stops before anything is
/// read into the warehouse: the coordinator hears it at its first cut.
#[test]
fn a_stream_follower_with_a_setting_the_stream_owns_stops_the_stream_before_it_publishes() {
    let (coordinator, follower) =
        a_refused_stream_follower(&["--kafka-config", "auto.offset.reset=latest"]);
    assert!(
        coordinator.contains("process 1") && coordinator.contains("auto.offset.reset"),
        "{coordinator}"
    );
    assert!(follower.contains("auto.offset.reset"), "{follower}");
}

/// A stream's follower started on other topics than the coordinator's would read partitions
/// the coordinator does not know into its journal: it refuses to start, and the stream stops.
#[test]
fn a_stream_follower_on_other_topics_is_refused_and_nothing_is_published() {
    // `--topics` again adds one: this follower reads ads-events and clicks.
    let (coordinator, _) = a_refused_stream_follower(&["--topics", "clicks"]);
    assert!(
        coordinator.contains("--topics ads-events,clicks"),
        "{coordinator}"
    );
}
