//! What corrections cost after a long history, and what memory a day-by-day stream takes.
//!
//! 1. **Correction cost.** Loads 30 days of generated events (`--events`, spread over 720 hours)
//!    into a fresh warehouse, then ingests two correction batches of 1% of that many events each
//!    — revised versions (higher `revision`, new cost) of events of the newest days — and prints
//!    the times and their ratio to the load. A correction rebuilds the state of the keys and
//!    user-days it changes (the raw rows it reads back are printed), not of the days.
//! 2. **Memory over days.** Into another fresh warehouse, ingests the same 30 days one `dt=`
//!    folder at a time and prints each run's time, peak RSS and the raw rows it read back (the
//!    state of its late events' keys and user-days): both stay flat however many days came
//!    before.
//!
//! 3. **The hot window.** Into fresh warehouses, ingests the first 2, 5, 10, 20 and 30 days in
//!    *one* process each, with the hot window off and at 48 h, and prints each run's peak RSS:
//!    without a window memory grows with the days loaded, with it it stays at one window's
//!    worth (the run is cut into dataflow generations of two source days); then the 48 h run
//!    over 30 days again with the resident set after every generation.
//!
//! Every ingest runs in a child process (this program re-executing itself), so each peak RSS
//! (`VmHWM`) is that run's alone.
//!
//! ```text
//! cargo run --release --example corrections -- --events 3000000
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use adsmetrics::decode::decode_source;
use adsmetrics::generate::{generate, Format, GenerateConfig};
use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::schema::events_to_batch;
use adsmetrics::warehouse::Warehouse;
use anyhow::{bail, Context, Result};
use clap::Parser;

/// Correction cost and memory over days.
#[derive(Parser, Debug)]
struct Args {
    /// Distinct events over the 30 days.
    #[arg(long, default_value_t = 3_000_000)]
    events: u64,
    /// Workers for every ingest.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Skip the day-by-day and hot-window memory parts.
    #[arg(long)]
    no_days: bool,
    /// Hot window of the initial load and the corrections, in days (0 = off).
    #[arg(long, default_value_t = adsmetrics::runtime::DEFAULT_HOT_WINDOW_DAYS)]
    hot_window: u32,
    /// Internal: one ingest of the inputs (after the first path, the warehouse) in this process.
    #[arg(long, hide = true, num_args = 2..)]
    one_ingest: Option<Vec<PathBuf>>,
}

const DAYS: u32 = 30;
const START: &str = "2026-10-01";

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(paths) = &args.one_ingest {
        return one_ingest(&paths[0], &paths[1..], args.workers, args.hot_window);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let data = root.join(format!("bench-data/corrections-{}", args.events));
    let events_dir = data.join("events");
    if !data.join("_COMPLETE").exists() {
        let _ = fs::remove_dir_all(&data);
        eprintln!("generating {} events over {DAYS} days ...", args.events);
        let config = GenerateConfig {
            events: args.events,
            hours: DAYS * 24,
            start: START.to_string(),
            format: Format::Parquet,
            ..Default::default()
        };
        generate(&config, &events_dir, &|_| {})?;
        let n = args.events / 100;
        write_correction(&events_dir, &data.join("correction-1"), 0, n)?;
        write_correction(&events_dir, &data.join("correction-2"), n, n)?;
        fs::write(data.join("_COMPLETE"), "")?;
    }
    let runs = root.join("bench-runs");
    fs::create_dir_all(&runs)?;

    println!(
        "machine: nproc={} workers={}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.workers
    );
    let wh = tempfile::Builder::new()
        .prefix("adsmetrics-corrections-")
        .tempdir_in(&runs)?;
    let window = args.hot_window;
    println!(
        "hot window: {}",
        match window {
            0 => "off".to_string(),
            d => format!("{d} days"),
        }
    );
    let load = child(wh.path(), &[events_dir.as_path()], args.workers, window)?;
    println!("initial load (30 days): {load}");
    for (i, what) in ["first correction", "second correction"].iter().enumerate() {
        let fix = child(
            wh.path(),
            &[data.join(format!("correction-{}", i + 1)).as_path()],
            args.workers,
            window,
        )?;
        println!("{what}, 1% of the events: {fix}");
        let ratio = field(&fix, "seconds")? / field(&load, "seconds")?;
        println!("  = {:.2}% of the initial load's time", 100.0 * ratio);
    }

    if !args.no_days {
        let wh = tempfile::Builder::new()
            .prefix("adsmetrics-days-")
            .tempdir_in(&runs)?;
        let mut days: Vec<PathBuf> = fs::read_dir(&events_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        days.sort();
        for (i, day) in days.iter().enumerate() {
            let line = child(wh.path(), &[day.as_path()], args.workers, window)?;
            println!(
                "day {:2} {}: {line}",
                i + 1,
                day.file_name().unwrap_or_default().to_string_lossy()
            );
        }

        println!("\none process loading the first N days, peak RSS (MB):");
        println!("{:>6} {:>12} {:>12}", "days", "window off", "window 48h");
        for n in [2usize, 5, 10, 20, days.len()] {
            let inputs: Vec<&Path> = days.iter().take(n).map(PathBuf::as_path).collect();
            let mut peaks = Vec::new();
            for w in [0, 2] {
                let wh = tempfile::Builder::new()
                    .prefix("adsmetrics-window-")
                    .tempdir_in(&runs)?;
                peaks.push(field(
                    &child(wh.path(), &inputs, args.workers, w)?,
                    "peak_rss_mb",
                )?);
            }
            println!("{n:>6} {:>12} {:>12}", peaks[0], peaks[1]);
        }
        let wh = tempfile::Builder::new()
            .prefix("adsmetrics-window-")
            .tempdir_in(&runs)?;
        let inputs: Vec<&Path> = days.iter().map(PathBuf::as_path).collect();
        let line = child(wh.path(), &inputs, args.workers, 2)?;
        println!(
            "\n48h window over all {} days, after each generation:",
            days.len()
        );
        for part in line
            .split_whitespace()
            .filter(|p| p.starts_with("generation="))
        {
            println!("  {part}");
        }
    }
    Ok(())
}

/// Revised versions of `n` events of the newest days (after skipping `skip`), as one Parquet
/// file under `out`.
fn write_correction(events_dir: &Path, out: &Path, skip: u64, n: u64) -> Result<()> {
    let mut days: Vec<PathBuf> = fs::read_dir(events_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    days.sort();
    // From the newest day folder backwards until there are enough (the newest folder may hold
    // only the last day's late events).
    let mut revised = Vec::new();
    let mut skipped = 0;
    let entries = days
        .iter()
        .rev()
        .flat_map(|day| walkdir::WalkDir::new(day).sort_by_file_name());
    for entry in entries {
        let entry = entry?;
        if !entry.file_type().is_file() {
            continue;
        }
        let bytes = fs::read(entry.path())?;
        for mut e in decode_source(&entry.path().to_string_lossy(), &bytes).events {
            if revised.len() as u64 == n {
                break;
            }
            if e.event_id.is_some() && skipped < skip {
                skipped += 1;
            } else if e.event_id.is_some() {
                e.revision += 1;
                e.cost_micros = e.cost_micros.map(|c| c / 2 + 1);
                revised.push(e);
            }
        }
    }
    if (revised.len() as u64) < n {
        bail!(
            "the generated data has only {} events with ids",
            revised.len()
        );
    }
    fs::create_dir_all(out)?;
    let batch = events_to_batch(&revised);
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        fs::File::create(out.join("revisions.parquet"))?,
        batch.schema(),
        None,
    )?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

/// Runs one ingest in a child process; returns its result line.
fn child(warehouse: &Path, inputs: &[&Path], workers: usize, window: u32) -> Result<String> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .arg("--workers")
        .arg(workers.to_string())
        .arg("--hot-window")
        .arg(window.to_string())
        .arg("--one-ingest")
        .arg(warehouse.join("warehouse"))
        .args(inputs)
        .output()?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("ingest of {inputs:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn one_ingest(warehouse: &Path, inputs: &[PathBuf], workers: usize, window: u32) -> Result<()> {
    let started = Instant::now();
    let s = ingest(
        &Warehouse::new(warehouse),
        inputs,
        IngestOptions {
            workers,
            hot_window_days: (window > 0).then_some(window),
            ..Default::default()
        },
    )?;
    let generations: Vec<String> = s
        .memory
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "generation={}:days_done={}:rss_mb={}:peak_rss_mb={}",
                i + 1,
                m.days_done,
                m.rss_bytes >> 20,
                m.peak_rss_bytes >> 20
            )
        })
        .collect();
    println!(
        "seconds={:.3} events_accepted={} partitions_published={} rehydrated_files={} \
         of committed_raw_files={} rehydrated_rows={} generations={} peak_rss_mb={} {}",
        started.elapsed().as_secs_f64(),
        s.events_accepted,
        s.partitions_published,
        s.rehydrated_files,
        s.committed_raw_files,
        s.rehydrated_rows,
        s.generations,
        peak_rss_mb(),
        generations.join(" ")
    );
    Ok(())
}

fn field(line: &str, name: &str) -> Result<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {name}= in {line:?}"))
}

fn peak_rss_mb() -> u64 {
    adsmetrics::memory::process_memory().1 >> 20
}
