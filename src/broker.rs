//! Kafka for demos and tests: librdkafka's mock cluster, which speaks the Kafka protocol over TCP
//! on loopback and keeps its log in memory for as long as it lives, and a producer that sends
//! generated events to any Kafka-protocol cluster.
//!
//! Nothing in the consumer ([`crate::stream`]) knows which broker it talks to: a real cluster is
//! its bootstrap address (and, through `--kafka-config`, its security settings).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, DeliveryResult, Producer, ProducerContext,
};
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::event::Event;

/// A mock Kafka cluster of one broker on a random loopback port.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevBroker {
    /// Starts the cluster and creates `topics` with `partitions` partitions each.
    pub fn start(topics: &[String], partitions: i32) -> Result<Self, KafkaError> {
        let cluster = MockCluster::new(1)?;
        for topic in topics {
            cluster.create_topic(topic, partitions, 1)?;
        }
        Ok(DevBroker { cluster })
    }

    /// Its bootstrap address, `127.0.0.1:<port>`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates another topic.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        self.cluster.create_topic(topic, partitions, 1)
    }
}

/// Where and how fast to produce.
#[derive(Clone, Debug)]
pub struct ProduceOptions {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic; `{type}` in it is replaced by the event type (`impression`, `click`,
    /// `conversion`), for one topic per type.
    pub topic: String,
    /// Messages per second; `None` as fast as the client takes them.
    pub rate: Option<f64>,
    /// Every how many messages a malformed one is sent as well (`None`: never), to exercise the
    /// quarantine.
    pub bad_every: Option<u64>,
    /// The producer's `compression.type`: `gzip` packs the most into the mock cluster's 5 MB
    /// per-partition log (about 150k of these messages); `lz4` costs a fraction of the CPU.
    pub compression: String,
}

impl ProduceOptions {
    /// Sends to `topic` on `brokers` as fast as possible, gzip-compressed, no malformed messages.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        ProduceOptions {
            brokers: brokers.into(),
            topic: topic.into(),
            rate: None,
            bad_every: None,
            compression: "gzip".to_string(),
        }
    }
}

/// What a produce run sent.
#[derive(Clone, Debug, Default)]
pub struct ProduceSummary {
    /// Messages delivered (events and malformed ones).
    pub messages: u64,
    /// Of those, malformed.
    pub bad: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Counts deliveries that failed after the client's retries, keeping the first error.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<KafkaError>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.clone());
        }
    }
}

/// The topic of `event` under `template`.
pub fn topic_of(template: &str, event: &Event) -> String {
    template.replace("{type}", event.event_type.as_str())
}

/// Sends `events` in order, one JSON message each (keyed by event id when there is one), and
/// waits until every message is acknowledged. `progress` gets the count sent so far.
pub fn produce(
    options: &ProduceOptions,
    events: &[Event],
    progress: &dyn Fn(u64),
) -> Result<ProduceSummary, KafkaError> {
    let started = Instant::now();
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", &options.brokers)
        .set("enable.idempotence", "true")
        // The mock cluster keeps only the last 5 MB of (compressed) batches per partition:
        // large batches compress best.
        .set("compression.type", &options.compression)
        .set("batch.size", "4000000")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create_with_context(Deliveries::default())?;
    let mut summary = ProduceSummary::default();
    for (i, event) in events.iter().enumerate() {
        if let Some(rate) = options.rate.filter(|r| *r > 0.0) {
            if i % 256 == 0 {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let topic = topic_of(&options.topic, event);
        let value = crate::generate::event_json(event);
        send(&producer, &topic, event.event_id.as_deref(), &value)?;
        summary.messages += 1;
        if options
            .bad_every
            .is_some_and(|n| n > 0 && (i as u64 + 1).is_multiple_of(n))
        {
            // Cut in the middle: not JSON.
            send(&producer, &topic, None, &value[..value.len() / 2])?;
            summary.messages += 1;
            summary.bad += 1;
        }
        if i % 4096 == 0 {
            producer.poll(Duration::ZERO);
            progress(i as u64);
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let context = producer.context();
    if let Some(e) = context
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        tracing::error!(
            failed = context.failed.load(Ordering::Relaxed),
            "messages were not delivered"
        );
        return Err(e);
    }
    progress(events.len() as u64);
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Enqueues one message, waiting while the client's queue is full.
fn send(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
    key: Option<&str>,
    value: &[u8],
) -> Result<(), KafkaError> {
    loop {
        let mut record = BaseRecord::<str, [u8]>::to(topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e),
        }
    }
}
