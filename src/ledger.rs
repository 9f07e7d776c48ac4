//! The audit ledger: an append-only, hash-chained record of every run and of every partition
//! version it produced.
//!
//! One JSON line per entry in `_adsmetrics/ledger.jsonl`. An entry says what ran (`kind`: ingest,
//! recovery, …), who ran it and when (wall clock, outside every dataflow), which inputs it read
//! (content hashes), which journal publishes it committed, and per partition the old → new
//! version with the row and metric deltas. A run that changed nothing gets an `unchanged` entry
//! too, so "was this rerun a no-op?" has a recorded answer.
//!
//! Each entry carries `prev`, the previous entry's hash, and `hash`, the SHA-256 of its own
//! body (every field but `hash`, serialised in field order). Editing, removing or reordering any
//! entry breaks the chain at that entry; [`verify`] finds it. Cutting entries off the end keeps
//! the chain intact, so [`verify`] also checks the other direction: every publish the commit
//! journal holds must be covered by an entry.
//!
//! The journal is the ground truth of what was published and the ledger its account: a run
//! appends its entry after its publishes committed, and a run that finds committed publishes no
//! entry covers (a crash between the two) first appends a `recovery` entry for them.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::journal::{CommittedPublish, LedgerAnchor, MetricTotals, SourceRecord};
use crate::warehouse::{partition_path, table_name};

/// Format version of ledger entries.
pub const LEDGER_VERSION: u32 = 1;

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Reading or appending failed.
    #[error("audit ledger I/O on {path}: {source}")]
    Io {
        /// The ledger file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The chain does not verify: an entry was edited, removed, reordered or is not an entry.
    #[error("audit ledger {path} entry {line}: {detail}")]
    Broken {
        /// The ledger file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// The journal holds committed publishes that no entry covers, older than covered ones (the
    /// newest uncovered ones are a run that stopped after committing; its next run records them).
    #[error(
        "audit ledger {path} does not cover journal publishes {missing:?}: entries were removed"
    )]
    Uncovered {
        /// The ledger file.
        path: PathBuf,
        /// The publishes no entry names.
        missing: Vec<u64>,
    },
}

/// What kind of run an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// `adsmetrics ingest` (and the ingest steps of `demo`).
    Ingest,
    /// `adsmetrics backfill`: source partitions replaced by their current contents.
    Backfill,
    /// One epoch of `adsmetrics stream`: ranges of Kafka partitions.
    Stream,
    /// `adsmetrics delete`: a compliance delete.
    Delete,
    /// `adsmetrics retention apply`: expired partitions dropped.
    Retention,
    /// `adsmetrics reprocess`: event days recomputed from the raw layer (after a bad deploy).
    Reprocess,
    /// Publishes found committed but not yet on the ledger (a run that crashed after its
    /// commit, or a publish that startup recovery finished).
    Recovery,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It published at least one partition version or consumed at least one source.
    Changed,
    /// It published nothing and consumed nothing.
    Unchanged,
    /// It stopped with an error; what it committed before that is listed.
    Failed,
}

/// One partition's change, as the ledger records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// `<table>/dt=…[/hr=…]`.
    pub partition: String,
    /// The journal publish that made the change.
    pub publish: u64,
    /// The version replaced; `None` for a new partition.
    pub old_version: Option<String>,
    /// The new version; `None` when the partition became empty and was removed.
    pub new_version: Option<String>,
    /// New totals minus old totals (`None` when the journal did not record totals).
    pub delta: Option<MetricTotals>,
}

/// Everything an entry says, except its own hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryBody {
    /// Format version.
    pub v: u32,
    /// 1, 2, … in ledger order.
    pub seq: u64,
    /// Hash of the previous entry ([`GENESIS`] for the first).
    pub prev: String,
    /// When the entry was appended, RFC 3339 UTC.
    pub at: String,
    /// What ran.
    pub kind: RunKind,
    /// The run's id (the journal's `run_id` of its publishes).
    pub run_id: String,
    /// The orchestrator's name for the logical run (`--run-key`): every try of one task, and
    /// the recovery of a try that crashed, carry the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_key: Option<String>,
    /// Who ran it: the OS user (`USER`/`LOGNAME`), or `unknown`.
    pub actor: String,
    /// What ran, as typed (for an ingest: its inputs).
    pub command: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The error that stopped it, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The delete request it applied, for `delete` runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Sources whose contribution it withdrew (`backfill`), as `partition@content hash`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<String>,
    /// What it dropped besides curated partitions (`retention`: raw-layer days).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
    /// A stream epoch: the ingest→publish latency of its messages, from their Kafka timestamps
    /// to this entry (which follows the publish), so each partition version it lists carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<EpochLatency>,
    /// Journal publishes it committed, in order.
    pub publishes: Vec<u64>,
    /// Sources it consumed, with their content hashes.
    pub sources: Vec<SourceRecord>,
    /// Sources it found already consumed and skipped.
    pub sources_skipped: u64,
    /// Every partition version it produced.
    pub partitions: Vec<PartitionEntry>,
    /// The side-table files (`quarantine`, `late_arrivals`) its publishes were to rename into
    /// place, relative to the warehouse root (one gone from staging before its rename is logged
    /// by the publish as lost). Absent from entries written before they were recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub side_files: Vec<String>,
}

/// The ingest→publish latency of a stream epoch's messages, milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochLatency {
    /// Of its newest message (the freshest data the published versions hold).
    pub newest: i64,
    /// Of its oldest message.
    pub oldest: i64,
}

/// One ledger line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The recorded facts.
    #[serde(flatten)]
    pub body: EntryBody,
    /// SHA-256 of the body, hex.
    pub hash: String,
}

/// SHA-256 of an entry body's JSON, hex.
pub fn body_hash(body: &EntryBody) -> String {
    sha256_hex(&[&serde_json::to_vec(body).expect("ledger entries always serialise")])
}

/// SHA-256 of the concatenated `parts`, hex.
fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut sha = Sha256::new();
    for part in parts {
        sha.update(part);
    }
    sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of an entry's body as its line holds it: the line without its closing
/// `,"hash":"…"}` (the writer puts the hash last, so that is [`body_hash`] of the body it wrote).
/// Every field counts, also one this build does not know: entries a newer build wrote with more
/// fields verify here, where hashing the body this build parsed would drop those fields and
/// call the entry edited. `None` when the line does not end with the hash.
fn line_body_hash(line: &str) -> Option<String> {
    // Trailing white space is not part of the JSON the writer hashed (the parser skips it too).
    let line = line.trim_end();
    let cut = line.rfind(",\"hash\":\"")?;
    // `,"hash":"` (9 bytes), the digest, `"}`.
    let digest = line[cut..]
        .strip_prefix(",\"hash\":\"")?
        .strip_suffix("\"}")?;
    if digest.contains('"') {
        return None;
    }
    Some(sha256_hex(&[&line.as_bytes()[..cut], b"}"]))
}

/// What a run tells the ledger about itself.
#[derive(Clone, Debug)]
pub struct RunRecord {
    /// What ran.
    pub kind: RunKind,
    /// Its id.
    pub run_id: String,
    /// Its `--run-key`.
    pub run_key: Option<String>,
    /// What ran, as typed.
    pub command: String,
    /// Sources found already consumed.
    pub sources_skipped: u64,
    /// The error that stopped it, if any.
    pub error: Option<String>,
    /// The delete request it applies, if it is a delete.
    pub request: Option<String>,
    /// What it dropped besides curated partitions.
    pub dropped: Vec<String>,
    /// A stream epoch: the Kafka timestamps (ms since the Unix epoch) of its oldest and newest
    /// messages.
    pub message_times_ms: Option<(i64, i64)>,
}

/// The ledger of one warehouse, opened for appending.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl Ledger {
    /// Opens the ledger at `path` (empty if absent) and verifies its chain. A broken chain is an
    /// error: nothing may be appended to a ledger that does not verify.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let entries = read_chain(path, true)?;
        Ok(Ledger {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The newest entry, to record with each publish (see [`verify`]).
    pub fn anchor(&self) -> LedgerAnchor {
        LedgerAnchor {
            seq: self.entries.len() as u64,
            hash: self
                .entries
                .last()
                .map_or_else(|| GENESIS.to_string(), |e| e.hash.clone()),
        }
    }

    /// The highest journal publish any entry covers (0 for none).
    pub fn covered_publish(&self) -> u64 {
        self.entries
            .iter()
            .flat_map(|e| e.body.publishes.iter().copied())
            .max()
            .unwrap_or(0)
    }

    /// Appends a `recovery` entry for the committed publishes no entry covers yet, if any. Its
    /// run key is the one the crashed run gave its publishes, else `run_key` (the recovering
    /// run's).
    pub fn cover(
        &mut self,
        committed: &[CommittedPublish],
        run_key: Option<&str>,
    ) -> Result<Option<&Entry>, LedgerError> {
        let covered = self.covered_publish();
        let missing: Vec<&CommittedPublish> =
            committed.iter().filter(|p| p.seq > covered).collect();
        let Some(first) = missing.first() else {
            return Ok(None);
        };
        let record = RunRecord {
            kind: RunKind::Recovery,
            run_id: first.run_id.clone(),
            run_key: first.run_key.clone().or(run_key.map(str::to_string)),
            command: "startup: publishes committed without a ledger entry".to_string(),
            sources_skipped: 0,
            error: None,
            request: None,
            dropped: Vec::new(),
            message_times_ms: None,
        };
        self.append_run(&record, &missing).map(Some)
    }

    /// Appends the entry of a run that committed `publishes` (possibly none).
    pub fn append_run(
        &mut self,
        run: &RunRecord,
        publishes: &[&CommittedPublish],
    ) -> Result<&Entry, LedgerError> {
        let mut sources = Vec::new();
        let mut partitions = Vec::new();
        let mut retired = Vec::new();
        let mut side_files = Vec::new();
        for p in publishes {
            sources.extend(p.sources.iter().cloned());
            side_files.extend(p.side_files.iter().map(|f| f.dest.clone()));
            retired.extend(
                p.retired
                    .iter()
                    .map(|r| format!("{}@{}", r.partition, r.content_hash)),
            );
            for change in &p.partitions {
                let delta = match (change.new_totals, change.old_totals) {
                    (Some(new), Some(old)) => Some(new.minus(&old)),
                    _ => None,
                };
                partitions.push(PartitionEntry {
                    partition: format!(
                        "{}/{}",
                        table_name(change.partition.grain),
                        partition_path(&change.partition)
                    ),
                    publish: p.seq,
                    old_version: change.old_version.clone(),
                    new_version: change.new_version.clone(),
                    delta,
                });
            }
        }
        let outcome = if run.error.is_some() {
            Outcome::Failed
        } else if sources.is_empty()
            && partitions.is_empty()
            && retired.is_empty()
            && run.dropped.is_empty()
        {
            Outcome::Unchanged
        } else {
            Outcome::Changed
        };
        let now = chrono::Utc::now();
        let latency_ms = run.message_times_ms.map(|(oldest, newest)| EpochLatency {
            newest: now.timestamp_millis() - newest,
            oldest: now.timestamp_millis() - oldest,
        });
        let body = EntryBody {
            v: LEDGER_VERSION,
            seq: self.entries.len() as u64 + 1,
            prev: self
                .entries
                .last()
                .map_or_else(|| GENESIS.to_string(), |e| e.hash.clone()),
            at: now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            kind: run.kind,
            run_id: run.run_id.clone(),
            run_key: run.run_key.clone(),
            actor: actor(),
            command: run.command.clone(),
            outcome,
            error: run.error.clone(),
            request: run.request.clone(),
            retired,
            dropped: run.dropped.clone(),
            latency_ms,
            publishes: publishes.iter().map(|p| p.seq).collect(),
            sources,
            sources_skipped: run.sources_skipped,
            partitions,
            side_files,
        };
        let entry = Entry {
            hash: body_hash(&body),
            body,
        };
        crate::sink::files::append_json_line(&self.path, &entry).map_err(|source| {
            LedgerError::Io {
                path: self.path.clone(),
                source,
            }
        })?;
        self.entries.push(entry);
        Ok(self.entries.last().expect("just pushed"))
    }
}

fn actor() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Reads and checks the chain: each line an entry, numbered in order, each `prev` the previous
/// entry's hash and each `hash` its body's hash.
fn read_chain(path: &Path, repair: bool) -> Result<Vec<Entry>, LedgerError> {
    let text = match crate::sink::files::read_log(path, repair) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(Vec::new()),
        Err(source) => {
            return Err(LedgerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let broken = |line: usize, detail: String| LedgerError::Broken {
        path: path.to_path_buf(),
        line,
        detail,
    };
    let mut entries: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let entry: Entry = serde_json::from_str(line)
            .map_err(|e| broken(n, format!("not a ledger entry: {e}")))?;
        if entry.body.seq != n as u64 {
            return Err(broken(
                n,
                format!("sequence {} where {n} was expected", entry.body.seq),
            ));
        }
        let prev = entries.last().map_or(GENESIS, |e| e.hash.as_str());
        if entry.body.prev != prev {
            return Err(broken(
                n,
                "does not chain to the entry before it (an entry was removed, reordered or edited)"
                    .to_string(),
            ));
        }
        let hash = line_body_hash(line).ok_or_else(|| {
            broken(
                n,
                "its hash is not its last field: not written by adsmetrics".to_string(),
            )
        })?;
        if entry.hash != hash {
            return Err(broken(
                n,
                format!(
                    "its contents were changed (hash {hash}, recorded {})",
                    entry.hash
                ),
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// What [`verify`] checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries in the chain.
    pub entries: u64,
    /// Journal publishes, all covered by an entry or pending.
    pub publishes: u64,
    /// The newest publishes no entry covers yet: their run stopped after committing them, and
    /// the next run records them in a `recovery` entry.
    pub pending: Vec<u64>,
    /// Hash of the last entry (or [`GENESIS`]).
    pub head: String,
}

/// Checks the ledger against itself and against the commit journal's `committed` publishes:
/// the chain holds; every publish's anchor (the ledger entry that was newest when it was
/// prepared) is still in the ledger with the same hash, so entries cut off the end are found
/// too; and every publish is covered by an entry, except the newest ones after the last covered
/// publish, which are reported as pending.
pub fn verify(path: &Path, committed: &[CommittedPublish]) -> Result<VerifyReport, LedgerError> {
    let entries = read_chain(path, false)?;
    for publish in committed {
        let Some(anchor) = &publish.ledger else {
            continue;
        };
        if anchor.seq == 0 {
            continue;
        }
        match entries.get(anchor.seq as usize - 1) {
            Some(entry) if entry.hash == anchor.hash => {}
            Some(_) => {
                return Err(LedgerError::Broken {
                    path: path.to_path_buf(),
                    line: anchor.seq as usize,
                    detail: format!(
                        "is not the entry journal publish {} was prepared after (hash {})",
                        publish.seq, anchor.hash
                    ),
                })
            }
            None => {
                return Err(LedgerError::Broken {
                    path: path.to_path_buf(),
                    line: anchor.seq as usize,
                    detail: format!(
                        "is missing: journal publish {} was prepared after it, so entries were \
                         removed from the end",
                        publish.seq
                    ),
                })
            }
        }
    }
    let covered: std::collections::BTreeSet<u64> = entries
        .iter()
        .flat_map(|e| e.body.publishes.iter().copied())
        .collect();
    let last = covered.iter().next_back().copied().unwrap_or(0);
    let (missing, pending): (Vec<u64>, Vec<u64>) = committed
        .iter()
        .map(|p| p.seq)
        .filter(|s| !covered.contains(s))
        .partition(|s| *s < last);
    if !missing.is_empty() {
        return Err(LedgerError::Uncovered {
            path: path.to_path_buf(),
            missing,
        });
    }
    Ok(VerifyReport {
        entries: entries.len() as u64,
        publishes: committed.len() as u64,
        pending,
        head: entries
            .last()
            .map_or_else(|| GENESIS.to_string(), |e| e.hash.clone()),
    })
}

/// Whether `partition` (`<table>/dt=…[/hr=…]`) is `filter` or lies under it.
fn under(partition: &str, filter: &str) -> bool {
    let filter = filter.trim_end_matches('/');
    partition == filter
        || partition
            .strip_prefix(filter)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn short(version: &Option<String>) -> String {
    match version {
        Some(v) => v.chars().take(16).collect(),
        None => "(none)".to_string(),
    }
}

fn delta_text(delta: &Option<MetricTotals>) -> String {
    let Some(d) = delta else {
        return "deltas not recorded".to_string();
    };
    let fields = [
        ("rows", d.rows),
        ("impressions", d.impressions),
        ("clicks", d.clicks),
        ("conversions", d.conversions),
        ("cost_micros", d.cost_micros),
        ("revenue_micros", d.revenue_micros),
        ("unique_users", d.unique_users),
    ];
    let parts: Vec<String> = fields
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(name, v)| format!("{name} {v:+}"))
        .collect();
    if parts.is_empty() {
        "no metric change".to_string()
    } else {
        parts.join(", ")
    }
}

/// The ledger as text, oldest entry first: every entry, or with `partition` (a partition such as
/// `ads_metrics_hourly/dt=2026-11-03/hr=01`, or a prefix such as `ads_metrics_daily`) only the
/// entries that produced a version of it — the partition's lineage.
pub fn render_log(entries: &[Entry], partition: Option<&str>) -> String {
    let mut out = String::new();
    for entry in entries {
        let b = &entry.body;
        let changes: Vec<&PartitionEntry> = b
            .partitions
            .iter()
            .filter(|p| partition.is_none_or(|f| under(&p.partition, f)))
            .collect();
        if partition.is_some() && changes.is_empty() {
            continue;
        }
        let kind = serde_json::to_value(b.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let outcome = serde_json::to_value(b.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!(
            "#{} {} {kind} {outcome} {} by {}\n",
            b.seq, b.at, b.run_id, b.actor
        ));
        out.push_str(&format!("    command: {}\n", b.command));
        if let Some(request) = &b.request {
            out.push_str(&format!("    delete request: {request}\n"));
        }
        if let Some(error) = &b.error {
            out.push_str(&format!("    error: {error}\n"));
        }
        if let Some(l) = &b.latency_ms {
            out.push_str(&format!(
                "    ingest->publish latency: newest message {} ms, oldest {} ms\n",
                l.newest, l.oldest
            ));
        }
        out.push_str(&format!(
            "    sources: {} consumed, {} skipped; journal publishes: {:?}; partitions changed: {}\n",
            b.sources.len(),
            b.sources_skipped,
            b.publishes,
            b.partitions.len()
        ));
        if partition.is_none() {
            for r in &b.retired {
                out.push_str(&format!("    - withdrawn {r}\n"));
            }
            for d in &b.dropped {
                out.push_str(&format!("    - dropped {d}\n"));
            }
            for s in &b.sources {
                out.push_str(&format!(
                    "    < {} ({}): {} accepted, {} quarantined\n",
                    s.source,
                    s.content_hash.chars().take(16).collect::<String>(),
                    s.accepted,
                    s.quarantined
                ));
            }
            for f in &b.side_files {
                out.push_str(&format!("    + {f}\n"));
            }
        }
        for p in changes {
            out.push_str(&format!(
                "    > {}: {} -> {} [publish {}] {}\n",
                p.partition,
                short(&p.old_version),
                short(&p.new_version),
                p.publish,
                delta_text(&p.delta)
            ));
        }
    }
    if out.is_empty() {
        out.push_str(match partition {
            Some(_) => "no ledger entry produced a version of that partition\n",
            None => "the ledger is empty: nothing has run on this warehouse\n",
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_filter_matches_whole_path_components() {
        let p = "ads_metrics_hourly/dt=2026-11-03/hr=01";
        assert!(under(p, p));
        assert!(under(p, "ads_metrics_hourly/dt=2026-11-03"));
        assert!(under(p, "ads_metrics_hourly/"));
        assert!(!under(p, "ads_metrics_hourly/dt=2026-11-0"));
        assert!(!under(p, "ads_metrics_daily"));
    }

    fn sample_body() -> EntryBody {
        EntryBody {
            v: LEDGER_VERSION,
            seq: 1,
            prev: GENESIS.to_string(),
            at: "2026-11-23T00:00:00Z".to_string(),
            kind: RunKind::Ingest,
            run_id: "run-1".to_string(),
            run_key: None,
            actor: "test".to_string(),
            command: "ingest x".to_string(),
            outcome: Outcome::Unchanged,
            error: None,
            request: None,
            retired: vec![],
            dropped: vec![],
            latency_ms: None,
            publishes: vec![],
            sources: vec![],
            sources_skipped: 2,
            partitions: vec![],
            side_files: vec![],
        }
    }

    #[test]
    fn the_body_hash_covers_every_field() {
        let body = sample_body();
        let hash = body_hash(&body);
        assert_eq!(hash.len(), 64);
        let mut other = body.clone();
        other.sources_skipped = 3;
        assert_ne!(body_hash(&other), hash);
        let mut other = body.clone();
        other.actor = "mallory".to_string();
        assert_ne!(body_hash(&other), hash);
        let mut other = body.clone();
        other.run_key = Some("dag/2026-11-23".to_string());
        assert_ne!(body_hash(&other), hash);
        let mut other = body.clone();
        other.latency_ms = Some(EpochLatency {
            newest: 1,
            oldest: 2,
        });
        assert_ne!(body_hash(&other), hash);
        let mut other = body.clone();
        other.side_files = vec!["quarantine/dt=2026-11-23/sources-0.parquet".to_string()];
        assert_ne!(body_hash(&other), hash);
    }

    #[test]
    fn an_entry_written_before_side_files_were_recorded_keeps_its_hash() {
        // As an earlier release wrote it: no `side_files` key at all.
        let line = r#"{"v":1,"seq":1,"prev":"0000000000000000000000000000000000000000000000000000000000000000","at":"2026-11-23T00:00:00Z","kind":"ingest","run_id":"run-1","actor":"test","command":"ingest x","outcome":"unchanged","publishes":[],"sources":[],"sources_skipped":2,"partitions":[]}"#;
        let body: EntryBody = serde_json::from_str(line).expect("an entry body");
        assert!(body.side_files.is_empty());
        assert_eq!(serde_json::to_string(&body).expect("serialises"), line);
    }

    #[test]
    fn entries_with_fields_this_build_does_not_know_verify_and_edits_of_them_do_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.jsonl");
        // As a newer build would write it: one more field after the known ones, hashed with them.
        let body = sample_body();
        let known = serde_json::to_string(&body).expect("serialises");
        let newer = format!("{},\"approved_by\":[\"ops\"]}}", &known[..known.len() - 1]);
        let hash = sha256_hex(&[newer.as_bytes()]);
        let line = format!("{},\"hash\":\"{hash}\"}}\n", &newer[..newer.len() - 1]);
        std::fs::write(&path, &line).expect("write");
        let entries = read_chain(&path, false).expect("a newer build's entry verifies");
        assert_eq!(entries[0].body, body);
        // An entry this build wrote verifies the same way.
        let own = Entry {
            hash: body_hash(&body),
            body: body.clone(),
        };
        let own_line = serde_json::to_string(&own).expect("serialises") + "\n";
        std::fs::write(&path, &own_line).expect("write");
        assert_eq!(read_chain(&path, false).expect("verifies").len(), 1);
        // Edits: of the field this build does not know, and of the hash's place in the line;
        // and lines that end like a hash without one.
        for edited in [
            format!("{},\"hash\":\"}}\n", &newer[..newer.len() - 1]),
            format!("{},\"hash\":\"\"}}\n", &newer[..newer.len() - 1]),
            line.replace("\"ops\"", "\"mallory\""),
            own_line
                .replace(&format!(",\"hash\":\"{}\"", own.hash), "")
                .replacen('{', &format!("{{\"hash\":\"{}\",", own.hash), 1),
        ] {
            std::fs::write(&path, &edited).expect("write");
            assert!(
                matches!(read_chain(&path, false), Err(LedgerError::Broken { .. })),
                "{edited}"
            );
        }
    }
}
