"""End to end: a real server process, the real CLI in subprocesses, real requests through the router.

Pushes every example shape, redeploys under steady load with no failed request, rolls back, restarts the
server and finds every app serving again without a rebuild, and checks that bad uploads fail with the
right status and a useful message while the previous revision keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import zstandard

from tests.conftest import EXAMPLES, Server, make_server, wait_until

pytestmark = pytest.mark.e2e


def copy_example(name: str, tmp: Path, as_name: str | None = None) -> Path:
    dest = tmp / (as_name or name)
    shutil.copytree(EXAMPLES / name, dest)
    return dest


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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("projects")


# -- shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("example", "path", "expect"),
    [
        ("hello", "/", {"message": "Hello from fastapi-deploy"}),
        ("package", "/", {"shape": "package", "module": "app.routes"}),
        ("lifespan", "/", {"model": "loaded"}),
    ],
)
def test_push_shapes(server: Server, workdir: Path, example: str, path: str, expect: dict[str, Any]) -> None:
    project = copy_example(example, workdir)
    out = push(server, project, f"shape-{example}")
    assert out["url"] == f"http://shape-{example}.localhost:{server.router_port}/"
    r = server.get(f"shape-{example}", path)
    assert r.status_code == 200, r.text
    assert r.json() == expect
    assert r.headers["x-request-id"]


def test_push_third_party_dependencies(server: Server, workdir: Path) -> None:
    project = copy_example("with-deps", workdir)
    out = push(server, project, "with-deps")
    r = server.get("with-deps")
    assert r.status_code == 200
    assert r.json()["size"] == "1.0 MB"
    assert "requirements.txt" in build_log(server, out["deployment_id"])


def assert_sse_streams_event_by_event(server: Server, app: str) -> None:
    """``examples/sse`` deployed as ``app``: four events through the router, each as it is sent."""
    url = f"{server.router_url}/events?count=4&delay=0.3"
    headers = {"Host": f"{app}.localhost:{server.router_port}"}
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("GET", url, headers=headers, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4
    # Each event arrives when the app sends it, not when the stream ends.
    assert arrivals[0] < arrivals[-1] - 0.5


def assert_websocket_echoes(server: Server, app: str) -> None:
    """``examples/websocket`` deployed as ``app``: a WebSocket through the router, both ways."""

    async def talk() -> list[str]:
        # The URI names the app (its Host header); the connection goes to the router on loopback.
        uri = f"ws://{app}.localhost:{server.router_port}/ws"
        async with websockets.connect(uri, host="127.0.0.1", port=server.router_port) as ws:
            replies = []
            for word in ("one", "two"):
                await ws.send(word)
                replies.append(str(await ws.recv()))
            return replies

    assert asyncio.run(talk()) == ["echo: one", "echo: two"]


def test_sse_streams_event_by_event(server: Server, workdir: Path) -> None:
    push(server, copy_example("sse", workdir), "sse")
    assert_sse_streams_event_by_event(server, "sse")


def test_websocket_through_router(server: Server, workdir: Path) -> None:
    push(server, copy_example("websocket", workdir), "ws-echo")
    assert_websocket_echoes(server, "ws-echo")


# -- redeploy, rollback -----------------------------------------------------------------------------


class Load:
    """Light steady load through the router from a thread; bounded in count and time."""

    def __init__(self, server: Server, app: str, max_requests: int = 5000, max_seconds: float = 120) -> None:
        self.server, self.app = server, app
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        headers = {"Host": f"{self.app}.localhost:{self.server.router_port}"}
        with httpx.Client(base_url=self.server.router_url, headers=headers, timeout=10) as client:
            for _ in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    r = client.get("/")
                    if r.status_code == 200:
                        self.ok += 1
                        self.bodies.add(r.text)
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def write_version(project: Path, version: str) -> None:
    (project / "main.py").write_text(
        "from fastapi import FastAPI\n\napp = FastAPI()\n\n\n"
        f"@app.get('/')\ndef root() -> dict[str, str]:\n    return {{'version': '{version}'}}\n"
    )


def test_redeploy_under_load_has_no_failed_request(server: Server, workdir: Path) -> None:
    project = copy_example("hello", workdir, "steady")
    write_version(project, "v1")
    push(server, project, "steady")
    with Load(server, "steady") as load:
        wait_until(lambda: load.ok >= 20, 30, what="load to start")
        for version in ("v2", "v3"):
            write_version(project, version)
            out = push(server, project, "steady")
            # Code-only change: the environment is reused, nothing is installed.
            log = build_log(server, out["deployment_id"])
            assert "reusing environment" in log and "Installed" not in log, log
            wait_until(lambda v=version: server.get("steady").json() == {"version": v}, 30, what=version)
        wait_until(lambda: load.ok >= 200, 60, what="more load")
    assert load.failures == [], load.failures[:5]
    assert {json.loads(b)["version"] for b in load.bodies} >= {"v1", "v2", "v3"}


def test_rollback_without_rebuild(server: Server, workdir: Path) -> None:
    project = copy_example("hello", workdir, "rolling")
    write_version(project, "one")
    first = push(server, project, "rolling")
    write_version(project, "two")
    push(server, project, "rolling")
    assert server.get("rolling").json() == {"version": "two"}

    result = server.cli_json("rollback", "rolling")
    assert result["status"] == "success", result
    assert server.get("rolling").json() == {"version": "one"}
    log = build_log(server, result["deployment_id"])
    assert "no rebuild" in log
    assert "Installing" not in log

    # Roll forward to a named deployment.
    deployments = server.cli_json("deployments", "rolling")
    latest_upload = next(
        d for d in deployments if d["kind"] == "upload" and d["id"] != first["deployment_id"]
    )
    server.cli_json("rollback", "rolling", latest_upload["id"])
    assert server.get("rolling").json() == {"version": "two"}


def test_env_vars_reach_the_app_and_secrets_stay_hidden(server: Server, workdir: Path) -> None:
    project = workdir / "envapp"
    project.mkdir()
    (project / "main.py").write_text(
        "import os\nfrom fastapi import FastAPI\n\napp = FastAPI()\n\n\n"
        "@app.get('/')\ndef root() -> dict[str, str | None]:\n"
        "    return {'greeting': os.environ.get('GREETING'), 'key': os.environ.get('API_KEY'),\n"
        "            'leak': os.environ.get('FASTAPI_DEPLOY_ADMIN_TOKEN')}\n"
    )
    push(server, project, "envapp")
    before = server.get("envapp").json()
    assert before == {"greeting": None, "key": None, "leak": None}

    server.cli("env", "set", "envapp", "API_KEY=s3cret", "--secret", "--no-redeploy")
    server.cli("env", "set", "envapp", "GREETING=hi=there")
    wait_until(lambda: server.get("envapp").json()["greeting"] == "hi=there", 60, what="env redeploy")
    assert server.get("envapp").json()["key"] == "s3cret"
    listed = server.cli_json("env", "list", "envapp")
    by_name = {v["name"]: v for v in listed}
    assert by_name["API_KEY"]["value"] is None and by_name["API_KEY"]["is_secret"] is True
    assert by_name["GREETING"]["value"] == "hi=there"
    # Secrets are encrypted at rest: the database file never holds the value.
    db_bytes = b"".join(p.read_bytes() for p in server.data_dir.glob("fastapi-deploy.db*"))
    assert b"s3cret" not in db_bytes

    server.cli("env", "unset", "envapp", "GREETING")
    wait_until(lambda: server.get("envapp").json()["greeting"] is None, 60, what="env unset redeploy")


def test_logs_and_status(server: Server, workdir: Path) -> None:
    project = copy_example("lifespan", workdir, "logged")
    push(server, project, "logged")
    server.get("logged", "/?marker=abc123")
    entries = wait_until(
        lambda: [e for e in server.cli_ndjson("logs", "logged", "--tail", "200") if "abc123" in e["message"]],
        15,
        what="the access log line",
    )
    assert entries[0]["level"] == "info"
    logs = server.cli("logs", "logged", "--tail", "100").stdout
    assert "lifespan: startup complete" in logs
    grep = server.cli_ndjson("logs", "logged", "--grep", "ABC123")
    assert grep and all("abc123" in e["message"].lower() for e in grep)
    status = server.cli_json("status", "logged")["app"]
    assert status["status"] == "serving"
    assert [i["state"] for i in status["instances"]] == ["serving"]


JSON_LOGS = """
import json, sys
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def root() -> dict[str, bool]:
    return {"ok": True}


@app.get("/log")
def log() -> dict[str, bool]:
    for key, level in (("level", "warning"), ("levelname", "ERROR"), ("severity", "CRITICAL")):
        print(json.dumps({key: level, "message": f"json-{key}-marker"}), file=sys.stderr, flush=True)
    print(json.dumps({"level": "debug", "message": "json-debug-marker ERROR in words only"}), flush=True)
    return {"logged": True}
"""


def test_json_log_lines_are_shown_at_their_own_level(server: Server, workdir: Path) -> None:
    project = workdir / "jsonlogs"
    project.mkdir()
    (project / "main.py").write_text(JSON_LOGS)
    push(server, project, "jsonlogs")
    assert server.get("jsonlogs", "/log").json() == {"logged": True}

    def marked() -> dict[str, str]:
        entries = server.cli_ndjson("logs", "jsonlogs", "--tail", "200", "--grep", "-marker")
        return {json.loads(e["message"])["message"].split()[0]: e["level"] for e in entries}

    levels = wait_until(lambda: len(found := marked()) == 4 and found, 15, what="the JSON log lines")
    assert levels == {
        "json-level-marker": "warning",
        "json-levelname-marker": "error",
        "json-severity-marker": "critical",
        "json-debug-marker": "debug",
    }
    # The minimum level filters on the level read from the record (one request: each line once).
    errors = server.cli_ndjson("logs", "jsonlogs", "--tail", "200", "--grep", "-marker", "--level", "error")
    assert sorted(json.loads(e["message"])["message"] for e in errors) == [
        "json-levelname-marker",
        "json-severity-marker",
    ]


def test_crashed_instance_is_replaced_and_its_last_words_kept(server: Server, workdir: Path) -> None:
    project = workdir / "crashy"
    project.mkdir()
    (project / "main.py").write_text(
        "import os, sys\nfrom fastapi import FastAPI\n\napp = FastAPI()\n\n\n"
        "@app.get('/')\ndef root() -> dict[str, int]:\n    return {'pid': os.getpid()}\n\n\n"
        "@app.get('/die')\ndef die() -> None:\n"
        "    print('last words before dying', flush=True)\n    os._exit(17)\n"
    )
    push(server, project, "crashy")
    pid = server.get("crashy").json()["pid"]
    # The instance dies before answering: the router says so (502), it does not hang.
    r = server.get("crashy", "/die")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "bad_gateway"
    # A new instance takes over; requests meanwhile wait in the router's queue rather than fail.
    new_pid = wait_until(lambda: (r := server.get("crashy")).status_code == 200 and r.json()["pid"], 30)
    assert new_pid != pid
    logs = server.cli("logs", "crashy", "--tail", "200").stdout
    assert "last words before dying" in logs
    assert "exited unexpectedly (exit code 17)" in logs


def test_cli_delete_stops_the_app_and_forgets_it(server: Server, workdir: Path) -> None:
    project = copy_example("hello", workdir, "doomed")
    write_version(project, "doomed")
    out = push(server, project, "doomed")
    server.cli("env", "set", "doomed", "SECRET=s", "--secret", "--no-redeploy")
    pid = server.cli_json("status", "doomed")["app"]["instances"][0]["pid"]
    with server.api() as api:
        deploy_token = api.post(f"/apps/{out['app_id']}/tokens", json={"name": "ci"}).json()["value"]
    assert (server.data_dir / "deployments" / out["deployment_id"]).is_dir()

    # Without --yes it asks; answering no changes nothing.
    refused = server.cli("delete", "doomed", input="n\n", check=False)
    assert refused.returncode != 0 and "Delete app doomed" in refused.stdout + refused.stderr
    assert server.get("doomed").json() == {"version": "doomed"}

    deleted = server.cli("delete", "doomed", input="y\n")
    assert "Deleted app doomed." in deleted.stdout + deleted.stderr
    assert "doomed" not in {a["slug"] for a in server.cli_json("apps")}
    gone = server.cli("status", "doomed", check=False)
    assert gone.returncode == 1 and "doomed" in gone.stderr
    r = server.get("doomed")
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_such_app", r.text
    wait_until(lambda: not process_alive(pid), 30, what="the instance to stop")
    assert not (server.data_dir / "deployments" / out["deployment_id"]).exists()
    assert not (server.data_dir / "logs" / out["app_id"]).exists()
    with server.api(deploy_token) as api:
        assert api.get(f"/apps/{out['app_id']}").status_code == 401  # its deploy tokens are revoked

    # The name is free again: a push makes a new app.
    again = push(server, project, "doomed")
    assert again["app_id"] != out["app_id"]
    assert server.get("doomed").json() == {"version": "doomed"}
    assert server.cli_json("delete", "doomed") == {
        "deleted": True,
        "app_id": again["app_id"],
        "app": "doomed",
    }
    assert server.get("doomed").status_code == 404


def test_health_path_set_through_the_api_is_what_verification_asks(server: Server, workdir: Path) -> None:
    project = workdir / "probed"
    project.mkdir()
    (project / "main.py").write_text(
        "from fastapi import FastAPI\n\napp = FastAPI()\nhits = {'n': 0}\n\n\n"
        "@app.get('/healthz')\ndef healthz() -> dict[str, bool]:\n"
        "    hits['n'] += 1\n    return {'ok': True}\n\n\n"
        "@app.get('/hits')\ndef count() -> dict[str, int]:\n    return hits\n"
    )
    first = push(server, project, "probed")
    assert server.get("probed", "/hits").json() == {"n": 0}  # verified on "/", the default
    with server.api() as api:
        r = api.patch(f"/apps/{first['app_id']}", json={"health_path": "/healthz"})
    assert r.status_code == 200 and r.json()["health_path"] == "/healthz", r.text
    second = push(server, project, "probed")
    assert server.get("probed", "/hits").json()["n"] >= 1
    assert "lifespan finished and /healthz answered" in build_log(server, second["deployment_id"])


# -- bad uploads --------------------------------------------------------------------------------------


def tar_zst(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def upload_raw(server: Server, app_id: str, archive: bytes) -> dict[str, Any]:
    """The official client's sequence with a hand-made archive; returns the finished deployment."""
    with server.api() as api:
        dep = (
            api.post(f"/apps/{app_id}/deployments/", json={"archive_size_bytes": len(archive)})
            .raise_for_status()
            .json()
        )
        target = api.post(f"/deployments/{dep['id']}/upload").raise_for_status().json()
        r = httpx.post(
            target["url"], data=target["fields"], files={"file": ("archive.tar", archive)}, timeout=10
        )
        assert r.status_code < 300, r.text
        api.post(f"/deployments/{dep['id']}/upload-complete").raise_for_status()

        def finished() -> dict[str, Any] | None:
            d: dict[str, Any] = api.get(f"/deployments/{dep['id']}").json()
            return (
                d
                if d["status"]
                not in ("ready_for_build", "extracting", "building_image", "deploying", "verifying")
                else None
            )

        result: dict[str, Any] = wait_until(finished, 120, interval=0.2, what="the deployment to finish")
        return result


@pytest.fixture(scope="module")
def victim(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An app that serves v1; every bad upload below targets it and must leave v1 serving."""
    project = copy_example("hello", tmp_path_factory.mktemp("victim"), "victim")
    write_version(project, "good")
    out = push(server, project, "victim")
    yield out


def assert_still_serving(server: Server) -> None:
    r = server.get("victim")
    assert r.status_code == 200 and r.json() == {"version": "good"}, r.text


@pytest.mark.parametrize(
    ("archive", "status", "words"),
    [
        (lambda: tar_zst({"../evil.py": b"x", "main.py": b"app = 1"}), "extracting_failed", "escape"),
        (lambda: tar_zst({"/etc/evil": b"x"}), "extracting_failed", "absolute"),
        (lambda: tar_zst({"main.py": b"x"}, links={"link": "/etc/passwd"}), "extracting_failed", "link"),
        (lambda: b"this is not an archive", "extracting_failed", "archive"),
        (lambda: tar_zst({"README.md": b"no app here"}), "building_image_failed", "No FastAPI app found"),
        (
            lambda: tar_zst({"main.py": b"from fastapi import FastAPI\napp = FastAPI(\n"}),
            "verifying_failed",
            "SyntaxError",
        ),
        (
            lambda: tar_zst(
                {
                    "main.py": b"from fastapi import FastAPI\n"
                    b"raise RuntimeError('boom at import')\napp = FastAPI()\n"
                }
            ),
            "verifying_failed",
            "boom at import",
        ),
        (
            lambda: tar_zst(
                {
                    "main.py": b"from contextlib import asynccontextmanager\nfrom fastapi import FastAPI\n"
                    b"@asynccontextmanager\nasync def lifespan(app):\n"
                    b"    raise RuntimeError('db unreachable')\n    yield\n"
                    b"app = FastAPI(lifespan=lifespan)\n"
                }
            ),
            "verifying_failed",
            "db unreachable",
        ),
    ],
    ids=[
        "traversal",
        "absolute",
        "symlink-out",
        "garbage",
        "no-entrypoint",
        "syntax-error",
        "import-crash",
        "lifespan-crash",
    ],
)
def test_bad_upload_fails_clearly_and_keeps_serving(
    server: Server, victim: dict[str, Any], archive: Any, status: str, words: str
) -> None:
    result = upload_raw(server, victim["app_id"], archive())
    assert result["status"] == status, result
    failure = result["failure"]
    assert set(failure) == {"error_code", "error_title", "error_message", "error_hint"}
    assert all(isinstance(v, str) for v in failure.values())
    assert failure["error_hint"]
    assert words.lower() in (failure["error_message"] + build_log(server, result["id"])).lower(), failure
    assert_still_serving(server)
    with server.api() as api:
        app = api.get(f"/apps/{victim['app_id']}").json()
    assert app["current_deployment_id"] == victim["deployment_id"]


def test_oversize_upload_is_refused(server: Server, victim: dict[str, Any]) -> None:
    with server.api() as api:
        r = api.post(f"/apps/{victim['app_id']}/deployments/", json={"archive_size_bytes": 10**10})
    assert r.status_code == 413
    assert "exceeds" in r.json()["detail"]
    assert r.json()["error"]["hint"]
    assert_still_serving(server)


def test_cli_push_failure_prints_title_message_hint(server: Server, workdir: Path) -> None:
    project = workdir / "broken"
    project.mkdir()
    (project / "main.py").write_text(
        "from fastapi import FastAPI\nimport does_not_exist_xyz\napp = FastAPI()\n"
    )
    result = server.cli("push", str(project), "--app", "victim", check=False)
    assert result.returncode == 1
    assert "Verification failed" in result.stderr
    assert "does_not_exist_xyz" in result.stderr + result.stdout
    assert "Hint:" in result.stderr
    assert_still_serving(server)


def process_alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- restart -----------------------------------------------------------------------------------------


def test_restart_brings_every_app_back_without_rebuild(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    srv.start()
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        for name in ("hello", "package"):
            push(srv, copy_example(name, tmp_path, f"re-{name}"), f"re-{name}")
        srv.cli("env", "set", "re-hello", "KEPT=yes", "--no-redeploy")
        deployments_before = {n: srv.cli_json("deployments", f"re-{n}") for n in ("hello", "package")}
        envs_before = sorted(p.name for p in (srv.data_dir / "envs").iterdir())

        srv.stop()
        with pytest.raises(httpx.ConnectError):
            srv.get("re-hello")
        srv.start()

        for name in ("hello", "package"):
            r = wait_until(lambda n=name: (r := srv.get(f"re-{n}")).status_code == 200 and r, 30)
            assert r.status_code == 200
            assert srv.cli_json("deployments", f"re-{name}") == deployments_before[name]
        assert sorted(p.name for p in (srv.data_dir / "envs").iterdir()) == envs_before
        assert {v["name"] for v in srv.cli_json("env", "list", "re-hello")} == {"KEPT"}
    finally:
        srv.stop()


def test_killed_server_leaves_no_orphans_and_recovers(tmp_path: Path) -> None:
    import signal

    srv = make_server(tmp_path)
    srv.start()
    try:
        srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
        push(srv, copy_example("hello", tmp_path, "orphan"), "orphan")
        old_pid = srv.cli_json("status", "orphan")["app"]["instances"][0]["pid"]
        srv.stop(sig=signal.SIGKILL)
        srv.start()
        wait_until(lambda: srv.get("orphan").status_code == 200, 30, what="the app after a crash restart")
        assert not process_alive(old_pid), "the instance of the killed server was left running"
    finally:
        srv.stop()


def test_postgres_backed_server_deploys_and_survives_restart(tmp_path: Path) -> None:
    from tests.dbs import postgres_database

    with postgres_database() as url:
        srv = make_server(tmp_path, DATABASE_URL=url)
        srv.start()
        try:
            srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
            project = copy_example("hello", tmp_path, "pg-hello")
            write_version(project, "pg")
            push(srv, project, "pg-hello")
            srv.cli("env", "set", "pg-hello", "K=v", "--secret", "--no-redeploy")
            srv.stop()
            srv.start()
            wait_until(lambda: srv.get("pg-hello").status_code == 200, 30, what="the app after restart")
            assert srv.get("pg-hello").json() == {"version": "pg"}
            assert not (srv.data_dir / "fastapi-deploy.db").exists()  # everything went to PostgreSQL
            assert srv.cli_json("env", "list", "pg-hello")[0]["is_secret"] is True
        finally:
            srv.stop()
