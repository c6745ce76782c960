"""``fastapi-deploy server``: the one command that runs the platform instead of calling it.

It is the only CLI module that imports the control plane, and it does so lazily, inside the command:
every other command talks to the platform over HTTP only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def server(
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory [env: FASTAPI_DEPLOY_DATA_DIR; default ./data]")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="API interface [env: FASTAPI_DEPLOY_HOST; default 127.0.0.1]")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="API port [env: FASTAPI_DEPLOY_PORT; default 8000]")
    ] = None,
    router_port: Annotated[
        int | None, typer.Option(help="Apps' router port [env: FASTAPI_DEPLOY_ROUTER_PORT; default 8080]")
    ] = None,
    domain: Annotated[
        str | None,
        typer.Option(help="Apps are served at NAME.DOMAIN [env: FASTAPI_DEPLOY_DOMAIN; default localhost]"),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="Where instances run: process, docker or kubernetes [env: FASTAPI_DEPLOY_BACKEND]"),
    ] = None,
    base_image: Annotated[
        str | None,
        typer.Option(
            help="docker: the image apps are built on "
            "[env: FASTAPI_DEPLOY_BASE_IMAGE; default python:3.12-slim]"
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            help="docker: push images to this registry, HOST:PORT/NAMESPACE "
            "[env: FASTAPI_DEPLOY_REGISTRY; credentials: FASTAPI_DEPLOY_REGISTRY_USERNAME, _PASSWORD]"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the platform: API, dashboard, router and apps, on embedded defaults (SQLite, process backend)."""
    from control_plane.config import Settings
    from control_plane.server import run

    settings = Settings.from_env(
        data_dir=data_dir,
        host=host,
        port=port,
        router_port=router_port,
        domain=domain,
        backend=backend,
        base_image=base_image,
        registry=registry,
    )
    run(settings, log_level=log_level)


def router(
    control_plane: Annotated[
        str | None,
        typer.Option(help="The control plane's URL [env: FASTAPI_DEPLOY_CONTROL_PLANE_URL]"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface [env: FASTAPI_DEPLOY_ROUTER_HOST; default 0.0.0.0]")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Apps' port [env: FASTAPI_DEPLOY_ROUTER_PORT; default 8080]")
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(help="Health: /healthz /readyz /routes [env: FASTAPI_DEPLOY_ROUTER_HEALTH_PORT; 8081]"),
    ] = None,
    endpoint_slices: Annotated[
        bool | None,
        typer.Option(
            "--endpoint-slices/--no-endpoint-slices",
            help="Follow the pods' EndpointSlices (Kubernetes) [env: FASTAPI_DEPLOY_ROUTER_ENDPOINTSLICES]",
        ),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(help="Whose EndpointSlices; empty: all [env: FASTAPI_DEPLOY_KUBERNETES_NAMESPACE]"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run an edge router on its own, fed by the control plane (several of them on Kubernetes).

    The token is FASTAPI_DEPLOY_ROUTER_TOKEN, the same as the control plane's."""
    import asyncio
    import logging
    import signal

    from runtime.edge import Edge, config_from_env

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    try:
        config = config_from_env(
            control_plane=control_plane,
            host=host,
            port=port,
            health_port=health_port,
            endpoint_slices=endpoint_slices,
            namespace=namespace,
        )
    except ValueError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Edge(config).run(stop)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def register(app: typer.Typer) -> None:
    app.command("server")(server)
    app.command("router")(router)
