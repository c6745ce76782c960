"""``fastapi-deploy admin ...``: the platform admin's commands over ``/api/v1/admin``.

    admin users [list|create|show|disable|enable|reset|token]     accounts
    admin tokens [list [--user U] [--app A] [--kind K] | revoke ID] every live token; revoke any one
    admin teams [list|create|delete]                               every team
    admin quotas [show TEAM | set TEAM --max-apps N ...]           per-team limits and usage
    admin apps [--team TEAM]                                       every app, across teams
    admin status                                                   backend, nodes, what runs
    admin settings [--users-can-create-teams/--no-...] ...         platform settings
    admin audit [--actor ...] [--app ...] [--since 1h]             the audit log
    admin secrets rotate                                           re-encrypt secrets with the first key

Users are named by email or id, teams by slug or id.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.text import Text

from cli.client import Client
from cli.errors import CLIError
from cli.output import JsonOption, Output
from cli.resolve import app_not_found, find_app
from cli.session import use

app = typer.Typer(help="Administer the platform (platform admins only).", no_args_is_help=True)
users = typer.Typer(help="User accounts: list, create, disable, enable, reset.")
teams = typer.Typer(help="Every team on the platform.")
quotas = typer.Typer(help="Per-team quotas and usage.")
secrets = typer.Typer(help="Secrets at rest.", no_args_is_help=True)
tokens = typer.Typer(help="Every live token: list them, revoke any one.")
app.add_typer(users, name="users")
app.add_typer(teams, name="teams")
app.add_typer(quotas, name="quotas")
app.add_typer(secrets, name="secrets")
app.add_typer(tokens, name="tokens")

UserArgument = Annotated[str, typer.Argument(metavar="USER", help="Email or user id.", show_default=False)]
TeamArgument = Annotated[str, typer.Argument(metavar="TEAM", help="Team slug or id.", show_default=False)]


def find_user(client: Client, ref: str) -> dict[str, Any]:
    """The user whose email or id is ``ref``."""
    if "@" not in ref:
        user: dict[str, Any] = client.get(f"/admin/users/{ref}")
        return user
    for candidate in client.get("/admin/users", params={"email": ref, "limit": 1000})["data"]:
        if candidate["email"] == ref.strip().lower():
            return dict(candidate)
    raise CLIError("User not found", f"No user has the email {ref!r}.", code="not_found")


def find_team(client: Client, ref: str, *, admin: bool = True) -> dict[str, Any]:
    """The team whose slug or id is ``ref`` (every team for an admin, the caller's otherwise)."""
    page = client.get("/admin/teams", params={"limit": 1000}) if admin else client.get("/teams/")
    for team in page["data"]:
        if ref in (team["id"], team["slug"]):
            return dict(team)
    raise CLIError(
        "Team not found",
        f"No team matches {ref!r}.",
        hint="`fastapi-deploy teams` lists yours.",
        code="not_found",
    )


def _rows(out: Output, data: dict[str, Any] | list[Any], columns: list[str], rows: list[list[str]]) -> None:
    if out.json_mode:
        out.emit(data)
    else:
        out.table(columns, rows)


def _pairs(out: Output, pairs: list[tuple[str, object]]) -> None:
    for key, value in pairs:
        out.say(Text.assemble((f"{key + ':':<22}", "bold"), "-" if value is None else str(value)))


# -- users --------------------------------------------------------------------------------------------


@users.callback(invoke_without_command=True)
def users_main(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List accounts (the default), or manage one with a subcommand."""
    if ctx.invoked_subcommand is None:
        list_users(ctx, None, json_output)


@users.command("list")
def list_users(
    ctx: typer.Context,
    email: Annotated[str | None, typer.Option("--email", help="Part of the email.")] = None,
    json_output: JsonOption = False,
) -> None:
    """List accounts: email, admin, disabled, teams."""
    session = use(ctx, json_output)
    params: dict[str, Any] = {"limit": 1000}
    if email:
        params["email"] = email
    page = session.client.get("/admin/users", params=params)
    _rows(
        session.output,
        page,
        ["EMAIL", "NAME", "ADMIN", "DISABLED", "TEAMS", "LAST LOGIN", "ID"],
        [
            [
                u["email"],
                u["name"] or "-",
                "yes" if u["is_admin"] else "",
                "yes" if u["disabled"] else "",
                ", ".join(f"{m['team_slug']} ({m['role']})" for m in u["teams"]) or "-",
                u["last_login_at"] or "-",
                u["id"],
            ]
            for u in page["data"]
        ],
    )


@users.command("create")
def create_user(
    ctx: typer.Context,
    email: Annotated[str, typer.Argument(help="The new account's email.")],
    name: Annotated[str, typer.Option("--name", help="Display name.")] = "",
    password: Annotated[
        str | None,
        typer.Option("--password", help="Initial password (default: generated and shown once)."),
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Make a platform admin.")] = False,
    team: Annotated[str | None, typer.Option("--team", help="Add to this team (slug or id).")] = None,
    role: Annotated[
        str, typer.Option("--role", help="Role in --team: viewer, member, admin, owner.")
    ] = "member",
    json_output: JsonOption = False,
) -> None:
    """Create an account (with a password; generated when not given)."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    body: dict[str, Any] = {"email": email, "name": name, "password": password, "is_admin": admin}
    if team:
        body |= {"team_id": find_team(client, team)["id"], "role": role}
    user = client.post("/admin/users", json=body)
    out.emit(user)
    out.say(f"Created {user['email']} ({user['id']}).")
    if user.get("password"):
        out.say(f"Password (shown once): {user['password']}")


@users.command("show")
def show_user(ctx: typer.Context, user: UserArgument, json_output: JsonOption = False) -> None:
    """One account in detail."""
    session = use(ctx, json_output)
    found = find_user(session.client, user)
    out = session.output
    if out.json_mode:
        out.emit(found)
        return
    _pairs(
        out,
        [
            ("Email", found["email"]),
            ("Name", found["name"] or None),
            ("Id", found["id"]),
            ("Platform admin", "yes" if found["is_admin"] else "no"),
            ("Disabled", "yes" if found["disabled"] else "no"),
            ("Password", "set" if found["has_password"] else "none (tokens only)"),
            ("Created", found["created_at"]),
            ("Last login", found["last_login_at"]),
            ("Teams", ", ".join(f"{m['team_slug']} ({m['role']})" for m in found["teams"]) or None),
        ],
    )


def _set_disabled(ctx: typer.Context, user: str, disabled: bool, json_output: bool) -> None:
    session = use(ctx, json_output)
    found = find_user(session.client, user)
    updated = session.client.patch(f"/admin/users/{found['id']}", json={"disabled": disabled})
    session.output.emit(updated)
    session.output.say(f"{'Disabled' if disabled else 'Enabled'} {updated['email']}.")


@users.command("disable")
def disable_user(ctx: typer.Context, user: UserArgument, json_output: JsonOption = False) -> None:
    """Disable an account: its tokens and password stop working (deploy tokens of its apps do not)."""
    _set_disabled(ctx, user, True, json_output)


@users.command("enable")
def enable_user(ctx: typer.Context, user: UserArgument, json_output: JsonOption = False) -> None:
    """Enable a disabled account again."""
    _set_disabled(ctx, user, False, json_output)


@users.command("reset")
def reset_user(
    ctx: typer.Context,
    user: UserArgument,
    password: Annotated[
        str | None, typer.Option("--password", help="The new password (default: generated, shown once).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Reset an account's password and revoke all its user tokens (sign it out everywhere)."""
    session = use(ctx, json_output)
    found = find_user(session.client, user)
    result = session.client.post(f"/admin/users/{found['id']}/reset", json={"password": password})
    out = session.output
    out.emit(result)
    out.say(f"Reset {found['email']}: {result['revoked_tokens']} token(s) revoked.")
    if result.get("password"):
        out.say(f"New password (shown once): {result['password']}")


@users.command("token")
def user_token(
    ctx: typer.Context,
    user: UserArgument,
    name: Annotated[str, typer.Option("--name", help="What the token is for.")] = "issued by an admin",
    days: Annotated[int, typer.Option("--days", min=1, max=365, help="Days until it expires.")] = 1,
    json_output: JsonOption = False,
) -> None:
    """Issue a user token for an account (e.g. a service account's first token). Audited."""
    session = use(ctx, json_output)
    found = find_user(session.client, user)
    token = session.client.post(
        f"/admin/users/{found['id']}/tokens", json={"name": name, "expires_in_days": days}
    )
    session.output.emit(token)
    session.output.say(token["value"])


@tokens.callback(invoke_without_command=True)
def tokens_main(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List live tokens (the default), or revoke one."""
    if ctx.invoked_subcommand is None:
        list_tokens(ctx, None, None, None, json_output)


@tokens.command("list")
def list_tokens(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's (email or id).")] = None,
    app_ref: Annotated[str | None, typer.Option("--app", help="Only this app's (slug or id).")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="user (sessions, personal) or deploy.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Every live token, newest first: name, kind, owner, last use. Values are never stored."""
    session = use(ctx, json_output)
    params: dict[str, Any] = {"limit": 2000}
    if user:
        params["user_id"] = find_user(session.client, user)["id"]
    if app_ref:
        every = session.client.get("/admin/apps", params={"limit": 1000})["data"]
        found = find_app(every, app_ref)
        if found is None:
            raise app_not_found(app_ref)
        params["app_id"] = found["id"]
    if kind:
        if kind not in ("user", "deploy"):
            raise CLIError("Invalid kind", f"--kind is user or deploy, not {kind!r}.")
        params["kind"] = kind
    page = session.client.get("/admin/tokens", params=params)
    _rows(
        session.output,
        page,
        ["NAME", "KIND", "USER", "APP", "CREATED", "EXPIRES", "LAST USED", "ID"],
        [
            [
                (t["name"] or "-") + (" (this one)" if t["current"] else ""),
                t["kind"],
                t["user_email"] or "-",
                t["app_slug"] or "-",
                t["created_at"] or "-",
                t["expires_at"] or "never",
                t["last_used_at"] or "-",
                t["id"],
            ]
            for t in page["data"]
        ],
    )


@tokens.command("revoke")
def revoke_token(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (admin tokens list).")],
    json_output: JsonOption = False,
) -> None:
    """Revoke one token, whoever's it is. Audited."""
    session = use(ctx, json_output)
    session.client.delete(f"/admin/tokens/{token_id}")
    session.output.emit({"revoked": True, "token_id": token_id})
    session.output.say(f"Revoked token {token_id}.")


# -- teams and quotas -----------------------------------------------------------------------------------


@teams.callback(invoke_without_command=True)
def teams_main(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List every team (the default), or manage one with a subcommand."""
    if ctx.invoked_subcommand is None:
        list_teams(ctx, json_output)


@teams.command("list")
def list_teams(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Every team: members and apps."""
    session = use(ctx, json_output)
    page = session.client.get("/admin/teams", params={"limit": 1000})
    _rows(
        session.output,
        page,
        ["SLUG", "NAME", "MEMBERS", "APPS", "ID"],
        [[t["slug"], t["name"], str(t["members"]), str(t["apps"]), t["id"]] for t in page["data"]],
    )


@teams.command("create")
def create_team(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The team's name.")],
    slug: Annotated[str | None, typer.Option("--slug", help="URL name (default: from the name).")] = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Email of its first owner.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Create a team, optionally with its first owner."""
    session = use(ctx, json_output)
    team = session.client.post("/admin/teams", json={"name": name, "slug": slug, "owner_email": owner})
    session.output.emit(team)
    session.output.say(f"Created team {team['slug']} ({team['id']}).")


@teams.command("delete")
def delete_team(
    ctx: typer.Context,
    team: TeamArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Don't ask for confirmation.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete an empty team (its apps must be deleted first)."""
    session = use(ctx, json_output)
    found = find_team(session.client, team)
    if not (yes or session.output.json_mode):
        typer.confirm(f"Delete team {found['slug']}?", abort=True)
    session.client.delete(f"/admin/teams/{found['id']}")
    session.output.emit({"deleted": True, "team_id": found["id"]})
    session.output.say(f"Deleted team {found['slug']}.")


_QUOTA_FIELDS: list[tuple[str, str, str | None]] = [
    ("max_apps", "Apps", "apps"),
    ("max_instances", "Instances (reserved)", "instances_floor"),
    ("max_cpu", "CPU cores", "cpu"),
    ("max_memory_mb", "Memory (MiB)", "memory_mb"),
    ("max_build_minutes", "Build minutes (month)", "build_minutes"),
    ("max_storage_bytes", "Storage (bytes)", "storage_bytes"),
    ("max_archive_bytes", "Upload size (bytes)", None),
]


def render_quota(out: Output, report: dict[str, Any]) -> None:
    if out.json_mode:
        out.emit(report)
        return
    limits, used, own = report["limits"], report["usage"], report["overrides"]
    rows = []
    for key, label, usage_key in _QUOTA_FIELDS:
        limit = limits.get(key)
        rows.append(
            [
                label,
                "-" if usage_key is None else f"{used[usage_key]:g}",
                "unlimited" if limit is None else f"{limit:g}",
                "team" if own.get(key) is not None else "default",
            ]
        )
    out.table(["QUOTA", "USED", "LIMIT", "FROM"], rows)
    if report.get("instance_cap") is not None:
        out.say(f"Instance cap (instances, CPU and memory together): {report['instance_cap']}")


@quotas.callback(invoke_without_command=True)
def quotas_main(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Every team's usage against its limits (the default); `show TEAM` and `set TEAM` for one."""
    if ctx.invoked_subcommand is not None:
        return
    session = use(ctx, json_output)
    client, out = session.client, session.output
    reports = [
        client.get(f"/admin/teams/{t['id']}/quota") | {"team_slug": t["slug"]}
        for t in client.get("/admin/teams", params={"limit": 1000})["data"]
    ]

    def cell(report: dict[str, Any], key: str, usage_key: str) -> str:
        limit = report["limits"].get(key)
        return f"{report['usage'][usage_key]:g}/{'-' if limit is None else format(limit, 'g')}"

    _rows(
        out,
        {"data": reports},
        ["TEAM", "APPS", "INSTANCES", "BUILD MIN", "STORAGE B"],
        [
            [
                r["team_slug"],
                cell(r, "max_apps", "apps"),
                cell(r, "max_instances", "instances_floor"),
                cell(r, "max_build_minutes", "build_minutes"),
                cell(r, "max_storage_bytes", "storage_bytes"),
            ]
            for r in reports
        ],
    )


@quotas.command("show")
def show_quota(ctx: typer.Context, team: TeamArgument, json_output: JsonOption = False) -> None:
    """One team's limits (its own or the platform default) and usage."""
    session = use(ctx, json_output)
    found = find_team(session.client, team)
    render_quota(session.output, session.client.get(f"/admin/teams/{found['id']}/quota"))


def _limit(value: str | None) -> int | float | str | None:
    """``"10"`` -> 10, ``"0.5"`` -> 0.5, ``"default"`` -> None (the platform default), ``"5GB"`` -> bytes."""
    if value is None:
        return "unchanged"
    text = value.strip().lower()
    if text in ("default", "none", "-"):
        return None
    match = re.fullmatch(r"([0-9.]+)\s*([kmgt]i?b)?", text)
    if not match:
        raise CLIError("Invalid limit", f"{value!r} is not a number.", hint="e.g. 10, 0.5, 2GB, default")
    number = float(match.group(1))
    unit = match.group(2)
    if unit:
        power = "kmgt".index(unit[0]) + 1
        number *= (1024 if "i" in unit else 1000) ** power
    return int(number) if number.is_integer() else number


@quotas.command("set")
def set_quota(
    ctx: typer.Context,
    team: TeamArgument,
    max_apps: Annotated[str | None, typer.Option("--max-apps")] = None,
    max_instances: Annotated[str | None, typer.Option("--max-instances")] = None,
    max_cpu: Annotated[str | None, typer.Option("--max-cpu", help="Cores.")] = None,
    max_memory_mb: Annotated[str | None, typer.Option("--max-memory-mb")] = None,
    max_build_minutes: Annotated[str | None, typer.Option("--max-build-minutes", help="Per month.")] = None,
    max_storage: Annotated[str | None, typer.Option("--max-storage", help="Bytes, e.g. 5GB.")] = None,
    max_upload: Annotated[str | None, typer.Option("--max-upload", help="Bytes, e.g. 50MB.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Change a team's limits; `default` resets one to the platform default. Others stay as they are."""
    session = use(ctx, json_output)
    client = session.client
    found = find_team(client, team)
    current = client.get(f"/admin/teams/{found['id']}/quota")["overrides"] or {}
    body = {key: current.get(key) for key, *_ in _QUOTA_FIELDS}
    for key, raw in {
        "max_apps": max_apps,
        "max_instances": max_instances,
        "max_cpu": max_cpu,
        "max_memory_mb": max_memory_mb,
        "max_build_minutes": max_build_minutes,
        "max_storage_bytes": max_storage,
        "max_archive_bytes": max_upload,
    }.items():
        value = _limit(raw)
        if value != "unchanged":
            body[key] = value
    render_quota(session.output, client.put(f"/admin/teams/{found['id']}/quota", json=body))


# -- apps, status, settings, audit, secrets --------------------------------------------------------------


@app.command("apps")
def list_apps(
    ctx: typer.Context,
    team: Annotated[str | None, typer.Option("--team", help="Only this team's (slug or id).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Every app on the platform, with its team."""
    session = use(ctx, json_output)
    params: dict[str, Any] = {"limit": 1000}
    if team:
        params["team_id"] = find_team(session.client, team)["id"]
    page = session.client.get("/admin/apps", params=params)
    _rows(
        session.output,
        page,
        ["APP", "TEAM", "STATUS", "INSTANCES", "URL"],
        [
            [a["slug"], str(a.get("team_slug")), str(a["status"]), str(len(a["instances"])), str(a["url"])]
            for a in page["data"]
        ],
    )


@app.command("status")
def status(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """The platform: backend, nodes, database, apps and instances."""
    session = use(ctx, json_output)
    s = session.client.get("/admin/status")
    out = session.output
    if out.json_mode:
        out.emit(s)
        return
    instances = s["backend"]["instances"]
    _pairs(
        out,
        [
            ("Ready", "yes" if s["ready"] else "no"),
            ("Backend", s["backend"]["name"]),
            ("Instances", ", ".join(f"{n} {state}" for state, n in sorted(instances.items())) or "none"),
            ("Apps", f"{s['apps']} ({s['apps_serving']} serving)"),
            ("Teams / users", f"{s['teams']} / {s['users']}"),
            ("Database", s["database"]),
            ("Router", f"{s['router']['host']}:{s['router']['port']}"),
            ("Secret keys", s["secret_keys"]),
            ("Data", s["data_dir"]),
        ],
    )
    for node in s["backend"]["nodes"]:
        out.say()
        load = node.get("load_average")
        _pairs(
            out,
            [
                ("Node", node["hostname"]),
                ("CPUs / load", f"{node['cpus']} / {', '.join(f'{x:.2f}' for x in load) if load else '-'}"),
                ("Memory available", _bytes(node.get("memory_available_bytes"))),
                ("Disk free", _bytes(node.get("disk_free_bytes"))),
            ],
        )


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"
        size /= 1000
    return str(value)


@app.command("settings")
def settings(
    ctx: typer.Context,
    users_can_create_teams: Annotated[
        bool | None,
        typer.Option("--users-can-create-teams/--no-users-can-create-teams", help="Who may create teams."),
    ] = None,
    instance_cpu: Annotated[float | None, typer.Option("--instance-cpu", help="Cores per instance.")] = None,
    instance_memory_mb: Annotated[
        int | None, typer.Option("--instance-memory-mb", help="MiB per instance.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show or change the platform settings."""
    session = use(ctx, json_output)
    changes = {
        k: v
        for k, v in {
            "users_can_create_teams": users_can_create_teams,
            "instance_cpu": instance_cpu,
            "instance_memory_mb": instance_memory_mb,
        }.items()
        if v is not None
    }
    result = (
        session.client.patch("/admin/settings", json=changes)
        if changes
        else session.client.get("/admin/settings")
    )
    out = session.output
    if out.json_mode:
        out.emit(result)
        return
    _pairs(
        out,
        [
            ("Users create teams", "yes" if result["users_can_create_teams"] else "no (admins only)"),
            ("Instance size", f"{result['instance_cpu']:g} CPU, {result['instance_memory_mb']} MiB"),
            (
                "Default quota",
                ", ".join(f"{k}={v}" for k, v in result["default_quota"].items() if v is not None) or "none",
            ),
        ],
    )


_SINCE = re.compile(r"^(\d+)([smhd])$")


def _since(value: str) -> str:
    match = _SINCE.match(value.strip())
    if not match:
        raise CLIError("Invalid --since", f"{value!r} is not a duration.", hint="e.g. 30m, 12h, 7d")
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


@app.command("audit")
def audit(
    ctx: typer.Context,
    actor: Annotated[str | None, typer.Option("--actor", help="Email, user id or token id.")] = None,
    team: Annotated[str | None, typer.Option("--team", help="Team id.")] = None,
    app_id: Annotated[str | None, typer.Option("--app", help="App id.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="POST, PUT, PATCH, DELETE.")] = None,
    path: Annotated[str | None, typer.Option("--path", help="Path prefix.")] = None,
    status_code: Annotated[int | None, typer.Option("--status", help="HTTP status.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="e.g. 1h, 7d.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    json_output: JsonOption = False,
) -> None:
    """The audit log of mutating API calls, newest first: who, what, when, from where."""
    session = use(ctx, json_output)
    params: dict[str, Any] = {
        k: v
        for k, v in {
            "actor": actor,
            "team_id": team,
            "app_id": app_id,
            "method": method,
            "path": path,
            "status": status_code,
            "since": _since(since) if since else None,
            "limit": limit,
        }.items()
        if v is not None
    }
    page = session.client.get("/admin/audit", params=params)
    _rows(
        session.output,
        page,
        ["TIME", "WHO", "CALL", "STATUS", "FROM"],
        [
            [
                str(e["at"]),
                str(
                    e["actor_email"]
                    or (f"deploy token {e['actor_token_id']}" if e["actor_token_id"] else "-")
                ),
                f"{e['method']} {e['path']}",
                str(e["status_code"]),
                str(e["client_ip"] or "-"),
            ]
            for e in page["data"]
        ],
    )


@secrets.command("rotate")
def rotate(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Re-encrypt every secret with the first key of FASTAPI_DEPLOY_SECRET_KEY (then drop the old keys)."""
    session = use(ctx, json_output)
    result = session.client.post("/admin/secrets/rotate")
    session.output.emit(result)
    session.output.say(
        f"Re-encrypted {result['rotated']} value(s) with the first of {result['keys']} key(s)."
    )
