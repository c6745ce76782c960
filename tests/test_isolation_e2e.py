"""Process isolation through the whole platform: a real server (as root, like CI) with an interpreter
every user can run, two apps pushed with the real CLI. Each runs as its own user and cannot read the
platform's secrets, its database or the other app's code (docs/ISOLATION.md)."""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, make_server
from tests.test_e2e import push

pytestmark = pytest.mark.e2e

PROBE = """
import os
from pathlib import Path
from fastapi import FastAPI

app = FastAPI()


def attempt(action):
    try:
        action()
    except OSError as exc:
        return type(exc).__name__
    return "allowed"


@app.get("/")
def probe(other: str = "") -> dict[str, object]:
    DATA = Path(os.environ.get("PROBE_DATA_DIR", "/nonexistent"))
    return {
        "uid": os.getuid(),
        "secret_key": attempt(lambda: (DATA / "secret.key").read_bytes()),
        "database": attempt(lambda: (DATA / "fastapi-deploy.db").read_bytes()),
        "other_app": attempt(lambda: list((DATA / "deployments" / other).iterdir())) if other else None,
        "own_workdir": attempt(lambda: Path("scratch.txt").write_text("mine")),
    }
"""


@pytest.fixture
def root_server() -> Iterator[Server]:
    if os.geteuid() != 0:
        pytest.fail(
            "this test needs root, as CI has (the non-root fallback is tests/test_process_isolation.py's)"
        )
    if not Path("/usr/bin/python3").exists():
        pytest.fail("Debian's /usr/bin/python3 is expected on these machines")
    # Under /tmp (1777), not pytest's 0700 tmp: app users must be able to reach their folders.
    base = Path(tempfile.mkdtemp(prefix="fdp-iso-", dir="/tmp"))
    base.chmod(0o755)
    srv = make_server(base, FASTAPI_DEPLOY_APP_PYTHON="/usr/bin/python3", FASTAPI_DEPLOY_ISOLATION="require")
    srv.start()
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_apps_run_as_their_own_users_and_cannot_read_the_platform(
    root_server: Server, tmp_path: Path
) -> None:
    srv = root_server
    data = str(srv.data_dir.resolve())
    ids = {}
    for name in ("iso-a", "iso-b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "main.py").write_text(textwrap.dedent(PROBE))
        out = push(srv, folder, name)
        srv.cli("env", "set", name, f"PROBE_DATA_DIR={data}")
        ids[name] = out["deployment_id"]
    with srv.api() as api:
        current = {a["slug"]: a for a in api.get("/apps/").json()["data"]}
    b_deployment = current["iso-b"].get("current_deployment_id") or ids["iso-b"]
    answer = srv.get("iso-a", f"/?other={b_deployment}").json()
    assert answer["uid"] >= 200_000, answer  # its own user, not root
    assert answer["secret_key"] == "PermissionError"
    assert answer["database"] == "PermissionError"
    assert answer["other_app"] == "PermissionError"
    assert answer["own_workdir"] == "allowed"  # its working directory is its own to write
    other = srv.get("iso-b", "/").json()
    assert other["uid"] >= 200_000 and other["uid"] != answer["uid"]  # one user per app
