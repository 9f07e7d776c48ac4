//! `adsmetrics delete`: compliance deletes — events removed from every table, from the raw layer,
//! and from every future replay, with a certificate and an audit entry.
//!
//! A request names users (`--user-id`) or event ids (`--event-ids <file>`), an id and a reason:
//!
//! 1. the raw layer is searched (its `user_id`/`event_id` columns) for the events, and their dedup
//!    keys are appended to the tombstones and synced — from here on the delete *will* happen:
//!    every run skips tombstoned keys when it reads the raw layer or a source;
//! 2. a run rebuilds the state from the raw layer without them, so its first epoch publishes
//!    exactly the partitions that held them (journal, atomic renames, ledger entry `delete`);
//! 3. the raw files that held them are rewritten without them, and so are the quarantine files
//!    holding invalid records that name a requested user or event id;
//! 4. the certificate `_adsmetrics/deletions/<request id>.json` records what was done.
//!
//! A crash anywhere before the certificate is finished by running the same request again (the
//! tombstones already written are reused, the publish finds the tables already right, the
//! rewrites find nothing left to remove); a request whose certificate exists changes nothing and
//! says so, and the ledger records that too.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use adsmetrics_dataflows::DedupKey;
use serde::{Deserialize, Serialize};

use crate::decode::decode_parquet;
use crate::ledger::{Outcome, RunKind};
use crate::rehydrate::par_map;
use crate::runtime::{execute, IngestOptions, IngestSummary, Opened, Plan, Rehydration, RunError};
use crate::sink::files::{replace, sync_filesystem, WriteError};
use crate::sink::{quarantine, raw};
use crate::source::SourceError;
use crate::tombstones::{key_hex, parse_key, TombstoneRequest};
use crate::warehouse::Warehouse;

/// What to delete.
#[derive(Clone, Debug, Default)]
pub struct DeleteRequest {
    /// Caller's id of the request (letters, digits, `-`, `_`, `.`; up to 128).
    pub request_id: String,
    /// Why, for the record.
    pub reason: String,
    /// Delete every event of these users.
    pub user_ids: Vec<i64>,
    /// Delete the events with these ids (of any producer and type).
    pub event_ids: Vec<String>,
}

/// One partition a delete changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifiedPartition {
    /// `<table>/dt=…[/hr=…]`.
    pub partition: String,
    /// Version before the delete.
    pub old_version: Option<String>,
    /// Version after (`None`: the partition is now empty and gone).
    pub new_version: Option<String>,
}

/// The deletion certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The request.
    pub request_id: String,
    /// Its reason.
    pub reason: String,
    /// When the delete was first applied (its tombstones written), RFC 3339 UTC.
    pub applied_at: String,
    /// How many user ids and event ids the request named.
    pub user_ids_requested: u64,
    /// How many event ids the request named.
    pub event_ids_requested: u64,
    /// Distinct events (dedup keys) deleted.
    pub events_deleted: u64,
    /// Raw-layer rows removed (an event may have been in several sources).
    pub raw_rows_removed: u64,
    /// Raw files rewritten or removed, relative to the warehouse.
    pub raw_files_rewritten: Vec<String>,
    /// Quarantine rows removed (invalid records that named a requested user or event id).
    #[serde(default)]
    pub quarantine_rows_removed: u64,
    /// Quarantine files rewritten or removed, relative to the warehouse.
    #[serde(default)]
    pub quarantine_files_rewritten: Vec<String>,
    /// Curated partitions the delete changed, with old and new versions.
    pub partitions: Vec<CertifiedPartition>,
    /// Ledger entries of the runs that applied it.
    pub ledger_entries: Vec<u64>,
}

/// What a delete did.
#[derive(Clone, Debug)]
pub struct DeleteOutcome {
    /// The request had been applied before: nothing changed.
    pub already_applied: bool,
    /// The certificate (the earlier one when already applied).
    pub certificate: Certificate,
    /// The run's counts (default when already applied).
    pub summary: IngestSummary,
}

/// Why a delete could not be done.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// The request is malformed.
    #[error("{0}")]
    Usage(String),
    /// The run failed; running the same request again finishes it.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The raw layer could not be searched or rewritten; run the same request again.
    #[error(transparent)]
    Raw(#[from] raw::RawRewriteError),
    /// A raw file could not be read while searching the raw layer; run the same request again.
    #[error("searching the raw layer: {0}")]
    Search(String),
    /// The quarantine could not be searched or rewritten; run the same request again.
    #[error(transparent)]
    Quarantine(#[from] quarantine::ScrubError),
    /// A certificate could not be read or written.
    #[error("deletion certificate {path}: {detail}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Joins a delete run's id and its request id (a `+` is never in a request id).
const DELETE_RUN_MARK: &str = "+delete+";

/// The certificate file of a request.
pub fn certificate_path(warehouse: &Warehouse, request_id: &str) -> PathBuf {
    warehouse.deletions_dir().join(format!("{request_id}.json"))
}

/// Applies a delete request; see the module doc. Idempotent per request id.
pub fn delete(
    warehouse: &Warehouse,
    request: &DeleteRequest,
    options: IngestOptions,
) -> Result<DeleteOutcome, DeleteError> {
    if !valid_request_id(&request.request_id) {
        return Err(DeleteError::Usage(format!(
            "--request-id {:?} must be 1-128 letters, digits, '-', '_' or '.', not starting with '.'",
            request.request_id
        )));
    }
    if request.user_ids.is_empty() && request.event_ids.is_empty() {
        return Err(DeleteError::Usage(
            "name what to delete: --user-id <id>… or --event-ids <file>".into(),
        ));
    }
    let cert_path = certificate_path(warehouse, &request.request_id);
    let mut opened = Opened::open(warehouse)?;
    // Held to the certificate: the raw rewrite, the quarantine scrub and the staging clean-up
    // after the rebuild's run must not meet another writer's run.
    let _lock = opened.lock.share();
    let mut run = opened.record(
        RunKind::Delete,
        format!(
            "delete --request-id {}{} ({} user ids, {} event ids): {}",
            request.request_id,
            options.cluster_flag(),
            request.user_ids.len(),
            request.event_ids.len(),
            request.reason
        ),
    );
    run.request = Some(request.request_id.clone());
    // The request is in the run id too, which the journal records with every publish: a publish
    // whose run crashed before its ledger entry is recorded by the next run as `recovery` under
    // this id, and the certificate still finds it.
    run.run_id = format!("{}{DELETE_RUN_MARK}{}", run.run_id, request.request_id);

    if cert_path.exists() {
        let certificate = read_certificate(&cert_path)?;
        let mut ledger = opened.ledger;
        ledger
            .append_run(&run, &[])
            .map_err(|e| DeleteError::Run(e.into()))?;
        return Ok(DeleteOutcome {
            already_applied: true,
            certificate,
            summary: IngestSummary::default(),
        });
    }

    // 1. The keys, found once and then remembered: a rerun after a crash reuses them (the raw
    //    layer may already be rewritten without the events).
    let committed: Vec<PathBuf> = raw::list_raw_files(warehouse)
        .into_iter()
        .filter(|p| raw::source_hash_of(p).is_some_and(|h| opened.journal.consumed().contains(h)))
        .collect();
    let tombstone = match opened.tombstones.request(&request.request_id) {
        Some(existing) => existing.clone(),
        None => {
            let sought = Sought::Named {
                users: request.user_ids.clone(),
                event_ids: request.event_ids.clone(),
            };
            let keys: BTreeSet<DedupKey> = search_everywhere(&committed, &sought, &options)?
                .into_iter()
                .flatten()
                .collect();
            let tombstone = TombstoneRequest {
                request_id: request.request_id.clone(),
                reason: request.reason.clone(),
                at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                keys: keys.iter().map(key_hex).collect(),
            };
            opened
                .tombstones
                .append(tombstone.clone())
                .map_err(|e| DeleteError::Run(e.into()))?;
            tombstone
        }
    };
    // Parsed once: the scans below test every key of every committed raw file. The stored keys
    // were validated when the tombstones were read or written.
    let deleted: HashSet<DedupKey> = tombstone.keys.iter().filter_map(|h| parse_key(h)).collect();
    // The raw files still holding them, and so the event days to rebuild.
    let holds = search_everywhere(
        &committed,
        &Sought::Keys(deleted.iter().copied().collect()),
        &options,
    )?;
    let holding: Vec<PathBuf> = committed
        .iter()
        .zip(holds)
        .filter(|(_, held)| !held.is_empty())
        .map(|(path, _)| path.clone())
        .collect();
    let extra_days: BTreeSet<i64> = holding
        .iter()
        .filter_map(|path| crate::scope::raw_day(warehouse, path))
        .collect();

    // 2. Rebuild those days without them: the first epoch publishes what changed.
    let plan = Plan {
        run,
        batches: Vec::new(),
        partition_of: Default::default(),
        progress_in_sources: false,
        rehydration: Rehydration::Days(extra_days.clone()),
        summary: IngestSummary::default(),
    };
    let summary = execute(warehouse, opened, plan, options)?;

    // 3. The raw layer without them.
    let mut raw_rows_removed = 0;
    let mut raw_files_rewritten = Vec::new();
    for path in &holding {
        let staged = warehouse.staging_dir().join(format!(
            "delete-{}-{}",
            request.request_id,
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        raw_rows_removed += raw::rewrite_without(path, &staged, |k| deleted.contains(k))?;
        raw_files_rewritten.push(
            path.strip_prefix(warehouse.root())
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned(),
        );
    }
    for day in &extra_days {
        crate::keyindex::invalidate(warehouse, *day);
    }
    // 3b. Invalid records that name them: they never reached a table, but they hold the data.
    let scrubbed = quarantine::scrub(
        warehouse,
        &quarantine::Scrub {
            user_ids: &request.user_ids,
            event_ids: &request.event_ids,
        },
    )?;
    let _ = std::fs::remove_dir_all(warehouse.staging_dir());
    sync_filesystem(warehouse.root()).map_err(|source| {
        raw::RawRewriteError::Write(WriteError::Io {
            path: warehouse.root().to_path_buf(),
            source,
        })
    })?;

    // 4. The certificate, from the ledger's record of every run that applied this request.
    let ledger = crate::ledger::Ledger::open(&warehouse.ledger_path())
        .map_err(|e| DeleteError::Run(e.into()))?;
    let mut partitions: BTreeMap<String, CertifiedPartition> = BTreeMap::new();
    let mut ledger_entries = Vec::new();
    for entry in ledger.entries() {
        let this_request = match entry.body.kind {
            RunKind::Delete => entry.body.request.as_deref() == Some(request.request_id.as_str()),
            RunKind::Recovery => entry
                .body
                .run_id
                .split_once(DELETE_RUN_MARK)
                .is_some_and(|(_, id)| id == request.request_id),
            _ => false,
        };
        if !this_request || entry.body.outcome == Outcome::Failed && entry.body.publishes.is_empty()
        {
            continue;
        }
        ledger_entries.push(entry.body.seq);
        for p in &entry.body.partitions {
            let certified =
                partitions
                    .entry(p.partition.clone())
                    .or_insert_with(|| CertifiedPartition {
                        partition: p.partition.clone(),
                        old_version: p.old_version.clone(),
                        new_version: None,
                    });
            certified.new_version = p.new_version.clone();
        }
    }
    let certificate = Certificate {
        request_id: request.request_id.clone(),
        reason: request.reason.clone(),
        applied_at: tombstone.at.clone(),
        user_ids_requested: request.user_ids.len() as u64,
        event_ids_requested: request.event_ids.len() as u64,
        events_deleted: deleted.len() as u64,
        raw_rows_removed,
        raw_files_rewritten,
        quarantine_rows_removed: scrubbed.rows_removed,
        quarantine_files_rewritten: scrubbed.files,
        partitions: partitions.into_values().collect(),
        ledger_entries,
    };
    write_certificate(warehouse, &cert_path, &certificate)?;
    Ok(DeleteOutcome {
        already_applied: false,
        certificate,
        summary,
    })
}

/// What a delete looks for in the raw layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Sought {
    /// The rows of these users and event ids (to find their keys).
    Named {
        users: Vec<i64>,
        event_ids: Vec<String>,
    },
    /// The rows of these keys (to find the files that hold them: a key's other versions may
    /// name another user).
    Keys(Vec<DedupKey>),
}

impl Sought {
    /// Whether nothing is sought (no row can match).
    fn is_empty(&self) -> bool {
        match self {
            Sought::Named { users, event_ids } => users.is_empty() && event_ids.is_empty(),
            Sought::Keys(keys) => keys.is_empty(),
        }
    }
}

/// Searches `files` for what is `sought`, on the run's worker threads, or shared out over the
/// processes of its cluster (each searches every N-th file, [`crate::cluster::search`]): per
/// file, in order, the keys of its rows sought.
fn search_everywhere(
    files: &[PathBuf],
    sought: &Sought,
    options: &IngestOptions,
) -> Result<Vec<Vec<DedupKey>>, DeleteError> {
    // Nothing to look for: no search, no cluster round.
    if sought.is_empty() {
        return Ok(vec![Vec::new(); files.len()]);
    }
    let workers = options.workers.max(1);
    Ok(match &options.cluster {
        Some(cluster) => crate::cluster::search(cluster, workers, files, sought)?,
        None => search(files, sought, workers).map_err(DeleteError::Search)?,
    })
}

/// Searches `files` for what is `sought` on `threads` threads: per file, in order, the keys of
/// its rows sought (each once per row).
pub(crate) fn search(
    files: &[PathBuf],
    sought: &Sought,
    threads: usize,
) -> Result<Vec<Vec<DedupKey>>, String> {
    match sought {
        Sought::Named { users, event_ids } => {
            let users: HashSet<i64> = users.iter().copied().collect();
            let ids: HashSet<&str> = event_ids.iter().map(String::as_str).collect();
            par_map(files, threads, |path| {
                let bytes = std::fs::read(path).map_err(|source| {
                    SourceError {
                        path: path.clone(),
                        source,
                    }
                    .to_string()
                })?;
                let decoded = decode_parquet(&path.to_string_lossy(), bytes::Bytes::from(bytes));
                Ok(decoded
                    .events
                    .iter()
                    .filter(|event| {
                        users.contains(&event.user_id)
                            || event.event_id.as_deref().is_some_and(|id| ids.contains(id))
                    })
                    .map(|event| event.dedup_key())
                    .collect())
            })
        }
        Sought::Keys(keys) => {
            let keys: HashSet<DedupKey> = keys.iter().copied().collect();
            par_map(files, threads, |path| {
                let held = raw::keys_of(path).map_err(|e| e.to_string())?;
                Ok(held.into_iter().filter(|k| keys.contains(k)).collect())
            })
        }
    }
}

fn read_certificate(path: &Path) -> Result<Certificate, DeleteError> {
    let err = |detail: String| DeleteError::Certificate {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| err(e.to_string()))
}

fn write_certificate(
    warehouse: &Warehouse,
    path: &Path,
    certificate: &Certificate,
) -> Result<(), DeleteError> {
    let err = |detail: String| DeleteError::Certificate {
        path: path.to_path_buf(),
        detail,
    };
    let mut text =
        serde_json::to_string_pretty(certificate).expect("certificates always serialise");
    text.push('\n');
    let staged = warehouse
        .staging_dir()
        .join(format!("certificate-{}.json", certificate.request_id));
    replace(&staged, path, text.as_bytes()).map_err(|e| err(e.to_string()))?;
    let _ = std::fs::remove_dir_all(warehouse.staging_dir());
    sync_filesystem(warehouse.root()).map_err(|e| err(e.to_string()))
}
