"""The Mews connection: its validated settings, read from an Airflow connection.

Pure (no I/O): :func:`settings_from_connection` turns the connection's host, password and
extra into :class:`MewsSettings`, or raises one error naming the field and the fix.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_mews import __version__
from airflow_provider_mews.exceptions import MewsConfigurationError
from airflow_provider_mews.rate_limit import DEFAULT_MAX_REQUESTS, DEFAULT_PERIOD_S

DEFAULT_CLIENT = f"airflow-provider-mews {__version__}"
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MewsSettings:
    """A validated Mews connection. Tokens are kept out of ``repr``."""

    base_url: str
    access_token: str = field(repr=False)
    client_token: str = field(repr=False)
    client: str = DEFAULT_CLIENT
    chain_id: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    rate_limit_requests: int = DEFAULT_MAX_REQUESTS
    rate_limit_period_s: float = DEFAULT_PERIOD_S
    #: Airflow connection (type redis) where workers on several hosts share the token's pace.
    rate_limit_redis_conn_id: str | None = None


def _setting_error(conn_id: str, what: str) -> MewsConfigurationError:
    return MewsConfigurationError(f"Airflow connection '{conn_id}' (type mews): {what}")


def validate_uuid(value: Any, name: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"{name} must be a UUID like 3fa85f64-5717-4562-b3fc-2c963f66afa6") from None


def settings_from_connection(conn: Any) -> MewsSettings:
    """Validate an Airflow Connection into :class:`MewsSettings` (pure: no I/O)."""
    cid = conn.conn_id or "<unnamed>"
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip()
    if not host:
        raise _setting_error(
            cid,
            "host (Platform address) is empty. Set it to https://api.mews.com for production or "
            "https://api.mews-demo.com for the demo environment.",
        )
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _setting_error(cid, f"host {host!r} must start with https:// (e.g. https://api.mews.com).")
    if parts.path or parts.query or parts.fragment:
        raise _setting_error(
            cid,
            f"host {host!r} must be the platform address only, without a trailing slash or path "
            f"(e.g. {parts.scheme}://{parts.netloc}).",
        )
    if not conn.password:
        raise _setting_error(cid, "password (Access token) is empty; paste the AccessToken there.")
    client_token = extra.get("client_token")
    if not client_token or not isinstance(client_token, str):
        raise _setting_error(cid, "extra.client_token (Client token) is missing; set the ClientToken.")
    client = extra.get("client") or DEFAULT_CLIENT
    if not isinstance(client, str):
        raise _setting_error(cid, "extra.client must be a string such as 'My Sync 1.0'.")
    chain_id = extra.get("chain_id") or None
    if chain_id is not None:
        try:
            chain_id = validate_uuid(chain_id, "extra.chain_id")
        except ValueError as exc:
            raise _setting_error(cid, str(exc)) from None
    timeout = _positive_number(extra.get("timeout"), DEFAULT_TIMEOUT_S, "extra.timeout", cid)
    period = _positive_number(
        extra.get("rate_limit_period"), DEFAULT_PERIOD_S, "extra.rate_limit_period", cid
    )
    max_requests = _positive_number(
        extra.get("rate_limit_requests"), DEFAULT_MAX_REQUESTS, "extra.rate_limit_requests", cid
    )
    if max_requests != int(max_requests):
        raise _setting_error(
            cid,
            f"extra.rate_limit_requests must be a whole number of requests, got {extra['rate_limit_requests']!r}.",
        )
    redis_conn_id = extra.get("rate_limit_redis_conn_id") or None
    if redis_conn_id is not None and (
        not isinstance(redis_conn_id, str) or not _CONN_ID.match(redis_conn_id.strip())
    ):
        raise _setting_error(
            cid,
            f"extra.rate_limit_redis_conn_id must name an Airflow connection of type redis "
            f"(letters, digits, '_', '-', '.'), got {redis_conn_id!r}; leave it empty to share the "
            "rate limit between the processes of one host only.",
        )
    return MewsSettings(
        base_url=f"{parts.scheme}://{parts.netloc}",
        access_token=conn.password,
        client_token=client_token,
        client=client,
        chain_id=chain_id,
        timeout_s=timeout,
        rate_limit_requests=int(max_requests),
        rate_limit_period_s=period,
        rate_limit_redis_conn_id=redis_conn_id.strip() if redis_conn_id else None,
    )


_CONN_ID = re.compile(r"^[\w.\-]{1,250}$")


def _positive_number(value: Any, default: float, name: str, cid: str) -> float:
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number <= 0:
        raise _setting_error(cid, f"{name} must be a positive number, got {value!r}.")
    return number
