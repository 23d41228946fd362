"""The API as an ASGI application (FastAPI): authentication, errors, routes, console.

- Every path needs `Authorization: Bearer <token>` (compared in constant time),
  the OpenAPI schema (/openapi.json) included; only the web console's static
  files (/console/..., which hold no data) are served without it, so that a
  browser can load the login form.
- Errors are JSON `{"error": "what happened and what to do"}` with a 4xx status
  for a bad request (400 bad value, 401 no or wrong token, 404 no such thing,
  405 wrong method, 409 refused in the current state, 422 malformed body or
  parameter) and 503 when a service the connector needs does not answer.
- The routes live in `routes.py`, one router per resource; each reads what it
  needs from `ApiServices`. A new endpoint is a function in a router, and a new
  use case one more field of `ApiServices`.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from connector import __version__
from connector.daemon.api.routes import ApiServices, routers
from connector.errors import (
    ConfigError,
    ConnectorError,
    InvalidInputError,
    NotFoundError,
    TransientError,
)
from connector.logging import get_logger, scrub
from connector.secrets import Secret

log = get_logger(__name__)

CONSOLE_DIR = Path(__file__).parent / "console"
CONSOLE_PREFIX = "/console"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_COMMON_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    ),
]
_UNAUTHORIZED = (
    b'{"error":"a bearer token is required: send the header '
    b'Authorization: Bearer <the token of the [api] section>"}'
)


MAX_BODY = 64 * 1024


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return MAX_BODY + 1
    return 0


def _is_public(path: str) -> bool:
    """The console's static files, and the redirect to them: no data, no token."""
    return path in ("/", CONSOLE_PREFIX) or path.startswith(CONSOLE_PREFIX + "/")


class TokenGate:
    """ASGI middleware: every request but the console's static files needs the token;
    it also counts requests by route and status, and adds the security headers."""

    def __init__(self, app: ASGIApp, token: Secret, requests: Counter) -> None:
        self.app = app
        self._token = token.reveal().encode()
        self._requests = requests

    def _authorized(self, scope: Scope) -> bool:
        presented = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                presented = value
                break
        scheme, _, credential = presented.partition(b" ")
        # Always compare, so the time taken says nothing about the token.
        same = hmac.compare_digest(credential.strip(), self._token)
        return same and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        status = {"code": 500}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), *_COMMON_HEADERS]
            await send(message)

        if not _is_public(path) and not self._authorized(scope):
            client = scope.get("client") or ("?", 0)
            log.warning("api.unauthorized", client=client[0], path=scrub(path[:100]))
            self._requests.labels("unauthorized", "401").inc()
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                        (b"www-authenticate", b'Bearer realm="connector"'),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _UNAUTHORIZED})
            return
        if _declared_length(scope) > MAX_BODY:
            body = b'{"error":"the request body is too large: the API takes at most 64 KiB"}'
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            self._requests.labels("too large", "413").inc()
            return
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("console" if _is_public(path) else "other")
            self._requests.labels(label, str(status["code"])).inc()


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": scrub(message), **extra}, status_code=status)


def _status_of(exc: ConnectorError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, InvalidInputError | ConfigError):
        return 400
    if isinstance(exc, TransientError):
        return 503
    return 500


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or str(loc[0] if loc else "request")


def build_app(services: ApiServices, token: Secret, requests: Counter) -> ASGIApp:
    """The ASGI application: the routes of `routes.py` behind the token gate."""
    api = FastAPI(
        title="Replication connector API",
        version=__version__,
        description=(
            "Jobs, runs, the server catalog, the fleet, status, readiness and metrics of the "
            "connector. Every endpoint needs `Authorization: Bearer <token>`."
        ),
        docs_url=None,  # Swagger UI and ReDoc load from CDNs: the schema alone is served
        redoc_url=None,
    )
    api.state.services = services
    for router in routers():
        api.include_router(router)

    @api.exception_handler(ConnectorError)
    async def _connector_error(_request: Request, exc: ConnectorError) -> JSONResponse:
        return _error(_status_of(exc), str(exc))

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": _field(e.get("loc", ())), "problem": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        fields = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        return _error(
            422,
            f"the request is not valid ({fields}); correct it (see /openapi.json)",
            details=details,
        )

    def allowed(path: str) -> str:
        """Every method of every route of the path (Starlette names only one route's)."""
        methods: set[str] = set()
        for route in api.routes:
            regex = getattr(route, "path_regex", None)
            if regex is not None and regex.match(path):
                methods |= set(getattr(route, "methods", None) or ())
        return ", ".join(sorted(methods - {"HEAD"}))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {
            404: "no such endpoint or object; the endpoints are listed in /openapi.json",
            405: "this endpoint does not take that method; see /openapi.json",
        }
        message = messages.get(exc.status_code, exc.detail)
        response = _error(exc.status_code, str(message))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:
            response.headers["Allow"] = allowed(request.url.path)
        return response

    @api.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("api.error", error=scrub(f"{type(exc).__name__}: {exc}"))
        return _error(500, "internal error; the connector's log has the details")

    @api.get("/", include_in_schema=False)
    async def _root() -> RedirectResponse:
        return RedirectResponse(CONSOLE_PREFIX + "/", status_code=302)

    api.mount(CONSOLE_PREFIX, StaticFiles(directory=CONSOLE_DIR, html=True), name="console")

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(
                title=api.title,
                version=api.version,
                description=api.description,
                routes=api.routes,
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerToken": {"type": "http", "scheme": "bearer"}
            }
            schema["security"] = [{"bearerToken": []}]
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    return TokenGate(api, token, requests)
