//! The query API (`/v1/ads/…` of `adsmetrics serve`) through a real HTTP client, against a
//! brute-force recompute over the raw clicks:
//!
//! - random `aggregated_count` ranges and `popular_ads` windows, with and without named filters
//!   (country, IPv4, IPv6 written in a non-canonical form, user, country and user), equal a
//!   count over the deduplicated raw clicks (resends counted once, corrections by their latest
//!   revision, impressions and conversions not at all);
//! - after late clicks and corrections are ingested, the server moves to the new publish by
//!   itself and its answers equal the recompute over everything;
//! - unknown filters, bad minutes and ranges it does not hold are a 400 with a message.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use adsmetrics::event::Event;
use adsmetrics::query::{Clock, Filters, QueryOptions};
use adsmetrics::runtime::ingest;
use adsmetrics::serve::{ClickServer, ServeOptions};
use adsmetrics::spool::SealPolicy;
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::{Country, EventType, Ip};
use common::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// 2026-11-04T00:00:00Z, in minutes.
const BASE_MINUTE: i64 = 1_793_750_400 / 60;
/// The data spans three hours; "now" is the minute after.
const MINUTES: i64 = 180;
const NOW: i64 = BASE_MINUTE + MINUTES;

const FILTERS: &str = r#"{"filters": {
    "us": {"country": "US"},
    "office": {"ip": "192.0.2.7"},
    "v6": {"ip": "2001:db8:0:0::2"},
    "u7": {"user_id": 7},
    "de-u3": {"country": "DE", "user_id": 3}
}}"#;
const IPS: [&str; 5] = [
    "192.0.2.7",
    "198.51.100.1",
    "2001:db8::2",
    "2001:DB8::3",
    "10.1.2.3",
];

/// A filter as the brute force applies it.
fn keeps(filter: Option<&str>, e: &Event) -> bool {
    let ip = Ip::parse(&e.ip).unwrap();
    match filter {
        None => true,
        Some("us") => e.country.as_str() == "US",
        Some("office") => ip == Ip::parse("192.0.2.7").unwrap(),
        Some("v6") => ip == Ip::parse("2001:db8::2").unwrap(),
        Some("u7") => e.user_id == 7,
        Some("de-u3") => e.country.as_str() == "DE" && e.user_id == 3,
        Some(other) => panic!("no filter {other}"),
    }
}

/// `n` events, most of them clicks, over the three hours from `start` on: resends (same id and
/// content) and corrections (same id, higher revision, other ad, country or user) of earlier
/// ones.
fn events(rng: &mut ChaCha8Rng, n: usize, tag: &str, earlier: &[Event]) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(n);
    // Each correction gets a revision of its own, so the latest one is the only winner.
    let mut revisions: HashMap<String, u32> = HashMap::new();
    for e in earlier {
        let r = revisions
            .entry(e.event_id.as_deref().unwrap().into())
            .or_default();
        *r = (*r).max(e.revision);
    }
    for i in 0..n {
        let pool: Vec<&Event> = earlier.iter().chain(out.iter()).collect();
        let roll = rng.random_range(0..100);
        if roll < 15 && !pool.is_empty() {
            let mut e = pool[rng.random_range(0..pool.len())].clone();
            if roll < 5 {
                let latest = revisions
                    .entry(e.event_id.as_deref().unwrap().into())
                    .or_default();
                *latest += 1;
                e.revision = *latest;
                e.ad_id = rng.random_range(0..40);
                e.country = Country([*b"US", *b"DE", *b"FR"][rng.random_range(0..3)]);
                e.user_id = rng.random_range(0..12);
            }
            out.push(e);
            continue;
        }
        let event_type = match rng.random_range(0..10) {
            0 => EventType::Impression,
            1 => EventType::Conversion,
            _ => EventType::Click,
        };
        out.push(Event {
            event_id: Some(format!("{tag}-{i}").into()),
            event_type,
            event_time_us: (BASE_MINUTE * 60 + rng.random_range(0..MINUTES * 60)) * 1_000_000,
            ad_id: rng.random_range(0..40),
            campaign_id: 1,
            advertiser_id: 1,
            country: Country([*b"US", *b"DE", *b"FR"][rng.random_range(0..3)]),
            user_id: rng.random_range(0..12),
            ip: IPS[rng.random_range(0..IPS.len())].into(),
            cost_micros: Some(100),
            revenue_micros: None,
            producer: "click".into(),
            revision: 0,
        });
    }
    out
}

/// The distinct clicks: the latest revision of each event id, clicks only.
fn distinct_clicks(events: &[Event]) -> Vec<Event> {
    let mut latest: BTreeMap<String, &Event> = BTreeMap::new();
    for e in events {
        let id = e.event_id.as_deref().unwrap().to_string();
        let slot = latest.entry(id).or_insert(e);
        if e.revision > slot.revision {
            *slot = e;
        }
    }
    latest
        .into_values()
        .filter(|e| e.event_type == EventType::Click)
        .cloned()
        .collect()
}

fn minute_of(e: &Event) -> i64 {
    e.event_time_us.div_euclid(60_000_000)
}

fn brute_count(clicks: &[Event], ad: i64, from: i64, to: i64, filter: Option<&str>) -> i64 {
    clicks
        .iter()
        .filter(|e| e.ad_id == ad && (from..to).contains(&minute_of(e)) && keeps(filter, e))
        .count() as i64
}

fn brute_top(
    clicks: &[Event],
    n: usize,
    from: i64,
    to: i64,
    filter: Option<&str>,
) -> Vec<(i64, i64)> {
    let mut by_ad: HashMap<i64, i64> = HashMap::new();
    for e in clicks
        .iter()
        .filter(|e| (from..to).contains(&minute_of(e)) && keeps(filter, e))
    {
        *by_ad.entry(e.ad_id).or_default() += 1;
    }
    let mut ranked: Vec<(i64, i64)> = by_ad.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(n);
    ranked
}

fn minute_text(minute: i64) -> String {
    chrono::DateTime::from_timestamp(minute * 60, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M")
        .to_string()
}

struct Api {
    server: ClickServer,
    agent: ureq::Agent,
}

impl Api {
    fn start(warehouse: &Warehouse, spool: &std::path::Path) -> Api {
        let keyring = keyring("k1", &[("k1", "ab", false)]);
        let server = ClickServer::start(ServeOptions {
            listen: "127.0.0.1:0".into(),
            keyring,
            spool: spool.to_path_buf(),
            seal: SealPolicy::default(),
            dedup_capacity: 0,
            kafka: None,
            queries: Some(QueryOptions {
                warehouse: warehouse.root().to_path_buf(),
                filters: Filters::parse(FILTERS).unwrap(),
                retention_hours: 24,
                refresh: Duration::from_millis(20),
                clock: Clock::Fixed(NOW),
            }),
        })
        .unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Api { server, agent }
    }

    /// Status and JSON body of `GET path`.
    fn get(&self, path: &str) -> (u16, Value) {
        let mut response = self
            .agent
            .get(format!("http://{}{path}", self.server.local_addr()))
            .call()
            .unwrap();
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (status, json)
    }

    fn ok(&self, path: &str) -> Value {
        let (status, json) = self.get(path);
        assert_eq!(status, 200, "{path}: {json}");
        json
    }
}

fn filter_param(filter: Option<&str>) -> String {
    filter.map(|f| format!("&filter={f}")).unwrap_or_default()
}

/// `queries` random queries of both kinds, each against the brute force over `clicks`.
fn compare(api: &Api, clicks: &[Event], rng: &mut ChaCha8Rng, queries: usize) {
    let filters = [
        None,
        Some("us"),
        Some("office"),
        Some("v6"),
        Some("u7"),
        Some("de-u3"),
    ];
    for _ in 0..queries {
        let filter = filters[rng.random_range(0..filters.len())];
        if rng.random_bool(0.5) {
            let ad = rng.random_range(-1..42);
            let a = BASE_MINUTE + rng.random_range(0..=MINUTES);
            let b = BASE_MINUTE + rng.random_range(0..=MINUTES);
            let (from, to) = (a.min(b), a.max(b));
            let path = format!(
                "/v1/ads/{ad}/aggregated_count?from={}&to={}{}",
                minute_text(from),
                minute_text(to),
                filter_param(filter)
            );
            let json = api.ok(&path);
            assert_eq!(json["ad_id"], ad, "{path}");
            assert_eq!(
                json["count"],
                brute_count(clicks, ad, from, to, filter),
                "{path}: {json}"
            );
        } else {
            let n = rng.random_range(1..15);
            let window = rng.random_range(1..=MINUTES + 10);
            let path = format!(
                "/v1/ads/popular_ads?count={n}&window={window}{}",
                filter_param(filter)
            );
            let json = api.ok(&path);
            let got: Vec<(i64, i64)> = json["ads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| (a["ad_id"].as_i64().unwrap(), a["count"].as_i64().unwrap()))
                .collect();
            assert_eq!(
                got,
                brute_top(clicks, n, NOW - window, NOW, filter),
                "{path}"
            );
        }
    }
}

#[test]
fn queries_equal_a_brute_force_recompute_and_follow_new_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let wh = Warehouse::new(dir.path().join("wh"));
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let first = events(&mut rng, 3000, "a", &[]);
    write_jsonl(&dir.path().join("in1/a.jsonl"), &first);
    ingest(&wh, &[dir.path().join("in1")], options()).unwrap();
    let api = Api::start(&wh, &dir.path().join("spool"));
    let clicks = distinct_clicks(&first);
    assert!(clicks.len() > 1500, "{} distinct clicks", clicks.len());
    compare(&api, &clicks, &mut rng, 300);

    // The default range is the last complete minute, [now − 1, now).
    let json = api.ok("/v1/ads/3/aggregated_count");
    assert_eq!(json["count"], brute_count(&clicks, 3, NOW - 1, NOW, None));
    assert_eq!(json["from"], format!("{}:00Z", minute_text(NOW - 1)));
    assert_eq!(json["to"], format!("{}:00Z", minute_text(NOW)));

    // Late clicks into every hour, resends and corrections of the first batch.
    let publish = api.ok("/v1/ads/popular_ads")["publish"].as_u64().unwrap();
    let second = events(&mut rng, 1500, "b", &first);
    write_jsonl(&dir.path().join("in2/b.jsonl"), &second);
    ingest(&wh, &[dir.path().join("in2")], options()).unwrap();
    // Waits for the server's refresh (every 20 ms) to pick the publish up; not a timing test.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while api.ok("/v1/ads/popular_ads")["publish"].as_u64().unwrap() == publish {
        assert!(
            std::time::Instant::now() < deadline,
            "the new publish never showed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
    let clicks_after = distinct_clicks(&all);
    assert_ne!(clicks_after.len(), clicks.len());
    compare(&api, &clicks_after, &mut rng, 300);
}

#[test]
fn bad_queries_get_a_400_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let wh = Warehouse::new(dir.path().join("wh"));
    let api = Api::start(&wh, &dir.path().join("spool"));
    for (path, says) in [
        (
            "/v1/ads/1/aggregated_count?filter=nope",
            "known: de-u3, office, u7, us, v6",
        ),
        ("/v1/ads/popular_ads?filter=nope", "unknown filter"),
        ("/v1/ads/x/aggregated_count", "not an integer"),
        ("/v1/ads/1/aggregated_count?from=yesterday", "not a minute"),
        (
            "/v1/ads/1/aggregated_count?from=2026-11-03T02:00&to=2026-11-03T01:00",
            "before from",
        ),
        (
            "/v1/ads/1/aggregated_count?from=2026-10-01T00:00",
            "oldest minute",
        ),
        ("/v1/ads/popular_ads?count=0", "count must be"),
        ("/v1/ads/popular_ads?window=100000", "window must be"),
    ] {
        let (status, json) = api.get(path);
        assert_eq!(status, 400, "{path}: {json}");
        let message = json["error"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
    }
    // Nothing published yet: an empty answer, not an error.
    let json = api.ok("/v1/ads/popular_ads?window=60");
    assert_eq!(json["ads"], serde_json::json!([]));
    assert_eq!(json["publish"], 0);
}
