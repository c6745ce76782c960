"""End to end on the docker backend: a real server (``--backend docker``) pushing to a real registry.

The real CLI pushes the examples; each is built into an image (runtime/images.py), pushed to Debian's
docker-registry on loopback (with a password) and run as containers that the router reaches. A code-only
redeploy reuses the dependency layer (same digest); the image is pulled back by digest; a killed
container is replaced; an app over its memory limit is reported (in its logs, and as an ``oom`` alert to
a webhook receiver in its own process); a crashed control plane's containers are adopted by the next
one. ``scripts/test`` prepares the engine, the base image and the registry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.images import LABEL
from tests import dockerenv
from tests.conftest import EXAMPLES, ROOT, Server, make_server, wait_until
from tests.test_alerts_e2e import received
from tests.test_alerts_e2e import receiver as receiver
from tests.test_e2e import assert_sse_streams_event_by_event, assert_websocket_echoes

pytestmark = pytest.mark.e2e

HOG = """\
import os
from contextlib import asynccontextmanager
from fastapi import FastAPI

held = []


@asynccontextmanager
async def lifespan(app):
    if os.environ.get("HOG_AT_STARTUP"):
        held.append(b"x" * (400 * 2**20))
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/")
def root():
    return {"held": len(held)}


@app.get("/hog")
def hog():
    held.append(b"x" * (400 * 2**20))
    return {"held": len(held)}
"""


def docker_server(tmp: Path, **extra: str) -> Server:
    return make_server(
        tmp,
        FASTAPI_DEPLOY_BACKEND="docker",
        FASTAPI_DEPLOY_BASE_IMAGE=dockerenv.BASE_IMAGE,
        FASTAPI_DEPLOY_REGISTRY=f"{dockerenv.REGISTRY}/e2e",
        FASTAPI_DEPLOY_REGISTRY_USERNAME=dockerenv.REGISTRY_USERNAME,
        FASTAPI_DEPLOY_REGISTRY_PASSWORD=dockerenv.REGISTRY_PASSWORD,
        **extra,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    dockerenv.require()
    tmp = tmp_path_factory.mktemp("docker-server")
    srv = docker_server(tmp)
    srv.start()
    srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
    try:
        yield srv
    finally:
        srv.stop()
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / f"server-{tmp.name}.log").write_text(srv.log_path.read_text(errors="replace"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("projects")


def push(server: Server, path: Path, app: str, *, check: bool = True) -> dict[str, Any]:
    result = server.cli("push", str(path), "--app", app, "--json", check=False)
    try:
        out: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"push printed no JSON:\n{result.stdout}\n{result.stderr}") from None
    if check:
        assert result.returncode == 0, f"push failed:\n{result.stdout}\n{result.stderr}"
        assert out["status"] == "success", out
    return out


def build_log(server: Server, deployment_id: str) -> str:
    with server.api() as api, api.stream("GET", f"/deployments/{deployment_id}/build-logs") as r:
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    return "\n".join(line.get("message", "") for line in lines if line["type"] == "message")


def image_of(server: Server, deployment_id: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(
        (server.data_dir / "deployments" / deployment_id / "image.json").read_text()
    )
    return record


def containers_of(app_id: str) -> list[dict[str, Any]]:
    return [c for c in dockerenv.containers(f"{LABEL}.app={app_id}") if c["State"] == "running"]


def app_id(server: Server, slug: str) -> str:
    return str(server.cli_json("status", slug)["app"]["id"])


def copy_example(name: str, dest: Path) -> Path:
    shutil.copytree(EXAMPLES / name, dest)
    return dest


# -- deploy and serve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("example", "expect", "also"),
    [
        ("hello", {"message": "Hello from fastapi-deploy"}, None),
        ("with-deps", {"size": "1.0 MB", "humanize": None}, None),
        ("package", {"shape": "package", "module": "app.routes"}, None),
        ("lifespan", {"model": "loaded"}, None),
        ("sse", {"stream": "/events"}, assert_sse_streams_event_by_event),
        ("websocket", {"websocket": "/ws"}, assert_websocket_echoes),
    ],
    ids=["hello", "with-deps", "package", "lifespan", "sse", "websocket"],
)
def test_examples_run_as_containers_behind_the_router(
    server: Server,
    workdir: Path,
    example: str,
    expect: dict[str, Any],
    also: Callable[[Server, str], None] | None,
) -> None:
    """Every example tests/test_e2e.py runs on the process backend, as a container; streams too."""
    out = push(server, copy_example(example, workdir / example), f"dk-{example}")

    r = server.get(f"dk-{example}", "/")
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: v for k, v in body.items() if expect.get(k) is not None} == {
        k: v for k, v in expect.items() if v is not None
    }
    if also is not None:  # as on the process backend (tests/test_e2e.py)
        also(server, f"dk-{example}")
    image = image_of(server, out["deployment_id"])
    log = build_log(server, out["deployment_id"])
    assert f"Pushed {image['reference']}" in log
    running = containers_of(app_id(server, f"dk-{example}"))
    assert len(running) == 1
    container = running[0]
    assert container["ImageID"] == image["image_id"]
    assert container["Labels"][f"{LABEL}.deployment"] == out["deployment_id"]
    with dockerenv.connected() as client:
        api = client.api
        attrs = api.inspect_container(container["Id"])
    assert attrs["Config"]["User"] == "10001:10001"  # the image's non-root user
    assert attrs["HostConfig"]["Memory"] == 512 * 2**20  # the platform's instance size
    assert attrs["HostConfig"]["NanoCpus"] == int(0.5 * 1e9)
    bindings = attrs["NetworkSettings"]["Ports"]["8000/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]


def test_containers_are_traced_too(server: Server, workdir: Path) -> None:
    """The image carries the observability layer and the instrumentation; the container sends its
    spans to the receiver on its network's gateway. A trace id in the sampled share is always kept."""
    out = push(server, copy_example("hello", workdir / "traced"), "dk-traced")
    image = image_of(server, out["deployment_id"])
    with dockerenv.connected() as client:
        env = client.api.inspect_image(image["image_id"])["Config"]["Env"]
    assert any(e.startswith("FASTAPI_DEPLOY_OTEL_PATH=/opt/fastapi-deploy/otel") for e in env)
    trace_id = "4bf92f3577b34da60000000000000001"  # low 64 bits below any sampling ratio but 0
    r = server.get("dk-traced", "/items/3", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert r.status_code == 200 and r.headers["x-trace-id"] == trace_id

    def traced() -> dict[str, Any] | None:
        with server.api() as api:
            got = api.get(f"/traces/{trace_id}")
        spans = got.json()["spans"] if got.status_code == 200 else []
        app_spans = [s for s in spans if s["service"] == "dk-traced"]
        return app_spans[0] if app_spans else None

    span = wait_until(traced, 30, interval=0.3, what="the container's span")
    assert span["name"] == "GET /items/{item_id}" and span["kind"] == "server"
    assert span["instance_id"]


def test_code_only_redeploy_reuses_the_dependency_layer(server: Server, workdir: Path) -> None:
    project = copy_example("with-deps", workdir / "layered")
    first = push(server, project, "layered")
    (project / "main.py").write_text((project / "main.py").read_text().replace('{"size":', '{"bytes":'))

    second = push(server, project, "layered")

    before, after = image_of(server, first["deployment_id"]), image_of(server, second["deployment_id"])
    with dockerenv.connected() as client:
        api = client.api
        layers_before = api.inspect_image(before["image_id"])["RootFS"]["Layers"]
        layers_after = api.inspect_image(after["image_id"])["RootFS"]["Layers"]
    assert layers_after[:-1] == layers_before[:-1]  # base, dependencies, launcher: the same digests
    assert layers_after[-1] != layers_before[-1]  # only the app layer is new
    assert after["dependency_layer"] == before["dependency_layer"] in layers_after
    assert "Dependencies unchanged" in build_log(server, second["deployment_id"])
    assert "New dependencies" not in build_log(server, second["deployment_id"])
    assert server.get("layered").json()["bytes"] == "1.0 MB"


def test_image_is_pushed_and_pulled_back_by_digest(server: Server, workdir: Path) -> None:
    out = push(server, copy_example("hello", workdir / "digested"), "digested")
    image = image_of(server, out["deployment_id"])
    reference = image["reference"]
    repository, digest = reference.split("@")
    assert repository == f"{dockerenv.REGISTRY}/e2e/{app_id(server, 'digested')}"
    name = repository.split("/", 1)[1]
    manifest_url = f"http://{dockerenv.REGISTRY}/v2/{name}/manifests/{digest}"
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}

    anonymous = httpx.get(manifest_url, headers=accept)
    assert anonymous.status_code == 401  # the registry wants the platform's credentials
    auth = (dockerenv.REGISTRY_USERNAME, dockerenv.REGISTRY_PASSWORD)
    manifest = httpx.get(manifest_url, headers=accept, auth=auth)
    assert manifest.status_code == 200, manifest.text
    assert manifest.headers["Docker-Content-Digest"] == digest
    assert manifest.json()["config"]["digest"] == image["image_id"]  # the registry has exactly our image

    with dockerenv.connected() as client:
        api = client.api
        api.remove_image(reference)  # the local digest reference goes (the image stays: it runs)
        assert reference not in api.inspect_image(image["image_id"]).get("RepoDigests", [])
        events = list(
            api.pull(
                repository,
                tag=digest,
                stream=True,
                decode=True,
                auth_config={"username": auth[0], "password": auth[1]},
            )
        )
        assert not [e for e in events if "error" in e], events
        assert api.inspect_image(reference)["Id"] == image["image_id"]
    # And what the registry holds is what runs: the container was started by digest.
    assert containers_of(app_id(server, "digested"))[0]["Image"] == reference


def test_autoscaling_and_the_warm_pool_work_on_containers_too(server: Server, workdir: Path) -> None:
    """The same policy as on the process backend: a floor of two serving containers plus a warm spare,
    then down again; every container of the app is the revision's image."""
    push(server, copy_example("hello", workdir / "scaled"), "dk-scaled")
    ident = app_id(server, "dk-scaled")
    server.cli("scale", "dk-scaled", "--min", "2", "--max", "4", "--prewarm", "1")

    def states() -> list[str]:
        return sorted(i["state"] for i in server.cli_json("status", "dk-scaled")["app"]["instances"])

    wait_until(
        lambda: states() == ["serving", "serving", "warm"], 90, interval=0.5, what="2 serving + 1 warm"
    )
    assert len(containers_of(ident)) == 3
    assert {server.get("dk-scaled", "/").status_code for _ in range(6)} == {200}
    server.cli("scale", "dk-scaled", "--min", "1", "--prewarm", "0")
    # Scaled down, not stopped: the second serving container is parked warm (the parking allowance,
    # runtime/autoscaler.py) and the spare beyond it is stopped.
    wait_until(lambda: states() == ["serving", "warm"], 90, interval=0.5, what="1 serving + 1 parked")
    wait_until(lambda: len(containers_of(ident)) == 2, 60, interval=0.5, what="the spare container stopped")
    assert server.get("dk-scaled", "/").status_code == 200


def test_killed_container_is_replaced(server: Server, workdir: Path) -> None:
    push(server, copy_example("hello", workdir / "killed"), "killed")
    ident = app_id(server, "killed")
    [victim] = containers_of(ident)

    with dockerenv.connected() as client:
        api = client.api
        api.kill(victim["Id"])

    replacement = wait_until(
        lambda: [c for c in containers_of(ident) if c["Id"] != victim["Id"]], 60, what="a new container"
    )
    assert len(replacement) == 1
    r = wait_until(lambda: (r := server.get("killed")).status_code == 200 and r, 30, what="the app again")
    assert r.json() == {"message": "Hello from fastapi-deploy"}
    logs = server.cli("logs", "killed", "--tail", "200").stdout
    assert "exited unexpectedly (exit code -9)" in logs


def test_out_of_memory_is_reported(server: Server, workdir: Path, receiver: str) -> None:
    project = workdir / "hog"
    project.mkdir()
    (project / "main.py").write_text(HOG)
    (project / "requirements.txt").write_text("fastapi\nuvicorn\n")
    with server.api() as api:
        assert api.patch("/admin/settings", json={"instance_memory_mb": 160}).status_code == 200
    try:
        # At runtime: the instance is killed at its limit, the logs say so, a new one takes over.
        push(server, project, "hog")
        hook = server.cli_json("webhooks", "hog", "--add", f"{receiver}/hooks/hog")
        [victim] = [i["id"] for i in server.cli_json("status", "hog")["app"]["instances"]]
        r = server.get("hog", "/hog")
        assert r.status_code == 502, r.text
        logs = wait_until(
            lambda: (
                (out := server.cli("logs", "hog", "--tail", "200").stdout) and "out of memory" in out and out
            ),
            30,
            what="the OOM log line",
        )
        assert "was killed: out of memory (limit 160 MiB)" in logs
        wait_until(lambda: server.get("hog").status_code == 200, 60, what="a replacement instance")

        # And it is an alert: a row of kind oom, sent (signed) to the app's webhook.
        [sent] = wait_until(
            lambda: received(receiver, type="app_alert", kind="oom", app="hog"), 30, what="the OOM alert"
        )
        body = sent["body"]
        assert body["message"] == f"Instance {victim} was killed: out of memory (limit 160 MiB)", body
        assert body["data"] == {"instance": victim, "memory_mb": 160}, body
        assert body["severity"] == "ticket" and body["status"] == "firing"
        digest = hmac.new(hook["secret"].encode(), sent["raw"].encode(), hashlib.sha256).hexdigest()
        assert sent["signature"] == f"sha256={digest}"
        oom = wait_until(
            lambda: [a for a in server.cli_json("alerts", "hog") if a["kind"] == "oom" and a["deliveries"]],
            30,
            what="the alert's delivery recorded",
        )
        assert len(oom) == 1 and oom[0]["status"] == "resolved"  # one-shot: nothing left firing
        assert [d["status"] for d in oom[0]["deliveries"]] == [204]
        # Killed again soon after: an OOM crash loop makes the live deployment degraded_oom.
        assert server.get("hog", "/hog").status_code == 502
        live = server.cli_json("status", "hog")["app"]["current_deployment_id"]

        def live_status() -> str:
            with server.api() as api:
                return str(api.get(f"/deployments/{live}").json()["status"])

        wait_until(lambda: live_status() == "degraded_oom", 30, what="the deployment degraded_oom")
        assert server.cli_json("status", "hog")["app"]["status"] == "degraded"
        wait_until(lambda: server.get("hog").status_code == 200, 60, what="a replacement instance")

        # At startup: verification fails as out of memory, and the previous revision keeps serving.
        server.cli("env", "set", "hog", "HOG_AT_STARTUP=1", "--no-redeploy")
        failed = push(server, project, "hog", check=False)
        assert failed["status"] == "verification_failed_oom", failed
        assert failed["failure"]["error_code"] == "verification_failed_oom", failed
        assert failed["failure"]["error_title"] == "Out of memory"
        assert "ran out of memory during startup" in build_log(server, failed["deployment_id"])
        assert server.get("hog").status_code == 200
    finally:
        with server.api() as api:
            api.patch("/admin/settings", json={"instance_memory_mb": 512})


# -- restarts ---------------------------------------------------------------------------------------------


def test_a_crashed_control_plane_s_containers_are_adopted(tmp_path: Path) -> None:
    dockerenv.require()
    srv = docker_server(tmp_path)
    srv.start()
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        push(srv, copy_example("hello", tmp_path / "adopted"), "adopted")
        ident = app_id(srv, "adopted")
        before = {c["Id"] for c in containers_of(ident)}

        srv.stop(sig=signal.SIGKILL)  # a crash: nothing is stopped
        assert {c["Id"] for c in containers_of(ident)} == before
        srv.start()

        r = wait_until(lambda: (r := srv.get("adopted")).status_code == 200 and r, 30, what="the app")
        assert r.json() == {"message": "Hello from fastapi-deploy"}
        assert {c["Id"] for c in containers_of(ident)} == before  # adopted, not restarted
        assert "Adopted instance" in srv.cli("logs", "adopted", "--tail", "200").stdout

        srv.stop()  # a graceful stop stops its containers
        assert containers_of(ident) == []
    finally:
        srv.stop()
