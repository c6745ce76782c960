"""Dependencies shared by the API modules: the platform, a database session, the caller, rate limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session

from control_plane import audit
from control_plane.platform import Platform
from control_plane.ratelimit import RateLimits
from control_plane.security import Principal, authenticate


def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def get_session(platform: Annotated[Platform, Depends(get_platform)]) -> Iterator[Session]:
    with platform.db.session() as session:
        yield session


def get_principal(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    principal = authenticate(session, authorization)
    audit.note(request, principal=principal)
    return principal


def get_streaming_principal(
    request: Request,
    platform: Annotated[Platform, Depends(get_platform)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    """The caller, for endpoints that stream: authenticated in a session closed at once. A request-scoped
    session would stay open (idle in a transaction, holding a pool connection) as long as the stream."""
    with platform.db.session() as session:
        principal = authenticate(session, authorization)
    audit.note(request, principal=principal)
    return principal


def get_limits(request: Request) -> RateLimits:
    limits: RateLimits = request.app.state.rate_limits
    return limits


def client_ip(request: Request) -> str:
    """The peer's address (uvicorn already applied ``X-Forwarded-For`` from trusted proxies)."""
    return request.client.host if request.client else "unknown"


MAX_SKIP = 1_000_000_000
"""The largest ``skip`` a list accepts (databases keep offsets in 64-bit integers at most)."""

PlatformDep = Annotated[Platform, Depends(get_platform)]
SessionDep = Annotated[Session, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
StreamingPrincipalDep = Annotated[Principal, Depends(get_streaming_principal)]
"""For streaming responses: the caller without a session that lives as long as the stream."""
LimitsDep = Annotated[RateLimits, Depends(get_limits)]
