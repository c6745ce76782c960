"""``fastapi-deploy env set|list|unset``: an app's environment variables.

Both changes go through the batch endpoint ``PUT /apps/{id}/environment-variables/``
(``{"upsert": {NAME: {value, is_secret}}, "delete": [...], "redeploy": bool}``), which answers the full
list. By default the server rolls out the current build with the new environment (``--no-redeploy`` not to).
Secret values never come back from the server; they show as ``[secret]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from cli.client import Client
from cli.errors import CLIError
from cli.output import JsonOption, Output
from cli.resolve import AppArgument, resolve_app
from cli.session import use

app = typer.Typer(help="Manage an app's environment variables.", no_args_is_help=True)

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_HINT = "Names start with a letter or _ and contain only letters, digits and _ (e.g. DATABASE_URL)."

NoRedeploy = Annotated[
    bool, typer.Option("--no-redeploy", help="Store the change without rolling out the app again.")
]


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise CLIError(
            "Invalid environment variable name",
            f"{name!r} is not a valid name.",
            hint=NAME_HINT,
            code="invalid_input",
        )
    return name


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` -> ``{"A": "1", "B": "x=y"}`` (split on the first ``=``; later wins)."""
    parsed: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(
                "Invalid assignment",
                f"{item!r} has no '='.",
                hint="Write NAME=VALUE, e.g. `fastapi-deploy env set my-app DEBUG=1`.",
                code="invalid_input",
            )
        parsed[check_name(name)] = value
    return parsed


@app.command("set")
def set_(
    ctx: typer.Context,
    app_ref: AppArgument,
    assignments: Annotated[
        list[str], typer.Argument(metavar="NAME=VALUE", help="Variables to set.", show_default=False)
    ],
    secret: Annotated[bool, typer.Option("--secret", help="Mark new variables as secret.")] = False,
    no_redeploy: NoRedeploy = False,
    json_output: JsonOption = False,
) -> None:
    """Set variables: `env set APP NAME=VALUE [NAME2=VALUE2 ...]`."""
    session = use(ctx, json_output)
    values = parse_assignments(assignments)
    app_id = str(resolve_app(session.client, app_ref)["id"])
    upsert = {name: {"value": value, "is_secret": secret} for name, value in values.items()}
    variables = _batch(session.client, app_id, upsert=upsert, delete=[], redeploy=not no_redeploy)
    out = session.output
    out.emit({"app_id": app_id, "set": list(values), "redeploy": not no_redeploy, "data": variables})
    stored = {v.get("name"): v for v in variables}
    for name in values:
        secret_now = stored.get(name, {}).get("is_secret")
        out.say(f"{'Secret environment variable' if secret_now else 'Environment variable'} {name} set.")
    _say_redeploy(out, no_redeploy)


@app.command("list")
def list_(ctx: typer.Context, app_ref: AppArgument, json_output: JsonOption = False) -> None:
    """List variables (secret values show as [secret])."""
    session = use(ctx, json_output)
    app_id = str(resolve_app(session.client, app_ref)["id"])
    variables: list[dict[str, Any]] = session.client.get(f"/apps/{app_id}/environment-variables/")["data"]
    out = session.output
    if out.json_mode:
        out.emit({"app_id": app_id, "data": variables})
        return
    if not variables:
        out.say("No environment variables.")
        return
    out.table(
        ["NAME", "VALUE", "UPDATED"],
        [[v["name"], display_value(v), str(v.get("updated_at") or "-")] for v in variables],
    )


@app.command("unset")
def unset(
    ctx: typer.Context,
    app_ref: AppArgument,
    names: Annotated[
        list[str], typer.Argument(metavar="NAME", help="Variables to remove.", show_default=False)
    ],
    no_redeploy: NoRedeploy = False,
    json_output: JsonOption = False,
) -> None:
    """Remove variables (names that don't exist are ignored)."""
    session = use(ctx, json_output)
    checked = [check_name(name) for name in names]
    app_id = str(resolve_app(session.client, app_ref)["id"])
    variables = _batch(session.client, app_id, upsert={}, delete=checked, redeploy=not no_redeploy)
    out = session.output
    out.emit({"app_id": app_id, "unset": checked, "redeploy": not no_redeploy, "data": variables})
    for name in checked:
        out.say(f"Environment variable {name} removed.")
    _say_redeploy(out, no_redeploy)


def display_value(variable: dict[str, Any]) -> str:
    value = variable.get("value")
    if value is None:
        return "[secret]" if variable.get("is_secret") else "-"
    return str(value)


def _batch(
    client: Client, app_id: str, *, upsert: dict[str, Any], delete: list[str], redeploy: bool
) -> list[dict[str, Any]]:
    answer = client.put(
        f"/apps/{app_id}/environment-variables/",
        json={"upsert": upsert, "delete": delete, "redeploy": redeploy},
    )
    data: list[dict[str, Any]] = answer.get("data", []) if isinstance(answer, dict) else []
    return data


def _say_redeploy(out: Output, no_redeploy: bool) -> None:
    if no_redeploy:
        out.say("Not redeployed: the change applies to the next deployment.")
    else:
        out.say("The app is being redeployed with the new environment.")
