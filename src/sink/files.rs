//! Durable file writes: write to staging, fsync, rename into place.
//!
//! A reader of the destination directory sees the old file or the new one, never a partial one.
//! Staging is outside every table directory, on the same filesystem (the warehouse), so the
//! rename is atomic on POSIX and HDFS, and a PUT of the whole object on an object store.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::{WriterProperties, WriterPropertiesBuilder};

/// A write failed; says which file. I/O errors here may be retried by rerunning the command.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The OS refused.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The Parquet encoder refused (a bug: our batches follow our schemas).
    #[error("encoding {path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The encoder error.
        source: parquet::errors::ParquetError,
    },
}

/// The writer settings every file of this project starts from: a fixed `created_by` (no version
/// or time in it, so the same rows give the same bytes), Snappy, row groups of up to 1M rows.
pub fn base_writer_properties() -> WriterPropertiesBuilder {
    WriterProperties::builder()
        .set_created_by("adsmetrics (parquet-rs)".to_string())
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20))
}

/// Encodes `batch` as Parquet bytes with `props`.
pub fn parquet_bytes(
    batch: &RecordBatch,
    props: WriterProperties,
    path: &Path,
) -> Result<Vec<u8>, WriteError> {
    let err = |source| WriteError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).map_err(err)?;
    writer.write(batch).map_err(err)?;
    writer.close().map_err(err)?;
    Ok(out)
}

/// Writes `bytes` to `path`, creating directories. Not durable by itself: the publish makes
/// everything written durable at once with [`sync_filesystem`] before the journal refers to it.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let err = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        ensure_dir(dir).map_err(err)?;
    }
    let mut f = File::create(path).map_err(err)?;
    f.write_all(bytes).map_err(err)
}

/// Stages `bytes` as the side-table file `<table>/<day_dir>/sources-<hash>.parquet` of the
/// sources `source_hashes` (the hash is of their sorted content hashes, so the same sources name
/// the same file) and returns it for the publish to rename into place.
pub fn stage_side_file<'a>(
    warehouse: &crate::warehouse::Warehouse,
    table: &str,
    day_dir: &str,
    source_hashes: impl IntoIterator<Item = &'a str>,
    bytes: &[u8],
) -> Result<crate::journal::SideFile, WriteError> {
    let mut hashes: Vec<&str> = source_hashes.into_iter().collect();
    hashes.sort_unstable();
    hashes.dedup();
    let name = format!(
        "sources-{:032x}.parquet",
        xxhash_rust::xxh3::xxh3_128(hashes.join("\n").as_bytes())
    );
    let staged = warehouse.staging_dir().join(format!("{table}-{name}"));
    write_file(&staged, bytes)?;
    let staged = staged
        .strip_prefix(warehouse.root())
        .unwrap_or(&staged)
        .to_string_lossy()
        .into_owned();
    let dest = format!("{table}/{day_dir}/{name}");
    Ok(crate::journal::SideFile { staged, dest })
}

/// Places `bytes` at `dest` atomically through `staged` (same filesystem): a reader of `dest`
/// sees the old file or the new one, never a partial one.
pub fn replace(staged: &Path, dest: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_file(staged, bytes)?;
    let err = |source| WriteError::Io {
        path: dest.to_path_buf(),
        source,
    };
    ensure_dir(dest.parent().unwrap_or(Path::new("."))).map_err(err)?;
    fs::rename(staged, dest).map_err(err)
}

/// Creates `dir` and its parents unless it is a directory already. `create_dir_all` tries
/// `mkdir` first, which takes the parent directory's lock even when the directory exists: twice
/// per file written, against the other threads creating files there.
fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)
}

/// Appends `record` as one JSON line to the file at `path` (created with its directory) and
/// syncs it: the append-only logs (journal, ledger, tombstones) are written only this way. A
/// crash inside the append leaves at most a torn last line, which [`read_log`] drops.
pub fn append_json_line(path: &Path, record: &impl serde::Serialize) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_all()
}

/// The complete lines of an append-only log written by [`append_json_line`] (`None` if the file
/// does not exist). Bytes after the last newline are a torn final append — a crash inside it,
/// never acknowledged — and are ignored; with `repair` they are also cut off the file (synced),
/// so the next append starts on a line of its own.
pub fn read_log(path: &Path, repair: bool) -> io::Result<Option<String>> {
    complete_lines(path, repair)?
        .map(String::from_utf8)
        .transpose()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The bytes of the file at `path` up to and including its last newline (`None` if the file does
/// not exist); a torn last line after it is logged and, with `repair`, cut off the file (synced).
pub fn complete_lines(path: &Path, repair: bool) -> io::Result<Option<Vec<u8>>> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        tracing::warn!(path = %path.display(), bytes = bytes.len() - complete, "ignoring a torn last line");
        if repair {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.set_len(complete as u64)?;
            f.sync_all()?;
        }
    }
    bytes.truncate(complete);
    Ok(Some(bytes))
}

/// Makes every write and rename so far on the filesystem holding `dir` durable: one `syncfs`
/// per publish step instead of an fsync per file and directory (hundreds of files per epoch).
pub fn sync_filesystem(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    #[cfg(target_os = "linux")]
    {
        rustix::fs::syncfs(&d)?;
    }
    #[cfg(not(target_os = "linux"))]
    {
        d.sync_all()?;
    }
    Ok(())
}
