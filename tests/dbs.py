"""Throwaway databases for tests: a SQLite file, or a fresh database on the PostgreSQL server that
``scripts/test`` starts (``FASTAPI_DEPLOY_TEST_DATABASE_URL``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ENV = "FASTAPI_DEPLOY_TEST_DATABASE_URL"


def _psycopg(url: str) -> str:
    return (
        url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
    )


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database; its URL (libpq form). Dropped afterwards."""
    admin_url = os.environ.get(PG_ENV)
    if not admin_url:
        pytest.skip(f"no PostgreSQL: set {PG_ENV} (scripts/test starts one)")
    name = f"fdp_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_psycopg(admin_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """``DATABASE_URL`` for ``kind`` (``sqlite`` → empty string: the embedded default)."""
    if kind == "sqlite":
        yield ""
    else:
        with postgres_database() as url:
            yield url
