"""DuckDB baseline for examples/throughput.rs: the same job as `adsmetrics ingest`, end to end.

Parquet in, Parquet out, on 2 threads:
  1. read every `<data>/**/*.parquet` (without Hive partition columns: the input's dt=/hr= folders
     are delivery hours, and the files carry their own producer), drop invalid rows (the rules the adsmetrics decoder applies
     to typed Parquet rows: known event type, two-letter upper-case country, non-negative amounts);
  2. dedup: key (producer, event_type, event_id), or the whole row content when event_id is null;
     the highest revision wins (ties, which generated data does not have, go to the greatest row);
  3. with --with-raw (the default): write the winners as a raw layer partitioned by event dt
     (adsmetrics writes every accepted event to its raw layer, so this keeps the work comparable);
  4. hourly and daily metrics per (period, advertiser_id, campaign_id, ad_id, country):
     impressions, clicks, conversions, sum of cost and revenue (null as 0), distinct users;
     written as `ads_metrics_hourly` (PARTITION_BY dt, hr) and `ads_metrics_daily` (dt).

Timed: wall clock from connecting to the end of the last COPY (counting the input rows, from the
Parquet footers, is not timed). Rows per second are raw input rows, the same denominator as the
adsmetrics lines. Prints one line per setting:
  duckdb threads=2 with_raw=1 raw_rows=R seconds=S raw_rows_per_s=X winners=W hourly_rows=H daily_rows=D

`--both` runs the setting without the raw layer too (a fresh connection and output directory).

The steps are importable (`connect`, `create_winners`, `copy_tables`, `run`) so that
examples/compare_peers.py runs this very SQL as its DuckDB peer, also over a chosen list of input
folders and restricted to chosen event days (its correction recompute).
"""
import argparse
import os
import shutil
import time

import duckdb

VALID = """
  event_type IN ('impression', 'click', 'conversion')
  AND regexp_full_match(country, '[A-Z]{2}')
  AND coalesce(cost_micros, 0) >= 0 AND coalesce(revenue_micros, 0) >= 0
"""

WINNERS = """
CREATE TEMP TABLE winners AS
WITH src AS (
  SELECT *,
         coalesce(event_id, concat_ws('|', event_type, epoch_us(event_time), ad_id, campaign_id,
                  advertiser_id, country, user_id, ip, cost_micros, revenue_micros, producer,
                  revision)) AS k
  FROM read_parquet({source}, hive_partitioning = false)
  WHERE {valid}
), deduped AS (
  SELECT * EXCLUDE (k),
         strftime(event_time::TIMESTAMP, '%Y-%m-%d') AS dt,
         strftime(event_time::TIMESTAMP, '%H') AS hr
  FROM src
  QUALIFY row_number() OVER (
    PARTITION BY producer, event_type, k
    ORDER BY revision DESC, cost_micros DESC, revenue_micros DESC) = 1
)
SELECT * FROM deduped {where_days}
"""

METRICS = """
SELECT {period_cols}, advertiser_id, campaign_id, ad_id, country,
       count(*) FILTER (WHERE event_type = 'impression') AS impressions,
       count(*) FILTER (WHERE event_type = 'click') AS clicks,
       count(*) FILTER (WHERE event_type = 'conversion') AS conversions,
       coalesce(sum(cost_micros), 0)::BIGINT AS cost_micros,
       coalesce(sum(revenue_micros), 0)::BIGINT AS revenue_micros,
       count(DISTINCT user_id) AS unique_users
FROM winners
GROUP BY ALL
"""

HOURLY_COLS = "date_trunc('hour', event_time::TIMESTAMP) AS event_hour, " \
              "event_time::TIMESTAMP::DATE AS event_date, dt, hr"
DAILY_COLS = "event_time::TIMESTAMP::DATE AS event_date, dt"


def parquet_source(inputs):
    """The read_parquet argument for input folders (walked) and files: a DuckDB list literal."""
    globs = [os.path.join(p, "**/*.parquet") if os.path.isdir(p) else p for p in inputs]
    return "[" + ", ".join("'" + g.replace("'", "''") + "'" for g in globs) + "]"


def connect(threads):
    """A fresh in-memory connection on `threads` threads, in UTC."""
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET preserve_insertion_order = false")
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:
        pass  # without ICU, TIMESTAMPTZ casts are UTC anyway
    return con


def create_winners(con, inputs, days=None):
    """Creates the temp table `winners`: the valid rows of `inputs`, deduplicated.

    With `days` (event dates, YYYY-MM-DD), only the winners of those days are kept; the dedup
    itself runs over every input row, so a key whose versions are all in `inputs` gets its
    right winner whatever day the rows were delivered on.
    """
    where_days = ""
    if days is not None:
        where_days = "WHERE dt IN (" + ", ".join(f"'{d}'" for d in sorted(days)) + ")"
    con.execute(WINNERS.format(source=parquet_source(inputs), valid=VALID, where_days=where_days))


def copy_tables(con, out):
    """Writes `ads_metrics_hourly` (dt, hr) and `ads_metrics_daily` (dt) under `out` from
    `winners`; returns their row counts."""
    hourly = con.execute(
        f"COPY ({METRICS.format(period_cols=HOURLY_COLS)}) TO '{out}/ads_metrics_hourly' "
        "(FORMAT parquet, PARTITION_BY (dt, hr))").fetchone()[0]
    daily = con.execute(
        f"COPY ({METRICS.format(period_cols=DAILY_COLS)}) TO '{out}/ads_metrics_daily' "
        "(FORMAT parquet, PARTITION_BY (dt))").fetchone()[0]
    return hourly, daily


def copy_raw(con, out):
    """Writes the raw layer under `out/raw`: every row of `winners`, partitioned by event day."""
    con.execute(f"COPY winners TO '{out}/raw' (FORMAT parquet, PARTITION_BY (dt))")


def run(data, out, threads, with_raw):
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    started = time.perf_counter()
    con = connect(threads)
    create_winners(con, [data])
    if with_raw:
        copy_raw(con, out)
    hourly, daily = copy_tables(con, out)
    seconds = time.perf_counter() - started
    winners = con.execute("SELECT count(*) FROM winners").fetchone()[0]
    con.close()
    return seconds, winners, hourly, daily


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="input directory (Parquet files, any depth)")
    p.add_argument("--out", required=True, help="output directory (replaced)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--with-raw", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the deduplicated events as a raw layer (default: yes)")
    p.add_argument("--both", action="store_true",
                   help="run with and then without the raw layer, one line each")
    args = p.parse_args()

    data = os.path.abspath(args.data)
    raw_rows = duckdb.connect().execute(
        f"SELECT sum(num_rows) FROM (SELECT DISTINCT file_name, num_rows "
        f"FROM parquet_file_metadata('{data}/**/*.parquet'))").fetchone()[0]
    settings = [True, False] if args.both else [args.with_raw]
    for with_raw in settings:
        out = os.path.join(os.path.abspath(args.out), "with_raw" if with_raw else "without_raw")
        seconds, winners, hourly, daily = run(data, out, args.threads, with_raw)
        print(f"duckdb threads={args.threads} with_raw={int(with_raw)} raw_rows={raw_rows} "
              f"seconds={seconds:.3f} raw_rows_per_s={raw_rows / seconds:.0f} winners={winners} "
              f"hourly_rows={hourly} daily_rows={daily}", flush=True)


if __name__ == "__main__":
    main()
