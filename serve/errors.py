"""The error shapes of `sdrt serve` and the HTTP status each failure answers, for both dialects and serve/ray.py.

Every 4xx/5xx body is `{"error": {"type": ..., "field": ... | null, "message": ...}}`, except under /v1/ (the OpenAI
routes), where it is OpenAI's error object `{"error": {"message", "type", "param", "code"}}` and an invalid request
is 400 instead of 422, so the `openai` SDK raises BadRequestError with `e.param` naming the field (`rendered`). No web
framework here (as in fields.py): serve/edge.py turns an HttpError into the response.
"""

from __future__ import annotations

from typing import Callable, Mapping

from sdrt.runtime.errors import UserError
from sdrt.runtime.fields import InvalidRequest
from sdrt.runtime.service import Cancelled, DeadlineExceeded, ServiceClosed


class HttpError(Exception):
    """An answer other than 200: status, a machine-readable type, the field (or None) and a message."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field
        self.headers = dict(headers or {})
        self.code = code  # OpenAI's error code where it is more precise than the kind (e.g. unknown_parameter)

    def body(self) -> dict:
        return error_body(self.kind, self.message, self.field)


def error_body(kind: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": kind, "field": field, "message": message}}


def invalid(field: str | None, message: str, code: str | None = None) -> HttpError:
    return HttpError(422, "invalid_request", message, field, code=code)


# ---- OpenAI's error object, for the routes under /v1/ ------------------------------------------------------------

OPENAI_PREFIX = "/v1/"
# OpenAI answers a wrong or missing key with 401 {"type": "invalid_request_error", "code": "invalid_api_key"}; a
# full queue is sdrt's own 429 (the SDK retries it after Retry-After); every 5xx is a "server_error"
_OPENAI_CODES = {"invalid_request": "invalid_value", "unauthorized": "invalid_api_key", "not_found": "not_found",
                 "too_large": "request_too_large", "queue_full": "queue_full"}


def openai_body(error: HttpError) -> dict:
    status = 400 if error.status == 422 else error.status
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return {"error": {"message": error.message, "type": kind, "param": error.field,
                      "code": error.code or _OPENAI_CODES.get(error.kind, error.kind)}}


def rendered(error: HttpError, path: str) -> tuple[int, dict]:
    """The status and body `error` answers on `path`: OpenAI's (422 → 400) under /v1/, sdrt's elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        return (400 if error.status == 422 else error.status), openai_body(error)
    return error.status, error.body()


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
