"""API tokens: app-scoped deploy tokens (the official CLI's ``tokens`` commands) and the caller's own user
tokens. Expiring, revocable, shown once, stored hashed (SHA-256), last use recorded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from sqlmodel import col, select

from control_plane.api.deps import LimitsDep, PrincipalDep, SessionDep
from control_plane.errors import NotFound
from control_plane.models import ApiToken, utcnow
from control_plane.permissions import Action
from control_plane.security import aware, get_app, hash_token, new_token, require_user
from control_plane.serializers import ts

router = APIRouter()


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    expires_in_days: int = Field(365, ge=1, le=3650)


class UserTokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    expires_in_days: int | None = Field(90, ge=1, le=3650)
    """None: the token does not expire (revoke it when done)."""


class DeployTokenOut(BaseModel):
    """FastAPI Cloud's deploy token (``id``, ``name``, ``created_at``, ``expired_at``: all strings), plus
    when it was last used."""

    id: str
    name: str
    created_at: str
    expired_at: str
    last_used_at: str | None


class DeployTokenList(BaseModel):
    data: list[DeployTokenOut]


class DeployTokenCreated(BaseModel):
    id: str
    name: str
    expired_at: str
    value: str
    """The token itself: shown only in this answer."""


class UserTokenOut(BaseModel):
    id: str
    name: str
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None
    current: bool
    """True for the token of this very request."""


class UserTokenList(BaseModel):
    data: list[UserTokenOut]


class UserTokenCreated(BaseModel):
    id: str
    name: str
    expires_at: str | None
    value: str
    """The token itself: shown only in this answer."""


# -- deploy tokens (FastAPI Cloud: /apps/{id}/tokens) ---------------------------------------------------


@router.get("/apps/{app_id}/tokens", response_model=DeployTokenList)
def list_tokens(app_id: str, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    app = get_app(session, principal, app_id, action=Action.TOKENS_MANAGE)
    rows = session.exec(
        select(ApiToken)
        .where(ApiToken.app_id == app.id, ApiToken.kind == "deploy", col(ApiToken.revoked_at).is_(None))
        .order_by(col(ApiToken.created_at))
    ).all()
    return {
        "data": [
            {
                "id": r.id,
                "name": r.name,
                "created_at": ts(r.created_at),
                "expired_at": ts(r.expires_at) or "",
                "last_used_at": ts(r.last_used_at),
            }
            for r in rows
        ]
    }


@router.post("/apps/{app_id}/tokens", status_code=201, response_model=DeployTokenCreated)
def create_token(
    app_id: str, body: TokenCreate, session: SessionDep, principal: PrincipalDep, limits: LimitsDep
) -> dict[str, Any]:
    app = get_app(session, principal, app_id, action=Action.TOKENS_MANAGE)
    user = require_user(principal)
    limits.check(limits.tokens, f"user:{user.id}", "token requests")
    raw = new_token()
    row = ApiToken(
        token_hash=hash_token(raw),
        kind="deploy",
        user_id=user.id,
        app_id=app.id,
        name=body.name,
        expires_at=utcnow() + timedelta(days=body.expires_in_days),
    )
    session.add(row)
    session.commit()
    return {"id": row.id, "name": row.name, "expired_at": ts(row.expires_at), "value": raw}


@router.delete("/apps/{app_id}/tokens/{token_id}", status_code=204)
def delete_token(app_id: str, token_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    app = get_app(session, principal, app_id, action=Action.TOKENS_MANAGE)
    row = session.get(ApiToken, token_id)
    if row is None or row.app_id != app.id or row.kind != "deploy" or row.revoked_at is not None:
        raise NotFound("Deploy token not found.", title="Token not found")
    row.revoked_at = utcnow()
    session.add(row)
    session.commit()
    return Response(status_code=204)


# -- the caller's own user tokens ------------------------------------------------------------------------


@router.get("/tokens/")
def list_user_tokens(session: SessionDep, principal: PrincipalDep) -> UserTokenList:
    """The caller's live user tokens (device logins, password logins, personal tokens)."""
    user = require_user(principal)
    rows = session.exec(
        select(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.kind == "user", col(ApiToken.revoked_at).is_(None))
        .order_by(col(ApiToken.created_at))
    ).all()
    now = utcnow()
    return UserTokenList(
        data=[
            UserTokenOut(
                id=r.id,
                name=r.name,
                created_at=ts(r.created_at),
                expires_at=ts(r.expires_at),
                last_used_at=ts(r.last_used_at),
                current=r.id == principal.token.id,
            )
            for r in rows
            if r.expires_at is None or aware(r.expires_at) > now
        ]
    )


@router.post("/tokens/", status_code=201)
def create_user_token(
    body: UserTokenCreate, session: SessionDep, principal: PrincipalDep, limits: LimitsDep
) -> UserTokenCreated:
    """A personal token for scripts, acting as the caller with the caller's roles."""
    user = require_user(principal)
    limits.check(limits.tokens, f"user:{user.id}", "token requests")
    raw = new_token()
    expires = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    row = ApiToken(
        token_hash=hash_token(raw), kind="user", user_id=user.id, name=body.name, expires_at=expires
    )
    session.add(row)
    session.commit()
    return UserTokenCreated(id=row.id, name=row.name, expires_at=ts(row.expires_at), value=raw)


@router.delete("/tokens/{token_id}", status_code=204)
def delete_user_token(token_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    user = require_user(principal)
    row = session.get(ApiToken, token_id)
    if row is None or row.user_id != user.id or row.kind != "user" or row.revoked_at is not None:
        raise NotFound("Token not found.", title="Token not found", hint="GET /api/v1/tokens/ lists yours.")
    row.revoked_at = utcnow()
    session.add(row)
    session.commit()
    return Response(status_code=204)
