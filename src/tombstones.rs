//! Tombstones: the dedup keys of events removed by compliance deletes, remembered for good.
//!
//! `_adsmetrics/tombstones.jsonl`, one line per delete request: its id, reason, when, and the
//! keys it deleted (32 hex digits each). Every run reads them all. An event whose key is
//! tombstoned is never accepted again: not when an old source that still holds it is replayed,
//! not when the raw layer is read back (rehydration skips it, so a delete that crashed before it
//! rewrote the raw layer still takes effect), not in a backfill. A request's line is appended and
//! synced before anything else of the delete happens, so the tombstones are the delete's point of
//! no return.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use adsmetrics_dataflows::{DedupKey, Hash128};
use serde::{Deserialize, Serialize};

/// Errors reading or appending tombstones.
#[derive(Debug, thiserror::Error)]
pub enum TombstoneError {
    /// The OS refused.
    #[error("tombstones {path}: {source}")]
    Io {
        /// The tombstone file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A line is not a tombstone record (the file was edited or damaged).
    #[error("tombstones {path} line {line}: {detail}")]
    Corrupt {
        /// The tombstone file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parse error.
        detail: String,
    },
}

/// One delete request's tombstones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneRequest {
    /// The request id given to `adsmetrics delete`.
    pub request_id: String,
    /// Why (free text, for the audit).
    pub reason: String,
    /// When the request was first applied, RFC 3339 UTC.
    pub at: String,
    /// The deleted dedup keys, 32 hex digits each, sorted.
    pub keys: Vec<String>,
}

/// Every tombstone of a warehouse.
#[derive(Debug, Default)]
pub struct Tombstones {
    path: PathBuf,
    requests: Vec<TombstoneRequest>,
    keys: HashSet<DedupKey>,
}

/// A key as stored: 32 hex digits.
pub fn key_hex(key: &DedupKey) -> String {
    format!("{:x}", key.0)
}

/// A key from its stored form; `None` unless exactly 32 hex digits.
pub fn parse_key(hex: &str) -> Option<DedupKey> {
    (hex.len() == 32)
        .then(|| u128::from_str_radix(hex, 16).ok())
        .flatten()
        .map(|v| DedupKey(Hash128::from(v)))
}

impl Tombstones {
    /// Reads the tombstones at `path` (none if the file does not exist).
    pub fn open(path: &Path) -> Result<Self, TombstoneError> {
        let mut out = Tombstones {
            path: path.to_path_buf(),
            ..Default::default()
        };
        // A torn last line is a request whose tombstones never became durable: its delete did
        // not pass the point of no return, and running it again starts over.
        let text = match crate::sink::files::read_log(path, true) {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(out),
            Err(source) => {
                return Err(TombstoneError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        for (i, line) in text.lines().enumerate() {
            let corrupt = |detail: String| TombstoneError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                detail,
            };
            let request: TombstoneRequest =
                serde_json::from_str(line).map_err(|e| corrupt(e.to_string()))?;
            for hex in &request.keys {
                let key = parse_key(hex).ok_or_else(|| corrupt(format!("bad key {hex:?}")))?;
                out.keys.insert(key);
            }
            out.requests.push(request);
        }
        Ok(out)
    }

    /// Whether `key` was deleted.
    pub fn contains(&self, key: &DedupKey) -> bool {
        self.keys.contains(key)
    }

    /// How many keys are tombstoned.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing was ever deleted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every request, in the order applied.
    pub fn requests(&self) -> &[TombstoneRequest] {
        &self.requests
    }

    /// The request with this id, if it was applied before.
    pub fn request(&self, request_id: &str) -> Option<&TombstoneRequest> {
        self.requests.iter().find(|r| r.request_id == request_id)
    }

    /// Appends (and syncs) a request's tombstones.
    pub fn append(&mut self, request: TombstoneRequest) -> Result<(), TombstoneError> {
        crate::sink::files::append_json_line(&self.path, &request).map_err(|source| {
            TombstoneError::Io {
                path: self.path.clone(),
                source,
            }
        })?;
        for hex in &request.keys {
            if let Some(key) = parse_key(hex) {
                self.keys.insert(key);
            }
        }
        self.requests.push(request);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_hex() {
        for v in [0u128, 1, u128::MAX, 0x0123_4567_89ab_cdef << 40] {
            let key = DedupKey(Hash128::from(v));
            assert_eq!(parse_key(&key_hex(&key)), Some(key));
        }
        assert_eq!(parse_key("abc"), None);
        assert_eq!(parse_key(&"g".repeat(32)), None);
    }
}
