"""The Docker test environment that ``scripts/test`` prepares: an engine, a base image, a registry.

``scripts/test`` exports ``FASTAPI_DEPLOY_TEST_BASE_IMAGE`` (built from Debian packages: nothing can be
pulled here) and ``FASTAPI_DEPLOY_TEST_REGISTRY`` (+ ``_USERNAME``, ``_PASSWORD``: Debian's
docker-registry on loopback). Without them, or without an engine, docker tests skip with the reason
(locally); in CI a skip fails the run (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import pytest

BASE_IMAGE = os.environ.get("FASTAPI_DEPLOY_TEST_BASE_IMAGE", "")
REGISTRY = os.environ.get("FASTAPI_DEPLOY_TEST_REGISTRY", "")
REGISTRY_USERNAME = os.environ.get("FASTAPI_DEPLOY_TEST_REGISTRY_USERNAME", "")
REGISTRY_PASSWORD = os.environ.get("FASTAPI_DEPLOY_TEST_REGISTRY_PASSWORD", "")


@functools.cache
def unavailable() -> str | None:
    """Why docker tests cannot run here (``None``: they can)."""
    if not BASE_IMAGE:
        return "no Docker test environment: run scripts/test (FASTAPI_DEPLOY_TEST_BASE_IMAGE is unset)"
    try:
        import docker
    except ImportError:
        return "the docker package is not installed (pip install -e '.[docker]')"
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(BASE_IMAGE)
    except Exception as exc:
        return f"the Docker engine or the base image {BASE_IMAGE} is not available: {exc}"
    finally:
        if "client" in locals():
            client.close()
    return None


def require() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def client() -> Any:
    import docker

    return docker.from_env()


@contextlib.contextmanager
def connected() -> Iterator[Any]:
    """A client of the test's Docker engine (``docker.DockerClient``), closed after use."""
    c = client()
    try:
        yield c
    finally:
        c.close()


def containers(label: str) -> list[dict[str, Any]]:
    """Summaries (``Id``, ``State``, ``Labels``, ...) of the containers, running or not, with ``label``
    (``key=value``)."""
    c = client()
    try:
        return list(c.api.containers(all=True, filters={"label": label}))
    finally:
        c.close()
