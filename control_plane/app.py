"""The control plane's ASGI app: ``create_app(settings)`` builds it; its lifespan runs the platform."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from control_plane import prometheus
from control_plane.api import (
    admin,
    alerts,
    apps,
    auth,
    deployments,
    env,
    insights,
    logs,
    routers,
    scaling,
    teams,
    telemetry,
    tokens,
)
from control_plane.audit import AuditMiddleware
from control_plane.config import Settings
from control_plane.errors import APIError, api_error_handler, error_responses, http_error_handler
from control_plane.platform import Platform
from control_plane.ratelimit import RateLimits
from dashboard.routes import mount as mount_dashboard


def create_app(
    settings: Settings,
    platform: Platform | None = None,
    on_started: Callable[[Platform], None] | None = None,
) -> FastAPI:
    platform = platform or Platform(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await platform.start()
        if on_started is not None:
            on_started(platform)
        try:
            yield
        finally:
            await platform.stop()

    app = FastAPI(
        title="fastapi-deploy",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/api/docs",
        openapi_url="/api/v1/openapi.json",
        redoc_url=None,
        # The official CLI does not follow redirects: a 307 to the slashed path would be an error.
        # Paths match exactly, as declared.
        redirect_slashes=False,
    )
    app.state.platform = platform
    app.state.rate_limits = RateLimits(settings)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    # Outermost: records every mutating call, whatever the inner layers answer.
    app.add_middleware(AuditMiddleware)
    for module in (
        auth,
        teams,
        apps,
        deployments,
        logs,
        env,
        tokens,
        scaling,
        telemetry,
        insights,
        alerts,
        admin,
    ):
        app.include_router(
            module.router, prefix="/api/v1", responses=error_responses(400, 401, 403, 404, 409, 413, 429)
        )
    app.include_router(telemetry.receiver)
    app.include_router(routers.router)  # remote routers' WebSocket (control_plane/routers.py)
    app.include_router(auth.pages)
    mount_dashboard(app)  # the web pages and their assets (dashboard/routes.py)

    @app.get("/metrics", include_in_schema=False, response_model=None)
    def prometheus_metrics(request: Request) -> Response:
        """Prometheus exposition: requests, latency, instances, scale events, deploys, trace pipeline."""
        p: Platform = request.app.state.platform
        token = p.settings.metrics_token
        if token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse(
                    {"detail": {"title": "Unauthorized", "message": "/metrics needs the metrics token."}},
                    status_code=401,
                )
        return Response(prometheus.exposition(p), media_type=prometheus.CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False, response_model=None)
    def readyz(request: Request) -> dict[str, Any] | JSONResponse:
        p: Platform = request.app.state.platform
        try:
            with p.db.session() as s:
                s.connection().exec_driver_sql("SELECT 1")
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "database": str(exc)}, status_code=503)
        if not p.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok", "router_port": p.router.port, "apps_serving": len(p.fleet.serving)}

    return app
