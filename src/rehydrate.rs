//! Keyed rehydration: the raw rows a run's changes need in the dataflow's state, found by dedup key
//! and by user-day, so that a correction costs what it changes, not the days it lands in.
//!
//! The published partitions already hold the metrics of everything committed. A run's changes
//! (new events, withdrawn raw rows) come out of the dataflow as exact differences as long as the
//! state holds, complete:
//!
//! - every version of every dedup key the run changes, so `dedup` knows the winner before and
//!   after (the greatest version across all of a key's raw rows, whichever day they are in);
//! - every row of every user-day ([`UserDay`]: a user in a daily cell) whose winners change, so
//!   the distinct-user count knows the user's hours before and after;
//! - and, for the keys of those user-day rows, their other versions too, so their winners (which
//!   the run does not change) are the real ones.
//!
//! Found as a closure: start from the keys and user-days of the new events and the withdrawn
//! rows; look up which days hold those keys (the per-day [`keyindex`]) and scan the `dedup_key`,
//! `user_id` and `ad_id` columns of those days' raw files (and of the user-days' days); decode
//! only the files with candidate rows (a wanted key, or a wanted user with a wanted ad) and take
//! the rows whose key or user-day is wanted; their keys and user-days join the wanted sets; repeat
//! until nothing new turns up (in practice: one round, a second for the few revisions that moved
//! an event to another user-day). Taking more rows than needed is
//! harmless (they are rebuilt as they are published), taking fewer is not, so every test errs on
//! the side of more.
//!
//! The runtime feeds these rows at epoch 0, throws away what the mirror made of them, and seeds each
//! partition with its published rows when a later epoch first touches it
//! ([`adsmetrics_dataflows::PartitionMirror::seed`]). A compliance delete does not use this: it
//! rebuilds whole days without the deleted keys ([`crate::scope`]), which is right whatever state a
//! crashed earlier attempt left.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use adsmetrics_dataflows::aggregate::UserDay;
use adsmetrics_dataflows::batching::BuildFastHasher;
use adsmetrics_dataflows::{DedupKey, EventVersion};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::decode::Decoded;
use crate::event::Event;
use crate::keyindex;
use crate::retention::Horizons;
use crate::scope::{raw_day, Changes, ScopeError};
use crate::sink::raw;
use crate::source::{SourceError, SourceFile};
use crate::tombstones::Tombstones;
use crate::warehouse::Warehouse;

/// The state a keyed run rebuilds at epoch 0.
#[derive(Debug, Default)]
pub struct KeyedState {
    /// One `(key, version)` per raw row that holds it (the dataflow counts a key's version once
    /// per source partition that contains it).
    pub rows: Vec<(DedupKey, EventVersion)>,
    /// Raw files decoded to find them.
    pub files_decoded: u64,
    /// Raw files whose key and user columns were scanned.
    pub files_scanned: u64,
    /// Rounds of the closure.
    pub rounds: u32,
    /// The new sources decoded here, by content hash, for the epochs to use instead of decoding
    /// them again (up to [`KEEP_DECODED_EVENTS`] events in all; the rest are decoded again).
    pub decoded: HashMap<String, Predecoded>,
}

/// The `dedup_key`, `user_id` and `ad_id` columns of raw files a process scanned, kept for its
/// next runs (a stream's epochs scan the same day's files again and again: read and decoded
/// once, then only tested). Bounded by a number of rows (32 bytes each); when full, the files
/// the last run did not scan make room. Raw files are immutable under their names except for a
/// delete's rewrite, after which the warehouse is read afresh and this cache dropped with it.
#[derive(Debug, Default)]
pub struct ColumnCache {
    files: HashMap<PathBuf, std::sync::Arc<raw::KeyUserColumns>>,
    rows: usize,
    max_rows: usize,
}

impl ColumnCache {
    /// A cache of up to `max_rows` rows.
    pub fn new(max_rows: usize) -> Self {
        ColumnCache {
            max_rows,
            ..Default::default()
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Forgets every file (they may have been rewritten).
    pub fn clear(&mut self) {
        self.files.clear();
        self.rows = 0;
    }

    fn get(&self, path: &Path) -> Option<std::sync::Arc<raw::KeyUserColumns>> {
        self.files.get(path).cloned()
    }

    /// Takes the columns a run read, after making room by dropping the files it did not use.
    fn keep(
        &mut self,
        used: &BTreeSet<&PathBuf>,
        fresh: Vec<(PathBuf, std::sync::Arc<raw::KeyUserColumns>)>,
    ) {
        let incoming: usize = fresh.iter().map(|(_, c)| c.keys.len()).sum();
        if self.rows + incoming > self.max_rows {
            self.files.retain(|path, _| used.contains(path));
            self.rows = self.files.values().map(|c| c.keys.len()).sum();
        }
        for (path, columns) in fresh {
            let n = columns.keys.len();
            if self.rows + n > self.max_rows {
                break;
            }
            if self.files.insert(path, columns).is_none() {
                self.rows += n;
            }
        }
    }
}

/// What a dataflow that lives across runs (a stream's session, see
/// [`crate::runtime::OpenCache::with_session`]) already holds of the raw files that were committed
/// when it began: every row of these keys and of these user-days. A run in the session rebuilds
/// only rows of neither (a row with a covered key or user-day is in the dataflow already), and
/// what it rebuilds, with its new events' keys and user-days, is covered from then on.
#[derive(Debug, Default)]
pub struct Coverage {
    keys: HashSet<DedupKey, BuildFastHasher>,
    user_days: HashSet<UserDay, BuildFastHasher>,
}

impl Coverage {
    /// Keys covered.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    fn holds(&self, key: &DedupKey, user_day: &UserDay) -> bool {
        self.keys.contains(key) || self.user_days.contains(user_day)
    }
}

/// A new source decoded while planning: what it decoded to, and its events' `(key, version)`s.
pub type Predecoded = (std::sync::Arc<Decoded>, Vec<(DedupKey, EventVersion)>);

/// How many decoded events of new sources a run keeps for its epochs (about 200 bytes each).
pub const KEEP_DECODED_EVENTS: usize = 1 << 20;

type Keyed = Vec<(DedupKey, EventVersion)>;

/// What one worker's share of a cluster run's new sources, and of the raw files it withdraws, asks
/// of the keyed rebuild, found by the worker that reads them (see [`crate::runtime`]'s
/// `seed_in_run`): their live rows' keys, and their user-days that may have raw rows
/// ([`SeedScope`]). Only these travel to the coordinator, which finds the rows
/// ([`keyed_state`]'s `remote`): 16 bytes a key and 40 a user-day (of a day with raw files: a
/// load's fresh days have none), where the events' `(key, version)`s are 104 bytes each.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Seeds {
    /// The keys, one per live event (the coordinator's set takes each once).
    pub keys: Vec<DedupKey>,
    /// The user-days, each once.
    pub user_days: Vec<UserDay>,
}

/// Which user-days of new events may have raw rows to rebuild: a raw row lies in its event day's
/// folder, so only those of days with committed raw files may (the rest are fresh days'),
/// unless a raw file lies outside any day's folder.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SeedScope {
    /// The days with committed raw files; `None`: every day may hold rows.
    days: Option<BTreeSet<i64>>,
}

impl SeedScope {
    /// The scope of a run that rebuilds from `committed`.
    pub fn of(warehouse: &Warehouse, committed: &[PathBuf]) -> Self {
        Self::of_days(committed.iter().map(|p| raw_day(warehouse, p)))
    }

    /// The scope of committed raw files in these days (`None`: outside any day's folder).
    fn of_days(days: impl IntoIterator<Item = Option<i64>>) -> Self {
        SeedScope {
            days: days.into_iter().collect(),
        }
    }

    fn may_have_rows(&self, user_day: &UserDay) -> bool {
        self.days
            .as_ref()
            .is_none_or(|days| days.contains(&user_day.day()))
    }
}

impl Seeds {
    /// Adds the live events of `keyed` (a source's): not past the raw horizon, not deleted.
    pub fn add(
        &mut self,
        keyed: &[(DedupKey, EventVersion)],
        scope: &SeedScope,
        horizons: &Horizons,
        tombstones: &Tombstones,
    ) {
        for (key, version) in keyed
            .iter()
            .filter(|(k, v)| is_live(k, v, horizons, tombstones))
        {
            self.push(key, version, scope);
        }
    }

    /// Adds the rows of a raw file the run withdraws ([`raw_file_rows`]), but for deleted keys.
    pub fn add_withdrawn(
        &mut self,
        rows: &[(DedupKey, EventVersion)],
        scope: &SeedScope,
        tombstones: &Tombstones,
    ) {
        for (key, version) in rows.iter().filter(|(k, _)| !is_deleted(k, tombstones)) {
            self.push(key, version, scope);
        }
    }

    fn push(&mut self, key: &DedupKey, version: &EventVersion, scope: &SeedScope) {
        self.keys.push(*key);
        let user_day = UserDay::of(version).0;
        if scope.may_have_rows(&user_day) {
            self.user_days.push(user_day);
        }
    }

    /// Each user-day once (most of a source's events share a few).
    pub fn finish(&mut self) {
        self.user_days.sort_unstable();
        self.user_days.dedup();
    }
}

/// Whether a new event asks anything of the rebuild: events past the raw horizon will be refused,
/// and deleted keys never come back, so neither changes anything.
fn is_live(
    key: &DedupKey,
    version: &EventVersion,
    horizons: &Horizons,
    tombstones: &Tombstones,
) -> bool {
    horizons.raw_day.is_none_or(|h| version.day() >= h) && !is_deleted(key, tombstones)
}

fn is_deleted(key: &DedupKey, tombstones: &Tombstones) -> bool {
    !tombstones.is_empty() && tombstones.contains(key)
}

/// Every row of a raw file, as `(key, version)` (what withdrawing it takes out of the state).
pub(crate) fn raw_file_rows(path: &Path) -> Result<Vec<(DedupKey, EventVersion)>, ScopeError> {
    Ok(raw::RawFile::open(path, read_bytes(path)?)?.all_versions()?)
}

/// Runs `f` over `items` on up to `threads` threads, each taking the next item as it is free (the
/// items may differ a lot in cost); results in the items' order, or the error of a failed item
/// (once one fails, the items not yet taken are skipped).
pub(crate) fn par_map<T: Sync, R: Send, E: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, E> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let threads = threads.clamp(1, items.len());
    let (next, failed, f) = (AtomicUsize::new(0), AtomicBool::new(false), &f);
    let work = || {
        let mut done = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let result = f(item);
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            done.push((i, result));
        }
        done
    };
    let mut done: Vec<(usize, Result<R, E>)> = if threads == 1 {
        work()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("par_map threads do not panic"))
                .collect()
        })
    };
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, result)| result).collect()
}

/// A bitmap over a hash of the values of a set: most values not in it miss with one read of a
/// small table, where a lookup in the set itself hashes and probes a larger one. The scan tests
/// every row of every file of the days it reads (some hundred thousand) and few are wanted. It
/// only answers "maybe" or "no": the set decides.
struct Prefilter {
    bits: Vec<u64>,
    shift: u32,
}

impl Prefilter {
    fn new(hashes: impl ExactSizeIterator<Item = u64>) -> Self {
        // About 32 bits per value: a few percent of misses pass on to the set.
        let bits = (hashes.len().saturating_mul(32))
            .next_power_of_two()
            .clamp(1 << 12, 1 << 26);
        let mut filter = Prefilter {
            bits: vec![0; bits / 64],
            shift: 64 - bits.trailing_zeros(),
        };
        for hash in hashes {
            let bit = hash >> filter.shift;
            filter.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        filter
    }

    fn may_hold(&self, hash: u64) -> bool {
        let bit = hash >> self.shift;
        self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }
}

/// Keys are uniform hashes already: their top bits will do, which is the key index's prefix (a
/// round's filter is made from the prefixes: [`key_lookup`]).
fn key_hash(key: u128) -> u64 {
    keyindex::prefix(key)
}

/// What a round looks `keys` up with: their distinct key-index prefixes, in order (for the days'
/// indexes), and a filter over them (for the rows of the files read).
fn key_lookup(keys: &KnownKeys) -> (Vec<u64>, Prefilter) {
    // Sorted keys have sorted prefixes: the keys found since the seeds are few, and go in after.
    let mut prefixes: Vec<u64> = keys
        .sorted
        .iter()
        .map(|k| keyindex::prefix(k.0.get()))
        .collect();
    prefixes.dedup();
    if !keys.found.is_empty() {
        prefixes.extend(keys.found.iter().map(|k| keyindex::prefix(k.0.get())));
        prefixes.sort_unstable();
        prefixes.dedup();
    }
    let filter = Prefilter::new(prefixes.iter().copied());
    (prefixes, filter)
}

/// The keys a rebuild knows (or a round looks for): those it starts from, sorted once, and those
/// its rounds find, in a set. A long load's generation starts from some 300k keys: inserted one
/// by one into a hash set of megabytes, each was a cache miss, and the set took 40 ms on one
/// thread of every generation; sorted, a third of that. A lookup (a row whose key passed the
/// round's filter, a row decoded) goes through a directory of the keys' top bits to the few
/// sorted keys that share them.
#[derive(Default)]
struct KnownKeys {
    sorted: Vec<DedupKey>,
    /// For each value of a key's top `bits` bits, where its keys start in `sorted`, and one more
    /// entry, the end.
    starts: Vec<u32>,
    bits: u32,
    found: HashSet<DedupKey, BuildFastHasher>,
}

impl KnownKeys {
    fn of(mut keys: Vec<DedupKey>) -> Self {
        keys.sort_unstable();
        keys.dedup();
        // About four keys per entry.
        let bits = (keys.len() / 4).max(1).ilog2().min(24);
        let mut starts = Vec::with_capacity((1 << bits) + 1);
        let mut next = 0;
        for (i, key) in keys.iter().enumerate() {
            let top = Self::top(key, bits);
            while next <= top {
                starts.push(i as u32);
                next += 1;
            }
        }
        starts.resize((1 << bits) + 1, keys.len() as u32);
        KnownKeys {
            sorted: keys,
            starts,
            bits,
            found: HashSet::default(),
        }
    }

    fn top(key: &DedupKey, bits: u32) -> usize {
        keyindex::prefix(key.0.get())
            .checked_shr(64 - bits)
            .unwrap_or(0) as usize
    }

    fn in_sorted(&self, key: &DedupKey) -> bool {
        let top = Self::top(key, self.bits);
        match (self.starts.get(top), self.starts.get(top + 1)) {
            (Some(&start), Some(&end)) => self.sorted[start as usize..end as usize].contains(key),
            _ => false,
        }
    }

    fn contains(&self, key: &DedupKey) -> bool {
        self.in_sorted(key) || self.found.contains(key)
    }

    /// Adds a key; whether it was new.
    fn insert(&mut self, key: DedupKey) -> bool {
        !self.in_sorted(&key) && self.found.insert(key)
    }

    fn len(&self) -> usize {
        self.sorted.len() + self.found.len()
    }

    fn iter(&self) -> impl Iterator<Item = &DedupKey> {
        self.sorted.iter().chain(&self.found)
    }
}

/// User and ad ids are not uniform (often small and dense): mixed before the top bits are taken.
fn user_ad_hash(user: i64, ad: i64) -> u64 {
    let h = (user as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (ad as u64);
    (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

pub(crate) fn read_bytes(path: &Path) -> Result<Bytes, ScopeError> {
    let bytes = std::fs::read(path).map_err(|source| SourceError {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Bytes::from(bytes))
}

/// The new sources decoded, with their events' `(key, version)`s, and the withdrawn raw files'
/// `(key, version)`s.
fn seeds(
    new_sources: &[&SourceFile],
    retract: &[PathBuf],
    threads: usize,
) -> Result<(Vec<Predecoded>, Vec<Keyed>), ScopeError> {
    // Fewer sources than threads (a correction is often one file): each is split among them.
    let parts = (threads / new_sources.len().max(1)).max(1);
    let new_events = par_map(new_sources, threads, |source| {
        let decoded = source.decode(parts)?;
        let chunk = decoded.events.len().div_ceil(parts).max(1);
        let chunks: Vec<&[Event]> = decoded.events.chunks(chunk).collect();
        let keyed: Keyed = par_map(&chunks, parts, |events| {
            Ok::<_, ScopeError>(events.iter().map(Event::keyed_version).collect::<Keyed>())
        })?
        .concat();
        Ok::<_, ScopeError>((decoded, keyed))
    })?;
    let withdrawn = par_map(retract, threads, |path| raw_file_rows(path))?;
    Ok((new_events, withdrawn))
}

/// What a decoded row's key and user-day were when a rebuild round began.
enum Seen {
    /// The key is deleted (tombstoned): the row is not taken.
    Deleted,
    /// The session's dataflow holds the row already ([`Coverage`]): not taken.
    Covered,
    /// Both were known: the row is taken, and adds nothing to look for.
    Both,
    /// One was not: checked against the sets as they are now (they only grow, so what was
    /// known then is still known, and needs no second look).
    Check {
        key_known: bool,
        user_day_known: bool,
    },
}

/// The keyed state of a run; see the module doc. With `coverage`, only the rows a session's
/// dataflow does not hold yet ([`Coverage`]; `changes.committed` are then the files committed
/// when the session began), and the coverage grows by what the run adds.
///
/// `remote`: what the workers of a cluster's processes found in their shares of the new sources
/// and the withdrawn raw files ([`Seeds`]), added to what `changes.new_sources` and
/// `changes.retract` ask (none, when every worker sent seeds).
pub fn keyed_state(
    warehouse: &Warehouse,
    changes: &Changes<'_>,
    threads: usize,
    cache: Option<&mut ColumnCache>,
    coverage: Option<&mut Coverage>,
    remote: &[Seeds],
) -> Result<KeyedState, ScopeError> {
    let Changes {
        committed,
        new_sources,
        retract,
        tombstones,
        horizons,
        ..
    } = *changes;
    let started = std::time::Instant::now();
    let mut out = KeyedState::default();
    if committed.is_empty() {
        return Ok(out);
    }
    let mut by_day: BTreeMap<Option<i64>, Vec<usize>> = BTreeMap::new();
    for (i, path) in committed.iter().enumerate() {
        by_day.entry(raw_day(warehouse, path)).or_default().push(i);
    }

    let dated: Vec<Option<i64>> = by_day.keys().filter(|d| d.is_some()).copied().collect();
    let (new_events, withdrawn) = seeds(new_sources, retract, threads)?;
    // The two sets are built on two threads: each insert is a cache miss in a table of megabytes.
    let seed_rows: usize = new_events
        .iter()
        .map(|(_, keyed)| keyed.len())
        .sum::<usize>()
        + withdrawn.iter().map(Vec::len).sum::<usize>()
        + remote.iter().map(|s| s.keys.len()).sum::<usize>();
    let live = || {
        new_events
            .iter()
            .flat_map(|(_, keyed)| keyed)
            .filter(|(k, v)| is_live(k, v, horizons, tombstones))
            .chain(
                withdrawn
                    .iter()
                    .flatten()
                    .filter(|(key, _)| !is_deleted(key, tombstones)),
            )
    };
    let remote_keys = || remote.iter().flat_map(|s| &s.keys);
    let covered = coverage.as_deref();
    // Without a session to account for, a user-day is wanted only in a day with committed raw
    // files (a fresh day's, most of a long load's, has no row to find): [`SeedScope`].
    let seed_scope = match covered {
        Some(_) => SeedScope::default(),
        None => SeedScope::of_days(by_day.keys().copied()),
    };
    let may_have_rows = |u: &UserDay| seed_scope.may_have_rows(u);
    let (mut keys, (mut user_days, mut pending_user_days)) = std::thread::scope(|scope| {
        let user_days = scope.spawn(|| {
            let mut set: HashSet<UserDay, BuildFastHasher> = HashSet::with_capacity_and_hasher(
                if seed_scope.days.is_some() {
                    0
                } else {
                    seed_rows
                },
                BuildFastHasher::default(),
            );
            let mut pending = Vec::new();
            let user_days = live()
                .map(|(_, version)| UserDay::of(version).0)
                .chain(remote.iter().flat_map(|s| s.user_days.iter().copied()));
            for user_day in user_days {
                if may_have_rows(&user_day)
                    && set.insert(user_day)
                    && !covered.is_some_and(|c| c.user_days.contains(&user_day))
                {
                    pending.push(user_day);
                }
            }
            (set, pending)
        });
        let mut keys = Vec::with_capacity(seed_rows);
        keys.extend(live().map(|(key, _)| *key).chain(remote_keys().copied()));
        let keys = KnownKeys::of(keys);
        let user_days = user_days
            .join()
            .expect("the user-day thread does not panic");
        (keys, user_days)
    });
    // The keys the first round looks for: every one, unless a session's dataflow holds some.
    let mut pending_keys: Vec<DedupKey> = match covered {
        Some(c) => keys
            .sorted
            .iter()
            .filter(|key| !c.keys.contains(key))
            .copied()
            .collect(),
        None => keys.sorted.clone(),
    };
    drop(withdrawn);
    let mut kept = 0;
    for (predecoded, source) in new_events.into_iter().zip(new_sources) {
        kept += predecoded.0.events.len();
        if kept <= KEEP_DECODED_EVENTS {
            out.decoded.insert(source.content_hash.clone(), predecoded);
        }
    }
    tracing::debug!(took = ?started.elapsed(), keys = keys.len(), user_days = user_days.len(), "rehydration seeds");

    let mut columns: HashMap<usize, std::sync::Arc<raw::KeyUserColumns>> = HashMap::new();
    // The files whose columns this run read, and those it found in `cache`.
    let (mut read_here, mut used) = (Vec::new(), BTreeSet::new());
    // Per file, the rows already taken (so a later round does not take them twice).
    let mut taken: HashMap<usize, Vec<bool>> = HashMap::new();
    while !pending_keys.is_empty() || !pending_user_days.is_empty() {
        out.rounds += 1;
        tracing::debug!(took = ?started.elapsed(), "rehydration round");
        // When every known key is pending (the first round, unless a session covers some), the
        // known ones are the ones to test.
        let pending_set: KnownKeys;
        let wanted_keys = if pending_keys.len() == keys.len() {
            &keys
        } else {
            pending_set = KnownKeys::of(std::mem::take(&mut pending_keys));
            &pending_set
        };
        let (prefixes, key_filter) = key_lookup(wanted_keys);
        // A row may belong to a pending user-day when its user and ad are one's (its day is its
        // file's; the rest of the cell is checked once it is decoded): with many users, a user
        // alone matches a large share of a day's rows, a user and an ad few.
        let wanted_users: HashSet<(i64, i64), BuildFastHasher> = pending_user_days
            .iter()
            .map(|u| (u.user_id(), u.ad_id()))
            .collect();
        let user_filter = Prefilter::new(
            wanted_users
                .iter()
                .map(|&(user, ad)| user_ad_hash(user, ad)),
        );

        // The days to look in: those holding a pending key, the pending user-days' days, and raw
        // files outside any dt= folder (which cannot be placed).
        let mut days: BTreeSet<Option<i64>> = pending_user_days
            .iter()
            .map(|u| Some(u.day()))
            .filter(|d| by_day.contains_key(d))
            .collect();
        days.extend(by_day.keys().filter(|d| d.is_none()).copied());
        if !prefixes.is_empty() {
            // Any key may be in any day: every day's index is read, each into a buffer its
            // thread reuses and compared as it lies.
            let hits = par_map(&dated, threads, |day| {
                let files: Vec<&PathBuf> = by_day[day].iter().map(|&i| &committed[i]).collect();
                let day = day.expect("only dated days have a key index");
                let found = keyindex::day_may_hold(warehouse, day, &files, &prefixes)?;
                Ok::<_, ScopeError>(found.then_some(Some(day)))
            })?;
            days.extend(hits.into_iter().flatten());
        }

        tracing::debug!(took = ?started.elapsed(), days = days.len(), keys = wanted_keys.len(), user_days = pending_user_days.len(), "rehydration days");
        // Each file of those days: its key and user columns (read once per run), the candidate
        // rows (a pending key, or a pending user: the user-day is checked once decoded), and
        // those rows decoded, from one read of the file.
        let files: Vec<usize> = days.iter().flat_map(|d| by_day[d].clone()).collect();
        let (columns_now, taken_now) = (&columns, &taken);
        let cached = cache.as_deref();
        let (wanted_keys, wanted_users) = (&wanted_keys, &wanted_users);
        let (key_filter, user_filter) = (&key_filter, &user_filter);
        let (known_keys, known_user_days) = (&keys, &user_days);
        let covered = coverage.as_deref();
        let scanned = par_map(&files, threads, |&i| {
            let path = &committed[i];
            let mut opened = None;
            // Read once per run; and across runs through `cache`.
            let (fresh, from_cache) = match columns_now.get(&i) {
                Some(_) => (None, false),
                None => match cached.and_then(|c| c.get(path)) {
                    Some(columns) => (Some(columns), true),
                    None => {
                        let file = raw::RawFile::open(path, read_bytes(path)?)?;
                        let fresh = std::sync::Arc::new(file.key_user_columns()?);
                        opened = Some(file);
                        (Some(fresh), false)
                    }
                },
            };
            let cols = fresh.as_ref().unwrap_or_else(|| &columns_now[&i]);
            let taken_here = taken_now.get(&i);
            let rows: Vec<usize> = (0..cols.keys.len())
                .filter(|&row| {
                    let (key, user, ad) = (cols.keys[row], cols.users[row], cols.ads[row]);
                    !taken_here.is_some_and(|t| t[row])
                        && ((key_filter.may_hold(key_hash(key))
                            && wanted_keys.contains(&DedupKey(key.into())))
                            || (user_filter.may_hold(user_ad_hash(user, ad))
                                && wanted_users.contains(&(user, ad))))
                })
                .collect();
            let decoded = if rows.is_empty() {
                Vec::new()
            } else {
                let file = match opened {
                    Some(file) => file,
                    None => raw::RawFile::open(path, read_bytes(path)?)?,
                };
                file.versions(&rows)?
            };
            // Each decoded row's user-day, and whether its key and user-day were known when the
            // round began, found here on every thread: the sets only grow, so a row known to
            // both then needs nothing more of the serial pass below.
            let decoded: Vec<_> = decoded
                .into_iter()
                .map(|(key, version)| {
                    let user_day = UserDay::of(&version).0;
                    let seen = if !tombstones.is_empty() && tombstones.contains(&key) {
                        Seen::Deleted
                    } else if covered.is_some_and(|c| c.holds(&key, &user_day)) {
                        Seen::Covered
                    } else {
                        match (
                            known_keys.contains(&key),
                            known_user_days.contains(&user_day),
                        ) {
                            (true, true) => Seen::Both,
                            (key_known, user_day_known) => Seen::Check {
                                key_known,
                                user_day_known,
                            },
                        }
                    };
                    (key, version, user_day, seen)
                })
                .collect();
            Ok::<_, ScopeError>((i, fresh, from_cache, rows, decoded))
        })?;

        tracing::debug!(took = ?started.elapsed(), "rehydration decoded");
        pending_keys.clear();
        pending_user_days.clear();
        for (i, fresh, from_cache, rows, file) in scanned {
            if let Some(fresh) = fresh {
                if from_cache {
                    used.insert(&committed[i]);
                } else {
                    out.files_scanned += 1;
                    read_here.push((committed[i].clone(), fresh.clone()));
                }
                columns.insert(i, fresh);
            }
            if !rows.is_empty() {
                out.files_decoded += 1;
            }
            let rows_in_file = columns.get(&i).map_or(0, |c| c.keys.len());
            for (row, (key, version, user_day, seen)) in rows.into_iter().zip(file) {
                // The row is taken when its key or its user-day is known; whichever is not, it
                // makes known. One set operation for each that was not known when the round
                // began (a lookup per row here is what this pass, on one thread, costs).
                let (key_new, user_day_new) = match seen {
                    Seen::Deleted | Seen::Covered => continue,
                    Seen::Both => (false, false),
                    Seen::Check {
                        key_known,
                        user_day_known,
                    } => {
                        let user_day_known = user_day_known || user_days.contains(&user_day);
                        if user_day_known {
                            (!key_known && keys.insert(key), false)
                        } else if key_known || keys.contains(&key) {
                            (false, user_days.insert(user_day))
                        } else {
                            continue;
                        }
                    }
                };
                taken.entry(i).or_insert_with(|| vec![false; rows_in_file])[row] = true;
                out.rows.push((key, version));
                if key_new {
                    pending_keys.push(key);
                }
                if user_day_new {
                    pending_user_days.push(user_day);
                }
            }
        }
    }
    if let Some(cache) = cache {
        cache.keep(&used, read_here);
    }
    if let Some(coverage) = coverage {
        coverage.keys.extend(keys.iter());
        coverage.user_days.extend(user_days);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(v: u128) -> DedupKey {
        DedupKey(v.into())
    }

    proptest! {
        /// The sorted keys and their directory answer as a set of them would, for any number of
        /// keys (none, one, a directory entry's worth, thousands), near keys and far ones.
        #[test]
        fn known_keys_answer_as_a_set(
            values in proptest::collection::vec(any::<u128>(), 0..3000),
            probes in proptest::collection::vec(any::<u128>(), 0..200),
            added in proptest::collection::vec(any::<u128>(), 0..20),
        ) {
            let mut set: HashSet<u128> = values.iter().copied().collect();
            let mut known = KnownKeys::of(values.iter().map(|&v| key(v)).collect());
            prop_assert_eq!(known.len(), set.len());
            for &v in values.iter().chain(&probes) {
                for probe in [v, v.wrapping_add(1), v.wrapping_sub(1), v ^ (1 << 127)] {
                    prop_assert_eq!(known.contains(&key(probe)), set.contains(&probe));
                }
            }
            for &v in added.iter().chain(values.iter().take(5)) {
                prop_assert_eq!(known.insert(key(v)), set.insert(v));
                prop_assert!(known.contains(&key(v)));
            }
            prop_assert_eq!(known.len(), set.len());
            let mut listed: Vec<u128> = known.iter().map(|k| k.0.get()).collect();
            listed.sort_unstable();
            let mut expected: Vec<u128> = set.into_iter().collect();
            expected.sort_unstable();
            prop_assert_eq!(listed, expected);
        }
    }
}
