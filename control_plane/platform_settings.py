"""Platform settings that admins change at run time (``/api/v1/admin/settings``), kept in the database.

Unlike :class:`~control_plane.config.Settings` (the process's configuration, read once at start), these
live in the ``setting`` table as one JSON document, so every control-plane replica sees a change at once.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from control_plane.models import Setting

_KEY = "platform_settings"
_MAX_INT = 2**31 - 1  # counts: a 32-bit INTEGER column
_MAX_BYTES = 2**62  # bytes: a BIGINT column


class QuotaLimits(BaseModel):
    """A team's limits; ``None`` means no limit (in the platform default) or "the default" (per team)."""

    model_config = ConfigDict(extra="forbid")

    max_apps: int | None = Field(default=None, ge=0, le=_MAX_INT)
    max_instances: int | None = Field(default=None, ge=0, le=_MAX_INT)
    """Instances, counted as the sum of the apps' floors (min + pre-warm) and as each app's ceiling."""
    max_cpu: float | None = Field(default=None, ge=0, le=1_000_000)
    """CPU cores: instances x ``instance_cpu``."""
    max_memory_mb: int | None = Field(default=None, ge=0, le=_MAX_INT)
    """MiB: instances x ``instance_memory_mb``."""
    max_build_minutes: int | None = Field(default=None, ge=0, le=_MAX_INT)
    """Build minutes per calendar month (UTC)."""
    max_storage_bytes: int | None = Field(default=None, ge=0, le=_MAX_BYTES)
    """Bytes of kept deployment archives (compressed)."""
    max_archive_bytes: int | None = Field(default=None, ge=0, le=_MAX_BYTES)
    """Largest single upload, compressed (never above the server's ``max_archive_bytes``)."""


class PlatformSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users_can_create_teams: bool = True
    """Whether any signed-in user may create a team (and own it); otherwise only platform admins."""
    instance_cpu: float = Field(default=0.5, gt=0, le=256)
    """CPU cores one instance is sized at, for CPU quotas (and the limits of backends that enforce them)."""
    instance_memory_mb: int = Field(default=512, gt=0, le=1_048_576)
    """MiB one instance is sized at, for memory quotas."""
    default_quota: QuotaLimits = Field(
        default_factory=lambda: QuotaLimits(max_apps=50, max_instances=50, max_build_minutes=6000)
    )
    """Limits of every team without its own value."""


class PlatformSettingsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users_can_create_teams: bool | None = None
    instance_cpu: float | None = Field(default=None, gt=0, le=256)
    instance_memory_mb: int | None = Field(default=None, gt=0, le=1_048_576)
    default_quota: QuotaLimits | None = None


def load(session: Session) -> PlatformSettings:
    row = session.get(Setting, _KEY)
    return PlatformSettings.model_validate_json(row.value) if row is not None else PlatformSettings()


def save(session: Session, settings: PlatformSettings) -> None:
    """Store (not committed)."""
    row = session.get(Setting, _KEY) or Setting(key=_KEY, value="")
    row.value = settings.model_dump_json()
    session.add(row)
