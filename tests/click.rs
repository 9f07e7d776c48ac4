//! Click tracking (`adsmetrics serve`) through a real HTTP client (ureq, redirects not followed):
//!
//! - a valid click answers 302 to the token's target, and the same request sent 5 times is one
//!   click in the tables once the spool is ingested;
//! - forged, expired and tampered tokens answer 400, without a redirect, and nothing of them is
//!   spooled or counted;
//! - a redirect target in the query is ignored: the Location is the signed one;
//! - after a key rotation, tokens of the old key stay valid until it is retired;
//! - with Kafka, clicks reach the stream; a click Kafka does not take goes to the spool, and on
//!   to Kafka once it is back.

mod common;

use std::time::Duration;

use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::serve::{ClickServer, ServeOptions};
use adsmetrics::spool::SealPolicy;
use adsmetrics::token::{Claims, KeyEntry, Keyring, KeyringFile};
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::Grain;
use common::*;

const TARGET: &str = "https://shop.example/landing?campaign=3&x=%20y";

fn claims(impression_id: &str, ad_id: i64) -> Claims {
    let now = chrono::Utc::now().timestamp();
    Claims {
        impression_id: impression_id.into(),
        ad_id,
        campaign_id: 3,
        advertiser_id: 1,
        target_url: TARGET.into(),
        user_id: 42,
        country: "DE".into(),
        cost_micros: Some(250_000),
        issued_at: now - 10,
        expires_at: now + 3600,
    }
}

fn server(keyring: Keyring, spool: &std::path::Path) -> ClickServer {
    ClickServer::start(ServeOptions {
        listen: "127.0.0.1:0".into(),
        keyring,
        spool: spool.to_path_buf(),
        seal: SealPolicy {
            max_lines: 1_000_000,
            max_age: Duration::from_secs(3600),
        },
        dedup_capacity: 1000,
        kafka: None,
        queries: None,
    })
    .unwrap()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        .build()
        .into()
}

/// The status, the Location header and the body of `GET /click` with `query`.
fn get(server: &ClickServer, query: &str) -> (u16, Option<String>, String) {
    let mut response = agent()
        .get(format!("http://{}/click?{query}", server.local_addr()))
        .call()
        .unwrap();
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.body_mut().read_to_string().unwrap_or_default();
    (status, location, body)
}

/// The server's `/metrics` page.
fn metrics_text(server: &ClickServer) -> String {
    agent()
        .get(format!("http://{}/metrics", server.local_addr()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn spooled_lines(spool: &std::path::Path) -> usize {
    std::fs::read_dir(spool)
        .unwrap()
        .map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .count()
        })
        .sum()
}

/// The spool ingested into `dir/wh`.
fn ingest_spool(
    dir: &std::path::Path,
    spool: &std::path::Path,
) -> (Warehouse, adsmetrics::runtime::IngestSummary) {
    let warehouse = Warehouse::new(dir.join("wh"));
    let summary = ingest(&warehouse, &[spool.to_path_buf()], IngestOptions::default()).unwrap();
    (warehouse, summary)
}

fn clicks_published(warehouse: &Warehouse) -> i64 {
    published_tables(warehouse)
        .iter()
        .filter(|(id, _)| id.grain == Grain::Daily)
        .flat_map(|(_, rows)| rows)
        .map(|(_, row)| row.clicks)
        .sum()
}

#[test]
fn a_click_sent_five_times_redirects_every_time_and_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let ring = keyring("k1", &[("k1", "a1", false)]);
    let token = ring.sign(&claims("imp-1", 7)).unwrap();
    let other = ring.sign(&claims("imp-2", 8)).unwrap();
    let server = server(ring, &spool);
    for _ in 0..5 {
        let (status, location, _) = get(&server, &format!("t={token}"));
        assert_eq!(status, 302);
        assert_eq!(location.as_deref(), Some(TARGET));
    }
    assert_eq!(get(&server, &format!("t={other}")).0, 302);
    // The front-line dedup spooled the first of the five only; ingest dedups anyway.
    assert_eq!(spooled_lines(&spool), 2);
    server.seal().unwrap();

    let (warehouse, summary) = ingest_spool(dir.path(), &spool);
    assert_eq!(summary.events_accepted, 2);
    assert_eq!(summary.quarantined, 0);
    assert_eq!(clicks_published(&warehouse), 2);
    let events = decode_dir(&spool);
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    let click = events.iter().find(|e| e.ad_id == 7).unwrap();
    assert_eq!(click.event_id.as_deref(), Some("imp-1"));
    assert_eq!(click.cost_micros, Some(250_000));
    assert_eq!(click.ip.as_str(), "127.0.0.1");

    // The same clicks again, after a restart (the front-line dedup forgot them): spooled again,
    // counted once.
    drop(server);
    let server2 = self::server(keyring("k1", &[("k1", "a1", false)]), &spool);
    assert_eq!(get(&server2, &format!("t={token}")).0, 302);
    drop(server2);
    ingest(
        &warehouse,
        std::slice::from_ref(&spool),
        IngestOptions::default(),
    )
    .unwrap();
    assert_eq!(clicks_published(&warehouse), 2);
}

#[test]
fn forged_expired_and_tampered_tokens_are_refused_and_never_counted() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let ring = keyring("k1", &[("k1", "a1", false)]);
    let valid = ring.sign(&claims("imp-1", 7)).unwrap();
    let forged = keyring("k1", &[("k1", "b2", false)])
        .sign(&claims("imp-2", 7))
        .unwrap();
    let mut old = claims("imp-3", 7);
    old.issued_at -= 7200;
    old.expires_at = old.issued_at + 60;
    let expired = ring.sign(&old).unwrap();
    // One character of the claims changed.
    let mut bytes = valid.clone().into_bytes();
    let at = valid.find('.').unwrap() + 6;
    bytes[at] = if bytes[at] == b'x' { b'y' } else { b'x' };
    let tampered = String::from_utf8(bytes).unwrap();
    let server = server(ring, &spool);
    for (query, reason) in [
        (format!("t={forged}"), "bad signature"),
        (format!("t={expired}"), "expired"),
        (format!("t={tampered}"), ""),
        ("t=garbage".to_string(), "malformed"),
        ("t=v1.k9.e30.AAAA".to_string(), "unknown key"),
        (String::new(), "missing"),
    ] {
        let (status, location, body) = get(&server, &query);
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(location, None, "{query}");
        assert!(body.contains(reason), "{query}: {body}");
    }
    // Nothing was spooled: the spool holds no segment at all.
    assert_eq!(spooled_lines(&spool), 0);
    let metrics = metrics_text(&server);
    assert!(
        metrics.contains("adsmetrics_clicks_total{outcome=\"refused\"} 6"),
        "{metrics}"
    );
    assert!(metrics.contains("adsmetrics_clicks_refused_total{reason=\"expired\"} 1"));
}

#[test]
fn a_redirect_target_in_the_query_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ring = keyring("k1", &[("k1", "a1", false)]);
    let token = ring.sign(&claims("imp-1", 7)).unwrap();
    let server = server(ring, &dir.path().join("spool"));
    for extra in [
        "url=https://evil.example/",
        "target_url=https://evil.example/",
        "redirect=https://evil.example/&next=//evil.example",
    ] {
        let (status, location, _) = get(&server, &format!("t={token}&{extra}"));
        assert_eq!(status, 302);
        assert_eq!(location.as_deref(), Some(TARGET));
    }
    // A second t= does not win either.
    let (status, location, _) = get(&server, &format!("t={token}&t=v1.k1.x.y"));
    assert!(
        status == 400 || location.as_deref() == Some(TARGET),
        "{status} {location:?}"
    );
}

#[test]
fn a_rotated_key_keeps_old_tokens_valid_until_it_is_retired() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let old = keyring("k1", &[("k1", "a1", false)])
        .sign(&claims("imp-1", 7))
        .unwrap();
    // Rotated: k2 signs, k1 still verifies.
    let rotated = keyring("k2", &[("k1", "a1", false), ("k2", "c3", false)]);
    let new = rotated.sign(&claims("imp-2", 7)).unwrap();
    assert!(new.starts_with("v1.k2."));
    let server1 = server(rotated, &spool);
    assert_eq!(get(&server1, &format!("t={old}")).0, 302);
    assert_eq!(get(&server1, &format!("t={new}")).0, 302);
    drop(server1);
    // k1 retired: its tokens are refused, k2's still work.
    let retired = keyring("k2", &[("k1", "a1", true), ("k2", "c3", false)]);
    let server2 = server(retired, &spool);
    let (status, _, body) = get(&server2, &format!("t={old}"));
    assert_eq!(status, 400);
    assert!(body.contains("retired"), "{body}");
    assert_eq!(get(&server2, &format!("t={new}")).0, 302);
}

/// A `serve` process killed with SIGKILL while clicks arrive loses none it answered 302: its
/// open segment is sealed at the next start (cut at its last whole line), and ingest counts
/// every acknowledged click once.
#[test]
fn every_click_answered_302_survives_a_sigkill() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        serde_json::to_vec(&KeyringFile {
            signing: "k1".into(),
            keys: vec![KeyEntry {
                id: "k1".into(),
                secret_hex: "a1".repeat(32),
                retired: false,
            }],
        })
        .unwrap(),
    )
    .unwrap();
    let ring = Keyring::load(&keys).unwrap();
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_adsmetrics"))
            .args(["serve", "--listen", "127.0.0.1:0", "--keys"])
            .arg(&keys)
            .arg("--spool")
            .arg(&spool)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The address is on the line that says it serves (warnings may come first).
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("serving http://") {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "serve exited");
        }
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        (child, addr)
    };
    let mut acknowledged = 0;
    for round in 0..3 {
        let (mut child, addr) = start();
        for i in 0..200 {
            let token = ring.sign(&claims(&format!("imp-{round}-{i}"), 7)).unwrap();
            let status = agent()
                .get(format!("http://{addr}/click?t={token}"))
                .call()
                .unwrap()
                .status()
                .as_u16();
            assert_eq!(status, 302);
            acknowledged += 1;
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
    }
    // The last process's segment is sealed by the next start.
    let (mut child, _) = start();
    child.kill().unwrap();
    child.wait().unwrap();
    let names: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("clicks-")), "{names:?}");

    let (warehouse, summary) = ingest_spool(dir.path(), &spool);
    assert_eq!(summary.events_accepted, acknowledged);
    assert_eq!(clicks_published(&warehouse), acknowledged as i64);
}

/// With `--kafka`, clicks go to the click topic and the stream counts them; a broker that does
/// not acknowledge in time sends the click to the spool instead (still a 302), counted, and an
/// ingest of the spool counts it in the same tables.
#[test]
fn clicks_go_to_kafka_to_the_spool_when_kafka_does_not_take_them_and_on_when_it_is_back() {
    use adsmetrics::broker::DevBroker;
    use adsmetrics::serve::KafkaSink;
    use adsmetrics::stream::{stream, StreamOptions};

    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let broker = DevBroker::start(&["ads-click".to_string()], 2).unwrap();
    let ring = keyring("k1", &[("k1", "a1", false)]);
    let with_kafka = |brokers: String, timeout_ms: u64| {
        ClickServer::start(ServeOptions {
            listen: "127.0.0.1:0".into(),
            keyring: ring.clone(),
            spool: spool.clone(),
            seal: SealPolicy::default(),
            dedup_capacity: 1000,
            kafka: Some(KafkaSink {
                brokers,
                topic: "ads-click".into(),
                timeout: Duration::from_millis(timeout_ms),
                config: Vec::new(),
                forward_every: Duration::from_millis(100),
            }),
            queries: None,
        })
        .unwrap()
    };
    let server = with_kafka(broker.bootstrap_servers(), 10_000);
    for i in 0..20 {
        let token = ring.sign(&claims(&format!("imp-{i}"), 7)).unwrap();
        assert_eq!(get(&server, &format!("t={token}")).0, 302);
    }
    drop(server);
    assert_eq!(spooled_lines(&spool), 0, "Kafka took every click");

    let warehouse = Warehouse::new(dir.path().join("wh"));
    let mut options = StreamOptions::new(broker.bootstrap_servers(), vec!["ads-click".into()]);
    options.epoch = Duration::from_millis(200);
    options.until_idle = Some(Duration::from_millis(1500));
    let streamed = stream(&warehouse, &options).unwrap();
    assert_eq!(streamed.messages, 20);
    assert_eq!(clicks_published(&warehouse), 20);

    // Nothing listens on port 1: the click waits its timeout, then goes to the spool.
    let down = with_kafka("127.0.0.1:1".into(), 300);
    let token = ring.sign(&claims("imp-down", 7)).unwrap();
    let (status, location, _) = get(&down, &format!("t={token}"));
    assert_eq!((status, location.as_deref()), (302, Some(TARGET)));
    let metrics = metrics_text(&down);
    assert!(
        metrics.contains("adsmetrics_clicks_total{outcome=\"spooled_kafka_failed\"} 1"),
        "{metrics}"
    );
    drop(down);
    assert_eq!(spooled_lines(&spool), 1);

    // Kafka is back: a server sends the sealed segment on to it, and renames it so that an
    // ingest of the spool skips it. Waits for the server's forwarding round (every 100 ms).
    let up = with_kafka(broker.bootstrap_servers(), 10_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !metrics_text(&up).contains("adsmetrics_clicks_forwarded_total 1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the spool was never forwarded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(up);
    let names: Vec<String> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.len() == 1 && names[0].starts_with("_forwarded-clicks-"),
        "{names:?}"
    );
    let streamed = stream(&warehouse, &options).unwrap();
    assert_eq!(streamed.messages, 1);
    assert_eq!(clicks_published(&warehouse), 21);
    // The spool holds nothing left to ingest; had it been ingested too, the click would still
    // count once.
    let summary = ingest(
        &warehouse,
        std::slice::from_ref(&spool),
        IngestOptions::default(),
    )
    .unwrap();
    assert_eq!(summary.events_accepted, 0);
    assert_eq!(clicks_published(&warehouse), 21);
}
