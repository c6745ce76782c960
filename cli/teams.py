"""``fastapi-deploy teams ...``: your teams, their members and roles, their quotas.

    teams                                   the teams you belong to, with your role
    teams create NAME [--slug S]            a new team, you its owner
    teams members TEAM                      who is in it, with which role
    teams add TEAM EMAIL [--role member]    add an existing user (admins and owners)
    teams role TEAM EMAIL ROLE              change a member's role
    teams remove TEAM EMAIL                 remove a member (or yourself: leave)
    teams quota TEAM                        limits and usage
    teams delete TEAM                       delete an empty team (owners)

Roles are viewer < member < admin < owner; ``docs/ROLES.md`` says what each may do.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli.admin import TeamArgument, find_team, render_quota
from cli.client import Client
from cli.errors import CLIError
from cli.output import JsonOption
from cli.session import use

app = typer.Typer(help="Your teams, their members and roles.")

RoleArgument = Annotated[str, typer.Argument(metavar="ROLE", help="viewer, member, admin or owner.")]


def _member(client: Client, team_id: str, email: str) -> dict[str, Any]:
    for member in client.get(f"/teams/{team_id}/members")["data"]:
        if member["email"] == email.strip().lower() or member["user_id"] == email:
            return dict(member)
    raise CLIError("Member not found", f"{email} is not a member of this team.", code="not_found")


@app.callback(invoke_without_command=True)
def teams_main(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List your teams (the default), or manage one with a subcommand."""
    if ctx.invoked_subcommand is not None:
        return
    session = use(ctx, json_output)
    page = session.client.get("/teams/")
    out = session.output
    if out.json_mode:
        out.emit(page)
        return
    out.table(
        ["SLUG", "NAME", "YOUR ROLE", "ID"],
        [[t["slug"], t["name"], t.get("role") or "(platform admin)", t["id"]] for t in page["data"]],
    )


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The team's name.")],
    slug: Annotated[str | None, typer.Option("--slug", help="URL name (default: from the name).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Create a team; you become its owner."""
    session = use(ctx, json_output)
    team = session.client.post("/teams/", json={"name": name, "slug": slug})
    session.output.emit(team)
    session.output.say(f"Created team {team['slug']} ({team['id']}); you are its owner.")


@app.command("members")
def members(ctx: typer.Context, team: TeamArgument, json_output: JsonOption = False) -> None:
    """The team's members and their roles."""
    session = use(ctx, json_output)
    found = find_team(session.client, team, admin=False)
    page = session.client.get(f"/teams/{found['id']}/members")
    out = session.output
    if out.json_mode:
        out.emit(page)
        return
    out.table(["EMAIL", "NAME", "ROLE"], [[m["email"], m["name"] or "-", m["role"]] for m in page["data"]])


@app.command("add")
def add(
    ctx: typer.Context,
    team: TeamArgument,
    email: Annotated[str, typer.Argument(help="The user's email.")],
    role: Annotated[str, typer.Option("--role", help="viewer, member, admin or owner.")] = "member",
    json_output: JsonOption = False,
) -> None:
    """Add an existing user to the team."""
    session = use(ctx, json_output)
    found = find_team(session.client, team, admin=False)
    member = session.client.post(f"/teams/{found['id']}/members", json={"email": email, "role": role})
    session.output.emit(member)
    session.output.say(f"Added {member['email']} to {found['slug']} as {member['role']}.")


@app.command("role")
def change_role(
    ctx: typer.Context,
    team: TeamArgument,
    email: Annotated[str, typer.Argument(help="The member's email.")],
    role: RoleArgument,
    json_output: JsonOption = False,
) -> None:
    """Change a member's role."""
    session = use(ctx, json_output)
    found = find_team(session.client, team, admin=False)
    member = _member(session.client, found["id"], email)
    updated = session.client.patch(f"/teams/{found['id']}/members/{member['user_id']}", json={"role": role})
    session.output.emit(updated)
    session.output.say(f"{updated['email']} is now {updated['role']} in {found['slug']}.")


@app.command("remove")
def remove(
    ctx: typer.Context,
    team: TeamArgument,
    email: Annotated[str, typer.Argument(help="The member's email (yours to leave the team).")],
    json_output: JsonOption = False,
) -> None:
    """Remove a member from the team."""
    session = use(ctx, json_output)
    found = find_team(session.client, team, admin=False)
    member = _member(session.client, found["id"], email)
    session.client.delete(f"/teams/{found['id']}/members/{member['user_id']}")
    session.output.emit({"removed": True, "team_id": found["id"], "user_id": member["user_id"]})
    session.output.say(f"Removed {member['email']} from {found['slug']}.")


@app.command("quota")
def quota(ctx: typer.Context, team: TeamArgument, json_output: JsonOption = False) -> None:
    """The team's limits and what it uses."""
    session = use(ctx, json_output)
    found = find_team(session.client, team, admin=False)
    render_quota(session.output, session.client.get(f"/teams/{found['id']}/quota"))


@app.command("delete")
def delete(
    ctx: typer.Context,
    team: TeamArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Don't ask for confirmation.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete an empty team (owners only)."""
    session = use(ctx, json_output)
    found = find_team(session.client, team, admin=False)
    if not (yes or session.output.json_mode):
        typer.confirm(f"Delete team {found['slug']}?", abort=True)
    session.client.delete(f"/teams/{found['id']}")
    session.output.emit({"deleted": True, "team_id": found["id"]})
    session.output.say(f"Deleted team {found['slug']}.")
