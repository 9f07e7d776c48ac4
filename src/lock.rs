//! The warehouse writer lock: one process at a time reads the journal, publishes and appends to
//! the ledger.
//!
//! Every run that writes (ingest, backfill, delete, retention, each stream epoch) holds an
//! exclusive advisory lock on `_adsmetrics/writer.lock` from opening the journal to its ledger
//! entry (a delete: to its certificate, past the raw files and quarantine it rewrites after its
//! run), so its read-decide-publish is atomic against other writers: an orchestrator's retry
//! that starts while a stale try of the same task is still running waits for it, then starts from
//! what it published (and converges, every run being idempotent). The kernel drops the lock when
//! its process dies, however it dies, so a crash never leaves the warehouse locked.
//!
//! The lock is the first fence; the journal's compare-and-swap at `Prepare` is the second (see
//! [`crate::journal::JournalError::Fenced`]): on a filesystem where advisory locks do not reach
//! every writer, a publish still refuses to replace a version it did not read.
//!
//! Readers (`check`, `show`, `audit`, the query engines) never take it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::warehouse::Warehouse;

/// How often a waiting writer tries the lock again.
const RETRY: Duration = Duration::from_millis(100);

/// Errors of taking the writer lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be created or locked.
    #[error("warehouse writer lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another writer held the lock for the whole wait.
    #[error(
        "the warehouse is locked by another writer ({holder}) and stayed locked for {waited:?}; \
         nothing was changed. Run again when it has finished, or raise --lock-wait"
    )]
    Busy {
        /// What the holder wrote into the lock file.
        holder: String,
        /// How long this process waited.
        waited: Duration,
    },
}

/// The held lock; released when it and every [`WriterLock::share`] of it are dropped (or when the
/// process ends).
#[derive(Debug)]
pub struct WriterLock {
    file: std::sync::Arc<File>,
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        // No holder any more (a crashed holder's line stays, and says who it was).
        if std::sync::Arc::strong_count(&self.file) == 1 {
            let _ = self.file.set_len(0);
        }
    }
}

impl WriterLock {
    /// Takes the writer lock of `warehouse`, waiting up to its `lock_wait` for another writer to
    /// finish.
    pub fn acquire(warehouse: &Warehouse) -> Result<WriterLock, LockError> {
        let path = warehouse.writer_lock_path();
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let started = Instant::now();
        let mut said = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let waited = started.elapsed();
                    if waited >= warehouse.lock_wait() {
                        return Err(LockError::Busy {
                            holder: holder(&path),
                            waited,
                        });
                    }
                    if !said {
                        tracing::warn!(
                            holder = %holder(&path),
                            wait = ?warehouse.lock_wait(),
                            "waiting for the warehouse writer lock"
                        );
                        said = true;
                    }
                    std::thread::sleep(RETRY);
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        // Who holds it, for whoever waits: informative only, the lock is the kernel's.
        let who = format!(
            "pid {}{}, since {}: {}",
            std::process::id(),
            warehouse
                .run_key()
                .map(|k| format!(", run key {k}"))
                .unwrap_or_default(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        file.set_len(0).map_err(io)?;
        file.write_all(who.as_bytes()).map_err(io)?;
        Ok(WriterLock {
            file: std::sync::Arc::new(file),
        })
    }

    /// The same lock, held until this and the original are both dropped: for a command that
    /// hands its lock to a run and writes more after it (a delete's raw files, quarantine and
    /// certificate).
    pub fn share(&self) -> WriterLock {
        WriterLock {
            file: std::sync::Arc::clone(&self.file),
        }
    }
}

fn holder(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => "unknown holder".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared lock stays held, with its holder's line, until the last handle goes.
    #[test]
    fn a_shared_lock_is_held_until_every_handle_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let warehouse = Warehouse::new(dir.path().join("wh")).with_lock_wait(Duration::ZERO);
        let lock = WriterLock::acquire(&warehouse).unwrap();
        let kept = lock.share();
        drop(lock);
        match WriterLock::acquire(&warehouse) {
            Err(LockError::Busy { holder, .. }) => {
                assert!(
                    holder.contains(&format!("pid {}", std::process::id())),
                    "{holder}"
                )
            }
            other => panic!("the shared lock was released: {other:?}"),
        }
        drop(kept);
        WriterLock::acquire(&warehouse).unwrap();
    }
}
