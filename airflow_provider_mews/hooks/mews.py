"""MewsConnectorHook: the one place that talks HTTP to the Mews Connector API.

It owns authentication (tokens in the JSON body), the pooled ``requests`` session, the
per-AccessToken rate limiter, retries and the mapping of answers to
:mod:`airflow_provider_mews.exceptions`. Operators call its methods and never build
requests themselves.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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
