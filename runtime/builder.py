"""The virtualenv artifact: a relocatable venv built with uv, content-addressed.

An environment lives at ``envs_dir/<key>/``, where the key is a sha256 over what defines it: the kind
of dependency spec, the bytes of its files, the interpreter (implementation, version, platform, ABI,
base prefix: the venv links to it) and ``BUILDER_VERSION``. A redeploy whose dependencies did not
change finds its key complete and installs nothing.

Every build happens in a staging directory beside the key and is renamed into place atomically with
a marker file written last, so a key directory is either complete or absent. Builds of one key are
serialised by an ``fcntl`` lock file (``.<key>.lock``); a second build of the same key waits and then
reuses the first one's result.

uv runs with ``--no-config``, so a project's ``[tool.uv]`` or ``uv.toml`` cannot point installs
elsewhere on this machine; the operator configures indexes and the cache through ``UV_*`` variables
(``UV_CACHE_DIR``, ``UV_INDEX_URL``, ...), which are passed through.

Every step runs with an allow-listed environment (:data:`BUILD_ENV_ALLOWED`: the locale, ``PATH``,
``TMPDIR``, proxies, CA bundles, ``UV_*`` and ``PIP_*`` index settings, compiler flags) and a ``HOME``
of its own that is removed afterwards: a package's build script (``setup.py``, a build backend) runs
with the build, and must not see the control plane's admin token, database URL, secret keys or
registry password, nor write into the server user's home. uv's cache stays where it was (it is passed
as ``UV_CACHE_DIR``), so a private ``HOME`` costs no downloads.

With ``confine`` (a :class:`runtime.backends._confine.BuildConfinement`) every step runs confined like
the app's instances (docs/ISOLATION.md): as the app's own user where the server is root (the project's
files given to it, writable, since local packages are built in place; the staging directory handed to
it; a uv cache of the app's own under ``data/users``, so no build can plant a wheel another app
installs), in a cgroup with the build's memory and CPU limits (rlimits where there are none), at
``nice 10``. When the build is done, what it left running is killed and the environment is sealed:
owned by the server's user, world-readable, writable by nobody else: every instance reads it, none
can change it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime.backends._confine import BuildConfinement, BuildJail, build_jail, seal
from runtime.detect import Project
from runtime.errors import BuildError, BuildTimeout

__all__ = [
    "BUILDER_VERSION",
    "BUILD_ENV_ALLOWED",
    "BuiltEnvironment",
    "build_env",
    "build_environment",
    "environment_key",
    "prune_environments",
]

BUILDER_VERSION = "1"
"""Part of every key: bump it when a change here makes existing environments wrong."""

Log = Callable[[str], None]

_MARKER = ".fastapi-deploy-environment.json"
_KEY = re.compile(r"[0-9a-f]{64}")
_LOCK_POLL = 0.1  # seconds between attempts to take a key another build holds
_TAIL_LINES = 25

# Export the lock as requirements: no hashes (the index is trusted like any uv install), not the
# project itself, no dev groups, and no editables: they would point into one deploy's source tree.
_EXPORT = ("export", "--frozen", "--no-hashes", "--no-emit-project", "--no-dev", "--no-editable", "--quiet")
_INSTALL_HINTS = {
    "uv.lock": "Check that uv.lock is up to date (`uv lock`) and installs on Linux with this Python.",
    "pylock.toml": "Regenerate pylock.toml (`uv export --format pylock.toml`) and deploy again.",
    "requirements.txt": "Check the package names and versions in requirements.txt, then deploy again.",
    "pyproject.toml": "Check [project].dependencies in pyproject.toml, then deploy again.",
}
_OPERATOR_HINT = "Check the server's access to the package index; ask the platform operator."

BUILD_ENV_ALLOWED = re.compile(
    r"^(PATH|LANG|LANGUAGE|LC_[A-Z]+|TZ|TMPDIR|SOURCE_DATE_EPOCH"
    r"|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE"
    r"|(HTTP|HTTPS|NO|ALL)_PROXY|(http|https|no|all)_proxy"
    r"|UV_[A-Z0-9_]+|PIP_[A-Z0-9_]+"
    r"|CC|CXX|CFLAGS|CXXFLAGS|CPPFLAGS|LDFLAGS|PKG_CONFIG_PATH)$"
)
"""The variables of the server's environment a build step may see (everything else is dropped): the
locale, ``PATH``, temporary files, proxies and CA bundles, uv's and pip's index and cache settings, and
the C toolchain's flags (sdists with extensions). ``HOME`` is not passed: each build gets its own."""

_INTERPRETER_QUERY = """\
import json, platform, sys, sysconfig
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": platform.python_version(),
    "platform": sysconfig.get_platform(),
    "abi": sys.abiflags + "/" + "-".join(platform.libc_ver()),
    "base_prefix": sys.base_prefix,
}))
"""


@dataclass(frozen=True)
class BuiltEnvironment:
    key: str
    path: Path
    """The venv's root."""
    python: Path
    """Its interpreter: run the app with this."""
    reused: bool
    """True when the environment already existed and nothing was installed."""


@dataclass(frozen=True)
class _Interpreter:
    executable: str
    implementation: str
    version: str
    platform: str
    abi: str
    base_prefix: str


def environment_key(project: Project, python: str) -> str:
    """The content address of the environment ``project`` needs on interpreter ``python``.

    ``python`` is an interpreter path or a version request such as ``"3.12"`` (resolved with
    ``uv python find``). Raises BuildError if the interpreter cannot be found or run, or a dependency
    file cannot be read.
    """
    return _key(project, _interpreter(python, find_uv(None)))


def build_environment(
    project: Project,
    envs_dir: Path,
    *,
    python: str,
    log: Log,
    timeout: float = 600,
    uv: str | None = None,
    confine: BuildConfinement | None = None,
) -> BuiltEnvironment:
    """Return the environment for ``project``, building it with uv unless it already exists.

    ``log`` receives a line saying what happens and why, then uv's output line by line as it runs.
    ``timeout`` (seconds) bounds the whole call, waiting for a concurrent build of the same key
    included. ``uv`` overrides the uv binary (default: next to ``sys.executable``, else on PATH).
    ``confine``: run the build as the app's user, under its limits (see the module's docstring).

    Raises:
        BuildError: the interpreter is unusable, installing failed (message ends with uv's output), the
            build ran out of memory, or isolation is required and the build cannot run as the app's user.
        BuildTimeout: the build did not finish in time; uv was killed and nothing was kept.
    """
    deadline = time.monotonic() + timeout
    uv_bin = find_uv(uv)
    interpreter = _interpreter(python, uv_bin)
    key = _key(project, interpreter)
    envs_dir.mkdir(parents=True, exist_ok=True)
    target = envs_dir / key
    lock = _KeyLock(envs_dir, key)
    if not lock.acquire(None):
        log(f"Another build of the same dependencies (key {key[:12]}…) is running; waiting for it")
        if not lock.acquire(deadline):
            raise BuildTimeout(
                f"Another build of the same environment (key {key[:12]}…) did not finish within "
                f"{timeout:.0f} s.",
                hint="Deploy again in a moment; the other build's environment will be reused.",
            )
    try:
        if (target / _MARKER).is_file():
            log(f"Dependencies unchanged (key {key[:12]}…), reusing environment")
            if target.stat().st_mode & 0o777 != 0o755:  # built before environments were opened to all
                with contextlib.suppress(OSError):
                    target.chmod(0o755)
            return BuiltEnvironment(key=key, path=target, python=target / "bin" / "python", reused=True)
        _remove_leftovers(envs_dir, key)
        log(f"New dependencies (key {key[:12]}…), building an environment with Python {interpreter.version}")
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.building-", dir=envs_dir))
        try:
            _Build(project, staging, interpreter, uv_bin, log, deadline, timeout, confine).run()
            _write_marker(staging, key, project, interpreter)
            staging.chmod(0o755)  # mkdtemp's 0700: instances, whoever they run as, read it (never write)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        lock.release()
    return BuiltEnvironment(key=key, path=target, python=target / "bin" / "python", reused=False)


def prune_environments(envs_dir: Path, keep: set[str]) -> list[str]:
    """Delete every environment whose key is not in ``keep``; return the deleted keys.

    Environments being built or reused right now (their key is locked) are skipped, as are leftovers
    of builds that crashed. Environments in use by running instances are not locked: keep them.
    """
    if not envs_dir.is_dir():
        return []
    keys = set()
    for entry in envs_dir.iterdir():
        # <key>/, .<key>.lock, .<key>.building-XXXX
        candidate = entry.name.lstrip(".").split(".", 1)[0]
        if _KEY.fullmatch(candidate):
            keys.add(candidate)
    removed = []
    for key in sorted(keys - keep):
        lock = _KeyLock(envs_dir, key)
        if not lock.acquire(None):
            continue
        try:
            if (envs_dir / key).exists():
                shutil.rmtree(envs_dir / key)
                removed.append(key)
            _remove_leftovers(envs_dir, key)
        finally:
            lock.release(unlink=True)
    return removed


class _Build:
    """One build in a staging directory: create the venv, install the spec, make sure of uvicorn."""

    def __init__(
        self,
        project: Project,
        staging: Path,
        interpreter: _Interpreter,
        uv: str,
        log: Log,
        deadline: float,
        timeout: float,
        confine: BuildConfinement | None = None,
    ) -> None:
        self.project = project
        self.staging = staging
        self.interpreter = interpreter
        self.uv = uv
        self.log = log
        self.deadline = deadline
        self.timeout = timeout
        self.python = staging / "bin" / "python"
        self.env: dict[str, str] = {}
        self.confine = confine
        self.jail: BuildJail | None = None

    def run(self) -> None:
        if self.confine is not None:
            self._run_confined(self.confine)
            return
        # A HOME of the build's own: build scripts may write there (caches, config), never into ours.
        home = Path(tempfile.mkdtemp(prefix="fastapi-deploy-build-home-"))
        try:
            self.env = build_env(home)
            self._run()
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def _run_confined(self, confine: BuildConfinement) -> None:
        run = [Path(self.uv), Path(self.interpreter.executable)]
        with build_jail(confine, run=run, source=self.project.root, staging=self.staging) as jail:
            self.jail = jail
            self.env = build_env(jail.home)
            if jail.cache is not None:
                self.env["UV_CACHE_DIR"] = str(jail.cache)  # the app's own: never shared with another's
            limits = jail.limits
            if confine.confinement.enabled:
                self.log(
                    f"Building as {jail.user.name if jail.user else 'the server user'}"
                    + (f", {limits.cpus:g} CPU" if limits.cpus else "")
                    + (f", {limits.memory_mb} MiB" if limits.memory_mb else "")
                    + ("" if jail.cgroup else " (rlimits)")
                )
            self._run()
        # Nothing of the build runs any more (its cgroup was emptied): nobody but us can change it now.
        if jail.user is not None:
            seal(self.staging)

    def _run(self) -> None:
        venv = ["venv", "--relocatable", "--no-project", "--no-config", "--quiet"]
        self._uv(
            [*venv, "--python", self.interpreter.executable, str(self.staging)],
            cwd=self.staging.parent,
            what="Creating the virtual environment",
            hint="The server's Python interpreter is unusable; ask the platform operator.",
        )
        spec = self.project.dependencies
        spec_dir = spec.files[0].parent if spec.files else self.project.root
        if spec.kind == "uv.lock":
            self.log(
                "Installing from uv.lock (the locked dependencies of pyproject.toml, without dev groups)"
            )
            exported = self.staging / ".uv-lock-requirements.txt"
            self._uv(
                [*_EXPORT, "-o", str(exported)],
                cwd=spec_dir,
                what="Reading uv.lock",
                hint="Run `uv lock` so uv.lock matches pyproject.toml, include both files, and deploy again.",
            )
            self._install(["-r", str(exported)], cwd=spec_dir, source="uv.lock")
            exported.unlink()
        elif spec.kind == "default":
            self.log(
                "Installing fastapi[standard]: no uv.lock, pylock.toml, requirements.txt or "
                "pyproject.toml [project] dependencies were found"
            )
            self._install(["fastapi[standard]"], cwd=spec_dir, source="fastapi[standard]")
        else:
            what = "[project].dependencies of pyproject.toml" if spec.kind == "pyproject.toml" else spec.kind
            self.log(f"Installing from {what}")
            # -r pyproject.toml installs its dependencies, never the project itself.
            self._install(["-r", str(spec.files[0])], cwd=spec_dir, source=spec.kind)
        if not self._has_uvicorn():
            self.log("uvicorn is not among the dependencies; installing it to serve the app")
            self._install(["uvicorn"], cwd=self.staging, source="uvicorn")

    def _install(self, args: list[str], *, cwd: Path, source: str) -> None:
        hint = _INSTALL_HINTS.get(source, _OPERATOR_HINT)
        self._uv(
            ["pip", "install", "--no-config", "--python", str(self.python), *args],
            cwd=cwd,
            what=f"Installing dependencies from {source}",
            hint=hint
            + f" They must support Python {self.interpreter.version} on {self.interpreter.platform}.",
        )

    def _has_uvicorn(self) -> bool:
        # -I: nothing from the environment or the working directory can shadow the answer.
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('uvicorn') is None)"
        code, _ = _stream(
            [str(self.python), "-I", "-c", probe],
            self.staging,
            self.env,
            self.log,
            self._left(),
            self._preexec,
        )
        return code == 0

    @property
    def _preexec(self) -> Callable[[], None] | None:
        return None if self.jail is None else self.jail.preexec

    def _uv(self, args: list[str], *, cwd: Path, what: str, hint: str) -> None:
        code, tail = _stream([self.uv, *args], cwd, self.env, self.log, self._left(), self._preexec)
        if code != 0 and self.jail is not None and self.jail.out_of_memory():
            raise BuildError(
                f"{what} ran out of memory: the build was killed at its limit of "
                f"{self.jail.limits.memory_mb} MiB.",
                title="Build out of memory",
                hint="Trim the dependencies (or prefer wheels to sdists that compile), or ask the platform "
                "operator for more build memory (FASTAPI_DEPLOY_BUILD_MEMORY_MB).",
            )
        if code != 0:
            output = "\n".join(tail) or "(no output)"
            raise BuildError(f"{what} failed (uv exited with status {code}):\n{output}", hint=hint)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BuildTimeout(
                f"Building the environment took longer than {self.timeout:.0f} s.",
                hint="Trim the dependencies, or ask the platform operator for a longer build timeout.",
            )
        return left


def _stream(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    log: Log,
    timeout: float,
    preexec: Callable[[], None] | None = None,
) -> tuple[int, list[str]]:
    """Run ``cmd`` with stdout and stderr merged, passing each line to ``log`` as it arrives;
    ``preexec`` (the build's confinement) runs in the child before ``exec``.

    Returns the exit status and the last lines. On timeout the whole process group is killed and
    BuildTimeout raised.
    """
    deadline = time.monotonic() + timeout
    tail: deque[str] = deque(maxlen=_TAIL_LINES)

    def emit(raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        tail.append(line)
        log(line)

    # A session of its own, so a timeout kills uv and whatever it spawned (build backends).
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,  # cgroup, limits, the app's user: nothing that takes a lock
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(
            f"`{Path(cmd[0]).name}` could not be started: {exc}",
            hint="Ask the platform operator: uv, the app's Python or the build's confinement failed.",
        ) from exc
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            pending = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timeout(cmd, timeout)
                if not selector.select(left):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    emit(line)
            if pending:
                emit(pending)
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            raise _timeout(cmd, timeout) from None
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        proc.stdout.close()
    return code, list(tail)


def _timeout(cmd: list[str], timeout: float) -> BuildTimeout:
    name = Path(cmd[0]).name + (f" {cmd[1]}" if len(cmd) > 1 else "")
    return BuildTimeout(
        f"Building the environment took too long: `{name}` was stopped after {timeout:.0f} s.",
        hint="Trim the dependencies, or ask the platform operator for a longer build timeout.",
    )


def _key(project: Project, interpreter: _Interpreter) -> str:
    digest = hashlib.sha256()

    def add(label: str, value: bytes) -> None:
        # Length-prefixed, so no two different inputs can produce the same byte stream.
        digest.update(f"{label}\0{len(value)}\0".encode())
        digest.update(value)

    spec = project.dependencies
    add("builder", BUILDER_VERSION.encode())
    add("kind", spec.kind.encode())
    base = spec.files[0].parent if spec.files else None
    for path in spec.files:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise BuildError(
                f"{path.name} could not be read: {exc.strerror}.", hint="Check the file and deploy again."
            ) from exc
        add(f"file:{os.path.relpath(path, base)}", content)
    for field in ("implementation", "version", "platform", "abi", "base_prefix"):
        add(field, getattr(interpreter, field).encode())
    return digest.hexdigest()


def _interpreter(python: str, uv: str) -> _Interpreter:
    if os.sep in python or Path(python).is_file():
        executable = python
    else:
        # A version request ("3.12", "cpython@3.13"): let uv pick the interpreter, as `uv venv` would.
        found = subprocess.run(
            [uv, "python", "find", "--no-config", python],
            capture_output=True,
            text=True,
            env=build_env(None),
            timeout=60,
            check=False,
        )
        lines = found.stdout.strip().splitlines()
        if found.returncode != 0 or not lines:
            raise BuildError(
                f"No Python interpreter matches {python!r} on this server: {found.stderr.strip()}",
                hint="Ask the platform operator which Python versions are available.",
                title="Python not available",
            )
        executable = lines[-1]
    try:
        mtime = os.stat(executable).st_mtime_ns
    except OSError as exc:
        raise BuildError(
            f"The Python interpreter {executable!r} does not exist.",
            hint="Ask the platform operator to fix the configured Python.",
            title="Python not available",
        ) from exc
    return _query_interpreter(executable, mtime)


@functools.lru_cache(maxsize=32)
def _query_interpreter(executable: str, mtime_ns: int) -> _Interpreter:
    """Ask the interpreter itself; cached per path, and per mtime so a reinstall is noticed."""
    try:
        out = subprocess.run(
            [executable, "-I", "-c", _INTERPRETER_QUERY],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        info = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise BuildError(
            f"The Python interpreter {executable!r} could not be run: {exc}",
            hint="Ask the platform operator to fix the configured Python.",
            title="Python not available",
        ) from exc
    return _Interpreter(executable=executable, **{k: str(v) for k, v in info.items()})


def find_uv(uv: str | None) -> str:
    if uv is not None:
        return uv
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file():
        return str(beside)
    found = shutil.which("uv")
    if found is None:
        raise BuildError(
            "The uv binary was not found next to the server's Python or on PATH.",
            hint="Install fastapi-deploy with its dependencies (uv is one), or pass the path to uv.",
        )
    return found


def build_env(home: Path | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a build step: the variables of ``environ`` (default: the server's) that
    :data:`BUILD_ENV_ALLOWED` lets through, ``HOME`` set to ``home``, uv's cache pinned.

    ``home`` None keeps the server's ``HOME`` (and ``XDG_DATA_HOME``): only for uv's own steps that run
    no package code, such as ``uv python find``, which looks for uv-managed interpreters there. Nothing
    else passes: not the control plane's settings and secrets (``FASTAPI_DEPLOY_*``, ``DATABASE_URL``),
    not its virtualenv (``VIRTUAL_ENV``, ``PYTHONPATH``).
    """
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if BUILD_ENV_ALLOWED.match(k)}
    env.setdefault("PATH", os.defpath)
    server_home = source.get("HOME") or str(Path.home())
    if "UV_CACHE_DIR" not in env:
        # Where uv would put it for the server's user; with a private HOME it would start empty.
        cache_root = source.get("XDG_CACHE_HOME") or os.path.join(server_home, ".cache")
        env["UV_CACHE_DIR"] = os.path.join(cache_root, "uv")
    if home is None:
        env["HOME"] = server_home
        if "XDG_DATA_HOME" in source:
            env["XDG_DATA_HOME"] = source["XDG_DATA_HOME"]
    else:
        env["HOME"] = str(home)
    env["NO_COLOR"] = "1"
    env["UV_NO_PROGRESS"] = "1"
    return env


def _write_marker(staging: Path, key: str, project: Project, interpreter: _Interpreter) -> None:
    marker = {
        "key": key,
        "builder_version": BUILDER_VERSION,
        "dependencies": project.dependencies.kind,
        "python": interpreter.version,
        "platform": interpreter.platform,
        "built_at": time.time(),
    }
    # Written last: its presence is what makes the key complete. A confined build had the staging
    # directory: whatever it left under this name goes, and the marker is never written through a link.
    path = staging / _MARKER
    if path.is_symlink() or path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(marker, indent=2) + "\n")


def _remove_leftovers(envs_dir: Path, key: str) -> None:
    """Remove staging directories of crashed builds of ``key`` (the caller holds its lock)."""
    for staging in envs_dir.glob(f".{key}.building-*"):
        shutil.rmtree(staging, ignore_errors=True)
    target = envs_dir / key
    if target.exists() and not (target / _MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)


class _KeyLock:
    """An exclusive ``flock`` on ``.<key>.lock``, between processes and threads alike."""

    def __init__(self, envs_dir: Path, key: str) -> None:
        self.path = envs_dir / f".{key}.lock"
        self._fd: int | None = None

    def acquire(self, deadline: float | None) -> bool:
        """Take the lock, waiting until ``deadline`` (monotonic); None means try once."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if deadline is None or time.monotonic() >= deadline:
                    return False
                time.sleep(_LOCK_POLL)
                continue
            # prune unlinks the file while holding it; a lock on an unlinked file guards nothing.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev):
                self._fd = fd
                return True
            os.close(fd)

    def release(self, *, unlink: bool = False) -> None:
        if self._fd is None:
            return
        if unlink:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
