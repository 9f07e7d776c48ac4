//! The click spool: where `adsmetrics serve` appends the clicks it accepts, durably, before it
//! answers, when no Kafka topic is configured; `adsmetrics ingest <spool dir>` reads it like any
//! JSON-lines source.
//!
//! ```text
//!  <dir>/_open-<start µs>-<pid>.jsonl        the segment being written (ingest skips `_` names)
//!  <dir>/clicks-<start µs>-<pid>-<seq>.jsonl  sealed: never written again, ingested once
//!  <dir>/_forwarded-clicks-….jsonl             sent on to Kafka by `serve --kafka` (skipped)
//! ```
//!
//! One writer thread takes every request's line, writes what has queued up as one batch,
//! `fdatasync`s it and only then tells each request its click is on disk (group commit: one
//! sync for many clicks). A segment is sealed (renamed to its final name, the directory synced)
//! when it reaches its line limit or age, and when the spool closes. A segment a crash left open
//! is sealed when the spool next opens, cut at its last whole line: a torn last line was never
//! acknowledged. A sealed segment's name and bytes never change, so ingesting the spool again
//! skips it by its content hash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// When a segment is sealed.
#[derive(Clone, Copy, Debug)]
pub struct SealPolicy {
    /// At this many lines…
    pub max_lines: usize,
    /// …or this long after its first line.
    pub max_age: Duration,
}

impl Default for SealPolicy {
    fn default() -> Self {
        SealPolicy {
            max_lines: 100_000,
            max_age: Duration::from_secs(10),
        }
    }
}

enum Message {
    Append(Vec<u8>, tokio::sync::oneshot::Sender<io::Result<()>>),
    Seal(mpsc::Sender<io::Result<Option<PathBuf>>>),
}

/// An open spool; sealed and closed when dropped.
pub struct Spool {
    sender: Option<mpsc::Sender<Message>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spool {
    /// Opens the spool in `dir` (created if needed), sealing any segment a crash left open.
    pub fn open(dir: &Path, policy: SealPolicy) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with("_open-") && name.ends_with(".jsonl") {
                recover(&path)?;
            }
        }
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            dir: dir.to_path_buf(),
            policy,
            open: None,
            seq: 0,
        };
        let thread = std::thread::Builder::new()
            .name("click-spool".into())
            .spawn(move || writer.run(receiver))?;
        Ok(Spool {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Appends one line (without its newline); resolves once it is on disk.
    pub async fn append(&self, line: Vec<u8>) -> io::Result<()> {
        let (done, on_disk) = tokio::sync::oneshot::channel();
        self.sender
            .as_ref()
            .ok_or_else(|| io::Error::other("the spool is closed"))?
            .send(Message::Append(line, done))
            .map_err(|_| io::Error::other("the spool's writer stopped"))?;
        on_disk
            .await
            .map_err(|_| io::Error::other("the spool's writer stopped"))?
    }

    /// Seals the open segment now, if it has lines: its final path.
    pub fn seal(&self) -> io::Result<Option<PathBuf>> {
        let (done, sealed) = mpsc::channel();
        self.sender
            .as_ref()
            .ok_or_else(|| io::Error::other("the spool is closed"))?
            .send(Message::Seal(done))
            .map_err(|_| io::Error::other("the spool's writer stopped"))?;
        sealed
            .recv()
            .map_err(|_| io::Error::other("the spool's writer stopped"))?
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // The writer seals what it holds when its channel closes.
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Segment {
    file: File,
    path: PathBuf,
    started_us: i64,
    opened: Instant,
    lines: usize,
}

struct Writer {
    dir: PathBuf,
    policy: SealPolicy,
    open: Option<Segment>,
    seq: u64,
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Message>) {
        loop {
            let wait = match &self.open {
                Some(segment) => self.policy.max_age.saturating_sub(segment.opened.elapsed()),
                None => Duration::from_secs(3600),
            };
            let first = match receiver.recv_timeout(wait) {
                Ok(message) => message,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.seal() {
                        tracing::error!(error = %e, "could not seal a spool segment");
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            // Everything queued meanwhile goes in the same batch, under one sync.
            let mut batch = Vec::new();
            let mut seals = Vec::new();
            for message in std::iter::once(first).chain(receiver.try_iter()) {
                match message {
                    Message::Append(line, done) => batch.push((line, done)),
                    Message::Seal(done) => seals.push(done),
                }
            }
            if !batch.is_empty() {
                let written = self.write(batch.iter().map(|(line, _)| line.as_slice()));
                let failed = written.as_ref().err().map(|e| e.to_string());
                for (_, done) in batch {
                    let _ = done.send(match &failed {
                        None => Ok(()),
                        Some(e) => Err(io::Error::other(e.clone())),
                    });
                }
                if failed.is_some() {
                    // What was written of the failed batch is unacknowledged: the segment is
                    // dropped unsealed and recovered (cut to whole lines) at the next open.
                    self.open = None;
                }
            }
            let full = self.open.as_ref().is_some_and(|s| {
                s.lines >= self.policy.max_lines || s.opened.elapsed() >= self.policy.max_age
            });
            if !seals.is_empty() || full {
                let sealed = self.seal();
                if let Err(e) = &sealed {
                    tracing::error!(error = %e, "could not seal a spool segment");
                }
                for done in seals {
                    let _ = done.send(match &sealed {
                        Ok(path) => Ok(path.clone()),
                        Err(e) => Err(io::Error::other(e.to_string())),
                    });
                }
            }
        }
        if let Err(e) = self.seal() {
            tracing::error!(error = %e, "could not seal the last spool segment");
        }
    }

    fn write<'a>(&mut self, lines: impl Iterator<Item = &'a [u8]>) -> io::Result<()> {
        if self.open.is_none() {
            let started_us = chrono::Utc::now().timestamp_micros();
            let path = self
                .dir
                .join(format!("_open-{started_us}-{}.jsonl", std::process::id()));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            self.open = Some(Segment {
                file,
                path,
                started_us,
                opened: Instant::now(),
                lines: 0,
            });
        }
        let segment = self.open.as_mut().expect("opened above");
        let mut buf = Vec::new();
        for line in lines {
            buf.extend_from_slice(line);
            buf.push(b'\n');
            segment.lines += 1;
        }
        segment.file.write_all(&buf)?;
        segment.file.sync_data()
    }

    fn seal(&mut self) -> io::Result<Option<PathBuf>> {
        let Some(segment) = self.open.take() else {
            return Ok(None);
        };
        self.seq += 1;
        let sealed = self.dir.join(format!(
            "clicks-{}-{}-{}.jsonl",
            segment.started_us,
            std::process::id(),
            self.seq
        ));
        drop(segment.file);
        fs::rename(&segment.path, &sealed)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(Some(sealed))
    }
}

/// The spool's sealed segments, oldest first (by name: their start time leads).
pub fn sealed_segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("clicks-") && name.ends_with(".jsonl") {
            segments.push(path);
        }
    }
    segments.sort();
    Ok(segments)
}

/// Marks a sealed segment as sent on to Kafka: renamed `_forwarded-<name>` (ingest skips `_`
/// names; the file stays as a record), the directory synced.
pub fn mark_forwarded(segment: &Path) -> io::Result<()> {
    let name = segment
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = segment.parent().unwrap_or(Path::new("."));
    fs::rename(segment, dir.join(format!("_forwarded-{name}")))?;
    File::open(dir)?.sync_all()
}

/// Seals a segment a crash left open, cut at its last whole line (or removes it if it has none).
fn recover(path: &Path) -> io::Result<()> {
    // A torn last line was never acknowledged: cut off.
    let whole = crate::sink::files::complete_lines(path, true)?.unwrap_or_default();
    if whole.is_empty() {
        return fs::remove_file(path);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest = name.trim_start_matches("_open-").trim_end_matches(".jsonl");
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::rename(path, dir.join(format!("clicks-{rest}-recovered.jsonl")))?;
    File::open(dir)?.sync_all()?;
    tracing::warn!(path = %path.display(), "sealed a spool segment a crash left open");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn lines_are_on_disk_when_acknowledged_and_sealed_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let spool = Spool::open(dir.path(), SealPolicy::default()).unwrap();
        runtime.block_on(async {
            spool.append(b"{\"a\":1}".to_vec()).await.unwrap();
            spool.append(b"{\"a\":2}".to_vec()).await.unwrap();
        });
        let open = sealed(dir.path());
        assert_eq!(open.len(), 1);
        assert!(open[0].starts_with("_open-"));
        assert_eq!(
            fs::read(dir.path().join(&open[0])).unwrap(),
            b"{\"a\":1}\n{\"a\":2}\n"
        );
        drop(spool);
        let names = sealed(dir.path());
        assert_eq!(names.len(), 1);
        assert!(names[0].starts_with("clicks-") && names[0].ends_with("-1.jsonl"));
    }

    #[test]
    fn a_segment_left_open_is_cut_to_whole_lines_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("_open-5-9.jsonl"), b"{\"a\":1}\n{\"a\":").unwrap();
        fs::write(dir.path().join("_open-6-9.jsonl"), b"{\"a\"").unwrap();
        let spool = Spool::open(dir.path(), SealPolicy::default()).unwrap();
        assert_eq!(spool.seal().unwrap(), None);
        drop(spool);
        assert_eq!(sealed(dir.path()), vec!["clicks-5-9-recovered.jsonl"]);
        assert_eq!(
            fs::read(dir.path().join("clicks-5-9-recovered.jsonl")).unwrap(),
            b"{\"a\":1}\n"
        );
    }
}
