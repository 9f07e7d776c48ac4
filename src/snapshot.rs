//! A snapshot of what readers see in the curated tables: every file, its version and mtime.
//!
//! Demo and tests compare snapshots to show that a replay changed nothing, that a rerun wrote no
//! file (same mtimes), and that a crashed publish recovered to exactly the uninterrupted state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use adsmetrics_dataflows::Grain;
use xxhash_rust::xxh3::Xxh3;

use crate::sink::curated::file_version;
use crate::warehouse::Warehouse;

/// One curated file as a reader finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileState {
    /// Version from the file's metadata.
    pub version: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time.
    pub modified: Option<SystemTime>,
    /// XXH3-128 of the bytes.
    pub bytes_hash: u128,
}

/// Every file under the curated tables, by path relative to the warehouse.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TableSnapshot {
    /// Files by relative path.
    pub files: BTreeMap<PathBuf, FileState>,
}

impl TableSnapshot {
    /// Reads the current state of both curated tables.
    pub fn take(warehouse: &Warehouse) -> std::io::Result<Self> {
        let mut files = BTreeMap::new();
        for grain in Grain::ALL {
            let dir = warehouse.table_dir(grain);
            if !dir.exists() {
                continue;
            }
            for entry in walkdir::WalkDir::new(&dir).sort_by_file_name() {
                let entry = entry.map_err(std::io::Error::other)?;
                if !entry.file_type().is_file() {
                    continue;
                }
                let meta = entry.metadata().map_err(std::io::Error::other)?;
                let bytes = std::fs::read(entry.path())?;
                let relative = entry
                    .path()
                    .strip_prefix(warehouse.root())
                    .unwrap_or(entry.path())
                    .to_path_buf();
                files.insert(
                    relative,
                    FileState {
                        version: file_version(entry.path()),
                        size: meta.len(),
                        modified: meta.modified().ok(),
                        bytes_hash: xxhash_rust::xxh3::xxh3_128(&bytes),
                    },
                );
            }
        }
        Ok(TableSnapshot { files })
    }

    /// A fingerprint of the contents (paths and bytes, not mtimes): equal ⇔ readers see the same.
    pub fn fingerprint(&self) -> String {
        let mut h = Xxh3::new();
        for (path, state) in &self.files {
            h.update(path.to_string_lossy().as_bytes());
            h.update(&state.bytes_hash.to_le_bytes());
        }
        format!("{:032x}", h.digest128())
    }

    /// Whether every file is the same file (same bytes and same mtime): nothing was rewritten.
    pub fn untouched_since(&self, earlier: &TableSnapshot) -> bool {
        self == earlier
    }
}
