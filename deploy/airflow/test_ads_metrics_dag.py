"""End to end: the ads_metrics DAG under real Apache Airflow 3, driving the real adsmetrics binary.

One DAG run for logical day 2026-11-01 with the retry drill on (``fail_first_try``): the first
try of ``backfill`` exits 86 right after its first publish's Prepare record, Airflow itself puts
it up for retry and runs it again after the (exponential) retry delay, and the run then succeeds.
The warehouse must then hold exactly the tables that one clean run of the same backfill writes,
its audit ledger must show one run key for every entry, and the checks must pass. A second DAG
run of the same day must then publish nothing and leave every table file as it was.

``airflow dags test`` runs ``DAG.test()``, which in Airflow 3.3 honours retries: a failed try is
reported ``up_for_retry`` by the execution API (its ``should_retry``), and the loop of
``DAG.test()`` schedules the next try only once the retry delay has passed (the scheduler's own
dependency checks), with a new try number. Nothing here decides to retry but Airflow.

Run: ``scripts/setup-airflow && cargo build --release --bin adsmetrics &&
.venv-airflow/bin/python -m pytest -q deploy/airflow``. Skips (saying why) when Airflow cannot be
imported or the binary is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = ROOT / "target" / "release" / "adsmetrics"
DAY = "2026-11-01"
RUN_KEY = f"ads_metrics/{DAY}"
CURATED = ("ads_metrics_hourly", "ads_metrics_daily")


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of every Airflow command: its own home and sqlite DB, this folder as the
    DAGs folder, nothing inherited from an outer Airflow or adsmetrics configuration."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "ADSMETRICS_", "_AIRFLOW"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(HERE),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONDONTWRITEBYTECODE": "1",  # leave no __pycache__ in the DAGs folder
    })
    env.update(extra)
    return env


def airflow(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, cwd=env["AIRFLOW_HOME"],
                          capture_output=True, text=True, timeout=timeout)


def adsmetrics(*args, warehouse: Path | None = None, check: bool = True, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [str(BIN)] + (["--warehouse", str(warehouse)] if warehouse else []) + [str(a) for a in args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith("ADSMETRICS_")})
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}")
    return out


def file_hashes(root: Path, tops) -> dict[str, str]:
    """sha256 of every file below root/<top> for each top, by path relative to root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in tops for p in sorted((root / top).rglob("*")) if p.is_file()}


def committed_versions(warehouse: Path) -> dict[str, str]:
    """The current version of each partition according to the commit journal: the new_version of
    the last committed Prepare record that touched it."""
    prepares, current = {}, {}
    for line in (warehouse / "_adsmetrics" / "journal.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("record") == "prepare":
            prepares[rec["seq"]] = rec
        elif rec.get("record") == "commit" and rec["seq"] in prepares:
            for p in prepares[rec["seq"]].get("partitions", []):
                current[json.dumps(p["partition"], sort_keys=True)] = p["new_version"]
    return current


def ledger(warehouse: Path) -> list[dict]:
    return [json.loads(line) for line in
            (warehouse / "_adsmetrics" / "ledger.jsonl").read_text().splitlines() if line.strip()]


def sqlite_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace(" ", "T"))


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    """Runs the DAG once with the retry drill; returns the paths and Airflow's output."""
    tmp = tmp_path_factory.mktemp("airflow_dag")
    home, src, wh = tmp / "airflow_home", tmp / "src", tmp / "warehouse"
    home.mkdir()
    if not BIN.is_file():
        pytest.skip(f"{BIN.relative_to(ROOT)} is missing: run `cargo build --release --bin adsmetrics`")
    base = airflow_env(home)
    probe = subprocess.run([sys.executable, "-c",
                            "import airflow.sdk, airflow.providers.standard.operators.bash, airflow.version;"
                            "print(airflow.version.version)"],
                           env=base, cwd=home, capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("Apache Airflow cannot be imported (run scripts/setup-airflow and use "
                    ".venv-airflow/bin/python): " + (probe.stderr.strip().splitlines() or ["?"])[-1])

    adsmetrics("generate", "--out", src, "--events", 20000, "--start", DAY, "--hours", 24, cwd=tmp)

    migrate = airflow("db", "migrate", env=base)
    assert migrate.returncode == 0, f"airflow db migrate failed:\n{migrate.stdout}\n{migrate.stderr}"

    env = airflow_env(home, ADSMETRICS_BIN=str(BIN), ADSMETRICS_WAREHOUSE=str(wh),
                      ADSMETRICS_RETRY_DELAY_SECONDS="1", ADSMETRICS_MAX_RETRY_DELAY_SECONDS="5")
    conf = json.dumps({"fail_first_try": True, "source": str(src)})  # the source by param, the rest by env
    run = airflow("dags", "test", "ads_metrics", DAY, "-c", conf, env=env)
    (tmp / "dags-test.log").write_text(run.stdout + run.stderr)
    entries = ledger(wh) if (wh / "_adsmetrics" / "ledger.jsonl").exists() else []
    return {"tmp": tmp, "home": home, "src": src, "wh": wh, "run": run, "ledger": entries,
            "version": probe.stdout.strip()}


def test_dag_run_succeeds_after_airflow_retries_the_killed_backfill(drill):
    run, log = drill["run"], drill["run"].stdout + drill["run"].stderr
    assert run.returncode == 0, f"airflow dags test failed (exit {run.returncode}):\n{log[-8000:]}"
    assert drill["version"].startswith("3."), drill["version"]

    db = sqlite3.connect(drill["home"] / "airflow.db")
    runs = db.execute("SELECT state, conf FROM dag_run WHERE dag_id = 'ads_metrics'").fetchall()
    assert [r[0] for r in runs] == ["success"], runs
    tis = {task: (state, tries, start) for task, state, tries, start in db.execute(
        "SELECT task_id, state, try_number, start_date FROM task_instance WHERE dag_id = 'ads_metrics'")}
    assert {t: v[:2] for t, v in tis.items()} == {
        "backfill": ("success", 2), "check_reconcile": ("success", 1), "check_partitions": ("success", 1),
    }, tis
    history = db.execute("SELECT task_id, try_number, state, end_date FROM task_instance_history "
                         "WHERE dag_id = 'ads_metrics' ORDER BY task_id, try_number").fetchall()
    assert [h[:3] for h in history] == [("backfill", 1, "failed")], history
    # Airflow waited out the retry delay (1 s here) before the second try.
    waited = (sqlite_time(tis["backfill"][2]) - sqlite_time(history[0][3])).total_seconds()
    assert waited >= 0.99, f"second try started {waited:.2f} s after the first ended"

    # The first try was the drill: exit 86 right after Prepare; the second ran without it.
    assert "returned a non-zero exit code 86" in log, log[-8000:]
    assert f"ads_metrics: try 1, run key {RUN_KEY}, ADSMETRICS_FAIL_AT=after-prepare" in log
    assert f"ads_metrics: try 2, run key {RUN_KEY}, ADSMETRICS_FAIL_AT=unset" in log


def test_tables_equal_a_single_clean_run(drill):
    assert drill["run"].returncode == 0, "the DAG run failed: see the first test"
    wh, tmp = drill["wh"], drill["tmp"]
    fresh = tmp / "fresh_warehouse"
    adsmetrics("backfill", "--source", drill["src"], "--from", DAY, "--to", DAY, "--quiet",
               warehouse=fresh, cwd=tmp)

    ours, theirs = file_hashes(wh, CURATED), file_hashes(fresh, CURATED)
    assert ours and ours == theirs, "curated Parquet files differ from a clean run"
    assert committed_versions(wh) == committed_versions(fresh) != {}
    for table in CURATED:
        assert adsmetrics("show", table, warehouse=wh, cwd=tmp).stdout == \
            adsmetrics("show", table, warehouse=fresh, cwd=tmp).stdout
    # The raw layer too: the retried run landed the same raw files as a clean one.
    assert file_hashes(wh, ["raw"]) == file_hashes(fresh, ["raw"])


def test_ledger_has_one_run_key_and_verifies(drill):
    assert drill["run"].returncode == 0, "the DAG run failed: see the first test"
    wh, tmp = drill["wh"], drill["tmp"]
    entries = drill["ledger"]  # as the DAG run left it
    assert entries, "the DAG wrote no ledger entry"
    assert {e.get("run_key") for e in entries} == {RUN_KEY}, \
        [(e.get("seq"), e.get("kind"), e.get("run_key")) for e in entries]
    # The commit journal names the run key on every publish too.
    journal = [json.loads(line) for line in (wh / "_adsmetrics" / "journal.jsonl").read_text().splitlines()]
    prepares = [r for r in journal if r.get("record") == "prepare"]
    assert prepares and {r.get("run_key") for r in prepares} == {RUN_KEY}, prepares

    verify = adsmetrics("audit", "verify", warehouse=wh, check=False, cwd=tmp)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    reconcile = adsmetrics("check", "reconcile", "--from", DAY, "--to", DAY, "--format", "json",
                           warehouse=wh, check=False, cwd=tmp)
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    report = json.loads(reconcile.stdout)
    assert report["passed"] is True and report["findings"] == [] and report["partitions"] > 0, report


def test_rerun_of_the_day_changes_nothing(drill):
    """A second DAG run of the same day (an operator's clear, or a manual rerun), on copies of the
    Airflow home and the warehouse: it publishes nothing and every table file stays byte-identical."""
    assert drill["run"].returncode == 0, "the DAG run failed: see the first test"
    tmp = drill["tmp"]
    home, wh = tmp / "rerun_airflow_home", tmp / "rerun_warehouse"
    shutil.copytree(drill["home"], home)
    shutil.copytree(drill["wh"], wh)
    before = file_hashes(wh, [*CURATED, "raw"])
    journal_before = (wh / "_adsmetrics" / "journal.jsonl").read_text()

    env = airflow_env(home, ADSMETRICS_BIN=str(BIN), ADSMETRICS_WAREHOUSE=str(wh),
                      ADSMETRICS_SOURCE=str(drill["src"]), ADSMETRICS_RETRY_DELAY_SECONDS="1")
    run = airflow("dags", "test", "ads_metrics", DAY, env=env)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"airflow dags test (rerun) failed (exit {run.returncode}):\n{log[-8000:]}"
    assert "nothing new: no partition published" in log, log[-8000:]
    states = sqlite3.connect(home / "airflow.db").execute(
        "SELECT task_id, state, try_number FROM task_instance WHERE dag_id = 'ads_metrics'").fetchall()
    assert sorted(states) == [("backfill", "success", 1), ("check_partitions", "success", 1),
                              ("check_reconcile", "success", 1)], states

    assert file_hashes(wh, [*CURATED, "raw"]) == before
    assert (wh / "_adsmetrics" / "journal.jsonl").read_text() == journal_before  # no publish
    entries = ledger(wh)
    assert len(entries) == len(drill["ledger"]) + 1 and {e.get("run_key") for e in entries} == {RUN_KEY}
    assert adsmetrics("audit", "verify", warehouse=wh, check=False, cwd=tmp).returncode == 0
