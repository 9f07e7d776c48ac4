//! The crash test of the streaming path (invariant 5): a producer writes ~2M generated events
//! (resends, corrections, late events and malformed messages among them) into a broker in its
//! own process while `adsmetrics stream` is killed with SIGKILL at 20 random moments — while it
//! consumes, runs the dataflow or publishes — and restarted each time. At the end the tables
//! equal the reference computed from the events, every malformed message is in the quarantine
//! exactly once, and the journal's offsets are the log end of every partition.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adsmetrics::broker::{produce, ProduceOptions};
use adsmetrics::generate::{generate_events, GenerateConfig};
use adsmetrics::sink::publish::PAUSE_AFTER_PREPARE_ENV;
use adsmetrics::stream::{committed_positions, log_end_offsets};
use adsmetrics::warehouse::Warehouse;
use common::*;
use rand::{RngExt, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_adsmetrics");
const TOPIC: &str = "ads-events";
const KILLS: usize = 20;

fn stream_command(warehouse: &std::path::Path, brokers: &str, log: &str) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--warehouse")
        .arg(warehouse)
        .args([
            "--log",
            log,
            "stream",
            "--brokers",
            brokers,
            "--topics",
            TOPIC,
        ])
        .args([
            "--workers",
            "2",
            "--epoch-ms",
            "400",
            "--epoch-events",
            "60000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn twenty_sigkills_while_streaming_lose_and_double_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = GenerateConfig {
        events: 1_900_000,
        hours: 24,
        seed: 2026,
        ..GenerateConfig::default()
    };
    let events = generate_events(&config);
    assert!(events.len() > 1_900_000, "resends add records");
    let broker = Broker::start(TOPIC, 32);
    let bad_every = 10_000;

    let producer = {
        let options = ProduceOptions {
            rate: Some(120_000.0),
            bad_every: Some(bad_every),
            ..ProduceOptions::new(&broker.bootstrap, TOPIC)
        };
        let events = events.clone();
        std::thread::spawn(move || produce(&options, &events, &|_| {}).expect("produced"))
    };

    let warehouse = dir.path().join("wh");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut recut = 0;
    let mut rolled_forward = 0;
    // Kills that landed inside a held-open publish: each left a `Prepare` a later start must
    // finish. Counted from what the log showed, not assumed from the phase, so the bound below
    // does not depend on how fast this machine consumes (a run that has caught up with the
    // producer publishes nothing, and its phase-2 kill lands elsewhere).
    let mut inside_publish = 0;
    let started = Instant::now();
    for kill in 0..KILLS {
        // A third of the kills at a random moment (mostly while consuming), a third once an
        // epoch's events are in the dataflow, a third inside a publish (held open after its
        // journal `Prepare`, so the restart must finish it).
        let phase = kill % 3;
        let mut command = stream_command(&warehouse, &broker.bootstrap, "warn,adsmetrics=debug");
        if phase == 2 {
            command.env(PAUSE_AFTER_PREPARE_ENV, "3000");
        }
        let mut child = command.spawn().expect("stream starts");
        let stderr = child.stderr.take().unwrap();
        let trigger = match phase {
            0 => None,
            1 => Some("decoded and fed"),
            _ => Some("publish prepared"),
        };
        let (seen, saw) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if trigger.is_some_and(|t| line.contains(t)) {
                    let _ = seen.send(());
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let wait = Duration::from_millis(rng.random_range(300..2500));
        match trigger {
            None => std::thread::sleep(wait),
            Some(_) => {
                // Past the first epochs of the run, at the first trigger after a random wait.
                std::thread::sleep(wait / 2);
                while saw.try_recv().is_ok() {}
                let landed = saw.recv_timeout(Duration::from_secs(20)).is_ok();
                inside_publish += usize::from(landed && phase == 2);
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        let text = log.join().unwrap();
        recut += text.matches("re-cutting the uncommitted epoch").count();
        rolled_forward += text.matches("finished a publish interrupted").count();
        assert!(!text.contains("panicked"), "{text}");
        assert!(!text.contains("error:"), "{text}");
    }
    let sent = producer.join().unwrap();
    eprintln!(
        "{KILLS} kills in {:.1} s ({inside_publish} inside a publish); restarts that re-cut an uncommitted epoch: {recut}, that finished an interrupted publish: {rolled_forward}",
        started.elapsed().as_secs_f64()
    );

    let last = stream_command(&warehouse, &broker.bootstrap, "warn")
        .args(["--until-idle", "3"])
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(last.success());
    // Each kill inside a publish left a `Prepare` that a later start finished (a start killed
    // while finishing one leaves it to the next, which may log it again: hence at least).
    assert!(inside_publish > 0, "no kill landed inside a publish");
    assert!(
        rolled_forward >= inside_publish,
        "{inside_publish} kills landed inside a publish, only {rolled_forward} publishes were rolled forward"
    );

    let warehouse = Warehouse::new(&warehouse);
    let ends = log_end_offsets(&broker.bootstrap, &[TOPIC.to_string()]).unwrap();
    let positions =
        committed_positions(&adsmetrics::runtime::committed_sources(&warehouse).unwrap());
    assert_eq!(positions, ends, "the journal's offsets are the log end");
    assert_eq!(
        ends.values().sum::<i64>() as u64,
        sent.messages,
        "the broker kept every message"
    );
    assert_eq!(quarantine_rows(&warehouse).len() as u64, sent.bad);
    assert_eq!(published_tables(&warehouse), expected_tables(&events));
    assert_ledger_accounts_for_tables(&warehouse);
}
