"""Every error leaves the API as one application/problem+json body (RFC 9457), mapped here once.

Domain exceptions (service/errors.py) carry the message the user sees; this module only decides
the status. Bodies: type, title, status, detail, instance, request_id and `code` (a stable slug
the SDK maps back to its exceptions), plus `errors` (validation), `valid` (unknown names) or
`mismatches` (tensors that do not fit the architecture), `estimate` (a job over the memory
budget) or `quota` and `limit` (429, with a Retry-After header). The request id is also the
X-Request-ID response header and appears in the logs.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    ArtifactError,
    DatasetNotFoundError,
    GradleakError,
    JobCancelledError,
    KnowledgeError,
    MetricUnavailableError,
    NotFoundError,
    ShapeMismatchError,
    SpecError,
    UnknownNameError,
    UnsupportedFormatError,
    UnsupportedOpsError,
)
from service.jobs.budget import BudgetError
from service.jobs.execute import TRANSIENT_ERRORS
from service.jobs.quotas import QuotaExceededError
from service.jobs.records import error_code

log = logging.getLogger("gradleak.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:gradleak:problem:"
MAX_LISTED_ERRORS = 20
RETRY_AFTER_S = 5

# The most specific class wins (looked up along the exception's MRO).
STATUS: dict[type[GradleakError], int] = {
    NotFoundError: 404,
    UnsupportedFormatError: 415,
    ShapeMismatchError: 422,
    ArtifactError: 422,
    KnowledgeError: 422,
    UnknownNameError: 422,
    SpecError: 422,
    DatasetNotFoundError: 422,
    MetricUnavailableError: 422,
    JobCancelledError: 409,
    QuotaExceededError: 429,
    GradleakError: 400,
}


class ApiError(StarletteHTTPException):
    """An HTTP-level refusal with no domain exception behind it (auth, size, conflicts)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.code = code or HTTPStatus(status).phrase.lower().replace(" ", "_")
        self.extra = extra or {}


def request_id_of(scope: MutableMapping[str, Any]) -> str | None:
    state = scope.get("state") or {}
    return state.get("request_id")


def problem_response(
    status: int,
    detail: str,
    *,
    code: str,
    request_id: str | None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": request_id,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extra or {})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _problem(request: Request, status: int, detail: str, code: str, **kw: Any) -> JSONResponse:
    return problem_response(
        status, detail, code=code, request_id=request_id_of(request.scope), instance=request.url.path, **kw
    )


def status_for(exc: GradleakError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 400


def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GradleakError)
    extra: dict[str, Any] = {}
    if isinstance(exc, UnknownNameError):
        extra["valid"] = exc.valid
    if isinstance(exc, ShapeMismatchError):
        extra["mismatches"] = exc.mismatches
    headers = None
    if isinstance(exc, BudgetError):
        extra["estimate"] = {**exc.estimate.to_dict(), "limit_bytes": exc.limit_bytes}
    if isinstance(exc, QuotaExceededError):
        extra.update(quota=exc.quota, limit=exc.limit)
        headers = {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, UnsupportedOpsError):
        extra["unsupported_ops"] = exc.ops
    return _problem(request, status_for(exc), str(exc), error_code(exc), extra=extra, headers=headers)


def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, ApiError):
        return _problem(request, exc.status_code, exc.detail, exc.code, headers=exc.headers, extra=exc.extra)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if exc.detail != phrase else _DEFAULT_DETAIL.get(exc.status_code, phrase)
    code = phrase.lower().replace(" ", "_")
    return _problem(request, exc.status_code, str(detail), code, headers=exc.headers)


_DEFAULT_DETAIL = {
    404: "no such resource; see /docs for the API",
    405: "this method is not allowed here; see /docs for the API",
}


def validation_errors(errors: list[Any], prefix: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """Location, message and type of each error; never the input (it may be private data)."""
    return [
        {"loc": [*prefix, *e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors[:MAX_LISTED_ERRORS]
    ]


def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    errors = validation_errors(list(exc.errors()))
    where, message = "", "invalid request"
    if errors:
        where, message = ".".join(str(p) for p in errors[0]["loc"]), errors[0]["msg"]
    detail = f"{where}: {message}" if where else message
    if len(exc.errors()) > 1:
        detail += f" (and {len(exc.errors()) - 1} more)"
    return _problem(request, 422, detail, "validation", extra={"errors": errors})


def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("a backing service is unavailable: %s: %s", type(exc).__name__, exc)
    return _problem(
        request,
        503,
        "a backing service (state store, queue or artifact store) is unavailable; retry shortly",
        "unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def internal_error(exc: Exception, request_id: str | None, path: str) -> JSONResponse:
    """The 500 for an unexpected error; the log has the details, the client gets the request id."""
    log.error("unhandled error on %s (request %s)", path, request_id, exc_info=exc)
    return problem_response(
        500,
        "an internal error occurred; quote the request id when you report it",
        code="internal",
        request_id=request_id,
        instance=path,
        headers={"X-Request-ID": request_id} if request_id else None,
    )


def _internal(request: Request, exc: Exception) -> JSONResponse:
    # Reached only by errors outside RequestContextMiddleware, which answers the others itself.
    return internal_error(exc, request_id_of(request.scope), request.url.path)


def install(app: FastAPI) -> None:
    app.add_exception_handler(GradleakError, _domain)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)
    for cls in TRANSIENT_ERRORS:
        app.add_exception_handler(cls, _unavailable)
    app.add_exception_handler(Exception, _internal)
