//! adsmetrics: an idempotent ads-metrics pipeline on timely and differential dataflow.
pub mod decode;
pub mod event;
pub mod schema;
