"""Find Mews tokens where they must never appear: logs, XComs, rendered fields, summaries, errors.

Reusable by any test::

    from reliability.secrets_scan import SecretScanner

    scanner = SecretScanner.with_demo_tokens(access_token, client_token)  # plus the test's own tokens
    scanner.assert_clean(dag_run=dr, captured=capfd.readouterr(), texts={"summary": summary}, objects=[hook])

What is scanned:

* task logs: every file under ``$AIRFLOW_HOME/logs`` and the captured stdout/stderr of the test
  (``dag.test()`` runs tasks in-process and writes their log to the console, not to files);
* the run's XComs (every task, key and map index), read from the metadata database;
* the run's rendered template fields (``RenderedTaskInstanceFields``);
* any extra text given (summaries, ``str()``/``repr()`` of exceptions and objects).

A token counts as leaked when it appears whole or when any 16-character piece of it does (a
message cut to a length limit can keep a partial token). Findings name the place and which secret, never
the secret itself, so a failing assertion does not leak it either.
"""

from __future__ import annotations

import json
import os
import secrets as _secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN

#: Length of the token pieces searched for besides whole tokens.
PIECE = 16


def distinctive_token(label: str) -> str:
    """A random token no code could produce by chance (for ``sb.add_tokens``)."""
    return f"{label.upper()}-{_secrets.token_hex(16).upper()}-{_secrets.token_hex(8).upper()}"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    try:
        return json.dumps(value, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


@dataclass
class SecretScanner:
    """Scans texts for named secrets; ``assert_clean`` fails on any finding."""

    secrets: dict[str, str] = field(default_factory=dict)  # name -> secret

    @classmethod
    def with_demo_tokens(cls, *tokens: str) -> SecretScanner:
        """The Mews demo pair plus ``tokens`` (named token1, token2, ...)."""
        named = {"demo ClientToken": DEMO_CLIENT_TOKEN, "demo AccessToken": DEMO_ACCESS_TOKEN}
        named.update({f"token{i + 1}": t for i, t in enumerate(tokens)})
        return cls(named)

    def _needles(self) -> dict[str, list[str]]:
        """Per secret name: the whole secret, then every PIECE-long piece of it (if long enough)."""
        out: dict[str, list[str]] = {}
        for name, secret in self.secrets.items():
            pieces = [secret]
            if len(secret) >= 2 * PIECE:  # any piece of a long token is still distinctive
                pieces += [secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)]
            out[name] = pieces
        return out

    def find(self, texts: Mapping[str, Any]) -> list[str]:
        """``["<place>: <secret name>", ...]`` for every secret found in ``texts`` (place -> value)."""
        needles = self._needles()
        findings = []
        for place, value in texts.items():
            text = _text(value)
            for name, pieces in needles.items():
                if pieces[0] in text:
                    findings.append(f"{place}: {name}")
                elif any(piece in text for piece in pieces[1:]):
                    findings.append(f"{place}: {name} (a {PIECE}-character piece of it)")
        return findings

    def assert_clean(
        self,
        *,
        dag_run: Any = None,
        captured: Any = None,
        texts: Mapping[str, Any] | None = None,
        objects: Iterable[Any] = (),
        logs_dir: str | os.PathLike[str] | None = None,
    ) -> int:
        """Fail if a secret is anywhere given. Returns how many places were scanned (> 0)."""
        places: dict[str, Any] = {}
        places.update(log_file_texts(logs_dir))
        if captured is not None:
            out, err = (captured.out, captured.err) if hasattr(captured, "out") else (captured, "")
            places["captured stdout (task logs)"] = out
            places["captured stderr"] = err
        if dag_run is not None:
            places.update(dag_run_texts(dag_run))
        for name, value in (texts or {}).items():
            places[name] = value
            if isinstance(value, BaseException):
                places[f"repr({name})"] = repr(value)
                places[f"args({name})"] = repr(value.args)
        for i, obj in enumerate(objects):
            places[f"repr(object {i}: {type(obj).__name__})"] = repr(obj)
            places[f"str(object {i}: {type(obj).__name__})"] = str(obj)
        findings = self.find(places)
        assert not findings, "secret(s) leaked: " + "; ".join(findings)
        return len(places)


def log_file_texts(logs_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Every file under ``logs_dir`` (default ``$AIRFLOW_HOME/logs``), by path."""
    if logs_dir is None:
        home = os.environ.get("AIRFLOW_HOME")
        if not home:
            return {}
        logs_dir = Path(home) / "logs"
    out: dict[str, str] = {}
    for path in sorted(Path(logs_dir).rglob("*")):
        if path.is_file():
            out[f"log file {path}"] = path.read_bytes().decode("utf-8", "replace")
    return out


def dag_run_texts(dag_run: Any) -> dict[str, Any]:
    """The XComs and rendered template fields of ``dag_run`` (all its tasks), from the metadata DB."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    out: dict[str, Any] = {}
    with create_session() as session:
        xcoms = (
            session.query(XComModel)
            .filter(XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id)
            .all()
        )
        for x in xcoms:
            out[f"XCom {x.task_id}[{x.map_index}].{x.key}"] = x.value
        rendered = (
            session.query(RenderedTaskInstanceFields)
            .filter(
                RenderedTaskInstanceFields.dag_id == dag_run.dag_id,
                RenderedTaskInstanceFields.run_id == dag_run.run_id,
            )
            .all()
        )
        for r in rendered:
            out[f"rendered fields {r.task_id}[{r.map_index}]"] = r.rendered_fields
            if r.k8s_pod_yaml:
                out[f"rendered k8s yaml {r.task_id}[{r.map_index}]"] = r.k8s_pod_yaml
        for ti in dag_run.get_task_instances(session=session):
            out[f"task instance {ti.task_id}[{ti.map_index}] note/rendered index"] = (
                f"{getattr(ti, 'note', None)} {getattr(ti, 'rendered_map_index', None)}"
            )
    return out


def run_dag_with_log_files(run_dag: Any, dag_id: str, source: str | None, monkeypatch: Any) -> Any:
    """Run a DAG the way a worker does, so task logs are files under ``$AIRFLOW_HOME/logs``.

    ``dag.test()`` alone runs tasks inside the test process and prints their logs; with this
    executor each task runs under Airflow's supervisor (a forked task process, logs written
    by the supervisor through the secrets masker), talking to the execution API in-process.
    """
    from airflow.executors.base_executor import BaseExecutor, ExecutorLoader

    class InlineSupervisorExecutor(BaseExecutor):
        def _process_workloads(self, workload_items: Any) -> None:
            from airflow.sdk.execution_time.supervisor import InProcessTestSupervisor, supervise_task

            for workload in workload_items:
                key = workload.ti.key
                self.queued_tasks.pop(key, None)
                self.running.add(key)
                exit_code = supervise_task(
                    ti=workload.ti,
                    bundle_info=workload.bundle_info,
                    dag_rel_path=workload.dag_rel_path,
                    token=workload.token,
                    client=InProcessTestSupervisor._api_client(),
                    log_path=workload.log_path,
                )
                (self.success if exit_code == 0 else self.fail)(key)

        def end(self) -> None:
            """Every workload already ran to completion."""

        def terminate(self) -> None:
            """Nothing runs in the background."""

    monkeypatch.setattr(
        ExecutorLoader, "get_default_executor", classmethod(lambda cls: InlineSupervisorExecutor())
    )
    return run_dag(dag_id, source, use_executor=True)


def task_log_text(dag_id: str, logs_dir: str | os.PathLike[str] | None = None) -> str:
    """All task log files of ``dag_id`` (to check that the scanned logs are really there)."""
    root = Path(logs_dir) if logs_dir else Path(os.environ["AIRFLOW_HOME"]) / "logs"
    return "\n".join(t for p, t in log_file_texts(root / f"dag_id={dag_id}").items())
