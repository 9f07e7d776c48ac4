//! What a stream epoch's fixed cost does over a long run: many small epochs, each one
//! `ingest_inline` run (as `adsmetrics stream` makes them), timed one by one, in three ways:
//! opening the warehouse afresh for every epoch; reusing what the last epoch left (an
//! [`OpenCache`] with raw-file columns); and also keeping the dataflow alive across epochs
//! ([`OpenCache::with_session`], as the stream does). Every epoch adds a journal record, a
//! ledger entry and raw files, which an open reads and a fresh dataflow's keyed rebuild scans
//! again.
//!
//! ```text
//! cargo run --release --example epoch_overhead -- --epochs 1000 --events-per-epoch 500
//! ```

use std::time::Instant;

use adsmetrics::generate::{generate_events, GenerateConfig};
use adsmetrics::ledger::RunKind;
use adsmetrics::runtime::{ingest_inline, IngestOptions, InlineRun, OpenCache};
use adsmetrics::schema::events_to_batch;
use adsmetrics::source::identify;
use adsmetrics::warehouse::Warehouse;
use anyhow::Result;
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Epochs to run in each mode.
    #[arg(long, default_value_t = 1000)]
    epochs: usize,
    /// Events in each epoch.
    #[arg(long, default_value_t = 500)]
    events_per_epoch: usize,
    /// Timely workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Only this way (1: afresh, 2: reusing the open, 3: keeping the dataflow too).
    #[arg(long)]
    only: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir()?;
    let events = generate_events(&GenerateConfig {
        events: (args.epochs * args.events_per_epoch) as u64,
        hours: 24,
        ..Default::default()
    });
    let chunk = events.len().div_ceil(args.epochs);
    let mut files = Vec::new();
    for (i, part) in events.chunks(chunk).enumerate() {
        let path = dir.path().join(format!("in/epoch-{i:05}.parquet"));
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        let batch = events_to_batch(part);
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path)?,
            batch.schema(),
            None,
        )?;
        writer.write(&batch)?;
        writer.close()?;
        files.push(path);
    }
    println!(
        "{} epochs of {} events, {} workers",
        files.len(),
        chunk,
        args.workers
    );
    let modes = [
        "opening afresh every epoch                   ",
        "reusing the last epoch's open and raw columns",
        "keeping the dataflow across epochs too       ",
    ];
    for (mode, label) in modes.iter().enumerate() {
        if args.only.is_some_and(|only| only != mode + 1) {
            continue;
        }
        let reuse = mode > 0;
        let wh = Warehouse::new(dir.path().join(format!("wh-{mode}")));
        let fresh = || match mode {
            0 => OpenCache::default(),
            1 => OpenCache::with_columns(1 << 22),
            _ => OpenCache::with_columns(1 << 22).with_session(u64::MAX),
        };
        let mut cache = fresh();
        let mut times = Vec::new();
        for file in &files {
            let sources = identify(std::slice::from_ref(file), 1)?;
            let started = Instant::now();
            if !reuse {
                cache = fresh();
            }
            ingest_inline(
                &wh,
                sources,
                InlineRun {
                    kind: RunKind::Stream,
                    command: "epoch_overhead".to_string(),
                    message_times_ms: None,
                },
                IngestOptions {
                    workers: args.workers,
                    ..Default::default()
                },
                &mut cache,
            )?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let mean = |range: std::ops::Range<usize>| {
            let slice = &times[range.start.min(times.len())..range.end.min(times.len())];
            slice.iter().sum::<f64>() / slice.len().max(1) as f64
        };
        let n = times.len();
        let ledger = std::fs::metadata(wh.ledger_path())?.len();
        let journal = std::fs::metadata(wh.journal_path())?.len();
        println!(
            "{}: ms per epoch, epochs 1-10: {:.1}, {}-{}: {:.1}, last 10: {:.1}; total {:.1} s \
             (ledger {} KB, journal {} KB at the end)",
            label,
            mean(0..10),
            n / 2 - 4,
            n / 2 + 5,
            mean(n / 2 - 5..n / 2 + 5),
            mean(n.saturating_sub(10)..n),
            times.iter().sum::<f64>() / 1000.0,
            ledger >> 10,
            journal >> 10,
        );
    }
    Ok(())
}
