//! End-to-end ingest throughput: generated Parquet files in, published warehouse out.
//!
//! What it measures: the wall time of one `adsmetrics::runtime::ingest` call into a fresh, empty
//! warehouse — discovering and hashing the sources, decoding, in-source dedup, writing the raw
//! layer and quarantine, the dataflow (dedup, hourly and daily aggregation) and publishing every
//! curated partition — for each worker count asked for. Throughput is given in *raw input rows*
//! per second: every row of every input file (resends, corrections, replayed files and bad
//! records included), the same denominator as the DuckDB baseline (`examples/duckdb_baseline.py`,
//! `--duckdb`), which does the same job (dedup, both tables, raw layer; Parquet in, Parquet out).
//!
//! Each worker count runs in a fresh child process (this program re-executing itself with the
//! hidden `--one-run W`), so the reported peak RSS (`VmHWM`) belongs to that run alone. The input
//! is generated once (Parquet, default generator settings apart from `--events`) under
//! `target/bench-data/<events>` and reused while its `_COMPLETE` marker exists.
//!
//! ```text
//! cargo run --release --example throughput -- --events 10000000 --workers 1,2 --duckdb
//! ```
//!
//! Output, one line per run:
//! `adsmetrics workers=W raw_rows=R seconds=S raw_rows_per_s=X events_accepted=A partitions=P peak_rss_mb=M`

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use adsmetrics::generate::{generate, Format, GenerateConfig};
use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::warehouse::Warehouse;
use anyhow::{bail, Context, Result};
use clap::Parser;
use parquet::file::reader::{FileReader, SerializedFileReader};

/// Marker written into the data directory once generation has finished.
const COMPLETE_MARKER: &str = "_COMPLETE";

/// Ingest throughput of adsmetrics, optionally against a DuckDB baseline.
#[derive(Parser, Debug)]
struct Args {
    /// Distinct logical events to generate (the files hold a few percent more rows).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Worker counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Input directory (default `target/bench-data/<events>`); generated unless it holds a
    /// `_COMPLETE` marker.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Also run the DuckDB baseline (`examples/duckdb_baseline.py`, needs `scripts/setup-python`).
    #[arg(long)]
    duckdb: bool,
    /// Keep the warehouses (and DuckDB outputs) instead of deleting them; their paths are printed.
    #[arg(long)]
    keep: bool,
    /// Internal: run one ingest with this many workers in this process and print its line.
    #[arg(long, hide = true)]
    one_run: Option<usize>,
    /// Internal: the raw row count, computed once by the parent.
    #[arg(long, hide = true)]
    raw_rows: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let data = args.data.clone().unwrap_or_else(|| {
        project_dir()
            .join("target/bench-data")
            .join(args.events.to_string())
    });

    if let Some(workers) = args.one_run {
        let raw_rows = match args.raw_rows {
            Some(n) => n,
            None => count_rows(&data)?,
        };
        return one_run(&data, workers, raw_rows, args.keep);
    }

    print_machine();
    prepare_data(&data, args.events)?;
    let raw_rows = count_rows(&data)?;
    println!("data: {} ({raw_rows} raw rows)", data.display());

    let exe = std::env::current_exe().context("locating this executable")?;
    let mut best: Option<f64> = None;
    for &workers in &args.workers {
        let mut cmd = Command::new(&exe);
        cmd.arg("--data")
            .arg(&data)
            .arg("--one-run")
            .arg(workers.to_string())
            .arg("--raw-rows")
            .arg(raw_rows.to_string());
        if args.keep {
            cmd.arg("--keep");
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{stdout}");
        if !out.status.success() {
            bail!("the run with {workers} workers failed ({})", out.status);
        }
        if let Some(rate) = stdout.lines().find_map(|l| field(l, "raw_rows_per_s")) {
            best = Some(best.map_or(rate, |b: f64| b.max(rate)));
        }
    }

    if args.duckdb {
        if let Some(duck) = run_duckdb(&data, args.keep)? {
            if let Some(best) = best {
                println!(
                    "ratio adsmetrics(best)/duckdb raw_rows_per_s = {:.2}",
                    best / duck
                );
            }
        }
    }
    Ok(())
}

/// One ingest into a fresh warehouse, in this process; prints the result line.
fn one_run(data: &Path, workers: usize, raw_rows: u64, keep: bool) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("adsmetrics-throughput-")
        .tempdir_in(bench_root())
        .context("creating the warehouse directory")?;
    let warehouse = Warehouse::new(dir.path().join("warehouse"));
    let started = Instant::now();
    let summary = ingest(
        &warehouse,
        &[data.to_path_buf()],
        IngestOptions {
            workers,
            progress: false,
            ..Default::default()
        },
    )
    .context("ingest failed")?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "adsmetrics workers={workers} raw_rows={raw_rows} seconds={seconds:.3} raw_rows_per_s={:.0} \
         events_accepted={} partitions={} peak_rss_mb={}",
        raw_rows as f64 / seconds,
        summary.events_accepted,
        summary.partitions_published,
        peak_rss_mb().map_or("?".to_string(), |m| format!("{m:.0}")),
    );
    if keep {
        let kept = dir.keep();
        println!("  kept warehouse: {}", kept.join("warehouse").display());
    }
    Ok(())
}

/// The crate's directory (where `.venv`, `examples` and `target` are).
fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where warehouses and DuckDB outputs go: on the same disk as the data, not a tmpfs.
fn bench_root() -> PathBuf {
    let root = project_dir().join("target/bench-runs");
    let _ = fs::create_dir_all(&root);
    root
}

/// Generates the input into `data` unless a complete earlier generation is there.
fn prepare_data(data: &Path, events: u64) -> Result<()> {
    if data.join(COMPLETE_MARKER).exists() {
        return Ok(());
    }
    if data.exists() {
        // An interrupted generation: start over (the generator wants an empty directory).
        fs::remove_dir_all(data).with_context(|| format!("removing {}", data.display()))?;
    }
    let config = GenerateConfig {
        events,
        format: Format::Parquet,
        ..Default::default()
    };
    eprintln!("generating {events} events into {} ...", data.display());
    let started = Instant::now();
    let summary = generate(&config, data, &|_| {}).context("generating the input")?;
    eprintln!(
        "generated {} files, {} records, {} MB in {:.1} s",
        summary.files,
        summary.records,
        summary.bytes / 1_000_000,
        started.elapsed().as_secs_f64()
    );
    fs::write(data.join(COMPLETE_MARKER), format!("{summary:?}\n"))
        .context("writing the completion marker")?;
    Ok(())
}

/// Rows of every Parquet file under `data`, from the file footers.
fn count_rows(data: &Path) -> Result<u64> {
    let mut rows = 0u64;
    for entry in walkdir::WalkDir::new(data) {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type().is_file() && path.extension().is_some_and(|e| e == "parquet") {
            let file =
                fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let reader = SerializedFileReader::new(file)
                .with_context(|| format!("reading the footer of {}", path.display()))?;
            rows += reader.metadata().file_metadata().num_rows() as u64;
        }
    }
    Ok(rows)
}

/// Peak resident set of this process (`VmHWM`), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The value of `name=` in a result line, as a number.
fn field(line: &str, name: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Cores, CPU model, memory and current load.
fn print_machine() {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_gb = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or("?".to_string(), |kb| format!("{:.1}", kb / 1024.0 / 1024.0));
    let load = fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!("machine: nproc={nproc} cpu=\"{cpu}\" mem_gb={mem_gb} loadavg=\"{load}\"");
}

/// Runs the DuckDB baseline; returns its raw rows per second (with the raw layer), or `None`
/// when DuckDB is not installed.
fn run_duckdb(data: &Path, keep: bool) -> Result<Option<f64>> {
    let python = project_dir().join(".venv/bin/python");
    let usable = python.exists()
        && Command::new(&python)
            .args(["-c", "import duckdb"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !usable {
        println!("duckdb: skipped (run scripts/setup-python)");
        return Ok(None);
    }
    let dir = tempfile::Builder::new()
        .prefix("duckdb-baseline-")
        .tempdir_in(bench_root())
        .context("creating the DuckDB output directory")?;
    let out = Command::new(&python)
        .arg(project_dir().join("examples/duckdb_baseline.py"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(dir.path())
        .arg("--both")
        .output()
        .context("running examples/duckdb_baseline.py")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        bail!("the DuckDB baseline failed ({})", out.status);
    }
    if keep {
        println!("  kept DuckDB output: {}", dir.keep().display());
    }
    Ok(stdout
        .lines()
        .filter(|l| l.contains("with_raw=1"))
        .find_map(|l| field(l, "raw_rows_per_s")))
}
