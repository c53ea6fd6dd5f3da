"""No token anywhere: task log files, XComs, rendered fields, summaries, result tables, errors.

End to end through Airflow's supervisor (real task log files under ``$AIRFLOW_HOME/logs``)
with distinctive tokens registered in the sandbox, for a run that succeeds with rejected
rows, a run refused with 401, and a run against a server that echoes the request (tokens
included) in its error answers, as some gateways do. Every place is scanned by
``secrets_scan`` for the whole token and any 16-character piece of it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import task_result

from airflow_provider_mews.exceptions import MewsBadRequestError, MewsError, MewsServerError
from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.testing import connection_json
from airflow_provider_mews.testing.sample_data import PROGRAM_ID, write_sqlite
from reliability.secrets_scan import (
    SecretScanner,
    dag_run_texts,
    distinctive_token,
    run_dag_with_log_files,
    task_log_text,
)

CLIENT_TOKEN = distinctive_token("secret-client")
ACCESS_TOKEN = distinctive_token("secret-access")
WRONG_ACCESS_TOKEN = distinctive_token("wrong-access")
ALL_TOKENS = (CLIENT_TOKEN, ACCESS_TOKEN, WRONG_ACCESS_TOKEN)

DAG_TEMPLATE = """
import json
from datetime import timedelta

import pendulum

from airflow.sdk import DAG
from airflow_provider_mews.operators.loyalty_memberships import LoyaltyMembershipAddOperator


def record(context):
    exc = context.get("exception")
    with open({errors!r}, "a") as fh:
        fh.write(json.dumps({{"type": type(exc).__name__, "message": str(exc), "repr": repr(exc)}}) + "\\n")


with DAG(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         params={{"first": 1, "last": {rows}}}):
    LoyaltyMembershipAddOperator(
        task_id="add",
        mews_conn_id={conn_id!r},
        sql_conn_id="rel_secret_src",
        sql="SELECT * FROM loyalty_members "
            "WHERE member_id BETWEEN {{{{ params.first }}}} AND {{{{ params.last }}}} ORDER BY member_id",
        field_map={{"tier_id": "LoyaltyTierId"}},
        batch_size=50,
        max_rejected_rows={max_rejected},
        results_table="rel_secret_results",
        rejections_table="rel_secret_rejections",
        rejections_file={rejections_file!r},
        retries=0,
        on_failure_callback=record,
    )
"""


@pytest.fixture
def scanner() -> SecretScanner:
    return SecretScanner.with_demo_tokens(*ALL_TOKENS)


@pytest.fixture
def source_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "members.db"
    write_sqlite(str(db), 200, invalid=6)
    monkeypatch.setenv("AIRFLOW_CONN_REL_SECRET_SRC", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    return db


def _run(
    run_dag: Any, monkeypatch: Any, tmp_path: Path, dag_id: str, conn_value: str, max_rejected: int
) -> Any:
    monkeypatch.setenv("AIRFLOW_CONN_REL_SECRET_MEWS", conn_value)
    source = DAG_TEMPLATE.format(
        dag_id=dag_id,
        conn_id="rel_secret_mews",
        rows=200,
        max_rejected=max_rejected,
        errors=str(tmp_path / "errors.jsonl"),
        rejections_file=str(tmp_path / "rejections.jsonl"),
    )
    return run_dag_with_log_files(run_dag, dag_id, source, monkeypatch)


def _tables(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        return {
            f"table {t}": conn.execute(f"SELECT * FROM {t}").fetchall()
            for t in ("rel_secret_results", "rel_secret_rejections")
        }


def _files(tmp_path: Path) -> dict[str, str]:
    return {f"file {p.name}": p.read_text() for p in tmp_path.glob("*.jsonl")}


def test_successful_run_with_rejections_leaks_no_token(
    run_dag, mews_sandbox, monkeypatch, tmp_path, source_db, scanner, capfd
):
    mews_sandbox.add_tokens(CLIENT_TOKEN, ACCESS_TOKEN)
    conn_value = connection_json(mews_sandbox.url, access_token=ACCESS_TOKEN, client_token=CLIENT_TOKEN)
    dr = _run(run_dag, monkeypatch, tmp_path, "rel_secret_success", conn_value, max_rejected=10)
    captured = capfd.readouterr()
    assert dr.get_task_instance("add").state == "success"
    summary = task_result(dr, "add", key="mews_summary")
    assert summary["added"] == 194 and summary["rejected"] == 6

    # The places scanned really hold the run: a log file with the summary, the rendered SQL.
    log = task_log_text("rel_secret_success")
    assert "Mews loyalty memberships summary" in log and "rejected: 1 x invalid" in log
    texts = {"summary": summary, **_tables(source_db), **_files(tmp_path)}
    assert len(texts["table rel_secret_rejections"]) == 6
    scanner.assert_clean(dag_run=dr, captured=captured, texts=texts)
    rendered = dag_run_texts(dr)["rendered fields add[-1]"]
    assert "BETWEEN 1 AND 200" in json.dumps(rendered)


def test_refused_tokens_leak_nowhere(run_dag, mews_sandbox, monkeypatch, tmp_path, source_db, scanner, capfd):
    conn_value = connection_json(mews_sandbox.url, access_token=WRONG_ACCESS_TOKEN, client_token=CLIENT_TOKEN)
    dr = _run(run_dag, monkeypatch, tmp_path, "rel_secret_401", conn_value, max_rejected=10)
    captured = capfd.readouterr()
    assert dr.get_task_instance("add").state == "failed"
    assert mews_sandbox.stats()["status:401"] >= 1
    (error,) = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert error["type"] == "AirflowFailException" and "HTTP 401" in error["message"]
    assert "HTTP 401: Invalid ClientToken or AccessToken" in task_log_text("rel_secret_401")
    scanner.assert_clean(
        dag_run=dr,
        captured=captured,
        texts={"exception": error, "summary": task_result(dr, "add", key="mews_summary"), **_files(tmp_path)},
    )


# -- a server that echoes the request, tokens included, in its error answers ----------------------


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.path.endswith("/getAll"):
            status, ctype, data = (
                200,
                "application/json",
                json.dumps({"LoyaltyMemberships": [], "Cursor": None}),
            )
        elif self.server.mode == "json":
            status, ctype = 400, "application/json"
            data = json.dumps(
                {"Message": f"Invalid request {body}", "RequestId": "echo", "Details": {"Body": body}}
            )
        else:
            # A gateway's HTML page whose text is cut by the hook at 200 characters: placed so
            # that the cut falls inside the AccessToken.
            head, tail = "<html><body><h1>502 Bad Gateway</h1><p>", "</p><pre>"
            pad = 180 - len(head) - len(tail) - body.index(self.server.cut_token)
            status, ctype = 502, "text/html"
            data = f"{head}{'x' * max(pad, 1)}{tail}{body}</pre></body></html>"
        raw = data.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def echo_server() -> Any:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    server.mode = "json"  # type: ignore[attr-defined]
    server.cut_token = ACCESS_TOKEN  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


ITEM = {
    "AccountId": "0f2b6a53-5b8e-4c52-a1a4-6e3c2f1d9b70",
    "LoyaltyProgramId": PROGRAM_ID,
    "IsPrimary": True,
}


@pytest.mark.parametrize("mode", ["json", "html"])
def test_errors_echoing_the_request_are_redacted(mode, echo_server, monkeypatch, scanner):
    echo_server.mode = mode
    url = f"http://127.0.0.1:{echo_server.server_address[1]}"
    monkeypatch.setenv(
        "AIRFLOW_CONN_REL_SECRET_ECHO",
        connection_json(url, access_token=ACCESS_TOKEN, client_token=CLIENT_TOKEN),
    )
    hook = MewsConnectorHook("rel_secret_echo")
    expected = MewsBadRequestError if mode == "json" else MewsServerError
    with pytest.raises(expected) as caught:
        hook.add_loyalty_memberships([ITEM])
    exc = caught.value
    assert "***" in exc.message  # the echo is there, its tokens are not
    texts = {"exception": exc, "message": exc.message, "details": exc.details, "request_id": exc.request_id}
    scanner.assert_clean(texts=texts, objects=[hook, hook.settings])


def test_run_against_an_echoing_server_leaks_no_token(
    run_dag, echo_server, monkeypatch, tmp_path, source_db, scanner, capfd
):
    """Every add refused with the request echoed: rows rejected with Mews's reason, minus the tokens."""
    url = f"http://127.0.0.1:{echo_server.server_address[1]}"
    conn_value = connection_json(url, access_token=ACCESS_TOKEN, client_token=CLIENT_TOKEN)
    dr = _run(run_dag, monkeypatch, tmp_path, "rel_secret_echo", conn_value, max_rejected=8)
    captured = capfd.readouterr()
    assert dr.get_task_instance("add").state == "failed"
    summary = task_result(dr, "add", key="mews_summary")
    assert summary["rejected"] > 8
    reasons = [r["reason"] for r in summary["rejected_sample"] if r["field"] is None]
    assert reasons and all("Mews refused it (HTTP 400): Invalid request" in r for r in reasons), json.dumps(
        summary
    )
    (error,) = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    texts = {"exception": error, "summary": summary, **_tables(source_db), **_files(tmp_path)}
    scanner.assert_clean(dag_run=dr, captured=captured, texts=texts)


def test_repr_of_hook_settings_and_connection_show_no_token(mews_sandbox, monkeypatch, scanner):
    """The hook and its validated connection never show a token; Airflow's Connection as logged is masked."""
    from airflow.sdk.log import redact

    mews_sandbox.add_tokens(CLIENT_TOKEN, ACCESS_TOKEN)
    monkeypatch.setenv(
        "AIRFLOW_CONN_REL_SECRET_REPR",
        connection_json(mews_sandbox.url, access_token=ACCESS_TOKEN, client_token=CLIENT_TOKEN),
    )
    hook = MewsConnectorHook("rel_secret_repr")
    settings = hook.settings
    conn = hook.get_connection("rel_secret_repr")
    assert settings.access_token == ACCESS_TOKEN  # the tokens are there, just never shown
    scanner.assert_clean(
        texts={
            "repr(settings)": repr(settings),
            "vars(hook)": repr(vars(hook)),
            "connection as logged": redact(repr(conn)),
            "test_connection": hook.test_connection(),
        },
        objects=[hook, settings],
    )
    with pytest.raises(MewsError) as caught:
        MewsConnectorHook("rel_secret_repr").call("loyaltyMemberships/getAll", {ACCESS_TOKEN: 1})
    scanner.assert_clean(texts={"exception": caught.value, "details": caught.value.details})
