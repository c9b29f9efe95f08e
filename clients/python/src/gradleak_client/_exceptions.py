"""One exception tree for everything the SDK raises.

The API answers every error with an application/problem+json body (RFC 9457) holding `status`,
`detail`, `code` (a stable slug) and `request_id`; `APIStatusError.from_response` maps it to the
class of its status. Connection problems and timeouts have no status; their request id is the
one the SDK sent (the server logs it too).

    GradleakError
    ├── APIError                      status, detail, request_id, code
    │   ├── APIResponseValidationError  a 2xx answer that is not what the API sends (wrong URL?)
    │   ├── APIStatusError            the server answered with an error status
    │   │   ├── BadRequestError           400 and other 4xx
    │   │   │   └── UnprocessableEntityError  422 (a check failed: `errors`, `valid`, `mismatches`)
    │   │   ├── UnauthorizedError         401
    │   │   │   └── PermissionDeniedError 403
    │   │   ├── NotFoundError             404
    │   │   ├── RequestTimeoutError       408
    │   │   ├── ConflictError             409
    │   │   ├── RateLimitError            429 (`retry_after`)
    │   │   └── ServerError               5xx
    │   └── APIConnectionError        no answer (refused, reset, DNS)
    │       └── APITimeoutError       no answer in time
    ├── JobFailedError                a job ended failed or cancelled (`Job.raise_for_status`)
    └── WaitTimeoutError              `jobs.wait` gave up; the job itself goes on
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from gradleak_client.types import Run

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "BadRequestError",
    "ConflictError",
    "GradleakError",
    "JobFailedError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServerError",
    "UnauthorizedError",
    "UnprocessableEntityError",
    "WaitTimeoutError",
]

MAX_DETAIL_CHARS = 500


class GradleakError(Exception):
    """Base of every exception the gradleak client raises."""


class APIError(GradleakError):
    """A request to the gradleak API did not succeed.

    `status` is None when no response came back; `request_id` is what to quote in a report.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        code: str | None = None,
    ) -> None:
        self.detail = detail
        self.status = status
        self.request_id = request_id
        self.code = code
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" (request id {self.request_id})" if self.request_id else ""
        prefix = f"{self.status} " if self.status is not None else ""
        return f"{prefix}{self.detail}{where}"


class APIResponseValidationError(APIError):
    """A successful status with a body that is not what the gradleak API sends: usually a URL
    that points at something else (a proxy page), or a server of an incompatible version."""


class APIStatusError(APIError):
    """The API answered with an error status; `body` is the problem+json body (or None)."""

    def __init__(
        self,
        detail: str,
        *,
        response: httpx.Response,
        body: dict[str, Any] | None,
        status: int,
        request_id: str | None,
        code: str | None,
    ) -> None:
        self.response = response
        self.body = body
        super().__init__(detail, status=status, request_id=request_id, code=code)

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIStatusError:
        """The exception for an error response, of the class its status maps to."""
        body = _problem_body(response)
        status = response.status_code
        request_id = response.headers.get("x-request-id")
        code: str | None = None
        if body is not None:
            detail = str(body.get("detail") or body.get("title") or "")
            request_id = body.get("request_id") or request_id
            code = body.get("code")
        else:
            detail = response.text.strip()[:MAX_DETAIL_CHARS]
        detail = detail or response.reason_phrase or f"HTTP {status}"
        error_cls = status_error_class(status)
        return error_cls(
            detail, response=response, body=body, status=status, request_id=request_id, code=code
        )


class BadRequestError(APIStatusError):
    """400, or another 4xx without a class of its own (413 too large, 415 not safetensors)."""


class UnprocessableEntityError(BadRequestError):
    """422: the request was understood but a check refused it (a validation error, an unknown
    name, tensors that do not fit the architecture, knowledge not granted)."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Validation errors (loc, msg, type), if the server listed them."""
        return list((self.body or {}).get("errors") or [])

    @property
    def valid(self) -> list[str]:
        """The valid names, when an unknown name was given."""
        return list((self.body or {}).get("valid") or [])

    @property
    def mismatches(self) -> list[str]:
        """The first tensors that do not fit the architecture."""
        return list((self.body or {}).get("mismatches") or [])

    @property
    def unsupported_ops(self) -> list[str]:
        """For an ONNX model: the operators gradleak cannot attack through."""
        return list((self.body or {}).get("unsupported_ops") or [])


class UnauthorizedError(APIStatusError):
    """401: the API key is missing, invalid or revoked."""


class PermissionDeniedError(UnauthorizedError):
    """403: the key is valid but may not do this."""


class NotFoundError(APIStatusError):
    """404: no such upload, job or artifact for this key's tenant."""


class RequestTimeoutError(APIStatusError):
    """408: the server gave up waiting for the request."""


class ConflictError(APIStatusError):
    """409: e.g. cancelling a finished job, or an idempotency key reused for another request."""


class RateLimitError(APIStatusError):
    """429: too many requests; `retry_after` is the server's advice in seconds, if it gave one."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.response.headers.get("retry-after"))


class ServerError(APIStatusError):
    """5xx: the service failed or a backing service is unavailable; quote the request id."""


class APIConnectionError(APIError):
    """No response: the connection was refused or broken, or the name did not resolve."""

    def __init__(self, detail: str, *, request_id: str | None = None) -> None:
        super().__init__(detail, status=None, request_id=request_id, code="connection_error")


class APITimeoutError(APIConnectionError):
    """No response within the client's timeout."""

    def __init__(self, detail: str, *, request_id: str | None = None) -> None:
        super().__init__(detail, request_id=request_id)
        self.code = "timeout"


class JobFailedError(GradleakError):
    """A job ended without a result: `job.status` is failed or cancelled, `job.error` says why."""

    def __init__(self, job: Run) -> None:
        self.job = job
        reason = f": {job.error.code}: {job.error.message}" if job.error is not None else ""
        super().__init__(f"job {job.id} {job.status}{reason}")


class WaitTimeoutError(GradleakError):
    """`jobs.wait` timed out; the job goes on (`job` is its last known state)."""

    def __init__(self, job: Run, timeout: float) -> None:
        self.job = job
        self.timeout = timeout
        super().__init__(f"job {job.id} is still {job.status} after {timeout:g}s")


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status: int) -> type[APIStatusError]:
    if status in _STATUS_CLASSES:
        return _STATUS_CLASSES[status]
    if status >= 500:
        return ServerError
    return BadRequestError


def _problem_body(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date."""
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
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
