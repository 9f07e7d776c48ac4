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
//!  aggregate  per (user, day) the hours it has events in, each with their sums; a
//!             reduce_total_with_changes turns changes into sums and ±1 unique users per
//!             hourly and daily cell (weeks: sums of days); a click's minute cell adds its
//!             sums as differences, no state
//!        │
//!        ▼ pre-aggregate per worker and epoch, exchange by partition: one writer each
//!  mirror     adds up each cell's changes; partitions touched this epoch
//! ```
//!
//! The root crate feeds the input, waits on the probe, and publishes the touched partitions.
//! [`batch`] computes the same mirror changes for a run of one change epoch with sorts, in a
//! timely dataflow of plain operators (a batch run's generations: a differential dataflow would
//! be built and dropped within the run).

pub mod aggregate;
pub mod batch;
pub mod batching;
pub mod dedup;
pub mod mirror;
pub mod model;
pub mod pipeline;
pub mod reduce_total;
pub mod reference;

pub use mirror::{MirrorError, PartitionId, PartitionMirror};
pub use model::*;
