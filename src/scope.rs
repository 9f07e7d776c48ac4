//! Which part of the raw layer a delete reads back: the days its changes touch, closed over keys.
//!
//! Ingest and backfill rebuild less, by key and user-day ([`crate::rehydrate`]), starting every
//! partition from its published rows. A delete cannot: a crashed earlier attempt may have
//! published some of its partitions and rewritten some of its raw files, so it rebuilds whole days
//! from the raw layer (without the deleted keys), which is right whatever it finds.
//!
//! A run's output is exact when, for every dedup key and every (user, day, dims) its changes touch,
//! the dataflow holds everything the raw layer holds for them. Both live within event days: a
//! user-day by definition, a key's versions almost always (a correction may move an event to
//! another day). So a run rebuilds state for whole event days only:
//!
//! 1. the days of its new events (a pre-pass decodes its new sources), of the raw files it
//!    retracts, and any the caller adds (a delete: the days that held the deleted events);
//! 2. closed over keys: a day holding a version of any key of the days so far, or of the new
//!    events, is added too, until nothing changes. This reads each day's sorted keys from the
//!    [`keyindex`], which is rebuilt (from the `dedup_key` column) only for days that changed.
//!
//! Every curated partition of a touched day (its hours and the day) then has complete state, so
//! rehydration reproduces it exactly and publishes nothing, and the run's changes come out as
//! exact differences. Days outside the scope are neither read nor republished. The cost of a run
//! thus grows with the days it touches, not with the history held.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use adsmetrics_dataflows::{DedupKey, MICROS_PER_DAY};

use crate::decode::decode_source;
use crate::keyindex;
use crate::retention::Horizons;
use crate::sink::raw::{self, RawReadError};
use crate::source::{SourceError, SourceFile};
use crate::tombstones::Tombstones;
use crate::warehouse::{parse_day, Warehouse};

/// Why the scope could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    /// A new source could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A raw file's keys could not be read.
    #[error(transparent)]
    Raw(#[from] RawReadError),
}

/// The event day of a raw file, from its `dt=` folder.
pub fn raw_day(warehouse: &Warehouse, path: &Path) -> Option<i64> {
    let mut parts = path.strip_prefix(warehouse.root()).ok()?.components();
    if parts.next()?.as_os_str() != "raw" {
        return None;
    }
    parts.find_map(|part| {
        part.as_os_str()
            .to_str()?
            .strip_prefix("dt=")
            .and_then(parse_day)
    })
}

/// Event days and dedup keys of some events.
type DaysAndKeys = (BTreeSet<i64>, HashSet<DedupKey>);

/// The days and keys of the events in `sources` (decoded once here, again when ingested).
fn days_and_keys(
    sources: &[&SourceFile],
    threads: usize,
    tombstones: &Tombstones,
) -> Result<DaysAndKeys, ScopeError> {
    let threads = threads.max(1).min(sources.len().max(1));
    let chunk = sources.len().div_ceil(threads).max(1);
    let parts: Vec<Result<DaysAndKeys, ScopeError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut days = BTreeSet::new();
                    let mut keys = HashSet::new();
                    for source in part {
                        let bytes = std::fs::read(&source.path).map_err(|e| SourceError {
                            path: source.path.clone(),
                            source: e,
                        })?;
                        for event in decode_source(&source.label, &bytes).events {
                            let key = event.dedup_key();
                            if !tombstones.contains(&key) {
                                days.insert(event.event_time_us.div_euclid(MICROS_PER_DAY));
                                keys.insert(key);
                            }
                        }
                    }
                    Ok((days, keys))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("scope thread does not panic"))
            .collect()
    });
    let mut days = BTreeSet::new();
    let mut keys = HashSet::new();
    for part in parts {
        let (d, k) = part?;
        days.extend(d);
        keys.extend(k);
    }
    Ok((days, keys))
}

/// What a run changes, as far as its rebuild scope is concerned.
pub struct Changes<'a> {
    /// The committed raw files (the whole history).
    pub committed: &'a [PathBuf],
    /// The sources the run will add.
    pub new_sources: &'a [&'a SourceFile],
    /// The raw files it withdraws.
    pub retract: &'a [PathBuf],
    /// Days the caller needs rebuilt (a delete's).
    pub extra_days: &'a BTreeSet<i64>,
    /// Deleted keys (skipped in new sources).
    pub tombstones: &'a Tombstones,
    /// Retention horizons (events before the raw one are refused, their days not rebuilt).
    pub horizons: &'a Horizons,
}

/// What a whole-day rebuild reads and what it rebuilds.
#[derive(Debug, Default)]
pub struct DayScope {
    /// The raw files to rehydrate.
    pub files: Vec<PathBuf>,
    /// The event days rebuilt whole: every partition of these days comes out of the rebuild
    /// complete, so one that gets no rows has none left (it is removed).
    pub days: BTreeSet<i64>,
}

/// The raw files a run must rehydrate, and the days they rebuild; see the module doc.
pub fn rehydration_scope(
    warehouse: &Warehouse,
    changes: &Changes<'_>,
    threads: usize,
) -> Result<DayScope, ScopeError> {
    let Changes {
        committed,
        new_sources,
        retract,
        extra_days,
        tombstones,
        horizons,
    } = *changes;
    // A day past the raw horizon has no raw rows left to rebuild it from: its partitions are
    // kept as they are (curated tables are kept longer than the raw layer).
    let rebuildable = |day: &i64| horizons.raw_day.is_none_or(|h| *day >= h);
    if committed.is_empty() {
        return Ok(DayScope {
            files: Vec::new(),
            days: extra_days.iter().copied().filter(rebuildable).collect(),
        });
    }
    let mut by_day: BTreeMap<Option<i64>, Vec<&PathBuf>> = BTreeMap::new();
    for path in committed {
        by_day
            .entry(raw_day(warehouse, path))
            .or_default()
            .push(path);
    }
    let (mut touched, new_keys) = days_and_keys(new_sources, threads, tombstones)?;
    // Events past the raw horizon are refused, and their days have nothing to rebuild.
    touched.retain(rebuildable);
    touched.extend(retract.iter().filter_map(|p| raw_day(warehouse, p)));
    touched.extend(extra_days.iter().copied());
    // A raw file outside any dt= folder cannot be placed: always rebuild it.
    let mut scope: BTreeSet<Option<i64>> = by_day.keys().filter(|d| d.is_none()).copied().collect();
    scope.extend(touched.iter().map(|d| Some(*d)));

    // The keys held so far (sorted), from the key index of each day in scope.
    let mut keys: Vec<u64> = new_keys
        .iter()
        .map(|k| keyindex::prefix(k.0.get()))
        .collect();
    let day_keys = |day: &Option<i64>| -> Result<Vec<u64>, ScopeError> {
        let files = by_day.get(day).map(Vec::as_slice).unwrap_or_default();
        Ok(match day {
            Some(day) => keyindex::day_prefixes(warehouse, *day, files)?,
            None => {
                let mut keys = Vec::new();
                for file in files {
                    keys.extend(
                        raw::keys_of(file)?
                            .into_iter()
                            .map(|k| keyindex::prefix(k.0.get())),
                    );
                }
                keys
            }
        })
    };
    for day in &scope {
        keys.extend(day_keys(day)?);
    }
    keys.sort_unstable();
    keys.dedup();
    loop {
        let mut added = Vec::new();
        for day in by_day.keys().filter(|d| !scope.contains(*d)) {
            let theirs = day_keys(day)?;
            if keyindex::intersects(&keys, &theirs) {
                added.push((*day, theirs));
            }
        }
        if added.is_empty() {
            break;
        }
        for (day, theirs) in added {
            scope.insert(day);
            keys.extend(theirs);
        }
        keys.sort_unstable();
        keys.dedup();
    }
    Ok(DayScope {
        files: by_day
            .into_iter()
            .filter(|(day, _)| scope.contains(day))
            .flat_map(|(_, files)| files.into_iter().cloned())
            .collect(),
        days: scope.into_iter().flatten().filter(rebuildable).collect(),
    })
}
