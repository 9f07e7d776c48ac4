//! Bad input through a whole ingest (invariant 6): every record is an event or a quarantine row
//! with a reason, whole bad files are quarantined with their path, and the run goes on.

mod common;

use adsmetrics::runtime::{ingest, IngestOptions};
use adsmetrics::warehouse::Warehouse;
use common::*;

#[test]
fn bad_records_and_files_are_quarantined_with_reasons_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let events = sample_events(400, 9);
    write_parquet(&input.join("good.parquet"), &events[..200]);

    // A truncated Parquet file and a file that is neither format.
    let mut whole = Vec::new();
    {
        let batch = adsmetrics::schema::events_to_batch(&events[200..300]);
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut whole, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    std::fs::write(input.join("truncated.parquet"), &whole[..whole.len() / 2]).unwrap();
    std::fs::write(input.join("notes.txt"), b"\x00\x01 definitely not events").unwrap();

    // JSON lines: good lines mixed with every kind of bad one.
    write_jsonl(&input.join("mixed.jsonl"), &events[300..]);
    let mut lines = std::fs::read(input.join("mixed.jsonl")).unwrap();
    let good_line =
        String::from_utf8(lines.split(|b| *b == b'\n').next().unwrap().to_vec()).unwrap();
    let bad: Vec<Vec<u8>> = vec![
        good_line
            .replace("\"country\":\"", "\"country\":\"../x")
            .replace("../x", "../x\",\"x\":\"")
            .into_bytes(),
        good_line
            .replace("\"cost_micros\":", "\"cost_micros\":-")
            .replace(":-null", ":-1")
            .into_bytes(),
        good_line
            .replace("\"ad_id\":", "\"ad_id\":9223372036854775808,\"was\":")
            .into_bytes(),
        good_line
            .replace("\"event_type\":\"", "\"event_type\":\"view")
            .replace("view", "view\",\"t\":\"")
            .into_bytes(),
        b"{\"event_id\": \"\xff\xfe\"}".to_vec(),
        b"{not json".to_vec(),
        good_line.replace("\"user_id\":", "\"uid\":").into_bytes(),
    ];
    for line in &bad {
        lines.extend_from_slice(line);
        lines.push(b'\n');
    }
    std::fs::write(input.join("mixed.jsonl"), lines).unwrap();

    let (wh, summary) = ingest_on_two_workers(&input, dir.path());
    assert_eq!(summary.sources_ingested, 4);

    let quarantined = quarantine_rows(&wh);
    assert_eq!(summary.quarantined as usize, quarantined.len());
    // Two whole files plus every bad line, each with a reason.
    assert_eq!(quarantined.len(), 2 + bad.len(), "{quarantined:#?}");
    let whole_files: Vec<_> = quarantined.iter().filter(|q| q.1 == "file").collect();
    assert_eq!(whole_files.len(), 2);
    assert!(whole_files
        .iter()
        .any(|q| q.0.ends_with("truncated.parquet") && q.2.contains("Parquet")));
    assert!(whole_files
        .iter()
        .any(|q| q.0.ends_with("notes.txt") && q.2.contains("notes.txt")));
    for q in &quarantined {
        assert!(!q.2.is_empty() && !q.3.is_empty(), "{q:?}");
    }
    assert!(quarantined.iter().any(|q| q.2.contains("../x")));
    assert!(quarantined.iter().any(|q| q.2.contains("cost_micros")));
    assert!(quarantined.iter().any(|q| q.2.contains("user_id")));
    assert!(quarantined
        .iter()
        .any(|q| q.3 == b"{\"event_id\": \"\xff\xfe\"}".to_vec()));

    // Nothing lost: accepted + in-source duplicates + quarantined rows = every record offered,
    // and the tables are exactly those of the good records.
    let offered_records = 400 + bad.len() as u64;
    let truncated_records = 100;
    assert_eq!(
        summary.events_accepted + summary.in_source_duplicates + summary.quarantined - 2,
        offered_records - truncated_records
    );
    let mut good = events[..200].to_vec();
    good.extend_from_slice(&events[300..]);
    assert_eq!(published_tables(&wh), expected_tables(&good));
}

/// Many whole bad files in one epoch: the process stages their quarantine rows as files of their
/// own once it holds 64 MiB of them, not all at the epoch's end, and every row is there once.
#[test]
fn a_run_of_large_bad_files_is_quarantined_in_several_files_each_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let files: u64 = 70;
    for i in 0..files {
        // Neither Parquet nor JSON lines: quarantined whole, its first 1 MiB kept.
        let mut bytes = vec![0u8; (1 << 20) + 10];
        bytes[..8].copy_from_slice(&i.to_le_bytes());
        std::fs::write(input.join(format!("blob-{i:02}.bin")), bytes).unwrap();
    }
    write_parquet(&input.join("good.parquet"), &sample_events(100, 3));
    let (wh, summary) = ingest_on_two_workers(&input, dir.path());
    assert_eq!(summary.quarantined, files);
    let rows = quarantine_rows(&wh);
    let mut sources: Vec<&str> = rows.iter().map(|q| q.0.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    assert_eq!(
        (rows.len(), sources.len()),
        (files as usize, files as usize)
    );
    let mut quarantine_files: Vec<String> = walkdir::WalkDir::new(wh.quarantine_dir())
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let path = e.path().strip_prefix(wh.root()).unwrap();
            path.to_string_lossy().replace('\\', "/")
        })
        .collect();
    quarantine_files.sort();
    assert!(quarantine_files.len() >= 2, "{quarantine_files:?}");
    // The audit ledger names every file the run's publish put in place (invariant 8).
    let entries = assert_ledger_accounts_for_tables(&wh);
    let mut listed: Vec<String> = entries
        .iter()
        .flat_map(|e| e.body.side_files.iter())
        .filter(|f| f.starts_with("quarantine/"))
        .cloned()
        .collect();
    listed.sort();
    assert_eq!(listed, quarantine_files);
    assert!(
        !wh.staging_dir().exists() || std::fs::read_dir(wh.staging_dir()).unwrap().count() == 0
    );
}

/// Ingests `input` into a new warehouse `wh` under `dir`, on two workers.
fn ingest_on_two_workers(
    input: &std::path::Path,
    dir: &std::path::Path,
) -> (Warehouse, adsmetrics::runtime::IngestSummary) {
    let wh = Warehouse::new(dir.join("wh"));
    let options = IngestOptions {
        workers: 2,
        ..Default::default()
    };
    let summary = ingest(&wh, &[input.to_path_buf()], options).unwrap();
    (wh, summary)
}
