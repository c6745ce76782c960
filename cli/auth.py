"""``login``, ``logout`` and ``whoami``: the server URL and the token the other commands use."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from cli import config
from cli.client import Client
from cli.errors import CLIError
from cli.output import JsonOption
from cli.session import use

app = typer.Typer()


@app.command()
def login(
    ctx: typer.Context,
    token: Annotated[
        str | None, typer.Option("--token", help="An API token for the server (asked for without --email).")
    ] = None,
    email: Annotated[
        str | None,
        typer.Option("--email", help="Log in with email and password instead (the password is asked for)."),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    url: Annotated[
        str | None, typer.Option("--url", help=f"Control plane URL (default: {config.DEFAULT_URL}).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Log in with a token, or with email and password; store the token (config.json, mode 0600)."""
    session = use(ctx, json_output)
    base = config.normalize_url(url or session.environ.get("FASTAPI_DEPLOY_URL") or config.DEFAULT_URL)
    directory = config.config_dir(session.environ)
    if email and not token:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = typer.prompt("Password", hide_input=True)
        with Client(config.Config(url=base, token=None, directory=directory)) as client:
            token = str(
                client.post("/auth/login", json={"email": email, "password": password})["access_token"]
            )
    elif not token:
        token = typer.prompt("Token", hide_input=True)
    assert token is not None
    with Client(config.Config(url=base, token=token.strip(), directory=directory)) as client:
        user = client.get("/users/me")
    path = config.save(directory, url=base, token=token.strip())
    out = session.output
    out.emit({"url": base, "user": user, "config_file": str(path)})
    out.say(f"Logged in to {base} as {_who(user)}.")


@app.command()
def logout(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Revoke the stored token on the server and forget it locally."""
    session = use(ctx, json_output)
    out = session.output
    directory = config.config_dir(session.environ)
    stored = config.read_stored(directory)
    revoked = False
    if stored.get("token") and stored.get("url"):
        stored_config = config.Config(url=stored["url"], token=stored["token"], directory=directory)
        with Client(stored_config) as client:
            try:
                client.post("/logout", timeout=5.0)
                revoked = True
            except CLIError as err:
                if getattr(err, "status", None) == 404:  # a server without /logout: nothing to revoke
                    revoked = True
                else:
                    out.warn("Couldn't revoke the token on the server", f"{err.title}. {err.message}".strip())
    removed = config.remove(directory)
    out.emit({"logged_out": removed, "revoked": revoked})
    out.say("Logged out." if removed else "You were not logged in.")


@app.command()
def whoami(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Show the user behind the current token."""
    session = use(ctx, json_output)
    user = session.client.get("/users/me")
    out = session.output
    out.emit({"url": session.config.url, "user": user})
    out.say(f"{_who(user)} on {session.config.url}")


def _who(user: Any) -> str:
    if not isinstance(user, dict):
        return "unknown user"
    email, name = user.get("email"), user.get("name")
    who = f"{name} <{email}>" if name and name != email else str(email)
    return who + (" (admin)" if user.get("is_admin") else "")
