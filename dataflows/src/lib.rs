//! The dataflows of adsmetrics: pure timely/differential definitions, no I/O.
//!
//! ```text
//!  (DedupKey, EventVersion) ±1 per source partition        epoch = logical time
//!        │
//!        ▼
//!  dedup      reduce per DedupKey → greatest present version (revision, content hash)
//!        │
//!        ▼
//!  aggregate  explode → ((grain, period, dims), user) with Sums as the difference
//!             reduce per cell → MetricRow { sums…, unique_users }
//!        │
//!        ▼ exchange by partition (grain, period): one writer per partition
//!  mirror     current rows of owned partitions + partitions touched this epoch
//! ```
//!
//! The root crate feeds the input, waits on the probe, and publishes the touched partitions.

pub mod aggregate;
pub mod batching;
pub mod dedup;
pub mod mirror;
pub mod model;
pub mod pipeline;
pub mod reference;

pub use mirror::{MirrorError, PartitionId, PartitionMirror};
pub use model::*;
