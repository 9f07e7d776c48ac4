//! `adsmetrics report --out report.html`: a page that works offline, whose charts hold the
//! warehouse's figures (duplicate rates, late arrivals, partition versions), the same bytes for
//! the same warehouse.

use std::collections::BTreeSet;
use std::process::Command;

use adsmetrics::journal::CommitJournal;
use adsmetrics::sink::late::read_lateness;
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::Grain;

const BIN: &str = env!("CARGO_BIN_EXE_adsmetrics");

fn run(args: &[&str]) -> std::process::Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    out
}

#[test]
fn the_report_charts_duplicates_late_arrivals_and_versions_offline_and_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let wh = dir.path().join("wh");
    let (src_s, wh_s) = (src.to_str().unwrap(), wh.to_str().unwrap());
    run(&[
        "generate", "--out", src_s, "--events", "6000", "--hours", "48",
    ]);
    // Sources in several epochs, so the later ones arrive after partitions were published.
    run(&[
        "--warehouse",
        wh_s,
        "ingest",
        "--quiet",
        "--epoch-sources",
        "40",
        src_s,
    ]);

    let page_path = dir.path().join("report.html");
    let page = |path: &std::path::Path| {
        run(&[
            "--warehouse",
            wh_s,
            "report",
            "--out",
            path.to_str().unwrap(),
            "--now",
            "2026-12-01T00:00:00Z",
        ]);
        std::fs::read_to_string(path).unwrap()
    };
    let html = page(&page_path);

    // Offline: nothing to fetch, nothing to run.
    assert!(!html.contains("<script"), "a script in the report");
    let links: Vec<&str> = html
        .match_indices("http")
        .map(|(i, _)| &html[i..])
        .collect();
    assert!(
        links
            .iter()
            .all(|l| l.starts_with("http://www.w3.org/2000/svg")),
        "a network address in the report"
    );
    assert_eq!(html.matches("<svg").count(), 3, "three charts");

    // Duplicates: a line per producer the raw layer has.
    for producer in ["android", "ios", "server", "web"] {
        assert!(
            html.contains(&format!(r#"data-series="{producer}""#)),
            "no line for {producer}"
        );
    }

    // Late arrivals: one bar per event day with late events, the total as the table says.
    let warehouse = Warehouse::new(&wh);
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path()).unwrap();
    let lateness = read_lateness(&warehouse, journal.consumed()).unwrap();
    let daily: Vec<_> = lateness
        .iter()
        .filter(|(id, _)| id.grain == Grain::Daily)
        .collect();
    let total: u64 = daily.iter().map(|(_, l)| l.events).sum();
    assert!(total > 0, "the epochs produced no late arrivals to chart");
    assert!(
        html.contains(&format!("{total} late events")),
        "late total {total} not in the report"
    );
    let bars = html.matches("<rect x=").count() - html.matches(r#"width="10" height="10""#).count();
    assert_eq!(bars, daily.len(), "one bar per event day with late events");

    // Versions: a line per table, ending at the number of versions the ledger lists.
    assert!(html.contains(r#"data-series="ads_metrics_hourly""#));
    assert!(html.contains(r#"data-series="ads_metrics_daily""#));
    let ledger = adsmetrics::ledger::Ledger::open(&warehouse.ledger_path()).unwrap();
    let kinds: BTreeSet<String> = ledger
        .entries()
        .iter()
        .map(|e| format!("{:?}", e.body.kind).to_lowercase())
        .collect();
    for kind in kinds {
        assert!(html.contains(&kind), "run kind {kind} not in the report");
    }

    // The same warehouse, the same bytes.
    let again = page(&dir.path().join("again.html"));
    assert_eq!(html, again);
}
