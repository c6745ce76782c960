"""Turning what the user typed into API objects: app references, app names, the default team."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any

import typer

from cli.client import Client
from cli.errors import CLIError

App = dict[str, Any]
AppArgument = Annotated[str, typer.Argument(metavar="APP", help="App slug, name or id.", show_default=False)]

SLUG_MAX = 63  # a DNS label: the slug becomes <slug>.<domain>
_PAGE = 100


def slugify(name: str) -> str:
    """``"My App_2"`` -> ``"my-app-2"``: lower-case ``[a-z0-9-]``, no leading/trailing dash, <= 63 chars.

    Returns ``""`` when nothing usable is left (the caller asks for an explicit name).
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    return slug[:SLUG_MAX].rstrip("-")


def find_app(apps: Sequence[Mapping[str, Any]], ref: str) -> Mapping[str, Any] | None:
    """The app ``ref`` names: an exact id wins, then a slug, then a name (case-insensitive last)."""
    for key in ("id", "slug", "name"):
        for app in apps:
            if app.get(key) == ref:
                return app
    folded = ref.casefold()
    matches = [app for app in apps if str(app.get("name", "")).casefold() == folded]
    return matches[0] if len(matches) == 1 else None


def iter_apps(client: Client, *, team_id: str | None = None) -> Iterator[App]:
    """Every app the caller can see (or of one team), following ``limit``/``skip`` pages."""
    skip = 0
    while True:
        params: dict[str, Any] = {"limit": _PAGE, "skip": skip}
        if team_id is not None:
            params["team_id"] = team_id
        page = client.get("/apps/", params=params)
        data: list[App] = page.get("data", [])
        yield from data
        skip += len(data)
        if not data or skip >= int(page.get("count", 0)):
            return


def resolve_app(client: Client, ref: str) -> App:
    """The app named by ``ref`` (id, slug or name). Raises CLIError "App not found"."""
    found = find_app(list(iter_apps(client)), ref)
    if found is None:
        raise app_not_found(ref)
    return dict(found)


def app_not_found(ref: str) -> CLIError:
    return CLIError(
        "App not found",
        f"No app matches {ref!r}.",
        hint="`fastapi-deploy apps` lists your apps",
        code="not_found",
    )


def default_team(client: Client) -> str:
    """The id of the user's first team (``GET /teams/``)."""
    teams = client.get("/teams/").get("data", [])
    if not teams:
        raise CLIError(
            "No teams found",
            "Your account does not belong to any team.",
            hint="Ask an administrator to add you to a team, or pass --team TEAM_ID.",
            code="not_found",
        )
    return str(teams[0]["id"])
