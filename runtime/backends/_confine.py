"""Confinement of the ``process`` backend's instances and of environment builds (docs/ISOLATION.md).

What this host allows is decided once, when a :class:`Confinement` is made::

    users    server is root   one system user per app (fdp-<hash of app id>, useradd, uid from a range),
                              no supplementary groups, no new privileges; else: the server's own user
    cgroups  v2               a memory/cpu/pids subtree (default /sys/fs/cgroup/fastapi-deploy) we can write
             v1               the memory (+cpu, pids) hierarchies, under the server's own cgroup
             none             rlimits only (RLIMIT_DATA for memory; CPU is not limited)
    view     root + cgroups   each instance sees its own cgroup at /sys/fs/cgroup (cgroup + mount namespace)
    rlimits  always           NOFILE, CORE 0; NPROC per app user; DATA when there is no cgroup

Per deployment, :meth:`Confinement.prepare` checks that an app user can reach what it must run (the
interpreter, the launcher), creates the app's user and gives its group the deployment's files (the
source read-only, the working directory writable but sticky, nothing for other users). Per process,
:meth:`Confinement.cgroup` makes its cgroup and :meth:`Confinement.preexec` the function that runs in
the child before ``exec``: join the cgroup, enter the view, set rlimits, drop to the app's user.

In mode ``auto`` what cannot be had is said once in the log and left out; in ``require`` it is an error
(:class:`runtime.errors.DeployError`, or the ``error`` class the caller passes); ``off`` confines nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import pwd
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import BuildError, DeployError, RuntimeFailure

__all__ = [
    "AppUser",
    "BuildConfinement",
    "BuildJail",
    "Cgroup",
    "Confinement",
    "IsolationSettings",
    "Limits",
    "app_user_name",
]

log = logging.getLogger("fastapi_deploy.isolation")

MODES = ("auto", "require", "off")
_CPU_PERIOD = 100_000  # microseconds: the CFS period quotas are given in
_TRAVERSE_ONLY = ("deployments", "envs", "otel", "users")  # data-dir folders instances pass through
_USERADD_LOCKED = 10  # useradd's exit status when /etc/passwd is locked by another writer

# <sched.h>, <sys/mount.h>, <linux/prctl.h>
_CLONE_NEWNS, _CLONE_NEWCGROUP = 0x00020000, 0x02000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_SLAVE = 1, 2, 4, 8, 1 << 14, 1 << 19
_MNT_DETACH = 2
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class IsolationSettings:
    """How apps are confined; read once at the edge (``FASTAPI_DEPLOY_ISOLATION*``)."""

    mode: str = "auto"
    """``auto``: what the host allows, the rest said once in the log; ``require``: an instance or build that
    cannot run as a user of its own fails; ``off``: no users, no limits (as before isolation existed)."""
    uid_min: int = 200_000
    """Lowest uid (and gid) of app users; keep the range clear of people and of /etc/subuid ranges."""
    uid_max: int = 299_999
    """Highest uid (and gid) of app users."""
    cgroup_root: Path | None = None
    """cgroup v2: the directory our subtree lives in (default ``<cgroup2 mount>/fastapi-deploy``); set it to
    a delegated subtree (systemd ``Delegate=yes``) to confine without root. Ignored with cgroup v1."""
    pids_max: int = 1024
    """Processes and threads per instance (``pids.max``); builds get four times as many."""
    nofile: int = 65_536
    """Open files per process (``RLIMIT_NOFILE``, never above the server's own hard limit)."""
    nproc: int = 4096
    """Processes and threads of one app user, all its instances and builds together (``RLIMIT_NPROC``)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"isolation mode {self.mode!r}: one of {', '.join(MODES)}")
        if not 0 < self.uid_min <= self.uid_max:
            raise ValueError(f"app uid range {self.uid_min}-{self.uid_max} is empty")


@dataclass(frozen=True)
class Limits:
    """What one confined process tree may use; ``None``: unlimited."""

    memory_mb: int | None = None
    """MiB of memory, no swap (cgroups); without cgroups ``RLIMIT_DATA`` of twice this (a virtual bound)."""
    cpus: float | None = None
    """Cores (a CFS quota over a 100 ms period); not enforced without cgroups."""
    pids: int | None = None
    """Processes and threads (``pids.max``)."""


@dataclass(frozen=True)
class AppUser:
    """The system user (and its own group) an app's instances and builds run as."""

    name: str
    uid: int
    gid: int


def app_user_name(app_id: str) -> str:
    """``fdp-`` and 12 hex digits of the app id's SHA-256: a valid user name whatever the id is."""
    return "fdp-" + hashlib.sha256(app_id.encode()).hexdigest()[:12]


# -- cgroups ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    """A cgroup file system as this mount namespace has it: where, which type, which options."""

    point: Path
    fstype: str
    root: str
    options: str
    """Super options without rw/ro: the controllers of a v1 hierarchy (``memory``, ``cpu,cpuacct``)."""


@dataclass(frozen=True)
class Cgroup:
    """One leaf cgroup: a directory per controller (v2: the same one), its limits already written."""

    version: int
    dirs: dict[str, Path]
    """Controller (``memory``, ``cpu``, ``pids``) -> directory."""

    @property
    def paths(self) -> list[Path]:
        return sorted(set(self.dirs.values()))

    def add(self, pid: int) -> None:
        """Move ``pid`` (a process, with all its threads) into this cgroup. OSError if it is gone."""
        for path in self.paths:
            _write(path / "cgroup.procs", str(pid))

    def oom_kills(self) -> int:
        """Processes the kernel killed here for exceeding the memory limit."""
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in (memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL everything in it: what an instance or build left behind, daemons included."""
        if self.version == 2:
            try:
                _write(self.paths[0] / "cgroup.kill", "1")  # Linux 5.14+: all of it, atomically
                return
            except OSError:
                pass  # older: one by one
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove its directories; False while processes remain (``EBUSY``)."""
        gone = True
        for path in self.paths:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone

    def dispose(self, *, timeout: float = 5.0) -> bool:
        """Kill what is left and remove it, waiting up to ``timeout`` seconds for the dead to go."""
        deadline = time.monotonic() + timeout
        while True:
            self.kill()
            if self.remove():
                return True
            if time.monotonic() > deadline:
                log.warning("cgroup %s is still busy after %.0f s; left in place", self.paths[0], timeout)
                return False
            time.sleep(0.02)


@dataclass(frozen=True)
class _Hierarchy:
    """Where our cgroups are made: a base directory per controller, and what an instance's view mounts."""

    version: int
    bases: dict[str, Path]
    view: tuple[_Mount, ...]

    def describe(self) -> str:
        controllers = ", ".join(sorted(self.bases))
        return f"cgroup v{self.version} ({controllers}) under {self.bases['memory']}"

    def owns(self, path: Path) -> bool:
        return any(path.is_relative_to(base) and path != base for base in self.bases.values())

    def create(self, group: str, name: str, limits: Limits, *, oom_group: bool) -> Cgroup:
        """``<base>/<group>/<name>`` with ``limits`` written. OSError when the kernel refuses."""
        dirs: dict[str, Path] = {}
        made: list[Path] = []
        try:
            for controller, base in self.bases.items():
                parent = base / group
                leaf = parent / name
                if leaf in made:
                    dirs[controller] = leaf
                    continue
                if not parent.is_dir():
                    with contextlib.suppress(FileExistsError):
                        parent.mkdir()
                    if self.version == 2:
                        _enable(parent, list(self.bases))
                leaf.mkdir()
                made.append(leaf)
                dirs[controller] = leaf
            cgroup = Cgroup(self.version, dirs)
            self._limit(cgroup, limits, oom_group=oom_group)
        except OSError:
            for leaf in made:
                with contextlib.suppress(OSError):
                    leaf.rmdir()
            raise
        return cgroup

    def _limit(self, cgroup: Cgroup, limits: Limits, *, oom_group: bool) -> None:
        memory, cpu, pids = cgroup.dirs.get("memory"), cgroup.dirs.get("cpu"), cgroup.dirs.get("pids")
        quota = None if limits.cpus is None else max(1000, round(limits.cpus * _CPU_PERIOD))
        if self.version == 2:
            assert memory is not None
            if limits.memory_mb is not None:
                _write(memory / "memory.max", str(limits.memory_mb * 2**20))
                if (memory / "memory.swap.max").exists():
                    _write(memory / "memory.swap.max", "0")  # over the limit means the OOM killer
            if oom_group and (memory / "memory.oom.group").exists():
                _write(memory / "memory.oom.group", "1")  # the instance dies whole, not a random part
            if cpu is not None and quota is not None:
                _write(cpu / "cpu.max", f"{quota} {_CPU_PERIOD}")
        else:
            if memory is not None and limits.memory_mb is not None:
                _write(memory / "memory.limit_in_bytes", str(limits.memory_mb * 2**20))
                if (memory / "memory.memsw.limit_in_bytes").exists():
                    _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_mb * 2**20))
            if cpu is not None and quota is not None:
                _write(cpu / "cpu.cfs_period_us", str(_CPU_PERIOD))
                _write(cpu / "cpu.cfs_quota_us", str(quota))
        if pids is not None and limits.pids is not None:
            _write(pids / "pids.max", str(limits.pids))


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _enable(directory: Path, controllers: Sequence[str]) -> None:
    """cgroup v2: hand ``controllers`` down to ``directory``'s children, one at a time (one the kernel
    refuses must not cost the others; the caller checks what it got)."""
    present = set((directory / "cgroup.subtree_control").read_text().split())
    for controller in controllers:
        if controller not in present:
            with contextlib.suppress(OSError):
                _write(directory / "cgroup.subtree_control", f"+{controller}")


def _mounts() -> list[_Mount]:
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        options = ",".join(o for o in tail[2].split(",") if o not in ("rw", "ro"))
        found.append(_Mount(Path(point), tail[0], fields[3], options))
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller, and ``""`` -> its v2 cgroup."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def _inside(mount: _Mount, path: str) -> Path | None:
    """The directory of cgroup ``path`` in ``mount`` (None when the mount does not show it)."""
    root = mount.root.rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        return None
    return mount.point / path[len(root) :].lstrip("/")


def _find_hierarchy(settings: IsolationSettings) -> tuple[_Hierarchy | None, str]:
    """Our cgroup tree on this host (v2 first), or None and why not."""
    mounts = _mounts()
    for mount in mounts:
        if mount.fstype == "cgroup2":
            try:
                available = set((mount.point / "cgroup.controllers").read_text().split())
            except OSError:
                continue
            if "memory" in available:  # else a hybrid host's empty unified hierarchy: v1 below
                return _v2(mount, available, settings)
    return _v1(mounts, _own_cgroups())


def _v2(mount: _Mount, available: set[str], settings: IsolationSettings) -> tuple[_Hierarchy | None, str]:
    wanted = [c for c in ("memory", "cpu", "pids") if c in available]
    base = settings.cgroup_root or mount.point / "fastapi-deploy"
    try:
        if settings.cgroup_root is None:
            _enable(mount.point, wanted)  # a delegated root is enabled by whoever delegated it
        base.mkdir(exist_ok=True)
        _enable(base, wanted)
        enabled = set((base / "cgroup.subtree_control").read_text().split())
    except OSError as exc:
        return None, f"cgroup v2 is not writable here ({exc.strerror or exc})"
    if "memory" not in enabled:
        return None, f"the memory controller cannot be enabled under {base}"
    return _Hierarchy(2, {c: base for c in wanted if c in enabled}, (mount,)), ""


def _v1(mounts: list[_Mount], own: dict[str, str]) -> tuple[_Hierarchy | None, str]:
    bases: dict[str, Path] = {}
    view: list[_Mount] = []
    for controller in ("memory", "cpu", "pids"):
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options.split(",")), None)
        where = None if mount is None else _inside(mount, own.get(controller, "/"))
        if mount is None or where is None:
            continue
        try:
            base = where / "fastapi-deploy"  # under the server's own cgroup: its limits hold for all
            base.mkdir(exist_ok=True)
            if not os.access(base, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as exc:
            if controller == "memory":
                return None, f"the cgroup v1 memory hierarchy is not writable here ({exc.strerror or exc})"
            continue
        bases[controller] = base
        if mount not in view:
            view.append(mount)
    if "memory" not in bases:
        return None, "no cgroup memory controller is mounted"
    return _Hierarchy(1, bases, tuple(view)), ""


# -- in the child, before exec ------------------------------------------------------------------------


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare.argtypes = [ctypes.c_int]
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    except (OSError, AttributeError):
        return None
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _enter_view(libc: ctypes.CDLL, mounts: tuple[_Mount, ...]) -> None:
    """A mount and cgroup namespace of its own in which ``mounts`` show this process's cgroup as the
    root (read-only), as a container sees its own: ``/sys/fs/cgroup/memory.max`` is its limit."""
    _check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWCGROUP), "unshare")
    # Slave, recursively: the host's mounts still reach us, nothing mounted here reaches the host.
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_SLAVE, None), "mount --make-rslave /")
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    for mount in mounts:
        point, fstype = os.fsencode(mount.point), mount.fstype.encode()
        # The same superblock cannot be mounted on itself: detach the host's view first.
        _check(libc.umount2(point, _MNT_DETACH), f"umount {mount.point}")
        data = mount.options.encode() if mount.fstype == "cgroup" else None
        _check(libc.mount(fstype, point, fstype, flags, data), f"mount {mount.point}")


@dataclass(frozen=True)
class _Preexec:
    """Everything the child does between fork and exec, computed beforehand in the parent."""

    procs: tuple[str, ...]
    view: tuple[_Mount, ...]
    rlimits: tuple[tuple[int, int, int], ...]
    user: AppUser | None
    umask: int
    nice: int
    cores: frozenset[int] | None
    libc: ctypes.CDLL | None

    def __call__(self) -> None:
        pid = str(os.getpid())
        for procs in self.procs:  # first: everything from here on is accounted to its cgroup
            _write(Path(procs), pid)
        if self.view and self.libc is not None:
            _enter_view(self.libc, self.view)
        for limit, soft, hard in self.rlimits:
            resource.setrlimit(limit, (soft, hard))
        if self.nice:
            os.nice(self.nice)
        if self.cores:
            os.sched_setaffinity(0, self.cores)
        if self.user is not None:
            os.setgroups([])
            os.setresgid(self.user.gid, self.user.gid, self.user.gid)
            os.setresuid(self.user.uid, self.user.uid, self.user.uid)
        if self.libc is not None:  # no setuid binary (sudo, su) gives anything back
            _check(self.libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.umask(self.umask)


# -- the confinement ----------------------------------------------------------------------------------


class Confinement:
    """What this host allows, decided once; makes app users, grants files, makes cgroups. Thread-safe.

    ``data_dir``: the platform's data directory. With it, a deployment's whole folder
    (``deployments/<id>``) is given to its app, builds keep a uv cache per app under ``users/``, and
    :meth:`secure_data_dir` closes the rest to app users.
    """

    def __init__(self, settings: IsolationSettings | None = None, *, data_dir: Path | None = None) -> None:
        self.settings = settings or IsolationSettings()
        self.data_dir = data_dir
        self.enabled = self.settings.mode != "off"
        self._lock = threading.Lock()
        self._said: set[str] = set()
        self._users: dict[str, AppUser] = {}
        self._libc = _libc() if self.enabled else None
        self.users = self.enabled and os.geteuid() == 0 and shutil.which("useradd") is not None
        """App users of their own are possible (root, useradd)."""
        self.hierarchy: _Hierarchy | None = None
        self._no_cgroups = ""
        if self.enabled:
            self.hierarchy, self._no_cgroups = _find_hierarchy(self.settings)
        self.view = bool(self.hierarchy and self.hierarchy.view and os.geteuid() == 0 and self._probe_view())
        """Instances see their own cgroup at ``/sys/fs/cgroup`` (needs root: namespaces)."""

    # -- what there is --------------------------------------------------------------------------------

    def describe(self) -> str:
        """One line for the log: how instances and builds are confined here."""
        if not self.enabled:
            return "Isolation is off: apps and builds run as the server's user, without limits"
        s = self.settings
        if self.users:
            who = f"as users of their own (fdp-*, uids {s.uid_min}-{s.uid_max})"
        elif os.geteuid() == 0:
            who = "as the server's user (root: useradd is missing, no users of their own)"
        else:
            who = f"as the server's user (uid {os.geteuid()}: not root, no users of their own)"
        limits = (
            self.hierarchy.describe() + (", own cgroup view" if self.view else "")
            if self.hierarchy is not None
            else f"rlimits only ({self._no_cgroups}: memory as RLIMIT_DATA, no CPU limit)"
        )
        return f"Isolation: apps and builds run {who}; limits by {limits}"

    def notice(self, key: str, message: str, level: int = logging.WARNING) -> None:
        """Log ``message`` once per ``key`` for the life of this object."""
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        log.log(level, "%s", message)

    # -- per deployment -------------------------------------------------------------------------------

    def prepare(
        self,
        app_id: str,
        *,
        run: Sequence[Path] = (),
        read: Sequence[Path] = (),
        search: Sequence[Path] = (),
        tree: Sequence[Path] = (),
        writable: Path | None = None,
        writable_tree: bool = False,
        error: type[RuntimeFailure] = DeployError,
    ) -> AppUser | None:
        """The user ``app_id``'s processes run as, with ``tree`` given to its group, or None: they run as the
        server's user (said once in the log).

        Every user must be able to execute ``run`` (the interpreter, uv), read ``read`` (the launcher) and
        pass through ``search`` (where a build writes). In ``tree`` the group may read; ``writable`` is
        group-writable and sticky (files can be added, the server's not replaced), or with
        ``writable_tree`` writable throughout (a build of the app's own local packages writes there).
        Raises ``error`` in mode ``require`` when the app cannot have a user of its own, and whenever
        its files cannot be given to it.
        """
        if not self.enabled:
            return None
        if not self.users:
            self._fallback("not-root", self.describe(), error)
            return None
        self.notice("describe", self.describe(), logging.INFO)
        roots = self._roots(tree)
        needs = [(p, "run") for p in run] + [(p, "read") for p in read] + [(p, "search") for p in search]
        needs += [(root.parent, "search") for root in roots]
        for path, need in needs:
            why = _unreachable(path, need)
            if why is not None:
                message = (
                    f"Isolation: apps that need {path} run as the server's user: {why}. Put what apps run "
                    "where every user can read it (e.g. FASTAPI_DEPLOY_APP_PYTHON=/usr/bin/python3)"
                )
                self._fallback(f"unreachable:{path}", message, error)
                return None
        try:
            user = self.user_for(app_id)
        except OSError as exc:  # no useradd, a read-only /etc, a foreign user of that name
            self._fallback(f"user:{exc.errno}", f"Isolation: apps run as the server's user: {exc}", error)
            return None
        try:
            for root in roots:
                _grant(root, user, writable=writable, writable_tree=writable_tree)
        except OSError as exc:
            raise error(
                f"The files of this deployment could not be given to its user: {exc}.",
                hint="Ask the platform operator (the server must run as root to isolate apps).",
            ) from exc
        return user

    def _fallback(self, key: str, message: str, error: type[RuntimeFailure]) -> None:
        if self.settings.mode == "require":
            raise error(
                message.removeprefix("Isolation: ") + ".",
                title="Isolation unavailable",
                hint="Ask the platform operator: isolation is required (FASTAPI_DEPLOY_ISOLATION=require).",
            )
        self.notice(key, message)

    def _roots(self, paths: Sequence[Path]) -> list[Path]:
        """The folders to give: a deployment's whole folder when the data directory is known, else each
        path; none inside another."""
        roots: set[Path] = set()
        deployments = None if self.data_dir is None else (self.data_dir / "deployments").resolve()
        for path in paths:
            path = path.resolve()
            if deployments is not None and path.is_relative_to(deployments) and path != deployments:
                path = deployments / path.relative_to(deployments).parts[0]
            roots.add(path)
        return sorted(r for r in roots if not any(r != o and r.is_relative_to(o) for o in roots))

    def user_for(self, app_id: str) -> AppUser:
        """The app's system user, created on first use (``useradd --system``, its own group, no home,
        no login shell, uid and gid from the range). OSError when it cannot be created, or when a user
        of that name exists outside the range (it is not ours)."""
        name = app_user_name(app_id)
        with self._lock:
            known = self._users.get(name)
            if known is not None:
                return known
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                entry = self._useradd(name, app_id)
            s = self.settings
            if not (s.uid_min <= entry.pw_uid <= s.uid_max and s.uid_min <= entry.pw_gid <= s.uid_max):
                raise PermissionError(
                    errno.EPERM,
                    f"user {name} exists with uid {entry.pw_uid}, outside {s.uid_min}-{s.uid_max}",
                )
            user = AppUser(name, entry.pw_uid, entry.pw_gid)
            self._users[name] = user
            return user

    def _useradd(self, name: str, app_id: str) -> pwd.struct_passwd:
        s = self.settings
        ranges = [f"{k}={v}" for k, v in (("SYS_UID_MIN", s.uid_min), ("SYS_UID_MAX", s.uid_max))]
        ranges += [f"{k}={v}" for k, v in (("SYS_GID_MIN", s.uid_min), ("SYS_GID_MAX", s.uid_max))]
        cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--no-log-init"]
        cmd += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
        cmd += [
            "--comment",
            f"fastapi-deploy app {app_id}"[:200],
            *[a for r in ranges for a in ("-K", r)],
            name,
        ]
        for attempt in range(20):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
            if done.returncode == 0 or (done.returncode == 9 and _exists(name)):  # 9: someone else made it
                log.info("created user %s for app %s", name, app_id)
                return pwd.getpwnam(name)
            if done.returncode != _USERADD_LOCKED:
                raise OSError(errno.EPERM, f"useradd {name} failed: {done.stderr.strip()}")
            time.sleep(0.05 * (attempt + 1))  # another useradd holds /etc/passwd's lock
        raise OSError(errno.EBUSY, f"useradd {name}: /etc/passwd stayed locked")

    # -- per process ----------------------------------------------------------------------------------

    def cgroup(self, app_id: str, name: str, limits: Limits, *, oom_group: bool = True) -> Cgroup | None:
        """A new cgroup ``<app user name>/<name>`` with ``limits``, or None (no cgroups here, or this one
        failed: said once in the log, and rlimits stand in)."""
        if self.hierarchy is None:
            if self.users:  # a root server without cgroups is worth a word; a user's says so at once
                self.notice("no-cgroups", f"Isolation: {self._no_cgroups}; limits are rlimits only")
            return None
        try:
            return self.hierarchy.create(app_user_name(app_id), name, limits, oom_group=oom_group)
        except OSError as exc:
            self.notice(f"cgroup:{exc.errno}", f"Isolation: a cgroup could not be made ({exc}); rlimits only")
            return None

    def forget(self, paths: Sequence[str]) -> None:
        """Kill what runs in cgroups a previous run recorded and remove them (only ours: under a base)."""
        if self.hierarchy is None:
            return
        dirs = {str(i): Path(p) for i, p in enumerate(paths) if self.hierarchy.owns(Path(p))}
        if dirs:
            Cgroup(self.hierarchy.version, dirs).dispose()

    def sweep(self, *, older_than: float = 600.0) -> int:
        """Remove app cgroups that have been empty and unchanged for ``older_than`` seconds (longer than
        any start waits: a new instance's cgroup is empty until its process joins); what control planes
        killed without a restart on their data directory left. Returns how many directories went."""
        if self.hierarchy is None:
            return 0
        removed = 0
        now = time.time()
        for base in set(self.hierarchy.bases.values()):
            for leaf in base.glob("fdp-*/*"):
                with contextlib.suppress(OSError):  # a file, or gone, or busy after all
                    if leaf.is_dir() and now - leaf.stat().st_mtime > older_than:
                        if not (leaf / "cgroup.procs").read_text().strip():
                            leaf.rmdir()
                            removed += 1
        return removed

    def preexec(
        self, user: AppUser | None, cgroup: Cgroup | None, limits: Limits, *, build: bool = False
    ) -> Callable[[], None] | None:
        """The function a child runs before ``exec`` (``preexec_fn``), or None when isolation is off.

        Builds get no cgroup view, ``nice 10`` and, without a CPU quota, are pinned to as many cores as
        they may use; files they create are world-readable (the environment is shared), an instance's
        private to its user (umask 077).
        """
        if not self.enabled:
            return None
        rlimits: list[tuple[int, int, int]] = [(resource.RLIMIT_CORE, 0, 0)]
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = self.settings.nofile if hard == resource.RLIM_INFINITY else min(self.settings.nofile, hard)
        rlimits.append((resource.RLIMIT_NOFILE, nofile, nofile))
        if user is not None:  # counted per user: with the server's own, it would count the server too
            rlimits.append((resource.RLIMIT_NPROC, self.settings.nproc, self.settings.nproc))
        if limits.memory_mb is not None and (cgroup is None or "memory" not in cgroup.dirs):
            data = 2 * limits.memory_mb * 2**20  # virtual: thread stacks and arenas are reserved early
            rlimits.append((resource.RLIMIT_DATA, data, data))
        cores = None
        if build and limits.cpus and (cgroup is None or "cpu" not in cgroup.dirs):
            cores = _cores(limits.cpus)
        return _Preexec(
            procs=tuple(str(p / "cgroup.procs") for p in cgroup.paths) if cgroup is not None else (),
            view=self.hierarchy.view if (self.hierarchy and self.view and cgroup and not build) else (),
            rlimits=tuple(rlimits),
            user=user,
            umask=0o022 if build else 0o077,
            nice=10 if build else 0,
            cores=cores,
            libc=self._libc,
        )

    # -- the data directory ---------------------------------------------------------------------------

    def secure_data_dir(self) -> None:
        """Close the data directory to app users: itself and the folders instances pass through 0711
        (no listing), every other folder 0700, every file at its top (the database and its WAL, the
        secret key) 0600, and each deployment folder not yet given to an app 0700. Idempotent; call it
        at every start, after the database exists."""
        data = self.data_dir
        if data is None or not self.enabled or not data.is_dir():
            return
        data.chmod(0o711)
        for entry in data.iterdir():
            st = entry.lstat()
            if stat.S_ISDIR(st.st_mode):
                entry.chmod(0o711 if entry.name in _TRAVERSE_ONLY else 0o700)
            elif stat.S_ISREG(st.st_mode):
                entry.chmod(st.st_mode & 0o700)
        deployments = data / "deployments"
        if deployments.is_dir():
            for entry in deployments.iterdir():
                st = entry.lstat()
                if stat.S_ISDIR(st.st_mode) and st.st_gid == os.getegid():  # not given to an app's group
                    entry.chmod(0o700)

    def home(self, user: AppUser) -> Path | None:
        """The app's own folder for builds (``data/users/<name>``: uv's cache), owned by it; None without a
        data directory."""
        if self.data_dir is None:
            return None
        users = self.data_dir / "users"
        users.mkdir(mode=0o711, exist_ok=True)
        home = users / user.name
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, user.uid, user.gid, follow_symlinks=False)
        return home

    def _probe_view(self) -> bool:
        """Whether an own cgroup view can be set up here: try it once in a throwaway child."""
        assert self.hierarchy is not None
        true = shutil.which("true")
        if self._libc is None or true is None:
            return False
        view, libc = self.hierarchy.view, self._libc
        try:
            done = subprocess.run([true], preexec_fn=lambda: _enter_view(libc, view), timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("instances will not see their own cgroup at /sys/fs/cgroup: %s", exc)
            return False
        return done.returncode == 0


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _cores(cpus: float) -> frozenset[int] | None:
    available = sorted(os.sched_getaffinity(0))
    wanted = max(1, -int(-cpus // 1))
    return frozenset(available[-wanted:]) if wanted < len(available) else None


def _unreachable(path: Path, need: str) -> str | None:
    """Why a user with no relation to the owners cannot ``need`` (``run``, ``read``, ``search``) ``path``,
    or None: every directory on the way (before and after symlinks) searchable by others, the target
    executable and readable (``run``; the interpreter's ``lib`` beside its ``bin`` readable too),
    readable, or searchable. ACLs are not looked at."""
    try:
        real = path.resolve(strict=True)
        target = real.stat()
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    for chain in (path.parents, real.parents):
        for directory in chain:
            try:
                mode = directory.stat().st_mode
            except OSError:
                continue
            if not mode & stat.S_IXOTH:
                return f"{directory} is not searchable by other users (mode {stat.filemode(mode)})"
    bits = {"run": stat.S_IROTH | stat.S_IXOTH, "read": stat.S_IROTH, "search": stat.S_IXOTH}[need]
    if target.st_mode & bits != bits:
        return f"{real} cannot be used by other users (mode {stat.filemode(target.st_mode)})"
    if need == "run":
        library = real.parent.parent / "lib"  # an interpreter's standard library, beside its bin/
        with contextlib.suppress(OSError):
            if library.stat().st_mode & 0o005 != 0o005:
                return f"{library} is not readable by other users"
    return None


def _grant(root: Path, user: AppUser, *, writable: Path | None, writable_tree: bool) -> None:
    """Give ``root``'s tree to ``user``'s group and take it from everyone else. Owners stay (what the app
    wrote stays its own); the group may read; ``writable`` is group-writable and sticky (new files yes,
    replacing the server's no), or with ``writable_tree`` writable with all below it. Symlinks are never
    followed and only opened descriptors are changed: the app cannot redirect this mid-walk."""
    scratch = None if writable is None else os.path.normpath(writable.resolve())
    for dirpath, _dirs, files, dirfd in os.fwalk(root, follow_symlinks=False):
        here = os.path.normpath(dirpath)
        inside = scratch is not None and (here == scratch or here.startswith(scratch + os.sep))
        write = inside and writable_tree
        st = os.fstat(dirfd)
        mode = (st.st_mode & 0o700) | (0o070 if write else 0o050)
        if here == scratch and not writable_tree:
            mode |= 0o070 | stat.S_ISVTX
        os.fchown(dirfd, -1, user.gid)
        os.fchmod(dirfd, mode)
        for name in files:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
            except OSError:
                continue  # a symlink (ELOOP), a socket: nothing to give
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    group = (0o060 if write else 0o040) | (0o010 if st.st_mode & 0o100 else 0)
                    os.fchown(fd, -1, user.gid)
                    os.fchmod(fd, (st.st_mode & 0o700) | group)
            finally:
                os.close(fd)


def seal(root: Path) -> None:
    """Make a tree a build wrote shared and read-only: owned by the server's user, world-readable, no
    write for anyone else, no setuid; sockets and FIFOs removed. Never follows symlinks."""
    uid, gid = os.geteuid(), os.getegid()
    for _dirpath, dirs, files, dirfd in os.fwalk(root, follow_symlinks=False):
        os.fchown(dirfd, uid, gid)
        os.fchmod(dirfd, 0o755)
        for name in [*dirs, *files]:  # fwalk lists links to directories (lib64) as directories
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                continue  # walked into: sealed as the walk's own directory
            if stat.S_ISLNK(st.st_mode):
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
                continue
            if not stat.S_ISREG(st.st_mode):
                os.unlink(name, dir_fd=dirfd)
                continue
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, 0o755 if os.fstat(fd).st_mode & 0o100 else 0o644)
            finally:
                os.close(fd)


# -- builds -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfinement:
    """How the builds of one app are confined: passed to :func:`runtime.builder.build_environment`."""

    confinement: Confinement
    app_id: str
    limits: Limits = Limits(memory_mb=4096, cpus=1.0)
    """A build's memory and cores (the time limit is the build's timeout); pids default to four times
    an instance's."""


@dataclass
class BuildJail:
    """One build's confinement while it runs: its user, cgroup, HOME and uv cache, the child's preexec."""

    user: AppUser | None
    cgroup: Cgroup | None
    limits: Limits
    home: Path
    """A HOME of the build's own (removed afterwards)."""
    cache: Path | None
    """uv's cache for this app's builds (None: the server's, for a build as the server's user)."""
    preexec: Callable[[], None] | None

    def out_of_memory(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_kills() > 0


@contextlib.contextmanager
def build_jail(
    confine: BuildConfinement, *, run: Sequence[Path], source: Path, staging: Path
) -> Iterator[BuildJail]:
    """Confine one build: the app's user (``source`` given to it, writable: local packages are built in
    place), ``staging`` handed to it, the build's cgroup; afterwards kill what the build left running
    (daemons too, with a cgroup) and remove its HOME.

    Raises BuildError in mode ``require`` when the build cannot run as the app's user.
    """
    c = confine.confinement
    limits = confine.limits
    if limits.pids is None:
        limits = Limits(limits.memory_mb, limits.cpus, 4 * c.settings.pids_max)
    user = c.prepare(
        confine.app_id,
        run=run,
        search=[staging.parent],
        tree=[source],
        writable=source,
        writable_tree=True,
        error=BuildError,
    )
    cgroup = c.cgroup(confine.app_id, f"build-{secrets.token_hex(6)}", limits) if c.enabled else None
    home_root = c.home(user) if user is not None else None
    if user is not None and home_root is None:
        c.notice("no-build-cache", "Isolation: builds have no uv cache of their own (no data directory)")
    home = Path(tempfile.mkdtemp(prefix="build-home-", dir=home_root))
    cache = None
    try:
        if user is not None:
            os.chown(home, user.uid, user.gid)
            cache = (home_root or home) / "cache" / "uv"
            for directory in (cache.parent, cache):
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o700)
                os.chown(directory, user.uid, user.gid, follow_symlinks=False)
            os.chown(staging, user.uid, user.gid)
        jail = BuildJail(user, cgroup, limits, home, cache, c.preexec(user, cgroup, limits, build=True))
        yield jail
    finally:
        if cgroup is not None:
            cgroup.dispose()
        shutil.rmtree(home, ignore_errors=True)
