//! A correction rebuilds only the state its keys and user-days need, and is still exact: the
//! distinct-user counts need every event of a changed user-day, not only the changed events, and a
//! revision that moves an event to another user needs both users' days.

mod common;

use adsmetrics::delete::{delete, DeleteRequest};
use adsmetrics::event::Event;
use adsmetrics::runtime::{ingest, RunError};
use adsmetrics::snapshot::TableSnapshot;
use adsmetrics::warehouse::Warehouse;
use adsmetrics_dataflows::{Country, EventType};
use common::*;

const HOUR_US: i64 = 3_600_000_000;
/// 2026-11-03T00:00:00Z.
const DAY0: i64 = 1_793_750_400_000_000;

fn event(id: &str, hour: i64, user: i64) -> Event {
    Event {
        event_id: Some(id.into()),
        event_type: EventType::Impression,
        event_time_us: DAY0 + hour * HOUR_US + 60_000_000,
        ad_id: 7,
        campaign_id: 2,
        advertiser_id: 1,
        country: Country(*b"DE"),
        user_id: user,
        ip: "10.0.0.1".into(),
        cost_micros: Some(100),
        revenue_micros: None,
        producer: "web".into(),
        revision: 0,
    }
}

fn revised(e: &Event, f: impl FnOnce(&mut Event)) -> Event {
    let mut e = e.clone();
    e.revision += 1;
    f(&mut e);
    e
}

#[test]
fn a_revision_is_exact_for_distinct_users_of_its_user_day() {
    let dir = tempfile::tempdir().unwrap();
    // User 1 has events in hours 1 and 5 of day 0 (the same daily cell); user 2 in hour 5. Many
    // unrelated events on other days and users, so the rebuild is visibly partial.
    let mut events = vec![
        event("a", 1, 1),
        event("b", 5, 1),
        event("c", 5, 1),
        event("d", 5, 2),
    ];
    for i in 0..600 {
        events.push(event(&format!("other-{i}"), 24 + i % (24 * 20), 100 + i));
    }
    write_logs(&dir.path().join("logs"), &events);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("logs")], options()).unwrap();
    assert!(published_tables(&wh) == expected_tables(&events));

    // 1. Event "a" moves from hour 1 to hour 5: user 1 leaves hour 1 but was already counted in
    //    hour 5 and in the day, which only the user's other events (never changed) can tell.
    let fix = vec![revised(&events[0], |e| e.event_time_us += 4 * HOUR_US)];
    write_parquet(&dir.path().join("fix1/a.parquet"), &fix);
    events.extend(fix);
    let run = ingest(&wh, &[dir.path().join("fix1")], options()).unwrap();
    assert!(
        published_tables(&wh) == expected_tables(&events),
        "tables differ from a recompute after moving an event within its user's day"
    );
    // The changed key's versions and the user-day's rows, not the day or the history.
    assert!(
        (3..=10).contains(&run.rehydrated_rows),
        "rehydrated {} rows",
        run.rehydrated_rows
    );

    // 2. Event "d" is revised to belong to user 1: user 2 leaves hour 5 and the day, user 1
    //    gains nothing (already there).
    let fix = vec![revised(&events[3], |e| e.user_id = 1)];
    write_parquet(&dir.path().join("fix2/d.parquet"), &fix);
    events.extend(fix);
    ingest(&wh, &[dir.path().join("fix2")], options()).unwrap();
    assert!(
        published_tables(&wh) == expected_tables(&events),
        "tables differ from a recompute after moving an event to another user"
    );

    // 3. A late event of user 1 in hour 9, and the revision of "b" to another day altogether.
    let fix = vec![
        event("late", 9, 1),
        revised(&events[1], |e| e.event_time_us += 3 * 24 * HOUR_US),
    ];
    write_parquet(&dir.path().join("fix3/late.parquet"), &fix);
    events.extend(fix);
    ingest(&wh, &[dir.path().join("fix3")], options()).unwrap();
    assert!(published_tables(&wh) == expected_tables(&events));
    assert_ledger_accounts_for_tables(&wh);

    // Each correction again: nothing changes.
    let snapshot = TableSnapshot::take(&wh).unwrap();
    for fix in ["fix1", "fix2", "fix3"] {
        let again = ingest(&wh, &[dir.path().join(fix)], options()).unwrap();
        assert_eq!(again.partitions_published, 0);
    }
    assert!(TableSnapshot::take(&wh).unwrap().untouched_since(&snapshot));
}

#[test]
fn a_correction_reads_back_rows_in_proportion_to_itself_not_to_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut events = thirty_days(dir.path(), 6000);
    let wh = Warehouse::new(dir.path().join("wh"));
    let load = ingest(&wh, &[dir.path().join("logs")], options()).unwrap();

    // Revisions of 30 events spread over all the days.
    let fix: Vec<Event> = events
        .iter()
        .filter(|e| e.event_id.is_some())
        .step_by(150)
        .take(30)
        .map(|e| revised(e, |e| e.cost_micros = Some(7)))
        .collect();
    let days: std::collections::BTreeSet<i64> = fix
        .iter()
        .map(|e| e.event_time_us.div_euclid(DAY_US))
        .collect();
    assert!(days.len() >= 10, "the fix spans {} days", days.len());
    write_parquet(&dir.path().join("fix/revisions.parquet"), &fix);
    events.extend(fix);
    let run = ingest(&wh, &[dir.path().join("fix")], options()).unwrap();
    assert!(published_tables(&wh) == expected_tables(&events));
    // Rebuilding the days they touch would read most of the history back; by key, a few rows
    // per revised event (its versions and its user-day's other events).
    assert!(
        run.rehydrated_rows * 10 < load.raw_rows_written,
        "rehydrated {} rows of {}",
        run.rehydrated_rows,
        load.raw_rows_written
    );
}

#[test]
fn an_unfinished_delete_stops_a_keyed_run_until_it_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<Event> = (0..50)
        .map(|i| event(&format!("e{i}"), i % 24, i))
        .collect();
    write_parquet(&dir.path().join("logs/a.parquet"), &events);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("logs")], options()).unwrap();

    let request = DeleteRequest {
        request_id: "req-1".into(),
        reason: "user asked".into(),
        user_ids: vec![3],
        event_ids: Vec::new(),
    };
    delete(&wh, &request, options()).unwrap();
    // As if the delete had crashed after its tombstones, before its certificate.
    let certificate = adsmetrics::delete::certificate_path(&wh, "req-1");
    std::fs::remove_file(&certificate).unwrap();

    let late = vec![event("late", 3, 77)];
    write_parquet(&dir.path().join("late/a.parquet"), &late);
    let refused = ingest(&wh, &[dir.path().join("late")], options()).unwrap_err();
    assert!(
        matches!(&refused, RunError::Refused(m) if m.contains("req-1")),
        "{refused}"
    );
    delete(&wh, &request, options()).unwrap();
    assert!(certificate.exists());
    ingest(&wh, &[dir.path().join("late")], options()).unwrap();
    let mut all = events.clone();
    all.retain(|e| e.user_id != 3);
    all.extend(late);
    assert!(published_tables(&wh) == expected_tables(&all));
}

#[test]
fn raw_rows_read_for_rehydration_are_the_versions_ingested() {
    // Missing event ids, missing amounts, revisions, long ids: every shape of row.
    let dir = tempfile::tempdir().unwrap();
    let mut events = sample_events(3000, 5);
    events[0].event_id = Some("an-event-id-longer-than-twenty-four-bytes".into());
    write_parquet(&dir.path().join("in/a.parquet"), &events);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("in")], options()).unwrap();
    let files = adsmetrics::sink::raw::list_raw_files(&wh);
    assert!(!files.is_empty());
    for path in &files {
        let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
        let expected: Vec<_> =
            adsmetrics::decode::decode_parquet(&path.to_string_lossy(), bytes.clone())
                .events
                .iter()
                .map(Event::keyed_version)
                .collect();
        let file = adsmetrics::sink::raw::RawFile::open(path, bytes).unwrap();
        let all: Vec<usize> = (0..expected.len()).collect();
        assert!(file.versions(&all).unwrap() == expected, "{path:?}");
        assert!(file.all_versions().unwrap() == expected, "{path:?}");
        let some: Vec<usize> = all.iter().copied().filter(|i| i % 3 != 1).collect();
        let picked: Vec<_> = some.iter().map(|&i| expected[i]).collect();
        assert!(file.versions(&some).unwrap() == picked, "{path:?}");
        assert!(file.versions(&[]).unwrap().is_empty());
        assert!(file.versions(&[expected.len()]).is_err());
    }
    // A torn or garbled raw file is an error, never a panic.
    let bytes = std::fs::read(&files[0]).unwrap();
    let torn = bytes::Bytes::copy_from_slice(&bytes[..bytes.len() / 2]);
    assert!(adsmetrics::sink::raw::RawFile::open(&files[0], torn).is_err());
    let mut garbled = bytes.clone();
    for b in garbled.iter_mut().skip(8).take(bytes.len() / 2) {
        *b ^= 0x5a;
    }
    if let Ok(file) = adsmetrics::sink::raw::RawFile::open(&files[0], garbled.into()) {
        assert!(file.all_versions().is_err() || file.key_user_columns().is_err());
    }
}

/// A cluster's coordinator finds a keyed rebuild from what its workers send of their shares of
/// the new sources ([`Seeds`]: their live keys and the user-days that may have raw rows), not
/// from the sources (nor from the raw files the run withdraws): it must find the rows it would
/// find reading them all itself.
#[test]
fn the_keys_workers_send_find_the_rows_that_reading_the_sources_finds() {
    use adsmetrics::rehydrate::{keyed_state, SeedScope, Seeds};
    use adsmetrics::retention::Horizons;
    use adsmetrics::scope::Changes;
    use adsmetrics::tombstones::Tombstones;

    let dir = tempfile::tempdir().unwrap();
    let events = thirty_days(dir.path(), 6000);
    let wh = Warehouse::new(dir.path().join("wh"));
    ingest(&wh, &[dir.path().join("logs")], options()).unwrap();
    // Revisions in place, revisions that move an event to another user a day later, and resends,
    // over many days, in three files (three workers' shares).
    let fix: Vec<Event> = events
        .iter()
        .filter(|e| e.event_id.is_some())
        .step_by(97)
        .take(60)
        .enumerate()
        .map(|(i, e)| match i % 3 {
            0 => revised(e, |e| e.cost_micros = Some(7)),
            1 => revised(e, |e| {
                e.user_id += 1;
                e.event_time_us += DAY_US;
            }),
            _ => e.clone(),
        })
        .collect();
    for (i, part) in fix.chunks(20).enumerate() {
        write_parquet(&dir.path().join(format!("fix/part-{i}.parquet")), part);
    }
    let paths = adsmetrics::source::discover(&[dir.path().join("fix")]).unwrap();
    let sources = adsmetrics::source::identify(&paths, 1).unwrap();
    assert_eq!(sources.len(), 3);

    let committed = adsmetrics::sink::raw::list_raw_files(&wh);
    let (tombstones, horizons) = (Tombstones::default(), Horizons::default());
    let no_days = std::collections::BTreeSet::new();
    let changes = |new_sources, retract| Changes {
        committed: &committed,
        new_sources,
        retract,
        extra_days: &no_days,
        tombstones: &tombstones,
        horizons: &horizons,
    };
    let every_source: Vec<_> = sources.iter().collect();
    // And three raw files withdrawn (a replaced source partition's).
    let withdrawn = &committed[..3];
    let read_here =
        keyed_state(&wh, &changes(&every_source, withdrawn), 2, None, None, &[]).unwrap();

    let scope = SeedScope::of(&wh, &committed);
    let mut sent: Vec<Seeds> = sources
        .iter()
        .map(|source| {
            let decoded = source.decode(1).unwrap();
            let keyed: Vec<_> = decoded.events.iter().map(Event::keyed_version).collect();
            let mut seeds = Seeds::default();
            seeds.add(&keyed, &scope, &horizons, &tombstones);
            seeds.finish();
            seeds
        })
        .collect();
    let mut of_withdrawn = Seeds::default();
    for path in withdrawn {
        let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
        let rows = adsmetrics::sink::raw::RawFile::open(path, bytes)
            .unwrap()
            .all_versions()
            .unwrap();
        of_withdrawn.add_withdrawn(&rows, &scope, &tombstones);
    }
    of_withdrawn.finish();
    sent.push(of_withdrawn);
    let found = keyed_state(&wh, &changes(&[], &[]), 2, None, None, &sent).unwrap();

    let sorted = |mut rows: Vec<_>| {
        rows.sort();
        rows
    };
    // More than the fixed events' own versions: their user-days' other events too.
    assert!(read_here.rows.len() > fix.len(), "{}", read_here.rows.len());
    assert_eq!(sorted(found.rows), sorted(read_here.rows));
    assert_eq!(found.rounds, read_here.rounds);
}
