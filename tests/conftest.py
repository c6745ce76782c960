"""Shared test fixtures: a real control-plane server in a subprocess, the real CLI in subprocesses.

In CI (``CI=true``) a skipped test is a failure, with one exception: tests marked ``kubernetes`` (no
cluster can run on CI machines).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "fastapi-deploy")
EXAMPLES = ROOT / "examples"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    # The marker, not a keyword: a parametrized id such as ``[kubernetes]`` is a keyword too.
    if IN_CI and report.skipped and item.get_closest_marker("kubernetes") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which is not allowed: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A whole module skipped while collected (``pytest.importorskip`` at its top) fails in CI too."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI while collected, which is not allowed: {report.longrepr}"


def copy_checkout(dest: Path) -> Path:
    """The repository as git sees it into ``dest``: tracked files and untracked ones not ignored (no
    .venv, data or caches)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


@dataclass
class Server:
    """A running ``fastapi-deploy server`` subprocess."""

    data_dir: Path
    port: int
    router_port: int
    admin_token: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                CLI,
                "server",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                "--router-port",
                str(self.router_port),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            r = httpx.get(f"{self.url}/readyz", timeout=2)
            return r.status_code == 200

        wait_until(ready, timeout, what="the server to be ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=30,
        )

    def app_id(self, slug: str) -> str:
        """The id of the app ``slug`` (as the admin sees it)."""
        with self.api() as api:
            apps = api.get("/apps/").json()["data"]
        return str(next(a["id"] for a in apps if a["slug"] == slug))

    def get(self, app_slug: str, path: str = "/", **kw: Any) -> httpx.Response:
        """A request through the router, with the app's Host."""
        headers = {"Host": f"{app_slug}.localhost:{self.router_port}", **kw.pop("headers", {})}
        return httpx.get(f"{self.router_url}{path}", headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        check: bool = True,
        timeout: float = 300,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [CLI, *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"fastapi-deploy {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def cli_json(self, *args: str, **kw: Any) -> Any:
        """The command's ``--json`` output; lists come as ``{"data": [...]}`` and are unwrapped."""
        result = self.cli(*args, "--json", **kw)
        out = json.loads(result.stdout)
        return out["data"] if isinstance(out, dict) and isinstance(out.get("data"), list) else out

    def cli_ndjson(self, *args: str, **kw: Any) -> list[Any]:
        """Streaming commands (``logs``) print one JSON object per line with ``--json``."""
        result = self.cli(*args, "--json", **kw)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def make_server(tmp: Path, **extra_env: str) -> Server:
    data_dir = tmp / "data"
    config_dir = tmp / "cli-config"
    token = "fdp_test_admin_" + os.urandom(8).hex()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FASTAPI_DEPLOY_", "FASTAPI_CLOUD_")) and k != "DATABASE_URL"
    }
    env.update(
        FASTAPI_DEPLOY_ADMIN_TOKEN=token,
        FASTAPI_DEPLOY_CONFIG_DIR=str(config_dir),
        FASTAPI_DEPLOY_VERIFY_TIMEOUT="30",
        FASTAPI_DEPLOY_DRAIN_TIMEOUT="5",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env)
    server = Server(
        data_dir=data_dir,
        port=free_port(),
        router_port=free_port(),
        admin_token=token,
        env=env,
        log_path=tmp / "server.log",
    )
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a test module, logged in with the CLI as the admin."""
    tmp = tmp_path_factory.mktemp("server")
    srv = make_server(tmp)
    srv.start()
    srv.cli("login", "--url", srv.url, "--token", srv.admin_token)
    try:
        yield srv
    finally:
        srv.stop()
        log = srv.log_path.read_text(errors="replace")
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / f"server-{tmp.name}.log").write_text(log)


@pytest.fixture(scope="session")
def platform_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The platform's own image (``Dockerfile``) in the test engine, built once per session."""
    from tests import dockerenv
    from tests.platform_image import built

    dockerenv.require()
    with built(tmp_path_factory.mktemp("image-context")) as tag:
        yield tag
