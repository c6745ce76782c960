"""Isolation of the process backend's instances (docs/ISOLATION.md), with real users, cgroups and files.

As root (CI) the apps really run as users of their own and the tests check what the kernel refuses
them: the platform's secret key and database, another app's source and environment variables, writing
into another app's folder or the shared environments. As another user they check the documented
fallback instead (nobody is skipped): every app runs as the server's user, and the log says so once.
A server that is not root is also tested when the suite runs as root, by running one as ``nobody``.

Apps need an interpreter every user can run: the suite's own lives under /root here, so the apps run
in an environment built (once per module) for the first world-runnable Python (``/usr/bin/python3``).
Waits poll with deadlines; no test sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.backends._confine import Confinement, _unreachable, app_user_name
from runtime.backends.base import Instance, InstanceSpec, InstanceState, LogRecord
from runtime.backends.process import LAUNCHER, ProcessBackend, fork_supported
from runtime.builder import build_environment
from runtime.detect import detect_project

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="users, cgroups and /proc are Linux's"),
]

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
START_TIMEOUT = 60.0
WAIT = 15.0
NOBODY = 65534

APP = """
import errno, os, resource, sqlite3, subprocess
from fastapi import FastAPI

app = FastAPI()
held = []


def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def read_first_byte(path):
    with open(path, "rb") as f:
        f.read(1)


def replace_with_own_file(path):
    with open("replacement.py", "w") as f:
        f.write("evil = True\\n")
    os.replace("replacement.py", path)


@app.get("/")
def root():
    return {"ok": True}


@app.get("/whoami")
def whoami():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    names = ("RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_DATA", "RLIMIT_CORE")
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "cwd": os.getcwd(),
        "home": os.environ["HOME"],
        "no_new_privs": status["NoNewPrivs"].strip(),
        "rlimits": {name: resource.getrlimit(getattr(resource, name)) for name in names},
    }


@app.get("/read")
def read(path: str):
    return {"result": attempt(lambda: read_first_byte(path))}


@app.get("/write")
def write(path: str):
    return {"result": attempt(lambda: open(path, "ab").close())}


@app.get("/list")
def listing(path: str):
    return {"result": attempt(lambda: os.listdir(path))}


@app.get("/replace")
def replace(path: str):
    return {"result": attempt(lambda: replace_with_own_file(path))}


@app.get("/signal")
def signal_(pid: int):
    return {"result": attempt(lambda: os.kill(pid, 0))}


@app.get("/sqlite")
def sqlite():
    with sqlite3.connect("orders.db") as conn:  # like examples/orders: a database next to the code
        conn.execute("CREATE TABLE IF NOT EXISTS orders (item TEXT)")
        conn.execute("INSERT INTO orders VALUES ('book')")
        return {"rows": conn.execute("SELECT count(*) FROM orders").fetchone()[0]}


@app.get("/daemon")
def daemon():
    return {"pid": subprocess.Popen(["sleep", "600"], start_new_session=True).pid}


@app.get("/hog")
def hog(mb: int):
    held.append(b"x" * (mb * 2**20))
    return {"held": len(held)}


def _first(*paths):
    for path in paths:
        try:
            with open(path) as f:
                return f.read().split()
        except OSError:
            continue
    return None


@app.get("/limits")
def limits():
    memory = _first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    cpu = _first("/sys/fs/cgroup/cpu.max") or (
        _first("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") + _first("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    )
    pids = _first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max")
    return {"memory": int(memory[0]), "cpus": int(cpu[0]) / int(cpu[1]), "pids": pids[0]}
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
    def messages(self, instance_id: str) -> list[str]:
        return [r.message for r in self if r.instance_id == instance_id]


def world_python() -> str:
    """The first interpreter (3.11 or newer) every user can run."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.11"):
        path = Path(candidate)
        if not path.exists() or _unreachable(path, "run") is not None:
            continue
        version = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
        )
        if version.stdout.strip() == "True":
            return candidate
    pytest.fail("no Python 3.11+ that every user can run (install python3): apps cannot run as their users")


@dataclass
class World:
    """A data directory in a folder every user can pass through (pytest's own tmp is 0700)."""

    root: Path
    data: Path
    python: Path
    """The app environment's interpreter: fastapi and uvicorn for a world-runnable Python."""

    def deployment(self, app_id: str, files: dict[str, str] | None = None) -> InstanceSpec:
        deployment_id = f"dep-{uuid.uuid4().hex[:10]}"
        src = self.data / "deployments" / deployment_id / "src"
        src.mkdir(parents=True)
        for name, text in {"main.py": textwrap.dedent(APP), **(files or {})}.items():
            (src / name).write_text(text)
        return InstanceSpec(
            app_id=app_id,
            deployment_id=deployment_id,
            hostname="app.test",
            python=self.python,
            entrypoint="main:app",
            app_dir=src,
            workdir=src,
        )


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="fdp-isolation-"))
    root.chmod(0o711)
    data = root / "data"
    (data / "envs").mkdir(parents=True)
    project_dir = root / "project"
    project_dir.mkdir()
    (project_dir / "main.py").write_text("from fastapi import FastAPI\napp = FastAPI()\n")
    (project_dir / "requirements.txt").write_text("fastapi\nuvicorn\n")
    # Built as the server's user from its uv cache (a confined build has a cache of its own: test_builder).
    env = build_environment(
        detect_project(project_dir), data / "envs", python=world_python(), log=lambda line: None
    )
    # What the platform keeps there: the key of its secrets (0600) and its database (SQLite: 0644).
    fd = os.open(data / "secret.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"platform-secret-key")
    os.close(fd)
    with sqlite3.connect(data / "fastapi-deploy.db") as db:
        db.execute("CREATE TABLE tokens (token TEXT)")
    (data / "instances").mkdir()
    (data / "deployments").mkdir()
    yield World(root=root, data=data, python=env.python)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def app_ids() -> Iterator[Callable[[str], str]]:
    """Unique app ids; their users are removed afterwards (userdel), so no test leaves accounts."""
    made: list[str] = []

    def new(label: str) -> str:
        made.append(f"iso-{label}-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for name in {app_user_name(app_id) for app_id in made} if IS_ROOT else ():
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue  # this app never had a user of its own
        done = subprocess.run(["userdel", name], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"userdel {name}: {done.stderr}"


@pytest.fixture
async def backend_of(
    world: World, app_ids: Callable[[str], str]
) -> AsyncIterator[Callable[..., ProcessBackend]]:
    """Backends on the world's data directory, closed before their apps' users are removed."""
    made: list[ProcessBackend] = []

    def make(logs: Logs, *, fork: bool, confinement: Confinement | None = None) -> ProcessBackend:
        confinement = confinement or Confinement(data_dir=world.data)
        confinement.secure_data_dir()
        backend = ProcessBackend(world.data / "instances", logs.append, fork=fork, confinement=confinement)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close(timeout=5)


async def get(instance: Instance, path: str = "/", params: dict[str, str] | None = None) -> Any:
    async with httpx.AsyncClient(base_url=f"http://{instance.host}:{instance.port}", timeout=WAIT) as c:
        response = await c.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def attempt(instance: Instance, action: str, path: Path | int) -> str:
    key = "pid" if action == "signal" else "path"
    return str((await get(instance, f"/{action}", {key: str(path)}))["result"])


async def eventually(check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def memory_cgroup(pid: int) -> str:
    """The memory cgroup of ``pid`` as the server sees it (v1 line, else the v2 one)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    by_controller = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}
    return (
        next((path for names, path in by_controller.items() if "memory" in names.split(",")), None)
        or (by_controller[""])
    )


# -- users and files ------------------------------------------------------------------------------------


async def test_apps_run_as_users_of_their_own_and_cannot_touch_the_platform_or_each_other(
    world: World,
    backend_of: Callable[..., ProcessBackend],
    app_ids: Callable[[str], str],
    fork: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_deploy.isolation")
    logs = Logs()
    backend = backend_of(logs, fork=fork)
    a_id, b_id = app_ids("a"), app_ids("b")
    spec_a = world.deployment(a_id)
    spec_b = world.deployment(b_id, {"b-secret.txt": "b's own secret\n"})
    spec_b = dataclasses.replace(spec_b, env={"API_KEY": "b-s3cret"})

    a = await backend.start(spec_a, timeout=START_TIMEOUT)
    b = await backend.start(spec_b, timeout=START_TIMEOUT)
    who_a, who_b = await get(a, "/whoami"), await get(b, "/whoami")

    if not IS_ROOT:
        # The documented fallback: the server's user for every app, and the log says so, once.
        assert who_a["uid"] == who_b["uid"] == os.getuid()
        said = [r.getMessage() for r in caplog.records if "not root" in r.getMessage()]
        assert len(said) == 1, said
        return

    # As root the apps must be confined, which needs the platform's launcher readable by every user.
    assert _unreachable(LAUNCHER, "read") is None, f"{LAUNCHER} must be readable by other users"
    user_a, user_b = pwd.getpwnam(app_user_name(a_id)), pwd.getpwnam(app_user_name(b_id))
    settings = backend.confinement.settings
    assert (who_a["uid"], who_a["gid"]) == (user_a.pw_uid, user_a.pw_gid)
    assert (who_b["uid"], who_b["gid"]) == (user_b.pw_uid, user_b.pw_gid)
    assert who_a["uid"] != who_b["uid"]
    assert settings.uid_min <= min(who_a["uid"], who_b["uid"]) <= settings.uid_max
    assert who_a["groups"] == [] and who_a["no_new_privs"] == "1"  # no supplementary groups, no sudo
    assert who_a["rlimits"]["RLIMIT_NPROC"] == [settings.nproc, settings.nproc]
    assert who_a["rlimits"]["RLIMIT_CORE"] == [0, 0]
    assert f"Starting instance {a.id} (pid {a.pid}" in "\n".join(logs.messages(a.id))
    assert any(f"as {user_a.pw_name})" in m for m in logs.messages(a.id))

    b_src = spec_b.app_dir
    env_file = next(world.python.parent.parent.glob("lib/python3*/site-packages/fastapi/__init__.py"))
    refused: list[tuple[str, Path | int, str]] = [
        ("read", world.data / "secret.key", "EACCES"),
        ("read", world.data / "fastapi-deploy.db", "EACCES"),
        ("read", b_src / "main.py", "EACCES"),
        ("read", b_src / "b-secret.txt", "EACCES"),
        ("read", Path(f"/proc/{b.pid}/environ"), "EACCES"),  # B's env vars: its secrets
        ("list", world.data, "EACCES"),
        ("list", world.data / "deployments", "EACCES"),
        ("list", world.data / "instances", "EACCES"),
        ("write", b_src / "planted.py", "EACCES"),
        ("write", world.data / "instances" / "planted.json", "EACCES"),
        ("write", env_file, "EACCES"),  # the shared environment: read, never written
        ("write", env_file.parent / "planted.py", "EACCES"),
        ("replace", spec_a.app_dir / "main.py", "EPERM"),  # its workdir is sticky: the code stays ours
        ("signal", b.pid, "EPERM"),  # nor can it signal another app
    ]
    for action, target, expected in refused:
        assert await attempt(a, action, target) == expected, (action, target)

    # What it may: read its own code and its environment, write next to its code, HOME included.
    assert await attempt(a, "read", spec_a.app_dir / "main.py") == "ok"
    assert await attempt(a, "read", env_file) == "ok"
    assert (await get(a, "/sqlite"))["rows"] == 1
    assert (await get(a, "/sqlite"))["rows"] == 2
    assert who_a["cwd"] == who_a["home"] == str(spec_a.app_dir)
    database = spec_a.app_dir / "orders.db"
    assert (database.stat().st_uid, database.stat().st_mode & 0o077) == (user_a.pw_uid, 0)  # umask 077
    # B reads its own secret; A's attempt above changed nothing.
    assert await attempt(b, "read", b_src / "b-secret.txt") == "ok"
    assert not (b_src / "planted.py").exists()


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_apps_run_as_their_users_under_uvloop_too(
    world: World, backend_of: Callable[..., ProcessBackend], app_ids: Callable[[str], str], fork: bool
) -> None:
    # The control plane runs under uvloop, whose spawn runs the confinement before libuv's own setup.
    backend = backend_of(Logs(), fork=fork)
    app_id = app_ids("uvloop")

    instance = await backend.start(world.deployment(app_id), timeout=START_TIMEOUT)

    expected = pwd.getpwnam(app_user_name(app_id)).pw_uid if IS_ROOT else os.getuid()
    assert (await get(instance, "/whoami"))["uid"] == expected
    assert (await get(instance, "/sqlite"))["rows"] == 1  # its working directory, as its user


async def test_the_data_directory_is_closed_to_apps(
    world: World, backend_of: Callable[..., ProcessBackend]
) -> None:
    backend_of(Logs(), fork=False)  # secures the data directory, as the platform does at every start

    modes = {p.name: p.stat().st_mode & 0o7777 for p in [world.data, *world.data.iterdir()]}

    assert modes["data"] == 0o711  # passable, not listable
    assert modes["secret.key"] == modes["fastapi-deploy.db"] == 0o600
    assert modes["instances"] == 0o700
    assert modes["envs"] == modes["deployments"] == 0o711
    env_root = world.python.parent.parent
    assert env_root.stat().st_mode & 0o777 == 0o755  # a shared environment: anyone reads it


async def test_a_revision_that_cannot_have_its_own_user_falls_back_once_or_fails_when_required(
    world: World,
    backend_of: Callable[..., ProcessBackend],
    app_ids: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    # pytest's tmp_path is 0700: no app user can reach an interpreter there.
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "env").symlink_to(world.python.parent.parent)
    hidden = tmp_path / "hidden" / "env" / "bin" / "python"
    caplog.set_level(logging.WARNING, logger="fastapi_deploy.isolation")
    app_id = app_ids("hidden")
    spec, other_revision = (dataclasses.replace(world.deployment(app_id), python=hidden) for _ in range(2))
    backend = backend_of(Logs(), fork=False)

    first = await backend.start(spec, timeout=START_TIMEOUT)
    second = await backend.start(other_revision, timeout=START_TIMEOUT)

    for instance in (first, second):
        assert (await get(instance, "/whoami"))["uid"] == os.getuid()
    said = [r.getMessage() for r in caplog.records if str(hidden) in r.getMessage()]
    expected = 1 if IS_ROOT else 0  # not root: the one line says every app runs as the server's user
    assert len(said) == expected, said
    if IS_ROOT:
        assert "is not searchable by other users" in said[0]

    from runtime.backends._confine import IsolationSettings
    from runtime.errors import DeployError

    strict = backend_of(Logs(), fork=False, confinement=Confinement(IsolationSettings(mode="require")))
    with pytest.raises(DeployError) as info:
        await strict.start(spec, timeout=START_TIMEOUT)
    assert info.value.title == "Isolation unavailable"
    assert "FASTAPI_DEPLOY_ISOLATION=require" in info.value.hint
    assert strict.instances() == []


def test_a_server_that_is_not_root_runs_apps_as_itself_and_says_so_once(world: World) -> None:
    # As root, the server is started as nobody; as anyone else, as that user: the same fallback.
    home = world.root / f"nobody-{uuid.uuid4().hex[:6]}"
    platform = home / "platform"
    shutil.copytree(ROOT / "runtime", platform / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    (home / "src").mkdir()
    (home / "src" / "main.py").write_text(textwrap.dedent(APP))
    (home / "state").mkdir()
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if IS_ROOT:
        os.chown(home / "state", NOBODY, NOBODY)
    script = textwrap.dedent(
        f"""
        import asyncio, json, logging, resource, urllib.request
        from pathlib import Path
        from runtime.backends.base import InstanceSpec
        from runtime.backends.process import ProcessBackend

        said = []
        handler = logging.Handler()
        handler.emit = lambda record: said.append(record.getMessage())
        logging.getLogger("fastapi_deploy.isolation").addHandler(handler)
        logging.getLogger("fastapi_deploy.isolation").setLevel(logging.INFO)

        def whoami(port):
            return json.load(urllib.request.urlopen(f"http://127.0.0.1:{{port}}/whoami", timeout=10))

        async def main():
            backend = ProcessBackend(Path({str(home / "state")!r}), lambda record: None, fork=True)
            spec = InstanceSpec(app_id="app", deployment_id="dep", hostname="h", entrypoint="main:app",
                                python=Path({str(world.python)!r}), app_dir=Path({str(home / "src")!r}),
                                memory_mb=256)
            instances = [await backend.start(spec, timeout=60) for _ in range(2)]
            who = [await asyncio.to_thread(whoami, i.port) for i in instances]
            cgroups = backend.confinement.hierarchy is not None
            await backend.close()
            nproc = list(resource.getrlimit(resource.RLIMIT_NPROC))
            print(json.dumps({{"who": who, "said": said, "cgroups": cgroups, "nproc": nproc}}))

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [str(world.python), "-c", script],
        cwd=home,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(platform), "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        user=NOBODY if IS_ROOT else None,
        group=NOBODY if IS_ROOT else None,
        extra_groups=[] if IS_ROOT else None,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    server_uid = NOBODY if IS_ROOT else os.getuid()

    assert [w["uid"] for w in result["who"]] == [server_uid, server_uid]
    not_root = [line for line in result["said"] if "not root" in line]
    assert len(not_root) == 1, result["said"]  # two instances, one line
    assert not_root[0].startswith(f"Isolation: apps and builds run as the server's user (uid {server_uid}")
    if not result["cgroups"]:  # no cgroup to write: memory is bounded by RLIMIT_DATA (twice the limit)
        assert "rlimits only" in not_root[0]
        assert result["who"][0]["rlimits"]["RLIMIT_DATA"] == [2 * 256 * 2**20] * 2
    assert (
        result["who"][0]["rlimits"]["RLIMIT_NPROC"] == result["nproc"]
    )  # per user: it would count the server


# Module-level code runs in the template, which holds the control channel to the backend: it can lie.
FORGER = """
import json, os, sys
if "--template" in sys.argv:
    _fd = int(sys.argv[sys.argv.index("--control-fd") + 1])
    _lie = {"op": "forked", "id": "no-such-fork", "pid": int(os.environ["VICTIM"])}
    os.write(_fd, json.dumps(_lie).encode())
"""


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process of the server's (not the app's): the control plane, say."""
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait()


async def test_a_template_cannot_make_the_backend_kill_or_move_another_process(
    world: World,
    backend_of: Callable[..., ProcessBackend],
    app_ids: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
    victim: subprocess.Popen[bytes],
) -> None:
    spec = world.deployment(app_ids("forger"), {"main.py": FORGER + textwrap.dedent(APP)})
    spec = dataclasses.replace(spec, env={"VICTIM": str(victim.pid)})
    backend = backend_of(Logs(), fork=True)

    instance = await backend.start(spec, timeout=START_TIMEOUT)

    assert (await get(instance))["ok"] is True
    assert backend.template_pids()  # it did serve forks
    assert victim.poll() is None  # a fork nobody waits for is killed: not one the template made up
    assert memory_cgroup(victim.pid) == memory_cgroup(os.getpid())  # nor moved into the app's cgroup
    assert any("not a child of its own" in r.getMessage() for r in caplog.records)


# -- limits -----------------------------------------------------------------------------------------------


async def test_each_instance_has_a_cgroup_of_its_own_with_the_specs_limits(
    world: World, backend_of: Callable[..., ProcessBackend], app_ids: Callable[[str], str], fork: bool
) -> None:
    backend = backend_of(Logs(), fork=fork)
    app_id = app_ids("limits")
    spec = dataclasses.replace(world.deployment(app_id), memory_mb=200, cpus=0.5)

    first = await backend.start(spec, timeout=START_TIMEOUT)
    second = await backend.start(spec, timeout=START_TIMEOUT)

    hierarchy = backend.confinement.hierarchy
    if hierarchy is None:  # the fallback: rlimits, no CPU limit
        assert (await get(first, "/whoami"))["rlimits"]["RLIMIT_DATA"] == [2 * 200 * 2**20] * 2
        return
    limit_file = "memory.max" if hierarchy.version == 2 else "memory.limit_in_bytes"

    def host_dir(pid: int) -> Path:  # the memory cgroup of ``pid``, as the server writes it
        return hierarchy.bases["memory"] / memory_cgroup(pid).split("/fastapi-deploy/", 1)[1]

    for instance in (first, second):
        # Its own cgroup, from the outside; its limits, from the inside (as a container sees them).
        assert memory_cgroup(instance.pid).endswith(f"/fastapi-deploy/{app_user_name(app_id)}/{instance.id}")
        limits = await get(instance, "/limits")
        assert (limits["memory"], limits["cpus"]) == (200 * 2**20, 0.5)
        assert limits["pids"] == str(backend.confinement.settings.pids_max)
    if fork:  # the template has one of its own, one instance's limits its ceiling (forks start in it)
        template = host_dir(backend.template_pids()[spec.deployment_id])
        assert template not in (host_dir(first.pid), host_dir(second.pid))
        assert int((template / limit_file).read_text()) == 200 * 2**20
    first_dir = host_dir(first.pid)
    assert int((first_dir / limit_file).read_text()) == 200 * 2**20

    await backend.stop(first, timeout=WAIT)

    await eventually(lambda: not first_dir.exists(), "the instance's cgroup to go")


async def test_what_an_instance_leaves_running_goes_with_it(
    world: World, backend_of: Callable[..., ProcessBackend], app_ids: Callable[[str], str]
) -> None:
    backend = backend_of(Logs(), fork=True)
    instance = await backend.start(world.deployment(app_ids("daemon")), timeout=START_TIMEOUT)
    daemon = (await get(instance, "/daemon"))["pid"]  # its own session: killpg does not reach it

    await backend.stop(instance, timeout=WAIT)

    if backend.confinement.hierarchy is None:  # documented: without cgroups it outlives the instance
        assert running(daemon)
        os.kill(daemon, signal.SIGKILL)
        return
    await eventually(lambda: not running(daemon), "the daemon to die with its instance's cgroup")


async def test_an_instance_over_its_memory_limit_is_killed_and_reported(
    world: World, backend_of: Callable[..., ProcessBackend], app_ids: Callable[[str], str], fork: bool
) -> None:
    crashed: list[Instance] = []
    logs = Logs()
    backend = backend_of(logs, fork=fork)
    backend.on_exit = crashed.append
    spec = dataclasses.replace(world.deployment(app_ids("oom")), memory_mb=128)
    instance = await backend.start(spec, timeout=START_TIMEOUT)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{instance.port}", timeout=WAIT) as client:
        try:
            answer: int | None = (await client.get("/hog", params={"mb": 400})).status_code
        except httpx.HTTPError:
            answer = None

    if backend.confinement.hierarchy is None:  # RLIMIT_DATA: a MemoryError, the instance lives on
        assert answer == 500 and instance.state == InstanceState.WARM
        return
    assert answer is None
    await eventually(lambda: crashed, "on_exit")
    assert (instance.state, instance.oom, instance.exit_code) == (InstanceState.CRASHED, True, -9)
    line = f"Instance {instance.id} was killed: out of memory (limit 128 MiB), exit code -9"
    assert line in logs.messages(instance.id)


async def test_recover_removes_what_a_killed_control_plane_left_in_its_cgroups(
    world: World, backend_of: Callable[..., ProcessBackend], app_ids: Callable[[str], str]
) -> None:
    spec = world.deployment(app_ids("recover"))
    state = world.root / f"state-{uuid.uuid4().hex[:6]}"
    script = textwrap.dedent(
        f"""
        import asyncio, json, urllib.request
        from pathlib import Path
        from runtime.backends._confine import Confinement
        from runtime.backends.base import InstanceSpec
        from runtime.backends.process import ProcessBackend

        async def main():
            confinement = Confinement(data_dir=Path({str(world.data)!r}))
            sink = lambda record: None
            backend = ProcessBackend(Path({str(state)!r}), sink, fork=False, confinement=confinement)
            spec = InstanceSpec(app_id={spec.app_id!r}, deployment_id={spec.deployment_id!r}, hostname="h",
                                python=Path({str(spec.python)!r}), entrypoint="main:app",
                                app_dir=Path({str(spec.app_dir)!r}), workdir=Path({str(spec.app_dir)!r}))
            instance = await backend.start(spec, timeout=60)
            url = f"http://127.0.0.1:{{instance.port}}/daemon"
            daemon = (await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url))))["pid"]
            print(json.dumps([instance.pid, daemon]), flush=True)
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
        instance_pid, daemon = json.loads(line)
    finally:
        control_plane.kill()  # SIGKILL: nothing of it cleans up
        await control_plane.wait()
    recorded = [Path(p) for f in state.glob("*.json") for p in json.loads(f.read_text()).get("cgroup", [])]
    assert running(instance_pid) and running(daemon)

    await ProcessBackend(state, lambda r: None, confinement=Confinement(data_dir=world.data)).recover()

    await eventually(lambda: not running(instance_pid), "the instance to stop")
    if backend_of(Logs(), fork=False).confinement.hierarchy is None:  # no cgroup: the daemon is not found
        assert recorded == [] and running(daemon)
        os.kill(daemon, signal.SIGKILL)
        return
    assert recorded and not [p for p in recorded if p.exists()]
    await eventually(lambda: not running(daemon), "the daemon to go with its cgroup")


async def test_recover_sweeps_cgroups_left_empty_long_ago(
    world: World,
    backend_of: Callable[..., ProcessBackend],
    app_ids: Callable[[str], str],
    victim: subprocess.Popen[bytes],
) -> None:
    from runtime.backends._confine import Limits

    backend = backend_of(Logs(), fork=False)
    confinement = backend.confinement
    if confinement.hierarchy is None:
        assert confinement.sweep(older_than=0) == 0  # no cgroups, nothing to sweep
        return
    stale, busy, recent = (confinement.cgroup(app_ids(n), n, Limits()) for n in ("stale", "busy", "recent"))
    assert stale is not None and busy is not None and recent is not None
    busy.add(victim.pid)
    two_hours_ago = time.time() - 7200
    for path in [*stale.paths, *busy.paths]:
        os.utime(path, (two_hours_ago, two_hours_ago))

    await backend.recover()

    assert not [p for p in stale.paths if p.exists()]  # empty for two hours: gone
    assert all(p.exists() for p in busy.paths)  # a process in it: kept, however old
    assert all(p.exists() for p in recent.paths)  # empty, but maybe about to be joined: kept
    busy.dispose()
    recent.dispose()
