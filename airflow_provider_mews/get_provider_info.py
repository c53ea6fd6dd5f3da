"""What Airflow's providers manager reads: the ``mews`` connection type and its form."""

from __future__ import annotations

from typing import Any

from airflow_provider_mews import __version__

CONN_TYPE = "mews"
HOOK_CLASS = "airflow_provider_mews.hooks.mews.MewsConnectorHook"

#: Standard fields the Mews connection does not use.
HIDDEN_FIELDS = ["schema", "port", "login", "extra"]
RELABELING = {"host": "Platform address", "password": "Access token"}
PLACEHOLDERS = {
    "host": "https://api.mews.com (production) or https://api.mews-demo.com (demo)",
    "password": "AccessToken of the enterprise or portfolio",
    "client_token": "ClientToken of the integration",
    "client": f"airflow-provider-mews {__version__}",
    "chain_id": "UUID, only for Portfolio Access Tokens",
    "timeout": "30",
    "rate_limit_requests": "200",
    "rate_limit_period": "30",
    "rate_limit_redis_conn_id": "redis_default (optional)",
}

#: Extra fields, as the Airflow 3.2+ connection form builds them (JSON schema per field).
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "client_token": {
        "label": "Client token",
        "description": "ClientToken identifying the integration (secret).",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    "client": {
        "label": "Client",
        "description": "Name and version of the client application sent to Mews.",
        "schema": {"type": ["string", "null"]},
    },
    "chain_id": {
        "label": "Chain id",
        "description": "ChainId for Portfolio Access Tokens; leave empty otherwise.",
        "schema": {"type": ["string", "null"]},
    },
    "timeout": {
        "label": "Timeout (seconds)",
        "description": "Seconds one request may take to answer completely; default 30.",
        "schema": {"type": ["number", "null"]},
    },
    "rate_limit_requests": {
        "label": "Rate limit: requests",
        "description": "Requests per AccessToken per rate-limit period (Mews: 200). Workers sharing the "
        "token share this budget; the client sends a tenth of it per tenth of the period, and paces "
        "evenly and slows down after a 429.",
        "schema": {"type": ["integer", "null"], "minimum": 1, "default": 200},
    },
    "rate_limit_period": {
        "label": "Rate limit: period (seconds)",
        "description": "Length of Mews's rate-limit window in seconds (Mews: 30).",
        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": 30},
    },
    "rate_limit_redis_conn_id": {
        "label": "Rate limit: Redis connection id",
        "description": "Optional Airflow connection of type redis where workers on several hosts share "
        "the token's budget (needs airflow-provider-mews[redis]). Empty: shared by the processes of "
        "each host only.",
        "schema": {"type": ["string", "null"]},
    },
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-mews",
        "name": "Mews",
        "description": "Mews Connector API: loyalty memberships and more, from Apache Airflow.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Mews",
                "external-doc-url": "https://mews-systems.gitbook.io/connector-api",
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": "Mews", "python-modules": ["airflow_provider_mews.hooks.mews"]}],
        "operators": [
            {
                "integration-name": "Mews",
                "python-modules": ["airflow_provider_mews.operators.loyalty_memberships"],
            }
        ],
        "transfers": [
            {
                "source-integration-name": "Mews",
                "target-integration-name": "Common SQL",
                "python-module": "airflow_provider_mews.transfers.mews_to_sql",
            }
        ],
        "connection-types": [
            {
                "hook-class-name": HOOK_CLASS,
                "hook-name": "Mews",
                "connection-type": CONN_TYPE,
                "conn-fields": CONN_FIELDS,
                "ui-field-behaviour": {
                    "hidden-fields": HIDDEN_FIELDS,
                    "relabeling": RELABELING,
                    "placeholders": PLACEHOLDERS,
                },
            }
        ],
    }
