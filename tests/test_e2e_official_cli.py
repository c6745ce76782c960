"""End to end with the official client: ``fastapi-cloud-cli`` 0.28.0, unchanged, against a live server.

The client is configured the way a user would do it, and only that way:
``$FASTAPI_CLOUD_CLI_CONFIG_DIR/cli.json`` points it at the server, and
``FASTAPI_CLOUD_DISABLE_VERSION_CHECK=1`` keeps it off the package index. Every step is a real subprocess
talking real HTTP: the device login approved on the server's page like a browser would, ``fastapi deploy``
in CI mode, deploy tokens, app logs, environment variables and a failing deploy,
each checked through the router as well as through the client's output.

Two entry points are used, as users do: ``python -m fastapi_cloud_cli login`` for the device flow, and the
``fastapi`` console script (fastapi-cli merges the cloud commands into it) for everything else. Once a token
exists, ``python -m fastapi_cloud_cli`` starts Sentry with FastAPI Labs' DSN; the ``fastapi`` script does
not, so no test reports to a third party.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EXAMPLES, VENV_BIN, Server, wait_until

# The first environment build installs fastapi[standard] from the package index.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CLIENT_VERSION = "0.28.0"
HAS_FASTAPI_CLI = importlib.util.find_spec("fastapi_cli") is not None
# Without fastapi-cli the ``fastapi`` script cannot run; its cloud commands are the cloud app itself, so
# run that app directly (and without the Sentry init of ``python -m``). test_fastapi_script_… flags it.
FASTAPI = (
    [str(VENV_BIN / "fastapi")]
    if HAS_FASTAPI_CLI
    else [sys.executable, "-c", "from fastapi_cloud_cli.cli import app; app(prog_name='fastapi')"]
)
CLOUD_MODULE = [sys.executable, "-m", "fastapi_cloud_cli"]

DEPLOY_TIMEOUT = 300  # a cold environment build, verification, and the client's own status polling
COMMAND_TIMEOUT = 60
USER_CODE_URL = re.compile(r"(http://\S+/login/device\?user_code=([A-Z]{4}-[A-Z]{4}))")
LOG_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FAILED_STATUSES = {
    "extracting_failed",
    "extracting_failed_archive_too_large",
    "building_image_failed",
    "building_image_failed_timeout",
    "build_skipped_superseded",
    "deploying_failed",
    "verifying_failed",
    "failed",
}


@dataclass
class OfficialCLI:
    """The official client with its own config folder (cli.json, and auth.json once logged in)."""

    server: Server
    config_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in self.server.env.items()
            if not k.startswith(("FASTAPI_DEPLOY_", "FASTAPI_CLOUD_")) and k != "CI"
        }
        env.update(
            FASTAPI_CLOUD_CLI_CONFIG_DIR=str(self.config_dir),
            FASTAPI_CLOUD_DISABLE_VERSION_CHECK="1",
            CI="1",  # non-interactive: no prompts, no wizard, plain progress output
            COLUMNS="250",  # rich wraps at the terminal width; a log line must stay one line
            PYTHONIOENCODING="utf-8",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        expect: int | None = 0,
        timeout: float = COMMAND_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*FASTAPI, *args]
        result = subprocess.run(
            cmd,
            cwd=cwd,
            env=self.env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if expect is not None and result.returncode != expect:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}, expected {expect}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    @property
    def auth_file(self) -> Path:
        return self.config_dir / "auth.json"


def new_cli(server: Server, folder: Path) -> OfficialCLI:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cli.json").write_text(
        json.dumps({"base_api_url": f"{server.url}/api/v1", "dashboard_base_url": server.url})
    )
    return OfficialCLI(server, folder)


@dataclass
class Login:
    returncode: int
    output: str
    url: str
    page: httpx.Response


def device_login(cli: OfficialCLI, action: str) -> Login:
    """Run ``login --no-open``, read the URL it prints, and answer the server's page with ``action``."""
    proc = subprocess.Popen(
        [*CLOUD_MODULE, "login", "--no-open", "--timeout", "60"],
        env=cli.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name="official-cli-login-reader", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        match = None
        while match is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"login printed no verification URL within 30 s:\n{''.join(seen)}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"login exited before printing the URL:\n{''.join(seen)}")
            seen.append(line)
            match = USER_CODE_URL.search(line)
        url, user_code = match.group(1), match.group(2)
        # What the browser does: the page's form posts the code, the user's API token and the button.
        page = httpx.post(
            f"{cli.server.url}/login/device",
            data={"user_code": user_code, "token": cli.server.admin_token, "action": action},
            timeout=30,
        )
        returncode = proc.wait(timeout=30)  # the client polls every `interval` (2 s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.stdout is not None
    proc.stdout.close()
    while not lines.empty():
        rest = lines.get_nowait()
        if rest is not None:
            seen.append(rest)
    return Login(returncode, "".join(seen), url, page)


# -- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(server: Server, tmp_path_factory: pytest.TempPathFactory) -> OfficialCLI:
    """The official client logged in as the admin through the device flow."""
    cli = new_cli(server, tmp_path_factory.mktemp("official-cli"))
    login = device_login(cli, "approve")
    assert login.returncode == 0, login.output
    return cli


def create_app(server: Server, name: str) -> dict[str, Any]:
    with server.api() as api:
        teams = api.get("/teams/")
        assert teams.status_code == 200, teams.text
        team_id = teams.json()["data"][0]["id"]
        created = api.post("/apps/", json={"team_id": team_id, "name": name, "directory": None})
        assert created.status_code in (200, 201), created.text
        app: dict[str, Any] = created.json()
    return app


def get_app(server: Server, app_id: str) -> dict[str, Any]:
    with server.api() as api:
        r = api.get(f"/apps/{app_id}")
        assert r.status_code == 200, r.text
        app: dict[str, Any] = r.json()
    return app


def copy_example(name: str, dest: Path) -> Path:
    # A copy, so that nothing the client writes (.fastapicloud/) lands in the repository.
    shutil.copytree(EXAMPLES / name, dest, ignore=shutil.ignore_patterns("__pycache__", ".fastapicloud"))
    return dest


def write_main(project: Path, body: str) -> Path:
    project.mkdir(parents=True, exist_ok=True)
    (project / "main.py").write_text(
        "import os\n\nfrom fastapi import FastAPI\n\napp = FastAPI()\n\n\n" + body
    )
    return project


def version_app(project: Path, version: str) -> Path:
    return write_main(
        project, f"@app.get('/')\ndef root() -> dict[str, str]:\n    return {{'version': '{version}'}}\n"
    )


def serves(server: Server, slug: str, expected: dict[str, Any], path: str = "/") -> bool:
    r = server.get(slug, path, timeout=10)
    return r.status_code == 200 and r.json() == expected


def deploy(
    cli: OfficialCLI, project: Path, app_id: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return cli.run("deploy", "--app-id", app_id, cwd=project, timeout=DEPLOY_TIMEOUT, env=env)


def wait_for_deployment(
    server: Server, deployment_id: str, timeout: float = DEPLOY_TIMEOUT
) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        with server.api() as api:
            dep: dict[str, Any] = api.get(f"/deployments/{deployment_id}").json()
        return dep if dep["status"] == "success" or dep["status"] in FAILED_STATUSES else None

    result: dict[str, Any] = wait_until(finished, timeout, interval=0.2, what=f"deployment {deployment_id}")
    assert result["status"] == "success", result
    return result


# -- login -------------------------------------------------------------------------------------------


def test_client_is_the_pinned_version(cloud: OfficialCLI) -> None:
    out = cloud.run("cloud", "--version").stdout
    assert CLIENT_VERSION in out, out


def test_fastapi_script_runs_the_cloud_commands(cloud: OfficialCLI) -> None:
    if not HAS_FASTAPI_CLI:
        pytest.skip(
            "fastapi-cli is not installed, so the `fastapi` script cannot run: add it to the dev extra"
        )
    out = cloud.run("--help").stdout
    for command in ("deploy", "login", "cloud"):
        assert re.search(rf"^\W*{command}\b", out, re.MULTILINE), out


def test_device_login_approved_then_whoami(server: Server, tmp_path: Path) -> None:
    cli = new_cli(server, tmp_path / "config")
    login = device_login(cli, "approve")

    assert login.url.startswith(f"{server.url}/login/device?user_code="), login.url
    assert login.page.status_code == 200, login.page.text
    assert "admin@localhost" in login.page.text
    assert login.returncode == 0, login.output
    assert "logged in" in login.output.lower(), login.output
    auth = json.loads(cli.auth_file.read_text())
    assert auth["access_token"] and auth["access_token"] != server.admin_token  # a token of its own

    assert "admin@localhost" in cli.run("cloud", "whoami").stdout
    with server.api(auth["access_token"]) as api:
        assert api.get("/users/me").json()["email"] == "admin@localhost"


def test_device_login_denied(server: Server, tmp_path: Path) -> None:
    cli = new_cli(server, tmp_path / "config")
    login = device_login(cli, "deny")

    assert login.page.status_code == 200, login.page.text
    assert login.returncode == 1, login.output
    assert "declined" in login.output.lower(), login.output
    assert not cli.auth_file.exists()


# -- deploy ------------------------------------------------------------------------------------------


def test_fastapi_deploy_in_ci_mode(server: Server, cloud: OfficialCLI, tmp_path: Path) -> None:
    app = create_app(server, "official-hello")
    project = copy_example("hello", tmp_path / "hello")

    result = deploy(cloud, project, app["id"])

    assert app["url"] in result.stdout, result.stdout
    r = server.get(app["slug"])
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "Hello from fastapi-deploy"}
    assert server.get(app["slug"], "/items/7?q=x").json() == {"item_id": 7, "q": "x"}
    assert get_app(server, app["id"])["status"] == "serving"
    assert not (EXAMPLES / "hello" / ".fastapicloud").exists()


def test_cloud_deploy_json_returns_without_waiting(
    server: Server, cloud: OfficialCLI, tmp_path: Path
) -> None:
    app = create_app(server, "official-json")
    project = version_app(tmp_path / "json", "json-1")

    result = cloud.run(
        "cloud", "deploy", "--json", "--app-id", app["id"], cwd=project, timeout=DEPLOY_TIMEOUT
    )

    data = json.loads(result.stdout)["data"]
    assert data["app_id"] == app["id"]
    assert data["url"] == app["url"]
    assert data["status"] in ("ready_for_build", "extracting", "building_image", "deploying", "verifying")
    dep = wait_for_deployment(server, data["deployment_id"])
    assert dep["kind"] == "upload"
    assert get_app(server, app["id"])["current_deployment_id"] == data["deployment_id"]
    wait_until(
        lambda: serves(server, app["slug"], {"version": "json-1"}), 30, what="json-1 through the router"
    )


# -- deploy tokens -----------------------------------------------------------------------------------


def test_deploy_token_deploys_its_app_only(server: Server, cloud: OfficialCLI, tmp_path: Path) -> None:
    app = create_app(server, "official-token")
    project = version_app(tmp_path / "token", "user-1")
    deploy(cloud, project, app["id"])
    token_file = tmp_path / "secrets" / "deploy-token"

    created = cloud.run(
        "cloud", "tokens", "create", "--app-id", app["id"], "--name", "ci", "--output-file", str(token_file)
    )

    assert "ci" in created.stdout
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert token
    listed = cloud.run("cloud", "tokens", "list", "--app-id", app["id"]).stdout
    assert "ci" in listed, listed

    # A client with no login at all: the deploy token is its only credential.
    ci = new_cli(server, tmp_path / "ci-config")
    version_app(project, "token-2")
    result = deploy(ci, project, app["id"], env={"FASTAPI_CLOUD_TOKEN": token})
    assert app["url"] in result.stdout, result.stdout
    wait_until(
        lambda: serves(server, app["slug"], {"version": "token-2"}), 30, what="token-2 through the router"
    )

    with server.api(token) as api:
        assert api.get("/apps/").status_code == 403  # not a user token
        assert api.get(f"/apps/{app['id']}").status_code == 200  # what `deploy` needs

    # Limited to its app: another app of the same team cannot be deployed with it.
    other = create_app(server, "official-token-other")
    refused = ci.run(
        "deploy", "--app-id", other["id"], cwd=project, expect=1, env={"FASTAPI_CLOUD_TOKEN": token}
    )
    assert "ready at" not in refused.stdout.lower(), refused.stdout
    with server.api() as api:
        assert api.get(f"/apps/{other['id']}/deployments/").json()["count"] == 0

    # Revoked: the token stops working at once, and the app keeps serving.
    tokens = json.loads(cloud.run("cloud", "tokens", "list", "--app-id", app["id"], "--json").stdout)
    (token_id,) = [t["id"] for t in tokens["data"]["tokens"] if t["name"] == "ci"]
    cloud.run("cloud", "tokens", "delete", token_id, "--app-id", app["id"])
    with server.api(token) as api:
        assert api.get(f"/apps/{app['id']}").status_code == 401
    version_app(project, "token-3")
    revoked = ci.run(
        "deploy", "--app-id", app["id"], cwd=project, expect=1, env={"FASTAPI_CLOUD_TOKEN": token}
    )
    assert "token is not valid" in revoked.stdout, revoked.stdout
    assert serves(server, app["slug"], {"version": "token-2"})


# -- logs --------------------------------------------------------------------------------------------


def test_logs_print_the_access_log(server: Server, cloud: OfficialCLI, tmp_path: Path) -> None:
    app = create_app(server, "official-logs")
    project = copy_example("hello", tmp_path / "logs")
    deploy(cloud, project, app["id"])
    for i in range(1, 31):
        assert server.get(app["slug"], f"/items/{i}?q=tailcheck").status_code == 200

    def logs_with_last_request() -> str | None:
        out = cloud.run("cloud", "logs", "--app-id", app["id"], "--no-follow", "--tail", "20").stdout
        return out if "GET /items/30?q=tailcheck" in out else None

    out = wait_until(logs_with_last_request, 30, interval=0.5, what="the last request in the app's logs")
    entries = [line for line in out.splitlines() if LOG_TIMESTAMP.search(line)]
    assert 0 < len(entries) <= 20, out
    assert "GET /items/29?q=tailcheck" in out
    assert "GET /items/1?q=tailcheck" not in out  # older than the tail


# -- environment variables ---------------------------------------------------------------------------


def test_env_set_list_secret_delete_and_the_app_sees_it(
    server: Server, cloud: OfficialCLI, tmp_path: Path
) -> None:
    app = create_app(server, "official-env")
    project = write_main(
        tmp_path / "env",
        "@app.get('/')\ndef root() -> dict[str, str | None]:\n"
        "    return {'greeting': os.environ.get('GREETING'), 'api_key': os.environ.get('API_KEY')}\n",
    )
    deploy(cloud, project, app["id"])
    assert serves(server, app["slug"], {"greeting": None, "api_key": None})
    first = get_app(server, app["id"])["current_deployment_id"]

    out = cloud.run("cloud", "env", "set", "--app-id", app["id"], "GREETING", "hello-env").stdout
    assert "Environment variable GREETING set" in out, out

    # `env set` redeploys by default: a new deployment of the same build with the new environment.
    def redeployed() -> str | None:
        current: str | None = get_app(server, app["id"])["current_deployment_id"]
        return current if current != first else None

    second = wait_until(redeployed, DEPLOY_TIMEOUT, interval=0.2, what="the redeploy after env set")
    with server.api() as api:
        dep = api.get(f"/deployments/{second}").json()
    assert dep["kind"] == "redeploy" and dep["status"] == "success", dep
    wait_until(
        lambda: serves(server, app["slug"], {"greeting": "hello-env", "api_key": None}),
        30,
        what="the app to see GREETING",
    )
    listed = cloud.run("cloud", "env", "list", "--app-id", app["id"]).stdout
    assert re.search(r"GREETING\s+hello-env", listed), listed

    out = cloud.run("cloud", "env", "set", "--app-id", app["id"], "--secret", "API_KEY", "s3cret").stdout
    assert "Secret environment variable API_KEY set" in out, out
    listed = cloud.run("cloud", "env", "list", "--app-id", app["id"]).stdout
    assert re.search(r"API_KEY\s+\[secret\]", listed), listed
    assert "s3cret" not in listed

    out = cloud.run("cloud", "env", "delete", "--app-id", app["id"], "GREETING", "-y").stdout
    assert "GREETING deleted" in out, out
    listed = cloud.run("cloud", "env", "list", "--app-id", app["id"]).stdout
    assert "GREETING" not in listed and "API_KEY" in listed, listed
    # Both later changes redeployed too; the app ends with the secret and without GREETING.
    wait_until(
        lambda: serves(server, app["slug"], {"greeting": None, "api_key": "s3cret"}),
        DEPLOY_TIMEOUT,
        interval=0.2,
        what="the app to see API_KEY and no GREETING",
    )


# -- a failing deploy --------------------------------------------------------------------------------


def test_failing_deploy_exits_1_and_the_previous_revision_keeps_serving(
    server: Server, cloud: OfficialCLI, tmp_path: Path
) -> None:
    app = create_app(server, "official-fail")
    project = version_app(tmp_path / "fail", "good")
    deploy(cloud, project, app["id"])
    assert serves(server, app["slug"], {"version": "good"})
    good = get_app(server, app["id"])["current_deployment_id"]

    (project / "main.py").write_text(
        "from fastapi import FastAPI\n\n"
        "raise RuntimeError('boom at import: no DATABASE_URL')\n\n"
        "app = FastAPI()\n"
    )
    result = cloud.run("deploy", "--app-id", app["id"], cwd=project, expect=1, timeout=DEPLOY_TIMEOUT)

    out = result.stdout + result.stderr
    assert "boom at import: no DATABASE_URL" in out, out
    assert "ready at" not in out.lower(), out
    assert serves(server, app["slug"], {"version": "good"})
    after = get_app(server, app["id"])
    assert after["current_deployment_id"] == good
    with server.api() as api:
        deployments = api.get(f"/apps/{app['id']}/deployments/").json()["data"]
    failed = [d for d in deployments if d["id"] != good]
    assert len(failed) == 1 and failed[0]["status"] in FAILED_STATUSES, failed
    assert failed[0]["failure"]["error_message"], failed[0]
