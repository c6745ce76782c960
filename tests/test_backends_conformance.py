"""One suite, every backend: what the control plane relies on, checked against ``process``, ``docker`` and
``kubernetes``.

Each test runs once per backend (the ``kind`` fixture): start and readiness (lifespan done, health
answering), graceful and forced stop, output per instance with levels, env vars, failing apps, crash
detection (from inside and from outside), and recovery after a control-plane restart (adopted and
serving on, or gone: never left running unwatched). Resource limits are parametrized only over the
backends that enforce them (``ENFORCE_LIMITS``: all three; ``process`` with cgroups, as here).

The docker backend runs an image of the same app, built once per module by ``runtime/images.py`` on the
test base image (``scripts/test`` prepares it). The kubernetes backend runs the same image, pushed to the
test registry and deployed by digest, on the FAKE cluster of ``tests/kubefake`` (a real HTTP API server
and a kubelet that runs each pod as Docker containers: no cluster can run here); an instance is a pod,
its host the pod IP. Waits poll with deadlines; no test sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from runtime.backends.base import Backend, Instance, InstanceSpec, InstanceState, LogRecord
from runtime.backends.process import ProcessBackend
from runtime.detect import detect_project
from runtime.errors import VerifyError
from runtime.health import probe
from runtime.images import LABEL, BuiltImage, ImageMeta, build_image
from tests import dockerenv

if TYPE_CHECKING:
    from tests.kubefake import FakeCluster

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux backends"),
]

KINDS = ["process", "docker", "kubernetes"]
# process enforces limits with cgroups, which these tests (run as root, like CI) have (docs/ISOLATION.md)
ENFORCE_LIMITS = ["process", "docker", "kubernetes"]
START_TIMEOUT = 60.0
WAIT = 15.0

APP = """
import asyncio, os, sys
from contextlib import asynccontextmanager
from fastapi import FastAPI
from fastapi.responses import JSONResponse

state = {"started": False}
held = []
me = lambda: os.environ["FASTAPI_DEPLOY_INSTANCE_ID"]


@asynccontextmanager
async def lifespan(app):
    if os.environ.get("FAIL_LIFESPAN"):
        raise RuntimeError("lifespan exploded")
    if os.environ.get("HOG_AT_STARTUP"):
        held.append(b"x" * (int(os.environ["HOG_AT_STARTUP"]) * 2**20))
    state["started"] = True
    print("startup of", me(), flush=True)
    yield
    print("shutdown of", me(), flush=True)
    if os.environ.get("HANG_ON_SHUTDOWN"):
        await asyncio.sleep(3600)


app = FastAPI(lifespan=lifespan)


@app.get("/")
def root():
    if os.environ.get("UNHEALTHY"):
        return JSONResponse({"ok": False}, status_code=500)
    return {"started": state["started"], "instance": me()}


@app.get("/env")
def env():
    return dict(os.environ)


@app.get("/say")
def say():
    print("out", me(), flush=True)
    print("err", me(), file=sys.stderr, flush=True)
    print("WARNING: careful", me(), file=sys.stderr, flush=True)
    print("ERROR: broken", me(), file=sys.stderr, flush=True)
    return {}


@app.get("/crash")
def crash():
    os._exit(3)


@app.get("/hog")
def hog(mb: int):
    held.append(b"x" * (mb * 2**20))
    return {"held": len(held)}


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@app.get("/limits")
def limits():
    memory = _read("/sys/fs/cgroup/memory.max") or _read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    cpu = _read("/sys/fs/cgroup/cpu.max")  # cgroup v2; v1 below
    if cpu is None:
        v1 = "/sys/fs/cgroup/cpu/cpu.cfs_"
        cpu = f"{_read(v1 + 'quota_us')} {_read(v1 + 'period_us')}"
    quota, period = cpu.split()
    return {"memory": int(memory), "cpus": None if quota in ("max", "-1") else int(quota) / int(period)}
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Logs(list[LogRecord]):
    def messages(self, instance_id: str, stream: str | None = None) -> list[str]:
        return [r.message for r in self if r.instance_id == instance_id and stream in (None, r.stream)]

    def has(self, instance_id: str, message: str, stream: str | None = None) -> bool:
        return message in self.messages(instance_id, stream)

    def level(self, instance_id: str, message: str) -> str | None:
        return next((r.level for r in self if r.instance_id == instance_id and r.message == message), None)


@pytest.fixture(scope="module")
def docker_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage | None]:
    """The conformance app as an image, once per module (``None`` where docker cannot run: those
    tests skip, and fail in CI)."""
    if dockerenv.unavailable():
        yield None
        return
    from runtime.backends.docker import DockerBackend

    tmp = tmp_path_factory.mktemp("conformance-image")
    src = tmp / "src"
    src.mkdir()
    (src / "main.py").write_text(textwrap.dedent(APP))
    (src / "requirements.txt").write_text("fastapi\nuvicorn\n")
    engine = DockerBackend(tmp / "state", lambda record: None).images
    built = build_image(
        detect_project(src),
        src,
        ImageMeta(app_id="conformance", deployment_id=uuid.uuid4().hex, hostname="app1.test"),
        engine=engine,
        cache_dir=tmp / "cache",
        base_image=dockerenv.BASE_IMAGE,
        log=lambda line: None,
    )
    yield built
    with dockerenv.connected() as client:
        client.images.remove(built.image_id, force=True)


@pytest.fixture(scope="module")
def kube_image(
    docker_image: BuiltImage | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BuiltImage | None]:
    """The conformance image pushed to the test registry: Kubernetes runs images by digest."""
    if docker_image is None or not dockerenv.REGISTRY:
        yield None
        return
    from runtime.backends.docker import DockerBackend
    from runtime.registry import Registry

    tmp = tmp_path_factory.mktemp("conformance-kube-image")
    src = tmp / "src"
    src.mkdir()
    (src / "main.py").write_text(textwrap.dedent(APP))
    (src / "requirements.txt").write_text("fastapi\nuvicorn\n")
    engine = DockerBackend(tmp / "state", lambda record: None).images
    built = build_image(
        detect_project(src),
        src,
        ImageMeta(app_id="conformance", deployment_id=uuid.uuid4().hex, hostname="app1.test"),
        engine=engine,
        cache_dir=tmp / "cache",
        base_image=dockerenv.BASE_IMAGE,
        log=lambda line: None,
        registry=Registry.parse(
            f"{dockerenv.REGISTRY}/conformance",
            username=dockerenv.REGISTRY_USERNAME,
            password=dockerenv.REGISTRY_PASSWORD,
        ),
    )
    yield built
    with dockerenv.connected() as client:
        client.images.remove(built.image_id, force=True)


@pytest.fixture(scope="module")
def fake_cluster(
    kube_image: BuiltImage | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FakeCluster | None]:
    """A FAKE Kubernetes cluster (tests/kubefake) whose kubelet runs pods on the test Docker engine."""
    if kube_image is None:
        yield None
        return
    from tests.kubefake import FakeCluster

    with FakeCluster(
        tmp_path_factory.mktemp("kubefake"), sandbox_image=dockerenv.BASE_IMAGE, restart_backoff=1.0
    ) as cluster:
        yield cluster


@dataclass
class Harness:
    """One backend kind: how to make its backends and specs, and how to kill or find its instances."""

    kind: str
    tmp: Path
    image: BuiltImage | None
    cluster: FakeCluster | None = None
    made: list[Backend] = field(default_factory=list)
    namespace: str = field(default_factory=lambda: f"conformance-{uuid.uuid4().hex[:8]}")
    killed: dict[str, str] = field(default_factory=dict)

    def backend(self, logs: Logs, on_exit: Callable[[Instance], None] | None = None) -> Backend:
        backend: Backend
        if self.kind == "kubernetes":
            from runtime.backends.kubernetes import KubernetesBackend, KubernetesConfig
            from runtime.registry import Registry

            assert self.cluster is not None
            for previous in self.made:  # a second backend stands for a restarted control plane:
                previous.detach()  # type: ignore[attr-defined]  # the first one is gone (crashed)
            config = KubernetesConfig(
                namespace=self.namespace,
                platform_id=self.namespace,
                kubeconfig=str(self.cluster.kubeconfig),
                registry=Registry.parse(
                    dockerenv.REGISTRY,
                    username=dockerenv.REGISTRY_USERNAME,
                    password=dockerenv.REGISTRY_PASSWORD,
                ),
                split_log_streams=True,  # the fake serves the PodLogsQuerySplitStreams stream= parameter
                # A pod deleted before its app installed signal handlers ignores SIGTERM (PID 1) and
                # lives out its grace period, on a real kubelet as on the fake one: keep it short here.
                termination_grace=5,
            )
            backend = KubernetesBackend(
                logs.append,
                images=None,
                config=config,
                on_exit=on_exit,
                namespace_for=lambda app: self.namespace,
            )
        elif self.kind == "docker":
            from runtime.backends.docker import DockerBackend

            backend = DockerBackend(self.tmp / "state", logs.append, on_exit=on_exit)
        else:
            backend = ProcessBackend(self.tmp / "state", logs.append, on_exit=on_exit)
        self.made.append(backend)
        return backend

    def spec(self, *, memory_mb: int | None = None, cpus: float | None = None, **env: str) -> InstanceSpec:
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        if self.kind in ("docker", "kubernetes"):
            assert self.image is not None
            return InstanceSpec(
                app_id="app1",
                deployment_id=deployment,
                hostname="app1.test",
                python=Path(self.image.python),
                entrypoint=self.image.entrypoint,
                app_dir=Path(self.image.app_dir),
                env=env,
                image=self.image.reference,
                memory_mb=memory_mb,
                cpus=cpus,
            )
        app_dir = self.tmp / "src"
        app_dir.mkdir(exist_ok=True)
        (app_dir / "main.py").write_text(textwrap.dedent(APP))
        return InstanceSpec(
            app_id="app1",
            deployment_id=deployment,
            hostname="app1.test",
            python=Path(sys.executable),
            entrypoint="main:app",
            app_dir=app_dir,
            env=env,
            memory_mb=memory_mb,
            cpus=cpus,
        )

    def kill(self, instance: Instance) -> None:
        """SIGKILL from outside, as an operator or the kernel would (kubernetes: the pod's container,
        as the kernel's OOM killer would; the kubelet then restarts it in the same pod)."""
        if self.kind == "kubernetes":
            container = self.made[-1].container_id(instance.id).removeprefix("docker://")  # type: ignore[attr-defined]
            self.killed[instance.id] = container
            with dockerenv.connected() as client:
                client.containers.get(container).kill()
        elif self.kind == "docker":
            with dockerenv.connected() as client:
                client.containers.get(f"fdp-{instance.id}").kill()
        else:
            os.killpg(instance.pid, signal.SIGKILL)

    def running(self, instance_id: str) -> bool:
        """Whether the instance still runs anywhere, watched or not (kubernetes: a container of its pod;
        after a kill, the container it ran in: a container the kubelet restarts in the pod is a new
        process, which the backend deletes with the pod)."""
        if self.kind == "kubernetes":
            found = dockerenv.containers(f"dev.kubefake.pod={instance_id}")
            if instance_id in self.killed:
                found = [c for c in found if c["Id"] == self.killed[instance_id]]
            return any(
                c["State"] == "running" and c["Labels"].get("dev.kubefake.container") != "sandbox"
                for c in found
            )
        if self.kind == "docker":
            found = dockerenv.containers(f"{LABEL}.instance={instance_id}")
            return any(c["State"] == "running" for c in found)
        return any(_launcher_of(pid, instance_id) for pid in _pids())

    def host(self, instance: Instance) -> str:
        """Where the router reaches the instance: loopback, or (kubernetes) the pod's IP, as the API says."""
        if self.kind != "kubernetes":
            return "127.0.0.1"
        assert self.cluster is not None
        from tests.kubefake.resources import kind_of

        pod = self.cluster.store.get(kind_of("Pod"), self.namespace, instance.id)
        return str(pod["status"]["podIP"])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _launcher_of(pid: int, instance_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return instance_id.encode() in cmdline and state != "Z"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def harness(
    kind: str,
    tmp_path: Path,
    docker_image: BuiltImage | None,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Harness]:
    if kind in ("docker", "kubernetes"):
        dockerenv.require()
    cluster = None
    image = docker_image
    if kind == "kubernetes":
        if not dockerenv.REGISTRY:
            pytest.skip("no test registry (FASTAPI_DEPLOY_TEST_REGISTRY): Kubernetes runs images by digest")
        image = request.getfixturevalue("kube_image")
        cluster = request.getfixturevalue("fake_cluster")
    h = Harness(kind=kind, tmp=tmp_path, image=image, cluster=cluster)
    yield h
    for backend in reversed(h.made):
        await backend.close(timeout=5)
    if kind == "kubernetes":
        assert cluster is not None
        from tests.kubefake.resources import kind_of

        await eventually(
            lambda: (
                not cluster.store.list(kind_of("Pod"), h.namespace)[0]
                and not dockerenv.containers(f"dev.kubefake.namespace={h.namespace}")
            ),
            "pods removed",
            timeout=30,
        )
    if kind == "docker":
        platform = h.made[0].platform_id if h.made else ""  # type: ignore[attr-defined]
        await eventually(
            lambda: not dockerenv.containers(f"{LABEL}.platform={platform}"), "containers removed"
        )


@pytest.fixture
def logs() -> Logs:
    return Logs()


async def get(instance: Instance, path: str = "/") -> Any:
    async with httpx.AsyncClient(base_url=f"http://{instance.host}:{instance.port}", timeout=WAIT) as c:
        response = await c.get(path)
    assert response.status_code == 200, response.text
    return response.json()


async def eventually(check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# -- lifecycle -------------------------------------------------------------------------------------------


async def test_start_returns_a_ready_healthy_instance(harness: Harness, logs: Logs) -> None:
    backend = harness.backend(logs)

    instance = await backend.start(harness.spec(), timeout=START_TIMEOUT)

    assert instance.state == InstanceState.WARM
    assert backend.instances() == [instance]
    assert (instance.host, instance.port > 0) == (harness.host(instance), True)
    answer = await get(instance)
    assert answer == {"started": True, "instance": instance.id}  # the lifespan ran before start() returned
    assert f"startup of {instance.id}" in logs.messages(instance.id, "stdout")
    assert f"Instance {instance.id} ready on port {instance.port}" in logs.messages(instance.id, "platform")


async def test_stop_is_graceful(harness: Harness, logs: Logs) -> None:
    backend = harness.backend(logs)
    instance = await backend.start(harness.spec(), timeout=START_TIMEOUT)

    await backend.stop(instance, timeout=WAIT)

    assert instance.state == InstanceState.STOPPED
    # uvicorn re-raises SIGTERM after its graceful shutdown (PID 1 in a container cannot die of it).
    assert instance.exit_code in (0, -signal.SIGTERM)
    assert f"shutdown of {instance.id}" in logs.messages(instance.id, "stdout")  # lifespan shutdown ran
    assert backend.instances() == []
    assert not harness.running(instance.id)


async def test_stop_kills_after_the_timeout(harness: Harness, logs: Logs) -> None:
    backend = harness.backend(logs)
    instance = await backend.start(harness.spec(HANG_ON_SHUTDOWN="1"), timeout=START_TIMEOUT)

    await backend.stop(instance, timeout=0.5)

    assert instance.state == InstanceState.STOPPED
    assert instance.exit_code == -signal.SIGKILL
    assert f"Instance {instance.id} did not stop in 0.5s; killing it" in logs.messages(instance.id)
    assert not harness.running(instance.id)


async def test_output_is_logged_per_instance_with_levels(harness: Harness, logs: Logs) -> None:
    backend = harness.backend(logs)
    spec = harness.spec()
    first, second = await asyncio.gather(*(backend.start(spec, timeout=START_TIMEOUT) for _ in range(2)))

    for instance in (first, second):
        await get(instance, "/say")
    for instance in (first, second):
        me = instance.id
        # stdout and stderr are two streams: each keeps its order, not their interleaving.
        await eventually(partial(logs.has, me, f"ERROR: broken {me}", "stderr"), "the last stderr line")
        await eventually(partial(logs.has, me, f"out {me}", "stdout"), "the stdout line")
        assert f"err {me}" in logs.messages(me, "stderr")
        assert logs.level(me, f"out {me}") == "info"
        assert logs.level(me, f"WARNING: careful {me}") == "warning"
        assert logs.level(me, f"ERROR: broken {me}") == "error"
    for record in logs:  # each line is attributed to the instance that wrote it
        for instance in (first, second):
            if record.message.endswith(instance.id) and record.stream != "platform":
                assert record.instance_id == instance.id, record
    assert not any(r.message.startswith('{"port"') for r in logs), "the ready line is not app output"


async def test_env_reaches_the_app(harness: Harness, logs: Logs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROL_PLANE_SECRET", "must not leak")
    backend = harness.backend(logs)
    spec = harness.spec(GREETING="hello", API_KEY="s3cr3t-value")
    instance = await backend.start(spec, timeout=START_TIMEOUT)

    env = await get(instance, "/env")

    assert env["GREETING"] == "hello"
    assert env["API_KEY"] == "s3cr3t-value"
    assert env["FASTAPI_DEPLOY_INSTANCE_ID"] == instance.id
    assert env["FASTAPI_DEPLOY_DEPLOYMENT_ID"] == spec.deployment_id
    assert env["FASTAPI_DEPLOY_APP_ID"] == spec.app_id
    assert "CONTROL_PLANE_SECRET" not in env
    assert not any("s3cr3t-value" in r.message for r in logs)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"FAIL_LIFESPAN": "1"}, "lifespan exploded", id="lifespan-error"),
        pytest.param({"UNHEALTHY": "1"}, "answered 500 on its health path /", id="health-500"),
    ],
)
async def test_a_failing_app_raises_verify_error(
    harness: Harness, logs: Logs, env: dict[str, str], expected: str
) -> None:
    backend = harness.backend(logs)
    spec = harness.spec(**env)

    with pytest.raises(VerifyError) as info:
        await backend.start(spec, timeout=8 if "UNHEALTHY" in env else START_TIMEOUT)

    assert expected in info.value.message
    assert info.value.code == "verifying_failed"
    assert backend.instances() == []


# -- crashes ---------------------------------------------------------------------------------------------


async def test_a_crash_is_reported(harness: Harness, logs: Logs) -> None:
    crashed: list[Instance] = []
    backend = harness.backend(logs, on_exit=crashed.append)
    instance = await backend.start(harness.spec(), timeout=START_TIMEOUT)

    with pytest.raises(httpx.HTTPError):
        await get(instance, "/crash")

    await eventually(lambda: crashed, "on_exit")
    assert crashed == [instance]
    assert (instance.state, instance.exit_code, instance.oom) == (InstanceState.CRASHED, 3, False)
    assert backend.instances() == []
    assert f"Instance {instance.id} exited unexpectedly (exit code 3)" in logs.messages(instance.id)


async def test_a_kill_from_outside_is_reported(harness: Harness, logs: Logs) -> None:
    crashed: list[Instance] = []
    backend = harness.backend(logs, on_exit=crashed.append)
    instance = await backend.start(harness.spec(), timeout=START_TIMEOUT)

    harness.kill(instance)

    await eventually(lambda: crashed, "on_exit")
    assert (instance.state, instance.exit_code) == (InstanceState.CRASHED, -signal.SIGKILL)
    assert not harness.running(instance.id)


# -- after a control-plane restart -----------------------------------------------------------------------


async def test_recover_adopts_or_stops_what_a_previous_run_left(harness: Harness) -> None:
    # The old backend is dropped without close(): the control plane crashed.
    old_logs, new_logs = Logs(), Logs()
    old = harness.backend(old_logs)
    spec = harness.spec()
    left = await asyncio.gather(*(old.start(spec, timeout=START_TIMEOUT) for _ in range(2)))

    new = harness.backend(new_logs)
    adopted = await new.recover()

    assert new.instances() == adopted
    by_id = {i.id: i for i in adopted}
    for instance in left:
        if instance.id in by_id:  # adopted: healthy, serving on the same port, watched again
            mine = by_id[instance.id]
            assert (mine.state, mine.port, mine.spec.deployment_id) == (
                InstanceState.WARM,
                instance.port,
                spec.deployment_id,
            )
            assert (await get(mine))["instance"] == mine.id
            await get(mine, "/say")
            await eventually(
                partial(new_logs.has, mine.id, f"out {mine.id}", "stdout"), "its output, followed"
            )
            await new.stop(mine, timeout=WAIT)
            assert mine.state == InstanceState.STOPPED
            assert f"shutdown of {mine.id}" in new_logs.messages(mine.id)
        else:  # not adopted: stopped, nothing left running unwatched
            assert not harness.running(instance.id)
            assert await probe(instance.host, instance.port, spec.hostname, "/", timeout=1) is None
    # process: its pipes died with the old run; docker and kubernetes adopt by label
    expected = len(left) if harness.kind in ("docker", "kubernetes") else 0
    assert len(adopted) == expected


# -- resource limits (only where enforced) ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ENFORCE_LIMITS)
async def test_memory_and_cpu_limits_apply(harness: Harness, logs: Logs) -> None:
    backend = harness.backend(logs)
    instance = await backend.start(harness.spec(memory_mb=200, cpus=0.5), timeout=START_TIMEOUT)

    limits = await get(instance, "/limits")

    assert limits == {"memory": 200 * 2**20, "cpus": 0.5}


@pytest.mark.parametrize("kind", ENFORCE_LIMITS)
async def test_an_instance_over_its_memory_limit_is_reported_oom(harness: Harness, logs: Logs) -> None:
    crashed: list[Instance] = []
    backend = harness.backend(logs, on_exit=crashed.append)
    instance = await backend.start(harness.spec(memory_mb=128), timeout=START_TIMEOUT)

    with pytest.raises(httpx.HTTPError):
        await get(instance, "/hog?mb=400")

    await eventually(lambda: crashed, "on_exit")
    assert (instance.state, instance.oom, instance.exit_code) == (
        InstanceState.CRASHED,
        True,
        -signal.SIGKILL,
    )
    line = f"Instance {instance.id} was killed: out of memory (limit 128 MiB), exit code -9"
    assert line in logs.messages(instance.id, "platform")
    assert logs.level(instance.id, line) == "error"


@pytest.mark.parametrize("kind", ENFORCE_LIMITS)
async def test_out_of_memory_at_startup_fails_verification_as_oom(harness: Harness, logs: Logs) -> None:
    backend = harness.backend(logs)

    with pytest.raises(VerifyError) as info:
        await backend.start(harness.spec(memory_mb=128, HOG_AT_STARTUP="400"), timeout=START_TIMEOUT)

    assert info.value.code == "verification_failed_oom"
    assert info.value.title == "Out of memory"
    assert "ran out of memory during startup: it was killed at its limit of 128 MiB" in info.value.message
    assert backend.instances() == []
