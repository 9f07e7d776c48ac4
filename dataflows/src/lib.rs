//! The dataflows of adsmetrics: pure timely/differential definitions, no I/O.
//!
//! ```text
//!  (DedupKey, EventVersion) ±1 per source partition        epoch = logical time
//!        │
//!        ▼
//!  dedup      per DedupKey → greatest present version (revision, content hash), emitted as
//!             winner changes by a total-order operator over the input arrangement
//!        │
//!        ▼
//!  aggregate  sums: Sums per (grain, period, dims) cell, as differences, no state
//!             users: per (user, day) the set of hours with events, a reduce_total that turns
//!             its changes into ±1 unique user per hourly and daily cell
//!        │
//!        ▼ pre-aggregate per worker and epoch, exchange by partition: one writer each
//!  mirror     adds up each cell's changes; partitions touched this epoch
//! ```
//!
//! The root crate feeds the input, waits on the probe, and publishes the touched partitions.

pub mod aggregate;
pub mod batching;
pub mod dedup;
pub mod mirror;
pub mod model;
pub mod pipeline;
pub mod reduce_total;
pub mod reference;

pub use mirror::{MirrorError, PartitionId, PartitionMirror};
pub use model::*;
