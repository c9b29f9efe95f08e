"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer and slow every request).

RequestContextMiddleware gives each request an id (the client's X-Request-ID when it is sane),
returns it as a header, puts it in the logs, writes one access-log line (method, route, status,
time: never bodies or query strings) and records the Prometheus request metrics. It also answers
an unexpected error with the 500 problem itself: inside the request's context the error's log line
carries the request id, and the exception ends here instead of reaching the server, which would
close the keep-alive connection.

BodyLimitMiddleware enforces the size limits while the body streams in: a Content-Length above
the limit is refused with 413 before a byte of the body is read; a body without one is counted
and cut off as soon as it passes the limit.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, internal_error, problem_response, request_id_of
from api.observability import Metrics, request_id_var

access_log = logging.getLogger("gradleak.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.match(given) else "req_" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers.setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started_response:
                raise  # half a response is out: only closing the connection can tell the client
            response = internal_error(exc, request_id, scope["path"])
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], template, status, elapsed)
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status, elapsed * 1000)
            request_id_var.reset(token)


@dataclass(frozen=True)
class BodyLimit:
    allowed: int  # bytes of request body accepted
    advertised: int  # the limit the user knows (an upload's file limit, without the multipart envelope)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], BodyLimit]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit.allowed:
            response = problem_response(
                413,
                _too_large(limit),
                code="payload_too_large",
                request_id=request_id_of(scope),
                instance=scope["path"],
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.allowed:
                    raise ApiError(
                        413, _too_large(limit), code="payload_too_large", headers={"Connection": "close"}
                    )
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: BodyLimit) -> str:
    return f"the request body exceeds this server's limit of {limit.advertised} bytes"
