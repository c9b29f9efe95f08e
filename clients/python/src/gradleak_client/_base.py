"""What the sync and async clients share: configuration, request building, the retry policy and
the mapping of error responses to exceptions. The two clients differ only in how they send and
sleep (`_client.py`).

Retries: connection errors, timeouts, 408, 429 and 5xx are retried up to `max_retries` times with
exponential backoff and jitter; a Retry-After header (seconds or an HTTP date) sets the delay
instead, up to MAX_RETRY_AFTER (a longer one is not waited for: the error is raised with it).
Every POST carries one Idempotency-Key for all of its attempts, so a job submitted twice because
a response was lost is still one job.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from gradleak_client._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    parse_retry_after,
)
from gradleak_client._version import __version__

log = logging.getLogger("gradleak_client")

ENV_URL = "GRADLEAK_URL"
ENV_API_KEY = "GRADLEAK_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8731"  # where `gradleak serve` listens by default
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0
RETRY_STATUSES = frozenset({408, 429})

# Failures after which the request may not have reached the server, or its answer was lost.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

M = TypeVar("M", bound=BaseModel)
Timeout = float | httpx.Timeout | None


@dataclass(frozen=True)
class RequestOptions:
    """One API call, before any attempt is made."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    data: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    timeout: Timeout | None = None
    stream: bool = False
    follow_redirects: bool = False


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


def new_idempotency_key() -> str:
    return "glc-" + secrets.token_hex(16)


def is_retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def backoff_delay(retries_taken: int) -> float:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... capped at MAX_RETRY_DELAY, each
    shortened by up to a quarter at random so that many clients do not retry in lockstep."""
    delay = min(INITIAL_RETRY_DELAY * 2.0**retries_taken, MAX_RETRY_DELAY)
    return delay * (1.0 - 0.25 * random.random())


class BaseClient:
    """Configuration and the pieces of a request that do not depend on sync or async I/O."""

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        url = base_url or os.environ.get(ENV_URL) or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the gradleak URL must start with http:// or https://, got {url!r}")
        self.base_url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY) or None
        self.timeout: Timeout = timeout
        self.max_retries = max_retries
        self._default_headers = dict(default_headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    @property
    def user_agent(self) -> str:
        return f"gradleak-client/{__version__} python/{platform.python_version()}"

    def _headers(
        self, options: RequestOptions, request_id: str, idempotency_key: str | None
    ) -> dict[str, str]:
        headers = {
            "User-Agent": self.user_agent,
            "Accept": "application/json",
            "X-Request-ID": request_id,
            **self._default_headers,
            **options.headers,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return headers

    def _build_request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        options: RequestOptions,
        request_id: str,
        key: str | None,
    ) -> httpx.Request:
        timeout = self.timeout if options.timeout is None else options.timeout
        return http.build_request(
            options.method,
            f"{self.base_url}/{options.path.lstrip('/')}",
            params={k: v for k, v in (options.params or {}).items() if v is not None},
            json=options.json,
            files=options.files,
            data=options.data,
            headers=self._headers(options, request_id, key),
            timeout=timeout,
        )

    @staticmethod
    def _idempotency_key(options: RequestOptions) -> str | None:
        if options.idempotency_key is not None:
            return options.idempotency_key
        return new_idempotency_key() if options.method == "POST" else None

    def _retry_delay(self, retries_taken: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before the next attempt, or None when no further attempt is made."""
        if retries_taken >= self.max_retries:
            return None
        if response is not None:
            advised = parse_retry_after(response.headers.get("retry-after"))
            if advised is not None:
                return advised if advised <= MAX_RETRY_AFTER else None
        return backoff_delay(retries_taken)

    @staticmethod
    def _connection_error(exc: Exception, options: RequestOptions, request_id: str) -> APIConnectionError:
        what = f"{options.method} {options.path}"
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"{what} timed out ({type(exc).__name__})", request_id=request_id)
        return APIConnectionError(
            f"{what} failed: cannot reach the gradleak API ({type(exc).__name__}: {exc})",
            request_id=request_id,
        )

    @staticmethod
    def _log_retry(options: RequestOptions, delay: float, reason: str, attempt: int) -> None:
        log.info(
            "retrying %s %s in %.2fs (%s; attempt %d)", options.method, options.path, delay, reason, attempt
        )

    @staticmethod
    def _status_error(response: httpx.Response) -> APIStatusError:
        return APIStatusError.from_response(response)

    @staticmethod
    def _parse(response: httpx.Response, cast_to: type[M]) -> M:
        try:
            return cast_to.model_validate_json(response.content)
        except ValidationError as e:
            raise APIResponseValidationError(
                f"unexpected answer from {response.request.method} {response.request.url.path}: "
                f"not a {cast_to.__name__} ({e.error_count()} problems; is the URL a gradleak API?)",
                status=response.status_code,
                request_id=response.headers.get("x-request-id"),
            ) from None
