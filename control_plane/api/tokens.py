"""Deploy tokens: app-scoped, expiring, revocable, shown once, stored hashed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from sqlmodel import col, select

from control_plane.api.deps import PrincipalDep, SessionDep
from control_plane.errors import NotFound
from control_plane.models import ApiToken, utcnow
from control_plane.security import get_app, hash_token, new_token, require_user
from control_plane.serializers import ts

router = APIRouter()


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    expires_in_days: int = Field(365, ge=1, le=3650)


@router.get("/apps/{app_id}/tokens")
def list_tokens(app_id: str, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    app = get_app(session, principal, app_id)
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


@router.post("/apps/{app_id}/tokens", status_code=201)
def create_token(
    app_id: str, body: TokenCreate, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    app = get_app(session, principal, app_id)
    user = require_user(principal)
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
    app = get_app(session, principal, app_id)
    row = session.get(ApiToken, token_id)
    if row is None or row.app_id != app.id or row.kind != "deploy" or row.revoked_at is not None:
        raise NotFound("Deploy token not found.", title="Token not found")
    row.revoked_at = utcnow()
    session.add(row)
    session.commit()
    return Response(status_code=204)
