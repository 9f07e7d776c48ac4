//! Human-readable reports of runs, for the command line.

use crate::runtime::IngestSummary;

/// A few lines saying what an ingest did.
pub fn ingest_report(s: &IngestSummary) -> String {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let mut out = format!(
        "sources: {} found, {} ingested, {} skipped (already ingested or identical copies)\n",
        s.sources_found, s.sources_ingested, s.sources_skipped
    );
    if s.retracted_rows > 0 || s.tombstoned > 0 {
        out.push_str(&format!(
            "withdrawn: {} raw rows of replaced or removed source partitions; {} records of deleted events refused\n",
            s.retracted_rows, s.tombstoned
        ));
    }
    if s.sources_ingested == 0 && s.partitions_published == 0 {
        out.push_str(
            "nothing new: no partition published, no data file written (the audit ledger records the run)\n",
        );
        return out;
    }
    out.push_str(&format!(
        "events: {} accepted, {} in-source duplicates, {} quarantined; {} raw rows written; {} rehydrated\n",
        s.events_accepted, s.in_source_duplicates, s.quarantined, s.raw_rows_written, s.rehydrated_rows
    ));
    out.push_str(&format!(
        "partitions: {} published, {} unchanged; {} epochs; {} keys with conflicting versions\n",
        s.partitions_published, s.partitions_unchanged, s.epochs, s.conflicted_keys
    ));
    if s.late_events > 0 {
        out.push_str(&format!(
            "late: {} event-partition arrivals into already published partitions, resends included (late_arrivals table)\n",
            s.late_events
        ));
    }
    if s.generations > 1 {
        let peak = s.memory.iter().map(|m| m.peak_rss_bytes).max().unwrap_or(0);
        out.push_str(&format!(
            "hot window: {} generations, each a fresh dataflow; peak RSS {} MB\n",
            s.generations,
            peak >> 20
        ));
    }
    out.push_str(&format!(
        "time: {:.2} s, {:.0} events/s, {:.1} MB/s\n",
        secs,
        s.events_accepted as f64 / secs,
        s.source_bytes as f64 / secs / 1e6
    ));
    out
}

/// The process's peak resident set so far (`VmHWM`: its own, whatever process started it), as a
/// report line; empty where it cannot be read.
pub fn memory_line() -> String {
    match crate::memory::process_memory().1 {
        0 => String::new(),
        peak => format!("memory: peak RSS {} MB\n", peak >> 20),
    }
}
