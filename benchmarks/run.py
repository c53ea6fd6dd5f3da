"""The provider against the Mews ceiling and against the loop users would write instead.

``python -m benchmarks.run`` (``make bench``) measures, in one run, side by side:

1. ceiling fraction: rows/s of the operator (``if_exists="add"`` and ``"skip"``) and of the
   naive loop (:mod:`benchmarks.naive`) against a sandbox process that spends ``--latency``
   seconds per add of 1000 and limits to 20 requests per 3 s (Mews's 200 per 30 s, scaled);
2. client CPU per row: 1 000 000 rows through a sandbox with no latency and no limit, CPU
   (user + sys) of the loading process only;
3. memory: peak RSS of the loading process for 100 000 and 1 000 000 rows;
4. many small DAG runs: wall time of one whole ``airflow dags test mews_loyalty_from_sqlite``
   with 1 000 rows (real Airflow CLI, temporary AIRFLOW_HOME);
5. client CPU per row inside Airflow, the way users run it: the CPU of whole ``airflow dags
   test`` runs (every thread, Airflow's share included) of 100 000, 1 000 000 and 10 000 000
   rows minus a 1 000-row run, against a fast Mews stand-in (:mod:`benchmarks.in_airflow`).

Sections 1-3 run the operator's ``execute()`` in a child process with a minimal context
(:mod:`benchmarks.workload`): they measure the provider, not Airflow's task start-up.
The table is printed and written to ``benchmarks/results/latest.json`` and ``latest.md``.
``--smoke`` (``make bench-smoke``, CI) runs every section with a few thousand rows in about
a minute, checks that every row arrived, and writes ``smoke.json``/``smoke.md`` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow_provider_mews.testing import connection_json, sample_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DAG_ID = "mews_loyalty_from_sqlite"
SECTIONS = ("ceiling", "cpu_memory", "dag_runs", "in_airflow")
#: Effectively no limit, on both sides, for the CPU and memory runs.
NO_LIMIT = "1000000000/1"


@dataclass(frozen=True)
class Plan:
    add_rows: int  # ceiling run, operator with if_exists="add"
    skip_rows: int  # ceiling run, operator with if_exists="skip"
    naive_rows: int  # ceiling run, naive loop
    repeats: int  # rounds of the three ceiling runs (medians are quoted)
    small_rows: int  # CPU/memory, small run
    large_rows: int  # CPU/memory, large run
    cpu_repeats: int  # rounds of the small CPU/memory runs (the large one runs once)
    dag_rows: int
    dag_repeats: int
    in_airflow_rows: tuple[int, ...] = (100_000, 1_000_000, 10_000_000)
    in_airflow_base_rows: int = 1000
    in_airflow_base_repeats: int = 2
    in_airflow_repeats: int = 3  # runs per size: the minimum is quoted (least disturbed by the machine)
    latency_s: float = 1.0
    getall_latency_s: float = 0.05
    rate_requests: int = 20
    rate_period_s: float = 3.0


FULL = Plan(
    add_rows=150_000,
    skip_rows=75_000,
    naive_rows=20_000,
    repeats=3,
    small_rows=100_000,
    large_rows=1_000_000,
    cpu_repeats=3,
    dag_rows=1000,
    dag_repeats=3,
)
SMOKE = Plan(
    add_rows=3000,
    skip_rows=3000,
    naive_rows=2000,
    repeats=1,
    small_rows=2000,
    large_rows=5000,
    cpu_repeats=1,
    dag_rows=1000,
    dag_repeats=1,
    in_airflow_rows=(3000,),
    in_airflow_base_repeats=1,
    in_airflow_repeats=1,
)


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the sandbox, as its own process --


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def sandbox(
    workdir: Path,
    latency_s: float = 0.0,
    getall_latency_s: float = 0.0,
    rate: str = "200/30",
    extra: Sequence[str] = (),
) -> Iterator[str]:
    """``python -m airflow_provider_mews.testing.sandbox`` on a free port (``extra``: more flags,
    e.g. seeding); yields its URL."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "airflow_provider_mews.testing.sandbox",
        "--port",
        str(port),
        "--latency",
        str(latency_s),
        "--getall-latency",
        str(getall_latency_s),
        "--rate-limit",
        rate,
        *extra,
    ]
    with open(workdir / "sandbox.log", "ab") as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise BenchmarkError(f"the sandbox did not start: {line!r} (see {workdir / 'sandbox.log'})")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _sandbox_call(url: str, path: str, post: bool = False) -> Any:
    request = urllib.request.Request(
        url + path, data=b"{}" if post else None, method="POST" if post else "GET"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# -- one workload in a child process --


def run_workload(
    kind: str, db: Path, url: str, rows: int, *, if_exists: str = "add", rate: str = NO_LIMIT
) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.workload", kind, "--db", str(db), "--url", url]
    command += ["--rows", str(rows), "--if-exists", if_exists, "--rate", rate]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600, env=_child_env())
    results = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not results:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise BenchmarkError(
            f"{kind} workload ({rows} rows) failed with exit code {proc.returncode}:\n{tail}"
        )
    result: dict[str, Any] = json.loads(results[-1][len("BENCH_RESULT ") :])
    stats = _sandbox_call(url, "/_sandbox/stats")
    result["sandbox_stored"] = stats.get("stored", 0)
    result["sandbox_429"] = stats.get("429", 0)
    result["rows_per_s"] = rows / result["wall_s"]
    result["cpu_us_per_row"] = result["cpu_s"] / rows * 1e6
    if result["summary"].get("added") != rows or result["sandbox_stored"] != rows:
        raise BenchmarkError(
            f"{kind} workload: {rows} rows expected in Mews, the load reported {result['summary']} "
            f"and the sandbox stored {result['sandbox_stored']}"
        )
    return result


def _child_env() -> dict[str, str]:
    env = os.environ.copy()
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    return env


# -- the sections --


def ceiling_section(plan: Plan, db: Path, workdir: Path) -> dict[str, Any]:
    rate = f"{plan.rate_requests}/{plan.rate_period_s:g}"
    add_ceiling = plan.rate_requests * 1000 / plan.rate_period_s
    runs: dict[str, list[dict[str, Any]]] = {"add": [], "skip": [], "naive": []}
    for round_no in range(1, plan.repeats + 1):
        # Interleaved, so that load from other work on the machine spreads over all three.
        for name, kind, if_exists, rows in (
            ("add", "operator", "add", plan.add_rows),
            ("skip", "operator", "skip", plan.skip_rows),
            ("naive", "naive", "add", plan.naive_rows),
        ):
            # A fresh sandbox per run: empty store, empty rate window.
            with sandbox(workdir, plan.latency_s, plan.getall_latency_s, rate) as url:
                result = run_workload(kind, db, url, rows, if_exists=if_exists, rate=rate)
            runs[name].append(result)
            log(
                f"ceiling round {round_no}/{plan.repeats} {name}: {rows} rows in {result['wall_s']:.1f} s "
                f"= {result['rows_per_s']:.0f} rows/s ({result['sandbox_429']} x 429 from the sandbox)"
            )
    medians = {name: statistics.median(r["rows_per_s"] for r in rs) for name, rs in runs.items()}
    ceilings = {"add": add_ceiling, "skip": add_ceiling / 2, "naive": add_ceiling}
    return {
        "latency_s": plan.latency_s,
        "getall_latency_s": plan.getall_latency_s,
        "rate_limit": f"{plan.rate_requests} requests / {plan.rate_period_s:g} s",
        "ceiling_rows_per_s": ceilings,
        "median_rows_per_s": medians,
        "fraction_of_ceiling": {name: medians[name] / ceilings[name] for name in medians},
        "ratio_add_to_naive": medians["add"] / medians["naive"],
        "ratio_add_to_naive_per_round": [
            a["rows_per_s"] / n["rows_per_s"] for a, n in zip(runs["add"], runs["naive"], strict=True)
        ],
        "ratio_skip_to_naive": medians["skip"] / medians["naive"],
        "runs": runs,
    }


#: The servers of the learning limiter's benchmark (issue 21), each counting every request 0-300 ms
#: after it arrived; the connection keeps the default 200 / 30 s and the limiter starts fresh.
#: (name, the sandbox's limit, rows, if_exists values, target fraction of the ceiling)
ADVERSARIAL_COUNT_DELAY_MS = 300.0
ADVERSARIAL_ROWS = 100_000
SERVERS: tuple[tuple[str, str, int, tuple[str, ...], float], ...] = (
    ("Mews's own 200 / 30 s", "200/30", 400_000, ("add",), 0.95),
    ("issue 10's 20 / 3 s", "20/3", ADVERSARIAL_ROWS, ("add", "skip"), 0.90),
)


def simulated(rate: str, rows: int, if_exists: str, seeds: int = 20) -> dict[str, float]:
    """The same run in :mod:`benchmarks.limiter_sim` (a simulated clock): median and worst of ``seeds``."""
    from airflow_provider_mews.operators.loyalty_memberships import DEFAULT_MAX_ACTIVE_REQUESTS
    from airflow_provider_mews.rate_limit.gcra import Params
    from benchmarks.limiter_sim import LearningGcra, simulate

    count, _, period = rate.partition("/")
    runs = [
        simulate(
            LearningGcra(Params(200, 30.0)),
            skip=if_exists == "skip",
            batches=max(1, rows // 1000),
            limit=int(count),
            window_s=float(period),
            count_delay_s=ADVERSARIAL_COUNT_DELAY_MS / 1000,
            workers=DEFAULT_MAX_ACTIVE_REQUESTS,
            seed=seed,
        )
        for seed in range(seeds)
    ]
    return {
        "median": statistics.median(r[0] for r in runs),
        "worst": min(r[0] for r in runs),
        "max_429": max(r[1] for r in runs),
    }


def adversarial_section(
    scale: float, repeats: int, db: Path, workdir: Path, latency_s: float = 1.0
) -> dict[str, Any]:
    """The operator as a new user runs it (connection default 200 / 30 s, a fresh limiter state per
    run) against each of :data:`SERVERS`, with the simulator's figure for the same run beside it."""
    cases: list[dict[str, Any]] = []
    for name, rate, rows, modes, target in SERVERS:
        rows = max(1000, int(rows * scale))
        count, _, period = rate.partition("/")
        add_ceiling = int(count) * 1000 / float(period)
        for if_exists in modes:
            cases.append(
                {
                    "server": name,
                    "rate": rate,
                    "rows": rows,
                    "if_exists": if_exists,
                    "target": target,
                    "ceiling_rows_per_s": add_ceiling / (2 if if_exists == "skip" else 1),
                    "runs": [],
                    "simulated": simulated(rate, rows, if_exists),
                }
            )
    for round_no in range(1, repeats + 1):
        for case in cases:
            rate, rows, if_exists = case["rate"], case["rows"], case["if_exists"]
            state_dir = (
                workdir / f"limiter-{rate.replace('/', '-')}-{if_exists}-{round_no}"
            )  # nothing learned
            os.environ["MEWS_RATE_LIMIT_DIR"] = str(state_dir)
            load = [round(x, 2) for x in os.getloadavg()]
            try:
                with sandbox(workdir, latency_s, 0.05, rate) as url:
                    _sandbox_post(url, "/_sandbox/config", {"count_delay_ms": ADVERSARIAL_COUNT_DELAY_MS})
                    result = run_workload("operator", db, url, rows, if_exists=if_exists, rate="200/30")
            finally:
                os.environ.pop("MEWS_RATE_LIMIT_DIR", None)
            result["load_average"] = load
            result["fraction_of_ceiling"] = result["rows_per_s"] / case["ceiling_rows_per_s"]
            case["runs"].append(result)
            log(
                f"round {round_no}/{repeats}, {case['server']} {if_exists}: {rows} rows in {result['wall_s']:.1f} s "
                f"= {result['rows_per_s']:.0f} rows/s ({result['fraction_of_ceiling']:.3f} of ceiling), "
                f"{result['sandbox_429']} x 429 in {result['summary'].get('requests')} requests, load {load}"
            )
    for case in cases:
        fractions = [r["fraction_of_ceiling"] for r in case["runs"]]
        limited = [r["sandbox_429"] for r in case["runs"]]
        case.update(
            best=max(fractions),
            worst=min(fractions),
            median=statistics.median(fractions),
            max_429=max(limited),
            met=min(fractions) >= case["target"] and max(limited) <= 3,
        )
    return {
        "count_delay_ms": ADVERSARIAL_COUNT_DELAY_MS,
        "add_latency_s": latency_s,
        "connection": "default 200 requests / 30 s",
        "cases": cases,
    }


def _sandbox_post(url: str, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def render_adversarial(section: dict[str, Any]) -> str:
    lines = [
        f"Each server counts every request 0-{section['count_delay_ms']:g} ms after it arrived; an add of 1000 "
        f"takes {section['add_latency_s']:g} s, a getAll 0.05 s; the connection is the {section['connection']}; "
        "a fresh limiter state per run. Fraction of the ceiling (the server's rate: 6 667 rows/s for add, "
        "half that for skip, which reads before it adds) on the wall clock; the simulator "
        "(`benchmarks.limiter_sim`, the same run in a simulated clock, 20 seeds) beside it.",
        "",
        "| server | rows | if_exists | wall clock: best / worst (median) | 429s per run (max) | each run (load) "
        "| simulated: median (worst), max 429s | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in section["cases"]:
        each = "; ".join(
            f"{r['fraction_of_ceiling']:.3f}, {r['sandbox_429']} x 429 / {r['summary'].get('requests')} req "
            f"({r['load_average'][0]:.1f})"
            for r in case["runs"]
        )
        sim = case["simulated"]
        lines.append(
            f"| {case['server']} | {_n(case['rows'])} | {case['if_exists']} | {case['best']:.3f} / "
            f"{case['worst']:.3f} ({case['median']:.3f}) | {case['max_429']} | {each} | "
            f"{sim['median']:.3f} ({sim['worst']:.3f}), {sim['max_429']} | >= {case['target']:.2f}, <= 3 429s | "
            f"{'yes' if case['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def cpu_memory_section(plan: Plan, db: Path, workdir: Path) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"operator": {}, "naive": {}}
    schedule = [plan.small_rows] * plan.cpu_repeats + [plan.large_rows]
    for rows in schedule:
        for kind in ("operator", "naive"):
            with sandbox(workdir, rate=NO_LIMIT) as url:
                result = run_workload(kind, db, url, rows, rate=NO_LIMIT)
            runs[kind].setdefault(str(rows), []).append(result)
            log(
                f"cpu/memory {kind} {rows} rows: {result['cpu_us_per_row']:.1f} us CPU/row, "
                f"peak RSS {result['peak_rss_kb'] / 1024:.0f} MB, {result['wall_s']:.1f} s"
            )

    def median(kind: str, rows: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind][str(rows)])

    out: dict[str, Any] = {"small_rows": plan.small_rows, "large_rows": plan.large_rows, "runs": runs}
    for kind in ("operator", "naive"):
        small_peak = median(kind, plan.small_rows, "peak_rss_kb") / 1024
        large_peak = median(kind, plan.large_rows, "peak_rss_kb") / 1024
        out[kind] = {
            "cpu_us_per_row_large": median(kind, plan.large_rows, "cpu_us_per_row"),
            "cpu_us_per_row_small": median(kind, plan.small_rows, "cpu_us_per_row"),
            "rss_before_mb": median(kind, plan.large_rows, "rss_before_kb") / 1024,
            "peak_rss_small_mb": small_peak,
            "peak_rss_large_mb": large_peak,
            "peak_rss_growth_mb": large_peak - small_peak,
        }
    return out


def dag_runs_section(plan: Plan, workdir: Path) -> dict[str, Any]:
    home = workdir / "airflow_home"
    home.mkdir(exist_ok=True)
    db = workdir / "dag_source.db"
    airflow = str(Path(sys.executable).parent / "airflow")
    env = _child_env()
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags_examples"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_MEWS_DEMO_SQLITE": json.dumps({"conn_type": "sqlite", "host": str(db)}),
        }
    )
    started = time.perf_counter()
    _check_run([airflow, "db", "migrate"], env, "airflow db migrate")
    migrate_s = time.perf_counter() - started
    walls: list[float] = []
    with sandbox(workdir) as url:
        env["AIRFLOW_CONN_MEWS_DEFAULT"] = connection_json(url)
        for run_no in range(1, plan.dag_repeats + 1):
            sample_data.write_sqlite(str(db), plan.dag_rows)
            _sandbox_call(url, "/_sandbox/reset", post=True)
            started = time.perf_counter()
            _check_run([airflow, "dags", "test", DAG_ID], env, f"airflow dags test {DAG_ID}")
            walls.append(time.perf_counter() - started)
            stored = _sandbox_call(url, "/_sandbox/stats").get("stored", 0)
            if stored != plan.dag_rows:
                raise BenchmarkError(
                    f"airflow dags test {DAG_ID}: the sandbox stored {stored} of {plan.dag_rows} rows"
                )
            log(f"dags test {run_no}/{plan.dag_repeats}: {walls[-1]:.1f} s")
    return {
        "rows": plan.dag_rows,
        "median_wall_s": statistics.median(walls),
        "walls_s": walls,
        "db_migrate_s": migrate_s,
    }


def in_airflow_section(plan: Plan, workdir: Path) -> dict[str, Any]:
    from benchmarks.in_airflow import Runner, fast_mews, measure

    home = workdir / "in_airflow"
    home.mkdir(exist_ok=True)
    sizes = list(plan.in_airflow_rows)
    with fast_mews(home) as url:
        runner = Runner(home, url, max([*sizes, plan.in_airflow_base_rows]))
        return measure(
            runner, sizes, plan.in_airflow_base_rows, plan.in_airflow_base_repeats, plan.in_airflow_repeats
        )


def _check_run(command: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise BenchmarkError(
            f"{what} failed with exit code {proc.returncode}:\n{(proc.stderr or proc.stdout)[-3000:]}"
        )


# -- report --


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    mem_gb = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as fh:
        mem_gb = int(fh.readline().split()[1]) / 2**20
    from airflow import __version__ as airflow_version

    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "airflow": airflow_version,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, target: str, met: bool) -> None:
        out.append({"target": name, "value": round(value, 3), "wanted": target, "met": met})

    ceiling = results.get("ceiling")
    if ceiling:
        frac = ceiling["fraction_of_ceiling"]
        add('operator if_exists="add", fraction of ceiling', frac["add"], ">= 0.90", frac["add"] >= 0.9)
        add(
            'operator if_exists="skip", fraction of its ceiling', frac["skip"], ">= 0.90", frac["skip"] >= 0.9
        )
        ratio = ceiling["ratio_add_to_naive"]
        add("operator / naive loop, rows/s", ratio, ">= 5", ratio >= 5)
    cpu = results.get("cpu_memory")
    if cpu:
        op, naive = cpu["operator"]["cpu_us_per_row_large"], cpu["naive"]["cpu_us_per_row_large"]
        add("operator CPU per row (us)", op, "<= 10 (stretch 5)", op <= 10)
        add("operator CPU per row vs naive loop (us)", op - naive, "<= 0", op <= naive)
        growth = cpu["operator"]["peak_rss_growth_mb"]
        add(
            f"operator peak RSS growth {cpu['small_rows']:,} -> {cpu['large_rows']:,} rows (MB)",
            growth,
            "< 50",
            growth < 50,
        )
    inside = results.get("in_airflow")
    if inside:
        from benchmarks.in_airflow import GUARD_GROWTH, GUARD_US_PER_ROW

        per_row = {int(k): v.get("task_us_per_row_min", v["us_per_row"]) for k, v in inside["sizes"].items()}
        worst = max(per_row.values())
        add(
            "in-Airflow task CPU per row, worst size (us; regression guard)",
            worst,
            f"<= {GUARD_US_PER_ROW:g}",
            worst <= GUARD_US_PER_ROW,
        )
        if len(per_row) > 1:
            growth = per_row[max(per_row)] / per_row[min(per_row)] - 1
            add(
                f"in-Airflow task CPU per row, growth {min(per_row):,} -> {max(per_row):,} rows (regression guard)",
                growth,
                f"<= {GUARD_GROWTH:+.2f}",
                growth <= GUARD_GROWTH,
            )
    return out


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}".replace(",", " ")


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    ceiling = results.get("ceiling")
    if ceiling:
        med, frac, ceil = (
            ceiling["median_rows_per_s"],
            ceiling["fraction_of_ceiling"],
            ceiling["ceiling_rows_per_s"],
        )
        rows.append(
            (
                f'Rows/s, `if_exists="add"` (ceiling {_n(ceil["add"])})',
                f"{_n(med['add'])} ({frac['add']:.0%})",
                f"{_n(med['naive'])} ({frac['naive']:.0%})",
                f"{ceiling['ratio_add_to_naive']:.1f}x naive; target >= 90%, >= 5x",
            )
        )
        rows.append(
            (
                f'Rows/s, `if_exists="skip"` (ceiling {_n(ceil["skip"])}: + 1 getAll per 1000)',
                f"{_n(med['skip'])} ({frac['skip']:.0%})",
                "n/a (never checks)",
                f"{ceiling['ratio_skip_to_naive']:.1f}x naive; target >= 90%",
            )
        )
    cpu = results.get("cpu_memory")
    if cpu:
        op, nv = cpu["operator"], cpu["naive"]
        large, small = cpu["large_rows"], cpu["small_rows"]
        rows.append(
            (
                f"Client CPU per row, {_n(large)} rows (us)",
                _n(op["cpu_us_per_row_large"], 1),
                _n(nv["cpu_us_per_row_large"], 1),
                f"{op['cpu_us_per_row_large'] / nv['cpu_us_per_row_large']:.2f}x naive; "
                "target <= 10 and <= naive",
            )
        )
        rows.append(
            (
                f"Client CPU per row, {_n(small)} rows (us)",
                _n(op["cpu_us_per_row_small"], 1),
                _n(nv["cpu_us_per_row_small"], 1),
                f"{op['cpu_us_per_row_small'] / nv['cpu_us_per_row_small']:.2f}x naive",
            )
        )
        for label, key in ((small, "peak_rss_small_mb"), (large, "peak_rss_large_mb")):
            rows.append((f"Peak RSS, {_n(label)} rows (MB)", _n(op[key]), _n(nv[key]), ""))
        rows.append(
            (
                f"Peak RSS growth {_n(small)} -> {_n(large)} rows (MB)",
                _n(op["peak_rss_growth_mb"], 1),
                _n(nv["peak_rss_growth_mb"], 1),
                "target < 50 MB",
            )
        )
    inside = results.get("in_airflow")
    if inside:
        for rows_text, r in inside["sizes"].items():
            rows.append(
                (
                    f"Client CPU per row in Airflow (task start to end, min of {len(r['runs'])}; "
                    "of it the task's thread; Airflow's threads; whole `airflow dags test` minus base, median), "
                    f"{_n(int(rows_text))} rows (us)",
                    "; ".join(
                        _n(r.get(key) or 0, 1)
                        for key in (
                            "task_us_per_row_min",
                            "task_main_thread_us_per_row_min",
                            "task_airflow_threads_us_per_row_min",
                            "us_per_row",
                        )
                    ),
                    "",
                    "guard: <= 12, growth over sizes <= 10%",
                )
            )
    dag = results.get("dag_runs")
    if dag:
        rows.append(
            (
                f"Whole `airflow dags test {DAG_ID}`, {_n(dag['rows'])} rows (s)",
                _n(dag["median_wall_s"], 1),
                "",
                "fixed cost per DAG run",
            )
        )
    return rows


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    plan = results["plan"]
    lines = [
        f"Command: `{results['command']}` ({results['finished_utc']}, {results['duration_s'] / 60:.1f} min).",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']}, Python {m['python']}, "
        f"Airflow {m['airflow']}; load average (1, 5, 15 min) at start {m['load_average_at_start']}, "
        f"at end {m.get('load_average_at_end', 'n/a')}.",
    ]
    if results.get("note"):
        lines.append(f"Note: {results['note']}")
    lines += ["", "| Measure | Operator | Naive loop | Ratio / target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(results)]
    lines.append("")
    lines.append(
        f"Medians of {plan['repeats']} interleaved rounds for rows/s (sandbox process: "
        f"{plan['latency_s']:g} s per add of 1000, getAll {plan['getall_latency_s']:g} s, "
        f"{plan['rate_requests']} requests per {plan['rate_period_s']:g} s; the operator's connection has "
        f"the same limit), median of {plan['cpu_repeats']} runs for the {_n(plan['small_rows'])}-row "
        f"CPU/memory figures and one run of {_n(plan['large_rows'])} rows "
        "(sandbox with no latency and no limit). "
        "CPU and RSS are of the loading process only (not the sandbox's); the operator's `execute()` runs in "
        "a child process with a minimal context, so Airflow's task start-up is not counted there (it is in "
        "the `dags test` row). Ratios come from the same run."
    )
    inside = results.get("in_airflow")
    if inside:
        lines += [
            "",
            "In-Airflow rows: `airflow dags test` of `benchmarks/dags/mews_bench_in_airflow.py` (SQLite "
            'source, batches of 1000, `if_exists="add"`, no outcome tables) against `benchmarks/fast_mews.py` '
            "(own process, no limit; the connection's `rate_limit_requests` lifted). First figure: the task "
            "process's CPU (user + sys, all threads: the request threads and Airflow's in-process execution "
            "API included) from the task's start to its end (pre/post_execute), per row, the minimum of "
            f"{inside.get('repeats', 1)} runs; second: of it the task's own thread (read, normalize, dispatch, "
            "settle); third: Airflow's threads (the execution API serving the checkpoint's writes; the rest "
            "is the request threads); fourth: the whole process's CPU "
            f"minus a {_n(inside['base_rows'])}-row run ({inside['base_cpu_s']:.1f} s: start-up and DAG-run "
            "bookkeeping), divided by the extra rows (median; start-up varies by seconds, so it is loose at 100 000).",
        ]
    ceiling = results.get("ceiling")
    if ceiling:
        rounds = "; ".join(
            f"{name} {', '.join(_n(r['rows_per_s']) for r in runs)} "
            f"({sum(r['sandbox_429'] for r in runs)} x 429)"
            for name, runs in ceiling["runs"].items()
        )
        per_round = ", ".join(f"{x:.1f}x" for x in ceiling["ratio_add_to_naive_per_round"])
        lines += ["", f"Rows/s of each round: {rounds}. Operator/naive per round: {per_round}."]
    if results.get("targets"):
        lines += ["", "| Target | Value | Wanted | Met |", "|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(
                f"| {t['target']} | {t['value']:g} | {t['wanted']} | {'yes' if t['met'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def render_text(results: dict[str, Any]) -> str:
    rows = [("Measure", "Operator", "Naive loop", "Ratio / target"), *table_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    for t in results.get("targets", []):
        out.append(
            f"{'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['value']:g} (wanted {t['wanted']})"
        )
    return "\n".join(out)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces these numbers (without the free-text note)."""
    words = ["python -m benchmarks.run"]
    if args.smoke:
        words.append("--smoke")
    if args.sections != ",".join(SECTIONS):
        words.append(f"--sections {args.sections}")
    if args.repeats:
        words.append(f"--repeats {args.repeats}")
    if args.scale != 1.0:
        words.append(f"--scale {args.scale:g}")
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few thousand rows, about a minute (CI)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--repeats", type=int, help="rounds of the ceiling runs (default 3, smoke 1)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every row count (e.g. 0.2 to try it out)"
    )
    parser.add_argument(
        "--out", type=Path, help="directory for the JSON and markdown (default benchmarks/results)"
    )
    parser.add_argument("--note", default="", help="a line added to the markdown (e.g. what else ran)")
    parser.add_argument(
        "--adversarial",
        action="store_true",
        help="only the learning limiter's runs (issue 21): sandbox 200 req / 30 s (400 000 rows, add) and "
        "20 req / 3 s (issue 10's: 100 000 rows, add and skip), each counting 0-300 ms late; connection "
        "200 / 30 s; rows x --scale; writes adversarial.json/.md",
    )
    args = parser.parse_args(argv)
    if args.adversarial:
        return adversarial_main(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    plan = SMOKE if args.smoke else FULL
    if args.repeats:
        plan = Plan(**{**asdict(plan), "repeats": args.repeats})
    if args.scale != 1.0:
        counts = ("add_rows", "skip_rows", "naive_rows", "small_rows", "large_rows", "dag_rows")
        plan = Plan(**{**asdict(plan), **{k: max(1, int(getattr(plan, k) * args.scale)) for k in counts}})
        scaled = tuple(
            max(plan.in_airflow_base_rows + 1000, int(n * args.scale)) for n in plan.in_airflow_rows
        )
        plan = Plan(**{**asdict(plan), "in_airflow_rows": scaled})
    out_dir = args.out or RESULTS
    # A run of some sections keeps its own file: the full run's figures in latest.* stay.
    name = (
        "smoke"
        if args.smoke
        else "latest"
        if set(sections) == set(SECTIONS)
        else "latest-" + "-".join(sections)
    )

    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": _command(args),
        "machine": machine(),
        "plan": asdict(plan),
        "note": args.note,
    }
    workdir = Path(tempfile.mkdtemp(prefix="mews-bench-"))
    try:
        if "ceiling" in sections or "cpu_memory" in sections:
            biggest = max(plan.add_rows, plan.skip_rows, plan.naive_rows, plan.large_rows)
            log(f"writing {biggest} sample rows to SQLite")
            db = workdir / "members.db"
            sample_data.write_sqlite(str(db), biggest)
            if "ceiling" in sections:
                results["ceiling"] = ceiling_section(plan, db, workdir)
            if "cpu_memory" in sections:
                results["cpu_memory"] = cpu_memory_section(plan, db, workdir)
        if "dag_runs" in sections:
            results["dag_runs"] = dag_runs_section(plan, workdir)
        if "in_airflow" in sections:
            results["in_airflow"] = in_airflow_section(plan, workdir)
    except BenchmarkError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["duration_s"] = time.perf_counter() - started
    results["finished_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # Smoke sizes are far too small for the targets: smoke only proves that every row arrives.
    results["targets"] = [] if args.smoke else targets(results)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(render_markdown(results))
    print(render_text(results))
    if args.smoke:
        print("\nsmoke mode: every load arrived complete; sizes are too small to judge the targets.")
    print(f"\nwritten: {out_dir / (name + '.json')} and {out_dir / (name + '.md')}")
    if "in_airflow" in results and not args.smoke:
        from benchmarks.in_airflow import GUARD_EXIT, guard

        status, lines = guard(results["in_airflow"])
        print("\nIn-Airflow CPU regression guard:\n" + "\n".join(lines), flush=True)
        results["in_airflow"]["guard"] = status
        (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        with open(out_dir / f"{name}.md", "a") as md:
            md.write(
                "\nIn-Airflow CPU regression guard (`benchmarks.in_airflow.guard`):\n\n```\n"
                + "\n".join(lines)
                + "\n```\n"
            )
        return GUARD_EXIT[status]
    return 0


def adversarial_main(args: argparse.Namespace) -> int:
    repeats = args.repeats or 1
    out_dir = args.out or RESULTS
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": _command(args) + " --adversarial",
        "machine": machine(),
        "note": args.note,
    }
    workdir = Path(tempfile.mkdtemp(prefix="mews-bench-"))
    try:
        db = workdir / "members.db"
        sample_data.write_sqlite(str(db), max(max(1000, int(server[2] * args.scale)) for server in SERVERS))
        results["adversarial"] = adversarial_section(args.scale, repeats, db, workdir)
    except BenchmarkError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["duration_s"] = time.perf_counter() - started
    results["finished_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    m = results["machine"]
    text = (
        f"Command: `{results['command']}` ({results['finished_utc']}, {results['duration_s'] / 60:.1f} min). "
        f"Load average at start {m['load_average_at_start']}, at end {m['load_average_at_end']}"
        f"{'; ' + args.note if args.note else ''}.\n\n" + render_adversarial(results["adversarial"])
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adversarial.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "adversarial.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
