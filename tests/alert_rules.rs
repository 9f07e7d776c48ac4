//! The Prometheus alert rules (`deploy/prometheus/alerts.yml`): valid for promtool, firing as
//! their unit tests say, written against metrics adsmetrics really exports, and each linked to a
//! runbook entry that exists.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use adsmetrics::metrics::{render, StreamMetrics};
use prometheus_client::registry::Registry;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rules() -> String {
    std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap()
}

/// Every `adsmetrics_…` identifier in `text`, outside comments.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("adsmetrics_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The series names of a Prometheus text exposition (`# TYPE name kind` lines, with the
/// suffixes each kind's samples carry).
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn every_metric_an_alert_names_is_exported_by_the_stream_or_the_checks() {
    let mut registry = Registry::default();
    let metrics = StreamMetrics::register(&mut registry);
    // Per-partition families show only once a partition has a value.
    metrics.set_position("ads-events", 0, 10);
    metrics.set_log_end("ads-events", 0, 15);
    let mut known = exposed(&render(&registry));

    // The checks' gauges, from a real `check all --metrics-file` on a small warehouse.
    let dir = tempfile::tempdir().unwrap();
    let events = common::sample_events(500, 11);
    common::write_parquet(
        &dir.path().join("in/dt=2026-11-03/hr=00/a.parquet"),
        &events,
    );
    let wh = dir.path().join("wh");
    let bin = env!("CARGO_BIN_EXE_adsmetrics");
    let ingest_file = dir.path().join("textfile/adsmetrics_ingest.prom");
    let ingest = Command::new(bin)
        .arg("--warehouse")
        .arg(&wh)
        .args(["ingest", "--quiet", "--metrics-file"])
        .arg(&ingest_file)
        .arg(dir.path().join("in"))
        .output()
        .unwrap();
    assert!(ingest.status.success(), "{ingest:?}");
    // The ingest's events by type and producer add up to its events accepted.
    let ingest_text = std::fs::read_to_string(&ingest_file).unwrap();
    let value = |line: &str| -> f64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
    let accepted = ingest_text
        .lines()
        .find(|l| l.starts_with("adsmetrics_run_events_accepted{"))
        .map(value)
        .unwrap();
    let by_kind: Vec<f64> = ingest_text
        .lines()
        .filter(|l| l.starts_with("adsmetrics_run_events_accepted_by_kind{command=\"ingest\","))
        .map(value)
        .collect();
    assert!(by_kind.len() > 4, "{ingest_text}");
    assert!(
        accepted > 0.0 && by_kind.iter().sum::<f64>() == accepted,
        "{ingest_text}"
    );
    known.extend(exposed(&ingest_text));
    let run_file = dir.path().join("textfile/adsmetrics_reprocess.prom");
    let reprocess = Command::new(bin)
        .arg("--warehouse")
        .arg(&wh)
        .args([
            "reprocess",
            "--from",
            "2026-10-01",
            "--to",
            "2026-11-30",
            "--metrics-file",
        ])
        .arg(&run_file)
        .output()
        .unwrap();
    assert!(reprocess.status.success(), "{reprocess:?}");
    let run_text = std::fs::read_to_string(&run_file).unwrap();
    assert!(
        run_text.contains("adsmetrics_run_partitions_published{command=\"reprocess\"} 0"),
        "{run_text}"
    );
    // A reprocess reads no source: no events by kind.
    assert!(
        !run_text.contains("adsmetrics_run_events_accepted_by_kind{"),
        "{run_text}"
    );
    known.extend(exposed(&run_text));
    let file = dir.path().join("textfile/adsmetrics.prom");
    let check = Command::new(bin)
        .arg("--warehouse")
        .arg(&wh)
        .args(["check", "all", "--max-age", "1000d", "--metrics-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("adsmetrics_check_passed{check=\"reconcile\"} 1"),
        "{text}"
    );
    assert!(!dir.path().join("textfile/adsmetrics.prom.tmp").exists());
    known.extend(exposed(&text));

    let used = metric_names(&rules());
    assert!(used.len() >= 10, "{used:?}");
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml names metrics nothing exports: {unknown:?}\nexported: {known:?}"
    );
}

#[test]
fn every_alert_links_a_runbook_entry_that_exists() {
    let runbook = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    // GitHub's anchors: a heading's text, lower-cased, spaces to dashes, punctuation dropped.
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(|h| {
            h.trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let rules = rules();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: docs/operations.md#"))
        .collect();
    assert_eq!(alerts.len(), links.len(), "an alert without a runbook_url");
    for (alert, link) in alerts.iter().zip(&links) {
        assert_eq!(*link, alert.to_lowercase(), "{alert} links another entry");
        assert!(
            anchors.contains(*link),
            "{alert}: docs/operations.md has no heading for #{link}"
        );
    }
}

fn promtool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
}

fn run(tool: &Path, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let Some(tool) = promtool() else {
        eprintln!("SKIPPED: promtool is not installed (scripts/setup-promtool installs it)");
        return;
    };
    run(&tool, &["check", "rules", "alerts.yml"]);
    run(&tool, &["test", "rules", "alerts_test.yml"]);
}

#[test]
fn a_batch_run_serves_its_counters_on_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // Thirty source days in generations of two: the counters add up every generation.
    let events = common::thirty_days(dir.path(), 3000);
    let mut registry = Registry::default();
    let counters = adsmetrics::metrics::RunCounters::register(&mut registry);
    let server =
        adsmetrics::metrics::MetricsServer::start("127.0.0.1:0", std::sync::Arc::new(registry))
            .unwrap();
    let wh = adsmetrics::warehouse::Warehouse::new(dir.path().join("wh"));
    let summary = adsmetrics::runtime::ingest(
        &wh,
        &[dir.path().join("logs")],
        adsmetrics::runtime::IngestOptions {
            workers: 2,
            metrics: Some(counters),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(summary.generations > 1, "{summary:?}");
    let text = ureq::get(format!("http://{}/metrics", server.local_addr()))
        .call()
        .expect("GET /metrics")
        .body_mut()
        .read_to_string()
        .unwrap();
    let value = |line: &str| -> f64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
    let sample = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(value)
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(
        sample("adsmetrics_events_accepted_total"),
        summary.events_accepted as f64
    );
    assert!(summary.events_accepted as usize > events.len() / 2);
    let by_kind: f64 = text
        .lines()
        .filter(|l| l.starts_with("adsmetrics_events_accepted_by_kind_total{"))
        .map(value)
        .sum();
    assert_eq!(by_kind, summary.events_accepted as f64, "{text}");
    assert_eq!(
        sample("adsmetrics_partitions_published_total"),
        summary.partitions_published as f64
    );
    assert_eq!(
        sample("adsmetrics_events_duplicate_total"),
        summary.in_source_duplicates as f64
    );
    assert!(sample("adsmetrics_resident_memory_bytes") > 0.0);
}
