"""The wire: request bodies encoded, answers read (bounded in size and time) and decoded,
error bodies turned into messages, ``Retry-After`` parsed.

Pure helpers of :class:`~airflow_provider_mews.hooks.mews.MewsConnectorHook`, which owns the
session, the retries and the rate limiter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import requests

try:  # Airflow 3 installs msgspec: its JSON codec costs a fraction of the json module's per row.
    import msgspec
    import msgspec.json as _msgspec_json
except ImportError:  # pragma: no cover - Airflow 2.11 without msgspec: the json module
    msgspec = None  # type: ignore[assignment]
    _msgspec_json = None  # type: ignore[assignment]

if msgspec is not None:

    class _Created(msgspec.Struct):
        """What the operator needs of a created membership: its Id, and its AccountId to pair it."""

        Id: Any = None
        AccountId: Any = None

    class _AddAnswer(msgspec.Struct):
        LoyaltyMemberships: list[_Created] | None = None

    #: Decodes an add answer into the two fields per item, skipping the other 13 unread.
    _ADD_DECODER: Any = msgspec.json.Decoder(_AddAnswer)
else:  # pragma: no cover
    _ADD_DECODER = None

#: Largest answer read (a 1000-item page is under 1 MiB): a broken or hostile server cannot fill memory.
MAX_RESPONSE_BYTES = 16 * 2**20
_READ_CHUNK = 64 * 1024


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _read_body(response: requests.Response, deadline: float) -> bool:
    """Read a streamed answer into ``response`` (``.json()``/``.text`` then work) by ``deadline``.

    The socket's read timeout applies to each read, so a server trickling bytes (slow-loris)
    would evade it; the deadline (``time.monotonic()``) bounds the whole answer. At most
    MAX_RESPONSE_BYTES are kept; returns False when the body was cut there.
    """
    raw = response.raw
    read = getattr(raw, "read1", None) or raw.read  # read1: at most one socket read per call
    chunks: list[bytes] = []
    size = 0
    complete = True
    try:
        while True:
            if time.monotonic() > deadline:
                raise requests.exceptions.ReadTimeout(
                    "the answer was not complete within the connection's timeout (server sending too slowly)"
                )
            chunk = read(_READ_CHUNK, decode_content=True)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                complete = False
                del chunks[1:]  # the start is enough to describe an error page
                break
            chunks.append(chunk)
    except requests.RequestException:
        response.close()
        raise
    except Exception as exc:  # urllib3/socket errors while reading the body
        response.close()
        raise requests.exceptions.ConnectionError(exc, response=response) from exc
    response._content = b"".join(chunks)
    response._content_consumed = complete  # type: ignore[attr-defined]  # complete: connection reusable
    response.close()
    return complete


def _encode_json(body: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of a request body."""
    if _msgspec_json is not None:
        return _msgspec_json.encode(body)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _decode_json(content: bytes) -> Any:
    """The decoded JSON of an answer; ValueError when it is not JSON."""
    if _msgspec_json is not None:
        return _msgspec_json.decode(content)
    return json.loads(content)


def _is_connect_failure(exc: requests.RequestException) -> bool:
    """True when the request surely never reached the server (refused, DNS, connect timeout)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    from urllib3.exceptions import NameResolutionError, NewConnectionError

    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, (NewConnectionError, NameResolutionError, ConnectionRefusedError)):
            return True
        todo.extend([getattr(cur, "reason", None), cur.__cause__, cur.__context__])
        todo.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
    return False


def _error_message(response: requests.Response, body: Any, redact: Any = str) -> tuple[str, Any]:
    """Mews's Message and Details, or a short description of a non-JSON body (a proxy's HTML).

    ``redact`` removes the tokens before the text is cut, so no piece of one can survive the cut.
    """
    if isinstance(body, dict) and (body.get("Message") or "Details" in body):
        return redact(str(body.get("Message") or "no message")), body.get("Details")
    text = redact(" ".join(response.text.split()))[:200] if response.content else ""
    ctype = response.headers.get("Content-Type", "no content type")
    reason = response.reason or ""
    if text:
        return f"{reason} (non-JSON body, {ctype}): {text}", None
    return f"{reason} (empty body)", None
