//! The runbook's recovery procedures (`docs/operations.md`), run verbatim: each test breaks a
//! warehouse the way a procedure's heading says, runs that procedure's command block through
//! bash with the real binary, and requires the curated tables to be byte-identical to a clean
//! run's (and the checks in the block to pass).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use adsmetrics::journal::CommitJournal;
use adsmetrics::sink::curated::read_partition;
use adsmetrics::sink::publish::{publish_epoch, stage_partition, PublishOrigin};
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::stream::{committed_positions, log_end_offsets};
use adsmetrics::warehouse::Warehouse;

const BIN: &str = env!("CARGO_BIN_EXE_adsmetrics");
const FROM: &str = "2026-11-01";
const TO: &str = "2026-11-03";

/// The command blocks of the runbook, by their `recover=<id>`.
fn procedures() -> BTreeMap<String, String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(id) = line.strip_prefix("```bash recover=") else {
            continue;
        };
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.insert(id.trim().to_string(), block.join("\n"));
    }
    out
}

fn procedure(id: &str) -> String {
    procedures()
        .remove(id)
        .unwrap_or_else(|| panic!("docs/operations.md has no `recover={id}` block"))
}

/// A scratch area: generated sources and the warehouse the procedure repairs.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let scene = Scene {
            dir: tempfile::tempdir().unwrap(),
        };
        let out = cli(
            None,
            &[
                "generate",
                "--out",
                scene.source().to_str().unwrap(),
                "--events",
                "4000",
                "--start",
                FROM,
                "--hours",
                "72",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        scene
    }

    fn source(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    fn warehouse(&self) -> PathBuf {
        self.dir.path().join("warehouse")
    }

    /// Runs `adsmetrics` on this scene's warehouse.
    fn adsmetrics(&self, env: Option<(&str, &str)>, args: &[&str]) -> Output {
        let warehouse = self.warehouse();
        let mut all = vec!["--warehouse", warehouse.to_str().unwrap()];
        all.extend_from_slice(args);
        cli(env, &all)
    }

    fn backfill(&self, env: Option<(&str, &str)>) -> Output {
        backfill_into(&self.warehouse(), &self.source(), env)
    }

    /// Runs the runbook block `id` in bash, the warehouse and these variables in its
    /// environment, `adsmetrics` on its PATH; fails the test if any command in it fails.
    fn run_procedure(&self, id: &str, vars: &[(&str, &str)]) -> String {
        let bin_dir = Path::new(BIN).parent().unwrap();
        let path = std::env::join_paths(
            std::iter::once(bin_dir.to_path_buf())
                .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
        )
        .unwrap();
        let mut bash = Command::new("bash");
        bash.args(["-e", "-o", "pipefail", "-c", &procedure(id)])
            .env("PATH", path)
            .env("ADSMETRICS_WAREHOUSE", self.warehouse())
            .env("SOURCE", self.source())
            .env("FROM", FROM)
            .env("TO", TO)
            .env_remove("ADSMETRICS_FAIL_AT");
        for (k, v) in vars {
            bash.env(k, v);
        }
        let out = bash.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "procedure {id} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

fn cli(env: Option<(&str, &str)>, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("ADSMETRICS_FAIL_AT");
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// `adsmetrics backfill` of FROM..TO from `source` into `warehouse`.
fn backfill_into(warehouse: &Path, source: &Path, env: Option<(&str, &str)>) -> Output {
    cli(
        env,
        &[
            "--warehouse",
            warehouse.to_str().unwrap(),
            "backfill",
            "--source",
            source.to_str().unwrap(),
            "--from",
            FROM,
            "--to",
            TO,
            "--quiet",
        ],
    )
}

/// The curated tables of a clean backfill of the same sources.
fn clean_tables(scene: &Scene) -> String {
    let clean = scene.dir.path().join("clean");
    let out = backfill_into(&clean, &scene.source(), None);
    assert!(out.status.success(), "{out:?}");
    TableSnapshot::take(&Warehouse::new(clean))
        .unwrap()
        .fingerprint()
}

fn tables(scene: &Scene) -> String {
    TableSnapshot::take(&Warehouse::new(scene.warehouse()))
        .unwrap()
        .fingerprint()
}

#[test]
fn crash_mid_publish() {
    let scene = Scene::new();
    let crashed = scene.backfill(Some(("ADSMETRICS_FAIL_AT", "after-rename-0")));
    assert_eq!(crashed.status.code(), Some(86), "{crashed:?}");
    let stuck = scene.adsmetrics(None, &["check", "partitions", "--no-record"]);
    assert_eq!(stuck.status.code(), Some(11), "{stuck:?}");
    assert_ne!(tables(&scene), clean_tables(&scene));

    let said = scene.run_procedure("crash-mid-publish", &[]);
    assert!(said.contains("stuck, as expected"), "{said}");
    assert_eq!(tables(&scene), clean_tables(&scene));
}

#[test]
fn partial_load() {
    let scene = Scene::new();
    // Killed right after its first day's publish.
    let partial = scene.backfill(Some(("ADSMETRICS_FAIL_AT", "after-commit")));
    assert_eq!(partial.status.code(), Some(86), "{partial:?}");
    let gaps = scene.adsmetrics(
        None,
        &[
            "check",
            "partitions",
            "--from",
            FROM,
            "--to",
            TO,
            "--no-record",
        ],
    );
    assert_eq!(gaps.status.code(), Some(11), "{gaps:?}");

    scene.run_procedure("partial-load", &[]);
    assert_eq!(tables(&scene), clean_tables(&scene));
}

#[test]
fn warehouse_locked() {
    let scene = Scene::new();
    let warehouse = Warehouse::new(scene.warehouse());
    let held = adsmetrics::lock::WriterLock::acquire(&warehouse).unwrap();
    let source = scene.source();
    let gave_up = scene.adsmetrics(
        None,
        &[
            "--lock-wait",
            "1s",
            "backfill",
            "--source",
            source.to_str().unwrap(),
            "--from",
            FROM,
            "--to",
            TO,
            "--quiet",
        ],
    );
    assert_eq!(gave_up.status.code(), Some(75), "{gave_up:?}");
    assert!(
        !warehouse.journal_path().exists(),
        "the refused run published"
    );
    drop(held);

    scene.run_procedure("warehouse-locked", &[]);
    assert_eq!(tables(&scene), clean_tables(&scene));
}

#[test]
fn bad_deploy() {
    let scene = Scene::new();
    assert!(scene.backfill(None).status.success());
    let clean = clean_tables(&scene);
    assert_eq!(tables(&scene), clean);

    // The bad build: it published every partition of the first day with one click too many.
    let warehouse = Warehouse::new(scene.warehouse());
    let mut journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    let first_day = adsmetrics::warehouse::parse_day(FROM).unwrap();
    let mut changes = Vec::new();
    for (id, published) in journal.published().clone() {
        if id.day() != first_day {
            continue;
        }
        let mut rows = read_partition(&warehouse.partition_file(&id)).unwrap();
        for (_, row) in &mut rows {
            row.clicks += 1;
        }
        changes.extend(stage_partition(&warehouse, &id, &rows, Some(&published)).unwrap());
    }
    assert!(changes.len() > 1);
    publish_epoch(
        &mut journal,
        &warehouse,
        PublishOrigin {
            run_id: "run-bad-build",
            run_key: None,
            epoch: 0,
            ledger: None,
            retired: Vec::new(),
            side_files: Vec::new(),
        },
        Vec::new(),
        changes,
        None,
    )
    .unwrap();
    drop(journal);
    let mismatch = scene.adsmetrics(None, &["check", "reconcile", "--no-record"]);
    assert_eq!(mismatch.status.code(), Some(12), "{mismatch:?}");

    let said = scene.run_procedure("bad-deploy", &[]);
    assert!(said.contains("reprocess"), "{said}");
    assert_eq!(tables(&scene), clean);
    // Rerun-safe: a second reprocess publishes nothing.
    let again = scene.adsmetrics(None, &["reprocess", "--from", FROM, "--to", TO]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains(" 0 partitions published"),
        "{again:?}"
    );
}

#[test]
fn delete_request() {
    let scene = Scene::new();
    assert!(scene.backfill(None).status.success());
    // The events the backfill read (source days FROM..TO; late arrivals of the day after are
    // not in range), and a user among them.
    let events: Vec<_> = ["2026-11-01", "2026-11-02", "2026-11-03"]
        .iter()
        .flat_map(|day| common::decode_dir(&scene.source().join(format!("dt={day}"))))
        .collect();
    let user = events[0].user_id;
    let before = tables(&scene);

    let said = scene.run_procedure(
        "delete-request",
        &[
            ("USER_ID", user.to_string().as_str()),
            ("REQUEST_ID", "DSR-1"),
            ("REASON", "user request"),
        ],
    );
    assert!(
        said.contains("nothing") || said.contains("already"),
        "{said}"
    );
    assert_ne!(tables(&scene), before, "the delete changed no table");

    // The oracle: the same sources without that user's events, loaded fresh.
    let kept: Vec<_> = events.into_iter().filter(|e| e.user_id != user).collect();
    let warehouse = Warehouse::new(scene.warehouse());
    assert_eq!(
        common::published_tables(&warehouse),
        common::expected_tables(&kept)
    );
}

#[test]
fn failed_exactly_once_commit() {
    let scene = Scene::new();
    let broker = common::Broker::start("ads-events", 4);
    let produce = cli(
        None,
        &[
            "generate",
            "--to-kafka",
            &broker.bootstrap,
            "--topic",
            "ads-events",
            "--events",
            "4000",
            "--start",
            FROM,
            "--hours",
            "72",
        ],
    );
    assert!(produce.status.success(), "{produce:?}");
    let stream = |wh: &Path, env: Option<(&str, &str)>| {
        cli(
            env,
            &[
                "--warehouse",
                wh.to_str().unwrap(),
                "stream",
                "--brokers",
                &broker.bootstrap,
                "--topics",
                "ads-events",
                "--epoch-events",
                "2000",
                "--until-idle",
                "2",
            ],
        )
    };
    // The stream dies between an epoch's Prepare and its Commit.
    let died = stream(
        &scene.warehouse(),
        Some(("ADSMETRICS_FAIL_AT", "after-prepare")),
    );
    assert_eq!(died.status.code(), Some(86), "{died:?}");

    scene.run_procedure(
        "failed-exactly-once-commit",
        &[("BROKERS", &broker.bootstrap), ("TOPICS", "ads-events")],
    );
    // The oracle: the same topic streamed into a fresh warehouse without a crash.
    let clean = scene.dir.path().join("clean-stream");
    assert!(stream(&clean, None).status.success());
    assert_eq!(
        tables(&scene),
        TableSnapshot::take(&Warehouse::new(&clean))
            .unwrap()
            .fingerprint()
    );
    let warehouse = Warehouse::new(scene.warehouse());
    let committed =
        committed_positions(&adsmetrics::runtime::committed_sources(&warehouse).unwrap());
    let ends = log_end_offsets(&broker.bootstrap, &["ads-events".to_string()]).unwrap();
    assert_eq!(committed, ends);
}
