"""The ``fastapi-deploy`` command: the command groups composed into one Typer app.

``main()`` is the console script. It owns the per-invocation Session and is the one place where a
CLIError becomes output (``Error: ...`` on stderr, or ``{"error": ...}`` with ``--json``) and an exit status.
"""

from __future__ import annotations

import importlib
import sys

import typer

from cli import admin, alerts, apps, auth, deployments, env, insights, logs, observe, push, scale, teams
from cli.errors import CLIError
from cli.session import Session

app = typer.Typer(
    name="fastapi-deploy",
    help="Deploy FastAPI apps to your own fastapi-deploy server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(auth.app)
app.add_typer(push.app)
app.add_typer(apps.app)
app.add_typer(logs.app)
app.add_typer(observe.app)
app.add_typer(insights.app)
app.add_typer(alerts.app)
app.add_typer(env.app, name="env")
app.add_typer(deployments.app)
app.add_typer(scale.app)
app.add_typer(teams.app, name="teams")
app.add_typer(admin.app, name="admin")


def _register_server(root: typer.Typer) -> None:
    """Add ``fastapi-deploy server`` from ``cli/server.py`` when that module exists."""
    try:
        server = importlib.import_module("cli.server")
    except ModuleNotFoundError as exc:
        if exc.name == "cli.server":
            return  # not written yet: the client works without it
        _server_unavailable(root, exc)
        return
    except ImportError as exc:
        _server_unavailable(root, exc)
        return
    server.register(root)


def _server_unavailable(root: typer.Typer, exc: ImportError) -> None:
    # The module exists but cannot load (e.g. a missing optional dependency): keep every client command
    # working and say why when someone asks for the server.
    @root.command("server", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def server_command() -> None:
        """Run the control plane (unavailable: see the error)."""
        raise CLIError(
            "The server cannot start",
            f"Importing cli.server failed: {exc}",
            hint="Install the server's dependencies (pip install 'fastapi-deploy[dev]').",
        )


_register_server(app)


def main() -> None:
    """Console-script entry point."""
    session = Session()
    try:
        app(obj=session, prog_name="fastapi-deploy")
    except CLIError as err:
        session.output.error(err)
        sys.exit(err.exit_code)
    finally:
        session.close()
