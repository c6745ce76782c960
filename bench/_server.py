"""A ``fastapi-deploy server`` subprocess for the benchmarks: its own data directory, free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CLI = str(Path(sys.executable).parent / "fastapi-deploy")
SERVER_START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_environ() -> dict[str, str]:
    """This process's environment without anything that would point a server or a CLI elsewhere."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FASTAPI_DEPLOY_", "FASTAPI_CLOUD_")) and k != "DATABASE_URL"
    }


@dataclass
class BenchServer:
    """A ``fastapi-deploy server`` subprocess with its own data directory, and a CLI pointed at it."""

    workdir: Path
    uv_cache_dir: Path | None = None
    port: int = field(default_factory=free_port)
    router_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: "fdp_bench_" + os.urandom(12).hex())
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self) -> None:
        env = clean_environ()
        env.update(FASTAPI_DEPLOY_ADMIN_TOKEN=self.token, PYTHONUNBUFFERED="1")
        if self.uv_cache_dir is not None:
            env["UV_CACHE_DIR"] = str(self.uv_cache_dir)  # the builder passes UV_* through to uv
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    CLI,
                    "server",
                    "--data-dir",
                    str(self.workdir / "data"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--router-port",
                    str(self.router_port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"the server was not ready within {SERVER_START_TIMEOUT:.0f} s:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own child's process group, nothing else
            self.proc.wait(10)

    def cli_env(self) -> dict[str, str]:
        env = clean_environ()
        env.update(
            FASTAPI_DEPLOY_URL=self.url,
            FASTAPI_DEPLOY_TOKEN=self.token,
            FASTAPI_DEPLOY_CONFIG_DIR=str(self.workdir / "cli-config"),
        )
        return env

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@contextmanager
def running(workdir: Path, uv_cache_dir: Path | None = None) -> Iterator[BenchServer]:
    workdir.mkdir(parents=True)
    server = BenchServer(workdir, uv_cache_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
