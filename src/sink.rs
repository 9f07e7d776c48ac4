//! The sink: raw layer, quarantine, and curated partitions published atomically.
pub mod curated;
pub mod files;
pub mod late;
pub mod publish;
pub mod quarantine;
pub mod raw;
