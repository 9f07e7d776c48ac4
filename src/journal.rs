//! The commit journal: the write-ahead record of every publish, and the recovery that finishes one.
//!
//! The journal is an append-only JSON-lines file. A publish is two records around the renames:
//!
//! 1. every new partition file is written in staging, and the filesystem is synced (one
//!    `syncfs`, which also makes the epoch's raw files and staged side-table files durable);
//! 2. `Prepare` lists the epoch's sources and, per partition, the old and new version and the
//!    staged file, and the staged side-table files; it is appended and fsynced — from here on
//!    the publish *will* happen;
//! 3. each staged file is renamed over the partition's fixed file name (or the file is removed
//!    for a partition that became empty), then each side-table file (quarantine, late arrivals)
//!    into its table, and the filesystem is synced;
//! 4. `Commit` is appended and fsynced.
//!
//! Recovery at startup looks at the last record: a `Prepare` without its `Commit` is rolled
//! forward (renames are repeated where the staged file is still there; a partition whose file
//! already carries the new version is done), then committed. Staging files not named by a pending
//! `Prepare` are leftovers of a publish that never prepared, and are removed (rolled back). A torn
//! last line (a crash inside an append) is not a record and is cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use adsmetrics_dataflows::{Dims, MetricRow, PartitionId};
use serde::{Deserialize, Serialize};

use crate::sink::publish::PublishOrigin;

/// Errors of the journal; all are I/O or a journal that does not parse (not retryable by rerun).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the journal or a partition file failed.
    #[error("commit journal I/O on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A record before the last one does not parse: the journal was edited or corrupted.
    #[error("commit journal {path} line {line} is not a journal record: {detail}")]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        detail: String,
    },
    /// The compare-and-swap of a publish failed: the journal on disk is not the one this run read,
    /// or a partition's published version is not the one the run replaces. Another writer
    /// published meanwhile (one that bypassed the writer lock, e.g. on a filesystem without
    /// locks); this run published nothing and a rerun converges.
    #[error("fenced: {detail} ({path}); this run published nothing; run it again to converge")]
    Fenced {
        /// The journal.
        path: PathBuf,
        /// What differed.
        detail: String,
    },
    /// A fault injected by a test (`FailPoint`): the process "crashed" here.
    #[error("injected fault: {0}")]
    Injected(String),
    /// A pending publish cannot be finished: its staged file is gone and the partition does not
    /// hold the new version.
    #[error("cannot finish publish {seq}: staged file {staged} is missing and {target} is not version {version}")]
    Unrecoverable {
        /// The publish.
        seq: u64,
        /// The missing staged file.
        staged: String,
        /// The partition file.
        target: String,
        /// The version it should hold.
        version: String,
    },
}

/// Renames a staged file over `dest`, creating its directory.
fn move_into_place(staged: &Path, dest: &Path) -> Result<(), JournalError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::rename(staged, dest).map_err(io_err(dest))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A source partition consumed by an epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Path relative to the ingest root, or topic/partition/offsets.
    pub source: String,
    /// XXH3-128 of the source's bytes, hex.
    pub content_hash: String,
    /// Records accepted into the raw layer (after in-source dedup).
    pub accepted: u64,
    /// Records quarantined.
    pub quarantined: u64,
    /// Records dropped as exact duplicates inside the same source.
    pub in_source_duplicates: u64,
    /// Records not accepted because their key was deleted (a compliance tombstone).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tombstoned: u64,
    /// The source partition this source now is, for replace semantics (`backfill`): its path
    /// relative to the backfill's source root. `None` for plain ingests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A source whose contribution a publish withdrew: a backfilled source partition that changed or
/// disappeared. Its raw rows were retracted in the same publish that added the replacement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredSource {
    /// The source partition.
    pub partition: String,
    /// The content hash the source partition no longer contributes.
    pub content_hash: String,
    /// Whether the content's raw rows were retracted in this publish (it contributes through no
    /// other source partition): only then does it leave the committed set.
    #[serde(default)]
    pub rows_withdrawn: bool,
}

/// A partition's metrics added up over its rows: what the audit ledger reports changes of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricTotals {
    /// Rows (cells) in the partition.
    pub rows: i64,
    /// Sum of impressions.
    pub impressions: i64,
    /// Sum of clicks.
    pub clicks: i64,
    /// Sum of conversions.
    pub conversions: i64,
    /// Sum of cost.
    pub cost_micros: i64,
    /// Sum of revenue.
    pub revenue_micros: i64,
    /// Sum of the rows' distinct-user counts (a user in two cells counts twice).
    pub unique_users: i64,
}

impl MetricTotals {
    /// The totals of a partition's rows.
    pub fn of(rows: &[(Dims, MetricRow)]) -> Self {
        rows.iter().fold(
            MetricTotals {
                rows: rows.len() as i64,
                ..Default::default()
            },
            |t, (_, m)| MetricTotals {
                rows: t.rows,
                impressions: t.impressions.wrapping_add(m.impressions),
                clicks: t.clicks.wrapping_add(m.clicks),
                conversions: t.conversions.wrapping_add(m.conversions),
                cost_micros: t.cost_micros.wrapping_add(m.cost_micros),
                revenue_micros: t.revenue_micros.wrapping_add(m.revenue_micros),
                unique_users: t.unique_users.wrapping_add(m.unique_users),
            },
        )
    }

    /// `self + other`, field by field.
    pub fn plus(&self, other: &MetricTotals) -> MetricTotals {
        MetricTotals {
            rows: self.rows.wrapping_add(other.rows),
            impressions: self.impressions.wrapping_add(other.impressions),
            clicks: self.clicks.wrapping_add(other.clicks),
            conversions: self.conversions.wrapping_add(other.conversions),
            cost_micros: self.cost_micros.wrapping_add(other.cost_micros),
            revenue_micros: self.revenue_micros.wrapping_add(other.revenue_micros),
            unique_users: self.unique_users.wrapping_add(other.unique_users),
        }
    }

    /// `self − before`, field by field.
    pub fn minus(&self, before: &MetricTotals) -> MetricTotals {
        MetricTotals {
            rows: self.rows.wrapping_sub(before.rows),
            impressions: self.impressions.wrapping_sub(before.impressions),
            clicks: self.clicks.wrapping_sub(before.clicks),
            conversions: self.conversions.wrapping_sub(before.conversions),
            cost_micros: self.cost_micros.wrapping_sub(before.cost_micros),
            revenue_micros: self.revenue_micros.wrapping_sub(before.revenue_micros),
            unique_users: self.unique_users.wrapping_sub(before.unique_users),
        }
    }
}

/// One partition's change in a publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionChange {
    /// The partition.
    pub partition: PartitionId,
    /// Its version before, if it existed.
    pub old_version: Option<String>,
    /// Its new version; `None` when it became empty and its file is removed.
    pub new_version: Option<String>,
    /// Rows in the new version.
    pub rows: u64,
    /// The staged file (relative to the warehouse root) that becomes the partition's file.
    pub staged: Option<String>,
    /// Totals of the version it replaces (zero for a new partition). Absent in journals written
    /// before totals were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_totals: Option<MetricTotals>,
    /// Totals of the new version (zero when the partition became empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_totals: Option<MetricTotals>,
}

/// A file of a side table (`quarantine`, `late_arrivals`) that a publish makes visible with its
/// sources: written in staging, renamed into place with the partitions. A publish that never
/// prepared leaves it in staging, where recovery removes it, so a rerun writes it once again
/// and the table never holds a source's rows twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideFile {
    /// The staged file, relative to the warehouse root.
    pub staged: String,
    /// Where it goes, relative to the warehouse root.
    pub dest: String,
}

/// A rename a commit has just done, in its order: every partition's, then every side file's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renamed {
    /// The n-th (0-based) changed partition's.
    Partition(usize),
    /// The n-th (0-based) side file's.
    Side(usize),
}

/// The audit ledger's newest entry when a publish was prepared: ties the ledger to the journal,
/// so entries cut from the ledger are found by `audit verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerAnchor {
    /// The entry's sequence number (0: the ledger was empty).
    pub seq: u64,
    /// The entry's hash.
    pub hash: String,
}

/// A publish the journal has committed: what the audit ledger records of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedPublish {
    /// Publish sequence number.
    pub seq: u64,
    /// The run that prepared it.
    pub run_id: String,
    /// The run key its run was given (`--run-key`): the orchestrator's name for the logical run,
    /// the same for every retry of it.
    pub run_key: Option<String>,
    /// Sources it consumed.
    pub sources: Vec<SourceRecord>,
    /// Partitions it changed.
    pub partitions: Vec<PartitionChange>,
    /// The ledger's newest entry when it was prepared.
    pub ledger: Option<LedgerAnchor>,
    /// Sources it withdrew.
    pub retired: Vec<RetiredSource>,
    /// Side-table files it renamed into place.
    pub side_files: Vec<SideFile>,
}

/// One line of the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum JournalRecord {
    /// A publish is decided; its renames follow.
    Prepare {
        /// Publish sequence number, 1, 2, … over the journal's life.
        seq: u64,
        /// The run that produced it.
        run_id: String,
        /// The run's `--run-key`, if it was given one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_key: Option<String>,
        /// The run's epoch.
        epoch: u64,
        /// Sources this epoch consumed.
        sources: Vec<SourceRecord>,
        /// Partitions it changes.
        partitions: Vec<PartitionChange>,
        /// The audit ledger's newest entry at the time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ledger: Option<LedgerAnchor>,
        /// Sources whose contribution this publish withdraws.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        retired: Vec<RetiredSource>,
        /// Side-table files it renames into place after its partitions.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        side_files: Vec<SideFile>,
    },
    /// The publish `seq` is complete.
    Commit {
        /// The publish.
        seq: u64,
    },
}

impl JournalRecord {
    /// Parses one line of the journal.
    ///
    /// The same as deserializing the enum, but through a plain struct: serde reads an internally
    /// tagged enum by first copying the whole record into a generic tree, and that was most of a
    /// run's start-up over a journal of thousands of sources.
    pub fn parse(line: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Flat {
            record: String,
            seq: u64,
            run_id: Option<String>,
            #[serde(default)]
            run_key: Option<String>,
            epoch: Option<u64>,
            sources: Option<Vec<SourceRecord>>,
            partitions: Option<Vec<PartitionChange>>,
            #[serde(default)]
            ledger: Option<LedgerAnchor>,
            #[serde(default)]
            retired: Vec<RetiredSource>,
            #[serde(default)]
            side_files: Vec<SideFile>,
        }
        let flat: Flat = serde_json::from_str(line)?;
        let missing = <serde_json::Error as serde::de::Error>::missing_field;
        match flat.record.as_str() {
            "prepare" => Ok(JournalRecord::Prepare {
                seq: flat.seq,
                run_id: flat.run_id.ok_or_else(|| missing("run_id"))?,
                run_key: flat.run_key,
                epoch: flat.epoch.ok_or_else(|| missing("epoch"))?,
                sources: flat.sources.ok_or_else(|| missing("sources"))?,
                partitions: flat.partitions.ok_or_else(|| missing("partitions"))?,
                ledger: flat.ledger,
                retired: flat.retired,
                side_files: flat.side_files,
            }),
            "commit" => Ok(JournalRecord::Commit { seq: flat.seq }),
            other => Err(<serde_json::Error as serde::de::Error>::unknown_variant(
                other,
                &["prepare", "commit"],
            )),
        }
    }
}

/// A partition's current published version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// Content hash of its rows, hex: the version.
    pub version: String,
    /// Number of rows.
    pub rows: u64,
    /// Its totals, when the journal recorded them.
    pub totals: Option<MetricTotals>,
}

/// The journal, replayed into its current state.
#[derive(Debug)]
pub struct CommitJournal {
    path: PathBuf,
    root: PathBuf,
    /// The journal's length as this handle last read or wrote it: the fence of every append.
    bytes: u64,
    last_seq: u64,
    /// The sequence number of the newest committed publish (0: none).
    last_commit: u64,
    published: BTreeMap<PartitionId, Published>,
    consumed: BTreeSet<String>,
    partitions: BTreeMap<String, String>,
    pending: Option<JournalRecord>,
    committed: Vec<CommittedPublish>,
}

impl CommitJournal {
    /// The state of a journal with no records.
    pub(crate) fn empty(root: &Path, path: &Path) -> Self {
        CommitJournal {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
            bytes: 0,
            last_seq: 0,
            last_commit: 0,
            published: BTreeMap::new(),
            consumed: BTreeSet::new(),
            partitions: BTreeMap::new(),
            pending: None,
            committed: Vec::new(),
        }
    }

    /// Opens (or starts) the journal of the warehouse at `root` and replays it. Does not recover:
    /// call [`CommitJournal::recover`] before publishing.
    pub fn open(root: &Path, path: &Path) -> Result<Self, JournalError> {
        let mut journal = CommitJournal::empty(root, path);
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(journal),
            Err(e) => return Err(io_err(path)(e)),
        };
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(io_err(path))?;
        let mut good_bytes = 0usize;
        for (i, line) in lines.iter().enumerate() {
            match JournalRecord::parse(line) {
                Ok(record) => {
                    journal.apply(record);
                    good_bytes += line.len() + 1;
                }
                Err(e) if i + 1 == lines.len() => {
                    // A torn final append: it never took effect. Cut it off.
                    tracing::warn!(line = i + 1, error = %e, "cutting a torn last record off the commit journal");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io_err(path))?;
                    f.set_len(good_bytes as u64).map_err(io_err(path))?;
                    f.sync_all().map_err(io_err(path))?;
                }
                Err(e) => {
                    return Err(JournalError::Corrupt {
                        path: path.to_path_buf(),
                        line: i + 1,
                        detail: e.to_string(),
                    })
                }
            }
        }
        journal.bytes = on_disk_len(path)?;
        Ok(journal)
    }

    fn apply(&mut self, record: JournalRecord) {
        match &record {
            JournalRecord::Prepare { seq, .. } => {
                self.last_seq = self.last_seq.max(*seq);
                self.pending = Some(record);
            }
            JournalRecord::Commit { seq } => {
                if let Some(JournalRecord::Prepare {
                    seq: p,
                    run_id,
                    run_key,
                    sources,
                    partitions,
                    ledger,
                    retired,
                    side_files,
                    ..
                }) = self.pending.take()
                {
                    if p == *seq {
                        self.last_commit = p;
                        for r in &retired {
                            if self.partitions.get(&r.partition) == Some(&r.content_hash) {
                                self.partitions.remove(&r.partition);
                            }
                        }
                        for s in &sources {
                            self.consumed.insert(s.content_hash.clone());
                            if let Some(partition) = &s.partition {
                                self.partitions
                                    .insert(partition.clone(), s.content_hash.clone());
                            }
                        }
                        for r in retired.iter().filter(|r| r.rows_withdrawn) {
                            self.consumed.remove(&r.content_hash);
                        }
                        for change in &partitions {
                            match &change.new_version {
                                Some(version) => {
                                    self.published.insert(
                                        change.partition,
                                        Published {
                                            version: version.clone(),
                                            rows: change.rows,
                                            totals: change.new_totals,
                                        },
                                    );
                                }
                                None => {
                                    self.published.remove(&change.partition);
                                }
                            }
                        }
                        self.committed.push(CommittedPublish {
                            seq: p,
                            run_id,
                            run_key,
                            sources,
                            partitions,
                            ledger,
                            retired,
                            side_files,
                        });
                    }
                }
            }
        }
    }

    /// The sequence number of a publish prepared and not committed (a run stopped midway;
    /// the next run finishes it).
    pub fn pending_publish(&self) -> Option<u64> {
        match &self.pending {
            Some(JournalRecord::Prepare { seq, .. }) => Some(*seq),
            _ => None,
        }
    }

    /// Finishes an interrupted publish (roll forward) and clears staging leftovers (roll back).
    /// Returns the sequence number of the publish it finished, if any.
    pub fn recover(
        &mut self,
        staging: &Path,
        target: impl Fn(&PartitionId) -> PathBuf,
    ) -> Result<Option<u64>, JournalError> {
        let finished = match &self.pending {
            Some(JournalRecord::Prepare { seq, .. }) => Some(*seq),
            _ => None,
        };
        if let Some(seq) = finished {
            self.commit(seq, &target, &mut |_| Ok(()))?;
        }
        if staging.exists() {
            fs::remove_dir_all(staging).map_err(io_err(staging))?;
        }
        Ok(finished)
    }

    fn apply_renames(
        &self,
        seq: u64,
        partitions: &[PartitionChange],
        side_files: &[SideFile],
        target: &impl Fn(&PartitionId) -> PathBuf,
        after_each: &mut dyn FnMut(Renamed) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        for (i, change) in partitions.iter().enumerate() {
            let dest = target(&change.partition);
            match (&change.staged, &change.new_version) {
                (Some(staged), Some(version)) => {
                    let staged_path = self.root.join(staged);
                    if staged_path.exists() {
                        move_into_place(&staged_path, &dest)?;
                    } else if crate::sink::curated::file_version(&dest).as_deref()
                        != Some(version.as_str())
                    {
                        return Err(JournalError::Unrecoverable {
                            seq,
                            staged: staged.clone(),
                            target: dest.display().to_string(),
                            version: version.clone(),
                        });
                    }
                }
                _ => {
                    if dest.exists() {
                        fs::remove_file(&dest).map_err(io_err(&dest))?;
                        if let Some(dir) = dest.parent() {
                            // Leave no empty partition directory behind for readers to list.
                            let _ = fs::remove_dir(dir);
                        }
                    }
                }
            }
            after_each(Renamed::Partition(i))?;
        }
        for (i, side) in side_files.iter().enumerate() {
            let (staged, dest) = (self.root.join(&side.staged), self.root.join(&side.dest));
            if staged.exists() {
                move_into_place(&staged, &dest)?;
            } else if !dest.exists() {
                // Only a writer that bypassed the lock can clear staging between a `Prepare` and
                // its renames. The side tables are records beside the tables, not versions of
                // them: losing a file is said loudly, but does not hold every later publish.
                tracing::error!(
                    seq,
                    staged = %side.staged,
                    dest = %side.dest,
                    "a side-table file of this publish is gone from staging: its rows are lost"
                );
            }
            after_each(Renamed::Side(i))?;
        }
        // The renames are durable before the `Commit` that says they happened.
        crate::sink::files::sync_filesystem(&self.root).map_err(io_err(&self.root))
    }

    fn append(&mut self, record: &JournalRecord) -> Result<(), JournalError> {
        self.check_fence()?;
        crate::sink::files::append_json_line(&self.path, record).map_err(io_err(&self.path))?;
        self.bytes = on_disk_len(&self.path)?;
        self.apply(record.clone());
        Ok(())
    }

    /// Fails with [`JournalError::Fenced`] when the journal on disk is no longer what this handle
    /// read and wrote: someone else appended (or cut) it.
    fn check_fence(&self) -> Result<(), JournalError> {
        let now = on_disk_len(&self.path)?;
        if now == self.bytes {
            return Ok(());
        }
        Err(JournalError::Fenced {
            path: self.path.clone(),
            detail: format!(
                "the commit journal is {now} bytes, not the {} this run read and wrote (last publish it knows: {})",
                self.bytes, self.last_seq
            ),
        })
    }

    /// The compare-and-swap of a publish: every change must replace the partition's current
    /// version.
    fn check_versions(&self, partitions: &[PartitionChange]) -> Result<(), JournalError> {
        for change in partitions {
            let current = self.published.get(&change.partition).map(|p| &p.version);
            if current != change.old_version.as_ref() {
                return Err(JournalError::Fenced {
                    path: self.path.clone(),
                    detail: format!(
                        "partition {} is at version {} but this publish replaces version {}",
                        crate::warehouse::partition_path(&change.partition),
                        current.map_or("(none)", |v| v.as_str()),
                        change.old_version.as_deref().unwrap_or("(none)")
                    ),
                });
            }
        }
        Ok(())
    }

    /// Appends a `Prepare` for the given changes; returns its sequence number. The staged files
    /// must already be durable.
    ///
    /// This is the publish's compare-and-swap: it fails with [`JournalError::Fenced`], appending
    /// nothing, when the journal on disk changed since this handle read it or when a change does
    /// not replace its partition's current version.
    pub fn prepare(
        &mut self,
        origin: PublishOrigin<'_>,
        sources: Vec<SourceRecord>,
        partitions: Vec<PartitionChange>,
    ) -> Result<u64, JournalError> {
        self.check_versions(&partitions)?;
        let seq = self.last_seq + 1;
        self.append(&JournalRecord::Prepare {
            seq,
            run_id: origin.run_id.to_string(),
            run_key: origin.run_key.map(str::to_string),
            epoch: origin.epoch,
            sources,
            partitions,
            ledger: origin.ledger,
            retired: origin.retired,
            side_files: origin.side_files,
        })?;
        Ok(seq)
    }

    /// Performs the renames of the pending publish `seq`, calling `after_each` after each one
    /// (fault injection), then appends its `Commit`.
    pub fn commit(
        &mut self,
        seq: u64,
        target: impl Fn(&PartitionId) -> PathBuf,
        after_each: &mut dyn FnMut(Renamed) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        if let Some(JournalRecord::Prepare {
            seq: p,
            partitions,
            side_files,
            ..
        }) = self.pending.clone()
        {
            if p == seq {
                self.apply_renames(seq, &partitions, &side_files, &target, after_each)?;
            }
        }
        self.append(&JournalRecord::Commit { seq })
    }

    /// The current version of every published partition.
    pub fn published(&self) -> &BTreeMap<PartitionId, Published> {
        &self.published
    }

    /// Every committed publish, in sequence order.
    pub fn committed(&self) -> &[CommittedPublish] {
        &self.committed
    }

    /// Every backfilled source partition and the content hash it currently contributes.
    pub fn source_partitions(&self) -> &BTreeMap<String, String> {
        &self.partitions
    }

    /// Content hashes of every committed source.
    pub fn consumed(&self) -> &BTreeSet<String> {
        &self.consumed
    }

    /// Follows the journal of another process (the query API's view of what is published):
    /// replays it without ever writing to it, and [`CommitJournal::catch_up`] reads what was
    /// appended since. Unlike [`CommitJournal::open`], a torn last line is not cut off: it is the
    /// writer's append in progress, and is read once it is whole.
    pub fn follow(root: &Path, path: &Path) -> Result<Self, JournalError> {
        let mut journal = CommitJournal::empty(root, path);
        journal.catch_up()?;
        Ok(journal)
    }

    /// Applies the whole records appended since the last read; whether any was. A follower keeps
    /// no history of committed publishes (only the published state), so it stays small. A journal
    /// shorter than what was read (replaced) is replayed from its start.
    pub fn catch_up(&mut self) -> Result<bool, JournalError> {
        use std::io::{Read, Seek, SeekFrom};
        if on_disk_len(&self.path)? < self.bytes {
            *self = CommitJournal::follow(&self.root, &self.path)?;
            return Ok(true);
        }
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(self.bytes))
            .and_then(|_| file.read_to_end(&mut tail))
            .map_err(io_err(&self.path))?;
        let Some(end) = tail.iter().rposition(|b| *b == b'\n') else {
            return Ok(false);
        };
        for (i, line) in tail[..end].split(|b| *b == b'\n').enumerate() {
            let record = std::str::from_utf8(line)
                .map_err(|e| e.to_string())
                .and_then(|line| JournalRecord::parse(line).map_err(|e| e.to_string()))
                .map_err(|detail| JournalError::Corrupt {
                    path: self.path.clone(),
                    // Counted from the first line not read before.
                    line: i + 1,
                    detail,
                })?;
            self.apply(record);
        }
        self.bytes += end as u64 + 1;
        self.committed.clear();
        Ok(true)
    }

    /// The sequence number of the newest committed publish (0: none yet): the state
    /// [`CommitJournal::published`] is.
    pub fn last_commit(&self) -> u64 {
        self.last_commit
    }

    /// Bytes of the journal file this handle has read (and, a writer's, written).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }
}

fn on_disk_len(path: &Path) -> Result<u64, JournalError> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;
    use adsmetrics_dataflows::Grain;

    #[test]
    fn parse_reads_what_serde_writes_and_rejects_what_serde_rejects() {
        let prepare = JournalRecord::Prepare {
            seq: 3,
            run_id: "run-1".into(),
            run_key: Some("dag/2026-11-01".into()),
            epoch: 2,
            sources: vec![SourceRecord {
                source: "a.parquet".into(),
                content_hash: "00ff".into(),
                accepted: 5,
                quarantined: 1,
                in_source_duplicates: 0,
                tombstoned: 2,
                partition: Some("dt=2026-11-01/a.parquet".into()),
            }],
            partitions: vec![PartitionChange {
                partition: PartitionId {
                    grain: Grain::Daily,
                    period: 20_000,
                },
                old_version: None,
                new_version: Some("abc".into()),
                rows: 4,
                staged: Some("x".into()),
                old_totals: Some(MetricTotals::default()),
                new_totals: None,
            }],
            ledger: Some(LedgerAnchor {
                seq: 9,
                hash: "h".into(),
            }),
            retired: vec![RetiredSource {
                partition: "p".into(),
                content_hash: "c".into(),
                rows_withdrawn: true,
            }],
            side_files: Vec::new(),
        };
        let plain = JournalRecord::Prepare {
            seq: 4,
            run_id: "run-2".into(),
            run_key: None,
            epoch: 0,
            sources: Vec::new(),
            partitions: Vec::new(),
            ledger: None,
            retired: Vec::new(),
            side_files: Vec::new(),
        };
        for record in [prepare, plain, JournalRecord::Commit { seq: 3 }] {
            let line = serde_json::to_string(&record).unwrap();
            assert_eq!(JournalRecord::parse(&line).unwrap(), record, "{line}");
        }
        for bad in [
            r#"{"record":"prepare","seq":1,"epoch":1,"sources":[],"partitions":[]}"#,
            r#"{"record":"publish","seq":1}"#,
            r#"{"seq":1}"#,
            r#"{"record":"commit"}"#,
            r#"{"record":"commit","seq":1"#,
        ] {
            assert!(serde_json::from_str::<JournalRecord>(bad).is_err(), "{bad}");
            assert!(JournalRecord::parse(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod follow_tests {
    use super::*;
    use adsmetrics_dataflows::Grain;

    fn publish(seq: u64, period: i64, version: &str) -> String {
        let prepare = JournalRecord::Prepare {
            seq,
            run_id: format!("run-{seq}"),
            run_key: None,
            epoch: 1,
            sources: Vec::new(),
            partitions: vec![PartitionChange {
                partition: PartitionId {
                    grain: Grain::Minute,
                    period,
                },
                old_version: None,
                new_version: Some(version.into()),
                rows: 1,
                staged: None,
                old_totals: None,
                new_totals: None,
            }],
            ledger: None,
            retired: Vec::new(),
            side_files: Vec::new(),
        };
        format!(
            "{}\n{}\n",
            serde_json::to_string(&prepare).unwrap(),
            serde_json::to_string(&JournalRecord::Commit { seq }).unwrap()
        )
    }

    #[test]
    fn a_follower_reads_whole_records_only_and_never_cuts_the_writers_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut follower = CommitJournal::follow(dir.path(), &path).unwrap();
        assert_eq!(
            follower.last_commit(),
            0,
            "no journal yet: nothing published"
        );

        let first = publish(1, 10, "v1");
        std::fs::write(&path, &first).unwrap();
        assert!(follower.catch_up().unwrap());
        assert_eq!(follower.last_commit(), 1);

        // The writer is halfway through its next append: the follower neither applies nor cuts it.
        let second = publish(2, 11, "v2");
        let half = format!("{first}{}", &second[..second.len() / 2]);
        std::fs::write(&path, &half).unwrap();
        assert!(!follower.catch_up().unwrap());
        assert_eq!(follower.published().len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), half);

        std::fs::write(&path, format!("{first}{second}")).unwrap();
        assert!(follower.catch_up().unwrap());
        assert_eq!(follower.last_commit(), 2);
        assert_eq!(follower.published().len(), 2);
        assert!(
            follower.committed().is_empty(),
            "a follower keeps no history"
        );

        // A prepare without its commit is not published yet.
        let third = publish(3, 12, "v3");
        let prepared_only = third.lines().next().unwrap();
        std::fs::write(&path, format!("{first}{second}{prepared_only}\n")).unwrap();
        assert!(follower.catch_up().unwrap());
        assert_eq!(follower.last_commit(), 2);
        assert_eq!(follower.published().len(), 2);
    }
}
