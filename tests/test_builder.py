"""The virtualenv builder, with real uv builds (small pure packages; uv's cache keeps reruns fast)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import builder
from runtime.builder import BuiltEnvironment, build_environment, environment_key, prune_environments
from runtime.detect import Project, detect_project
from runtime.errors import BuildError, BuildTimeout

PYTHON = sys.executable
UV = str(Path(sys.executable).parent / "uv")
APP = "from fastapi import FastAPI\napp = FastAPI()\n"
PYPROJECT = (
    '[project]\nname = "demo-app"\nversion = "0.1.0"\nrequires-python = ">=3.11"\ndependencies = ["six"]\n'
)


def project_with(root: Path, files: dict[str, str]) -> Project:
    for name, text in {"main.py": APP, **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return detect_project(root)


def python_ok(env: BuiltEnvironment, code: str) -> subprocess.CompletedProcess[str]:
    # -I and a neutral cwd: only what is installed in the environment can be imported.
    return subprocess.run([str(env.python), "-I", "-c", code], capture_output=True, text=True, cwd=env.path)


def leftovers(envs: Path) -> list[str]:
    """Everything under envs_dir except lock files."""
    return sorted(p.name for p in envs.iterdir() if not p.name.endswith(".lock"))


def test_requirements_build_then_reuse(tmp_path: Path) -> None:
    project = project_with(tmp_path / "src", {"requirements.txt": "six\n"})
    envs = tmp_path / "envs"
    logs: list[str] = []

    env = build_environment(project, envs, python=PYTHON, log=logs.append)

    assert not env.reused
    assert env.key == environment_key(project, PYTHON)
    assert env.path == envs / env.key
    assert env.python == env.path / "bin" / "python"
    assert logs[0].startswith(f"New dependencies (key {env.key[:12]}…)")
    assert "Installing from requirements.txt" in logs
    assert any("six==" in line for line in logs), logs  # uv's own output was streamed
    assert "uvicorn is not among the dependencies; installing it to serve the app" in logs
    check = python_ok(env, "import six, uvicorn, sys; print(sys.prefix)")
    assert check.returncode == 0, check.stderr
    assert Path(check.stdout.strip()) == env.path
    assert leftovers(envs) == [env.key]
    marker = env.path / ".fastapi-deploy-environment.json"
    built_at = marker.stat().st_mtime_ns

    # Same spec: nothing is installed, uv is not even run (this uv does not exist).
    again_logs: list[str] = []
    again = build_environment(project, envs, python=PYTHON, log=again_logs.append, uv="/nonexistent/uv")

    assert again == dataclasses.replace(env, reused=True)
    assert again_logs == [f"Dependencies unchanged (key {env.key[:12]}…), reusing environment"]
    assert marker.stat().st_mtime_ns == built_at


def test_pyproject_and_uv_lock_install_dependencies_not_the_project(tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    not_installed = (
        "import importlib.metadata as m, six\n"
        "try:\n    m.distribution('demo-app')\nexcept m.PackageNotFoundError:\n    pass\n"
        "else:\n    raise SystemExit('the project itself was installed')\n"
    )

    pyproject_only = project_with(tmp_path / "a", {"pyproject.toml": PYPROJECT})
    assert pyproject_only.dependencies.kind == "pyproject.toml"
    logs: list[str] = []
    env = build_environment(pyproject_only, envs, python=PYTHON, log=logs.append, uv=UV)
    assert "Installing from [project].dependencies of pyproject.toml" in logs
    assert python_ok(env, not_installed).returncode == 0

    locked_root = tmp_path / "b"
    project_with(locked_root, {"pyproject.toml": PYPROJECT})
    subprocess.run([UV, "lock", "--quiet"], cwd=locked_root, check=True)
    locked = detect_project(locked_root)
    assert locked.dependencies.kind == "uv.lock"
    logs = []
    locked_env = build_environment(locked, envs, python=PYTHON, log=logs.append, uv=UV)
    assert logs[1].startswith("Installing from uv.lock")
    result = python_ok(locked_env, not_installed + "import uvicorn\n")
    assert result.returncode == 0, result.stderr
    assert locked_env.key != env.key
    assert not (locked_env.path / ".uv-lock-requirements.txt").exists()


def test_pylock(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    subprocess.run(
        [UV, "pip", "compile", "--no-config", "--quiet", "-", "-o", "pylock.toml"],
        input="six\nuvicorn\n",
        text=True,
        cwd=root,
        check=True,
    )
    project = project_with(root, {})
    assert project.dependencies.kind == "pylock.toml"
    logs: list[str] = []
    env = build_environment(project, tmp_path / "envs", python=PYTHON, log=logs.append)
    assert "Installing from pylock.toml" in logs
    assert not any("uvicorn is not among" in line for line in logs)  # it was in the lock
    assert python_ok(env, "import six, uvicorn").returncode == 0


def test_default_is_fastapi_standard(tmp_path: Path) -> None:
    project = project_with(tmp_path / "src", {})
    assert project.dependencies.kind == "default"
    logs: list[str] = []
    env = build_environment(project, tmp_path / "envs", python=PYTHON, log=logs.append)
    assert logs[1].startswith("Installing fastapi[standard]: no uv.lock")
    assert not any("uvicorn is not among" in line for line in logs)
    assert python_ok(env, "import fastapi, uvicorn, httptools, uvloop").returncode == 0


def test_broken_requirement_leaves_nothing(tmp_path: Path) -> None:
    project = project_with(tmp_path / "src", {"requirements.txt": "this-package-does-not-exist-xyz==1\n"})
    envs = tmp_path / "envs"
    logs: list[str] = []
    with pytest.raises(BuildError) as info:
        build_environment(project, envs, python=PYTHON, log=logs.append)
    error = info.value
    assert type(error) is BuildError
    assert error.code == "building_image_failed"
    assert "Installing dependencies from requirements.txt failed (uv exited with status" in error.message
    assert "this-package-does-not-exist-xyz" in error.message  # the tail of uv's output
    assert "requirements.txt" in error.hint
    assert any("this-package-does-not-exist-xyz" in line for line in logs)
    assert leftovers(envs) == []
    assert not (envs / environment_key(project, PYTHON)).exists()


@pytest.fixture
def silent_index() -> Iterator[str]:
    """A package index that accepts connections and never answers: uv waits on it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/simple"


def test_timeout_kills_uv_and_leaves_nothing(tmp_path: Path, silent_index: str) -> None:
    project = project_with(tmp_path / "src", {"requirements.txt": f"--index-url {silent_index}\nsix\n"})
    envs = tmp_path / "envs"
    with pytest.raises(BuildTimeout) as info:
        build_environment(project, envs, python=PYTHON, log=lambda line: None, timeout=3)
    assert info.value.code == "building_image_failed_timeout"
    assert "uv pip" in info.value.message
    assert info.value.hint
    assert leftovers(envs) == []
    # The whole process group was killed: no uv is left working on this build.
    assert not [pid for pid in _pids() if str(tmp_path) in _cmdline(pid)]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_concurrent_builds_of_one_key_build_once(tmp_path: Path) -> None:
    project = project_with(tmp_path / "src", {"requirements.txt": "six\nuvicorn\n"})
    envs = tmp_path / "envs"
    envs.mkdir()
    results: list[BuiltEnvironment] = []
    errors: list[BaseException] = []
    waiting: list[str] = []
    all_waiting = threading.Event()

    def log(line: str) -> None:
        if "is running; waiting for it" in line:
            waiting.append(line)
            if len(waiting) == 2:
                all_waiting.set()

    def build() -> None:
        try:
            results.append(build_environment(project, envs, python=PYTHON, log=log))
        except BaseException as exc:
            errors.append(exc)

    # Hold the key as a build in another process would, so both threads must queue behind it.
    held = builder._KeyLock(envs, environment_key(project, PYTHON))
    assert held.acquire(None)
    threads = [threading.Thread(target=build) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        assert all_waiting.wait(timeout=60)
    finally:
        held.release()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(r.reused for r in results) == [False, True]
    assert len({r.path for r in results}) == 1
    assert leftovers(envs) == [results[0].key]
    assert python_ok(results[0], "import six, uvicorn").returncode == 0


def test_key_follows_the_spec_content(tmp_path: Path) -> None:
    base = project_with(tmp_path / "a", {"requirements.txt": "six\n"})
    same = project_with(tmp_path / "b", {"requirements.txt": "six\n", "other.py": "x = 1\n"})
    changed = project_with(tmp_path / "c", {"requirements.txt": "six==1.17.0\n"})
    assert environment_key(base, PYTHON) == environment_key(same, PYTHON)  # app code is not in the key
    assert environment_key(base, PYTHON) != environment_key(changed, PYTHON)

    # Files pulled in with -r are part of the spec too.
    nested = tmp_path / "d"
    first = project_with(
        nested, {"requirements.txt": "-r requirements/base.txt\n", "requirements/base.txt": "six\n"}
    )
    assert first.dependencies.files == (nested / "requirements.txt", nested / "requirements" / "base.txt")
    before = environment_key(first, PYTHON)
    (nested / "requirements" / "base.txt").write_text("six==1.16.0\n")
    assert environment_key(detect_project(nested), PYTHON) != before


def test_key_follows_the_interpreter(tmp_path: Path) -> None:
    project = project_with(tmp_path, {"requirements.txt": "six\n"})
    # A venv's python and its base interpreter build the same environment.
    base_python = str(Path(sys.base_prefix) / "bin" / Path(sys.executable).name)
    assert environment_key(project, PYTHON) == environment_key(project, base_python)

    real = builder._interpreter(PYTHON, UV)
    assert real.version == ".".join(map(str, sys.version_info[:3]))
    key = builder._key(project, real)
    for field, value in [("version", "3.12.1"), ("implementation", "pypy"), ("platform", "linux-aarch64")]:
        assert builder._key(project, dataclasses.replace(real, **{field: value})) != key


def test_unknown_python(tmp_path: Path) -> None:
    project = project_with(tmp_path, {})
    with pytest.raises(BuildError, match=r"No Python interpreter matches '3\.99'") as info:
        environment_key(project, "3.99")
    assert info.value.title == "Python not available"
    with pytest.raises(BuildError, match="does not exist"):
        environment_key(project, str(tmp_path / "bin" / "python"))


def test_prune(tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    keep, old, busy, crashed = (f"{n}" * 64 for n in "abcd")
    for key in (keep, old, busy):
        (envs / key).mkdir(parents=True)
        (envs / key / ".fastapi-deploy-environment.json").write_text("{}")
    (envs / f".{crashed}.building-x1y2").mkdir()  # a build that died without cleaning up
    (envs / "unrelated").mkdir()
    held = builder._KeyLock(envs, busy)
    assert held.acquire(None)
    try:
        assert prune_environments(envs, {keep}) == [old]
    finally:
        held.release()
    assert leftovers(envs) == sorted([keep, busy, "unrelated"])
    assert not (envs / f".{old}.lock").exists()
    assert prune_environments(envs, {keep}) == [busy]
    assert leftovers(envs) == sorted([keep, "unrelated"])
    assert prune_environments(tmp_path / "missing", set()) == []


# A PEP 517 backend in the package's own tree (no build requirements: nothing to download) that records
# the environment it was run with, as any setup.py could.
_SPY_BACKEND = """\
import base64, hashlib, json, os, zipfile

def _record():
    home = os.path.expanduser("~")
    with open(os.path.join(home, MARK), "w") as f:
        f.write("x")
    with open(OUT, "w") as f:
        json.dump({"environ": dict(os.environ), "home": home}, f)

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _record()
    info = "envspy-0.1.dist-info/"
    files = {
        "envspy.py": b"",
        info + "METADATA": b"Metadata-Version: 2.1\\nName: envspy\\nVersion: 0.1\\n",
        info + "WHEEL": b"Wheel-Version: 1.0\\nGenerator: spy\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }
    def digest(data):
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record = "".join(f"{p},sha256={digest(d)},{len(d)}\\n" for p, d in files.items()) + info + "RECORD,,\\n"
    name = "envspy-0.1-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(info + "RECORD", record)
    return name
"""

SERVER_SECRETS = {
    "FASTAPI_DEPLOY_ADMIN_TOKEN": "fdp_admin_token_must_not_leak",
    "FASTAPI_DEPLOY_SECRET_KEY": "fernet-key-must-not-leak",
    "FASTAPI_DEPLOY_REGISTRY_PASSWORD": "registry-password-must-not-leak",
    "DATABASE_URL": "postgresql://user:db-password-must-not-leak@db/x",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-must-not-leak",
}


def test_build_scripts_never_see_the_servers_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SERVER_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VIRTUAL_ENV", str(Path(sys.executable).parent.parent))
    monkeypatch.setenv("UV_INDEX_STRATEGY", "first-index")  # operator's uv settings do pass
    out = tmp_path / "seen.json"
    mark = f"written-by-a-build-script-{os.urandom(4).hex()}"
    root = tmp_path / "src"
    project = project_with(
        root,
        {
            "requirements.txt": "./envspy\n",
            "envspy/pyproject.toml": (
                '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
                '[project]\nname = "envspy"\nversion = "0.1"\n'
            ),
            "envspy/backend.py": f"OUT = {str(out)!r}\nMARK = {mark!r}\n" + _SPY_BACKEND,
        },
    )

    env = build_environment(project, tmp_path / "envs", python=PYTHON, log=lambda line: None)

    assert python_ok(env, "import envspy").returncode == 0  # the build script did run
    seen = json.loads(out.read_text())
    environ: dict[str, str] = seen["environ"]
    leaked = [k for k in environ if k.startswith("FASTAPI_DEPLOY_") or k in SERVER_SECRETS]
    assert leaked == [], leaked
    assert not [k for k, v in environ.items() if any(s in v for s in SERVER_SECRETS.values())]
    assert "VIRTUAL_ENV" not in environ or environ["VIRTUAL_ENV"] != os.environ["VIRTUAL_ENV"]
    assert environ["UV_INDEX_STRATEGY"] == "first-index"
    assert environ["PATH"]
    # A HOME of the build's own, gone afterwards; the server user's home was not written to.
    assert seen["home"] != str(Path.home())
    assert not Path(seen["home"]).exists()
    assert not (Path.home() / mark).exists()


def test_build_env_is_an_allow_list() -> None:
    server = {
        **SERVER_SECRETS,
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/platform",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/var/tmp",
        "HTTPS_PROXY": "http://proxy:3128",
        "no_proxy": "localhost",
        "SSL_CERT_FILE": "/etc/ssl/ca.pem",
        "REQUESTS_CA_BUNDLE": "/etc/ssl/ca.pem",
        "UV_INDEX_URL": "https://pypi.internal/simple",
        "PIP_INDEX_URL": "https://pypi.internal/simple",
        "VIRTUAL_ENV": "/srv/fastapi-deploy/.venv",
        "PYTHONPATH": "/srv/fastapi-deploy",
        "FASTAPI_DEPLOY_DATA_DIR": "/srv/data",
        "KUBECONFIG": "/root/.kube/config",
    }
    env = builder.build_env(Path("/tmp/build-home"), server)
    passed = {
        "PATH",
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "HTTPS_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "UV_INDEX_URL",
        "PIP_INDEX_URL",
    }
    assert {k: env[k] for k in passed} == {k: server[k] for k in passed}
    assert env["HOME"] == "/tmp/build-home"
    assert env["UV_CACHE_DIR"] == "/home/platform/.cache/uv"  # the server's cache, not the build's HOME
    assert set(env) == passed | {"HOME", "UV_CACHE_DIR", "NO_COLOR", "UV_NO_PROGRESS"}
    # uv's own discovery steps keep the server's HOME (uv-managed interpreters live there).
    assert builder.build_env(None, server)["HOME"] == "/home/platform"
    assert builder.build_env(None, {**server, "UV_CACHE_DIR": "/cache"})["UV_CACHE_DIR"] == "/cache"


# -- confined builds (docs/ISOLATION.md) -------------------------------------------------------------------

# The spy above, telling who runs the build and with what: its uid and groups, HOME, cgroup, limits.
_CONFINED_SPY = (
    _SPY_BACKEND
    + """
def _record():
    import resource
    if HOG_MB:
        held = b"x" * (HOG_MB * 2**20)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    with open(OUT, "w") as f:
        json.dump({
            "uid": os.getuid(), "groups": os.getgroups(), "home": os.path.expanduser("~"),
            "environ": dict(os.environ), "cgroup": open("/proc/self/cgroup").read(), "nice": os.nice(0),
            "nproc": list(resource.getrlimit(resource.RLIMIT_NPROC)),
            "no_new_privs": status["NoNewPrivs"].strip(),
        }, f)
"""
)


def _world_python() -> str:
    """An interpreter every user can run (this venv's may live under /root): the app's user builds with it."""
    from runtime.backends._confine import _unreachable

    for candidate in (PYTHON, "/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _unreachable(Path(candidate), "run") is None:
            return candidate
    pytest.fail("no Python that every user can run (install python3): builds cannot run as the app's user")


@pytest.fixture
def confined_world() -> Iterator[tuple[Path, Any]]:
    """A data directory every user can pass through, and a maker of confined builds of spy projects."""
    from runtime.backends._confine import BuildConfinement, Confinement, Limits, app_user_name

    root = Path(tempfile.mkdtemp(prefix="fdp-build-isolation-"))
    root.chmod(0o711)
    data = root / "data"
    (data / "envs").mkdir(parents=True)
    confinement = Confinement(data_dir=data)
    apps: list[str] = []

    def build(hog_mb: int = 0, memory_mb: int = 1024, logs: list[str] | None = None) -> tuple[Any, Path, str]:
        app_id = f"build-{uuid.uuid4().hex[:8]}"
        apps.append(app_id)
        src = data / "deployments" / uuid.uuid4().hex[:10] / "src"
        out = src / "seen.json"  # the project's own tree: a confined build may write there
        project = project_with(
            src,
            {
                "requirements.txt": "./envspy\n",
                "envspy/pyproject.toml": (
                    '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
                    '[project]\nname = "envspy"\nversion = "0.1"\n'
                ),
                "envspy/backend.py": f"OUT = {str(out)!r}\nMARK = 'mark'\nHOG_MB = {hog_mb}\n"
                + _CONFINED_SPY,
            },
        )
        confinement.secure_data_dir()
        confine = BuildConfinement(confinement, app_id, Limits(memory_mb=memory_mb, cpus=1.0))
        env = build_environment(
            project,
            data / "envs",
            python=_world_python(),
            log=(logs if logs is not None else []).append,
            confine=confine,
        )
        return env, out, app_user_name(app_id)

    yield data, build
    shutil.rmtree(root, ignore_errors=True)
    if os.geteuid() == 0:
        for app_id in apps:
            subprocess.run(["userdel", app_user_name(app_id)], capture_output=True, check=False)


def test_a_confined_build_runs_as_the_apps_user_and_seals_the_environment(
    confined_world: tuple[Path, Any], caplog: pytest.LogCaptureFixture
) -> None:
    import pwd

    from runtime.backends._confine import Confinement, IsolationSettings

    caplog.set_level(logging.INFO, logger="fastapi_deploy.isolation")
    data, build = confined_world
    logs: list[str] = []

    env, out, user_name = build(logs=logs)

    seen = json.loads(out.read_text())
    assert python_ok(env, "import envspy, uvicorn").returncode == 0  # built, and usable
    assert not Path(seen["home"]).exists()  # a HOME of its own, gone afterwards
    if os.geteuid() != 0:  # the documented fallback: the server's user, said once
        assert seen["uid"] == os.getuid()
        assert len([r for r in caplog.records if "not root" in r.getMessage()]) == 1
        return
    user = pwd.getpwnam(user_name)
    assert (seen["uid"], seen["groups"], seen["no_new_privs"]) == (user.pw_uid, [], "1")
    assert seen["nproc"] == [IsolationSettings().nproc] * 2
    assert seen["nice"] >= 10  # below the instances that serve
    assert Path(seen["home"]).parent == data / "users" / user_name
    # uv's cache of this app alone: no build can plant a wheel that another app's build installs.
    assert seen["environ"]["UV_CACHE_DIR"] == str(data / "users" / user_name / "cache" / "uv")
    assert any(line.startswith(f"Building as {user_name}, 1 CPU, 1024 MiB") for line in logs), logs
    hierarchy = Confinement().hierarchy
    if hierarchy is not None:  # in a cgroup of its own, removed (with whatever it left running) after
        assert f"/fastapi-deploy/{user_name}/build-" in seen["cgroup"]
        assert not list((hierarchy.bases["memory"] / user_name).glob("build-*"))
    # Sealed: the server's, world-readable, writable by nobody else: every app reads it, none changes it.
    for path in [env.path, *env.path.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
        if not path.is_symlink():
            assert st.st_mode & 0o022 == 0 and st.st_mode & 0o004, path
    assert env.path.stat().st_mode & 0o777 == 0o755


def test_a_confined_build_over_its_memory_limit_fails_as_out_of_memory(
    confined_world: tuple[Path, Any],
) -> None:
    _data, build = confined_world

    with pytest.raises(BuildError) as info:
        build(hog_mb=600, memory_mb=256)

    # With a cgroup the kernel kills it and the error says why; with rlimits only it is a MemoryError.
    if info.value.title == "Build out of memory":
        assert "ran out of memory: the build was killed at its limit of 256 MiB" in info.value.message
        assert "FASTAPI_DEPLOY_BUILD_MEMORY_MB" in info.value.hint
    else:
        assert "MemoryError" in info.value.message
