//! `adsmetrics ddl`: Hive/Trino DDL for the curated tables.

use adsmetrics_dataflows::Grain;
use arrow::datatypes::{DataType, SchemaRef};

use crate::sink::curated::table_schema;
use crate::warehouse::table_name;

fn hive_type(t: &DataType) -> &'static str {
    match t {
        DataType::Int32 => "INT",
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => "BIGINT",
        DataType::Binary => "BINARY",
        DataType::Utf8 => "STRING",
        DataType::Date32 => "DATE",
        DataType::Timestamp(..) => "TIMESTAMP",
        _ => "STRING",
    }
}

/// `CREATE EXTERNAL TABLE … PARTITIONED BY … STORED AS PARQUET` for both curated tables and the
/// two side tables (`quarantine` by ingest date, `late_arrivals` by arrival date), located under
/// `location` (the warehouse URI as the engine sees it).
pub fn ddl(location: &str) -> String {
    let location = location.trim_end_matches('/');
    let mut tables: Vec<(&str, SchemaRef, &str)> = Grain::ALL
        .into_iter()
        .map(|grain| {
            let partitions = match grain {
                Grain::Weekly => "week STRING",
                _ if grain.by_hour() => "dt STRING, hr STRING",
                _ => "dt STRING",
            };
            (table_name(grain), table_schema(grain), partitions)
        })
        .collect();
    tables.push(("quarantine", crate::sink::quarantine::schema(), "dt STRING"));
    tables.push((
        crate::sink::late::LATE_ARRIVALS,
        crate::sink::late::schema(),
        "dt STRING",
    ));
    let mut out = String::new();
    for (name, schema, partitions) in tables {
        let columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("  {} {}", f.name(), hive_type(f.data_type())))
            .collect();
        out.push_str(&format!(
            "CREATE EXTERNAL TABLE IF NOT EXISTS {name} (\n{}\n)\nPARTITIONED BY ({partitions})\nSTORED AS PARQUET\nLOCATION '{location}/{name}';\n\
             -- after new partitions appear: MSCK REPAIR TABLE {name};  (Trino: CALL system.sync_partition_metadata('default', '{name}', 'ADD'))\n\n",
            columns.join(",\n")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ddl_names_both_tables_and_partitions() {
        let d = super::ddl("s3://bucket/warehouse/");
        assert!(d.contains("CREATE EXTERNAL TABLE IF NOT EXISTS ads_metrics_hourly"));
        assert!(d.contains("PARTITIONED BY (dt STRING, hr STRING)"));
        assert!(d.contains("LOCATION 's3://bucket/warehouse/ads_metrics_daily'"));
        assert!(d.contains("event_hour TIMESTAMP"));
        assert!(d.contains("event_date DATE"));
        // The side tables too, with no data column named like their `dt` partition.
        assert!(d.contains("LOCATION 's3://bucket/warehouse/late_arrivals'"));
        assert!(d.contains("target_dt STRING"));
        assert!(d.contains("raw BINARY"));
        for table in d.split("CREATE EXTERNAL TABLE").skip(1) {
            let columns = table.split(')').next().unwrap();
            assert!(!columns.contains("\n  dt "), "{table}");
        }
    }
}
