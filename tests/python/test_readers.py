"""Independent readers: DuckDB and pyarrow read what adsmetrics published, and DuckDB recomputes
the same tables from the input files by a separate code path (SQL), which must agree exactly.

Run through `scripts/test` (it builds the release binary and installs DuckDB/pyarrow in .venv).
"""
import os
import subprocess
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "adsmetrics"


def run(*args, warehouse):
    out = subprocess.run([str(BIN), "--warehouse", str(warehouse), *map(str, args)],
                         check=True, capture_output=True, text=True)
    return out.stdout


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readers")
    data, wh = tmp / "data", tmp / "wh"
    # Parquet input without bad records, so DuckDB can read every input row as-is.
    run("generate", "--out", data, "--events", 60000, "--format", "parquet", "--bad-rate", 0,
        "--ads", 300, "--hours", 30, "--seed", 7, warehouse=wh)
    run("ingest", "--workers", 2, "--quiet", data, warehouse=wh)
    return data, wh


# The same dedup rule in SQL: key (producer, event_type, event_id), or the whole row when the id
# is missing; the highest revision wins. (Generated data has no same-revision conflicts, checked.)
RECOMPUTE = """
WITH src AS (
  SELECT *, coalesce(event_id, concat_ws('|', event_type, epoch_us(event_time), ad_id, campaign_id,
         advertiser_id, country, user_id, ip, cost_micros, revenue_micros, producer, revision)) AS k
  FROM read_parquet('{data}/**/*.parquet', hive_partitioning = false)
), winners AS (
  SELECT DISTINCT ON (producer, event_type, k) * FROM src
  ORDER BY producer, event_type, k, revision DESC
)
SELECT {period} AS period, advertiser_id, campaign_id, ad_id, country,
       count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks,
       count(*) FILTER (WHERE event_type = 'conversion') AS conversions,
       coalesce(sum(cost_micros), 0)::BIGINT AS cost_micros,
       coalesce(sum(revenue_micros), 0)::BIGINT AS revenue_micros,
       count(DISTINCT user_id) AS unique_users
FROM winners GROUP BY ALL
"""


def scalar(rel):
    """The single value of a one-row, one-column relation (DuckDB 2.0 relations keep no result)."""
    return rel.fetchall()[0][0]


def table(con, wh, name, period):
    return con.sql(f"""
      SELECT {period} AS period, advertiser_id, campaign_id, ad_id, country, impressions, clicks,
             conversions, cost_micros, revenue_micros, unique_users
      FROM read_parquet('{wh}/{name}/**/*.parquet', hive_partitioning = true)""")


@pytest.mark.parametrize("name,ours,theirs", [
    ("ads_metrics_hourly", "epoch_us(event_hour)", "epoch_us(date_trunc('hour', event_time))"),
    ("ads_metrics_daily", "event_date", "CAST(event_time AT TIME ZONE 'UTC' AS DATE)"),
])
def test_duckdb_recompute_equals_published(published, name, ours, theirs):
    data, wh = published
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ties = scalar(con.sql(f"""SELECT count(*) FROM (SELECT producer, event_type, event_id FROM
        read_parquet('{data}/**/*.parquet', hive_partitioning = false) WHERE event_id IS NOT NULL
        GROUP BY ALL HAVING count(DISTINCT revision) < count(DISTINCT (cost_micros, revenue_micros, event_time)))"""))
    assert ties == 0, "test data has same-revision conflicts; the SQL rule would be ambiguous"
    expected = con.sql(RECOMPUTE.format(data=data, period=theirs))
    actual = table(con, wh, name, ours)
    n = scalar(actual.count("*"))
    assert n > 1000
    assert scalar(expected.count("*")) == n
    assert scalar(actual.except_(expected).count("*")) == 0
    assert scalar(expected.except_(actual).count("*")) == 0


def test_column_types_and_partition_keys(published):
    _, wh = published
    con = duckdb.connect()
    rel = con.sql(f"SELECT * FROM read_parquet('{wh}/ads_metrics_hourly/**/*.parquet', hive_partitioning = true)")
    types = dict(zip(rel.columns, map(str, rel.types)))
    assert types["event_hour"] == "TIMESTAMP WITH TIME ZONE"
    assert types["event_date"] == "DATE"
    assert "dt" in types and "hr" in types
    # The event_hour column agrees with the dt=/hr= path of its file.
    bad = scalar(con.sql(f"""SELECT count(*) FROM read_parquet('{wh}/ads_metrics_hourly/**/*.parquet', hive_partitioning = true)
        WHERE strftime(event_hour AT TIME ZONE 'UTC', '%Y-%m-%d') <> dt::VARCHAR
           OR lpad(hour(event_hour AT TIME ZONE 'UTC')::VARCHAR, 2, '0') <> lpad(hr::VARCHAR, 2, '0')"""))
    assert bad == 0


def test_pyarrow_reads_the_same_rows_with_versions(published):
    _, wh = published
    for name in ["ads_metrics_hourly", "ads_metrics_daily"]:
        dataset = ds.dataset(wh / name, format="parquet", partitioning="hive")
        rows = dataset.count_rows()
        duck = scalar(duckdb.sql(f"SELECT count(*) FROM read_parquet('{wh}/{name}/**/*.parquet')"))
        assert rows == duck > 0
        for f in dataset.files:
            meta = pq.read_metadata(f).metadata
            assert len(meta[b"adsmetrics.version"]) == 32
            assert Path(f).name == "data.parquet"
    schema = ds.dataset(wh / "ads_metrics_hourly", format="parquet").schema
    assert str(schema.field("event_hour").type) == "timestamp[us, tz=UTC]"


def test_rerun_through_the_cli_changes_nothing(published):
    data, wh = published
    files = sorted(p for p in wh.rglob("*.parquet") if "ads_metrics" in str(p))
    before = [(p, p.stat().st_mtime_ns, p.read_bytes()) for p in files]
    out = run("ingest", "--quiet", data, warehouse=wh)
    assert "nothing new" in out
    after = [(p, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(p for p in wh.rglob("*.parquet") if "ads_metrics" in str(p))]
    assert before == after


def test_checks_pass_and_duckdb_reads_their_dq_results(published):
    import json
    _, wh = published
    # Generated data is weeks old: freshness is given a limit it meets.
    report = json.loads(run("check", "all", "--max-age", "100000d", "--format", "json", warehouse=wh))
    assert report["passed"] is True
    assert [c["check"] for c in report["checks"]] == ["duplicates", "partitions", "reconcile", "freshness"]
    accounting = report["checks"][2]["accounting"]
    assert accounting["balanced"] and accounting["curated_events"] > 0
    rows = duckdb.sql(f"""SELECT "check", passed, findings, dt::VARCHAR, json_extract(report, '$.check')
        FROM read_parquet('{wh}/dq_results/**/*.parquet', hive_partitioning = true)
        ORDER BY "check" """).fetchall()
    assert [r[0] for r in rows] == ["duplicates", "freshness", "partitions", "reconcile"]
    assert all(r[1] is True and r[2] == 0 for r in rows), rows
    assert all(json.loads(r[4]) == r[0] for r in rows), rows
    assert len({r[3] for r in rows}) == 1
