"""ads_metrics: the batch path of adsmetrics, one Airflow DAG run per logical day.

Tasks (all BashOperators around the ``adsmetrics`` CLI; ``{{ ds }}`` is the run's logical day):

``backfill``
    ``adsmetrics --run-key ads_metrics/<ds> backfill --source SRC --from <ds> --to <ds> --quiet``:
    makes the curated tables (``ads_metrics_hourly``, ``ads_metrics_daily``) reflect exactly the
    files now below ``SRC/dt=<ds>/`` (replace semantics: unchanged source partitions are skipped
    unread, changed ones replace what they contributed before, removed ones are withdrawn).
``check_reconcile``
    ``adsmetrics --run-key ... check reconcile --from <ds> --to <ds> --format json``: the gate.
    Recomputes the day's curated partitions from the raw layer by a separate code path and
    compares them exactly with what is published. A nonzero exit fails the task (12: the
    tables do not reconcile; 1: the check could not run). The JSON report is the task's log.
``check_partitions``
    ``adsmetrics --run-key ... check partitions --from <ds> --to <ds> --format json``: every
    hour and producer of the day present in the raw layer, every hourly/daily partition it
    calls for published, no publish stuck midway, no staging leftovers (exit 11 otherwise).

``backfill >> check_reconcile >> check_partitions``. The other exit codes of ``adsmetrics
check``: duplicates 10, freshness 13. Every command exits 75 when another writer has held the
warehouse lock longer than ``--lock-wait`` (the CLI's default: 10 minutes), and 86 only in the
retry drill below. Every failure is retried (``retries``), and no exit code skips a task
(``skip_on_exit_code=None``). A check's JSON report, the last line of its stdout, is also the
task's XCom ``return_value``.

Why every task is idempotent, so retries, clears and reruns are safe
--------------------------------------------------------------------
Each table partition is a pure function of the set of distinct source events, so running
``backfill`` again for a day converges to the same tables, byte for byte: a rerun over unchanged
files publishes nothing, and a rerun after a crash (at any point, even between the commit
journal's Prepare and Commit records of a publish) finishes or redoes that publish. The CLI
takes a warehouse writer lock for the run, and at publish it compare-and-swaps each partition's
version (the version it read against the one now current), so a stale or zombie task (one
Airflow believes dead, still running on a lost worker) cannot publish over a newer version: it
fails instead. The checks are read-only on the tables (they append their results to the
``dq_results`` table). Every task of a DAG run, and every try of it, passes the same run key,
``ads_metrics/<ds>``, which the audit ledger (``_adsmetrics/ledger.jsonl``) records on each
entry: a retry shows up there as another run of the same key.

Configuration
-------------
Read by the tasks when they run (environment of the Airflow worker), each overridable per run
by the DAG param of the same role (``airflow dags trigger -c '{"warehouse": "..."}'``):

========================  ====================  ============================================
environment               param                 default
========================  ====================  ============================================
``ADSMETRICS_BIN``        ``adsmetrics_bin``    ``adsmetrics`` (found on ``PATH``)
``ADSMETRICS_WAREHOUSE``  ``warehouse``         ``$AIRFLOW_HOME/adsmetrics/warehouse``
``ADSMETRICS_SOURCE``     ``source``            ``$AIRFLOW_HOME/adsmetrics/events``
========================  ====================  ============================================

Warehouse and source must be absolute paths (a BashOperator runs in a temporary directory).
``backfill`` refuses to run when the source root is missing, or has no ``dt=<ds>`` folder at all
(a missing mount would otherwise withdraw the whole day); set the param ``allow_empty_day`` to
true to withdraw a day on purpose.

Read when the DAG file is parsed (scheduler and DAG processor), since Airflow schedules retries
from the parsed DAG, not from a run's params:

* ``ADSMETRICS_RETRIES`` (default 3): retries of each task.
* ``ADSMETRICS_RETRY_DELAY_SECONDS`` (default 300): delay before the first retry; it doubles
  each further try (``retry_exponential_backoff``), up to
* ``ADSMETRICS_MAX_RETRY_DELAY_SECONDS`` (default 3600).
* ``ADSMETRICS_TASK_TIMEOUT_MINUTES`` (default 360): a task running longer is killed (safe: see
  above) and retried.

Retry drill: the param ``fail_first_try`` (default false). When true, the first try of
``backfill`` (``ti.try_number == 1``) runs with ``ADSMETRICS_FAIL_AT=after-prepare``, which
makes ``adsmetrics`` exit with code 86 right after the commit journal's Prepare record of its
first publish, as if killed mid-publish. Airflow retries the task after the retry delay; the
later tries run without it and finish the publish. ``deploy/airflow/test_ads_metrics_dag.py``
runs this drill and checks that the tables equal those of a single clean run.

Trigger runs with a logical date (the CLI's ``airflow dags trigger ads_metrics -l 2026-11-01``,
or the scheduler's daily runs): the tasks are templated on ``{{ ds }}``.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

DAG_ID = "ads_metrics"
RUN_KEY = DAG_ID + "/{{ ds }}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# Resolves the binary, warehouse and source from the params (passed in as ADSMETRICS_DAG_*,
# so no param value is ever pasted into the script text) or the worker's environment.
_PREAMBLE = r"""set -eu
bin="${ADSMETRICS_DAG_BIN:-${ADSMETRICS_BIN:-adsmetrics}}"
home="${AIRFLOW_HOME:-$HOME/airflow}"
warehouse="${ADSMETRICS_DAG_WAREHOUSE:-${ADSMETRICS_WAREHOUSE:-$home/adsmetrics/warehouse}}"
source="${ADSMETRICS_DAG_SOURCE:-${ADSMETRICS_SOURCE:-$home/adsmetrics/events}}"
case "$warehouse" in /*) ;; *) echo "ads_metrics: the warehouse must be an absolute path, not '$warehouse'" >&2; exit 1 ;; esac
case "$source" in /*) ;; *) echo "ads_metrics: the source must be an absolute path, not '$source'" >&2; exit 1 ;; esac
"""

_BACKFILL = _PREAMBLE + r"""if [ ! -d "$source" ]; then
  echo "ads_metrics: source root '$source' is not a directory" >&2; exit 1
fi
if [ "${ADSMETRICS_DAG_ALLOW_EMPTY_DAY:-False}" != True ] \
   && [ -z "$(find "$source" -type d -name 'dt={{ ds }}' -print -quit)" ]; then
  echo "ads_metrics: no dt={{ ds }} folder below '$source'; refusing to withdraw the day (param allow_empty_day)" >&2
  exit 1
fi
# The retry drill sets ADSMETRICS_FAIL_AT on the first try only; otherwise it is not passed at all.
[ -n "${ADSMETRICS_FAIL_AT:-}" ] || unset ADSMETRICS_FAIL_AT
echo "ads_metrics: try {{ ti.try_number }}, run key {{ params_run_key }}, ADSMETRICS_FAIL_AT=${ADSMETRICS_FAIL_AT:-unset}"
exec "$bin" --run-key "{{ params_run_key }}" --warehouse "$warehouse" \
  backfill --source "$source" --from "{{ ds }}" --to "{{ ds }}" --quiet
"""

_CHECK = _PREAMBLE + r"""exec "$bin" --run-key "{{ params_run_key }}" --warehouse "$warehouse" \
  check {check} --from "{{ ds }}" --to "{{ ds }}" --format json
"""


def _script(template: str) -> str:
    return template.replace("{{ params_run_key }}", RUN_KEY)


_COMMON_ENV = {
    "ADSMETRICS_DAG_BIN": "{{ params.adsmetrics_bin }}",
    "ADSMETRICS_DAG_WAREHOUSE": "{{ params.warehouse }}",
    "ADSMETRICS_DAG_SOURCE": "{{ params.source }}",
}

default_args = {
    "owner": "adsmetrics",
    "retries": _env_int("ADSMETRICS_RETRIES", 3),
    "retry_delay": timedelta(seconds=_env_int("ADSMETRICS_RETRY_DELAY_SECONDS", 300)),
    # Airflow 3.3 takes a multiplier here (True, the older spelling, is read as 2.0): the delay
    # doubles each try.
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(seconds=_env_int("ADSMETRICS_MAX_RETRY_DELAY_SECONDS", 3600)),
    "execution_timeout": timedelta(minutes=_env_int("ADSMETRICS_TASK_TIMEOUT_MINUTES", 360)),
}

with DAG(
    dag_id=DAG_ID,
    description="adsmetrics batch path: backfill one logical day, then reconcile and partition checks",
    doc_md=__doc__,
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # one writer at a time: the CLI's warehouse lock would make others wait or fail
    default_args=default_args,
    tags=["adsmetrics"],
    params={
        "adsmetrics_bin": Param("", type="string",
                                description="adsmetrics binary (empty: $ADSMETRICS_BIN, else `adsmetrics` on PATH)"),
        "warehouse": Param("", type="string",
                           description="absolute warehouse path (empty: $ADSMETRICS_WAREHOUSE, else $AIRFLOW_HOME/adsmetrics/warehouse)"),
        "source": Param("", type="string",
                        description="absolute root of the Hive-style event logs (empty: $ADSMETRICS_SOURCE, else $AIRFLOW_HOME/adsmetrics/events)"),
        "allow_empty_day": Param(False, type="boolean",
                                 description="let backfill withdraw the day when the source has no dt=<ds> folder"),
        "fail_first_try": Param(False, type="boolean",
                                description="retry drill: the first try of backfill exits 86 right after its first "
                                            "publish's Prepare record (ADSMETRICS_FAIL_AT=after-prepare); later tries run normally"),
    },
) as dag:
    backfill = BashOperator(
        task_id="backfill",
        bash_command=_script(_BACKFILL),
        env={
            **_COMMON_ENV,
            "ADSMETRICS_DAG_ALLOW_EMPTY_DAY": "{{ params.allow_empty_day }}",
            "ADSMETRICS_FAIL_AT": "{{ 'after-prepare' if params.fail_first_try and ti.try_number == 1 else '' }}",
        },
        append_env=True,
        skip_on_exit_code=None,
    )
    check_reconcile = BashOperator(
        task_id="check_reconcile",
        bash_command=_script(_CHECK.replace("{check}", "reconcile")),
        env=dict(_COMMON_ENV),
        append_env=True,
        skip_on_exit_code=None,
    )
    check_partitions = BashOperator(
        task_id="check_partitions",
        bash_command=_script(_CHECK.replace("{check}", "partitions")),
        env=dict(_COMMON_ENV),
        append_env=True,
        skip_on_exit_code=None,
    )

    backfill >> check_reconcile >> check_partitions
