"""The platform's own image (``Dockerfile``), as the Helm chart runs it, on a real Docker engine.

Built once per session by the ``platform_image`` fixture (tests/platform_image.py: offline, on the test
base image). Run as the chart runs it — non-root, a read-only root filesystem,
``/data`` and ``/tmp`` writable — a control plane (``server``) and, on the same Docker network, a remote
router (``router``) fed by it with the shared token: the API answers, the router syncs its table and is
ready, and the control plane lists it.
"""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

TOKEN = "fdp_image_admin_" + uuid.uuid4().hex[:8]
ROUTER_TOKEN = "fdp_image_router_" + uuid.uuid4().hex


def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    return result


def published(container: str, port: int) -> int:
    out = docker("port", container, f"{port}/tcp").stdout.split()[0]  # 127.0.0.1:NNNNN
    return int(out.rsplit(":", 1)[1])


def as_the_chart_runs_it(name: str, network: str) -> list[str]:
    """``docker run`` options matching the chart's pod: uid 10001, read-only root, /data and /tmp."""
    return [
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        network,
        "--user",
        "10001:10001",
        "--read-only",
        "--tmpfs",
        "/tmp:uid=10001,gid=10001",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]


def test_the_image_runs_a_control_plane_and_a_remote_router_as_the_chart_does(platform_image: str) -> None:
    image = platform_image
    suffix = uuid.uuid4().hex[:8]
    network, server, router = f"fdp-image-{suffix}", f"fdp-image-cp-{suffix}", f"fdp-image-router-{suffix}"
    data = f"fdp-image-data-{suffix}"
    docker("network", "create", network)
    try:
        # The image's defaults: `fastapi-deploy server` on 0.0.0.0, the data directory /data (a volume).
        docker(
            *as_the_chart_runs_it(server, network),
            "--volume",
            f"{data}:/data",
            "--env",
            f"FASTAPI_DEPLOY_ADMIN_TOKEN={TOKEN}",
            "--env",
            f"FASTAPI_DEPLOY_ROUTER_TOKEN={ROUTER_TOKEN}",
            "--publish",
            "127.0.0.1::8000",
            image,
        )
        api = f"http://127.0.0.1:{published(server, 8000)}"

        def api_ready() -> bool:
            state = docker("inspect", "--format", "{{.State.Status}}", server).stdout.strip()
            assert state == "running", (
                docker("logs", server).stdout[-3000:] + docker("logs", server).stderr[-3000:]
            )
            try:
                return httpx.get(f"{api}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(api_ready, 90, interval=0.5, what="the control plane in the image")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.get(f"{api}/api/v1/apps/", headers=auth, timeout=10)
        assert r.status_code == 200 and r.json()["data"] == [], r.text
        assert httpx.get(f"{api}/dashboard/login", timeout=10).status_code == 200  # templates are packaged
        uid = docker("exec", server, "id", "-u").stdout.strip()
        assert uid == "10001"

        # A remote router, as the chart's router Deployment: fed by the control plane over the network.
        docker(
            *as_the_chart_runs_it(router, network),
            "--env",
            f"FASTAPI_DEPLOY_CONTROL_PLANE_URL=http://{server}:8000",
            "--env",
            f"FASTAPI_DEPLOY_ROUTER_TOKEN={ROUTER_TOKEN}",
            "--publish",
            "127.0.0.1::8080",
            "--publish",
            "127.0.0.1::8081",
            image,
            "router",
        )
        health = f"http://127.0.0.1:{published(router, 8081)}"

        def router_ready() -> bool:
            state = docker("inspect", "--format", "{{.State.Status}}", router).stdout.strip()
            assert state == "running", docker("logs", router).stderr[-3000:]
            try:
                return httpx.get(f"{health}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(router_ready, 60, interval=0.5, what="the remote router in the image to sync")
        routes: dict[str, Any] = httpx.get(f"{health}/routes", timeout=5).json()
        assert routes["connected"] and routes["synced"] and routes["refusal"] == ""
        status = httpx.get(f"{api}/api/v1/admin/status", headers=auth, timeout=10).json()
        assert [r["name"] for r in status["router"]["remote"]] == [routes["name"]]
        gateway = f"http://127.0.0.1:{published(router, 8080)}"
        r = httpx.get(f"{gateway}/", headers={"Host": "nothing.localhost"}, timeout=10)
        assert r.status_code == 404  # the router answers, for an app that does not exist
    finally:
        for container in (router, server):
            docker("rm", "-f", container, check=False)
        docker("volume", "rm", "-f", data, check=False)
        docker("network", "rm", network, check=False)
