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
//!    dedup is the authority) ─▶ appended to the spool and synced (crate::spool)
//!      └─ the spool fails ──▶ 503, counted, no redirect (the client retries; nothing is lost
//!         silently)
//!    302, Location = the token's target URL, never anything from the query
//!  GET /metrics  Prometheus text: clicks by outcome, refusals by reason, spool errors
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
    seen: Mutex<Seen>,
    clicks: Family<Outcome, Counter>,
    refused: Family<Reason, Counter>,
    registry: Registry,
}

/// A bounded set of recently seen impression ids, oldest forgotten first.
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl Seen {
    /// Whether `id` was seen; remembers it.
    fn check_and_insert(&mut self, id: &str) -> bool {
        if self.capacity == 0 {
            return false;
        }
        if self.set.contains(id) {
            return true;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        false
    }

    fn forget(&mut self, id: &str) {
        self.set.remove(id);
    }
}

/// A running click server; stops (and seals its spool) when dropped.
pub struct ClickServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    app: Arc<App>,
}

impl ClickServer {
    /// Binds `options.listen`, opens the spool and serves on threads of its own. Fails at once if
    /// the address cannot be bound or the spool cannot be opened.
    pub fn start(options: ServeOptions) -> std::io::Result<Self> {
        let spool = Spool::open(&options.spool, options.seal)?;
        let mut registry = Registry::default();
        let clicks = Family::<Outcome, Counter>::default();
        let refused = Family::<Reason, Counter>::default();
        registry.register(
            "adsmetrics_clicks",
            "Clicks by outcome: accepted (spooled), duplicate (seen by the front-line dedup), refused, spool_failed",
            clicks.clone(),
        );
        registry.register(
            "adsmetrics_clicks_refused",
            "Refused click tokens by reason (answered 400, never ingested)",
            refused.clone(),
        );
        let app = Arc::new(App {
            keyring: options.keyring,
            spool,
            seen: Mutex::new(Seen {
                set: HashSet::new(),
                order: VecDeque::new(),
                capacity: options.dedup_capacity,
            }),
            clicks,
            refused,
            registry,
        });
        let listener = std::net::TcpListener::bind(&options.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("click-http")
            .enable_io()
            .enable_time()
            .build()?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = axum::Router::new()
            .route("/click", axum::routing::get(click))
            .route("/metrics", axum::routing::get(metrics))
            .with_state(app.clone());
        let thread = std::thread::Builder::new()
            .name("click-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "click server could not start");
                            return;
                        }
                    };
                    let served = axum::serve(
                        listener,
                        router.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "click server stopped");
                    }
                });
            })?;
        Ok(ClickServer {
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
            app,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Seals the spool's open segment now (its final path, if it had clicks), so that an ingest
    /// sees every click accepted so far.
    pub fn seal(&self) -> std::io::Result<Option<PathBuf>> {
        self.app.spool.seal()
    }
}

impl Drop for ClickServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The spool seals when the last handle on the app goes, which is this one.
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
    app.clicks
        .get_or_create(&Outcome {
            outcome: "refused".into(),
        })
        .inc();
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
    let duplicate = app
        .seen
        .lock()
        .expect("no handler panics holding the lock")
        .check_and_insert(&claims.impression_id);
    if duplicate {
        app.clicks
            .get_or_create(&Outcome {
                outcome: "duplicate".into(),
            })
            .inc();
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
    match app.spool.append(line).await {
        Ok(()) => {
            app.clicks
                .get_or_create(&Outcome {
                    outcome: "accepted".into(),
                })
                .inc();
            redirect.into_response()
        }
        Err(e) => {
            // Not recorded: forget it, so the client's retry is not taken for a duplicate.
            app.seen
                .lock()
                .expect("no handler panics holding the lock")
                .forget(&claims.impression_id);
            app.clicks
                .get_or_create(&Outcome {
                    outcome: "spool_failed".into(),
                })
                .inc();
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

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&app.registry),
    )
        .into_response()
}
