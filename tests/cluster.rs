//! Cluster mode ([`adsmetrics::cluster`]): `adsmetrics ingest`, `backfill` and `reprocess` as
//! two processes on 127.0.0.1, exchanging rows over TCP, write the same bytes as one process —
//! every curated partition and every raw-layer file — through several epochs, two hot-window
//! generations, a backfill of late events into published days and a reprocess of every day;
//! and a process killed mid-run stops the other, after which running both again converges to
//! the same tables.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use adsmetrics::generate::{generate, GenerateConfig};
use adsmetrics::journal::CommitJournal;
use adsmetrics::warehouse::Warehouse;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_adsmetrics");

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

/// Free ports on 127.0.0.1, one per process, as a timely hostfile.
fn hostfile(dir: &Path, processes: usize) -> PathBuf {
    let listeners: Vec<_> = (0..processes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let lines: Vec<String> = listeners
        .iter()
        .map(|l| format!("127.0.0.1:{}\n", l.local_addr().unwrap().port()))
        .collect();
    let port = listeners[0].local_addr().unwrap().port();
    let path = dir.join(format!("hosts-{port}"));
    std::fs::write(&path, lines.concat()).unwrap();
    path
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
    };
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Starts process `process` of a two-process cluster of two workers each.
fn start(warehouse: &Path, job: Job<'_>, hosts: &Path, process: usize) -> Child {
    let process = process.to_string();
    let hosts = hosts.to_str().unwrap();
    command(
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
        ],
    )
    .spawn()
    .unwrap()
}

/// Waits for a process; its exit status and what it wrote on stderr.
fn finish(child: Child, what: &str) -> (ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        eprintln!("{what}: {stderr}");
    }
    (out.status, stderr)
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

#[test]
fn two_processes_write_the_bytes_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = two_batches(dir.path(), 60_000);

    let single = dir.path().join("alone");
    alone(&single, Job::Ingest(&first));
    alone(&single, Job::Backfill(&second));
    alone(&single, Job::Reprocess);

    let clustered = dir.path().join("cluster");
    let said = in_cluster(dir.path(), &clustered, Job::Ingest(&first));
    assert!(said.contains("ran 2 generation(s)"), "{said}");
    let after_first = contents(&clustered);
    assert!(
        after_first
            .0
            .keys()
            .any(|id| id.grain == adsmetrics_dataflows::Grain::Weekly),
        "every table is written"
    );
    in_cluster(dir.path(), &clustered, Job::Backfill(&second));
    let after_backfill = contents(&clustered);
    assert!(
        after_backfill.0 != after_first.0,
        "the backfill changed days"
    );
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
    events.extend(decode_dir(&second));
    assert_eq!(
        published_tables(&Warehouse::new(&clustered)),
        expected_tables(&events)
    );
    assert_ledger_accounts_for_tables(&Warehouse::new(&clustered));

    // A rerun of the cluster over the same input changes nothing.
    in_cluster(dir.path(), &clustered, Job::Ingest(&first));
    assert!(contents(&clustered).0 == tables);
}

#[test]
fn a_process_killed_mid_run_stops_the_other_and_a_rerun_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = two_batches(dir.path(), 400_000);
    let single = dir.path().join("alone");
    alone(&single, Job::Ingest(&first));

    let clustered = dir.path().join("cluster");
    let hosts = hostfile(dir.path(), 2);
    let mut follower = start(&clustered, Job::Ingest(&first), &hosts, 1);
    let coordinator = start(&clustered, Job::Ingest(&first), &hosts, 0);
    // Kill the follower once the cluster has committed an epoch and is into the next ones.
    let journal = Warehouse::new(&clustered).journal_path();
    let waited = Instant::now();
    while std::fs::read_to_string(&journal)
        .map(|j| j.matches("\"commit\"").count())
        .unwrap_or(0)
        < 1
    {
        assert!(waited.elapsed() < Duration::from_secs(300), "no publish");
        std::thread::sleep(Duration::from_millis(20));
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
    let (stopped, _) = finish(coordinator, "process 0");
    assert_eq!(
        stopped.code(),
        Some(i32::from(adsmetrics::cluster::EXIT_PEER_LOST)),
        "the coordinator stops when its peer is lost (or, had it finished, exits 0: then the \
         kill came too late to test anything)"
    );
    let partial = contents(&clustered).0;
    assert!(
        partial != contents(&single).0,
        "the kill left the run unfinished"
    );

    in_cluster(dir.path(), &clustered, Job::Ingest(&first));
    assert!(contents(&clustered).0 == contents(&single).0);
    assert_ledger_accounts_for_tables(&Warehouse::new(&clustered));
}
