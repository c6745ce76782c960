"""Environment variables: the batch PUT the official CLI uses for set and delete."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator
from sqlmodel import Session, col, select

from control_plane.api.apps import new_release
from control_plane.api.deps import PlatformDep, PrincipalDep, SessionDep
from control_plane.errors import BadRequest
from control_plane.models import App, Deployment, EnvVar, utcnow
from control_plane.permissions import Action
from control_plane.platform import Platform
from control_plane.security import get_app
from control_plane.serializers import ts

router = APIRouter()

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED = {"PATH", "HOME", "VIRTUAL_ENV", "PYTHONUNBUFFERED"}
RESERVED_PREFIX = "FASTAPI_DEPLOY_"
MAX_VALUE_BYTES = 64 * 1024
MAX_VARS = 500


class EnvValue(BaseModel):
    value: str = Field(max_length=MAX_VALUE_BYTES)
    is_secret: bool = False


class EnvBatch(BaseModel):
    upsert: dict[str, EnvValue] = Field(default_factory=dict)
    delete: list[str] = Field(default_factory=list)
    redeploy: bool = True

    @field_validator("upsert")
    @classmethod
    def _names(cls, v: dict[str, EnvValue]) -> dict[str, EnvValue]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(
                    f"{name!r} is not a valid variable name (letters, digits, _; not starting with a digit)"
                )
            if name in RESERVED or name.startswith(RESERVED_PREFIX):
                raise ValueError(f"{name!r} is reserved by the platform")
        return v


class EnvVarOut(BaseModel):
    """FastAPI Cloud's EnvVar: a secret's ``value`` is always null."""

    name: str
    value: str | None
    is_secret: bool
    updated_at: str | None


class EnvVarList(BaseModel):
    data: list[EnvVarOut]


def _list(session: Session, app_id: str, platform: Platform) -> dict[str, Any]:
    rows = session.exec(select(EnvVar).where(EnvVar.app_id == app_id).order_by(col(EnvVar.name))).all()
    return {
        "data": [
            {
                "name": r.name,
                "value": None if r.is_secret else platform.secrets.decrypt(r.value),
                "is_secret": r.is_secret,
                "updated_at": ts(r.updated_at),
            }
            for r in rows
        ]
    }


@router.get("/apps/{app_id}/environment-variables/", response_model=EnvVarList)
def list_env(
    app_id: str, platform: PlatformDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    app = get_app(session, principal, app_id, action=Action.ENV_READ)
    return _list(session, app.id, platform)


@router.put("/apps/{app_id}/environment-variables/", response_model=EnvVarList)
async def update_env(
    app_id: str, body: EnvBatch, platform: PlatformDep, principal: PrincipalDep
) -> dict[str, Any]:
    def apply() -> tuple[dict[str, Any], Deployment | None]:
        with platform.db.session() as s:
            app: App = get_app(s, principal, app_id, action=Action.ENV_WRITE)
            existing = {r.name: r for r in s.exec(select(EnvVar).where(EnvVar.app_id == app.id)).all()}
            if len(set(existing) | set(body.upsert)) > MAX_VARS:
                raise BadRequest(f"An app can have at most {MAX_VARS} environment variables.")
            now = utcnow()
            for name, item in body.upsert.items():
                row = existing.get(name)
                if row is None:
                    row = EnvVar(app_id=app.id, name=name, value="", is_secret=item.is_secret)
                # Existing variables keep their secret status (the official CLI's documented semantics).
                row.value = platform.secrets.encrypt(item.value)
                row.updated_at = now
                s.add(row)
            for name in body.delete:
                row = existing.get(name)
                if row is not None:
                    s.delete(row)
            s.commit()
            release = None
            changed = bool(body.upsert or any(n in existing for n in body.delete))
            if body.redeploy and changed and app.current_deployment_id:
                current = s.get(Deployment, app.current_deployment_id)
                if current is not None:
                    release = new_release(platform, s, app, "redeploy", current)
            return _list(s, app.id, platform), release

    out, release = await asyncio.to_thread(apply)
    if release is not None:
        platform.deployer.submit(release.id)
    return out
