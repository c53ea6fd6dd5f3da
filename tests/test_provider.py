"""The provider as Airflow sees it: registration, the ``mews`` connection type and its form,
``test_connection`` from the hook and from the real ``airflow connections test`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import AIRFLOW_BIN

from airflow_provider_mews import __version__
from airflow_provider_mews.get_provider_info import get_provider_info
from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.testing import DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN, connection_json

WRONG_ACCESS = "WRONGACCESS0123456789ABCDEF0123456789"


def airflow_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AIRFLOW_BIN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=170,
    )


def test_provider_info_matches_airflow_schema():
    import airflow
    import jsonschema

    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["package-name"] == "airflow-provider-mews"
    assert info["versions"][0] == __version__
    (conn_type,) = info["connection-types"]
    assert conn_type["connection-type"] == MewsConnectorHook.conn_type == "mews"
    assert conn_type["hook-class-name"] == "airflow_provider_mews.hooks.mews.MewsConnectorHook"


def test_airflow_providers_list_shows_the_provider():
    result = airflow_cli("providers", "list", "--output", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    listing = json.loads(result.stdout[result.stdout.index('[{"package_name"') :])
    providers = {p["package_name"]: p for p in listing}
    assert providers["airflow-provider-mews"]["version"] == __version__


def test_providers_manager_knows_the_mews_connection_form():
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    hook = pm.hooks["mews"]
    assert hook is not None
    assert hook.hook_class_name == "airflow_provider_mews.hooks.mews.MewsConnectorHook"
    assert hook.connection_id_attribute_name == "mews_conn_id"
    assert hook.hook_name == "Mews"
    assert hook.connection_testable is True

    widgets = {k: w for k, w in pm.connection_form_widgets.items() if k.startswith("extra__mews__")}
    fields = ("client_token", "client", "chain_id", "timeout")
    fields += ("rate_limit_requests", "rate_limit_period", "rate_limit_redis_conn_id")
    assert set(widgets) == {f"extra__mews__{f}" for f in fields}
    # Typed rate settings, validated by the form (like the SMTP provider's timeout and retry_limit).
    requests_schema = widgets["extra__mews__rate_limit_requests"].field["schema"]
    assert requests_schema["type"] == ["integer", "null"] and requests_schema["minimum"] == 1
    period_schema = widgets["extra__mews__rate_limit_period"].field["schema"]
    assert period_schema["type"] == ["number", "null"] and period_schema["exclusiveMinimum"] == 0
    assert widgets["extra__mews__rate_limit_redis_conn_id"].field["schema"]["type"] == ["string", "null"]
    assert widgets["extra__mews__client_token"].is_sensitive is True
    assert widgets["extra__mews__client_token"].field["schema"]["format"] == "password"
    assert widgets["extra__mews__client_token"].field["schema"]["title"] == "Client token"
    assert not widgets["extra__mews__client"].is_sensitive
    assert all(w.field.get("description") for w in widgets.values())

    behaviour = pm.field_behaviours["mews"]
    assert {"schema", "port", "login"} <= set(behaviour["hidden_fields"])
    assert "host" not in behaviour["hidden_fields"] and "password" not in behaviour["hidden_fields"]
    assert behaviour["relabeling"] == {"host": "Platform address", "password": "Access token"}
    assert "https://api.mews.com" in behaviour["placeholders"]["host"]


def test_hook_test_connection_succeeds_against_the_sandbox(mews_conn, mews_sandbox):
    ok, message = MewsConnectorHook(mews_conn).test_connection()
    assert ok is True
    assert message == (
        f"Connected to Mews at {mews_sandbox.url} enterprise 'Mews Sandbox Hotel' "
        "as client 'airflow-provider-mews tests'."
    )
    assert mews_sandbox.stats()["requests:configuration/get"] == 1


def test_hook_test_connection_fails_clearly_for_a_wrong_token(mews_sandbox, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_WRONG", connection_json(mews_sandbox.url, access_token=WRONG_ACCESS)
    )
    ok, message = MewsConnectorHook("mews_wrong").test_connection()
    assert ok is False
    assert "HTTP 401" in message and "Invalid ClientToken or AccessToken" in message
    assert "Check the connection's AccessToken (password) and extra.client_token" in message
    assert "Airflow connection: 'mews_wrong'." in message
    assert WRONG_ACCESS not in message and DEMO_CLIENT_TOKEN not in message


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        ({"conn_type": "mews", "host": "", "password": "x" * 10}, "host (Platform address) is empty"),
        ({"conn_type": "mews", "host": "https://api.mews-demo.com", "password": "x" * 10}, "client_token"),
    ],
)
def test_hook_test_connection_reports_configuration_errors(conn, expected, monkeypatch, mews_sandbox):
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_HALF", json.dumps(conn))
    ok, message = MewsConnectorHook("mews_half").test_connection()
    assert ok is False and expected in message
    assert mews_sandbox.stats() == {"stored": 0}


def test_airflow_connections_test_cli_both_ways(mews_sandbox):
    """The real CLI (`[core] test_connection = Enabled` comes from conftest), env-var connections."""
    good = airflow_cli(
        "connections", "test", "mews_default", AIRFLOW_CONN_MEWS_DEFAULT=connection_json(mews_sandbox.url)
    )
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    assert "Connection success!" in good.stdout

    bad = airflow_cli(
        "connections",
        "test",
        "mews_default",
        AIRFLOW_CONN_MEWS_DEFAULT=connection_json(mews_sandbox.url, access_token=WRONG_ACCESS),
    )
    assert bad.returncode != 0
    output = " ".join((bad.stdout + bad.stderr).split())  # the CLI wraps long lines
    assert "Connection failed!" in output
    assert "HTTP 401: Invalid ClientToken or AccessToken" in output
    assert "Check the connection's AccessToken (password)" in output
    for token in (WRONG_ACCESS, DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN):
        assert token not in output
    assert mews_sandbox.stats()["requests:configuration/get"] == 2
