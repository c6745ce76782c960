"""The process backend with real processes: tiny FastAPI apps run by the launcher with this venv's Python.

Most tests run twice: instances forked from a per-revision template (``fork``) and spawned as new
processes (``spawn``). Waits poll with deadlines; no test sleeps to let something happen.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.backends.base import Instance, InstanceSpec, InstanceState, LogRecord
from runtime.backends.process import LAUNCHER, ProcessBackend, fork_supported
from runtime.errors import VerifyError

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
WAIT = 10.0  # upper bound for any single wait; normally far shorter

APP = """
import asyncio, os, random, sys
from contextlib import asynccontextmanager
from fastapi import FastAPI
from fastapi.responses import JSONResponse

print("module imported", flush=True)
state = {"started": False}
me = lambda: os.environ["FASTAPI_DEPLOY_INSTANCE_ID"]


@asynccontextmanager
async def lifespan(app):
    if os.environ.get("FAIL_LIFESPAN"):
        raise RuntimeError("lifespan exploded")
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
    return {"started": state["started"], "pid": os.getpid(), "ppid": os.getppid()}


@app.get("/env")
def env():
    return dict(os.environ)


@app.get("/say")
def say():
    print("out", me(), flush=True)
    print("err", me(), file=sys.stderr, flush=True)
    return {}


@app.get("/crash")
def crash():
    os._exit(3)


@app.get("/state")
async def shared_state():
    sockets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            sockets.append(target)
    return {
        "random": [random.random() for _ in range(4)],
        "sockets": sockets,
        "loop_self_pipe": os.readlink(f"/proc/self/fd/{asyncio.get_running_loop()._ssock.fileno()}"),
        "ppid": os.getppid(),
    }
"""

MODES = [
    pytest.param(True, id="fork", marks=pytest.mark.skipif(not fork_supported(), reason="Linux only")),
    pytest.param(False, id="spawn"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=MODES)
def fork(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


class Logs(list[LogRecord]):
    def messages(self, instance_id: str, stream: str | None = None) -> list[str]:
        return [r.message for r in self if r.instance_id == instance_id and stream in (None, r.stream)]

    def contains(self, instance_id: str, message: str, stream: str | None = None) -> bool:
        return message in self.messages(instance_id, stream)


@pytest.fixture
def logs() -> Logs:
    return Logs()


Make = Callable[..., ProcessBackend]


@pytest.fixture
async def backends(tmp_path: Path, logs: Logs) -> AsyncIterator[Make]:
    """Backends on ``tmp_path/state``, closed after the test; then no launcher of the test may run."""
    made: list[ProcessBackend] = []

    def make(*, fork: bool | None = True, **kw: Any) -> ProcessBackend:
        backend = ProcessBackend(tmp_path / "state", logs.append, fork=fork, **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close(timeout=5)
    await eventually(lambda: not launchers(tmp_path), "every launcher process of the test to be gone")


def write_app(root: Path, source: str = APP, **env: str) -> InstanceSpec:
    app_dir = root / "src"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "main.py").write_text(textwrap.dedent(source))
    return InstanceSpec(
        app_id="app1",
        deployment_id=f"dep-{root.name}",
        hostname="app1.test",
        python=Path(sys.executable),
        entrypoint="main:app",
        app_dir=app_dir,
        env=env,
    )


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
        await asyncio.sleep(0.02)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def running(pid: int) -> bool:
    """Running: a zombie waiting for its reaper does not count."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def launchers(under: Path, *, templates: bool = True) -> list[int]:
    """Pids of launcher processes (instances; templates too unless told) whose app lives under ``under``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        args = cmdline(int(name))
        if str(LAUNCHER) not in args or not any(a.startswith(f"{under}/") for a in args):
            continue
        if (templates or "--template" not in args) and running(int(name)):
            found.append(int(name))
    return found


def fd_targets(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


# -- the instance lifecycle, forked and spawned ---------------------------------------------------------


async def test_start_returns_a_ready_healthy_instance(backends: Make, tmp_path: Path, fork: bool) -> None:
    backend = backends(fork=fork)
    spec = write_app(tmp_path)

    instance = await backend.start(spec, timeout=START_TIMEOUT)

    assert instance.state == InstanceState.WARM
    assert backend.instances() == [instance]
    answer = await get(instance)
    assert answer["started"] is True  # the lifespan startup ran before start() returned
    assert answer["pid"] == instance.pid
    state = json.loads((tmp_path / "state" / f"{instance.id}.json").read_text())
    assert (state["pid"], state["port"]) == (instance.pid, instance.port)
    if fork:
        template = backend.template_pids()[spec.deployment_id]
        assert answer["ppid"] == template
        assert "--template" in cmdline(template)
    else:
        assert answer["ppid"] == os.getpid()
        assert backend.template_pids() == {}


async def test_stop_is_graceful(backends: Make, tmp_path: Path, logs: Logs, fork: bool) -> None:
    backend = backends(fork=fork)
    instance = await backend.start(write_app(tmp_path), timeout=START_TIMEOUT)

    await backend.stop(instance, timeout=WAIT)

    assert instance.state == InstanceState.STOPPED
    assert instance.exit_code is not None
    assert f"shutdown of {instance.id}" in logs.messages(instance.id, "stdout")
    assert not running(instance.pid)
    assert backend.instances() == []
    assert not (tmp_path / "state" / f"{instance.id}.json").exists()


async def test_stop_kills_after_the_timeout(backends: Make, tmp_path: Path, logs: Logs, fork: bool) -> None:
    backend = backends(fork=fork)
    instance = await backend.start(write_app(tmp_path, HANG_ON_SHUTDOWN="1"), timeout=START_TIMEOUT)

    await backend.stop(instance, timeout=0.5)

    assert instance.state == InstanceState.STOPPED
    assert instance.exit_code == -signal.SIGKILL
    assert f"Instance {instance.id} did not stop in 0.5s; killing it" in logs.messages(instance.id)
    assert not running(instance.pid)


async def test_a_crash_is_reported(backends: Make, tmp_path: Path, logs: Logs, fork: bool) -> None:
    crashed: list[Instance] = []
    backend = backends(fork=fork, on_exit=crashed.append)
    instance = await backend.start(write_app(tmp_path), timeout=START_TIMEOUT)

    with pytest.raises(httpx.HTTPError):
        await get(instance, "/crash")

    await eventually(lambda: crashed, "on_exit")
    assert crashed == [instance]
    assert instance.state == InstanceState.CRASHED
    assert instance.exit_code == 3
    assert backend.instances() == []
    assert f"Instance {instance.id} exited unexpectedly (exit code 3)" in logs.messages(instance.id)


async def test_output_is_logged_per_instance(backends: Make, tmp_path: Path, logs: Logs, fork: bool) -> None:
    backend = backends(fork=fork)
    spec = write_app(tmp_path)
    first, second = await asyncio.gather(*(backend.start(spec, timeout=START_TIMEOUT) for _ in range(2)))

    for instance in (first, second):
        await get(instance, "/say")
    for instance in (first, second):
        await eventually(partial(logs.contains, instance.id, f"err {instance.id}", "stderr"), "stderr line")
        assert f"out {instance.id}" in logs.messages(instance.id, "stdout")
        assert f"startup of {instance.id}" in logs.messages(instance.id, "stdout")
    # Each line is attributed to the instance that wrote it, never to the other one.
    for record in logs:
        for instance in (first, second):
            if record.message.endswith(instance.id) and record.stream != "platform":
                assert record.instance_id == instance.id, record


async def test_env_reaches_the_app(
    backends: Make, tmp_path: Path, fork: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTROL_PLANE_SECRET", "must not leak")
    backend = backends(fork=fork)
    spec = write_app(tmp_path, GREETING="hello", PATH="/nowhere")
    instance = await backend.start(spec, timeout=START_TIMEOUT)

    env = await get(instance, "/env")

    assert env["GREETING"] == "hello"
    assert env["FASTAPI_DEPLOY_INSTANCE_ID"] == instance.id
    assert env["FASTAPI_DEPLOY_DEPLOYMENT_ID"] == spec.deployment_id
    assert env["FASTAPI_DEPLOY_APP_ID"] == spec.app_id
    assert env["PATH"].startswith(str(spec.python.parent))  # reserved: the app cannot override it
    assert "CONTROL_PLANE_SECRET" not in env


FAILURES = {
    "import-error": ({}, "import does_not_exist_xyz\n", "does_not_exist_xyz"),
    "lifespan-error": ({"FAIL_LIFESPAN": "1"}, "", "lifespan exploded"),
    "health-500": ({"UNHEALTHY": "1"}, "", "answered 500 on its health path /"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_failing_app_raises_verify_error(
    backends: Make, tmp_path: Path, fork: bool, failure: str
) -> None:
    env, extra_source, expected = FAILURES[failure]
    backend = backends(fork=fork)
    spec = write_app(tmp_path, extra_source + APP, **env)

    with pytest.raises(VerifyError) as info:
        await backend.start(spec, timeout=3 if failure == "health-500" else START_TIMEOUT)

    assert expected in info.value.message
    assert backend.instances() == []
    await eventually(lambda: not launchers(tmp_path, templates=False), "the failed instance to be gone")
    if failure == "import-error":
        # No template could import the app: nothing of it is left, and the spawned instance told why.
        assert "ModuleNotFoundError" in info.value.message
        assert backend.template_pids() == {}
        await eventually(lambda: not launchers(tmp_path), "the failed template to be gone")


# -- forking -------------------------------------------------------------------------------------------


async def test_forked_instances_share_no_state(backends: Make, tmp_path: Path) -> None:
    backend = backends(fork=True)
    spec = write_app(tmp_path)
    first, second = await asyncio.gather(*(backend.start(spec, timeout=START_TIMEOUT) for _ in range(2)))
    template = backend.template_pids()[spec.deployment_id]

    a, b = await get(first, "/state"), await get(second, "/state")

    assert a["ppid"] == b["ppid"] == template
    assert a["random"] != b["random"]
    assert a["loop_self_pipe"] != b["loop_self_pipe"]  # a new event loop each
    assert not set(a["sockets"]) & set(b["sockets"])  # listening socket included
    assert first.port != second.port
    # What there was to inherit: the template holds no event loop and no socket but its control channel.
    targets = fd_targets(template)
    assert sum(t.startswith("socket:") for t in targets) == 1
    assert "anon_inode:[eventpoll]" not in targets


async def test_prepare_imports_the_app_once_per_revision(backends: Make, tmp_path: Path, logs: Logs) -> None:
    backend = backends(fork=True)
    spec = write_app(tmp_path)

    await backend.prepare(spec)
    template = backend.template_pids()[spec.deployment_id]
    instances = await asyncio.gather(*(backend.start(spec, timeout=START_TIMEOUT) for _ in range(3)))

    for instance in instances:
        assert (await get(instance))["ppid"] == template
    imported = [r for r in logs if r.message == "module imported"]
    assert len(imported) == 1, imported  # module-level code ran in the template only
    assert imported[0].instance_id not in {i.id for i in instances}


async def test_release_stops_the_template(backends: Make, tmp_path: Path, logs: Logs) -> None:
    backend = backends(fork=True)
    spec = write_app(tmp_path)
    instance = await backend.start(spec, timeout=START_TIMEOUT)
    template = backend.template_pids()[spec.deployment_id]

    await backend.release(spec.deployment_id)

    assert instance.state == InstanceState.STOPPED
    assert f"shutdown of {instance.id}" in logs.messages(instance.id)  # stopped gracefully first
    assert not running(template)
    assert backend.template_pids() == {}
    assert list((tmp_path / "state").glob("*.json")) == []
    # The revision can start again: a new template.
    again = await backend.start(spec, timeout=START_TIMEOUT)
    assert (await get(again))["ppid"] == backend.template_pids()[spec.deployment_id] != template


async def test_a_dead_template_takes_its_instances_down_visibly(backends: Make, tmp_path: Path) -> None:
    crashed: list[Instance] = []
    backend = backends(fork=True, on_exit=crashed.append)
    spec = write_app(tmp_path)
    instances = await asyncio.gather(*(backend.start(spec, timeout=START_TIMEOUT) for _ in range(2)))
    template = backend.template_pids()[spec.deployment_id]

    os.kill(template, signal.SIGKILL)

    await eventually(lambda: len(crashed) == 2, "on_exit for both instances")
    for instance in instances:
        assert instance.state == InstanceState.CRASHED
        assert instance.exit_code == -signal.SIGKILL
        assert not running(instance.pid)
    assert backend.instances() == []
    replacement = await backend.start(spec, timeout=START_TIMEOUT)
    assert (await get(replacement))["ppid"] not in (template, os.getpid())


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(
            "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
            id="thread",
        ),
        pytest.param("import socket\nheld = socket.socket()\nheld.bind(('127.0.0.1', 0))\n", id="socket"),
        pytest.param("import asyncio\nheld = asyncio.new_event_loop()\n", id="event-loop"),
    ],
)
async def test_an_app_unfit_for_fork_is_spawned(
    backends: Make, tmp_path: Path, logs: Logs, source: str
) -> None:
    backend = backends(fork=True)
    spec = write_app(tmp_path, source + APP)

    first = await backend.start(spec, timeout=START_TIMEOUT)
    second = await backend.start(spec, timeout=START_TIMEOUT)

    for instance in (first, second):
        assert (await get(instance))["ppid"] == os.getpid()
    assert backend.template_pids() == {}
    assert any("the app cannot be forked" in r.message for r in logs if r.stream == "platform")
    await eventually(lambda: len(launchers(tmp_path)) == 2, "the unfit template to exit")


async def test_fork_can_be_turned_off_by_environment(
    backends: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTAPI_DEPLOY_FORK", "0")
    backend = backends(fork=None)
    assert backend.fork is False
    instance = await backend.start(write_app(tmp_path), timeout=START_TIMEOUT)
    assert (await get(instance))["ppid"] == os.getpid()


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_fork_lifecycle_under_uvloop(backends: Make, tmp_path: Path, logs: Logs) -> None:
    # The control plane runs under uvloop: pipes, readers and subprocesses differ from asyncio's.
    crashed: list[Instance] = []
    backend = backends(fork=True, on_exit=crashed.append)
    spec = write_app(tmp_path)
    doomed, kept = await asyncio.gather(*(backend.start(spec, timeout=START_TIMEOUT) for _ in range(2)))
    assert (await get(kept))["ppid"] == backend.template_pids()[spec.deployment_id]

    with pytest.raises(httpx.HTTPError):
        await get(doomed, "/crash")
    await eventually(lambda: crashed == [doomed], "on_exit")
    assert doomed.exit_code == 3
    await backend.stop(kept)
    assert kept.state == InstanceState.STOPPED
    assert f"shutdown of {kept.id}" in logs.messages(kept.id, "stdout")

    orphan = await backend.start(spec, timeout=START_TIMEOUT)
    os.kill(backend.template_pids()[spec.deployment_id], signal.SIGKILL)
    await eventually(lambda: crashed == [doomed, orphan], "on_exit for the orphan")
    assert orphan.exit_code == -signal.SIGKILL
    await backend.release(spec.deployment_id)  # nothing left to release: a no-op


# -- after a control-plane crash --------------------------------------------------------------------------


async def test_recover_cleans_up_what_a_crashed_backend_left(
    backends: Make, tmp_path: Path, logs: Logs, fork: bool
) -> None:
    # The old backend is dropped without close(); its sockets stay open, as if its process hung.
    old = backends(fork=fork)
    spec = write_app(tmp_path)
    instances = await asyncio.gather(*(old.start(spec, timeout=START_TIMEOUT) for _ in range(2)))
    leftovers = launchers(tmp_path)
    assert len(leftovers) == (3 if fork else 2)

    await backends(fork=fork).recover()

    assert not [pid for pid in leftovers if running(pid)]
    assert list((tmp_path / "state").glob("*.json")) == []
    for instance in instances:  # SIGTERM first: the lifespan shutdown ran
        await eventually(partial(logs.contains, instance.id, f"shutdown of {instance.id}"), "shutdown line")


@pytest.mark.skipif(not fork_supported(), reason="Linux only")
async def test_forked_instances_stop_when_the_control_plane_dies(tmp_path: Path) -> None:
    spec = write_app(tmp_path)
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from pathlib import Path
        from runtime.backends.base import InstanceSpec
        from runtime.backends.process import ProcessBackend

        async def main():
            backend = ProcessBackend(Path({str(tmp_path / "state")!r}), lambda record: None, fork=True)
            spec = InstanceSpec(app_id="a", deployment_id="d", hostname="h", python=Path(sys.executable),
                                entrypoint="main:app", app_dir=Path({str(spec.app_dir)!r}))
            instance = await backend.start(spec, timeout=30)
            print(json.dumps([instance.pid, backend.template_pids()["d"]]), flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    control_plane = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=ROOT, stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert control_plane.stdout is not None
        line = await asyncio.wait_for(control_plane.stdout.readline(), START_TIMEOUT)
        instance_pid, template_pid = json.loads(line)
        assert running(instance_pid) and running(template_pid)
    finally:
        control_plane.kill()
        await control_plane.wait()
    # The template sees its control channel close and stops its instances: no orphan waits for recover().
    await eventually(lambda: not running(instance_pid) and not running(template_pid), "the orphans to stop")


# -- confinement (docs/ISOLATION.md; users and files: tests/test_process_isolation.py) --------------------


def _status(pid: int, field: str) -> str:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split(":", 1)[1].strip() for line in lines if line.startswith(f"{field}:"))


def _proc(pid: int | str, name: str) -> list[str]:
    return Path(f"/proc/{pid}/{name}").read_text().splitlines()


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_instances_are_confined_unless_isolation_is_off(
    backends: Make, tmp_path: Path, fork: bool, mode: str
) -> None:
    from runtime.backends._confine import Confinement, IsolationSettings, app_user_name

    confinement = Confinement(IsolationSettings(mode=mode))
    backend = backends(fork=fork, confinement=confinement)
    spec = write_app(tmp_path)
    spec = InstanceSpec(**{**spec.__dict__, "memory_mb": 300})

    instance = await backend.start(spec, timeout=START_TIMEOUT)

    theirs = _proc(instance.pid, "cgroup")
    if mode == "off":  # as before isolation existed: our cgroups, privileges as they were
        assert theirs == _proc("self", "cgroup")
        assert _status(instance.pid, "NoNewPrivs") == "0"
        return
    assert _status(instance.pid, "NoNewPrivs") == "1"
    if confinement.hierarchy is not None:  # a memory cgroup of its own
        assert any(line.endswith(f"/fastapi-deploy/{app_user_name('app1')}/{instance.id}") for line in theirs)
    else:  # rlimits stand in for it
        assert f"Max data size             {2 * 300 * 2**20}" in "\n".join(_proc(instance.pid, "limits"))
