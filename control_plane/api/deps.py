"""Dependencies shared by the API modules: the platform, a database session, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session

from control_plane.platform import Platform
from control_plane.security import Principal, authenticate


def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def get_session(platform: Annotated[Platform, Depends(get_platform)]) -> Iterator[Session]:
    with platform.db.session() as session:
        yield session


def get_principal(
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    return authenticate(session, authorization)


PlatformDep = Annotated[Platform, Depends(get_platform)]
SessionDep = Annotated[Session, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
