"""Pytest fixtures for DAGs that use the Mews provider: a sandbox and a connection to it.

Opt-in, so that installing the provider changes nobody's pytest runs: load it in your
top-level ``conftest.py`` with ::

    pytest_plugins = ["airflow_provider_mews.testing.pytest_plugin"]

then your DAG tests can ask for ``mews_sandbox`` (a running sandbox, emptied for each test)
and ``mews_conn`` (the ``mews_default`` connection pointing at it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_provider_mews.testing import MewsSandbox, connection_json


@pytest.fixture(scope="session")
def _mews_sandbox_server() -> Iterator[MewsSandbox]:
    with MewsSandbox() as sandbox:
        yield sandbox


@pytest.fixture
def mews_sandbox(_mews_sandbox_server: MewsSandbox) -> Iterator[MewsSandbox]:
    """A running sandbox, emptied and with default behaviour for each test."""
    _mews_sandbox_server.reset()
    yield _mews_sandbox_server
    _mews_sandbox_server.reset()


@pytest.fixture
def mews_conn(mews_sandbox: MewsSandbox, monkeypatch: pytest.MonkeyPatch) -> str:
    """Defines the ``mews_default`` connection (env var) pointing at the sandbox; returns its id."""
    monkeypatch.setenv("AIRFLOW_CONN_MEWS_DEFAULT", connection_json(mews_sandbox.url))
    return "mews_default"
