//! `adsmetrics serve`: click tracking over HTTP (axum on tokio).
//!
//! ```text
//!  GET /click?t=<token>
//!    token verified (crate::token: signature in constant time, key active, not expired)
//!      └─ refused ──▶ 400, a plain-text reason, no Location; counted by reason; nothing spooled
//!    click event: event id = the impression id (double clicks and retries dedup), ad, campaign,
//!    advertiser, viewer, country and cost from the token; time from this server's clock; ip
//!    the client's address
//!    front-line dedup (a bounded set of impression ids seen; an optimisation: the dataflow's
//!    dedup is the authority)
//!    with --kafka: produced to the click topic (acks=all, idempotent), awaited
//!      └─ not delivered in time ──▶ the spool instead, counted (`spooled_kafka_failed`); every
//!         --forward-secs the spool's sealed segments are sent to Kafka again, each renamed
//!         `_forwarded-…` once acknowledged (an ingest of the spool, which skips those names,
//!         would count a click once beside the stream anyway: same key)
//!    else: appended to the spool and synced (crate::spool)
//!      └─ the spool fails ──▶ 503, counted, no redirect (the client retries; nothing is lost
//!         silently)
//!    302, Location = the token's target URL, never anything from the query
//!  GET /metrics  Prometheus text: clicks by outcome, refusals by reason, spool errors
//!  GET /v1/ads/{ad_id}/aggregated_count, GET /v1/ads/popular_ads: the query API over the
//!    published `ads_clicks_minute` (crate::query)
//! ```

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::HttpServer;
use crate::spool::{SealPolicy, Spool};
use crate::token::Keyring;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// `host:port` to listen on (port 0 picks a free one).
    pub listen: String,
    /// The keys tokens are verified with.
    pub keyring: Keyring,
    /// Where accepted clicks are appended.
    pub spool: PathBuf,
    /// When spool segments are sealed.
    pub seal: SealPolicy,
    /// Impression ids the front-line dedup remembers (0: off).
    pub dedup_capacity: usize,
    /// Produce clicks to a Kafka topic (the stream's input) instead of the spool, which then
    /// only takes what Kafka did not accept in time.
    pub kafka: Option<KafkaSink>,
    /// Serve the query API (`/v1/ads/…`) over this warehouse's `ads_clicks_minute`.
    pub queries: Option<crate::query::QueryOptions>,
}

/// Where clicks go with `serve --kafka`.
#[derive(Clone, Debug)]
pub struct KafkaSink {
    /// Bootstrap servers, `host:port,…`.
    pub brokers: String,
    /// The click topic.
    pub topic: String,
    /// How long a click waits for the broker's acknowledgement before it goes to the spool.
    pub timeout: std::time::Duration,
    /// Further librdkafka settings (security) for a real cluster.
    pub config: Vec<(String, String)>,
    /// How often the spool's sealed segments (clicks Kafka did not take in time) are sent to
    /// Kafka again.
    pub forward_every: std::time::Duration,
}

/// Labels of a refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// Labels of a click's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

struct App {
    keyring: Keyring,
    spool: Spool,
    kafka: Option<(rdkafka::producer::FutureProducer, String)>,
    seen: Mutex<Seen>,
    clicks: Family<Outcome, Counter>,
    refused: Family<Reason, Counter>,
    registry: Registry,
}

impl App {
    /// The front-line dedup (never held across an await).
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .expect("no handler panics holding the lock")
    }

    /// Counts one click with `outcome`.
    fn count(&self, outcome: &str) {
        self.clicks
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// A bounded set of the impression ids of recently recorded clicks, oldest forgotten first.
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Seen {
    /// Whether a click of `id` was recorded recently.
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Remembers that a click of `id` was recorded.
    fn insert(&mut self, id: &str) {
        if self.capacity == 0 || !self.set.insert(id.to_string()) {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id.to_string());
    }
}

/// A running click server; stops (and then seals its spool) when dropped.
pub struct ClickServer {
    // Declared first, so dropped first: the requests in flight finish before the app (and with
    // it the spool, which seals its last segment) goes.
    http: HttpServer,
    app: Arc<App>,
    _tasks: Vec<crate::periodic::Periodic>,
}

impl ClickServer {
    /// Binds `options.listen`, opens the spool and serves on threads of its own. Fails at once if
    /// the address cannot be bound or the spool cannot be opened.
    pub fn start(options: ServeOptions) -> std::io::Result<Self> {
        let spool = Spool::open(&options.spool, options.seal)?;
        let kafka = match &options.kafka {
            Some(sink) => Some((producer(sink)?, sink.topic.clone())),
            None => None,
        };
        let mut registry = Registry::default();
        let clicks = Family::<Outcome, Counter>::default();
        let refused = Family::<Reason, Counter>::default();
        registry.register(
            "adsmetrics_clicks",
            "Clicks by outcome: accepted (in Kafka, or spooled without Kafka), spooled_kafka_failed, duplicate (seen by the front-line dedup), refused, spool_failed",
            clicks.clone(),
        );
        let forwarded = Counter::<u64>::default();
        registry.register(
            "adsmetrics_clicks_forwarded",
            "Spooled clicks (Kafka had not taken them in time) sent on to Kafka later",
            forwarded.clone(),
        );
        registry.register(
            "adsmetrics_clicks_refused",
            "Refused click tokens by reason (answered 400, never ingested)",
            refused.clone(),
        );
        let app = Arc::new(App {
            keyring: options.keyring,
            spool,
            kafka,
            seen: Mutex::new(Seen {
                set: HashSet::new(),
                order: VecDeque::new(),
                capacity: options.dedup_capacity,
            }),
            clicks,
            refused,
            registry,
        });
        let mut router = axum::Router::new()
            .route("/click", axum::routing::get(click))
            .route("/metrics", axum::routing::get(metrics))
            .with_state(app.clone());
        let mut tasks = Vec::new();
        if let Some(sink) = &options.kafka {
            let forwarded = forwarded.clone();
            // A producer of its own, with a longer timeout: a segment's burst neither fills the
            // queue the live clicks use nor times out behind them.
            let producer = producer(&KafkaSink {
                timeout: FORWARD_TIMEOUT,
                ..sink.clone()
            })?;
            let (topic, dir) = (sink.topic.clone(), options.spool.clone());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()?;
            tasks.push(crate::periodic::Periodic::start(
                "spool-forward",
                sink.forward_every,
                move || match runtime.block_on(forward_sealed(&dir, &producer, &topic)) {
                    Ok(0) => {}
                    Ok(clicks) => {
                        forwarded.inc_by(clicks);
                        tracing::info!(clicks, "sent spooled clicks on to Kafka");
                    }
                    Err(e) => tracing::warn!(error = %e, "spooled clicks not sent to Kafka yet"),
                },
            )?);
        }
        if let Some(query) = options.queries {
            let queries =
                Arc::new(crate::query::ClickQueries::open(query).map_err(std::io::Error::other)?);
            router = router.merge(crate::query::router(queries.clone()));
            tasks.push(crate::query::refresher(queries)?);
        }
        let http = HttpServer::start(&options.listen, "click-http", 2, router)?;
        Ok(ClickServer {
            http,
            app,
            _tasks: tasks,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// Seals the spool's open segment now (its final path, if it had clicks), so that an ingest
    /// sees every click accepted so far.
    pub fn seal(&self) -> std::io::Result<Option<PathBuf>> {
        self.app.spool.seal()
    }
}

#[derive(serde::Deserialize)]
struct ClickQuery {
    t: Option<String>,
}

fn refuse(app: &App, reason: &'static str, message: String) -> Response {
    app.refused
        .get_or_create(&Reason {
            reason: reason.to_string(),
        })
        .inc();
    app.count("refused");
    (
        StatusCode::BAD_REQUEST,
        [(header::CACHE_CONTROL, "no-store")],
        format!("{message}\n"),
    )
        .into_response()
}

async fn click(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<ClickQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let token = match query {
        Ok(Query(ClickQuery { t: Some(t) })) => t,
        Ok(_) => {
            return refuse(
                &app,
                "missing_token",
                "missing the token parameter t".into(),
            )
        }
        Err(e) => return refuse(&app, "malformed", format!("bad query: {e}")),
    };
    let now_us = chrono::Utc::now().timestamp_micros();
    let claims = match app.keyring.verify(&token, now_us.div_euclid(1_000_000)) {
        Ok(claims) => claims,
        Err(e) => return refuse(&app, e.reason(), e.to_string()),
    };
    let redirect = (
        StatusCode::FOUND,
        [
            (header::LOCATION, claims.target_url.clone()),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    );
    // Remembered only once recorded, so a retry after a failure is not taken for a repeat (two
    // concurrent repeats may both be recorded: the dataflow's dedup counts them once).
    if app.seen().contains(&claims.impression_id) {
        app.count("duplicate");
        return redirect.into_response();
    }
    let line = serde_json::json!({
        "event_id": claims.impression_id,
        "event_type": "click",
        "event_time": now_us,
        "ad_id": claims.ad_id,
        "campaign_id": claims.campaign_id,
        "advertiser_id": claims.advertiser_id,
        "country": claims.country,
        "user_id": claims.user_id,
        "ip": peer.ip().to_string(),
        "cost_micros": claims.cost_micros,
        "producer": "click",
    });
    let line = serde_json::to_vec(&line).expect("a JSON value serialises");
    let mut outcome = "accepted";
    if let Some((producer, topic)) = &app.kafka {
        let record = rdkafka::producer::FutureRecord::to(topic)
            .key(claims.impression_id.as_bytes())
            .payload(&line);
        let delivered = match producer.send_result(record) {
            Ok(delivery) => acknowledged(delivery).await,
            Err((e, _)) => Err(e.to_string()),
        };
        match delivered {
            Ok(()) => {
                app.seen().insert(&claims.impression_id);
                app.count(outcome);
                return redirect.into_response();
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kafka did not take a click in time: spooled instead");
                outcome = "spooled_kafka_failed";
            }
        }
    }
    match app.spool.append(line).await {
        Ok(()) => {
            app.seen().insert(&claims.impression_id);
            app.count(outcome);
            redirect.into_response()
        }
        Err(e) => {
            app.count("spool_failed");
            tracing::error!(error = %e, "could not spool a click");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "the click could not be recorded; retry\n",
            )
                .into_response()
        }
    }
}

/// Waits for Kafka's acknowledgement of one produced click.
async fn acknowledged(delivery: rdkafka::producer::DeliveryFuture) -> Result<(), String> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("the producer went away".to_string()),
    }
}

/// Clicks a forwarding round has in flight at most.
const FORWARD_IN_FLIGHT: usize = 10_000;
/// How long a forwarded click waits for Kafka's acknowledgement.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends the spool's sealed segments to Kafka, oldest first, each whole: every click of a segment
/// produced and acknowledged, then the segment renamed `_forwarded-<name>` (which ingest skips,
/// and which stays as a record). A segment Kafka does not take stays for the next round. A crash
/// between the acknowledgement and the rename sends the segment again: the dataflow's dedup
/// counts its clicks once. Returns the clicks sent.
async fn forward_sealed(
    dir: &std::path::Path,
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
) -> Result<u64, String> {
    let segments =
        crate::spool::sealed_segments(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut sent = 0;
    for segment in segments {
        let text =
            std::fs::read_to_string(&segment).map_err(|e| format!("{}: {e}", segment.display()))?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        // A bounded number in flight: a whole segment (100k clicks) at once would fill the
        // producer's queue.
        for chunk in lines.chunks(FORWARD_IN_FLIGHT) {
            let mut deliveries = Vec::with_capacity(chunk.len());
            for line in chunk {
                let key = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| {
                        v.get("event_id")
                            .and_then(|id| id.as_str())
                            .map(String::from)
                    })
                    .unwrap_or_default();
                let record = rdkafka::producer::FutureRecord::to(topic)
                    .key(key.as_bytes())
                    .payload(*line);
                deliveries.push(
                    producer
                        .send_result(record)
                        .map_err(|(e, _)| e.to_string())?,
                );
            }
            for delivery in deliveries {
                acknowledged(delivery).await?;
            }
        }
        crate::spool::mark_forwarded(&segment)
            .map_err(|e| format!("{}: {e}", segment.display()))?;
        sent += lines.len() as u64;
    }
    Ok(sent)
}

/// An idempotent producer that waits for every in-sync replica, and gives up on a click after
/// the sink's timeout (the click then goes to the spool).
fn producer(sink: &KafkaSink) -> std::io::Result<rdkafka::producer::FutureProducer> {
    let mut config = rdkafka::ClientConfig::new();
    for (key, value) in &sink.config {
        config.set(key, value);
    }
    config
        .set("bootstrap.servers", &sink.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set(
            "message.timeout.ms",
            sink.timeout.as_millis().max(1).to_string(),
        )
        .create()
        .map_err(|e| std::io::Error::other(format!("Kafka producer for {}: {e}", sink.brokers)))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    crate::metrics::metrics_response(&app.registry).into_response()
}
