//! The synthetic data generator: determinism, layout, counts, and agreement between the files and
//! the in-memory variant. Small runs only, so they stay fast in debug builds.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use adsmetrics::event::Event;
use adsmetrics::generate::{
    advertiser_of, campaign_of, generate, generate_events, generate_with_threads, ip_of, Format,
    GenerateConfig, GenerateError, GenerateSummary, PRODUCERS, SPILL_HOURS,
};
use adsmetrics_dataflows::{Country, EventType, MICROS_PER_HOUR};
use arrow::array::{
    Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

/// A small run with every kind of mess turned up so each shows in a few thousand events.
fn config(seed: u64, format: Format) -> GenerateConfig {
    GenerateConfig {
        events: 20_000,
        seed,
        start: "2026-11-01T22:00:00Z".into(),
        hours: 3,
        ads: 500,
        users: 5_000,
        resend_rate: 0.05,
        replayed_files: 3,
        late_rate: 0.05,
        missing_id_rate: 0.02,
        correction_rate: 0.01,
        bad_rate: 0.01,
        format,
        files_per_hour: 2,
        ..GenerateConfig::default()
    }
}

fn run(config: &GenerateConfig, threads: usize) -> (tempfile::TempDir, GenerateSummary) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let summary = generate_with_threads(config, &out, threads, &|_| {}).unwrap();
    (dir, summary)
}

/// Every file under `root`, relative, sorted by name.
fn files(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A file's place in the layout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    /// Hours since the Unix epoch, from `dt=` and `hr=`.
    hour: i64,
    producer: usize,
    part: u32,
    replay: bool,
    parquet: bool,
}

/// Parses `dt=YYYY-MM-DD/hr=HH/producer=<p>/part-NNNN[-replay].<ext>`, panicking on anything else.
fn slot(rel: &Path) -> Slot {
    let parts: Vec<&str> = rel.iter().map(|c| c.to_str().unwrap()).collect();
    assert_eq!(parts.len(), 4, "{rel:?}");
    let day = chrono::NaiveDate::parse_from_str(parts[0].strip_prefix("dt=").unwrap(), "%Y-%m-%d")
        .unwrap_or_else(|_| panic!("bad dt in {rel:?}"));
    let hr = parts[1].strip_prefix("hr=").unwrap();
    assert_eq!(hr.len(), 2, "{rel:?}");
    let hr: i64 = hr.parse().unwrap();
    assert!(hr < 24);
    let hour = day.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() / 3600 + hr;
    let producer = PRODUCERS
        .iter()
        .position(|p| parts[2] == format!("producer={p}"))
        .unwrap_or_else(|| panic!("bad producer in {rel:?}"));
    let (stem, ext) = parts[3].rsplit_once('.').unwrap();
    let parquet = match ext {
        "parquet" => true,
        "jsonl" => false,
        _ => panic!("bad extension in {rel:?}"),
    };
    let number = stem.strip_prefix("part-").unwrap();
    let (number, replay) = match number.strip_suffix("-replay") {
        Some(n) => (n, true),
        None => (number, false),
    };
    assert_eq!(number.len(), 4, "{rel:?}");
    Slot {
        hour,
        producer,
        part: number.parse().unwrap(),
        replay,
        parquet,
    }
}

/// A minimal validating reader: the events of a file in order, and how many records are invalid.
fn read(path: &Path, parquet: bool) -> (Vec<Event>, u64) {
    if parquet {
        read_parquet(path)
    } else {
        read_jsonl(path)
    }
}

fn read_parquet(path: &Path) -> (Vec<Event>, u64) {
    let reader = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let (mut events, mut bad) = (Vec::new(), 0);
    for batch in reader {
        let batch: RecordBatch = batch.unwrap();
        let col = |n: &str| batch.column_by_name(n).unwrap().clone();
        let s = |n: &str| {
            col(n)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        let i = |n: &str| {
            col(n)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone()
        };
        let (id, ty, country, ip, producer) = (
            s("event_id"),
            s("event_type"),
            s("country"),
            s("ip"),
            s("producer"),
        );
        let (ad, campaign, advertiser, user, cost, revenue) = (
            i("ad_id"),
            i("campaign_id"),
            i("advertiser_id"),
            i("user_id"),
            i("cost_micros"),
            i("revenue_micros"),
        );
        let time = col("event_time");
        let time = time
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        let revision = col("revision");
        let revision = revision.as_any().downcast_ref::<UInt32Array>().unwrap();
        let opt = |a: &Int64Array, r: usize| (!a.is_null(r)).then(|| a.value(r));
        for r in 0..batch.num_rows() {
            let (Some(event_type), Some(country)) = (
                EventType::parse(ty.value(r)),
                Country::parse(country.value(r)),
            ) else {
                bad += 1;
                continue;
            };
            let (cost_micros, revenue_micros) = (opt(&cost, r), opt(&revenue, r));
            if cost_micros.is_some_and(|c| c < 0) || revenue_micros.is_some_and(|c| c < 0) {
                bad += 1;
                continue;
            }
            events.push(Event {
                event_id: (!id.is_null(r)).then(|| id.value(r).into()),
                event_type,
                event_time_us: time.value(r),
                ad_id: ad.value(r),
                campaign_id: campaign.value(r),
                advertiser_id: advertiser.value(r),
                country,
                user_id: user.value(r),
                ip: ip.value(r).into(),
                cost_micros,
                revenue_micros,
                producer: producer.value(r).into(),
                revision: revision.value(r),
            });
        }
    }
    (events, bad)
}

fn read_jsonl(path: &Path) -> (Vec<Event>, u64) {
    let bytes = fs::read(path).unwrap();
    assert!(bytes.ends_with(b"\n"));
    let (mut events, mut bad) = (Vec::new(), 0);
    for line in bytes[..bytes.len() - 1].split(|&b| b == b'\n') {
        match json_event(line) {
            Some(e) => events.push(e),
            None => bad += 1,
        }
    }
    (events, bad)
}

fn json_event(line: &[u8]) -> Option<Event> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let int = |k: &str| v.get(k)?.as_i64();
    let opt_amount = |k: &str| match v.get(k) {
        Some(Value::Null) | None => Some(None),
        Some(x) => x.as_i64().filter(|&a| a >= 0).map(Some),
    };
    let event_time_us = match v.get("event_time")? {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_micros(),
        x => x.as_i64()?,
    };
    Some(Event {
        event_id: match v.get("event_id")? {
            Value::Null => None,
            x => Some(x.as_str()?.into()),
        },
        event_type: EventType::parse(v.get("event_type")?.as_str()?)?,
        event_time_us,
        ad_id: int("ad_id")?,
        campaign_id: int("campaign_id")?,
        advertiser_id: int("advertiser_id")?,
        country: Country::parse(v.get("country")?.as_str()?)?,
        user_id: int("user_id")?,
        ip: v.get("ip")?.as_str()?.into(),
        cost_micros: opt_amount("cost_micros")?,
        revenue_micros: opt_amount("revenue_micros")?,
        producer: v.get("producer")?.as_str()?.into(),
        revision: match v.get("revision") {
            None => 0,
            Some(x) => u32::try_from(x.as_u64()?).ok()?,
        },
    })
}

/// Every file of a run in delivery order, with its slot.
fn delivery_order(root: &Path) -> Vec<(PathBuf, Slot)> {
    let mut all: Vec<(PathBuf, Slot)> = files(root)
        .into_iter()
        .map(|f| (f.clone(), slot(&f)))
        .collect();
    all.sort_by(|a, b| a.1.cmp(&b.1));
    all
}

#[test]
fn same_seed_same_bytes_whatever_the_threads_and_other_seed_differs() {
    let (a, sa) = run(&config(7, Format::Mixed), 0);
    let (b, sb) = run(&config(7, Format::Mixed), 1);
    let (c, sc) = run(&config(8, Format::Mixed), 3);
    let (a, b, c) = (
        a.path().join("out"),
        b.path().join("out"),
        c.path().join("out"),
    );
    assert_eq!(sa, sb);
    let list = files(&a);
    assert!(list.len() > 20, "{list:?}");
    assert_eq!(list, files(&b));
    for f in &list {
        assert_eq!(
            fs::read(a.join(f)).unwrap(),
            fs::read(b.join(f)).unwrap(),
            "{f:?}"
        );
    }
    assert_ne!(sa, sc);
    let differs = files(&c)
        .iter()
        .any(|f| !list.contains(f) || fs::read(a.join(f)).unwrap() != fs::read(c.join(f)).unwrap());
    assert!(differs);
}

#[test]
fn layout_counts_and_files_agree_with_generate_events() {
    let cfg = config(11, Format::Mixed);
    let (dir, summary) = run(&cfg, 0);
    let root = dir.path().join("out");
    let start_hour = 1_793_570_400 / 3600; // 2026-11-01T22:00:00Z
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(&cfg.start)
            .unwrap()
            .timestamp(),
        1_793_570_400
    );

    let order = delivery_order(&root);
    let mut rows = 0;
    let mut bytes = 0;
    let mut bad = 0;
    let mut replays = 0;
    let mut replay_rows = 0;
    let mut replay_bad = 0;
    let mut decoded = Vec::new();
    let mut late_seen = 0;
    for (rel, s) in &order {
        // Mixed: web and server write Parquet, ios and android JSON Lines.
        assert_eq!(
            s.parquet,
            matches!(PRODUCERS[s.producer], "web" | "server"),
            "{rel:?}"
        );
        assert!(s.part < cfg.files_per_hour);
        assert!(s.hour >= start_hour && s.hour < start_hour + (cfg.hours + SPILL_HOURS) as i64);
        let path = root.join(rel);
        bytes += fs::metadata(&path).unwrap().len();
        let (events, b) = read(&path, s.parquet);
        assert!(!events.is_empty() || b > 0, "empty file {rel:?}");
        rows += events.len() as u64 + b;
        bad += b;
        if s.replay {
            replays += 1;
            replay_rows += events.len() as u64 + b;
            replay_bad += b;
            let original = rel.with_file_name(
                rel.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .replace("-replay", ""),
            );
            assert_eq!(
                fs::read(&path).unwrap(),
                fs::read(root.join(original)).unwrap(),
                "{rel:?}"
            );
        }
        for e in &events {
            // Delivered in its event hour or later, by its own producer, with consistent dims.
            let event_hour = e.event_time_us.div_euclid(MICROS_PER_HOUR);
            assert!(event_hour <= s.hour, "{rel:?} holds a future event {e:?}");
            assert!(event_hour >= start_hour && event_hour < start_hour + cfg.hours as i64);
            late_seen += u64::from(event_hour < s.hour);
            assert_eq!(e.producer, PRODUCERS[s.producer]);
            assert_eq!(e.campaign_id, campaign_of(e.ad_id));
            assert_eq!(e.advertiser_id, advertiser_of(e.ad_id));
            assert!((1..=cfg.ads as i64).contains(&e.ad_id));
            assert!((1..=cfg.users as i64).contains(&e.user_id));
            assert_eq!(e.ip, ip_of(e.user_id));
            assert!(e.ip.parse::<std::net::Ipv4Addr>().is_ok());
            match e.event_type {
                EventType::Conversion => {
                    assert!(e.cost_micros.is_none() && e.revenue_micros.is_some())
                }
                _ => assert!(e.cost_micros.is_some() && e.revenue_micros.is_none()),
            }
            if let Some(id) = &e.event_id {
                let (p, n) = id.split_once('-').unwrap();
                assert_eq!(p, e.producer);
                assert!(n.parse::<u64>().unwrap() < cfg.events);
            }
        }
        decoded.extend(events);
    }

    // The summary matches the files.
    assert_eq!(summary.files, order.len() as u64);
    assert_eq!(summary.records, rows);
    assert_eq!(summary.bytes, bytes);
    assert_eq!(bad, summary.bad_records + replay_bad, "{summary:?}");
    assert_eq!(summary.replayed_files, replays);
    assert_eq!(summary.replayed_files, 3);
    assert_eq!(summary.replayed_records, replay_rows);
    assert_eq!(summary.distinct_events, cfg.events);
    assert_eq!(
        summary.records,
        summary.distinct_events
            + summary.resends
            + summary.corrections
            + summary.replayed_records
            + summary.bad_records,
        "{summary:?}"
    );
    assert!(summary.late > 0 && summary.resends > 0 && summary.corrections > 0);
    assert!(summary.missing_ids > 0 && summary.bad_records > 0);
    assert!(late_seen >= summary.late);

    // The files hold exactly the in-memory run, in delivery order.
    let events = generate_events(&cfg);
    assert_eq!(events.len() as u64, summary.records - bad);
    assert!(decoded == events, "files and generate_events differ");
}

#[test]
fn parquet_and_jsonl_only_runs_hold_their_bad_records_and_match_generate_events() {
    for format in [Format::Parquet, Format::Jsonl] {
        let mut cfg = config(3, format);
        cfg.events = 8_000;
        cfg.bad_rate = 0.05;
        let (dir, summary) = run(&cfg, 0);
        let root = dir.path().join("out");
        let mut decoded = Vec::new();
        let mut bad = 0;
        for (rel, s) in delivery_order(&root) {
            assert_eq!(s.parquet, format == Format::Parquet, "{rel:?}");
            let (events, b) = read(&root.join(&rel), s.parquet);
            decoded.extend(events);
            bad += b;
        }
        assert!(summary.bad_records > 100, "{summary:?}");
        assert!(bad >= summary.bad_records);
        assert_eq!(decoded.len() as u64 + bad, summary.records);
        assert!(decoded == generate_events(&cfg), "{format:?}");
    }
}

#[test]
fn json_lines_mix_time_forms_and_every_kind_of_bad_record() {
    let mut cfg = config(5, Format::Jsonl);
    cfg.events = 10_000;
    cfg.bad_rate = 0.02;
    let (dir, _) = run(&cfg, 0);
    let root = dir.path().join("out");
    let (mut string_times, mut int_times) = (0, 0);
    let mut kinds: BTreeMap<&str, u32> = BTreeMap::new();
    for rel in files(&root) {
        for line in fs::read(root.join(&rel))
            .unwrap()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let Ok(text) = std::str::from_utf8(line) else {
                *kinds.entry("non-utf8").or_default() += 1;
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                *kinds.entry("broken json").or_default() += 1;
                continue;
            };
            match &v["event_time"] {
                Value::String(_) => string_times += 1,
                Value::Number(_) => int_times += 1,
                other => panic!("event_time {other:?}"),
            }
            if v.get("ad_id").is_none() {
                *kinds.entry("missing ad_id").or_default() += 1;
            } else if v["country"] == "../x" {
                *kinds.entry("bad country").or_default() += 1;
            } else if v["event_type"] == "view" {
                *kinds.entry("unknown type").or_default() += 1;
            } else if v["cost_micros"].as_i64().is_some_and(|c| c < 0) {
                *kinds.entry("negative cost").or_default() += 1;
            }
        }
    }
    assert!(string_times > 1000 && int_times > 1000);
    assert_eq!(kinds.len(), 6, "{kinds:?}");
}

#[test]
fn generate_events_is_deterministic_with_identical_resends_and_corrections() {
    let cfg = config(21, Format::Mixed);
    let events = generate_events(&cfg);
    assert!(events == generate_events(&cfg));
    let mut other = cfg.clone();
    other.seed += 1;
    assert!(events != generate_events(&other));

    let mut by_id: HashMap<(&str, &str, u32), Vec<&Event>> = HashMap::new();
    for e in &events {
        if let Some(id) = &e.event_id {
            by_id
                .entry((&e.producer, id, e.revision))
                .or_default()
                .push(e);
        }
    }
    let mut resent = 0;
    for versions in by_id.values() {
        assert!(versions.iter().all(|v| *v == versions[0]), "{versions:?}");
        resent += usize::from(versions.len() > 1);
    }
    assert!(resent > 500, "{resent}");
    let mut corrected = 0;
    for ((producer, id, revision), versions) in &by_id {
        if *revision == 1 {
            corrected += 1;
            let original = by_id[&(*producer, *id, 0)][0];
            let fix = versions[0];
            assert_eq!(fix.dedup_key(), original.dedup_key());
            assert_ne!(fix.content_hash(), original.content_hash());
            assert_ne!(
                (fix.cost_micros, fix.revenue_micros),
                (original.cost_micros, original.revenue_micros)
            );
        }
    }
    assert!(corrected > 50, "{corrected}");
    // Distinct events: every id of 0..events appears, nothing else.
    let distinct: std::collections::HashSet<u64> = events
        .iter()
        .filter_map(|e| e.event_id.as_ref()?.split_once('-')?.1.parse().ok())
        .collect();
    assert!(distinct.len() as u64 > cfg.events * 97 / 100);
    assert!(distinct.iter().all(|&n| n < cfg.events));
    // Roughly the documented type mix.
    let clicks = events
        .iter()
        .filter(|e| e.event_type == EventType::Click)
        .count();
    let impressions = events
        .iter()
        .filter(|e| e.event_type == EventType::Impression)
        .count();
    assert!(impressions > events.len() * 85 / 100 && clicks > events.len() * 6 / 100);
}

#[test]
fn refuses_a_non_empty_directory_and_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("x"), b"").unwrap();
    let cfg = config(1, Format::Mixed);
    assert!(matches!(
        generate(&cfg, dir.path(), &|_| {}),
        Err(GenerateError::OutDirNotEmpty(_))
    ));
    for bad in [
        GenerateConfig {
            hours: 0,
            ..cfg.clone()
        },
        GenerateConfig {
            late_rate: 1.5,
            ..cfg.clone()
        },
        GenerateConfig {
            start: "yesterday".into(),
            ..cfg.clone()
        },
        GenerateConfig {
            files_per_hour: 0,
            ..cfg.clone()
        },
    ] {
        let out = dir.path().join("new");
        assert!(matches!(
            generate(&bad, &out, &|_| {}),
            Err(GenerateError::InvalidConfig(_))
        ));
    }
}

#[test]
fn progress_reaches_the_record_count_and_zero_events_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(2, Format::Mixed);
    cfg.events = 3_000;
    let last = std::cell::Cell::new(0);
    let summary = generate(&cfg, &dir.path().join("out"), &|n| {
        assert!(n >= last.get());
        last.set(n);
    })
    .unwrap();
    assert_eq!(last.get(), summary.records);

    cfg.events = 0;
    let summary = generate(&cfg, &dir.path().join("empty"), &|_| {}).unwrap();
    assert_eq!(summary, GenerateSummary::default());
    assert!(files(&dir.path().join("empty")).is_empty());
}

#[test]
fn the_decoder_accepts_every_valid_record_and_quarantines_every_bad_one() {
    let mut cfg = config(13, Format::Mixed);
    cfg.events = 10_000;
    cfg.bad_rate = 0.03;
    let (dir, summary) = run(&cfg, 0);
    let root = dir.path().join("out");
    let mut events = Vec::new();
    let mut quarantined = 0;
    for (rel, _) in delivery_order(&root) {
        let decoded = adsmetrics::decode::decode_source(
            rel.to_str().unwrap(),
            &fs::read(root.join(&rel)).unwrap(),
        );
        assert!(
            decoded.quarantined.iter().all(|q| q.position != "file"),
            "{rel:?}: {:?}",
            decoded.quarantined
        );
        quarantined += decoded.quarantined.len() as u64;
        events.extend(decoded.events);
    }
    assert!(quarantined >= summary.bad_records && summary.bad_records > 100);
    assert_eq!(events.len() as u64 + quarantined, summary.records);
    assert!(events == generate_events(&cfg));
}

#[test]
fn command_line_defaults_are_the_documented_defaults() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: GenerateConfig,
    }
    let parsed = <Cli as clap::Parser>::parse_from(["generate"]).config;
    assert_eq!(
        format!("{parsed:?}"),
        format!("{:?}", GenerateConfig::default())
    );
    let parsed = <Cli as clap::Parser>::parse_from([
        "generate",
        "--events",
        "5",
        "--format",
        "jsonl",
        "--late-rate",
        "0.5",
        "--files-per-hour",
        "3",
    ])
    .config;
    assert_eq!(
        (
            parsed.events,
            parsed.format,
            parsed.late_rate,
            parsed.files_per_hour
        ),
        (5, Format::Jsonl, 0.5, 3)
    );
}

#[test]
fn a_large_parquet_file_decodes_the_same_split_among_threads() {
    let mut cfg = config(17, Format::Parquet);
    cfg.events = 400_000;
    cfg.hours = 1;
    cfg.files_per_hour = 1;
    cfg.bad_rate = 0.01;
    let (dir, _) = run(&cfg, 0);
    let root = dir.path().join("out");
    let (rel, _) = delivery_order(&root)
        .into_iter()
        .max_by_key(|(rel, _)| fs::metadata(root.join(rel)).unwrap().len())
        .unwrap();
    let label = rel.to_str().unwrap();
    let bytes = fs::read(root.join(&rel)).unwrap();
    let whole = adsmetrics::decode::decode_source(label, &bytes);
    // Enough rows for three parts of at least 32k rows each.
    assert!(whole.events.len() > 3 * 32_768 && !whole.quarantined.is_empty());
    for parts in [2, 3, 8] {
        let split = adsmetrics::decode::decode_source_parallel(label, bytes.clone().into(), parts);
        assert!(split.events == whole.events, "{parts} parts: other events");
        assert!(split.quarantined == whole.quarantined, "{parts} parts");
    }
    // A damaged file is one quarantine record either way.
    let cut = &bytes[..bytes.len() / 2];
    let whole = adsmetrics::decode::decode_source(label, cut);
    let split = adsmetrics::decode::decode_source_parallel(label, cut.to_vec().into(), 2);
    assert_eq!(whole.quarantined.len(), 1);
    assert!(split.quarantined == whole.quarantined && split.events.is_empty());
}
