"""Offline testing aids: the local Mews sandbox and its pytest fixtures. Not product code."""

from airflow_provider_mews.testing.sandbox import (
    DEMO_ACCESS_TOKEN,
    DEMO_CLIENT_TOKEN,
    MewsSandbox,
    SandboxConfig,
    SeededProgram,
)

__all__ = [
    "DEMO_ACCESS_TOKEN",
    "DEMO_CLIENT_TOKEN",
    "MewsSandbox",
    "SandboxConfig",
    "SeededProgram",
    "connection_json",
]


def connection_json(
    url: str, access_token: str = DEMO_ACCESS_TOKEN, client_token: str = DEMO_CLIENT_TOKEN, **extra: object
) -> str:
    """An ``AIRFLOW_CONN_...`` value pointing a ``mews`` connection at a sandbox."""
    import json

    return json.dumps(
        {
            "conn_type": "mews",
            "host": url,
            "password": access_token,
            "extra": {"client_token": client_token, "client": "airflow-provider-mews tests", **extra},
        }
    )
