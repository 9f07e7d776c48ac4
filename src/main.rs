//! The `adsmetrics` command line: generate, ingest, stream, dev-broker, backfill, delete,
//! retention, audit, demo, ddl, show.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use adsmetrics::cluster::ExitClass;
use adsmetrics::runtime::{ingest, Engine, IngestOptions};
use adsmetrics::warehouse::Warehouse;
use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Idempotent ads metrics: replay-proof hourly and daily tables from raw event logs.
///
/// Every table is a pure function of the set of distinct source events: rerunning an ingest,
/// replaying files or re-batching the same events never changes a published partition.
#[derive(Parser, Debug)]
#[command(name = "adsmetrics", version, about, long_about)]
struct Cli {
    /// The warehouse: raw layer, curated tables, quarantine, journal.
    #[arg(
        long,
        global = true,
        default_value = "./warehouse",
        env = "ADSMETRICS_WAREHOUSE"
    )]
    warehouse: PathBuf,
    /// Log level filter (error, warn, info, debug, trace), or set RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// The orchestrator's name for this logical run, e.g. `ads_metrics/2026-11-01`: recorded on
    /// every publish and ledger entry this process writes, so every retry of one task shows up
    /// under one key (`audit log`).
    #[arg(long, global = true, env = "ADSMETRICS_RUN_KEY", value_name = "KEY")]
    run_key: Option<String>,
    /// How long a writer waits for another writer of the warehouse to finish (the writer lock)
    /// before giving up with exit code 75; e.g. 0, 90s, 10m.
    #[arg(
        long,
        global = true,
        default_value = "10m",
        value_parser = parse_age,
        value_name = "WAIT",
        env = "ADSMETRICS_LOCK_WAIT"
    )]
    lock_wait: i64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write synthetic events (zipf-skewed ads, resends, replayed files, late events, missing
    /// ids, corrections and bad records) as Hive-style Parquet / JSON-lines files.
    Generate {
        /// Directory to write into (created).
        #[arg(long, default_value = "./data/events")]
        out: PathBuf,
        /// Instead of files, send the events (the valid records the files would hold, in
        /// delivery order: resends, corrections and late events included) as JSON messages to
        /// this Kafka cluster (`host:port,…`).
        #[arg(long, value_name = "BROKERS")]
        to_kafka: Option<String>,
        /// The topic for --to-kafka; `{type}` in it becomes the event type (one topic per type).
        #[arg(long, default_value = "ads-events")]
        topic: String,
        /// Messages per second for --to-kafka (0: as fast as the broker takes them).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// The producer's compression for --to-kafka (none, gzip, lz4, snappy): gzip fits the
        /// most into `dev-broker`'s log, which keeps the last 5 MB of batches per partition.
        #[arg(long, default_value = "gzip")]
        compression: String,
        #[command(flatten)]
        config: adsmetrics::generate::GenerateConfig,
    },
    /// Read Kafka topics into the warehouse, exactly once: epochs cut by time or size, each
    /// landing in the raw layer under its (topic, partition, offset range), run through the
    /// dataflow and published with its offsets in the commit journal. Safe to kill at any
    /// moment; run it again and it resumes from the journal (consumer-group offsets are
    /// committed for lag monitoring only, never read).
    Stream {
        /// Bootstrap servers, `host:port,…`.
        #[arg(long, env = "ADSMETRICS_BROKERS")]
        brokers: String,
        /// Topics, comma-separated; every partition of each is read.
        #[arg(long, value_delimiter = ',', required = true)]
        topics: Vec<String>,
        /// Consumer group (offset commits for lag monitoring).
        #[arg(long, default_value = "adsmetrics")]
        group: String,
        /// An epoch closes this many milliseconds after its first message…
        #[arg(long, default_value_t = 1000)]
        epoch_ms: u64,
        /// …or at this many messages (one that waited for a long epoch to finish may hold up to
        /// twice as many).
        #[arg(long, default_value_t = 1_000_000)]
        epoch_events: usize,
        /// Stop after this many seconds without a message, once every partition is read to its
        /// log end and published (default: run until killed).
        #[arg(long, value_name = "SECS")]
        until_idle: Option<f64>,
        /// A librdkafka setting for a real cluster (security, timeouts), `key=value`; repeatable.
        /// Offsets, the group and the address are the stream's own and refused here.
        #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        kafka_config: Vec<(String, String)>,
        /// Timely worker threads (outputs are identical for any number).
        #[arg(long, short = 'w', default_value_t = 2)]
        workers: usize,
        #[command(flatten)]
        hot_window: HotWindowArg,
        /// Print one line per epoch.
        #[arg(long)]
        verbose: bool,
        /// Serve Prometheus metrics on `http://ADDR/metrics` (consumer lag per partition,
        /// ingest-to-visible latency, epochs, messages, quarantined, partitions published), e.g.
        /// 127.0.0.1:9464; port 0 picks a free one (printed on stderr).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
        /// Publish gate: before each publish, recompute the partitions it changes from the raw
        /// layer by the reconciliation's separate code path; on any difference publish nothing of
        /// that epoch (its staged files and findings are kept in `_adsmetrics/gated/`) and exit 12.
        #[arg(long)]
        gate: bool,
        /// The stream keeps one dataflow across epochs, so an epoch costs what it adds; after
        /// this many rows (events, and earlier rows rebuilt for them) it drops it and starts
        /// another, which bounds its memory.
        #[arg(long, value_name = "ROWS", default_value_t = adsmetrics::stream::DEFAULT_DATAFLOW_ROWS)]
        dataflow_rows: u64,
        /// In a cluster every process reads its share of the partitions (those whose index in
        /// the topics' sorted partitions is its --process modulo --processes) and the epochs
        /// are cut and published by the cluster as one, every --epoch-ms; the dataflow is not
        /// kept across epochs (--dataflow-rows does not apply).
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// A Kafka-protocol broker for demos and tests (librdkafka's mock cluster, in memory):
    /// prints its bootstrap address on the first line of stdout and serves until killed.
    DevBroker {
        /// Topics to create, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "ads-events")]
        topics: Vec<String>,
        /// Partitions per topic.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
    },
    /// Ingest Parquet / JSON-lines files or directories (walked, `dt=/hr=` folders included).
    /// Rerun-safe: sources already ingested are skipped, duplicates are counted once.
    Ingest {
        /// Files or directories.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Timely worker threads (outputs are identical for any number).
        #[arg(long, short = 'w', default_value_t = 1)]
        workers: usize,
        /// New sources per epoch (each epoch publishes its changed partitions); 0 = one epoch
        /// per hot-window generation.
        #[arg(long, default_value_t = 0)]
        epoch_sources: usize,
        #[command(flatten)]
        hot_window: HotWindowArg,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Publish gate: before each publish, recompute the partitions it changes from the raw
        /// layer by the reconciliation's separate code path; on any difference publish nothing of
        /// that epoch (its staged files and findings are kept in `_adsmetrics/gated/`) and exit 12.
        #[arg(long)]
        gate: bool,
        #[command(flatten)]
        engine: EngineArg,
        #[command(flatten)]
        metrics: RunMetricsArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Replace source partitions with their current contents: every file below --source in a
    /// Hive `dt=YYYY-MM-DD` folder from --from to --to is a source partition (named by its path
    /// below --source). Unchanged ones are skipped unread; changed ones replace what they
    /// contributed before, and only the difference is published; removed ones are withdrawn.
    /// One epoch per day. Rerun-safe.
    Backfill {
        /// Root of the Hive-style logs (Parquet or JSON lines), read in place.
        #[arg(long)]
        source: PathBuf,
        /// First day, YYYY-MM-DD (inclusive).
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD (inclusive).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        hot_window: HotWindowArg,
        /// Timely worker threads (outputs are identical for any number).
        #[arg(long, short = 'w', default_value_t = 1)]
        workers: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Publish gate: before each publish, recompute the partitions it changes from the raw
        /// layer by the reconciliation's separate code path; on any difference publish nothing of
        /// that epoch (its staged files and findings are kept in `_adsmetrics/gated/`) and exit 12.
        #[arg(long)]
        gate: bool,
        #[command(flatten)]
        engine: EngineArg,
        #[command(flatten)]
        metrics: RunMetricsArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Write a self-contained HTML page (SVG charts, nothing fetched, no script): duplicate rate
    /// per producer and hour, late arrivals per event day, partition versions published over
    /// time (from the audit ledger).
    Report {
        /// The page to write (replaced atomically).
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
        /// First event day, YYYY-MM-DD (default: the oldest).
        #[arg(long)]
        from: Option<String>,
        /// Last event day, YYYY-MM-DD (default: the newest).
        #[arg(long)]
        to: Option<String>,
        /// The time printed as the page's generation time (RFC 3339; default now): the page is
        /// otherwise a function of the warehouse alone.
        #[arg(long)]
        now: Option<String>,
        /// Threads reading raw files.
        #[arg(long, short = 'w', default_value_t = 2)]
        workers: usize,
    },
    /// Recompute every curated partition of the event days --from..--to from the raw layer and
    /// publish those that differ from what is published: the re-run after a bad deploy (a build
    /// that published wrong numbers), with the fixed build. Sources are not read again. Rerun-safe:
    /// a second run publishes nothing.
    Reprocess {
        /// First event day, YYYY-MM-DD (inclusive).
        #[arg(long)]
        from: String,
        /// Last event day, YYYY-MM-DD (inclusive).
        #[arg(long)]
        to: String,
        /// Timely worker threads (outputs are identical for any number).
        #[arg(long, short = 'w', default_value_t = 2)]
        workers: usize,
        #[command(flatten)]
        metrics: RunMetricsArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Bring the warehouse to a clean state after a crash, and nothing else: finish a publish
    /// that stopped midway (roll forward), remove staging leftovers, record on the audit ledger
    /// publishes whose run died before its entry. Every writer does this when it starts.
    Recover,
    /// Compliance delete: remove events of users or by event id from every table and from the
    /// raw layer, remember their keys so no replay brings them back, and write a certificate
    /// (`_adsmetrics/deletions/<request id>.json`). Running the same request again changes
    /// nothing and says so.
    Delete {
        /// Delete every event of this user (repeatable).
        #[arg(long = "user-id", required_unless_present = "event_ids")]
        user_ids: Vec<i64>,
        /// A file of event ids to delete, one per line (blank lines and `#` comments skipped).
        #[arg(long)]
        event_ids: Option<PathBuf>,
        /// The request's id (letters, digits, '-', '_', '.'), e.g. the ticket number.
        #[arg(long)]
        request_id: String,
        /// Why, for the certificate and the audit ledger.
        #[arg(long)]
        reason: String,
        /// Timely worker threads.
        #[arg(long, short = 'w', default_value_t = 1)]
        workers: usize,
        /// The search of the raw layer for the events and the rebuild of the days that held them
        /// run on the cluster (each process its share); rewriting the raw files that held them is
        /// the coordinator's.
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Generate events, ingest them, replay them (same files, then re-batched), and show that
    /// the tables did not change.
    Demo {
        /// Where the generated files go.
        #[arg(long, default_value = "./data/demo")]
        data: PathBuf,
        /// Distinct events to generate.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Timely worker threads.
        #[arg(long, short = 'w', default_value_t = 2)]
        workers: usize,
    },
    /// Retention: drop expired raw-layer days and curated partitions, on the audit ledger.
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Data-quality checks: a report on stdout (text or JSON) and a row per check in the
    /// `dq_results` table (Parquet, by run date); exit code 0 when they pass, a distinct code per
    /// failing check (duplicates: 10, partitions: 11, reconcile: 12, freshness: 13), 1 when a
    /// check cannot run.
    Check {
        #[command(subcommand)]
        command: CheckCommand,
    },
    /// Click tracking over HTTP until Ctrl-C. `GET /click?t=<token>` verifies an impression
    /// token (signature, key, expiry), appends the click durably to the spool and answers 302 to
    /// the token's target URL (never one from the query); a forged, expired or malformed token
    /// gets 400 and is not counted. `GET /metrics`: clicks by outcome, refusals by reason.
    /// `adsmetrics ingest <spool>` ingests the sealed segments.
    ///
    /// The query API answers from the warehouse's published `ads_clicks_minute`, refreshed as
    /// publishes land (each answer names the publish it read):
    /// `GET /v1/ads/{ad_id}/aggregated_count?from=<minute>&to=<minute>&filter=<name>` and
    /// `GET /v1/ads/popular_ads?count=N&window=M&filter=<name>`; minutes are RFC 3339 or UTC
    /// `2026-12-06T09:47`, ranges are [from, to), defaults from = now − 1 min, to = now.
    /// See docs/openapi.yaml.
    Serve {
        /// Address to listen on, `host:port` (port 0 picks a free one, printed on stderr).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// The keyring, JSON: {"signing": "<id>", "keys": [{"id": "<id>", "secret_hex":
        /// "<64+ hex digits>", "retired": false}, …]} (`adsmetrics token new-key` makes keys).
        #[arg(long, env = "ADSMETRICS_KEYS", value_name = "FILE")]
        keys: PathBuf,
        /// Where accepted clicks are appended: JSON-lines segments, `clicks-*.jsonl` once sealed.
        #[arg(long, default_value = "./data/click-spool")]
        spool: PathBuf,
        /// Seal the open segment this many seconds after its first click (or at 100k clicks).
        #[arg(long, default_value_t = 10)]
        seal_secs: u64,
        /// Impression ids the front-line dedup remembers (an optimisation; ingest dedups anyway).
        #[arg(long, default_value_t = 1_000_000)]
        dedup_cache: usize,
        /// Produce clicks to this Kafka cluster (`host:port,…`; what `stream` reads) instead of
        /// the spool; a click Kafka does not acknowledge in time is spooled instead, and counted.
        #[arg(long, value_name = "BROKERS")]
        kafka: Option<String>,
        /// The click topic for --kafka.
        #[arg(long, default_value = "ads-click")]
        kafka_topic: String,
        /// How long a click waits for Kafka's acknowledgement before it goes to the spool.
        #[arg(long, default_value_t = 2000)]
        kafka_timeout_ms: u64,
        /// With --kafka: every this many seconds, send the spool's sealed segments (clicks Kafka
        /// did not take in time) to Kafka again; a segment sent is renamed `_forwarded-…`.
        #[arg(long, default_value_t = 5)]
        forward_secs: u64,
        /// A librdkafka setting for a real cluster (security), `key=value`; repeatable.
        #[arg(long = "kafka-config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        kafka_config: Vec<(String, String)>,
        /// Named filters of the query API, JSON: {"filters": {"<name>": {"country": "US",
        /// "ip": "203.0.113.7", "user_id": 42}, …}} (each field optional, all given must match).
        #[arg(long, value_name = "FILE")]
        filters: Option<PathBuf>,
        /// Hours of ads_clicks_minute the query API holds in memory, the current one included.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(i64).range(1..=24 * 90))]
        query_hours: i64,
        /// How often the query API looks for new publishes, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        query_refresh_ms: u64,
        /// Pin the query API's "now" to this minute (replays, tests, load runs) instead of the
        /// system clock.
        #[arg(long, value_name = "MINUTE", value_parser = parse_query_minute)]
        query_now: Option<i64>,
    },
    /// Impression tokens for `serve`: new keys, and signing (for tests and integrations).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The audit ledger: every run, and every partition version it produced, hash-chained.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print Hive/Trino `CREATE EXTERNAL TABLE` statements for the curated tables.
    Ddl {
        /// The warehouse location as the query engine sees it (default: the warehouse path).
        #[arg(long)]
        location: Option<String>,
    },
    /// List a table's partitions, or print one partition's rows.
    Show {
        /// ads_metrics_hourly or ads_metrics_daily.
        table: String,
        /// Partition date, YYYY-MM-DD.
        #[arg(long)]
        dt: Option<String>,
        /// Partition hour 0..23 (hourly table).
        #[arg(long)]
        hr: Option<u32>,
        /// Rows to print.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug)]
enum RetentionCommand {
    /// Drop raw-layer days older than --raw-days and curated partitions older than
    /// --curated-days (counted back from today, UTC). Never touches anything younger. Events
    /// older than the raw horizon are quarantined from then on: their day can no longer be
    /// recomputed exactly.
    Apply {
        /// Days of raw layer to keep.
        #[arg(long)]
        raw_days: u32,
        /// Days of curated partitions to keep (at least --raw-days).
        #[arg(long)]
        curated_days: u32,
        /// Count back from this day instead of today (YYYY-MM-DD).
        #[arg(long)]
        today: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CheckCommand {
    /// Recompute every curated partition of the range from the raw layer by a plain code path
    /// (no dataflow: sorted maps over the raw rows, minus tombstones) and compare exactly with
    /// what is published: missing or unexpected partitions, files that are not the journal's
    /// version, and the first differing rows. Read-only.
    Reconcile {
        #[command(flatten)]
        common: CheckArgs,
    },
    /// Duplicate rates of the raw layer per event hour and producer (raw rows against distinct
    /// dedup keys: resends, replays, revisions), plus what sources dropped within themselves.
    /// Fails (exit 10) when an hour is above --max-rate, or above --vs-median times its
    /// producer's median hour in the range.
    Duplicates {
        #[command(flatten)]
        common: CheckArgs,
        /// Alert above this duplicate rate, percent (the generator resends about 5%).
        #[arg(long, default_value_t = 10.0)]
        max_rate: f64,
        /// Alert above this many times the producer's median hourly rate over the trailing week
        /// (the 7 days before each hour, read even when before --from; 0: off).
        #[arg(long, default_value_t = 3.0)]
        vs_median: f64,
    },
    /// The expected calendar — every hour of the range (or of the raw layer's first to last
    /// hour), per producer — against the raw layer; the hourly and daily partitions the raw
    /// layer calls for against what is published; publishes stuck midway and staging leftovers.
    /// Exit 11 on any of them.
    Partitions {
        #[command(flatten)]
        common: CheckArgs,
    },
    /// The age of each curated table's newest partition (from the end of its hour or day),
    /// how far the curated tables lag the raw layer, and the time since the last publish. Exit
    /// 13 when a table is older than --max-age or empty.
    Freshness {
        /// The SLO: e.g. 3m for a stream, 2h for corrections, 1d for a daily batch.
        #[arg(long, default_value = "2h", value_parser = parse_age)]
        max_age: i64,
        /// Measure at this time (RFC 3339) instead of now.
        #[arg(long)]
        now: Option<String>,
        #[command(flatten)]
        output: CheckOutput,
    },
    /// Every check above with its defaults (freshness: --max-age); exit code of the first that
    /// fails, in the order duplicates, partitions, reconcile, freshness. JSON: one object with
    /// every report.
    All {
        #[command(flatten)]
        common: CheckArgs,
        /// Freshness SLO.
        #[arg(long, default_value = "2h", value_parser = parse_age)]
        max_age: i64,
        /// Measure freshness at this time (RFC 3339) instead of now.
        #[arg(long)]
        now: Option<String>,
    },
}

/// `90s`, `3m`, `2h`, `1d` → seconds.
fn parse_age(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and s, m, h or d"))?;
    let unit = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    Ok(n * unit)
}

fn parse_now(now: Option<String>) -> anyhow::Result<i64> {
    match now {
        None => Ok(chrono::Utc::now().timestamp_micros()),
        Some(t) => Ok(chrono::DateTime::parse_from_rfc3339(&t)
            .map_err(|e| anyhow::anyhow!("--now {t:?}: {e} (RFC 3339, e.g. 2026-11-02T00:00:00Z)"))?
            .timestamp_micros()),
    }
}

/// What every check takes.
#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// First event day, YYYY-MM-DD (default: the oldest).
    #[arg(long)]
    from: Option<String>,
    /// Last event day, YYYY-MM-DD (default: the newest).
    #[arg(long)]
    to: Option<String>,
    /// Threads reading raw files.
    #[arg(long, short = 'w', default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    output: CheckOutput,
}

/// Where a check's results go.
#[derive(clap::Args, Debug)]
struct CheckOutput {
    /// `text` or `json` (one object on stdout).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
    /// Do not append the results to the `dq_results` table.
    #[arg(long)]
    no_record: bool,
    /// Also write the results as Prometheus gauges to this file (replaced atomically), for
    /// node_exporter's textfile collector: `adsmetrics_check_passed{check=…}` and the figures
    /// the rules in deploy/prometheus/alerts.yml alert on.
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
}

impl CheckArgs {
    fn range(&self) -> anyhow::Result<adsmetrics::check::DayRange> {
        Ok(adsmetrics::check::DayRange {
            from: parse_day_arg("--from", self.from.clone())?,
            to: parse_day_arg("--to", self.to.clone())?,
        })
    }
}

impl CheckOutput {
    /// [`CheckOutput::finish`] for the report of one check.
    fn finish_report<R: adsmetrics::check::Report>(
        &self,
        warehouse: &Warehouse,
        range: adsmetrics::check::DayRange,
        report: &R,
    ) -> anyhow::Result<()> {
        let rows = [report.row()];
        self.finish(
            warehouse,
            range,
            &rows,
            report,
            report.text(),
            report.passed(),
            R::EXIT,
        )
    }

    /// Records `rows` in `dq_results` (unless --no-record) and the metrics file, prints a report
    /// as asked; fails with `code` when it did not pass.
    #[allow(clippy::too_many_arguments)]
    fn finish<R: serde::Serialize>(
        &self,
        warehouse: &Warehouse,
        range: adsmetrics::check::DayRange,
        rows: &[adsmetrics::check::ResultRow],
        report: &R,
        text: String,
        passed: bool,
        code: u8,
    ) -> anyhow::Result<()> {
        let at = chrono::Utc::now().timestamp_micros();
        if !self.no_record {
            adsmetrics::check::record(warehouse, at, range, rows)
                .context("recording the results in dq_results")?;
        }
        if let Some(path) = &self.metrics_file {
            // Beside it under a name the textfile collector skips, then renamed over it.
            let mut staged = path.clone().into_os_string();
            staged.push(".tmp");
            adsmetrics::sink::files::replace(
                std::path::Path::new(&staged),
                path,
                adsmetrics::check::metrics_text(at, rows).as_bytes(),
            )
            .with_context(|| format!("writing --metrics-file {}", path.display()))?;
        }
        if self.format == "json" {
            println!("{}", serde_json::to_string(report)?);
        } else {
            print!("{text}");
        }
        if passed {
            Ok(())
        } else {
            Err(CheckFailed(code).into())
        }
    }
}

/// A check ran and failed: its report is printed; the process exits with this code.
#[derive(Debug)]
struct CheckFailed(u8);

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "check failed (exit code {})", self.0)
    }
}

impl std::error::Error for CheckFailed {}

/// `--from` and `--to` days, YYYY-MM-DD, in order.
fn parse_day_range(from: &str, to: &str) -> anyhow::Result<(i64, i64)> {
    let day = |flag: &str, s: &str| {
        adsmetrics::warehouse::parse_day(s)
            .ok_or_else(|| anyhow::anyhow!("{flag} {s:?} is not a date (YYYY-MM-DD)"))
    };
    let (from_day, to_day) = (day("--from", from)?, day("--to", to)?);
    if from_day > to_day {
        anyhow::bail!("--from {from} is after --to {to}");
    }
    Ok((from_day, to_day))
}

fn parse_day_arg(flag: &str, value: Option<String>) -> anyhow::Result<Option<i64>> {
    value
        .map(|v| {
            adsmetrics::warehouse::parse_day(&v)
                .ok_or_else(|| anyhow::anyhow!("{flag} {v:?} is not a day (YYYY-MM-DD)"))
        })
        .transpose()
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a new key entry (32 random bytes) for the keyring's `keys` list.
    NewKey {
        /// The key's id: letters, digits, '-' and '_' (e.g. the month it starts signing).
        #[arg(long)]
        id: String,
    },
    /// Sign an impression token with the keyring's signing key and print it.
    Sign(SignArgs),
}

#[derive(clap::Args, Debug)]
struct SignArgs {
    /// The keyring file (see `serve --keys`).
    #[arg(long, env = "ADSMETRICS_KEYS", value_name = "FILE")]
    keys: PathBuf,
    /// The impression: the click's event id.
    #[arg(long)]
    impression_id: String,
    /// The ad shown.
    #[arg(long)]
    ad_id: i64,
    /// The ad's campaign.
    #[arg(long)]
    campaign_id: i64,
    /// The campaign's advertiser.
    #[arg(long)]
    advertiser_id: i64,
    /// Where the click redirects: an absolute http(s) URL.
    #[arg(long)]
    target_url: String,
    /// The viewer.
    #[arg(long)]
    user_id: i64,
    /// The viewer's country, ISO 3166 alpha-2.
    #[arg(long)]
    country: String,
    /// What a click costs the advertiser, micros.
    #[arg(long)]
    cost_micros: Option<i64>,
    /// Seconds the token stays valid.
    #[arg(long, default_value_t = 86_400)]
    ttl_secs: i64,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Print the ledger, oldest entry first: who ran what and when, the sources it read (with
    /// content hashes), and each partition's old -> new version with its metric deltas.
    Log {
        /// Only the lineage of this partition (or of everything under a prefix), e.g.
        /// `ads_metrics_hourly/dt=2026-11-03/hr=01` or `ads_metrics_daily`.
        #[arg(long)]
        partition: Option<String>,
        /// Print the entries as JSON lines instead (exactly as stored).
        #[arg(long)]
        json: bool,
    },
    /// Check the ledger: its hash chain (no entry edited, removed or reordered) and that it
    /// accounts for every publish in the commit journal. Exits non-zero if it does not.
    Verify,
}

/// `key=value`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Cluster mode: one run on several processes (timely's `-n -p -h`, with `--workers` as `-w`).
#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// Run as one process of a cluster of this many: start the same command on every process
    /// (same inputs, same --warehouse path on a filesystem all of them see, same --workers:
    /// threads per process), each with its own --process. The processes exchange rows by key
    /// over TCP; process 0 plans, publishes and keeps the audit ledger. A process that loses
    /// another, or waits for it past --connect-timeout, exits 70: run them all again. Processes
    /// started with another --workers, or one with `stream` and another with a batch command,
    /// stop when they connect, each saying which (exit 78).
    #[arg(long, value_name = "N", default_value_t = 1)]
    processes: usize,
    /// This process's index in the cluster, 0..N; 0 is the coordinator.
    #[arg(long, value_name = "I", default_value_t = 0)]
    process: usize,
    /// The cluster's addresses, one `host:port` per line in process order (default:
    /// 127.0.0.1:2101, :2102, …).
    #[arg(long, value_name = "FILE")]
    hostfile: Option<PathBuf>,
    /// How long a process waits for the others to connect, each time the cluster starts (a
    /// follower also waits this long for the coordinator's next hot-window generation, or a
    /// stream's next epoch; once the followers have finished a run with it, the coordinator
    /// waits at most 30 s for them), e.g. 90s, 10m.
    #[arg(long, value_name = "WAIT", default_value = "10m", value_parser = parse_age)]
    connect_timeout: i64,
}

impl ClusterArgs {
    /// The cluster running `job`, or `None` for a process alone.
    fn cluster(
        &self,
        job: adsmetrics::cluster::Job,
    ) -> anyhow::Result<Option<adsmetrics::cluster::Cluster>> {
        Ok(adsmetrics::cluster::Cluster::new(
            self.processes,
            self.process,
            self.hostfile.as_deref(),
            std::time::Duration::from_secs(self.connect_timeout.max(1) as u64),
        )
        .map_err(anyhow::Error::msg)?
        .map(|cluster| cluster.running(job)))
    }
}

/// Runs a command as this process's part of `cluster`: a follower runs what the coordinator
/// orders, and says nothing of its own (`Ok(None)`); the coordinator (or a process alone) runs
/// `run` and then tells the followers the command is over, with its error if it failed.
fn in_cluster<T>(
    warehouse: &Warehouse,
    args: &ClusterArgs,
    workers: usize,
    run: impl FnOnce(Option<adsmetrics::cluster::Cluster>) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    let follow = |cluster: &adsmetrics::cluster::Cluster| -> anyhow::Result<()> {
        let work = adsmetrics::cluster::follow(warehouse, cluster, workers.max(1))?;
        eprintln!(
            "process {} of {}: identified {} input file(s), searched {} raw file(s) for a delete, \
             ran {} generation(s) of the coordinator's run ({} on the batch engine; {} keyed \
             from its own sources' keys)",
            cluster.process,
            cluster.processes,
            work.files_identified,
            work.files_searched,
            work.generations,
            work.batch_engine_runs,
            work.seeded
        );
        Ok(())
    };
    in_cluster_following(args, adsmetrics::cluster::Job::Batch, workers, follow, run)
}

/// [`in_cluster`], a follower doing `follow` (a command with its own part on every process).
fn in_cluster_following<T>(
    args: &ClusterArgs,
    job: adsmetrics::cluster::Job,
    workers: usize,
    follow: impl FnOnce(&adsmetrics::cluster::Cluster) -> anyhow::Result<()>,
    run: impl FnOnce(Option<adsmetrics::cluster::Cluster>) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    let Some(cluster) = args.cluster(job)? else {
        return run(None).map(Some);
    };
    adsmetrics::cluster::stop_when_a_peer_is_lost();
    if !cluster.is_coordinator() {
        follow(&cluster)?;
        return Ok(None);
    }
    let result = run(Some(cluster.clone()));
    let error = result
        .as_ref()
        .err()
        .map(|e| adsmetrics::cluster::RemoteError {
            message: format!("{e:#}"),
            class: exit_class(e),
        });
    let released = adsmetrics::cluster::release(&cluster, workers.max(1), error);
    let ran = result?;
    released.map_err(|e| {
        anyhow::anyhow!(
            "the run finished, but the other processes could not be told so ({e}): stop them \
             (they exit 70 after --connect-timeout)"
        )
    })?;
    Ok(Some(ran))
}

/// `--engine`, shared by the commands that take it.
#[derive(clap::Args, Debug)]
struct EngineArg {
    /// How the tables' changes are computed; the tables are the same bytes either way. `auto`
    /// computes a generation of one epoch after its rebuild (with the default --epoch-sources 0:
    /// each hot-window generation of an ingest, a correction, and under a hot window a
    /// backfill's days, each then a generation of its own), on one process or a cluster, with
    /// sorts in a plain timely dataflow, in less time and memory; the rest on the differential
    /// dataflow. `dataflow`: all on the differential dataflow (a backfill's generations then hold
    /// the window's days).
    #[arg(long = "engine", value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

/// `--hot-window`, shared by the commands that take it.
#[derive(clap::Args, Debug)]
struct HotWindowArg {
    /// Hot window: the dataflow holds the state of at most this many source days (`dt=`
    /// folders) at once, e.g. 48h or 2d; a run over more days is cut into generations at day
    /// boundaries, each rebuilding from the raw layer only the keys and user-days it touches,
    /// so memory stays flat however many days are loaded. `off`: one dataflow for the run.
    #[arg(long = "hot-window", value_name = "WINDOW", default_value = "48h", value_parser = parse_hot_window)]
    days: HotWindow,
}

/// A hot window in whole source days; `None` is off.
#[derive(Clone, Copy, Debug)]
struct HotWindow(Option<u32>);

/// `48h`, `2d`, `72` (hours) or `off`; hours round up to whole days, since the window is cut at
/// `dt=` folder boundaries.
fn parse_hot_window(s: &str) -> Result<HotWindow, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
        return Ok(HotWindow(None));
    }
    let (number, hours_per) = if let Some(d) = s.strip_suffix('d') {
        (d, 24)
    } else {
        (s.strip_suffix('h').unwrap_or(s), 1)
    };
    let hours = number
        .trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(hours_per))
        .filter(|h| *h > 0)
        .ok_or_else(|| format!("{s:?} is not a window: use e.g. 48h, 2d or off"))?;
    Ok(HotWindow(Some(hours.div_ceil(24))))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!("started");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<CheckFailed>() {
            Some(CheckFailed(code)) => ExitCode::from(*code),
            None => {
                eprintln!("error: {e:#}");
                match exit_class(&e) {
                    ExitClass::Gated => ExitCode::from(adsmetrics::check::EXIT_RECONCILE),
                    // EX_TEMPFAIL: another writer held or changed the warehouse; nothing was
                    // published, and running again converges.
                    ExitClass::Temporary => ExitCode::from(75),
                    ExitClass::Failed => ExitCode::FAILURE,
                }
            }
        },
    }
}

/// Writes a successful run's figures to `--metrics-file`, if given.
/// A `--query-now` minute.
fn parse_query_minute(s: &str) -> Result<i64, String> {
    adsmetrics::query::parse_minute(s)
}

/// Serves `registry` on `http://<listen>/metrics` until the server is dropped, and says where.
fn serve_metrics(
    listen: &str,
    registry: prometheus_client::registry::Registry,
) -> anyhow::Result<adsmetrics::metrics::MetricsServer> {
    let server = adsmetrics::metrics::MetricsServer::start(listen, Arc::new(registry))
        .with_context(|| format!("--metrics-listen {listen}"))?;
    eprintln!("metrics on http://{}/metrics", server.local_addr());
    Ok(server)
}

/// How a batch run reports to Prometheus.
#[derive(clap::Args, Debug)]
struct RunMetricsArgs {
    /// Write the run's figures as Prometheus gauges to this file when it succeeds (replaced
    /// atomically; `adsmetrics_run_*{command=…}`), for node_exporter's textfile collector.
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    /// Serve Prometheus metrics on `http://ADDR/metrics` while the run goes on (events accepted,
    /// by type and producer, quarantined, duplicates, late, partitions published, rows
    /// rehydrated, memory; counted as each hot-window generation finishes), e.g.
    /// 127.0.0.1:9464; port 0 picks a free one (printed on stderr).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

impl RunMetricsArgs {
    /// Starts the `/metrics` server when asked: the server (stopped when dropped) and the
    /// counters the run adds to.
    fn serve(
        &self,
    ) -> anyhow::Result<(
        Option<adsmetrics::metrics::MetricsServer>,
        Option<Arc<adsmetrics::metrics::RunCounters>>,
    )> {
        let Some(listen) = &self.metrics_listen else {
            return Ok((None, None));
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let counters = adsmetrics::metrics::RunCounters::register(&mut registry);
        Ok((Some(serve_metrics(listen, registry)?), Some(counters)))
    }

    /// Writes the finished run's figures to `--metrics-file`, when given.
    fn write(
        &self,
        command: &str,
        summary: &adsmetrics::runtime::IngestSummary,
    ) -> anyhow::Result<()> {
        let Some(path) = &self.metrics_file else {
            return Ok(());
        };
        let at = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
        let text = adsmetrics::metrics::run_metrics_text(command, summary, at);
        let mut staged = path.to_path_buf().into_os_string();
        staged.push(".tmp");
        adsmetrics::sink::files::replace(std::path::Path::new(&staged), path, text.as_bytes())
            .with_context(|| format!("writing --metrics-file {}", path.display()))
    }
}

/// How `e` ends the command: a writer-lock timeout or a fenced publish exits 75, a publish the
/// gate held back 12 (as `check reconcile`), here or on the cluster process it happened on.
fn exit_class(e: &anyhow::Error) -> adsmetrics::cluster::ExitClass {
    use adsmetrics::delete::DeleteError;
    use adsmetrics::runtime::RunError;
    use adsmetrics::stream::StreamError;
    e.downcast_ref::<RunError>()
        .or_else(|| match e.downcast_ref::<DeleteError>() {
            Some(DeleteError::Run(r)) => Some(r),
            _ => None,
        })
        .or_else(|| match e.downcast_ref::<StreamError>() {
            Some(StreamError::Run(r)) => Some(r),
            _ => None,
        })
        .map_or(adsmetrics::cluster::ExitClass::Failed, RunError::exit_class)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let warehouse = Warehouse::new(&cli.warehouse)
        .with_run_key(cli.run_key.clone())
        .with_lock_wait(std::time::Duration::from_secs(cli.lock_wait.max(0) as u64));
    match cli.command {
        Command::Generate {
            to_kafka: Some(brokers),
            topic,
            rate,
            compression,
            config,
            ..
        } => {
            let events = adsmetrics::generate::generate_events(&config);
            let bar = indicatif::ProgressBar::new(events.len() as u64);
            let bad_every = (config.bad_rate > 0.0).then(|| (1.0 / config.bad_rate).round() as u64);
            let summary = adsmetrics::broker::produce(
                &adsmetrics::broker::ProduceOptions {
                    rate: (rate > 0.0).then_some(rate),
                    bad_every,
                    compression: compression.clone(),
                    ..adsmetrics::broker::ProduceOptions::new(brokers.clone(), topic.clone())
                },
                &events,
                &|n| bar.set_position(n),
            )?;
            bar.finish_and_clear();
            println!(
                "sent {} messages ({} malformed) to {topic} on {brokers} in {:.1} s ({:.0} messages/s)",
                summary.messages,
                summary.bad,
                summary.elapsed.as_secs_f64(),
                summary.messages as f64 / summary.elapsed.as_secs_f64().max(1e-9)
            );
        }
        Command::Generate { out, config, .. } => {
            let bar = indicatif::ProgressBar::new(config.events);
            let summary = adsmetrics::generate::generate(&config, &out, &|n| bar.set_position(n))?;
            bar.finish_and_clear();
            println!(
                "wrote {} files, {} records ({} bytes) to {}",
                summary.files,
                summary.records,
                summary.bytes,
                out.display()
            );
            println!("{summary:#?}");
        }
        Command::Ingest {
            inputs,
            workers,
            epoch_sources,
            hot_window,
            quiet,
            gate,
            engine,
            metrics,
            cluster,
        } => {
            let ran = in_cluster(&warehouse, &cluster, workers, |cluster| {
                let (_server, counters) = metrics.serve()?;
                let options = IngestOptions {
                    workers,
                    epoch_sources,
                    progress: !quiet,
                    hot_window_days: hot_window.days.0,
                    gate,
                    metrics: counters,
                    cluster,
                    engine: engine.engine,
                    ..IngestOptions::default()
                };
                Ok(ingest(&warehouse, &inputs, options)?)
            })?;
            if let Some(summary) = ran {
                print!("{}", adsmetrics::report::ingest_report(&summary));
                print!("{}", adsmetrics::report::memory_line());
                metrics.write("ingest", &summary)?;
            }
        }
        Command::Backfill {
            source,
            from,
            to,
            hot_window,
            workers,
            quiet,
            gate,
            engine,
            metrics,
            cluster,
        } => {
            let (from_day, to_day) = parse_day_range(&from, &to)?;
            let ran = in_cluster(&warehouse, &cluster, workers, |cluster| {
                let (_server, counters) = metrics.serve()?;
                Ok(adsmetrics::backfill::backfill(
                    &warehouse,
                    adsmetrics::backfill::BackfillOptions {
                        source,
                        from_day,
                        to_day,
                        run: IngestOptions {
                            workers,
                            progress: !quiet,
                            hot_window_days: hot_window.days.0,
                            gate,
                            metrics: counters,
                            cluster,
                            engine: engine.engine,
                            ..IngestOptions::default()
                        },
                    },
                )?)
            })?;
            if let Some(summary) = ran {
                print!("{}", adsmetrics::report::ingest_report(&summary));
                print!("{}", adsmetrics::report::memory_line());
                metrics.write("backfill", &summary)?;
            }
        }
        Command::Report {
            out,
            from,
            to,
            now,
            workers,
        } => {
            let range = adsmetrics::check::DayRange {
                from: parse_day_arg("--from", from)?,
                to: parse_day_arg("--to", to)?,
            };
            let at = chrono::DateTime::from_timestamp_micros(parse_now(now)?)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let page = adsmetrics::dashboard::render(&warehouse, range, workers.max(1), &at)?;
            let mut staged = out.clone().into_os_string();
            staged.push(".tmp");
            adsmetrics::sink::files::replace(std::path::Path::new(&staged), &out, page.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} bytes)", out.display(), page.len());
        }
        Command::Reprocess {
            from,
            to,
            workers,
            metrics,
            cluster,
        } => {
            let (from_day, to_day) = parse_day_range(&from, &to)?;
            let ran = in_cluster(&warehouse, &cluster, workers, |cluster| {
                let (_server, counters) = metrics.serve()?;
                Ok(adsmetrics::runtime::reprocess(
                    &warehouse,
                    (from_day..=to_day).collect(),
                    IngestOptions {
                        workers,
                        progress: false,
                        metrics: counters,
                        cluster,
                        ..IngestOptions::default()
                    },
                )?)
            })?;
            if let Some(summary) = ran {
                println!(
                    "reprocessed {from}..{to}: {} raw rows recomputed; {} partitions published, {} unchanged",
                    summary.rehydrated_rows, summary.partitions_published, summary.partitions_unchanged
                );
                metrics.write("reprocess", &summary)?;
            }
        }
        Command::Recover => {
            let done = adsmetrics::runtime::recover(&warehouse)?;
            match done.finished_publish {
                Some(seq) => println!("finished publish {seq}, which had stopped midway"),
                None => println!("no publish was pending"),
            }
            if done.recorded_publishes.is_empty() {
                println!("the audit ledger covers every committed publish");
            } else {
                println!(
                    "recorded publishes {:?} on the audit ledger (their run stopped before its entry)",
                    done.recorded_publishes
                );
            }
        }
        Command::Delete {
            user_ids,
            event_ids,
            request_id,
            reason,
            workers,
            cluster,
        } => {
            let event_ids = match event_ids {
                Some(path) => std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("reading --event-ids {}: {e}", path.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect(),
                None => Vec::new(),
            };
            let request = adsmetrics::delete::DeleteRequest {
                request_id,
                reason,
                user_ids,
                event_ids,
            };
            let ran = in_cluster(&warehouse, &cluster, workers, |cluster| {
                Ok(adsmetrics::delete::delete(
                    &warehouse,
                    &request,
                    IngestOptions {
                        workers,
                        cluster,
                        ..Default::default()
                    },
                )?)
            })?;
            let Some(outcome) = ran else {
                return Ok(());
            };
            let c = &outcome.certificate;
            if outcome.already_applied {
                println!(
                    "request {} was already applied at {}: nothing changed",
                    c.request_id, c.applied_at
                );
            } else {
                println!(
                    "request {}: {} events deleted, {} raw rows removed from {} files, {} quarantine rows \
                     removed, {} partitions changed",
                    c.request_id,
                    c.events_deleted,
                    c.raw_rows_removed,
                    c.raw_files_rewritten.len(),
                    c.quarantine_rows_removed,
                    c.partitions.len()
                );
            }
            println!(
                "certificate: {}",
                adsmetrics::delete::certificate_path(&warehouse, &c.request_id).display()
            );
        }
        Command::Stream {
            brokers,
            topics,
            group,
            epoch_ms,
            epoch_events,
            until_idle,
            kafka_config,
            workers,
            hot_window,
            verbose,
            metrics_listen,
            gate,
            dataflow_rows,
            cluster,
        } => {
            let mut options = adsmetrics::stream::StreamOptions::new(brokers, topics);
            options.dataflow_rows = dataflow_rows;
            // Held until the stream ends: dropping it stops the server.
            let _metrics_server = match metrics_listen {
                Some(listen) => {
                    let mut registry = prometheus_client::registry::Registry::default();
                    options.metrics =
                        Some(adsmetrics::metrics::StreamMetrics::register(&mut registry));
                    Some(serve_metrics(&listen, registry)?)
                }
                None => None,
            };
            options.group_id = group;
            options.epoch = std::time::Duration::from_millis(epoch_ms.max(1));
            options.epoch_events = epoch_events.max(1);
            options.until_idle = until_idle
                .map(|s| {
                    std::time::Duration::try_from_secs_f64(s)
                        .map_err(|_| anyhow::anyhow!("--until-idle {s} is not a number of seconds"))
                })
                .transpose()?;
            options.kafka_config = kafka_config;
            options.ingest.workers = workers;
            options.ingest.hot_window_days = hot_window.days.0;
            options.ingest.gate = gate;
            options.verbose = verbose;
            let follow = |c: &adsmetrics::cluster::Cluster| -> anyhow::Result<()> {
                let work = adsmetrics::stream::cluster::follow(&warehouse, &options, c)?;
                eprintln!(
                    "process {} of {}: read {} message(s) of {} partition(s), ran {} epoch(s) of \
                     the coordinator's stream",
                    c.process, c.processes, work.messages, work.partitions, work.epochs
                );
                Ok(())
            };
            let job = adsmetrics::cluster::Job::Stream;
            let streamed = in_cluster_following(&cluster, job, workers, follow, |c| {
                let options = adsmetrics::stream::StreamOptions {
                    ingest: adsmetrics::runtime::IngestOptions {
                        cluster: c,
                        ..options.ingest.clone()
                    },
                    ..options.clone()
                };
                Ok(adsmetrics::stream::stream(&warehouse, &options)?)
            })?;
            if let Some(summary) = streamed {
                print!("{}", adsmetrics::stream::report(&summary));
            }
        }
        Command::DevBroker { topics, partitions } => {
            let broker = adsmetrics::broker::DevBroker::start(&topics, partitions)?;
            println!("{}", broker.bootstrap_servers());
            use std::io::Write as _;
            std::io::stdout().flush()?;
            eprintln!(
                "dev broker (in memory) serving topics {} with {partitions} partitions each; \
                 stop it with Ctrl-C (its log goes with it)",
                topics.join(",")
            );
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Command::Demo {
            data,
            events,
            workers,
        } => {
            adsmetrics::demo::run(&warehouse, &data, events, workers)?;
        }
        Command::Audit { command } => audit(&warehouse, command)?,
        Command::Serve {
            listen,
            keys,
            spool,
            seal_secs,
            dedup_cache,
            kafka,
            kafka_topic,
            kafka_timeout_ms,
            kafka_config,
            forward_secs,
            filters,
            query_hours,
            query_refresh_ms,
            query_now,
        } => {
            let keyring = adsmetrics::token::Keyring::load(&keys)?;
            let filters = match &filters {
                Some(path) => adsmetrics::query::Filters::load(path)?,
                None => Default::default(),
            };
            let server = adsmetrics::serve::ClickServer::start(adsmetrics::serve::ServeOptions {
                listen: listen.clone(),
                keyring,
                spool: spool.clone(),
                seal: adsmetrics::spool::SealPolicy {
                    max_age: std::time::Duration::from_secs(seal_secs.max(1)),
                    ..Default::default()
                },
                dedup_capacity: dedup_cache,
                kafka: kafka.map(|brokers| adsmetrics::serve::KafkaSink {
                    brokers,
                    topic: kafka_topic,
                    timeout: std::time::Duration::from_millis(kafka_timeout_ms.max(1)),
                    config: kafka_config,
                    forward_every: std::time::Duration::from_secs(forward_secs.max(1)),
                }),
                queries: Some(adsmetrics::query::QueryOptions {
                    warehouse: cli.warehouse.clone(),
                    filters,
                    retention_hours: query_hours,
                    refresh: std::time::Duration::from_millis(query_refresh_ms.max(10)),
                    clock: match query_now {
                        Some(minute) => adsmetrics::query::Clock::Fixed(minute),
                        None => adsmetrics::query::Clock::System,
                    },
                }),
            })
            .with_context(|| format!("serve --listen {listen} --spool {}", spool.display()))?;
            eprintln!(
                "serving http://{}/click, /metrics and /v1/ads/… (over {}); clicks spooled to {}; Ctrl-C stops",
                server.local_addr(),
                cli.warehouse.display(),
                spool.display()
            );
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?
                .block_on(tokio::signal::ctrl_c())?;
            drop(server);
            eprintln!("stopped; the spool's last segment is sealed");
        }
        Command::Token { command } => match command {
            TokenCommand::NewKey { id } => {
                let entry = adsmetrics::token::KeyEntry {
                    id,
                    secret_hex: adsmetrics::token::new_secret_hex(),
                    retired: false,
                };
                println!("{}", serde_json::to_string(&entry)?);
            }
            TokenCommand::Sign(args) => {
                let keyring = adsmetrics::token::Keyring::load(&args.keys)?;
                let now = chrono::Utc::now().timestamp();
                let claims = adsmetrics::token::Claims {
                    impression_id: args.impression_id,
                    ad_id: args.ad_id,
                    campaign_id: args.campaign_id,
                    advertiser_id: args.advertiser_id,
                    target_url: args.target_url,
                    user_id: args.user_id,
                    country: args.country,
                    cost_micros: args.cost_micros,
                    issued_at: now,
                    expires_at: now.saturating_add(args.ttl_secs.max(1)),
                };
                let token = keyring
                    .sign(&claims)
                    .map_err(|e| anyhow::anyhow!("cannot sign: {e}"))?;
                println!("{token}");
            }
        },
        Command::Check {
            command: CheckCommand::Reconcile { common },
        } => {
            let report =
                adsmetrics::check::reconcile(&warehouse, common.range()?, common.workers.max(1))?;
            common
                .output
                .finish_report(&warehouse, common.range()?, &report)?;
        }
        Command::Check {
            command:
                CheckCommand::Duplicates {
                    common,
                    max_rate,
                    vs_median,
                },
        } => {
            let thresholds = adsmetrics::check::DuplicateThresholds {
                max_rate: max_rate / 100.0,
                vs_median: (vs_median > 0.0).then_some(vs_median),
            };
            let report = adsmetrics::check::duplicates(
                &warehouse,
                common.range()?,
                thresholds,
                common.workers.max(1),
            )?;
            common
                .output
                .finish_report(&warehouse, common.range()?, &report)?;
        }
        Command::Check {
            command: CheckCommand::Partitions { common },
        } => {
            let report =
                adsmetrics::check::partitions(&warehouse, common.range()?, common.workers.max(1))?;
            common
                .output
                .finish_report(&warehouse, common.range()?, &report)?;
        }
        Command::Check {
            command:
                CheckCommand::Freshness {
                    max_age,
                    now,
                    output,
                },
        } => {
            let report = adsmetrics::check::freshness(&warehouse, parse_now(now)?, max_age)?;
            output.finish_report(&warehouse, Default::default(), &report)?;
        }
        Command::Check {
            command:
                CheckCommand::All {
                    common,
                    max_age,
                    now,
                },
        } => {
            use adsmetrics::check as c;
            let (range, threads) = (common.range()?, common.workers.max(1));
            let now = parse_now(now)?;
            let c::All {
                duplicates,
                partitions,
                reconcile,
                freshness,
            } = c::all(&warehouse, range, now, max_age, threads)?;
            let failed = [
                (duplicates.passed, c::EXIT_DUPLICATES),
                (partitions.passed, c::EXIT_PARTITIONS),
                (reconcile.passed, c::EXIT_RECONCILE),
                (freshness.passed, c::EXIT_FRESHNESS),
            ]
            .into_iter()
            .find_map(|(passed, code)| (!passed).then_some(code));
            let text = [
                duplicates.text(),
                partitions.text(),
                reconcile.text(),
                freshness.text(),
            ]
            .concat();
            let rows = [
                duplicates.row(),
                partitions.row(),
                reconcile.row(),
                freshness.row(),
            ];
            let report = serde_json::json!({
                "check": "all",
                "passed": failed.is_none(),
                "checks": [duplicates, partitions, reconcile, freshness],
            });
            common.output.finish(
                &warehouse,
                range,
                &rows,
                &report,
                text,
                failed.is_none(),
                failed.unwrap_or(0),
            )?;
        }
        Command::Retention {
            command:
                RetentionCommand::Apply {
                    raw_days,
                    curated_days,
                    today,
                },
        } => {
            let today = match today {
                Some(t) => adsmetrics::warehouse::parse_day(&t)
                    .ok_or_else(|| anyhow::anyhow!("--today {t:?} is not YYYY-MM-DD"))?,
                None => chrono::Utc::now()
                    .timestamp_micros()
                    .div_euclid(adsmetrics_dataflows::MICROS_PER_DAY),
            };
            let report = adsmetrics::retention::apply(&warehouse, raw_days, curated_days, today)?;
            let day = |d: Option<i64>| d.map_or("-".into(), adsmetrics::warehouse::day_string);
            println!(
                "horizons: raw from {}, curated from {}",
                day(report.horizons.raw_day),
                day(report.horizons.curated_day)
            );
            if report.partitions_removed == 0 && report.raw_days_dropped.is_empty() {
                println!("nothing expired: nothing dropped (the audit ledger records the run)");
            } else {
                println!("curated partitions removed: {}", report.partitions_removed);
                for (day, files) in &report.raw_days_dropped {
                    println!("dropped {day} ({files} files)");
                }
            }
        }
        Command::Ddl { location } => {
            let location = match location {
                Some(l) => l,
                None => std::fs::canonicalize(warehouse.root())
                    .unwrap_or_else(|_| warehouse.root().to_path_buf())
                    .display()
                    .to_string(),
            };
            print!("{}", adsmetrics::ddl::ddl(&location));
        }
        Command::Show {
            table,
            dt,
            hr,
            limit,
        } => {
            print!(
                "{}",
                adsmetrics::show::show(&warehouse, &table, dt.as_deref(), hr, limit)?
            );
        }
    }
    Ok(())
}

fn audit(warehouse: &Warehouse, command: AuditCommand) -> anyhow::Result<()> {
    use adsmetrics::journal::CommitJournal;
    use adsmetrics::ledger::{self, Ledger};
    match command {
        AuditCommand::Log { partition, json } => {
            let ledger = Ledger::open(&warehouse.ledger_path())?;
            if json {
                // The lines as written (and just verified), with any field this build does not
                // know: a re-serialised entry would drop those and no longer match its hash.
                let text = adsmetrics::sink::files::read_log(&warehouse.ledger_path(), false)?
                    .unwrap_or_default();
                for line in text.lines().take(ledger.entries().len()) {
                    println!("{line}");
                }
            } else {
                print!(
                    "{}",
                    ledger::render_log(ledger.entries(), partition.as_deref())
                );
            }
        }
        AuditCommand::Verify => {
            let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
            let report = ledger::verify(&warehouse.ledger_path(), journal.committed())?;
            println!(
                "ledger ok: {} entries, chain head {}; {} of {} journal publishes on the ledger",
                report.entries,
                report.head,
                report.publishes - report.pending.len() as u64,
                report.publishes
            );
            if !report.pending.is_empty() {
                println!(
                    "pending: publishes {:?} were committed by a run that stopped before its \
                     ledger entry; the next run records them",
                    report.pending
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_hot_window;

    #[test]
    fn hot_windows_are_whole_source_days() {
        let days = |s: &str| parse_hot_window(s).map(|w| w.0);
        assert_eq!(days("48h"), Ok(Some(2)));
        assert_eq!(days("49h"), Ok(Some(3)));
        assert_eq!(days("1h"), Ok(Some(1)));
        assert_eq!(days("3d"), Ok(Some(3)));
        assert_eq!(days("72"), Ok(Some(3)));
        assert_eq!(days("off"), Ok(None));
        assert!(days("0h").is_err());
        assert!(days("two days").is_err());
        assert!(days("-5d").is_err());
    }
}
