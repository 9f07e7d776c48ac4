//! `adsmetrics report --out report.html`: one self-contained HTML page with SVG charts — the
//! duplicate rate per producer and hour, late arrivals per event day, and partition versions
//! published over time — readable offline (no script, no stylesheet or font fetched).
//!
//! The figures come from the same places as the checks and `show`: the raw layer's keys (as
//! `check duplicates` counts them), the `late_arrivals` table of committed sources, and the
//! audit ledger. The page is a pure function of the warehouse and the generation time printed in
//! it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use adsmetrics_dataflows::Grain;

use crate::check::{self, CheckError, DayRange, DuplicateThresholds};
use crate::journal::CommitJournal;
use crate::ledger::Ledger;
use crate::sink::late::read_lateness;
use crate::warehouse::{day_string, Warehouse};

/// Errors of building the report.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The raw layer or journal could not be read.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The ledger could not be read.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The late-arrivals table could not be read.
    #[error("late_arrivals: {0:?}")]
    Late(crate::sink::late::LateReadError),
}

/// A chart's points: `x` in the chart's own integer units, `y`.
type Points = Vec<(f64, f64)>;

/// One line of a chart: a name and its points.
struct Series {
    name: String,
    points: Points,
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A chart over integer x positions (hours, days, ledger entries): lines, or one bar per point
/// with `bars`; `x_label(x)` under at most 8 ticks. Styles are inline attributes, so each SVG
/// also renders alone.
fn chart(
    series: &[Series],
    x_label: &dyn Fn(i64) -> String,
    y_label: &dyn Fn(f64) -> String,
    bars: bool,
) -> String {
    let points = series.iter().flat_map(|s| &s.points);
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (x, y) in points {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11" role="img">"#
    );
    if x0 > x1 {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" fill="#888">no data</text></svg>"##,
            WIDTH / 2.0 - 30.0,
            HEIGHT / 2.0
        );
        return svg;
    }
    // Half a slot of room on each side, so the first and last bars (or points) sit inside.
    let (lo, hi) = (x0 - 0.5, x1 + 0.5);
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + (x - lo) / (hi - lo) * plot_w;
    let py = |y: f64| TOP + plot_h - y / y1 * plot_h;
    let bottom = TOP + plot_h;
    for i in 0..=4 {
        let y = y1 * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{v:.1}" x2="{r}" y2="{v:.1}" stroke="#e4e4e4"/><text x="{t}" y="{v:.1}" text-anchor="end" dominant-baseline="middle" fill="#555">{label}</text>"##,
            v = py(y),
            r = LEFT + plot_w,
            t = LEFT - 6.0,
            label = escape(&y_label(y))
        );
    }
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" y1="{bottom}" x2="{r}" y2="{bottom}" stroke="#444"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#444"/>"##,
        r = LEFT + plot_w
    );
    let span = (x1 - x0) as i64;
    // Rounded up: at most eight ticks (rounded down, 18 entries got ten, their labels overlapping).
    let step = ((span + 6) / 7).max(1);
    let mut x = x0 as i64;
    while x <= x1 as i64 {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" font-size="10" fill="#555">{}</text>"##,
            px(x as f64),
            bottom + 16.0,
            escape(&x_label(x))
        );
        x += step;
    }
    let slot = plot_w / (hi - lo);
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        if bars {
            for (x, y) in &s.points {
                let _ = write!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}</title></rect>"#,
                    px(*x) - slot * 0.4,
                    py(*y),
                    (slot * 0.8).max(1.0),
                    bottom - py(*y),
                    escape(&x_label(*x as i64)),
                    escape(&y_label(*y))
                );
            }
        } else {
            let coords: Vec<String> = s
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = write!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5" data-series="{}"/>"#,
                coords.join(" "),
                escape(&s.name)
            );
        }
        let _ = write!(
            svg,
            r##"<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/><text x="{tx}" y="{ty}" fill="#333">{name}</text>"##,
            lx = LEFT + plot_w + 14.0,
            ly = TOP + 16.0 * i as f64,
            tx = LEFT + plot_w + 28.0,
            ty = TOP + 9.0 + 16.0 * i as f64,
            name = escape(&s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The page for the event days in `range` (duplicates and late arrivals; the ledger in full).
pub fn render(
    warehouse: &Warehouse,
    range: DayRange,
    threads: usize,
    generated_at: &str,
) -> Result<String, DashboardError> {
    // Duplicate rate per producer and hour.
    let duplicates = check::duplicates(warehouse, range, DuplicateThresholds::default(), threads)?;
    let hours: Vec<&str> = {
        let mut h: Vec<&str> = duplicates.hours.iter().map(|h| h.hour.as_str()).collect();
        h.sort_unstable();
        h.dedup();
        h
    };
    let hour_index: BTreeMap<&str, usize> =
        hours.iter().enumerate().map(|(i, h)| (*h, i)).collect();
    let mut by_producer: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for h in &duplicates.hours {
        by_producer
            .entry(h.producer.as_str())
            .or_default()
            .push((hour_index[h.hour.as_str()] as f64, h.rate));
    }
    let dup_series: Vec<Series> = by_producer
        .into_iter()
        .map(|(name, points)| Series {
            name: name.to_string(),
            points,
        })
        .collect();
    // `2026-11-01T05` → `11-01T05`.
    let hour_label = |x: i64| {
        hours
            .get(x.max(0) as usize)
            .map(|h| h.get(5..).unwrap_or(h).to_string())
            .unwrap_or_default()
    };
    let percent = |y: f64| format!("{:.1}%", y * 100.0);
    let dup_chart = chart(&dup_series, &hour_label, &percent, false);
    let alerts = duplicates
        .hours
        .iter()
        .filter(|h| h.alert.is_some())
        .count();

    // Late arrivals per event day (daily partitions: each late event once).
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
    let lateness = read_lateness(warehouse, journal.consumed()).map_err(DashboardError::Late)?;
    let late_points: Vec<(f64, f64)> = lateness
        .iter()
        .filter(|(id, _)| id.grain == Grain::Daily)
        .filter(|(id, _)| {
            range.from.is_none_or(|f| id.period >= f) && range.to.is_none_or(|t| id.period <= t)
        })
        .map(|(id, l)| (id.period as f64, l.events as f64))
        .collect();
    let late_total: f64 = late_points.iter().map(|(_, y)| y).sum();
    let late_chart = chart(
        &[Series {
            name: "late events".to_string(),
            points: late_points,
        }],
        &day_string,
        &|y| format!("{y:.0}"),
        true,
    );

    // Partition versions over time: the ledger's runs, cumulative versions per table.
    let ledger = Ledger::open(&warehouse.ledger_path())?;
    let mut cumulative: BTreeMap<&str, (u64, Points)> = BTreeMap::new();
    let mut runs: BTreeMap<String, u64> = BTreeMap::new();
    // x: the entry's place in the ledger; its label: when it was appended.
    let times: Vec<String> = ledger
        .entries()
        .iter()
        .map(|e| {
            chrono::DateTime::parse_from_rfc3339(&e.body.at)
                .map(|t| t.format("%m-%d %H:%M").to_string())
                .unwrap_or_default()
        })
        .collect();
    for (i, entry) in ledger.entries().iter().enumerate() {
        *runs
            .entry(format!("{:?}", entry.body.kind).to_lowercase())
            .or_default() += 1;
        for table in ["ads_metrics_hourly", "ads_metrics_daily"] {
            let changed = entry
                .body
                .partitions
                .iter()
                .filter(|p| p.partition.starts_with(table) && p.new_version.is_some())
                .count() as u64;
            let (total, points) = cumulative.entry(table).or_default();
            *total += changed;
            points.push((i as f64, *total as f64));
        }
    }
    let versions_series: Vec<Series> = cumulative
        .into_iter()
        .map(|(name, (_, points))| Series {
            name: name.to_string(),
            points,
        })
        .collect();
    let versions_chart = chart(
        &versions_series,
        &|x| times.get(x.max(0) as usize).cloned().unwrap_or_default(),
        &|y| format!("{y:.0}"),
        false,
    );
    let runs_text: Vec<String> = runs.iter().map(|(k, n)| format!("{n} {k}")).collect();

    let range_text = match (range.from, range.to) {
        (None, None) => "all event days".to_string(),
        (f, t) => format!(
            "event days {} to {}",
            f.map_or("the first".to_string(), day_string),
            t.map_or("the last".to_string(), day_string)
        ),
    };
    let mut page = String::new();
    let _ = write!(
        page,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>adsmetrics report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; max-width: 64em; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.1em; margin-top: 2em; }}
.note {{ color: #555; }}
</style></head><body>
<h1>adsmetrics report</h1>
<p class="note">Warehouse report, {range}; generated {generated_at}.</p>
<h2 id="duplicates">Duplicate rate per producer and hour</h2>
<p class="note">{raw} raw rows, {keys} distinct keys; {alerts} producer-hours over the alert threshold. Duplicates never reach the tables (dedup counts each event once); the rate shows producer resends and replays.</p>
{dup_chart}
<h2 id="late">Late arrivals per event day</h2>
<p class="note">{late_total} late events: events that arrived after their partition's first publish, counted into it exactly.</p>
{late_chart}
<h2 id="versions">Partition versions over time</h2>
<p class="note">Cumulative partition versions published, per table, at each audit-ledger entry ({entries} entries: {runs}).</p>
{versions_chart}
</body></html>
"#,
        range = escape(&range_text),
        generated_at = escape(generated_at),
        raw = duplicates.raw_rows,
        keys = duplicates.distinct_keys,
        entries = ledger.entries().len(),
        runs = escape(&runs_text.join(", ")),
    );
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_at_most_eight_x_ticks() {
        for n in [1usize, 2, 8, 9, 15, 19, 100, 1000] {
            let series = [Series {
                name: "s".to_string(),
                points: (0..n).map(|x| (x as f64, 1.0)).collect(),
            }];
            let svg = chart(&series, &|x| format!("t{x}"), &|y| format!("{y}"), false);
            let ticks = svg.matches(r#"font-size="10""#).count();
            assert!((1..=8).contains(&ticks), "{n} points: {ticks} ticks");
            if n <= 8 {
                assert_eq!(ticks, n, "{n} points: each gets a tick");
            }
        }
    }
}
