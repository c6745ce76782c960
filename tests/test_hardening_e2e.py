"""End to end, on a server of its own: started without ``FASTAPI_DEPLOY_ADMIN_TOKEN`` (the token it
generates is printed once), with a small upload limit and ``FASTAPI_DEPLOY_KEEP_DEPLOYMENTS=1``.

An upload that is actually over the limit (whatever size it declared, sent chunked) is cut off with a
413 and ends ``extracting_failed_archive_too_large`` while the previous revision keeps serving; older
builds are pruned after a push and rolling back to one is refused with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Server, make_server, wait_until
from tests.test_e2e import build_log, copy_example, push, write_version

pytestmark = pytest.mark.e2e

LIMIT = 300_000
TOKEN_LINE = re.compile(r"Admin token \(shown once, stored hashed; user (\S+)\):\n\s+(\S+)\n")


def printed_tokens(server: Server) -> list[tuple[str, str]]:
    return TOKEN_LINE.findall(server.log_path.read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hardening")
    srv = make_server(tmp, FASTAPI_DEPLOY_MAX_ARCHIVE_BYTES=str(LIMIT), FASTAPI_DEPLOY_KEEP_DEPLOYMENTS="1")
    del srv.env["FASTAPI_DEPLOY_ADMIN_TOKEN"]
    srv.admin_token = ""
    srv.start()
    try:
        tokens = wait_until(lambda: printed_tokens(srv), 10, what="the admin token in the server's output")
        srv.admin_token = tokens[0][1]
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        yield srv
    finally:
        srv.stop()
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / f"server-{tmp.name}.log").write_text(srv.log_path.read_text(errors="replace"))


def test_generated_admin_token_is_printed_once(server: Server) -> None:
    assert printed_tokens(server) == [("admin@localhost", server.admin_token)]
    with server.api() as api:
        me = api.get("/users/me").json()
    assert me["email"] == "admin@localhost" and me["is_admin"] is True
    # Stored hashed: the database never holds the token itself.
    db = b"".join(p.read_bytes() for p in server.data_dir.glob("fastapi-deploy.db*"))
    assert server.admin_token.encode() not in db
    # A restart prints no token (there is none to print: only its hash is kept), and the old one works.
    server.stop()
    server.start()
    wait_until(lambda: server.log_path.read_text().count("fastapi-deploy is running") == 2, 10, what="banner")
    assert printed_tokens(server) == [("admin@localhost", server.admin_token)]
    assert server.log_path.read_text().count(server.admin_token) == 1
    with server.api() as api:
        assert api.get("/users/me").status_code == 200


def chunked_form(fields: dict[str, str], size: int) -> Iterator[bytes]:
    """A storage form with a ``size``-byte file, sent without Content-Length."""
    for name, value in fields.items():
        yield f'--fdp\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    yield b'--fdp\r\nContent-Disposition: form-data; name="file"; filename="archive.tar"\r\n\r\n'
    for _ in range(size // 65536):
        yield b"\x28" * 65536
    yield b"\r\n--fdp--\r\n"


def test_actually_oversize_upload_fails_and_the_app_keeps_serving(server: Server, tmp_path: Path) -> None:
    project = copy_example("hello", tmp_path, "big")
    write_version(project, "small")
    before = push(server, project, "big")
    with server.api() as api:
        # The client declares a size under the limit, then sends 30 times the limit.
        dep = api.post(f"/apps/{before['app_id']}/deployments/", json={"archive_size_bytes": 1000}).json()
        target = api.post(f"/deployments/{dep['id']}/upload").json()
        r = httpx.post(
            target["url"],
            content=chunked_form(target["fields"], 30 * LIMIT),
            headers={"Content-Type": "multipart/form-data; boundary=fdp"},
            timeout=30,
        )
        assert "content-length" not in r.request.headers
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["title"] == "Upload too large"
        assert "exceeds the maximum allowed size (0.3 MB)" in error["message"]
        assert ".fastapicloudignore" in error["hint"]

        failed: dict[str, Any] = api.get(f"/deployments/{dep['id']}").json()
        assert failed["status"] == "extracting_failed_archive_too_large"
        assert failed["failure"]["error_message"] == error["message"]
        assert failed["failure"]["error_hint"] == error["hint"]
        assert error["message"] in build_log(server, dep["id"])
        assert not (server.data_dir / "deployments" / dep["id"]).exists()  # nothing of it was kept
        assert api.post(f"/deployments/{dep['id']}/upload-complete").status_code == 409
        app = api.get(f"/apps/{before['app_id']}").json()
    assert app["current_deployment_id"] == before["deployment_id"]
    r = server.get("big")
    assert r.status_code == 200 and r.json() == {"version": "small"}


def test_old_builds_are_pruned_and_cannot_be_rolled_back_to(server: Server, tmp_path: Path) -> None:
    project = copy_example("hello", tmp_path, "kept")
    pushed = []
    for version in ("one", "two", "three"):
        write_version(project, version)
        pushed.append(push(server, project, "kept"))
    one, two, three = (p["deployment_id"] for p in pushed)
    deployments = {d["id"]: d for d in server.cli_json("deployments", "kept")}
    # Kept: what serves (three) and keep_deployments=1 more for rollback (two); one was pruned.
    assert [deployments[d]["artifact_pruned"] for d in (one, two, three)] == [True, False, False]
    assert not (server.data_dir / "deployments" / one).exists()
    assert (server.data_dir / "deployments" / two / "src").is_dir()

    result = server.cli("rollback", "kept", one, check=False)
    assert result.returncode == 1
    assert "Build no longer kept" in result.stderr and "only the newest 1" in result.stderr
    assert "Hint:" in result.stderr
    assert server.get("kept").json() == {"version": "three"}

    rolled = server.cli_json("rollback", "kept")  # the kept one before the current: two
    assert rolled["status"] == "success", rolled
    assert server.get("kept").json() == {"version": "two"}
