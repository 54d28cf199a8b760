"""The ``qlog serve`` application: Cloudflare's API (``api.py``) under
``/client/v4`` and at the root, the dashboard at ``/`` (``dashboard.py``)
and Prometheus metrics at ``/metrics`` (``metrics.py``), all behind one
bearer token.

The token is compared in constant time.  A browser gives it once, as
``/?token=...`` (or by the dashboard's form), and gets it back as an
HttpOnly, SameSite=Strict cookie; the dashboard's forms also carry a
digest of it, so another site cannot post them with the visitor's cookie.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Awaitable, Callable, Optional

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import errors
from .._queue import Broker
from .api import UNAUTHORIZED, Api, ApiError, api_error, error_response

COOKIE = "qlog_token"
DEFAULT_MAX_BODY = 8 << 20
"""Bytes of a request body the server reads at most (``--max-body``)."""


def form_digest(token: Optional[str]) -> str:
    """What the dashboard's forms carry to show they came from its own page."""
    return hmac.new((token or "").encode(), b"qlog dashboard form", hashlib.sha256).hexdigest()[:32]


class _Auth:
    """Refuse a request without the token (401) or with another one (403)."""

    def __init__(self, app: ASGIApp, token: Optional[str]) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = None
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        elif scope["path"] in ("/", "/dashboard") and request.query_params.get("token"):
            given = request.query_params["token"]  # a login: before any old cookie
        elif request.cookies.get(COOKIE):
            given = request.cookies[COOKIE]
        if given is None:
            if scope["path"] in ("/", "/dashboard") or scope["path"].startswith("/dashboard/"):
                from .dashboard import login_page

                await login_page()(scope, receive, send)
                return
            resp = error_response(ApiError(401, UNAUTHORIZED, "this server needs a bearer token "
                                           "(Authorization: Bearer TOKEN)"))
            resp.headers["www-authenticate"] = "Bearer"
            await resp(scope, receive, send)
            return
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            await error_response(ApiError(403, UNAUTHORIZED, "the token is not this server's"))(
                scope, receive, send)
            return
        await self.app(scope, receive, send)


def _handler(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return error_response(e)
        except errors.QlogError as e:
            return error_response(api_error(e))

    return run


def build_app(broker: Broker, token: Optional[str], max_body: int = DEFAULT_MAX_BODY) -> Starlette:
    """The ASGI application serving ``broker``."""
    from .dashboard import Dashboard
    from .metrics import prometheus

    api = Api(broker, max_body)
    api_routes = [Route(r.path, _handler(r.endpoint), methods=r.methods) for r in api.routes()]
    dash = Dashboard(api, token)

    async def metrics(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        text = await run_in_threadpool(prometheus, broker, api.sends)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_found(request: Request, exc: Any) -> Response:
        return error_response(ApiError(404, 7003, f"no route for {request.method} {request.url.path}"))

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        *dash.routes(),
        Mount("/client/v4", routes=api_routes),
        *api_routes,
    ]
    return Starlette(routes=routes, middleware=[Middleware(_Auth, token=token)],
                     exception_handlers={404: not_found, 405: not_found})
