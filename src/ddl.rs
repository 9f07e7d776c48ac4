//! `adsmetrics ddl`: Hive/Trino DDL for the curated tables.

use adsmetrics_dataflows::Grain;
use arrow::datatypes::DataType;

use crate::sink::curated::table_schema;
use crate::warehouse::table_name;

fn hive_type(t: &DataType) -> &'static str {
    match t {
        DataType::Int64 => "BIGINT",
        DataType::Utf8 => "STRING",
        DataType::Date32 => "DATE",
        DataType::Timestamp(..) => "TIMESTAMP",
        _ => "STRING",
    }
}

/// `CREATE EXTERNAL TABLE … PARTITIONED BY … STORED AS PARQUET` for both tables, located under
/// `location` (the warehouse URI as the engine sees it).
pub fn ddl(location: &str) -> String {
    let location = location.trim_end_matches('/');
    let mut out = String::new();
    for grain in Grain::ALL {
        let name = table_name(grain);
        let schema = table_schema(grain);
        let columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("  {} {}", f.name(), hive_type(f.data_type())))
            .collect();
        let partitions = match grain {
            Grain::Hourly => "dt STRING, hr STRING",
            Grain::Daily => "dt STRING",
        };
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
    }
}
