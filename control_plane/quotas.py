"""Per-team quotas: the limits in force (team's own over the platform default) and what is used.

Checked where a team asks for more: app create, deployment create and upload (size, storage, build
minutes), autoscaling changes (instances, CPU, memory). Errors carry a title, a message and a hint:
``QuotaExceeded`` (403) for counts, ``TooLarge`` (413) for bytes.

Instances are reserved, not metered: a team's *floor* (the sum of its apps' ``min_instances`` +
``prewarm``) and each app's *ceiling* (``max_instances``) must fit the team's instance cap, which is
``max_instances`` and the CPU and memory quotas divided by the per-instance size. Build minutes are the
span of each deployment's build log (first line to last) in the current calendar month (UTC).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, func, select

from control_plane import platform_settings
from control_plane.config import Settings
from control_plane.errors import QuotaExceeded, TooLarge
from control_plane.models import App, BuildLogLine, Deployment, Team, TeamQuota, utcnow
from control_plane.platform_settings import PlatformSettings, QuotaLimits

_ASK = "ask a platform admin to raise the team's quota (`fastapi-deploy admin quotas set`)."


@dataclass
class Usage:
    apps: int
    instances_floor: int
    """Sum over the team's apps of min_instances + prewarm."""
    instances_ceiling: int
    """The largest max_instances of the team's apps."""
    cpu: float
    memory_mb: int
    build_minutes: float
    storage_bytes: int


def limits(session: Session, team_id: str, settings: Settings) -> QuotaLimits:
    """The limits in force for the team: its own values, else the platform default; ``None``: none."""
    defaults = platform_settings.load(session).default_quota
    own = session.get(TeamQuota, team_id)
    merged = defaults.model_dump()
    if own is not None:
        for name in merged:
            value = getattr(own, name)
            if value is not None:
                merged[name] = value
    archive = merged["max_archive_bytes"]
    merged["max_archive_bytes"] = min(archive, settings.max_archive_bytes) if archive is not None else None
    return QuotaLimits(**merged)


def instance_cap(quota: QuotaLimits, sizes: PlatformSettings) -> int | None:
    """How many instances the team may reserve: the tightest of the instance, CPU and memory quotas."""
    caps = [quota.max_instances] if quota.max_instances is not None else []
    if quota.max_cpu is not None:
        caps.append(int(quota.max_cpu / sizes.instance_cpu + 1e-9))
    if quota.max_memory_mb is not None:
        caps.append(quota.max_memory_mb // sizes.instance_memory_mb)
    return min(caps) if caps else None


def _month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def usage(session: Session, team_id: str) -> Usage:
    sizes = platform_settings.load(session)
    apps = session.exec(select(App).where(App.team_id == team_id)).all()
    floor = sum(a.min_instances + a.prewarm for a in apps)
    app_ids = [a.id for a in apps]
    storage = session.exec(
        select(func.coalesce(func.sum(Deployment.archive_size_bytes), 0)).where(
            col(Deployment.app_id).in_(app_ids), col(Deployment.artifact_pruned).is_(False)
        )
    ).one()
    spans = session.exec(
        select(func.min(BuildLogLine.created_at), func.max(BuildLogLine.created_at))
        .join(Deployment, col(Deployment.id) == col(BuildLogLine.deployment_id))
        .where(col(Deployment.app_id).in_(app_ids))
        .where(col(BuildLogLine.created_at) >= _month_start(utcnow()))
        .group_by(col(BuildLogLine.deployment_id))
    ).all()
    seconds = 0.0
    for first, last in spans:
        if isinstance(first, datetime) and isinstance(last, datetime):
            seconds += (last - first).total_seconds()
    return Usage(
        apps=len(apps),
        instances_floor=floor,
        instances_ceiling=max((a.max_instances for a in apps), default=0),
        cpu=round(floor * sizes.instance_cpu, 3),
        memory_mb=floor * sizes.instance_memory_mb,
        build_minutes=round(seconds / 60, 2),
        storage_bytes=int(storage),
    )


def report(session: Session, team: Team, settings: Settings) -> dict[str, Any]:
    """``{"team_id", "limits", "usage", "instance_cap"}`` for the API."""
    quota = limits(session, team.id, settings)
    own = session.get(TeamQuota, team.id)
    return {
        "team_id": team.id,
        "limits": quota.model_dump(),
        "overrides": {k: getattr(own, k) for k in QuotaLimits.model_fields} if own else {},
        "instance_cap": instance_cap(quota, platform_settings.load(session)),
        "usage": asdict(usage(session, team.id)),
    }


# -- checks ------------------------------------------------------------------------------------------


def check_new_app(session: Session, team: Team, settings: Settings) -> int | None:
    """Raise QuotaExceeded when the team cannot have one more app; returns the instance cap (a new
    app's ``max_instances`` is clamped to it)."""
    quota = limits(session, team.id, settings)
    used = usage(session, team.id)
    if quota.max_apps is not None and used.apps >= quota.max_apps:
        raise QuotaExceeded(
            f"Team {team.slug} has {used.apps} of its {quota.max_apps} apps.",
            hint="Delete an app you no longer need, or " + _ASK,
        )
    cap = instance_cap(quota, platform_settings.load(session))
    if cap is not None and used.instances_floor + 1 > cap:
        raise QuotaExceeded(
            f"A new app needs one instance and team {team.slug} already reserves {used.instances_floor} "
            f"of its {cap}.",
            hint="Lower another app's minimum (`fastapi-deploy scale APP --min 0`), or " + _ASK,
        )
    return cap


def check_scaling(session: Session, app: App, team: Team, settings: Settings) -> None:
    """Raise QuotaExceeded when ``app``'s (changed, not yet committed) scaling does not fit the team."""
    quota = limits(session, team.id, settings)
    cap = instance_cap(quota, platform_settings.load(session))
    if cap is None:
        return
    others = session.exec(select(App).where(App.team_id == team.id, App.id != app.id)).all()
    floor = sum(a.min_instances + a.prewarm for a in others) + app.min_instances + app.prewarm
    if app.max_instances > cap:
        raise QuotaExceeded(
            f"max_instances {app.max_instances} is over team {team.slug}'s cap of {cap} instances.",
            hint=f"Use --max {cap} or less, or {_ASK}",
        )
    if floor > cap:
        raise QuotaExceeded(
            f"Team {team.slug}'s apps would reserve {floor} instances (min + pre-warm) of its {cap}.",
            hint="Lower a minimum or pre-warm, or " + _ASK,
        )


def check_deployment(session: Session, app: App, team: Team, size: int, settings: Settings) -> None:
    """Raise TooLarge (upload size, storage) or QuotaExceeded (build minutes) for a new deployment of
    ``size`` compressed bytes."""
    quota = limits(session, team.id, settings)
    check_archive_size(quota.max_archive_bytes, size, team)
    used = usage(session, team.id)
    if quota.max_storage_bytes is not None and used.storage_bytes + size > quota.max_storage_bytes:
        raise TooLarge(
            f"Team {team.slug} stores {used.storage_bytes / 1e6:.1f} MB of its "
            f"{quota.max_storage_bytes / 1e6:.1f} MB; this upload ({size / 1e6:.1f} MB) does not fit.",
            title="Storage quota exceeded",
            hint="Delete apps you no longer need, make the upload smaller with .fastapicloudignore, or "
            + _ASK,
        )
    if quota.max_build_minutes is not None and used.build_minutes >= quota.max_build_minutes:
        raise QuotaExceeded(
            f"Team {team.slug} used {used.build_minutes:.0f} of its {quota.max_build_minutes} build "
            "minutes this month.",
            title="Build minutes used up",
            hint="The count starts again on the 1st (UTC); or " + _ASK,
        )


def check_archive_size(limit: int | None, size: int, team: Team) -> None:
    if limit is not None and size > limit:
        raise TooLarge(
            f"The app source code ({size / 1e6:.1f} MB compressed) exceeds the maximum allowed size "
            f"({limit / 1e6:.1f} MB) for team {team.slug}.",
            title="Upload too large",
            hint="Exclude build output, data and virtualenvs with a .fastapicloudignore file.",
        )
