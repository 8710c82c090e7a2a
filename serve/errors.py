"""The one error shape of `sdrt serve` and the HTTP status each failure answers, for both dialects and serve/ray.py.

Every 4xx/5xx body is `{"error": {"type": ..., "field": ... | null, "message": ...}}`. No web framework here (as in
fields.py): serve/edge.py turns an HttpError into the response.
"""

from __future__ import annotations

from typing import Callable, Mapping

from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.service import Cancelled, DeadlineExceeded, ServiceClosed


class HttpError(Exception):
    """An answer other than 200: status, a machine-readable type, the field (or None) and a message."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.kind, self.message, self.field)


def error_body(kind: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": kind, "field": field, "message": message}}


def invalid(field: str | None, message: str) -> HttpError:
    return HttpError(422, "invalid_request", message, field)


def failure(e: BaseException, timeout_s: float | None,
            named: Callable[[InvalidRequest], HttpError]) -> tuple[HttpError, str | None]:
    """What a request that failed after it was queued answers, and its outcome for the metrics (None: an HttpError,
    already counted where it was raised). `named` names an InvalidRequest's field as the route's clients spell it."""
    if isinstance(e, HttpError):
        return e, None
    if isinstance(e, DeadlineExceeded):
        return HttpError(504, "timeout", f"the request did not finish within {timeout_s:g} s "
                                         "(the server's per-request timeout)"), "deadline"
    if isinstance(e, Cancelled):
        return HttpError(499, "client_closed", str(e)), "cancelled"
    if isinstance(e, ServiceClosed):
        return HttpError(503, "shutting_down", str(e), headers={"Retry-After": "10"}), "closed"
    if isinstance(e, InvalidRequest):
        return named(e), "invalid"
    if isinstance(e, UserError):
        return invalid(None, str(e)), "invalid"
    # an engine failed: this request fails, the server goes on
    return HttpError(500, "engine_error", f"generation failed: {type(e).__name__}: {e}"), "error"
