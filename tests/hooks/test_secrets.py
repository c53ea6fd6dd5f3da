"""ClientToken and AccessToken never show: task logs of a failing and a succeeding call, XCom,
``repr()`` and exception texts.

The DAG's tasks print the tokens on purpose: Airflow's secrets masker must turn them into ``***``
in the task logs. On Airflow 3.3 the task runtime already registers the connection password and
extras named like ``*token*`` with the masker; the hook registers both tokens itself as well,
which is what protects them where Airflow does not (checked by renaming the extra field: the
logs then stay clean only thanks to the hook).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from conftest import task_result
from reliability.secrets_scan import run_dag_with_log_files

from airflow_provider_mews.exceptions import MewsAuthenticationError, MewsError
from airflow_provider_mews.hooks.mews import MewsConnectorHook
from airflow_provider_mews.testing import connection_json

GOOD_CLIENT = f"GOODCLIENT{uuid.uuid4().hex.upper()}"
GOOD_ACCESS = f"GOODACCESS{uuid.uuid4().hex.upper()}"
BAD_CLIENT = f"BADCLIENT{uuid.uuid4().hex.upper()}"
BAD_ACCESS = f"BADACCESS{uuid.uuid4().hex.upper()}"
TOKENS = (GOOD_CLIENT, GOOD_ACCESS, BAD_CLIENT, BAD_ACCESS)

DAG_ID = "mews_test_secrets_masked"
DAG_SOURCE = f'''
from datetime import datetime

from airflow.sdk import dag, task

from airflow_provider_mews.hooks.mews import MewsConnectorHook

ITEM = {{"AccountId": "0f2b6a53-5b8e-4c52-a1a4-6e3c2f1d9b70",
        "LoyaltyProgramId": "f701dafb-5765-4cf4-b1dd-1f602a740ae5", "IsPrimary": True}}


@dag(dag_id="{DAG_ID}", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def secrets_dag():
    @task(retries=0)
    def succeeding():
        hook = MewsConnectorHook("mews_secret_good")
        s = hook.settings
        print("GOOD tokens on purpose:", s.access_token, s.client_token)
        hook.log.info("GOOD via the task logger: %s / %s", s.access_token, s.client_token)
        created = hook.add_loyalty_memberships([ITEM])
        print("GOOD created", created[0]["Id"], repr(hook), repr(s))
        return {{"settings": repr(s), "hook": repr(hook), "created": len(created)}}

    @task(retries=0)
    def failing():
        hook = MewsConnectorHook("mews_secret_bad")
        s = hook.settings
        print("BAD tokens on purpose:", s.access_token, s.client_token)
        hook.call("configuration/get")

    succeeding()
    failing()


secrets_dag()
'''


def scan(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*")) if p.is_file())


def test_tokens_are_masked_in_task_logs_and_xcom(run_dag, mews_sandbox, monkeypatch):
    mews_sandbox.add_tokens(GOOD_CLIENT, GOOD_ACCESS)
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_SECRET_GOOD",
        connection_json(mews_sandbox.url, access_token=GOOD_ACCESS, client_token=GOOD_CLIENT),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_SECRET_BAD",
        connection_json(mews_sandbox.url, access_token=BAD_ACCESS, client_token=BAD_CLIENT),
    )
    dr = run_dag_with_log_files(run_dag, DAG_ID, DAG_SOURCE, monkeypatch)

    assert dr.get_task_instance("succeeding").state == "success"
    assert dr.get_task_instance("failing").state == "failed"
    assert mews_sandbox.stats()["stored"] == 1
    assert mews_sandbox.stats()["status:401"] == 1

    logs = scan(Path(os.environ["AIRFLOW_HOME"]) / "logs" / f"dag_id={DAG_ID}")
    # The logs are really there: both calls, the 401's message and the masked tokens.
    assert "GOOD tokens on purpose: *** ***" in logs
    assert "GOOD via the task logger: *** / ***" in logs
    assert "GOOD created" in logs
    assert "BAD tokens on purpose: *** ***" in logs
    assert "HTTP 401: Invalid ClientToken or AccessToken" in logs
    for token in TOKENS:
        assert token not in logs

    xcom = json.dumps(task_result(dr, "succeeding"))
    assert "MewsSettings(base_url=" in xcom
    for token in TOKENS:
        assert token not in xcom


def test_repr_of_hook_and_settings_hide_tokens(mews_conn):
    hook = MewsConnectorHook(mews_conn)
    settings = hook.settings
    assert settings.access_token and settings.client_token
    for text in (repr(hook), repr(settings), str(settings), repr(vars(hook))):
        assert settings.access_token not in text
        assert settings.client_token not in text
    assert "base_url=" in repr(settings)


def test_exception_texts_hide_tokens(mews_sandbox, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MEWS_SECRET_EXC",
        connection_json(mews_sandbox.url, access_token=BAD_ACCESS, client_token=BAD_CLIENT),
    )
    hook = MewsConnectorHook("mews_secret_exc")
    with pytest.raises(MewsAuthenticationError) as info:
        hook.call("configuration/get")
    # A message that repeats a token (an unknown field named like it) is redacted too.
    mews_sandbox.add_tokens(BAD_CLIENT, BAD_ACCESS)
    with pytest.raises(MewsError) as echoed:
        hook.call("loyaltyMemberships/getAll", {BAD_ACCESS: 1, "Limitation": {"Count": 1}})
    assert "unknown field(s) ***" in str(echoed.value)
    for exc in (info.value, echoed.value):
        for text in (str(exc), repr(exc), exc.message, repr(exc.args), repr(exc.details)):
            assert BAD_ACCESS not in text and BAD_CLIENT not in text
