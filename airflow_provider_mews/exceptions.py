"""One exception hierarchy for everything that can go wrong talking to Mews.

Every error carries what Mews support asks for (HTTP status, Mews's ``Message`` and the
``RequestId``) and one bit the caller needs for a non-idempotent ``add``:
``may_have_been_processed``. Texts are built only from Mews's answer and our own
words, never from the request body, so no token can end up in them.
"""

from __future__ import annotations

from typing import Any


class MewsError(Exception):
    """Base class: something went wrong with a Mews call or its configuration."""

    #: True when the request reached Mews and may have been stored (5xx, read timeout,
    #: connection dropped after sending). A caller must reconcile before re-sending an add.
    may_have_been_processed: bool = False
    #: True when simply trying again later can succeed (5xx, 408, 429, network).
    retryable: bool = False
    hint: str = ""
    #: True when the fix is in the Airflow connection (token, host): the text names it.
    names_connection: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        operation: str | None = None,
        details: Any = None,
        may_have_been_processed: bool | None = None,
        conn_id: str | None = None,
    ) -> None:
        self.message = message
        self.conn_id = conn_id
        self.status = status
        self.request_id = request_id
        self.operation = operation
        self.details = details
        if may_have_been_processed is not None:
            self.may_have_been_processed = may_have_been_processed
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"Mews {self.operation}" if self.operation else "Mews"
        head = f"{where} failed"
        if self.status is not None:
            head += f" with HTTP {self.status}"
        parts = [f"{head}: {self.message}"]
        parts.append(f"RequestId={self.request_id or 'none'}")
        if self.hint:
            parts.append(self.hint)
        if self.names_connection and self.conn_id:
            parts.append(f"Airflow connection: '{self.conn_id}'.")
        if self.may_have_been_processed:
            parts.append("The request may have been processed by Mews; reconcile before re-sending.")
        return " | ".join(parts)


class MewsCallStopped(MewsError):
    """The task is stopping (``on_kill``: SIGTERM, ``execution_timeout``): the call was not
    sent, or its retry was abandoned before re-sending; nothing of it reached Mews."""


class MewsConfigurationError(MewsError):
    """The Airflow connection or an argument is wrong; nothing was sent."""

    def _text(self) -> str:
        return self.message


class MewsResponseError(MewsError):
    """Mews answered 200 but the body is not what the contract promises."""

    may_have_been_processed = True
    hint = "The response did not match the API contract."


class MewsBadRequestError(MewsError):
    """400: malformed request, invalid field or unknown identifier (client-side bug or bad data)."""

    hint = "Fix the request data: Mews refused a field or an identifier. Not retried."


class MewsAuthenticationError(MewsError):
    """401: invalid or expired ClientToken/AccessToken, or no permission for the operation."""

    names_connection = True
    hint = (
        "Check the connection's AccessToken (password) and extra.client_token, and that the "
        "integration is enabled for this enterprise. Not retried."
    )


class MewsForbiddenError(MewsError):
    """403: a business rule refused the request; the message is for the hotel's staff."""

    hint = "A Mews business rule refused the request; fix the data it names. Not retried."


class MewsNotFoundError(MewsError):
    """404: wrong platform address or operation."""

    names_connection = True
    hint = (
        "Check the connection's host: it must be the platform address only, e.g. "
        "https://api.mews.com or https://api.mews-demo.com. Not retried."
    )


class MewsConflictError(MewsError):
    """409: the data changed meanwhile."""

    hint = "The data changed in Mews meanwhile; the hook does not repeat the request, the task's retry reads and resubmits."


class MewsRequestTimeoutError(MewsError):
    """408: the request was too heavy for Mews."""

    retryable = True
    may_have_been_processed = True
    hint = "The request was too heavy; send smaller batches (batch_size)."


class MewsRateLimitError(MewsError):
    """429 after the hook's waiting budget was spent. Surely not processed."""

    retryable = True
    hint = (
        "Rate limit of the AccessToken exceeded (Mews documents 200 requests per 30 s, one budget for every "
        "client of the token); the hook honours Retry-After and paces by the connection's rate_limit_requests."
    )


class MewsServerError(MewsError):
    """5xx: a fault on Mews's side (or a proxy in front of it)."""

    retryable = True
    may_have_been_processed = True


class MewsConnectionError(MewsError):
    """Transport failure: refused, reset, dropped or timed out."""

    retryable = True


_BY_STATUS: dict[int, type[MewsError]] = {
    400: MewsBadRequestError,
    401: MewsAuthenticationError,
    403: MewsForbiddenError,
    404: MewsNotFoundError,
    408: MewsRequestTimeoutError,
    409: MewsConflictError,
    429: MewsRateLimitError,
}


def error_class_for_status(status: int) -> type[MewsError]:
    if status >= 500:
        return MewsServerError
    return _BY_STATUS.get(status, MewsError)
