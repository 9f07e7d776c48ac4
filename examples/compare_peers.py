"""adsmetrics against its peers — DuckDB, Spark batch, Spark Structured Streaming — on one input.

Every engine does the same job on the same generated raw input (`adsmetrics generate`, Hive
dt=/hr=/producer= Parquet folders of delivery hours, spread over `--days` days):
  1. drop invalid rows (known event type, two-letter upper-case country, non-negative amounts);
  2. dedup on (producer, event_type, event_id), or on the whole row content when event_id is
     null; the highest revision wins;
  3. `ads_metrics_hourly` and `ads_metrics_daily` per (period, advertiser_id, campaign_id, ad_id,
     country): impressions, clicks, conversions, cost_micros, revenue_micros, unique_users.
The DuckDB peer is the SQL of examples/duckdb_baseline.py (imported, not copied), without its raw
layer; the `duckdb-raw` peer (not run by default) is the same with it: it also writes every
winner under raw/, by event day, as adsmetrics does. Spark batch is the same plan in the DataFrame API on `local[W]`. Spark Structured
Streaming reads the input folders as a file stream, a delivery day per micro-batch
(`maxFilesPerTrigger`), with an event-time watermark of `--lateness` hours (default 6: the
generator delivers late events, resends and corrections at most ~5 hours after their event
hour), deduplicates with a streaming aggregation per (event hour, dedup key) that keeps the
highest revision (`max_by`; `dropDuplicates` would keep the first arrival, not the highest
revision), and aggregates that, chained, per hour and per day (unique users as
`size(collect_set(user_id))`: streaming has no COUNT DISTINCT). Appended windows are final once
the watermark passes them, so after the data a sentinel event far in the future is added to the
stream to close the last windows (it is never emitted itself). The rows the watermark dropped as
too late are counted and printed: zero means the streaming result is exact.

What is timed, per engine, each run as a child process (peak RSS: the child's own `VmHWM`, as
it reports it before it stops: adsmetrics' `memory:` line, DuckDB's child's, for Spark the Python
driver's plus its JVM's — the JVM's heap is `--spark-memory`, and it grows towards it. Not
`wait4`'s `ru_maxrss`, which for a child this script starts counts this script's own resident set
at the fork, hundreds of MB once it has compared tables):
  - the full load into an empty output;
  - a correction of ~1% of the raw rows (`--correction`), spread over every day (or, with
    `--correction-days K`, taken from the newest K delivery days: late events into the newest
    days of 30 days of state, the everyday case): half revised
    versions (revision + 10, changed amount) of sampled events, half new events of the same
    ads and users with new ids, all delivered late in one file of a new delivery day. adsmetrics
    ingests just that file into its warehouse (incremental). Each peer recomputes the days the
    correction touches: it reads those days' delivery folders, the folder of the day after
    (which holds their late deliveries), and the correction, deduplicates, keeps the winners of
    the touched days and rewrites those days' partitions (Spark batch: dynamic partition
    overwrite; DuckDB and the stream: a staging folder whose dt= folders replace the old ones;
    the stream's recompute is a fresh query, its input in one micro-batch, since the
    correction is weeks later than any watermark that keeps state small).
    This is exact because no version of a key is delivered more than a day after its event day
    and a correction does not move an event to another day.
After each phase every peer's two tables are compared with adsmetrics' (read with DuckDB, as
row multisets); any difference is printed and the program exits 1.

Raw rows/s divides the rows of every input Parquet file (from the footers, resends, replays and
bad records included; for the correction, the rows the engine had to read) by the wall time, as
examples/throughput.rs does. The ratios are adsmetrics/peer of wall time and peak RSS.

Not like for like, in the peers' favour: adsmetrics computes four tables (hourly, daily, the
per-minute clicks `ads_clicks_minute` and `ads_metrics_weekly`), writes a raw layer of every
accepted event, a quarantine, a journal and an audit ledger, and publishes atomically; the peers
compute the two tables only (and `duckdb-raw` the raw layer too). Spark's wall time includes starting its JVM (the `in-engine`
column does not).

Set-up and usage (Java 17+ for Spark; peers that are not installed are skipped with a message):
  scripts/setup-python && scripts/setup-spark       # DuckDB, pyarrow; PySpark, into .venv
  cargo build --release --bin adsmetrics
  .venv/bin/python examples/compare_peers.py --events 1000000 --days 30 --workers 2
  .venv/bin/python examples/compare_peers.py --engines adsmetrics,duckdb --events 5000000
The input is generated once under target/compare-peers/<events>x<days>d/ and reused; the
outputs go beside it and are removed at the end unless `--keep`. A run that starts within six
minutes of the removal of an earlier run's outputs (or of its own, left by `--keep`) first waits
out the six minutes (`--settle`): see SETTLE_SECONDS.
"""
import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ["adsmetrics", "duckdb", "duckdb-raw", "spark", "spark-stream"]
DEFAULT_ENGINES = ["adsmetrics", "duckdb", "spark", "spark-stream"]
TABLES = ["ads_metrics_hourly", "ads_metrics_daily"]
DIMS = "advertiser_id, campaign_id, ad_id, country"
SUMS = "impressions, clicks, conversions, cost_micros, revenue_micros, unique_users"
START = "2026-10-01"
# ext4 without a journal (as this project's VM's disk is) skips, when it creates a file, every
# inode freed in the last minute, or in the last six while the inode's table block is dirty (as
# it is again once a file is created beside it): its `recently_deleted` check. Thousands of
# files created just after thousands were deleted nearby then pay a scan past those for each:
# adsmetrics' 30-day load at 5M events (about 7,000 files) took 5.35-5.72 s (system time
# 2.4-3.2 s) right after a removal, 5.02 s (1.68 s) a minute after, and 4.84-5.06 s (0.91-0.95
# s) with nothing removed for minutes. The first engine measured after the last run's outputs
# were removed paid it.
SETTLE_SECONDS = 365


# ---------------------------------------------------------------------------------------------
# The parent: input, children, comparison, table.


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000,
                   help="distinct logical events to generate (the files hold a few %% more rows)")
    p.add_argument("--days", type=int, default=30, help="days of event time (generate --hours)")
    p.add_argument("--workers", "--threads", type=int, default=2, dest="workers",
                   help="adsmetrics workers, DuckDB threads, Spark local[N]")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help="comma-separated subset of " + ",".join(ENGINES))
    p.add_argument("--correction", type=float, default=0.01,
                   help="size of the correction as a fraction of the raw rows (0: none)")
    p.add_argument("--correction-days", type=int, default=0, metavar="K",
                   help="take the correction's rows from the newest K delivery days only (late "
                        "events into the newest days of the state); 0: from every day")
    p.add_argument("--lateness", type=int, default=6,
                   help="the stream's watermark, in hours (at least the data's lateness)")
    p.add_argument("--spark-memory", default="4g", help="spark.driver.memory (local mode heap)")
    p.add_argument("--adsmetrics", help="the adsmetrics binary (default: "
                   "$CARGO_TARGET_DIR or target, release/adsmetrics)")
    p.add_argument("--dir", help="run directory (default target/compare-peers/<events>x<days>d)")
    p.add_argument("--keep", action="store_true", help="keep the warehouse and peer outputs")
    p.add_argument("--settle", type=float, default=SETTLE_SECONDS, metavar="SECONDS",
                   help="before measuring, wait until this long has passed since the last run's "
                        "outputs were removed (default %(default)s: see SETTLE_SECONDS; 0: no wait)")
    p.add_argument("--child", choices=ENGINES[1:], help=argparse.SUPPRESS)
    p.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--only-days", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--files-per-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or "adsmetrics" not in engines:
        p.error(f"--engines: unknown {unknown}" if unknown
                else "--engines must include adsmetrics (the reference the peers are checked against)")
    try:
        import duckdb  # noqa: F401  (the comparison reads every table with DuckDB)
    except ImportError:
        sys.exit("compare_peers: DuckDB is needed to compare the tables: run scripts/setup-python "
                 "and use .venv/bin/python")
    binary = args.adsmetrics or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "adsmetrics")
    if not os.access(binary, os.X_OK):
        sys.exit(f"compare_peers: no adsmetrics binary at {binary}: "
                 "cargo build --release --bin adsmetrics (or --adsmetrics PATH)")
    run_dir = os.path.abspath(args.dir or os.path.join(
        ROOT, "target", "compare-peers", f"{args.events}x{args.days}d"))
    events_dir = os.path.join(run_dir, "events")
    fix_dir = os.path.join(run_dir, "correction")
    out_root = os.path.join(run_dir, "out")

    peers = []
    for engine in engines[1:] if engines[0] == "adsmetrics" else [e for e in engines if e != "adsmetrics"]:
        missing = missing_reason(engine)
        if missing:
            print(f"SKIPPED {engine}: {missing}")
        else:
            peers.append(engine)

    gen_cmd = [binary, "generate", "--out", events_dir, "--events", str(args.events),
               "--hours", str(24 * args.days), "--start", START, "--format", "parquet"]
    machine()
    versions(peers)
    print("commands (the peers' children are this program with hidden --child arguments):")
    print("  " + shlex.join(gen_cmd) + "    # once, reused while events/_COMPLETE exists")
    if not os.path.exists(os.path.join(events_dir, "_COMPLETE")):
        if os.path.exists(run_dir):
            remove_outputs(run_dir, run_dir)
        subprocess.run(gen_cmd, check=True, stdout=subprocess.DEVNULL)
        open(os.path.join(events_dir, "_COMPLETE"), "w").close()
    if os.path.exists(out_root):
        remove_outputs(run_dir, out_root)
    settle(run_dir, args.settle)
    os.makedirs(out_root)
    raw_rows = parquet_rows([events_dir])
    days = sorted(d[3:] for d in os.listdir(events_dir) if d.startswith("dt="))
    files_per_day = max(1, len(parquet_files([events_dir])) // len(days))
    print(f"input: {events_dir}: {raw_rows} raw rows, {len(days)} delivery days "
          f"({days[0]} .. {days[-1]})")

    warehouse = os.path.join(out_root, "adsmetrics")
    results = []

    def measure(phase, engine, cmd, rows, log):
        print("  " + shlex.join(cmd), flush=True)
        r = run_measured(cmd, log)
        r.update(phase=phase, engine=engine, rows=rows)
        if r["status"] != 0:
            print(f"FAILED {engine} ({phase}), exit {r['status']}; its output, {log}:")
            print(tail(log))
            sys.exit(1)
        results.append(r)
        return r

    def peer_cmd(engine, inputs, out, only_days=None, work=None):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", engine,
               "--workers", str(args.workers), "--inputs", *inputs, "--out", out,
               "--lateness", str(args.lateness), "--spark-memory", args.spark_memory]
        if only_days:
            cmd += ["--only-days", ",".join(only_days)]
        if work:
            cmd += ["--work", work]
        if engine == "spark-stream":
            cmd += ["--files-per-batch", str(files_per_day)]
        return cmd

    print("\nfull load:")
    measure("full", "adsmetrics",
            [binary, "--warehouse", warehouse, "ingest", events_dir, "--workers",
             str(args.workers), "--quiet"], raw_rows, os.path.join(out_root, "adsmetrics.full.log"))
    for engine in peers:
        out = os.path.join(out_root, engine)
        measure("full", engine, peer_cmd(engine, [events_dir], out,
                                         work=os.path.join(out_root, engine + ".work")),
                raw_rows, os.path.join(out_root, engine + ".full.log"))
    print_extras(results, "full")
    ok = compare_all(warehouse, out_root, peers, "after the full load")
    before = totals(warehouse)

    if args.correction > 0:
        print("\ncorrection:")
        touched, n = write_correction(events_dir, fix_dir, days, args.correction, raw_rows,
                                      args.correction_days)
        print(f"  # written by this program: {n} rows ({100 * n / raw_rows:.2f}% of the raw rows) "
              f"into {fix_dir}, touching {len(touched)} event days")
        measure("correction", "adsmetrics",
                [binary, "--warehouse", warehouse, "ingest", fix_dir, "--workers",
                 str(args.workers), "--quiet"], n, os.path.join(out_root, "adsmetrics.fix.log"))
        # The touched days' deliveries and the next day's (their late ones), and the correction.
        read = sorted({d for t in touched for d in (t, next_day(t)) if d in days})
        inputs = [os.path.join(events_dir, f"dt={d}") for d in read] + [fix_dir]
        rows = parquet_rows(inputs)
        for engine in peers:
            out = os.path.join(out_root, engine)
            measure("correction", engine,
                    peer_cmd(engine, inputs, out, only_days=touched,
                             work=os.path.join(out_root, engine + ".fix-work")),
                    rows, os.path.join(out_root, engine + ".fix.log"))
        print_extras(results, "correction")
        after = totals(warehouse)
        print("  the correction changed adsmetrics' daily totals by: " + ", ".join(
            f"{k} {after[k] - before[k]:+d}" for k in after))
        ok = compare_all(warehouse, out_root, peers, "after the correction") and ok

    print_table(results)
    if args.keep:
        print(f"kept: {out_root}")
    else:
        remove_outputs(run_dir, out_root, fix_dir)
    if not ok:
        sys.exit(1)


def deleted_marker(run_dir):
    """The file that says when outputs were last removed: beside the run directory, so that runs
    of every input size under the default target/compare-peers/ see each other's."""
    return os.path.join(os.path.dirname(run_dir), ".outputs-removed-at")


def remove_outputs(run_dir, *dirs):
    """Removes `dirs` (the run directory `run_dir` itself, or directories in it) and notes when,
    for `settle` (a note that cannot be written only costs the next run its wait)."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    os.sync()
    try:
        with open(deleted_marker(run_dir), "w") as f:
            f.write(f"{time.time()}\n")
    except OSError as e:
        print(f"note: could not record the removal time ({e})", file=sys.stderr)


def settle(run_dir, seconds):
    """Waits until `seconds` have passed since outputs were last removed (see SETTLE_SECONDS)."""
    try:
        with open(deleted_marker(run_dir)) as f:
            removed_at = float(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    wait = removed_at + seconds - time.time()
    if wait > 0:
        print(f"waiting {wait:.0f} s: outputs were removed {seconds - wait:.0f} s ago, and ext4 "
              "slows the creation of files where many were just deleted (see SETTLE_SECONDS; "
              "--settle 0 does not wait)", flush=True)
        time.sleep(wait)


def missing_reason(engine):
    """Why `engine` cannot run here, or None."""
    if engine.startswith("duckdb"):
        return None if importlib.util.find_spec("duckdb") else \
            "DuckDB not installed (scripts/setup-python, run with .venv/bin/python)"
    if importlib.util.find_spec("pyspark") is None:
        return "PySpark not installed (scripts/setup-spark, run with .venv/bin/python)"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java (Spark needs Java 17+ on PATH or JAVA_HOME)"
    return None


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    print(f"machine: nproc={os.cpu_count()} cpu=\"{cpu}\" mem_gb={mem / 2**20:.1f} "
          f"loadavg=\"{' '.join(open('/proc/loadavg').read().split()[:3])}\"")


def versions(peers):
    import duckdb
    parts = [f"python {sys.version.split()[0]}", f"duckdb {duckdb.__version__}"]
    if any(p.startswith("spark") for p in peers):
        import pyspark
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
        parts += [f"pyspark {pyspark.__version__}", "java " + java.splitlines()[0]]
    print("versions: " + ", ".join(parts))


def next_day(day):
    return (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat()


def parquet_files(inputs):
    files = []
    for path in inputs:
        if os.path.isfile(path):
            files.append(path)
            continue
        for d, _, names in os.walk(path):
            files += [os.path.join(d, n) for n in names if n.endswith(".parquet")]
    return sorted(files)


def parquet_rows(inputs):
    """Rows of every Parquet file under `inputs`, from the footers (throughput.rs' denominator)."""
    import pyarrow.parquet as pq
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(inputs))


def write_correction(events_dir, fix_dir, days, fraction, raw_rows, newest_days=0):
    """Writes ~`fraction` of the raw rows as one late file; returns (touched event days, rows).

    Evenly sampled valid rows with an event id, from every file or, with `newest_days`, from the
    files of the newest `newest_days` event days only (their delivery folders, and the folder
    after them, which holds their late deliveries): alternately a revised version (revision + 10, so it
    beats every generated revision; cost, or revenue for conversions, + 1000) and a new event (id
    `late-<n>`, same ad, user and time).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    if newest_days:
        sources = [os.path.join(events_dir, f"dt={d}") for d in days[-newest_days - 1:]]
    else:
        sources = [events_dir]
    files = parquet_files(sources)
    step = max(1, round(parquet_rows(sources) / max(1, fraction * raw_rows)))
    picked = []
    for f in files:
        t = pq.read_table(f)
        t = t.take(list(range(0, t.num_rows, step)))
        ok = pc.and_(pc.is_valid(t["event_id"]),
                     pc.is_in(t["event_type"], pa.array(["impression", "click", "conversion"])))
        ok = pc.and_(ok, pc.match_substring_regex(t["country"], "^[A-Z]{2}$"))
        ok = pc.and_(ok, pc.greater_equal(pc.fill_null(t["cost_micros"], 0), 0))
        ok = pc.and_(ok, pc.greater_equal(pc.fill_null(t["revenue_micros"], 0), 0))
        picked.append(t.filter(ok))
    rows = pa.concat_tables(picked).to_pylist()
    for i, r in enumerate(rows):
        if i % 2 == 0:
            r["revision"] += 10
            if r["event_type"] == "conversion":
                r["revenue_micros"] = (r["revenue_micros"] or 0) + 1000
            else:
                r["cost_micros"] = (r["cost_micros"] or 0) + 1000
        else:
            r["event_id"] = f"late-{i}"
    table = pa.Table.from_pylist(rows, schema=picked[0].schema)
    shutil.rmtree(fix_dir, ignore_errors=True)
    folder = os.path.join(fix_dir, f"dt={next_day(days[-1])}", "hr=00", "producer=mixed")
    os.makedirs(folder)
    pq.write_table(table, os.path.join(folder, "part-0000.parquet"))
    touched = sorted({r["event_time"].astimezone(dt.timezone.utc).date().isoformat()
                      for r in rows})
    return touched, len(rows)


def run_measured(cmd, log):
    """Runs `cmd` (output to `log`); wall seconds, peak RSS, exit status, `job_seconds=`."""
    with open(log, "w") as out:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
    text = open(log).read()
    def reported(name):
        return next((float(w.split("=", 1)[1]) for w in text.split() if w.startswith(name + "=")),
                    None)
    # Each child reports its own peak (a Spark child its JVM's too): `ru_maxrss` would count this
    # process's resident set at the fork (see the module doc), so it is only the fallback.
    # (adsmetrics' `memory:` line first: with `RUST_LOG=info` its log has a `peak_rss_mb=` per
    # generation.) A child that reported nothing (it failed) shows `ru_maxrss`, flagged.
    adsmetrics_peak = re.search(r"^memory: peak RSS (\d+) MB", text, re.M)
    peak = float(adsmetrics_peak.group(1)) if adsmetrics_peak else reported("peak_rss_mb")
    if peak is None:
        print(f"  (no peak RSS reported by {cmd[0]}: wait4's, which counts this script's)")
        peak = usage.ru_maxrss / 1024
    return {"seconds": seconds, "job_seconds": reported("job_seconds"),
            "status": child.returncode, "log": text, "peak_mb": peak}


def tail(path, n=30):
    return "".join(open(path).readlines()[-n:])


def print_extras(results, phase):
    for r in results:
        if r["phase"] == phase:
            for line in r["log"].splitlines():
                if line.startswith("stream:") or "jvm_peak_rss_mb=" in line:
                    print(f"  {r['engine']} {line}")


def table_sql(root, table):
    """One engine's table as normalised rows (UTC timestamps, BIGINT ids and sums)."""
    period = "event_hour::TIMESTAMP AS period" if table.endswith("hourly") else \
        "event_date::DATE AS period"
    cols = ", ".join(f"{c.strip()}::BIGINT AS {c.strip()}"
                     for c in (DIMS + ", " + SUMS).split(",") if c.strip() != "country")
    return (f"SELECT {period}, country::VARCHAR AS country, {cols} "
            f"FROM read_parquet('{root}/{table}/**/*.parquet', hive_partitioning = false)")


def totals(warehouse):
    """Sums of adsmetrics' daily table, to show that the correction changed something."""
    import duckdb
    names = [c.strip() for c in SUMS.split(",")]
    row = duckdb.connect().execute(
        f"SELECT count(*), {', '.join(f'sum({c})::BIGINT' for c in names)} FROM "
        f"read_parquet('{warehouse}/ads_metrics_daily/**/*.parquet')").fetchone()
    return dict(zip(["rows"] + names, row))


def compare_all(warehouse, out_root, peers, when):
    """Compares every peer's tables with adsmetrics'; prints a summary; True when all equal."""
    import duckdb
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ok = True
    for table in TABLES:
        ref = table_sql(warehouse, table)
        n = con.execute(f"SELECT count(*) FROM ({ref})").fetchone()[0]
        for engine in peers:
            peer = table_sql(os.path.join(out_root, engine), table)
            m = con.execute(f"SELECT count(*) FROM ({peer})").fetchone()[0]
            only_ref = con.execute(f"SELECT * FROM ({ref} EXCEPT ALL {peer}) ORDER BY ALL").fetchall()
            only_peer = con.execute(f"SELECT * FROM ({peer} EXCEPT ALL {ref}) ORDER BY ALL").fetchall()
            if only_ref or only_peer:
                ok = False
                print(f"DIFFERENT {table} {when}: adsmetrics {n} rows, {engine} {m} rows; "
                      f"{len(only_ref)} only in adsmetrics, {len(only_peer)} only in {engine}")
                for label, rows in (("adsmetrics", only_ref), (engine, only_peer)):
                    for row in rows[:5]:
                        print(f"    only in {label}: {row}")
            else:
                print(f"  same rows {when}: {table}, adsmetrics = {engine} ({n} rows)")
    return ok


def print_table(results):
    ads = {r["phase"]: r for r in results if r["engine"] == "adsmetrics"}
    print(f"\n{'phase':<11} {'engine':<13} {'rows read':>11} {'wall s':>8} {'in-engine s':>11} "
          f"{'raw rows/s':>11} {'peak RSS MB':>11} {'time ratio':>10} {'RSS ratio':>9}")
    for r in results:
        a = ads[r["phase"]]
        job = f"{r['job_seconds']:.2f}" if r["job_seconds"] is not None else "-"
        ratio_t = "" if r is a else f"{a['seconds'] / r['seconds']:.3f}"
        ratio_m = "" if r is a else f"{a['peak_mb'] / r['peak_mb']:.2f}"
        print(f"{r['phase']:<11} {r['engine']:<13} {r['rows']:>11} {r['seconds']:>8.2f} {job:>11} "
              f"{r['rows'] / r['seconds']:>11.0f} {r['peak_mb']:>11.0f} {ratio_t:>10} {ratio_m:>9}")
    print("time ratio = adsmetrics wall time / peer wall time (< 1: adsmetrics faster); "
          "RSS ratio = adsmetrics peak RSS / peer peak RSS")


# ---------------------------------------------------------------------------------------------
# The children: one engine, one phase, in its own process. Each prints `job_seconds=`.


def run_child(args):
    only_days = args.only_days.split(",") if args.only_days else None
    if args.child.startswith("duckdb"):
        child_duckdb(args, only_days, with_raw=args.child == "duckdb-raw")
    else:
        child_spark(args, only_days)


def replace_days(staging, out, only_days):
    """Moves each table's dt= folders from `staging` into `out`, replacing the touched days'."""
    for table in TABLES + (["raw"] if os.path.isdir(os.path.join(staging, "raw")) else []):
        for day in only_days:
            shutil.rmtree(os.path.join(out, table, f"dt={day}"), ignore_errors=True)
        src = os.path.join(staging, table)
        for name in os.listdir(src):
            if name.startswith("dt="):
                os.rename(os.path.join(src, name), os.path.join(out, table, name))
    shutil.rmtree(staging)


def child_duckdb(args, only_days, with_raw):
    """DuckDB's job: dedup and both tables; `with_raw` (the `duckdb-raw` peer): also the raw
    layer, every winner by event day, as adsmetrics writes one (like for like but for the two
    extra tables, the quarantine, the journal and the ledger)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import duckdb_baseline
    started = time.perf_counter()
    target = args.out if only_days is None else args.work
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    con = duckdb_baseline.connect(args.workers)
    duckdb_baseline.create_winners(con, args.inputs, only_days)
    if with_raw:
        duckdb_baseline.copy_raw(con, target)
    hourly, daily = duckdb_baseline.copy_tables(con, target)
    con.close()
    if only_days is not None:
        replace_days(target, args.out, only_days)
    print(f"duckdb hourly_rows={hourly} daily_rows={daily} "
          f"job_seconds={time.perf_counter() - started:.3f} peak_rss_mb={peak_rss_mb('self'):.0f}")


def spark_session(args, name):
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master(f"local[{args.workers}]").appName(name)
             .config("spark.driver.memory", args.spark_memory)
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.sql.shuffle.partitions", str(4 * args.workers))
             .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
             .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def keyed(df, F):
    """Valid rows with their dedup key `k` (the event id, or the row's content) and dt/hr."""
    valid = (F.col("event_type").isin("impression", "click", "conversion")
             & F.col("country").rlike("^[A-Z]{2}$")
             & (F.coalesce("cost_micros", F.lit(0)) >= 0)
             & (F.coalesce("revenue_micros", F.lit(0)) >= 0))
    # The same content key as duckdb_baseline.py (concat_ws skips nulls in both).
    content = F.concat_ws("|", "event_type", F.unix_micros("event_time"), "ad_id", "campaign_id",
                          "advertiser_id", "country", "user_id", "ip", "cost_micros",
                          "revenue_micros", "producer", "revision")
    return (df.where(valid)
            .withColumn("k", F.coalesce("event_id", content))
            .withColumn("dt", F.date_format("event_time", "yyyy-MM-dd"))
            .withColumn("hr", F.date_format("event_time", "HH")))


def metrics(df, F, period_cols, group, streaming=False):
    return (df.groupBy(*group, "advertiser_id", "campaign_id", "ad_id", "country")
            .agg(F.count(F.when(F.col("event_type") == "impression", 1)).alias("impressions"),
                 F.count(F.when(F.col("event_type") == "click", 1)).alias("clicks"),
                 F.count(F.when(F.col("event_type") == "conversion", 1)).alias("conversions"),
                 F.coalesce(F.sum("cost_micros"), F.lit(0)).cast("long").alias("cost_micros"),
                 F.coalesce(F.sum("revenue_micros"), F.lit(0)).cast("long").alias("revenue_micros"),
                 # A stream has no COUNT DISTINCT; the set is exact too, and slower in a batch.
                 (F.size(F.collect_set("user_id")) if streaming else F.countDistinct("user_id"))
                 .cast("long").alias("unique_users"))
            .select(*period_cols, "advertiser_id", "campaign_id", "ad_id", "country", "impressions",
                    "clicks", "conversions", "cost_micros", "revenue_micros", "unique_users"))


def child_spark(args, only_days):
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window
    started = time.perf_counter()
    spark = spark_session(args, f"compare_peers {args.child}")
    ready = time.perf_counter()
    if args.child == "spark":
        ev = keyed(spark.read.option("recursiveFileLookup", "true").parquet(*args.inputs), F)
        order = Window.partitionBy("producer", "event_type", "k").orderBy(
            F.col("revision").desc(), F.col("cost_micros").desc_nulls_last(),
            F.col("revenue_micros").desc_nulls_last())
        winners = (ev.withColumn("rn", F.row_number().over(order)).where("rn = 1")
                   .drop("rn", "k"))
        if only_days is not None:
            winners = winners.where(F.col("dt").isin(only_days))
        winners = winners.cache()
        hourly = metrics(winners.withColumn("event_hour", F.date_trunc("hour", "event_time"))
                         .withColumn("event_date", F.to_date("event_time")), F,
                         ["event_hour", "event_date", "dt", "hr"],
                         ["event_hour", "event_date", "dt", "hr"])
        daily = metrics(winners.withColumn("event_date", F.to_date("event_time")), F,
                        ["event_date", "dt"], ["event_date", "dt"])
        mode = "overwrite"
        (hourly.repartition("dt", "hr").write.mode(mode).partitionBy("dt", "hr")
         .parquet(os.path.join(args.out, "ads_metrics_hourly")))
        (daily.repartition("dt").write.mode(mode).partitionBy("dt")
         .parquet(os.path.join(args.out, "ads_metrics_daily")))
    else:
        child_stream(spark, args, only_days, F)
    done = time.perf_counter()
    jvm = peak_rss_mb(spark.sparkContext._gateway.proc.pid)  # the launcher exec'd into java
    spark.stop()
    print(f"{args.child} startup_seconds={ready - started:.3f} job_seconds={done - ready:.3f} "
          f"jvm_peak_rss_mb={jvm:.0f} peak_rss_mb={jvm + peak_rss_mb('self'):.0f}")


def peak_rss_mb(pid):
    """VmHWM of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def child_stream(spark, args, only_days, F):
    """The streaming job: see the module doc. Full load: a delivery day per micro-batch.
    Correction (`only_days`): a fresh query over the touched days' input, one micro-batch."""
    import pyarrow.parquet as pq
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    # The stream's source folder: links to the input folders, and later the sentinel.
    source = os.path.join(work, "source")
    os.makedirs(source)
    for i, path in enumerate(args.inputs):
        for day in sorted(os.listdir(path)) if not os.path.basename(path).startswith("dt=") \
                else [None]:
            target = os.path.join(path, day) if day else path
            if day is None or day.startswith("dt="):
                os.symlink(target, os.path.join(source, f"{i:03}-{os.path.basename(target)}"))
    first = next(f for f in parquet_files(args.inputs))
    schema_table = pq.read_schema(first)
    schema = spark.read.parquet(first).schema
    reader = spark.readStream.schema(schema)
    if only_days is None and args.files_per_batch:
        reader = reader.option("maxFilesPerTrigger", args.files_per_batch)
    raw = reader.parquet(os.path.join(source, "*", "hr=*", "producer=*", "*.parquet"))
    ev = keyed(raw.select(*schema.fieldNames()), F) \
        .withWatermark("event_time", f"{args.lateness} hours")
    cols = [c for c in schema.fieldNames()]
    best = F.max_by(F.struct(*cols), F.struct("revision", F.coalesce("cost_micros", F.lit(-1)),
                                              F.coalesce("revenue_micros", F.lit(-1))))
    winners = (ev.groupBy(F.window("event_time", "1 hour").alias("w"), "producer", "event_type", "k")
               .agg(best.alias("e"))
               .select(F.window_time("w").alias("wt"), "e.*"))
    hourly = metrics(winners, F, [F.col("h.start").alias("event_hour"),
                                  F.to_date("h.start").alias("event_date"),
                                  F.date_format("h.start", "yyyy-MM-dd").alias("dt"),
                                  F.date_format("h.start", "HH").alias("hr")],
                     [F.window("wt", "1 hour").alias("h")], streaming=True)
    daily = metrics(winners, F, [F.to_date("d.start").alias("event_date"),
                                 F.date_format("d.start", "yyyy-MM-dd").alias("dt")],
                    [F.window("wt", "1 day").alias("d")], streaming=True)
    if only_days is not None:
        hourly = hourly.where(F.col("dt").isin(only_days))
        daily = daily.where(F.col("dt").isin(only_days))
    target = args.out if only_days is None else os.path.join(work, "staging")
    if only_days is None:
        shutil.rmtree(args.out, ignore_errors=True)
    queries = {"hourly": (hourly, ["dt", "hr"]), "daily": (daily, ["dt"])}

    def run_all():
        progress = []
        running = []
        for name, (df, parts) in queries.items():
            q = (df.writeStream.format("parquet").outputMode("append").partitionBy(*parts)
                 .option("path", os.path.join(target, f"ads_metrics_{name}"))
                 .option("checkpointLocation", os.path.join(work, "checkpoint", name))
                 .trigger(availableNow=True).queryName(name).start())
            running.append(q)
        for q in running:
            q.awaitTermination()
            progress += q.recentProgress
        return progress

    progress = run_all()
    # Close the last windows: a valid event far past the data moves the watermark past them.
    import pyarrow as pa
    sentinel = os.path.join(source, "zzz-sentinel", "hr=00", "producer=sentinel")
    os.makedirs(sentinel)
    row = {f.name: None for f in schema_table}
    row.update(event_id="sentinel", event_type="impression",
               event_time=dt.datetime(2199, 1, 1, tzinfo=dt.timezone.utc), ad_id=0, campaign_id=0,
               advertiser_id=0, country="ZZ", user_id=0, ip="0.0.0.0", producer="sentinel",
               revision=0)
    pq.write_table(pa.Table.from_pylist([row], schema=schema_table),
                   os.path.join(sentinel, "part-0000.parquet"))
    progress += run_all()
    progress += run_all()  # the no-data batch that emits what the sentinel's watermark closed
    progress = [p if isinstance(p, dict) else json.loads(p.json) for p in progress]
    dropped = sum(op.get("numRowsDroppedByWatermark", 0)
                  for p in progress for op in p.get("stateOperators", []))
    batches = len([p for p in progress if p.get("numInputRows", 0) > 0])
    if only_days is not None:
        replace_days(target, args.out, only_days)
    print(f"stream: {batches} micro-batches with data over both queries, watermark "
          f"{args.lateness}h, rows dropped by the watermark: {dropped}")


if __name__ == "__main__":
    main()
