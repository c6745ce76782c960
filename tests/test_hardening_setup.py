"""``scripts/setup`` on a machine like a fresh Debian: in a throwaway copy of the project, with a PATH
that has no uv, a HOME of its own, and the system's externally managed Python (PEP 668) or a Python
without pip. Each run must leave a working ``.venv`` and print nothing; a second run changes nothing.

The copy is made from ``git ls-files`` (tracked and untracked files, not what .gitignore excludes), so
this checkout's ``.venv`` is never touched. uv's cache is shared with this machine's, and the network
settings (CA bundles, proxies, pip's) are passed through: the runs install from the package index.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, copy_checkout

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SYSTEM_PYTHON = Path("/usr/bin/python3")
PATH = "/usr/bin:/bin"  # no uv here: it lives in virtualenvs and version managers
NETWORK = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "PIP_INDEX_URL",
    "PIP_FIND_LINKS",
)
NO_PIP = """#!/bin/sh
# A Python without pip (as Debian's python3 without python3-pip).
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$0: No module named pip" >&2; exit 1; fi
exec {python} "$@"
"""
RECORDING = """#!/bin/sh
echo "$*" >> {log}
exec {target} "$@"
"""


def uv_cache() -> str:
    out = subprocess.run([str(VENV_BIN / "uv"), "cache", "dir"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project, without .venv, data or caches."""
    dest = copy_checkout(tmp_path / "project")
    assert not (dest / ".venv").exists()
    return dest


def run_setup(project: Path, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k in NETWORK or k.lower().endswith("_proxy")}
    base.update(PATH=PATH, HOME=str(home), LANG="C.UTF-8", UV_CACHE_DIR=uv_cache())
    base.update(env)
    return subprocess.run(
        ["bash", "scripts/setup"], cwd=project, env=base, capture_output=True, text=True, timeout=500
    )


def assert_installed(project: Path) -> None:
    result = subprocess.run(
        [str(project / ".venv/bin/fastapi-deploy"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "push" in result.stdout, result.stderr
    check = [str(project / ".venv/bin/python"), "-c", "import control_plane, runtime, cli, psycopg"]
    assert subprocess.run(check, cwd="/").returncode == 0


def assert_second_run_changes_nothing(project: Path, home: Path, **env: str) -> None:
    before = (project / ".venv/bin/python").lstat().st_mtime_ns
    again = run_setup(project, home, **env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == again.stderr == ""
    assert (project / ".venv/bin/python").lstat().st_mtime_ns == before


def test_externally_managed_system_python_without_uv(project: Path, tmp_path: Path) -> None:
    # The machine's own python3 is what a fresh Debian has: pip refuses `--user` installs (PEP 668).
    assert SYSTEM_PYTHON.is_file(), "this test needs a system Python at /usr/bin/python3"
    marker = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert (Path(marker) / "EXTERNALLY-MANAGED").is_file(), f"{SYSTEM_PYTHON} is not externally managed"
    home = tmp_path / "home"
    home.mkdir()

    result = run_setup(project, home)

    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    assert (home / ".local/bin/uv").is_file()  # pip --user --break-system-packages, into this HOME only
    assert_installed(project)
    assert_second_run_changes_nothing(project, home)


def test_python_without_pip_gets_uv_from_a_venv(project: Path, tmp_path: Path) -> None:
    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    shim.write_text(NO_PIP.format(python=SYSTEM_PYTHON))
    shim.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()

    result = run_setup(project, home, PYTHON=str(shim))

    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""
    assert not (home / ".local").exists()
    assert (project / ".venv/bin/uv").is_file()
    assert_installed(project)
    assert_second_run_changes_nothing(project, home, PYTHON=str(shim))


def test_uv_on_path_is_used_and_pip_is_not(project: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("uv", VENV_BIN / "uv"), ("python3", SYSTEM_PYTHON)):
        (bin_dir / name).write_text(RECORDING.format(log=log, target=target))
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()

    result = run_setup(project, home, PATH=f"{bin_dir}:{PATH}")

    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("pip install") for c in calls), calls  # uv pip install, through our uv
    assert not [c for c in calls if c.startswith("-m pip")], calls
    assert not (home / ".local").exists()
    assert_installed(project)
