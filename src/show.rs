//! `adsmetrics show`: what is published, read back from the files themselves.

use std::fmt::Write as _;

use adsmetrics_dataflows::{Grain, PartitionId};

use crate::journal::CommitJournal;
use crate::sink::curated::{file_version, read_partition};
use crate::sink::late::{read_lateness, Lateness};
use crate::warehouse::{parse_day, partition_path, table_name, Warehouse};

/// Why `show` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    /// Unknown table, bad date, missing partition.
    #[error("{0}")]
    Usage(String),
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The partition file could not be read.
    #[error("reading {path}: {detail}")]
    Read {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
}

/// Lists a table's partitions (no `dt`), or prints one partition's rows (up to `limit`).
pub fn show(
    warehouse: &Warehouse,
    table: &str,
    dt: Option<&str>,
    hr: Option<u32>,
    limit: usize,
) -> Result<String, ShowError> {
    let grain = crate::warehouse::grain_of_table(table).ok_or_else(|| {
        ShowError::Usage(format!(
            "unknown table {table:?}; tables: {}",
            Grain::ALL.map(table_name).join(", ")
        ))
    })?;
    let journal = CommitJournal::open(warehouse.root(), &warehouse.journal_path())?;
    let lateness = read_lateness(warehouse, journal.consumed()).map_err(|e| ShowError::Read {
        path: e.path,
        detail: e.detail,
    })?;
    let mut out = String::new();
    let Some(dt) = dt else {
        let _ = writeln!(
            out,
            "{:<28} {:>10} {:>10}  {:<27} version",
            "partition", "rows", "late", "last late arrival"
        );
        let mut total = 0u64;
        for (id, p) in journal
            .published()
            .iter()
            .filter(|(id, _)| id.grain == grain)
        {
            let late = lateness.get(id).copied().unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<28} {:>10} {:>10}  {:<27} {}",
                partition_path(id),
                p.rows,
                late.events,
                arrival(&late),
                p.version
            );
            total += p.rows;
        }
        let _ = writeln!(
            out,
            "{} partitions, {} rows",
            journal
                .published()
                .keys()
                .filter(|id| id.grain == grain)
                .count(),
            total
        );
        return Ok(out);
    };
    let day =
        parse_day(dt).ok_or_else(|| ShowError::Usage(format!("--dt {dt:?} is not YYYY-MM-DD")))?;
    let id = match (grain.by_hour(), hr) {
        (true, Some(hr)) if hr < 24 => PartitionId {
            grain,
            period: day * 24 + hr as i64,
        },
        (true, _) => return Err(ShowError::Usage(format!("{table} needs --hr 0..23"))),
        (false, None) if grain == Grain::Weekly => PartitionId {
            grain,
            period: adsmetrics_dataflows::week_of_day(day),
        },
        (false, None) => PartitionId { grain, period: day },
        (false, Some(_)) => return Err(ShowError::Usage(format!("{table} has no --hr"))),
    };
    let path = warehouse.partition_file(&id);
    if !path.exists() {
        return Err(ShowError::Usage(format!(
            "{table}/{} is not published",
            partition_path(&id)
        )));
    }
    let rows = read_partition(&path).map_err(|e| ShowError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let _ = writeln!(
        out,
        "{table}/{}  version {}  {} rows",
        partition_path(&id),
        file_version(&path).unwrap_or_else(|| "?".into()),
        rows.len()
    );
    let late = lateness.get(&id).copied().unwrap_or_default();
    let _ = writeln!(
        out,
        "late arrivals: {} events from {} sources after its first publish; last {}",
        late.events,
        late.sources,
        arrival(&late)
    );
    let _ = writeln!(
        out,
        "{:>13} {:>11} {:>9} {:>7} {:>11} {:>7} {:>11} {:>14} {:>14} {:>12}",
        "advertiser_id",
        "campaign_id",
        "ad_id",
        "country",
        "impressions",
        "clicks",
        "conversions",
        "cost_micros",
        "revenue_micros",
        "unique_users"
    );
    for (d, r) in rows.iter().take(limit) {
        let _ = writeln!(
            out,
            "{:>13} {:>11} {:>9} {:>7} {:>11} {:>7} {:>11} {:>14} {:>14} {:>12}",
            d.advertiser_id,
            d.campaign_id,
            d.ad_id,
            d.country.as_str(),
            r.impressions,
            r.clicks,
            r.conversions,
            r.cost_micros,
            r.revenue_micros,
            r.unique_users
        );
    }
    if rows.len() > limit {
        let _ = writeln!(out, "… {} more rows (--limit)", rows.len() - limit);
    }
    Ok(out)
}

/// When the newest late event of a partition arrived, or `-`.
fn arrival(late: &Lateness) -> String {
    if late.events == 0 {
        return "-".to_string();
    }
    chrono::DateTime::from_timestamp_micros(late.last_arrival_us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| late.last_arrival_us.to_string())
}
