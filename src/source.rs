//! Sources: finding the source partitions of a batch and giving each its identity.
//!
//! A source partition here is one file. Its identity is the XXH3-128 of its bytes: a file copied
//! or replayed under another name is the same source, and a file whose bytes changed is a new one.
//! Directories are walked recursively (Hive `dt=/hr=` folders included), in sorted order; names
//! starting with `_` or `.` are skipped as Hadoop/Hive markers (`_SUCCESS`, `.crc`). Every other
//! file is a source: one that is not Parquet or JSON lines is quarantined whole by the decoder.
//! A range of a Kafka partition is a source too ([`crate::stream`]): it comes decoded
//! ([`SourceFile::inline`]), named and hashed by its topic, partition, offsets and messages.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_128;

use crate::decode::Decoded;

/// A source file with its identity. Serialized (a cluster's plan) without its inline records.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceFile {
    /// Where it is.
    pub path: PathBuf,
    /// How it is named in the journal, raw layer and quarantine (the path as found).
    pub label: String,
    /// XXH3-128 of its bytes, 32 hex digits.
    pub content_hash: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// A source that is not a file (a range of a Kafka partition): its records, already decoded
    /// (and `path` is only its label). `None` for a file, which is read from `path`.
    #[serde(skip)]
    pub inline: Option<Arc<Decoded>>,
    /// A stream's source that another process of a cluster read and holds (a range of one of
    /// its Kafka partitions): which process. `None` for a file, or a source held by this
    /// process.
    #[serde(skip)]
    pub held_by: Option<Arc<HeldBy>>,
}

/// A source another process of a cluster holds ([`SourceFile::held_by`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBy {
    /// The process that holds its messages (and whose workers ingest it, and send the keyed
    /// rebuild their keys).
    pub process: usize,
}

impl SourceFile {
    /// Its records: the inline ones, or the file read and decoded (a Parquet file on up to
    /// `parts` threads; the result is the same for any number).
    pub fn decode(&self, parts: usize) -> Result<Arc<Decoded>, SourceError> {
        if let Some(decoded) = &self.inline {
            // Shared, not copied: an epoch of a stream is hundreds of thousands of events.
            return Ok(decoded.clone());
        }
        let bytes = fs::read(&self.path).map_err(|source| SourceError {
            path: self.path.clone(),
            source,
        })?;
        Ok(Arc::new(crate::decode::decode_source_parallel(
            &self.label,
            bytes::Bytes::from(bytes),
            parts.max(1),
        )))
    }
}

/// A source could not be listed or read.
#[derive(Debug, thiserror::Error)]
#[error("reading source {path}: {source}")]
pub struct SourceError {
    /// The file or directory.
    pub path: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

fn skipped(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with('_') || name.starts_with('.')
}

/// Lists the files under `inputs` (files as given, directories walked), sorted, without repeats.
pub fn discover(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, SourceError> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|source| SourceError {
            path: input.clone(),
            source,
        })?;
        if meta.is_file() {
            files.push(input.clone());
            continue;
        }
        for entry in walkdir::WalkDir::new(input)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !skipped(e.file_name()))
        {
            let entry = entry.map_err(|e| SourceError {
                path: e
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| input.clone()),
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("directory loop")),
            })?;
            if entry.file_type().is_file() {
                files.push(entry.into_path());
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Reads and hashes each file, on up to `threads` threads; results keep the input order.
pub fn identify(files: &[PathBuf], threads: usize) -> Result<Vec<SourceFile>, SourceError> {
    let threads = threads.max(1).min(files.len().max(1));
    let chunk = files.len().div_ceil(threads).max(1);
    let results: Vec<Result<Vec<SourceFile>, SourceError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|path| {
                            let bytes = fs::read(path).map_err(|source| SourceError {
                                path: path.clone(),
                                source,
                            })?;
                            Ok(SourceFile {
                                path: path.clone(),
                                label: path.to_string_lossy().into_owned(),
                                content_hash: format!("{:032x}", xxh3_128(&bytes)),
                                bytes: bytes.len() as u64,
                                inline: None,
                                held_by: None,
                            })
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("hashing thread does not panic"))
            .collect()
    });
    let mut out = Vec::with_capacity(files.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}
