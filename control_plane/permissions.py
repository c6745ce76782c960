"""Who may do what: the roles of a team membership and the one table of actions → minimum role.

Every API endpoint names the action it performs (``security.get_app(..., action=Action.DEPLOY)``,
``security.get_team(..., action=...)``); :func:`allows` is the only place that compares roles. The same
table is rendered in ``docs/ROLES.md`` and checked against it by ``tests/test_roles.py``.

    viewer  <  member  <  admin  <  owner          (a platform admin, ``User.is_admin``, passes every check)

A *deploy token* has no role: it acts on its one app, and only for the actions marked ``deploy_token``
(the endpoints ``fastapi deploy`` calls with ``FASTAPI_CLOUD_TOKEN``; fastapi-cloud-api.md §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Literal


class Role(IntEnum):
    """A member's role in a team; a higher role can do everything a lower one can."""

    viewer = 10
    member = 20
    admin = 30
    owner = 40

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value]
        except KeyError:
            raise ValueError(f"unknown role {value!r} (one of: {', '.join(r.name for r in cls)})") from None


RoleName = Literal["viewer", "member", "admin", "owner"]
"""A role as the API spells it (an enum in the OpenAPI schema)."""


class Action(StrEnum):
    # -- on an app ---------------------------------------------------------------------------------
    APP_READ = "app:read"
    """The app itself (``GET /apps/{id}``)."""
    APP_MONITOR = "app:monitor"
    """Its deployments list, autoscaling state and events."""
    DEPLOYMENT_READ = "deployment:read"
    """One deployment and its build log."""
    DEPLOY = "app:deploy"
    """Create a deployment, upload, complete or cancel the upload."""
    RELEASE = "app:release"
    """Roll back, redeploy."""
    APP_UPDATE = "app:update"
    """Change the app's settings (``PATCH /apps/{id}``: directory)."""
    LOGS_READ = "app:logs"
    """The app's runtime logs (they may contain anything the app prints)."""
    ENV_READ = "app:env:read"
    ENV_WRITE = "app:env:write"
    TOKENS_MANAGE = "app:tokens"
    """List, create and revoke the app's deploy tokens."""
    SCALE = "app:scale"
    """Change the app's autoscaling settings."""
    APP_DELETE = "app:delete"
    # -- on a team ---------------------------------------------------------------------------------
    TEAM_READ = "team:read"
    """The team, its members, quota and usage."""
    APP_CREATE = "team:apps:create"
    MEMBERS_MANAGE = "team:members"
    """Add and remove members, change roles (only an owner grants or removes ``owner``)."""
    TEAM_UPDATE = "team:update"
    """Rename the team."""
    TEAM_DELETE = "team:delete"


@dataclass(frozen=True)
class Rule:
    minimum: Role
    what: str
    """The action in words, for error messages: "You cannot {what}"."""
    deploy_token: bool = False
    """Whether an app's deploy token may perform it on that app."""


PERMISSIONS: dict[Action, Rule] = {
    Action.APP_READ: Rule(Role.viewer, "see this app", deploy_token=True),
    Action.APP_MONITOR: Rule(Role.viewer, "see this app's deployments and scaling"),
    Action.DEPLOYMENT_READ: Rule(Role.viewer, "see this deployment", deploy_token=True),
    Action.TEAM_READ: Rule(Role.viewer, "see this team"),
    Action.DEPLOY: Rule(Role.member, "deploy this app", deploy_token=True),
    Action.RELEASE: Rule(Role.member, "roll back or redeploy this app"),
    Action.APP_UPDATE: Rule(Role.member, "change this app"),
    Action.LOGS_READ: Rule(Role.member, "read this app's logs"),
    Action.ENV_READ: Rule(Role.member, "read this app's environment variables"),
    Action.ENV_WRITE: Rule(Role.member, "change this app's environment variables"),
    Action.APP_CREATE: Rule(Role.member, "create apps in this team"),
    Action.TOKENS_MANAGE: Rule(Role.admin, "manage this app's deploy tokens"),
    Action.SCALE: Rule(Role.admin, "change this app's scaling"),
    Action.MEMBERS_MANAGE: Rule(Role.admin, "manage this team's members"),
    Action.APP_DELETE: Rule(Role.owner, "delete this app"),
    Action.TEAM_UPDATE: Rule(Role.owner, "change this team"),
    Action.TEAM_DELETE: Rule(Role.owner, "delete this team"),
}


def allows(role: Role, action: Action) -> bool:
    """Whether a member with ``role`` may perform ``action``."""
    return role >= PERMISSIONS[action].minimum


def deploy_token_allows(action: Action) -> bool:
    return PERMISSIONS[action].deploy_token


def may_assign(actor: Role, old: Role | None, new: Role | None) -> bool:
    """Whether a member with role ``actor`` may change someone's role from ``old`` to ``new`` (None: not
    a member). Admins manage members up to admin; only owners touch owners."""
    if actor >= Role.owner:
        return True
    return allows(actor, Action.MEMBERS_MANAGE) and Role.owner not in (old, new)
