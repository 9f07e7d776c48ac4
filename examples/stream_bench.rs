//! What `adsmetrics stream` sustains, and its ingest→visible latency at a given producer rate.
//!
//! A mock Kafka cluster (librdkafka's, in this process, over TCP on loopback) gets generated
//! events from a producer thread, at `--rate` messages/s or as fast as it takes them, while the
//! stream reads them into a fresh warehouse; the latency of a message is its Kafka timestamp to
//! the publish of its epoch. Without `--rate` the producer fills the topic first and the figure
//! is the stream's drain rate. The producer shares the machine's cores with the stream.
//!
//! ```text
//! cargo run --release --example stream_bench -- --events 2000000            # drain rate
//! cargo run --release --example stream_bench -- --events 6000000 --rate 200000
//! ```

use std::time::{Duration, Instant};

use adsmetrics::broker::{produce, DevBroker, ProduceOptions};
use adsmetrics::generate::{generate_events, GenerateConfig};
use adsmetrics::stream::{stream, StreamOptions};
use adsmetrics::warehouse::Warehouse;
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Distinct events to generate (resends add about 5%).
    #[arg(long, default_value_t = 2_000_000)]
    events: u64,
    /// Producer rate, messages/s; 0 fills the topic before the stream starts.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Timely workers of the stream.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Kafka partitions.
    #[arg(long, default_value_t = 16)]
    partitions: i32,
    /// The producer's compression (gzip fits the most into the mock's log, lz4 is cheap).
    #[arg(long, default_value = "lz4")]
    compression: String,
    /// Epoch length, ms.
    #[arg(long, default_value_t = 1000)]
    epoch_ms: u64,
    /// Rows the stream's dataflow takes in before a new one starts (`stream --dataflow-rows`).
    #[arg(long, default_value_t = adsmetrics::stream::DEFAULT_DATAFLOW_ROWS)]
    dataflow_rows: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let config = GenerateConfig {
        events: args.events,
        hours: 24,
        ..GenerateConfig::default()
    };
    eprintln!("generating {} events ...", args.events);
    let events = generate_events(&config);
    let broker = DevBroker::start(&["ads-events".to_string()], args.partitions)?;
    let produce_options = ProduceOptions {
        rate: (args.rate > 0.0).then_some(args.rate),
        compression: args.compression.clone(),
        ..ProduceOptions::new(broker.bootstrap_servers(), "ads-events")
    };
    let dir = tempfile::tempdir()?;
    let warehouse = Warehouse::new(dir.path().join("warehouse"));
    let mut options = StreamOptions::new(broker.bootstrap_servers(), vec!["ads-events".into()]);
    options.epoch = Duration::from_millis(args.epoch_ms);
    options.until_idle = Some(Duration::from_secs(3));
    options.ingest.workers = args.workers;
    options.dataflow_rows = args.dataflow_rows;

    let started = Instant::now();
    let producer = if args.rate > 0.0 {
        let events = events.clone();
        let o = produce_options.clone();
        Some(std::thread::spawn(move || produce(&o, &events, &|_| {})))
    } else {
        let sent = produce(&produce_options, &events, &|_| {})?;
        eprintln!(
            "filled the topic: {} messages in {:.1} s",
            sent.messages,
            sent.elapsed.as_secs_f64()
        );
        None
    };
    let stream_started = Instant::now();
    let summary = stream(&warehouse, &options)?;
    if let Some(p) = producer {
        let sent = p.join().expect("producer thread")?;
        eprintln!(
            "produced {} messages at {:.0}/s",
            sent.messages,
            sent.messages as f64 / sent.elapsed.as_secs_f64()
        );
    }
    // The stream stops 3 s after the last message: that idle wait is not work.
    let busy = stream_started
        .elapsed()
        .saturating_sub(Duration::from_secs(3));
    println!(
        "stream: workers={} partitions={} rate={} messages={} epochs={} seconds={:.2} messages_per_s={:.0} latency_ms_p50={} latency_ms_p99={} latency_ms_max={} partitions_published={}",
        args.workers,
        args.partitions,
        if args.rate > 0.0 { format!("{:.0}", args.rate) } else { "fill".into() },
        summary.messages,
        summary.epochs,
        busy.as_secs_f64(),
        summary.messages as f64 / busy.as_secs_f64().max(1e-9),
        summary.latency.quantile(0.5).unwrap_or(0),
        summary.latency.quantile(0.99).unwrap_or(0),
        summary.latency.max(),
        summary.ingest.partitions_published,
    );
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
