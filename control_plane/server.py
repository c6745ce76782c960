"""Running the control plane: uvicorn (uvloop + httptools) serving the API, with the router, the
deployer and the instances in the same event loop."""

from __future__ import annotations

import logging
import sys

import uvicorn

from control_plane.app import create_app
from control_plane.config import Settings
from control_plane.platform import Platform


def _banner(platform: Platform) -> None:
    s = platform.settings
    b = platform.bootstrap
    lines = [
        "",
        "fastapi-deploy is running",
        f"  API        {s.api_url}/api/v1   (docs: {s.api_url}/api/docs)",
        f"  Dashboard  {s.api_url}/",
        f"  Apps       {s.app_url('<app>')}   (router on {s.router_host}:{platform.router.port})",
        f"  Data       {s.data_dir.resolve()}",
        f"  Database   {'PostgreSQL' if s.database_url else 'SQLite (WAL)'}",
    ]
    if b is not None and b.admin_token and not s.admin_token:
        lines += [
            "",
            f"  Admin token (shown once, stored hashed; user {b.admin_email}):",
            f"    {b.admin_token}",
        ]
    lines += ["", f"  Log in:  fastapi-deploy login --url {s.api_url} --token <admin token>", ""]
    print("\n".join(lines), file=sys.stderr, flush=True)


def run(settings: Settings, *, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then drain and stop every instance."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings, on_started=_banner)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        timeout_graceful_shutdown=15,
        access_log=False,
    )
    uvicorn.Server(config).run()
