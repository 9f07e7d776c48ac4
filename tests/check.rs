//! `check reconcile`: passes on clean data (also after a correction and with a day range), and
//! fails, naming the partition and the reason, on an edited curated file, a deleted partition
//! file and a raw file that no longer matches what was published; the command exits 12 then.

mod common;

use std::process::Command;

use adsmetrics::check::{reconcile, DayRange, Problem};
use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::{Grain, PartitionId};
use common::*;

fn loaded(dir: &std::path::Path) -> Warehouse {
    thirty_days(dir, 3000);
    let wh = Warehouse::new(dir.join("wh"));
    ingest(&wh, &[dir.join("logs")], IngestOptions::default()).unwrap();
    wh
}

fn all(wh: &Warehouse) -> adsmetrics::check::Reconciliation {
    reconcile(wh, DayRange::default(), 2).unwrap()
}

fn some_hour(wh: &Warehouse) -> PartitionId {
    *published_tables(wh)
        .keys()
        .find(|id| id.grain == Grain::Hourly)
        .unwrap()
}

#[test]
fn clean_data_passes_whole_and_by_range_and_after_a_correction() {
    let dir = tempfile::tempdir().unwrap();
    let wh = loaded(dir.path());
    let report = all(&wh);
    assert!(report.passed, "{}", report.text());
    assert_eq!(report.partitions, published_tables(&wh).len());
    assert_eq!(report.matched, report.partitions);
    let a = &report.accounting;
    assert!(a.balanced && a.curated_events == report.events as u64 && a.raw_rows > 0);
    assert_eq!(a.raw_rows - a.deleted - a.superseded, a.curated_events);

    // A correction: revised versions of some events, a day late.
    let mut events = sample_events(3000, 30);
    for e in &mut events {
        e.event_time_us += (e.user_id % 30) * DAY_US;
    }
    let mut revised: Vec<_> = events.iter().step_by(7).cloned().collect();
    for e in &mut revised {
        e.revision += 1;
        e.cost_micros = Some(e.cost_micros.unwrap_or(0) + 1000);
    }
    write_parquet(&dir.path().join("fix/part-0.parquet"), &revised);
    ingest(&wh, &[dir.path().join("fix")], IngestOptions::default()).unwrap();
    assert!(all(&wh).passed);

    let day = adsmetrics::warehouse::parse_day("2026-11-05").unwrap();
    let ranged = reconcile(
        &wh,
        DayRange {
            from: Some(day),
            to: Some(day + 2),
        },
        2,
    )
    .unwrap();
    assert!(ranged.passed, "{}", ranged.text());
    assert!(ranged.partitions > 0 && ranged.partitions < report.partitions);
}

#[test]
fn an_edited_curated_value_fails_for_that_partition_only() {
    let dir = tempfile::tempdir().unwrap();
    let wh = loaded(dir.path());
    let id = some_hour(&wh);
    let path = wh.partition_file(&id);
    let mut rows = adsmetrics::sink::curated::read_partition(&path).unwrap();
    rows[0].1.clicks += 1;
    let version = adsmetrics::sink::curated::file_version(&path).unwrap();
    let bytes = adsmetrics::sink::curated::encode_partition(&id, &rows, &version, &path).unwrap();
    std::fs::write(&path, bytes).unwrap();

    let report = all(&wh);
    assert!(!report.passed);
    assert_eq!(report.findings.len(), 1, "{}", report.text());
    let finding = &report.findings[0];
    assert_eq!(
        finding.partition,
        format!(
            "ads_metrics_hourly/{}",
            adsmetrics::warehouse::partition_path(&id)
        )
    );
    assert!(matches!(
        finding.problem,
        Problem::NotTheJournalsVersion { .. }
    ));
}

#[test]
fn a_deleted_partition_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let wh = loaded(dir.path());
    let id = some_hour(&wh);
    std::fs::remove_file(wh.partition_file(&id)).unwrap();
    let report = all(&wh);
    assert_eq!(report.findings.len(), 1, "{}", report.text());
    assert!(matches!(
        report.findings[0].problem,
        Problem::Unreadable { .. }
    ));
}

#[test]
fn a_raw_file_that_no_longer_matches_the_tables_fails_with_the_rows_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let wh = loaded(dir.path());
    let raw = adsmetrics::sink::raw::list_raw_files(&wh);
    std::fs::remove_file(&raw[raw.len() / 2]).unwrap();
    let report = all(&wh);
    assert!(!report.passed);
    assert!(!report.accounting.balanced, "{}", report.text());
    assert!(report.accounting.curated_events > report.events as u64);
    let differing: Vec<_> = report
        .findings
        .iter()
        .filter_map(|f| match &f.problem {
            Problem::RowsDiffer { rows, first } => Some((rows, first)),
            Problem::Unexpected => None,
            other => panic!("{}: {other:?}", f.partition),
        })
        .collect();
    assert!(!differing.is_empty(), "{}", report.text());
    // The published rows count the removed file's events: more than the raw layer now holds.
    for (_, first) in differing {
        for d in first {
            let published = d.published.as_ref().unwrap();
            let impressions = d.expected.as_ref().map_or(0, |e| e.impressions);
            let clicks = d.expected.as_ref().map_or(0, |e| e.clicks);
            let conversions = d.expected.as_ref().map_or(0, |e| e.conversions);
            assert!(
                published.impressions + published.clicks + published.conversions
                    > impressions + clicks + conversions
            );
        }
    }
}

#[test]
fn the_command_exits_12_with_a_json_report_when_it_fails_and_0_when_it_passes() {
    let dir = tempfile::tempdir().unwrap();
    let wh = loaded(dir.path());
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_adsmetrics"))
            .arg("--warehouse")
            .arg(wh.root())
            .args(["check", "reconcile", "--format", "json"])
            .output()
            .unwrap()
    };
    let ok = run();
    assert_eq!(ok.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(json["passed"], true);

    std::fs::remove_file(wh.partition_file(&some_hour(&wh))).unwrap();
    let failed = run();
    assert_eq!(failed.status.code(), Some(12));
    let json: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(json["passed"], false);
    assert_eq!(json["findings"][0]["problem"], "unreadable");
}

#[test]
fn duplicates_pass_on_clean_data_and_fail_on_an_hour_of_injected_resends() {
    use adsmetrics::check::{duplicates, DuplicateThresholds};
    let dir = tempfile::tempdir().unwrap();
    let wh = loaded(dir.path());
    let clean = duplicates(&wh, DayRange::default(), DuplicateThresholds::default(), 2).unwrap();
    assert!(clean.passed, "{}", clean.text());
    assert!(clean.raw_rows > 0);
    assert!(clean.hours.iter().all(|h| h.alert.is_none()));

    // A producer resends one hour's events whole, from another source.
    let events = decode_dir(&dir.path().join("logs"));
    let hour = events[0].event_time_us.div_euclid(3_600_000_000);
    let producer = events[0].producer.clone();
    let resent: Vec<_> = events
        .iter()
        .filter(|e| e.event_time_us.div_euclid(3_600_000_000) == hour && e.producer == producer)
        .cloned()
        .collect();
    write_parquet(&dir.path().join("resend/part-0.parquet"), &resent);
    ingest(&wh, &[dir.path().join("resend")], IngestOptions::default()).unwrap();
    assert!(all(&wh).passed, "a resend changes no table");

    let report = duplicates(&wh, DayRange::default(), DuplicateThresholds::default(), 2).unwrap();
    assert!(!report.passed);
    let alerting: Vec<_> = report.hours.iter().filter(|h| h.alert.is_some()).collect();
    assert_eq!(alerting.len(), 1, "{}", report.text());
    assert_eq!(alerting[0].producer, producer.as_str());
    assert!(alerting[0].rate >= 0.5, "every row of the hour came twice");
    assert_eq!(
        alerting[0].raw_rows,
        2 * alerting[0].distinct_keys,
        "{}",
        report.text()
    );

    let code = Command::new(env!("CARGO_BIN_EXE_adsmetrics"))
        .arg("--warehouse")
        .arg(wh.root())
        .args(["check", "duplicates"])
        .output()
        .unwrap()
        .status
        .code();
    assert_eq!(code, Some(10));
}

/// 24 hours of generated logs (every hour has rows of every producer), nothing late, resent or
/// replayed (which would put an hour's events in other hours' folders too), one
/// producer's folder of hour 05 left out; returns the warehouse loaded from the rest.
fn generated_with_a_gap(dir: &std::path::Path) -> Warehouse {
    let config = adsmetrics::generate::GenerateConfig {
        events: 20_000,
        hours: 24,
        start: "2026-11-01".into(),
        late_rate: 0.0,
        bad_rate: 0.0,
        resend_rate: 0.0,
        replayed_files: 0,
        correction_rate: 0.0,
        ..Default::default()
    };
    let logs = dir.join("logs");
    adsmetrics::generate::generate(&config, &logs, &|_| {}).unwrap();
    let held_back = logs.join("dt=2026-11-01/hr=05/producer=ios");
    std::fs::rename(&held_back, dir.join("held-back")).unwrap();
    let wh = Warehouse::new(dir.join("wh"));
    ingest(&wh, &[logs], IngestOptions::default()).unwrap();
    wh
}

#[test]
fn partitions_find_an_empty_hour_a_missing_partition_and_staging_leftovers() {
    use adsmetrics::check::partitions;
    let dir = tempfile::tempdir().unwrap();
    let wh = generated_with_a_gap(dir.path());
    let report = partitions(&wh, DayRange::default(), 2).unwrap();
    assert!(!report.passed);
    assert_eq!(report.gaps.len(), 1, "{}", report.text());
    assert_eq!(report.gaps[0].producer, "ios");
    assert_eq!(report.gaps[0].hours, vec!["2026-11-01T05".to_string()]);
    assert!(report.missing_curated.is_empty() && report.staged_files == 0);
    assert!(
        all(&wh).passed,
        "the tables are right for what was ingested"
    );

    // The hour arrives: clean.
    ingest(
        &wh,
        &[dir.path().join("held-back")],
        IngestOptions::default(),
    )
    .unwrap();
    let clean = partitions(&wh, DayRange::default(), 2).unwrap();
    assert!(clean.passed, "{}", clean.text());
    assert_eq!(clean.producers.len(), 4);

    // A published partition file disappears; a run leaves a file in staging.
    let hour = adsmetrics::warehouse::parse_day("2026-11-01").unwrap() * 24 + 7;
    let id = PartitionId {
        grain: Grain::Hourly,
        period: hour,
    };
    std::fs::remove_file(wh.partition_file(&id)).unwrap();
    let staged = wh.staging_dir().join("leftover.parquet");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::write(&staged, b"x").unwrap();
    let broken = partitions(&wh, DayRange::default(), 2).unwrap();
    assert_eq!(
        broken.missing_curated,
        vec!["ads_metrics_hourly/dt=2026-11-01/hr=07".to_string()]
    );
    assert_eq!(broken.staged_files, 1);
    let code = Command::new(env!("CARGO_BIN_EXE_adsmetrics"))
        .arg("--warehouse")
        .arg(wh.root())
        .args([
            "check",
            "partitions",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-01",
        ])
        .output()
        .unwrap()
        .status
        .code();
    assert_eq!(code, Some(11));
}

#[test]
fn freshness_fails_when_the_newest_partition_is_older_than_the_limit_and_all_gates_in_order() {
    use adsmetrics::check::freshness;
    let dir = tempfile::tempdir().unwrap();
    let wh = generated_with_a_gap(dir.path());
    // The newest hour is 2026-11-01T23: it ends at midnight.
    let midnight = adsmetrics::warehouse::parse_day("2026-11-02").unwrap() * 86_400_000_000;
    let hour_us = 3_600_000_000;
    let fresh = freshness(&wh, midnight + hour_us, 2 * 3600).unwrap();
    assert!(fresh.passed, "{}", fresh.text());
    assert_eq!(fresh.tables[0].age_seconds, Some(3600));
    assert_eq!(fresh.curated_lag_hours, Some(0));
    let stale = freshness(&wh, midnight + 3 * hour_us, 2 * 3600).unwrap();
    assert!(!stale.passed);
    assert!(stale.tables.iter().all(|t| t.stale), "{}", stale.text());

    let check = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_adsmetrics"))
            .arg("--warehouse")
            .arg(wh.root())
            .arg("check")
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    let at = ["--now", "2026-11-02T03:00:00Z"];
    assert_eq!(
        check(&[&["freshness", "--max-age", "2h"][..], &at].concat()),
        Some(13)
    );
    assert_eq!(
        check(&[&["freshness", "--max-age", "4h"][..], &at].concat()),
        Some(0)
    );
    // The gap fails `partitions` (11), which comes before freshness (13) in `all`.
    assert_eq!(
        check(&[&["all", "--max-age", "2h"][..], &at].concat()),
        Some(11)
    );
    ingest(
        &wh,
        &[dir.path().join("held-back")],
        IngestOptions::default(),
    )
    .unwrap();
    assert_eq!(
        check(&[&["all", "--max-age", "2h"][..], &at].concat()),
        Some(13)
    );
    assert_eq!(
        check(&[&["all", "--max-age", "4h"][..], &at].concat()),
        Some(0)
    );

    // Every run above is in dq_results: 2 freshness rows, then 4 per `all`.
    let mut rows = Vec::new();
    for entry in walkdir::WalkDir::new(adsmetrics::check::results_dir(&wh)).sort_by_file_name() {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let file = std::fs::File::open(entry.path()).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let column = |name: &str| batch.column_by_name(name).unwrap().clone();
            let (checks, passed) = (column("check"), column("passed"));
            let checks = checks
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            let passed = passed
                .as_any()
                .downcast_ref::<arrow::array::BooleanArray>()
                .unwrap();
            for i in 0..batch.num_rows() {
                rows.push((checks.value(i).to_string(), passed.value(i)));
            }
        }
    }
    assert_eq!(rows.len(), 2 + 3 * 4, "{rows:?}");
    let failed: Vec<&str> = rows.iter().filter(|r| !r.1).map(|r| r.0.as_str()).collect();
    // freshness at 2h; `all` at 2h (partitions, freshness); after the fix at 2h (freshness).
    assert_eq!(
        failed,
        ["freshness", "partitions", "freshness", "freshness"],
        "{rows:?}"
    );
}

#[test]
fn duplicates_compare_each_hour_with_its_producers_trailing_week_even_before_the_range() {
    use adsmetrics::check::{duplicates, DuplicateThresholds};
    let dir = tempfile::tempdir().unwrap();
    let config = adsmetrics::generate::GenerateConfig {
        events: 20_000,
        hours: 48,
        start: "2026-11-01".into(),
        late_rate: 0.0,
        bad_rate: 0.0,
        resend_rate: 0.0,
        replayed_files: 0,
        correction_rate: 0.0,
        ..Default::default()
    };
    let logs = dir.path().join("logs");
    adsmetrics::generate::generate(&config, &logs, &|_| {}).unwrap();
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, std::slice::from_ref(&logs), IngestOptions::default()).unwrap();

    // Day 1 has a producer's usual 2% of resends; on day 2 it resends 8% of its events, every
    // hour: under the 10% limit, and day 2 alone looks uniform.
    let events = decode_dir(&logs);
    let producer = events[0].producer.clone();
    let day = |e: &adsmetrics::event::Event| e.event_time_us.div_euclid(86_400_000_000);
    let first_day = day(&events[0]).min(day(events.last().unwrap()));
    let resent: Vec<_> = events
        .iter()
        .filter(|e| e.producer == producer)
        .enumerate()
        .filter(|(i, e)| {
            if day(e) == first_day {
                i % 50 == 0
            } else {
                i % 12 == 0
            }
        })
        .map(|(_, e)| e.clone())
        .collect();
    write_parquet(&dir.path().join("resend/part-0.parquet"), &resent);
    ingest(&wh, &[dir.path().join("resend")], IngestOptions::default()).unwrap();

    let second = DayRange {
        from: Some(first_day + 1),
        to: Some(first_day + 1),
    };
    let report = duplicates(&wh, second, DuplicateThresholds::default(), 2).unwrap();
    let alerting: Vec<_> = report.hours.iter().filter(|h| h.alert.is_some()).collect();
    assert!(!alerting.is_empty(), "{}", report.text());
    assert!(alerting.iter().all(|h| h.producer == producer.as_str()));
    assert!(
        alerting.iter().all(|h| h.rate < 0.10),
        "the limit did not fire"
    );
    assert!(
        alerting[0]
            .alert
            .as_deref()
            .unwrap()
            .contains("trailing week"),
        "{:?}",
        alerting[0].alert
    );
    assert!(report
        .hours
        .iter()
        .all(|h| h.hour.starts_with("2026-11-02")));

    // Without the comparison nothing alerts: it is the trailing week that sees the change.
    let limit_only = DuplicateThresholds {
        vs_median: None,
        ..DuplicateThresholds::default()
    };
    assert!(duplicates(&wh, second, limit_only, 2).unwrap().passed);
}

/// The raw layer holds one file per source and event day, every row of it in that day; the
/// hourly-layout files of a source (what an older version left when its run crashed before the
/// commit) are removed when the source is written again, also from the listing the next
/// hot-window generation opens with (it would read the gone file), so no row is in the raw layer
/// twice and the raw layer is byte for byte the one a fresh warehouse gets. That includes a file
/// of a day the source has no events in now (every one deleted since the crash), whose rows
/// would otherwise come back with the source's commit.
#[test]
fn raw_files_are_per_source_and_day_and_replace_an_older_hourly_layout() {
    let dir = tempfile::tempdir().unwrap();
    // Two sources in two source days (two generations of a one-day hot window), each with
    // events on both event days and the same users, so the second rebuilds from the first.
    let first_events = sample_events(2000, 41);
    let first = dir.path().join("in/dt=2026-11-02/a.parquet");
    write_parquet(&first, &first_events);
    write_parquet(
        &dir.path().join("in/dt=2026-11-03/b.parquet"),
        &sample_events(500, 42),
    );
    let options = || IngestOptions {
        hot_window_days: Some(1),
        ..IngestOptions::default()
    };
    let fresh = Warehouse::new(dir.path().join("fresh"));
    let run = ingest(&fresh, &[dir.path().join("in")], options()).unwrap();
    assert_eq!(run.memory.len(), 2, "two generations");
    let relative = |wh: &Warehouse| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        adsmetrics::sink::raw::list_raw_files(wh)
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p.strip_prefix(wh.root()).unwrap().to_path_buf(), bytes)
            })
            .collect()
    };
    let files = relative(&fresh);
    assert_eq!(files.len(), 4, "two sources, two event days each");
    for (path, _) in &files {
        let parts: Vec<_> = path.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(parts.len(), 3, "raw/dt=…/src-….parquet: {path:?}");
        let day = adsmetrics::scope::raw_day(&fresh, &fresh.root().join(path)).unwrap();
        let bytes = bytes::Bytes::from(std::fs::read(fresh.root().join(path)).unwrap());
        let hours = adsmetrics::sink::raw::RawFile::open(path, bytes)
            .unwrap()
            .key_producer_hours()
            .unwrap()
            .hours;
        assert!(!hours.is_empty() && hours.iter().all(|h| h.div_euclid(24) == day));
    }

    // An older version's hourly file of the first source, left by a crashed run, in an hour of
    // its first event day that it has events in.
    let hash = adsmetrics::source::identify(std::slice::from_ref(&first), 1).unwrap()[0]
        .content_hash
        .clone();
    let name = format!("src-{hash}.parquet");
    let (day_file, bytes) = files.iter().find(|(p, _)| p.ends_with(&name)).unwrap();
    let day = adsmetrics::scope::raw_day(&fresh, &fresh.root().join(day_file)).unwrap();
    let hour = first_events
        .iter()
        .map(|e| e.event_time_us.div_euclid(DAY_US / 24))
        .find(|h| h.div_euclid(24) == day)
        .unwrap();
    let old = Warehouse::new(dir.path().join("old"));
    let hourly = old
        .root()
        .join("raw")
        .join(adsmetrics::warehouse::hour_path(hour))
        .join(&name);
    // And one of an hour ten days before, when the source has no events now.
    let emptied = old
        .root()
        .join("raw")
        .join(adsmetrics::warehouse::hour_path(hour - 240))
        .join(&name);
    for path in [&hourly, &emptied] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let listed = |wh: &Warehouse, path| adsmetrics::sink::raw::list_raw_files(wh).contains(path);
    assert!(listed(&old, &hourly) && listed(&old, &emptied));
    ingest(&old, &[dir.path().join("in")], options()).unwrap();
    assert!(!listed(&old, &hourly), "the hourly-layout file is gone");
    assert!(
        !listed(&old, &emptied),
        "so is the one of a day without events"
    );
    assert_eq!(relative(&old), files);
    assert!(published_tables(&old) == published_tables(&fresh));
    assert!(all(&old).passed);
}
