"""ASGI middleware: request ids, body size limit, access log and request metrics.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and the
latency covers the whole stream.

It is also where a bug (an unexpected exception) becomes a 500 in OpenAI's shape. Starlette's own
catch-all answers the 500 but then re-raises, and uvicorn, seeing an exception after a response,
closes the keep-alive connection: the client's next request on it fails with a reset. Answered
here, the exception stops here and the connection stays usable.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from server.api.errors import APIError, internal_error
from server.api.metrics import Metrics, route_label

log = logging.getLogger("agent_server")
access_log = logging.getLogger("agent_server.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Scope = dict[str, Any]


class RequestMiddleware:
    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.too_large = APIError(
            413, f"Request body is larger than the limit of {max_body_bytes} bytes.", code="request_too_large"
        )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _SAFE_ID.match(incoming) else "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        route = route_label(scope.get("path", ""))
        start = time.perf_counter()
        status = 500
        started = False
        limit = self.max_body_bytes

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        async def reject(error: APIError) -> None:
            await error.response()(scope, receive, send_with_id)


        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await reject(self.too_large)
                return
            # Buffer the body (bounded) so that a chunked upload over the limit is a 413 too,
            # then replay it; later receive() calls (disconnect detection) go to the server.
            body = bytearray()
            more = scope.get("method") in ("POST", "PUT", "PATCH")
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    status = 499  # client went away while sending
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    await reject(self.too_large)
                    return
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            try:
                await self.app(scope, replay, send_with_id)
            except Exception:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                if started:
                    raise  # headers are out: only dropping the connection can tell the client
                await reject(internal_error())
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            access_log.info(
                "%s %s %s %d %.1fms", request_id, scope.get("method"), scope.get("path"), status, elapsed * 1000
            )
