"""MewsConnectorHook: the one place that talks HTTP to the Mews Connector API.

It owns authentication (tokens in the JSON body), the pooled ``requests`` session, the
per-AccessToken rate limiter, retries and the mapping of answers to
:mod:`airflow_provider_mews.exceptions`. Operators call its methods and never build
requests themselves.
"""

from __future__ import annotations

import calendar
import contextlib
import itertools
import json
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from airflow_provider_mews.exceptions import (
    MewsCallStopped,
    MewsConfigurationError,
    MewsConnectionError,
    MewsError,
    MewsRateLimitError,
    MewsResponseError,
    error_class_for_status,
)
from airflow_provider_mews.get_provider_info import (
    CONN_TYPE,
    HIDDEN_FIELDS,
    PLACEHOLDERS,
    RELABELING,
)
from airflow_provider_mews.hooks.settings import (
    _CONN_ID,
    DEFAULT_CLIENT,
    DEFAULT_TIMEOUT_S,
    MewsSettings,
    _setting_error,
    settings_from_connection,
    validate_uuid,
)
from airflow_provider_mews.hooks.transport import (
    _ADD_DECODER,
    MAX_RESPONSE_BYTES,
    _decode_json,
    _encode_json,
    _error_message,
    _is_connect_failure,
    _msgspec_json,
    _read_body,
    msgspec,
    parse_retry_after,
)
from airflow_provider_mews.rate_limit import (
    DEFAULT_MAX_REQUESTS,
    DEFAULT_PERIOD_S,
    TokenLimiter,
    limiter_for,
)
from airflow_provider_mews.version_compat import BaseHook, mask_secret

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_TIMEOUT_S",
    "CallStats",
    "MewsConnectorHook",
    "MewsSettings",
    "parse_retry_after",
    "settings_from_connection",
    "time_slices",
    "validate_uuid",
]

API_PATH = "/api/connector/v1/"
MAX_ADD_ITEMS = 1000
MAX_FILTER_ITEMS = 1000
CONNECT_TIMEOUT_S = 10.0
#: The cheap authenticated call behind "Test connection".
TEST_OPERATION = "configuration/get"


def _utc_iso(value: datetime | str) -> str:
    if isinstance(value, str):
        return value
    import pendulum

    return pendulum.instance(value).in_timezone("UTC").format("YYYY-MM-DDTHH:mm:ss[Z]")


def _result_list(answer: Any, key: str | None, operation: str) -> list[dict[str, Any]]:
    """The list of records in a getAll answer: ``answer[key]``, or its one list when key is None."""
    if not isinstance(answer, dict):
        raise MewsResponseError("getAll answer is not a JSON object", operation=operation)
    if key is None:
        lists = [k for k, v in answer.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise MewsResponseError(
                f"getAll answer has {len(lists)} lists ({', '.join(lists) or 'none'}); name the result key",
                operation=operation,
            )
        key = lists[0]
    page = answer.get(key)
    if not isinstance(page, list):
        raise MewsResponseError(f"getAll answer has no {key} list", operation=operation)
    return page


#: The longest time filter (``CreatedUtc``, ``UpdatedUtc``, ``DeletedUtc``) a getAll accepts.
MAX_INTERVAL_MONTHS = 3


def _plus_months(moment: datetime, months: int) -> datetime:
    """``moment`` shifted by calendar months, the day clamped to the month's last (Nov 30 + 3 = Feb 28)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def _utc_datetime(value: datetime | str, name: str) -> datetime:
    """An aware UTC datetime from a datetime (naive = UTC) or an ISO 8601 string (a rendered template)."""
    if isinstance(value, str):
        import pendulum

        try:
            value = pendulum.parse(value)  # type: ignore[assignment]
        except Exception:
            raise MewsConfigurationError(f"{name}: {value!r} is not an ISO 8601 date-time") from None
    if not isinstance(value, datetime):
        raise MewsConfigurationError(f"{name}: a datetime or an ISO 8601 string is required, got {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    value = value.astimezone(timezone.utc)
    return datetime(*value.timetuple()[:6], value.microsecond, tzinfo=timezone.utc)  # plain, not pendulum


def time_slices(
    start: datetime | str, end: datetime | str, months: int = MAX_INTERVAL_MONTHS, parts: int = 1
) -> list[tuple[datetime, datetime]]:
    """``start``..``end`` as consecutive slices of equal length, each within ``months`` calendar
    months: ``parts`` of them, or more when the range needs more (a year in 3 months: 5, as 91
    days can exceed 3 calendar months). The cuts are on whole seconds.

    Each slice starts where the previous one ended (the boundary instant belongs to both: see
    :meth:`MewsConnectorHook.paginate_range` for how records stamped on it are read once).
    ``start == end`` gives the one zero-length slice."""
    if months < 1:
        raise MewsConfigurationError(f"months must be at least 1, got {months}")
    low, high = _utc_datetime(start, "start"), _utc_datetime(end, "end")
    if high < low:
        raise MewsConfigurationError(
            f"the time range ends ({high.isoformat()}) before it starts ({low.isoformat()})"
        )
    if high == low:
        return [(low, high)]
    count = max(1, parts)
    while True:
        edges = [low]
        for k in range(1, count):
            cut = low + (high - low) * k / count
            whole = cut.replace(microsecond=0)
            edges.append(whole if edges[-1] < whole else cut)
        edges.append(high)
        pieces = list(itertools.pairwise(edges))
        if all(a < b <= _plus_months(a, months) for a, b in pieces):
            return pieces
        count += 1


#: The shortest slice :meth:`MewsConnectorHook.paginate_range` cuts to read a range in parallel.
MIN_PARALLEL_SLICE_S = 86400.0


def slice_count(start: datetime, end: datetime, months: int, workers: int) -> int:
    """How many slices to read ``start``..``end`` in: enough for ``workers`` cursor chains at once
    (a chain's pages are sequential, so one chain moves at one page per answer's latency),
    but none shorter than a day (a nightly interval stays one slice: each extra slice costs a
    ``[b, b]`` read and a last, short page), and a multiple of ``workers`` once more slices
    than workers are needed, so no chain is left to finish alone."""
    span = (end - start).total_seconds()
    wanted = max(1, min(workers, int(span // MIN_PARALLEL_SLICE_S)))
    needed = len(time_slices(start, end, months, wanted))
    if needed > workers:
        needed = -(-needed // workers) * workers
    return needed


def _interval_body(start: datetime, end: datetime) -> dict[str, str]:
    """A Connector API time interval; microseconds kept (a boundary must be the exact instant)."""

    def iso(moment: datetime) -> str:
        text = moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
        return (text[:-7] if text.endswith(".000000") else text) + "Z"

    return {"StartUtc": iso(start), "EndUtc": iso(end)}


class _Boundary:
    """The ``[b, b]`` read of one slice boundary: its body, and set once its records are known."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.read = threading.Event()


class _Stopped(Exception):
    """Raised inside a reader thread when the consumer went away."""


def _record_id(record: Any) -> str:
    """A record's Id, lower-cased (Mews compares UUIDs case-insensitively)."""
    rid = record.get("Id") if isinstance(record, dict) else None
    if not isinstance(rid, str):
        raise MewsResponseError("a getAll record has no Id")
    return rid.lower()


@dataclass
class CallStats:
    """Counters shared by the threads of one hook, for progress lines and summaries."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    #: Retry-After time imposed by the 429s this hook met.
    rate_limit_wait_s: float = 0.0
    #: Time this hook's threads waited in the client-side limiter (pace and every Retry-After hold).
    limiter_wait_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class MewsConnectorHook(BaseHook):
    """
    Calls the Mews Connector API with the credentials of an Airflow connection.

    :param mews_conn_id: Airflow connection of type ``mews``.
    :param max_attempts: attempts per call for retryable failures (408, 5xx, network).
        An ``add`` is never re-sent after a failure that may have been processed.
    :param max_retry_time_s: total time one call may spend retrying and waiting on 429s.
    :param max_retry_after_s: longest single wait a ``Retry-After`` may impose.
    :param pool_size: HTTP connections kept open; at least the caller's concurrency.
    """

    conn_name_attr = "mews_conn_id"
    default_conn_name = "mews_default"
    conn_type = CONN_TYPE
    hook_name = "Mews"

    def __init__(
        self,
        mews_conn_id: str = default_conn_name,
        *,
        max_attempts: int = 5,
        max_retry_time_s: float = 300.0,
        max_retry_after_s: float = 120.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        pool_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.mews_conn_id = mews_conn_id
        self.max_attempts = max_attempts
        self.max_retry_time_s = max_retry_time_s
        self.max_retry_after_s = max_retry_after_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.pool_size = pool_size
        self.stats = CallStats()
        #: Set when the task is stopping (the operator's ``on_kill``): no call sends anything
        #: more, and waits (rate limiter, backoff) end at once, so worker threads leave within
        #: the supervisor's 5 s between SIGTERM and SIGKILL (a request on the wire still ends).
        self.abort = threading.Event()
        self._settings: MewsSettings | None = None
        self._templates: dict[str, requests.PreparedRequest] = {}

    def __repr__(self) -> str:
        return f"MewsConnectorHook(mews_conn_id={self.mews_conn_id!r})"

    # -- connection form (Airflow < 3.2 builds it from these; 3.2+ from get_provider_info) --

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import IntegerField, PasswordField, StringField
        from wtforms.validators import NumberRange, Optional, Regexp

        return {
            "client_token": PasswordField(lazy_gettext("Client token"), widget=BS3PasswordFieldWidget()),
            "client": StringField(lazy_gettext("Client"), widget=BS3TextFieldWidget()),
            "chain_id": StringField(lazy_gettext("Chain id"), widget=BS3TextFieldWidget()),
            "timeout": StringField(lazy_gettext("Timeout (seconds)"), widget=BS3TextFieldWidget()),
            "rate_limit_requests": IntegerField(
                lazy_gettext("Rate limit: requests"),
                validators=[Optional(strip_whitespace=True), NumberRange(min=1)],
                widget=BS3TextFieldWidget(),
                default=DEFAULT_MAX_REQUESTS,
            ),
            # A StringField: Airflow's providers manager refuses a hook whose form has a DecimalField
            # (only String/Integer/Password/Boolean), dropping the connection type (.ci/airflow-lines.sh).
            # settings_from_connection validates the number.
            "rate_limit_period": StringField(
                lazy_gettext("Rate limit: period (seconds)"),
                validators=[Optional(strip_whitespace=True), Regexp(r"^\s*\d*\.?\d+\s*$")],
                widget=BS3TextFieldWidget(),
                default=DEFAULT_PERIOD_S,
            ),
            "rate_limit_redis_conn_id": StringField(
                lazy_gettext("Rate limit: Redis connection id"),
                validators=[Optional(strip_whitespace=True), Regexp(_CONN_ID.pattern)],
                widget=BS3TextFieldWidget(),
            ),
        }

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": HIDDEN_FIELDS,
            "relabeling": RELABELING,
            "placeholders": PLACEHOLDERS,
        }

    # -- settings, session, limiter --

    @property
    def settings(self) -> MewsSettings:
        if self._settings is None:
            conn = self.get_connection(self.mews_conn_id)
            # Mask before validating, so even an error path cannot print them.
            for secret in (conn.password, (conn.extra_dejson or {}).get("client_token")):
                if secret:
                    mask_secret(secret)
            self._settings = settings_from_connection(conn)
        return self._settings

    @cached_property
    def session(self) -> requests.Session:
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update(
            {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": DEFAULT_CLIENT}
        )
        # Proxies (HTTPS_PROXY, NO_PROXY), the CA bundle (REQUESTS_CA_BUNDLE) and a client cert come
        # from the environment as requests reads them, once for the one host this hook calls, instead
        # of on every request (a per-request cost of a bulk load).
        env = session.merge_environment_settings(self.settings.base_url + API_PATH, {}, None, None, None)
        session.proxies.update(env["proxies"])
        session.verify = env["verify"]
        session.cert = env["cert"]
        session.trust_env = False
        return session

    @cached_property
    def limiter(self) -> TokenLimiter:
        """The AccessToken's limiter, shared with every hook, thread and process on the token."""
        s = self.settings
        try:
            return limiter_for(
                s.access_token,
                s.rate_limit_requests,
                s.rate_limit_period_s,
                scope=s.base_url,
                redis_conn_id=s.rate_limit_redis_conn_id,
            )
        except ImportError as exc:
            raise _setting_error(self.mews_conn_id, str(exc)) from None
        except Exception as exc:
            if s.rate_limit_redis_conn_id and type(exc).__name__ == "AirflowNotFoundException":
                raise _setting_error(
                    self.mews_conn_id,
                    f"extra.rate_limit_redis_conn_id names the Airflow connection "
                    f"'{s.rate_limit_redis_conn_id}', which does not exist; create it (type redis) "
                    "or leave the field empty.",
                ) from None
            raise

    def close(self) -> None:
        if "session" in self.__dict__:
            self.session.close()
            del self.__dict__["session"]
        self._templates.clear()

    def _request(self, url: str, body: bytes) -> requests.PreparedRequest:
        """A POST of ``body`` to ``url``: a copy of the operation's prepared request (the session's
        headers merged once) with this body; ``session.post`` would merge them again per call."""
        template = self._templates.get(url)
        if template is None:
            template = self._templates[url] = self.session.prepare_request(requests.Request("POST", url))
        request = template.copy()
        request.prepare_body(body, None)
        return request

    # -- calls --

    def call(
        self,
        operation: str,
        payload: Mapping[str, Any] | None = None,
        *,
        idempotent: bool = True,
        ids_only: bool = False,
    ) -> Any:
        """POST ``payload`` plus the auth fields to ``operation``; returns the decoded JSON answer.

        ``idempotent=False`` (adds) means: never re-send after a failure that may have been
        processed; raise with ``may_have_been_processed=True`` so the caller can reconcile.
        ``ids_only`` (adds): decode only each created membership's Id and AccountId.
        """
        s = self.settings
        body = {"ClientToken": s.client_token, "AccessToken": s.access_token, "Client": s.client}
        if payload:
            body.update(payload)
        data = _encode_json(body)
        url = s.base_url + API_PATH + operation
        deadline = time.monotonic() + self.max_retry_time_s
        failures = 0
        limited = 0
        while True:
            asked = time.monotonic()
            slot = None if self.abort.is_set() else self.limiter.acquire(deadline, cancel=self.abort)
            waited = time.monotonic() - asked
            if self.abort.is_set():
                raise MewsCallStopped("the task is stopping; the request was not sent", operation=operation)
            if slot is None:
                self.stats.add(limiter_wait_s=waited)
                raise MewsRateLimitError(
                    "the client-side rate limiter had no free slot within the retry budget",
                    operation=operation,
                )
            self.stats.add(requests=1, limiter_wait_s=waited)
            sent_at = time.monotonic()
            try:
                response = self.session.send(
                    self._request(url, data), timeout=(CONNECT_TIMEOUT_S, s.timeout_s), stream=True
                )
                complete = _read_body(response, sent_at + s.timeout_s)
            except requests.RequestException as exc:
                error: MewsError = self._transport_error(exc, operation, idempotent)
            else:
                if response.status_code == 200:
                    if not complete:
                        raise MewsResponseError(
                            f"HTTP 200 with a body larger than {MAX_RESPONSE_BYTES} bytes; not read further",
                            status=200,
                            request_id=response.headers.get("Request-Id"),
                            operation=operation,
                        )
                    return self._decode(response, operation, ids_only=ids_only)
                error = self._http_error(response, operation, idempotent)
            if error.status == 429:
                wait = self._hold_after_429(error, limited, slot, deadline)
                if wait is None:
                    raise error
                limited += 1
                self.stats.add(retries=1)
                self.log.warning(
                    "%s; every request on this AccessToken waits %.1f s, then resumes paced", error, wait
                )
                continue  # the limiter holds this and every other request until the hold ends
            wait = self._wait_before_retry(error, idempotent, failures, deadline)
            if wait is None:
                raise error
            failures += 1
            self.stats.add(retries=1)
            self.log.warning("%s; retrying in %.1f s", error, wait)
            self.abort.wait(wait)

    def _hold_after_429(self, error: MewsError, limited: int, slot: float, deadline: float) -> float | None:
        """Tell the limiter about a 429 (it holds everyone and learns); None to raise now.

        ``Retry-After`` is always honoured; without one, the wait doubles per 429 of this call
        (Mews: "fall back to an exponential backoff strategy"), with jitter.
        """
        if isinstance(error.details, float):
            wait = error.details
        else:
            ceiling = min(self.backoff_max_s, self.backoff_base_s * 2**limited)
            wait = random.uniform(ceiling / 2, ceiling)
        wait = min(wait, self.max_retry_after_s)
        self.limiter.on_429(wait, slot)
        self.stats.add(rate_limited=1, rate_limit_wait_s=wait)
        if time.monotonic() + wait > deadline:
            return None
        return wait

    def _wait_before_retry(
        self, error: MewsError, idempotent: bool, failures: int, deadline: float
    ) -> float | None:
        """Seconds to wait before trying again, or None to raise now."""
        if not error.retryable:
            return None
        if error.may_have_been_processed:
            return None
        if failures + 1 >= self.max_attempts:
            return None
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2**failures)
        wait = random.uniform(ceiling / 2, ceiling)
        if time.monotonic() + wait > deadline:
            return None
        return wait

    def _redact(self, text: str) -> str:
        s = self._settings
        if s is not None:
            for secret in (s.access_token, s.client_token):
                text = text.replace(secret, "***")
        return text

    def _redact_data(self, data: Any) -> Any:
        """JSON ``data`` from an answer (``Details``) with the tokens replaced: a server may echo them."""
        if data is None or isinstance(data, (bool, int, float)):
            return data
        text = json.dumps(data)
        clean = self._redact(text)
        if clean == text:
            return data
        try:
            return json.loads(clean)
        except ValueError:
            return "***"

    def _transport_error(self, exc: requests.RequestException, operation: str, idempotent: bool) -> MewsError:
        # A refused or timed-out *connect* never reached Mews; anything later may have.
        reached = not _is_connect_failure(exc)
        kind = type(exc).__name__
        what = "connection failed before sending" if not reached else "no complete answer after sending"
        return MewsConnectionError(
            f"{what} ({kind}: {self._redact(str(exc))[:300]})",  # redacted before it is cut
            operation=operation,
            may_have_been_processed=reached and not idempotent,
        )

    def _http_error(self, response: requests.Response, operation: str, idempotent: bool) -> MewsError:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        message, details = _error_message(response, body, self._redact)
        details = self._redact_data(details)
        request_id = response.headers.get("Request-Id")
        if isinstance(body, dict) and isinstance(body.get("RequestId"), str):
            request_id = body["RequestId"] or request_id
        cls = error_class_for_status(status)
        if status == 429:
            details = parse_retry_after(response.headers.get("Retry-After"))
        return cls(
            self._redact(message),
            status=status,
            request_id=request_id,
            operation=operation,
            details=details,
            # Only an add cares whether it may have been stored; a read is simply repeated.
            may_have_been_processed=False if idempotent else None,
            conn_id=self.mews_conn_id,
        )

    def _decode(self, response: requests.Response, operation: str, ids_only: bool = False) -> Any:
        """The JSON answer; with ``ids_only`` (adds) an ``_AddAnswer`` keeping only Id and AccountId."""
        try:
            if ids_only and _ADD_DECODER is not None:
                return _ADD_DECODER.decode(response.content)
            return _decode_json(response.content)
        except ValueError as exc:  # msgspec's DecodeError and ValidationError are ValueErrors
            not_json = _msgspec_json is None or not isinstance(exc, msgspec.ValidationError)
            what = "is not JSON" if not_json else f"breaks the contract ({str(exc)[:200]})"
            raise MewsResponseError(
                f"HTTP 200 with a body that {what} ({len(response.content)} bytes)",
                status=200,
                request_id=response.headers.get("Request-Id"),
                operation=operation,
            ) from None

    # -- operations --

    def add_loyalty_memberships(
        self, memberships: Sequence[Mapping[str, Any]], chain_id: str | None = None, *, ids_only: bool = False
    ) -> list[Any]:
        """Add 1 to 1000 memberships; returns the created memberships in the order sent.

        ``ids_only=True`` returns only their Ids (strings, in the order sent), decoded with a typed
        decoder that reads nothing else: what a bulk load needs, at a fraction of the CPU.
        Raises :class:`MewsError`; when ``may_have_been_processed`` is set, the batch may be
        stored and must be reconciled (e.g. with :meth:`get_loyalty_memberships`) before a resend.
        """
        count = len(memberships)
        if not 1 <= count <= MAX_ADD_ITEMS:
            raise MewsConfigurationError(
                f"loyaltyMemberships/add takes 1 to {MAX_ADD_ITEMS} memberships per request, got {count}; "
                "split the list into batches."
            )
        payload: dict[str, Any] = {"LoyaltyMemberships": memberships}
        chain = chain_id or self.settings.chain_id
        if chain:
            payload["ChainId"] = chain
        operation = "loyaltyMemberships/add"
        typed = ids_only and _ADD_DECODER is not None
        answer = self.call(operation, payload, idempotent=False, ids_only=typed)
        if typed:
            created: Any = answer.LoyaltyMemberships
        else:
            created = answer.get("LoyaltyMemberships") if isinstance(answer, dict) else None
        if not isinstance(created, list) or len(created) != count:
            got = len(created) if isinstance(created, list) else "no list"
            raise MewsResponseError(
                f"expected {count} created memberships in LoyaltyMemberships, got {got}",
                status=200,
                operation=operation,
            )
        ids: list[Any]
        if typed:
            ids = [item.Id for item in created]
            accounts = [item.AccountId for item in created]
            if accounts == [m["AccountId"] for m in memberships] and set(map(type, ids)) == {str}:
                return ids if ids_only else created  # paired in the order sent (the usual answer)
        ids = []
        for sent, item in zip(memberships, created, strict=True):
            if typed:
                mid, account = item.Id, item.AccountId
            elif isinstance(item, dict):
                mid, account = item.get("Id"), item.get("AccountId", "")
            else:
                mid = account = None
            if not isinstance(mid, str):
                raise MewsResponseError("a created membership has no Id", status=200, operation=operation)
            if account != sent["AccountId"] and str(account).lower() != str(sent["AccountId"]).lower():
                # Ids could not be paired with rows safely: let the caller reconcile instead.
                raise MewsResponseError(
                    "created memberships do not come back in the order sent", status=200, operation=operation
                )
            ids.append(mid)
        return ids if ids_only else created

    def update_loyalty_memberships(
        self, updates: Sequence[Mapping[str, Any]], chain_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Update 1 to 1000 memberships; returns the updated memberships in the order sent.

        Each item is ``{"LoyaltyMembershipId": id, Field: {"Value": v}, ...}``: a field left out
        keeps its value, ``{"Value": None}`` clears a clearable one (see
        :mod:`airflow_provider_mews.loyalty.sync_plan`). An update sets values, so sending it again after a
        failure that may have been processed changes nothing more: the hook retries it like a
        read (5xx, timeouts, dropped connections); its HTTP errors carry ``may_have_been_processed=False``.
        """
        count = len(updates)
        if not 1 <= count <= MAX_ADD_ITEMS:
            raise MewsConfigurationError(
                f"loyaltyMemberships/update takes 1 to {MAX_ADD_ITEMS} updates per request, got {count}; "
                "split the list into batches."
            )
        sent: list[str] = []
        for n, item in enumerate(updates):
            mid = item.get("LoyaltyMembershipId")
            if not isinstance(mid, str) or not mid:
                raise MewsConfigurationError(
                    f"update item {n} has no LoyaltyMembershipId; every update needs one."
                )
            sent.append(mid.lower())
        payload: dict[str, Any] = {"LoyaltyMembershipUpdates": updates}
        chain = chain_id or self.settings.chain_id
        if chain:
            payload["ChainId"] = chain
        operation = "loyaltyMemberships/update"
        answer = self.call(operation, payload, idempotent=True)
        updated = answer.get("LoyaltyMemberships") if isinstance(answer, dict) else None
        if not isinstance(updated, list) or not all(
            isinstance(m, dict) and isinstance(m.get("Id"), str) for m in updated
        ):
            raise MewsResponseError(
                "update answer has no LoyaltyMemberships list of memberships with Ids",
                status=200,
                operation=operation,
            )
        by_id = {m["Id"].lower(): m for m in updated}
        missing = [mid for mid in sent if mid not in by_id]
        if missing:  # the order of the answer is not documented: pair by Id
            raise MewsResponseError(
                f"update answer lacks {len(missing)} of the {count} memberships sent (first {missing[0]})",
                status=200,
                operation=operation,
            )
        return [by_id[mid] for mid in sent]

    def delete_loyalty_memberships(self, ids: Sequence[str], chain_id: str | None = None) -> None:
        """Delete 1 to 1000 memberships (Mews keeps them, readable as ``ActivityStates: ["Deleted"]``).

        Not re-sent after a failure that may have been processed: how Mews answers a delete of
        an Id it already deleted is not documented (the sandbox refuses the whole request with
        400), so such a failure raises with ``may_have_been_processed=True`` and the caller
        re-reads the Ids (:func:`airflow_provider_mews.loyalty.reconcile.find_deleted`) and sends only
        those still active.
        """
        count = len(ids)
        if not 1 <= count <= MAX_ADD_ITEMS:
            raise MewsConfigurationError(
                f"loyaltyMemberships/delete takes 1 to {MAX_ADD_ITEMS} Ids per request, got {count}; "
                "split the list into batches."
            )
        payload: dict[str, Any] = {"LoyaltyMembershipIds": list(ids)}
        chain = chain_id or self.settings.chain_id
        if chain:
            payload["ChainId"] = chain
        operation = "loyaltyMemberships/delete"
        answer = self.call(operation, payload, idempotent=False)
        if not isinstance(answer, dict):
            raise MewsResponseError("delete answer is not a JSON object", status=200, operation=operation)

    def get_loyalty_memberships(
        self,
        *,
        account_ids: Iterable[str] | None = None,
        loyalty_program_ids: Iterable[str] | None = None,
        loyalty_membership_ids: Iterable[str] | None = None,
        chain_ids: Iterable[str] | None = None,
        membership_numbers: Iterable[str] | None = None,
        provider_membership_ids: Iterable[str] | None = None,
        membership_states: Iterable[str] | None = None,
        activity_states: Iterable[str] | None = None,
        created_utc: tuple[datetime | str | None, datetime | str | None] | None = None,
        updated_utc: tuple[datetime | str | None, datetime | str | None] | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Yield memberships matching the filters, following the Cursor page by page, lazily."""
        if not 1 <= page_size <= 1000:
            raise MewsConfigurationError(f"page_size must be 1..1000, got {page_size}")
        payload: dict[str, Any] = {}
        for key, values in (
            ("AccountIds", account_ids),
            ("LoyaltyProgramIds", loyalty_program_ids),
            ("LoyaltyMembershipIds", loyalty_membership_ids),
            ("ChainIds", chain_ids),
            ("MembershipNumbers", membership_numbers),
            ("ProviderMembershipIds", provider_membership_ids),
        ):
            if values is not None:
                items = list(dict.fromkeys(values))
                if not 1 <= len(items) <= MAX_FILTER_ITEMS:
                    raise MewsConfigurationError(
                        f"getAll filter {key} takes 1 to {MAX_FILTER_ITEMS} ids, got {len(items)}"
                    )
                payload[key] = items
        if membership_states is not None:
            payload["MembershipStates"] = list(membership_states)
        if activity_states is not None:
            payload["ActivityStates"] = list(activity_states)
        for key, interval in (("CreatedUtc", created_utc), ("UpdatedUtc", updated_utc)):
            if interval is not None:
                start, end = interval
                payload[key] = {
                    "StartUtc": _utc_iso(start) if start else None,
                    "EndUtc": _utc_iso(end) if end else None,
                }
        # An Id names one membership at most: once as many came back, no page can follow.
        most = len(payload["LoyaltyMembershipIds"]) if "LoyaltyMembershipIds" in payload else None
        for page in self.paginate(
            "loyaltyMemberships/getAll",
            payload,
            result_key="LoyaltyMemberships",
            page_size=page_size,
            most=most,
        ):
            yield from page

    def get_customers(
        self,
        *,
        emails: Iterable[str] | None = None,
        loyalty_codes: Iterable[str] | None = None,
        customer_ids: Iterable[str] | None = None,
        chain_ids: Iterable[str] | None = None,
        activity_states: Iterable[str] | None = ("Active",),
        page_size: int = 1000,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield pages of ``customers/getAll`` (one request each, so a caller can count its
        look-ups). Mews refuses a request with no filter, so one of ``emails``,
        ``loyalty_codes`` or ``customer_ids`` is required; only the customers are asked for
        (``Extent``), not their addresses or documents."""
        payload: dict[str, Any] = self._list_filters(
            operation="customers/getAll",
            Emails=emails,
            LoyaltyCodes=loyalty_codes,
            CustomerIds=customer_ids,
        )
        if not payload:
            raise MewsConfigurationError("customers/getAll needs emails, loyalty_codes or customer_ids")
        payload.update(self._list_filters(operation="customers/getAll", ChainIds=chain_ids))
        payload["Extent"] = {"Customers": True, "Documents": False, "Addresses": False}
        if activity_states is not None:
            payload["ActivityStates"] = list(activity_states)
        # An Id names one customer at most: once as many came back, no page can follow.
        most = len(payload["CustomerIds"]) if "CustomerIds" in payload else None
        yield from self.paginate(
            "customers/getAll", payload, result_key="Customers", page_size=page_size, most=most
        )

    def get_loyalty_programs(
        self,
        *,
        codes: Iterable[str] | None = None,
        loyalty_program_ids: Iterable[str] | None = None,
        chain_ids: Iterable[str] | None = None,
        activity_states: Iterable[str] | None = ("Active",),
        page_size: int = 1000,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield pages of ``loyaltyPrograms/getAll`` (one request each); no filter lists them all."""
        payload = self._list_filters(
            operation="loyaltyPrograms/getAll",
            Codes=codes,
            LoyaltyProgramIds=loyalty_program_ids,
            ChainIds=chain_ids,
        )
        if activity_states is not None:
            payload["ActivityStates"] = list(activity_states)
        yield from self.paginate(
            "loyaltyPrograms/getAll", payload, result_key="LoyaltyPrograms", page_size=page_size
        )

    def get_loyalty_tiers(
        self,
        *,
        loyalty_program_ids: Iterable[str],
        chain_ids: Iterable[str] | None = None,
        activity_states: Iterable[str] | None = ("Active",),
        page_size: int = 1000,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield pages of ``loyaltyTiers/getAll`` of the programmes (required by Mews), one
        request each."""
        payload = self._list_filters(
            operation="loyaltyTiers/getAll", LoyaltyProgramIds=loyalty_program_ids, ChainIds=chain_ids
        )
        if "LoyaltyProgramIds" not in payload:
            raise MewsConfigurationError("loyaltyTiers/getAll needs loyalty_program_ids")
        if activity_states is not None:
            payload["ActivityStates"] = list(activity_states)
        yield from self.paginate(
            "loyaltyTiers/getAll", payload, result_key="LoyaltyTiers", page_size=page_size
        )

    @staticmethod
    def _list_filters(*, operation: str, **filters: Iterable[str] | None) -> dict[str, list[str]]:
        """The given list filters, each deduplicated and within Mews's 1..1000 items."""
        payload: dict[str, list[str]] = {}
        for key, values in filters.items():
            if values is None:
                continue
            items = list(dict.fromkeys(values))
            if not 1 <= len(items) <= MAX_FILTER_ITEMS:
                raise MewsConfigurationError(
                    f"{operation} filter {key} takes 1 to {MAX_FILTER_ITEMS} items, got {len(items)}"
                )
            payload[key] = items
        return payload

    def paginate(
        self,
        operation: str,
        body: Mapping[str, Any] | None = None,
        *,
        result_key: str | None = None,
        page_size: int = 1000,
        most: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield the pages of any Connector API getAll, following ``Cursor`` to the end, lazily.

        ``body`` holds the operation's filters (``Limitation`` is set here). ``result_key`` names
        the answer's list (``"Customers"``); None finds it: the one list in the answer. A page
        shorter than ``page_size`` is the last; a full page needs one more read to learn it was
        (Mews's pagination guideline). ``most``: stop once that many items came back (a filter by
        Ids can match no more). Every page is one request under the token's limiter, retried like
        any read.
        """
        if not 1 <= page_size <= 1000:
            raise MewsConfigurationError(f"page_size must be 1..1000, got {page_size}")
        payload = dict(body or {})
        cursor: str | None = None
        seen = 0
        while True:
            payload["Limitation"] = {"Count": page_size, "Cursor": cursor}
            answer = self.call(operation, payload)
            page = _result_list(answer, result_key, operation)
            yield page
            seen += len(page)
            cursor = answer.get("Cursor")
            if len(page) < page_size or not cursor or (most is not None and seen >= most):
                return

    def paginate_range(
        self,
        operation: str,
        body: Mapping[str, Any] | None = None,
        *,
        time_filter: str = "UpdatedUtc",
        start: datetime | str,
        end: datetime | str,
        result_key: str | None = None,
        page_size: int = 1000,
        max_interval_months: int = MAX_INTERVAL_MONTHS,
        max_workers: int = 8,
        queue_pages: int = 8,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield the pages of a getAll over ``start``..``end`` of ``time_filter``, however long.

        Mews refuses a time filter longer than 3 months, so the range is read as consecutive
        slices of equal length within ``max_interval_months`` calendar months each
        (:func:`time_slices`), each paged with :meth:`paginate`. A slice's pages form one chain
        (each answer's ``Cursor`` is needed for the next request), so one slice moves at one page
        per answer's latency; a range of at least two days is therefore cut into at least
        ``max_workers`` slices (none shorter than a day, ``slice_count``), enough chains at
        once to keep the token's limiter busy. A nightly interval stays one slice.

        Whether Mews treats an interval's ends as inclusive is not documented, so a record
        stamped exactly on the instant ``b`` where one slice ends and the next starts may come
        back from both, or from one. To read it exactly once without remembering every Id: one
        extra read of the zero-length interval ``[b, b]`` per boundary returns exactly the
        records stamped at ``b``; they are yielded from it, and both neighbouring slices skip
        their Ids (a slice fetches its first page beside those reads, and waits for the two at
        its ends before handing any page on). Memory holds only those Ids (the records on the
        boundary instants), never the Ids of the whole range. A server that answers ``[b, b]``
        with nothing is one with half-open intervals, where no record is in two slices.

        Boundaries and slices are read by up to ``max_workers`` threads at once (every page
        under the token's shared limiter, retried like any read); their pages come out as they
        arrive, in no particular order, through a queue of at most ``queue_pages`` pages: a slow
        consumer holds the readers back instead of letting pages pile up in memory. Closing the
        iterator early stops the readers.
        """
        if time_filter not in ("CreatedUtc", "UpdatedUtc", "DeletedUtc"):
            raise MewsConfigurationError(
                f"time_filter must be CreatedUtc, UpdatedUtc or DeletedUtc, got {time_filter!r}"
            )
        if max_workers < 1 or queue_pages < 1:
            raise MewsConfigurationError("max_workers and queue_pages must be at least 1")
        low, high = _utc_datetime(start, "start"), _utc_datetime(end, "end")
        parts = slice_count(low, high, max_interval_months, max_workers) if high > low else 1
        slices = time_slices(low, high, max_interval_months, parts)
        base = dict(body or {})

        def sliced(low: datetime, high: datetime) -> dict[str, Any]:
            return {**base, time_filter: _interval_body(low, high)}

        if len(slices) == 1:
            yield from self.paginate(
                operation, sliced(*slices[0]), result_key=result_key, page_size=page_size
            )
            return
        boundaries = [_Boundary(sliced(b, b)) for _, b in slices[:-1]]
        if max_workers == 1:
            yield from self._read_slices_in_order(
                operation, slices, boundaries, sliced, result_key, page_size
            )
            return
        yield from self._read_slices_in_threads(
            operation, [sliced(low, high) for low, high in slices], boundaries, result_key, page_size,
            min(max_workers, len(slices) + len(boundaries)), queue_pages,
        )  # fmt: skip

    def _read_boundary(
        self,
        operation: str,
        boundary: _Boundary,
        seen: set[str],
        lock: threading.Lock,
        result_key: str | None,
        page_size: int,
    ) -> Iterator[list[dict[str, Any]]]:
        """The records stamped exactly on one boundary, each Id once across all boundaries."""
        for page in self.paginate(operation, boundary.body, result_key=result_key, page_size=page_size):
            with lock:
                fresh = [r for r in page if _record_id(r) not in seen]
                seen.update(_record_id(r) for r in fresh)
            if fresh:
                yield fresh

    def _read_slices_in_order(
        self,
        operation: str,
        slices: list[tuple[datetime, datetime]],
        boundaries: list[_Boundary],
        sliced: Any,
        result_key: str | None,
        page_size: int,
    ) -> Iterator[list[dict[str, Any]]]:
        """One thread: the boundaries, then the slices, skipping the Ids on the boundaries."""
        seen: set[str] = set()
        lock = threading.Lock()
        for boundary in boundaries:
            yield from self._read_boundary(operation, boundary, seen, lock, result_key, page_size)
        if seen:
            self.log.info("%d records stamped exactly on a slice boundary were read once", len(seen))
        for low, high in slices:
            for page in self.paginate(
                operation, sliced(low, high), result_key=result_key, page_size=page_size
            ):
                kept = [r for r in page if _record_id(r) not in seen] if seen else page
                if kept:
                    yield kept

    def _read_slices_in_threads(
        self,
        operation: str,
        bodies: list[dict[str, Any]],
        boundaries: list[_Boundary],
        result_key: str | None,
        page_size: int,
        workers: int,
        queue_pages: int,
    ) -> Iterator[list[dict[str, Any]]]:
        """Boundaries and slices as one queue of tasks for ``workers`` threads, boundaries first.

        The ``[b, b]`` reads run at once, beside the slices' first pages rather than before
        them: a slice fetches its first page, then waits for the boundaries at its two ends
        (needed to drop their Ids) before handing it on. No deadlock: every boundary task is
        taken before any slice task (one FIFO queue) and a boundary task waits for no task."""
        todo: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        for boundary in boundaries:
            todo.put((-1, boundary))
        for n, body in enumerate(bodies):
            todo.put((n, body))
        seen: set[str] = set()
        seen_lock = threading.Lock()
        out: queue.Queue[Any] = queue.Queue(maxsize=queue_pages)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
            raise _Stopped

        def wait_for(ends: list[_Boundary]) -> None:
            for boundary in ends:
                while not boundary.read.wait(0.2):
                    if stop.is_set():
                        raise _Stopped

        def read_slice(n: int, body: dict[str, Any]) -> None:
            ends = boundaries[max(0, n - 1) : n + 1]  # the boundaries at its start and its end
            pages = self.paginate(operation, body, result_key=result_key, page_size=page_size)
            for count, page in enumerate(pages):
                if count == 0:
                    wait_for(ends)
                kept = [r for r in page if _record_id(r) not in seen] if seen else page
                if kept:
                    put(kept)
                if stop.is_set():
                    raise _Stopped

        def read() -> None:
            try:
                while not stop.is_set():
                    try:
                        n, task = todo.get_nowait()
                    except queue.Empty:
                        break
                    if n < 0:
                        for page in self._read_boundary(
                            operation, task, seen, seen_lock, result_key, page_size
                        ):
                            put(page)
                        task.read.set()
                    else:
                        read_slice(n, task)
                put(done)
            except _Stopped:
                pass
            except BaseException as exc:  # handed to the consumer, raised there
                with contextlib.suppress(_Stopped):
                    put(exc)

        threads = [threading.Thread(target=read, name=f"mews-slice-{n}", daemon=True) for n in range(workers)]
        for thread in threads:
            thread.start()
        running = workers
        try:
            while running:
                item = out.get()
                if item is done:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        if seen:
            self.log.info("%d records stamped exactly on a slice boundary were read once", len(seen))

    def test_connection(self) -> tuple[bool, str]:
        """One cheap authenticated call; used by the UI's Test button and `airflow connections test`."""
        try:
            s = self.settings
            answer = self.call(TEST_OPERATION, {})
        except MewsError as exc:
            return False, str(exc)
        enterprise = answer.get("Enterprise") if isinstance(answer, dict) else None
        name = enterprise.get("Name") if isinstance(enterprise, dict) else None
        who = f" enterprise '{name}'" if name else ""
        return True, f"Connected to Mews at {s.base_url}{who} as client '{s.client}'."
