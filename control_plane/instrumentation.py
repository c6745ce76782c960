"""What the deploy pipeline does for observability: the observability layer an instance's Python needs,
the variables that turn tracing on in an instance, and each revision's OpenAPI document (route templates
for the metrics; kept beside the build for contract diffs and downloads).

Observability never fails a deploy: a layer that cannot be installed or a schema that cannot be fetched
is logged in the build log, and the revision runs without traces or with raw-path-free "unmatched"
routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from control_plane.config import Settings
from control_plane.metrics import Metrics
from runtime.builder import BUILD_ENV_ALLOWED, find_uv
from runtime.errors import BuildError
from runtime.otel_layer import SDK, app_otel_version, ensure_layer
from runtime.routes import RouteMatcher

log = logging.getLogger("fastapi_deploy.instrumentation")

OPENAPI_PATH = "/openapi.json"
_OPENAPI_MAX = 20 * 2**20


class Instrumentation:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        token: Callable[[str], str],
        *,
        layers_dir: Path,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.token = token
        self.layers_dir = layers_dir
        self._layers: dict[str, Path | None] = {}
        self._warming: asyncio.Task[None] | None = None
        self.image_receiver: str | None = None
        """Where instances of image backends send spans (set by the platform; None: untraced)."""

    # -- the observability layer ------------------------------------------------------------------

    def warm_up(self) -> None:
        """Build the layer for the default app Python in the background (the first deploy then finds it)."""
        if not self.settings.tracing or self.settings.backend != "process":
            return

        async def run() -> None:
            await asyncio.to_thread(self.layer_for, self.settings.app_python)

        self._warming = asyncio.get_running_loop().create_task(run(), name="otel-layer-warm-up")

    def layer_for(self, python: str, sdk: str | None = None) -> Path | None:
        """The layer for an interpreter on this machine and an OpenTelemetry version (built once, then
        cached); None if it could not be built."""
        cache_key = f"{python}\0{sdk or ''}"
        if cache_key in self._layers:
            return self._layers[cache_key]
        env = {k: v for k, v in os.environ.items() if BUILD_ENV_ALLOWED.match(k)}
        try:
            layer: Path | None = ensure_layer(self.layers_dir, find_uv(None), python=python, sdk=sdk, env=env)
        except (BuildError, ValueError) as exc:
            log.warning("no observability layer for %s (OpenTelemetry %s): %s", python, sdk or SDK, exc)
            layer = None
        self._layers[cache_key] = layer
        return layer

    async def instance_env(
        self, app_id: str, app_slug: str, python: str | None, env_dir: Path | None = None
    ) -> dict[str, str]:
        """The variables that turn tracing on in an instance (none when tracing is off or impossible).
        ``python``: the interpreter on this machine (process backend) and ``env_dir`` its environment
        (the app's own OpenTelemetry version is read there); None for images (their layer is part of
        the image)."""
        if not self.settings.tracing:
            return {}
        endpoint = self.receiver_url() if python is not None else self.image_receiver
        if endpoint is None:
            return {}
        env = {
            "FASTAPI_DEPLOY_APP_NAME": app_slug,
            "FASTAPI_DEPLOY_OTLP_ENDPOINT": endpoint,
            "FASTAPI_DEPLOY_TELEMETRY_TOKEN": self.token(app_id),
            "FASTAPI_DEPLOY_TRACE_SAMPLE": repr(self.settings.trace_sample),
            "FASTAPI_DEPLOY_TRACE_SLOW_MS": repr(self.settings.trace_slow_ms),
        }
        if python is not None:
            sdk = await asyncio.to_thread(_app_version, env_dir)
            layer = await asyncio.to_thread(self.layer_for, python, sdk)
            if layer is None:
                return {}
            env["FASTAPI_DEPLOY_OTEL_PATH"] = str(layer)
            env["FASTAPI_DEPLOY_OTEL_VERSION"] = sdk or SDK
        return env

    def receiver_url(self) -> str:
        """Where instances on this machine send spans: ``instance_otlp_url`` when set, else the API on
        loopback when it listens on every interface, else its own address."""
        if self.settings.instance_otlp_url:
            return self.settings.instance_otlp_url
        host = self.settings.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.settings.port}/v1/traces"

    # -- route templates ----------------------------------------------------------------------------

    async def learn_routes(
        self, app_id: str, app_slug: str, hostname: str, where: tuple[str, int] | None, kept: Path
    ) -> RouteMatcher:
        """The revision's route templates, from its OpenAPI document: fetched from one of its ready
        instances (``where``) and kept at ``kept``, or read back from there (restarts, rollbacks)."""
        schema = await asyncio.to_thread(_read_json, kept)
        if schema is None and where is not None:
            schema = await fetch_openapi(where[0], where[1], hostname)
            if schema is not None:
                await asyncio.to_thread(_write_json, kept, schema)
        matcher = RouteMatcher.from_openapi(schema)
        self.metrics.set_app(app_id, app_slug, matcher)
        return matcher


async def fetch_openapi(host: str, port: int, hostname: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """``GET /openapi.json`` from an instance with the app's Host; None when it has none (a 404, an app
    with ``openapi_url=None``, not JSON)."""
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(f"http://{host}:{port}{OPENAPI_PATH}", headers={"Host": hostname})
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or len(response.content) > _OPENAPI_MAX:
        return None
    try:
        schema = response.json()
    except ValueError:
        return None
    return schema if isinstance(schema, dict) and isinstance(schema.get("paths"), dict) else None


def _app_version(env_dir: Path | None) -> str | None:
    return app_otel_version(env_dir.glob("lib/python*/site-packages")) if env_dir else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # a build another control plane made: no folder here
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
