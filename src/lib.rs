//! adsmetrics: an idempotent ads-metrics pipeline on timely and differential dataflow.
//!
//! ```text
//!  files (Parquet, JSON lines; Hive dt=/hr= folders)        source  — identity = content hash
//!    │
//!    ▼ decode ──────────────▶ quarantine/ (reason, raw bytes)  nothing dropped silently
//!    │ events, in-source dedup
//!    ├──────────────────────▶ raw/dt=/src-<hash>.parquet       system of record, written once
//!    ▼
//!  dataflows: winner per DedupKey → sums and distinct users per (hour|day, dims) epoch = batch
//!    │ exchange by partition: one writer per partition
//!    ▼
//!  sink: changed partitions only → staging → journal prepare → atomic rename → commit
//!    ▼
//!  ads_metrics_hourly/dt=/hr=/data.parquet    ads_metrics_daily/dt=/data.parquet
//! ```
//!
//! Every run (`ingest`, `backfill`, `delete`) rebuilds only the state its changes need — by key
//! and user-day ([`rehydrate`]), or whole event days for a delete ([`scope`]) — publishes through the commit journal ([`journal`]) and appends one
//! hash-chained entry to the audit ledger ([`ledger`]). Deleted keys are remembered as
//! [`tombstones`]; late arrivals are recorded beside the tables (`sink::late`).
//!
//! The library holds every stage; `main.rs` binds them to the command line.

pub mod backfill;
pub mod broker;
pub mod check;
pub mod cluster;
pub mod dashboard;
pub mod ddl;
pub mod decode;
pub mod delete;
pub mod demo;
pub mod event;
pub mod generate;
pub mod journal;
pub mod keyindex;
pub mod ledger;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod periodic;
pub mod query;
pub mod rehydrate;
pub mod report;
pub mod retention;
pub mod runtime;
pub mod schema;
pub mod scope;
pub mod serve;
pub mod show;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod spool;
pub mod stream;
pub mod token;
pub mod tombstones;
pub mod warehouse;
