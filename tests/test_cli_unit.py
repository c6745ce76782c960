"""Unit tests for the pure parts of the ``fastapi-deploy`` CLI.

No HTTP here, real or faked: the end-to-end tier drives the real CLI against the real server. The archive
is checked against the official client's own ``archive`` function (imported from the venv), and the entry
point is run as a real subprocess.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from fastapi_cloud_cli.api import _models as official_models
from fastapi_cloud_cli.commands.deploy.archive import archive as official_archive
from rich.console import Console

from cli import archive, config, statuses, watch
from cli.client import error_from_response
from cli.env import check_name, display_value, parse_assignments
from cli.errors import APIError, CLIError, ServerUnreachable, TransportError, Unconfirmed
from cli.logs import format_entry, format_timestamp
from cli.output import Output
from cli.push import ProgressReader, format_size
from cli.resolve import app_not_found, find_app, slugify

CLI = Path(sys.executable).with_name("fastapi-deploy")


# --------------------------------------------------------------------------------------------- archive


def _tar_members(path: Path) -> dict[str, bytes]:
    with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as plain:
        data = plain.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = {}
        for member in tar.getmembers():
            assert member.isfile(), f"{member.name} is not a regular file"
            extracted = tar.extractfile(member)
            assert extracted is not None
            members[member.name] = extracted.read()
        return members


def _project(root: Path, *, git: bool) -> Path:
    files = {
        "main.py": "from fastapi import FastAPI\napp = FastAPI()\n",
        "app/api.py": "x = 1\n",
        "app/__pycache__/api.cpython-311.pyc": "bytecode",
        "stray.pyc": "bytecode",
        ".venv/lib/site.py": "venv",
        ".mypy_cache/x.json": "{}",
        ".pytest_cache/v": "cache",
        ".env": "SECRET=1",
        ".env.local": "SECRET=2",
        "config/.env.production": "SECRET=3",
        ".envrc": "use uv",
        ".hidden/notes.txt": "hidden but uploaded",
        ".config": "hidden file",
        ".fastapicloud/cloud.json": '{"app_id": "x"}',
        ".fastapicloudignore": "data/\n*.log\n!keep.log\n",
        "data/big.csv": "a,b\n",
        "server.log": "log",
        "keep.log": "kept by negation",
        ".gitignore": "gitignored.txt\n",
        "gitignored.txt": "only excluded inside a git repository",
        ".ignore": "ignored-by-dot-ignore.txt\n",
        "ignored-by-dot-ignore.txt": "never uploaded",
        "sub/.fastapicloudignore": "local.txt\n",
        "sub/local.txt": "ignored by a nested ignore file",
        "sub/other.txt": "uploaded",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    if git:
        (root / ".git").mkdir()
        (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


@pytest.mark.parametrize("git", [False, True], ids=["plain-folder", "git-repository"])
def test_archive_matches_the_official_client(tmp_path: Path, git: bool) -> None:
    root = _project(tmp_path / "project", git=git)
    ours = archive.build(root, tmp_path / "ours.tar")
    official_count = official_archive(root, tmp_path / "official.tar")

    ours_members = _tar_members(ours.path)
    assert ours_members == _tar_members(tmp_path / "official.tar")
    assert ours.file_count == official_count == len(ours_members)
    assert ours.size_bytes == (tmp_path / "ours.tar").stat().st_size
    assert (tmp_path / "ours.tar").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd magic

    names = set(ours_members)
    assert {"main.py", "app/api.py", ".envrc", ".hidden/notes.txt", ".config", "keep.log"} <= names
    assert {"sub/other.txt", ".ignore"} <= names
    never = {
        "app/__pycache__/api.cpython-311.pyc",
        "stray.pyc",
        ".venv/lib/site.py",
        ".mypy_cache/x.json",
        ".pytest_cache/v",
        ".env",
        ".env.local",
        "config/.env.production",
        ".fastapicloud/cloud.json",
        ".fastapicloudignore",
        "data/big.csv",
        "server.log",
        ".gitignore",
        "ignored-by-dot-ignore.txt",
        "sub/local.txt",
        "sub/.fastapicloudignore",
    }
    assert not names & never
    assert ("gitignored.txt" in names) is not git  # .gitignore applies only inside a git repository
    assert not any(name.startswith(".git/") for name in names)


def test_archive_of_an_empty_project_has_no_files(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / ".venv").mkdir(parents=True)
    (root / ".venv" / "x.py").write_text("")
    (root / ".env").write_text("A=1")
    assert archive.build(root, tmp_path / "a.tar").file_count == 0


def test_large_files_are_reported_largest_first(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 300)
    (tmp_path / "b.bin").write_bytes(b"x" * 500)
    (tmp_path / "small.txt").write_bytes(b"x")
    assert archive.large_files(tmp_path, threshold=100) == [(Path("b.bin"), 500), (Path("a.bin"), 300)]


def test_upload_body_is_fields_then_the_file_and_reports_progress(tmp_path: Path) -> None:
    payload = os.urandom(200 * 1024)  # several of httpx's 64 KiB multipart chunks
    path = tmp_path / "archive.tar"
    path.write_bytes(payload)
    seen: list[int] = []
    with path.open("rb") as raw:
        reader = ProgressReader(raw, seen.append)
        request = httpx.Request(
            "POST",
            "http://storage.invalid/upload",
            data={"upload_token": "t1", "key": "k"},
            files={"file": ("archive.tar", reader, "application/x-tar")},  # type: ignore[dict-item]
        )
        body = request.read()
    assert int(request.headers["content-length"]) == len(body)
    token_at, key_at, file_at = (
        body.index(s) for s in (b'name="upload_token"', b'name="key"', b'name="file"')
    )
    assert token_at < key_at < file_at
    assert b'filename="archive.tar"\r\nContent-Type: application/x-tar' in body
    assert payload in body
    assert len(seen) > 2 and seen == sorted(seen) and seen[-1] == len(payload)


def test_format_size() -> None:
    assert format_size(12) == "12 bytes"
    assert format_size(1536) == "1.5 KB"
    assert format_size(3 * 1024 * 1024) == "3.0 MB"


# --------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("hello", "hello"),
        ("My App", "my-app"),
        ("my_app.v2", "my-app-v2"),
        ("--Weird__Name--", "weird-name"),
        ("Café Crème", "cafe-creme"),
        ("___", ""),
        ("a" * 70, "a" * 63),
        ("a" * 62 + "-b", "a" * 62),  # truncation never leaves a trailing dash
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


APPS: list[dict[str, Any]] = [
    {"id": "a1", "slug": "hello", "name": "Hello"},
    {"id": "hello", "slug": "other", "name": "Other"},
    {"id": "a3", "slug": "shop", "name": "a1"},
    {"id": "a4", "slug": "dup-1", "name": "Dup"},
    {"id": "a5", "slug": "dup-2", "name": "DUP"},
]


@pytest.mark.parametrize(
    ("ref", "expected_id"),
    [
        ("a1", "a1"),  # an id beats a name
        ("hello", "hello"),  # an id beats a slug
        ("other", "hello"),
        ("shop", "a3"),
        ("Other", "hello"),  # name
        ("other-name", None),
        ("HELLO", "a1"),  # case-insensitive name when unique
        ("dup", None),  # ambiguous case-insensitive name
        ("Dup", "a4"),  # exact name
    ],
)
def test_find_app(ref: str, expected_id: str | None) -> None:
    found = find_app(APPS, ref)
    assert (found["id"] if found else None) == expected_id


def test_unknown_app_error() -> None:
    err = app_not_found("nope")
    assert (err.title, err.hint, err.code) == (
        "App not found",
        "`fastapi-deploy apps` lists your apps",
        "not_found",
    )
    assert "nope" in err.message


# --------------------------------------------------------------------------------------------- env


def test_parse_assignments_splits_on_the_first_equals() -> None:
    assert parse_assignments(["A=1", "DATABASE_URL=postgres://u:p@h/db?x=y", "EMPTY=", "_X=a=b=c"]) == {
        "A": "1",
        "DATABASE_URL": "postgres://u:p@h/db?x=y",
        "EMPTY": "",
        "_X": "a=b=c",
    }
    assert parse_assignments(["A=1", "A=2"]) == {"A": "2"}


@pytest.mark.parametrize("item", ["NOEQUALS", "1ABC=x", "A-B=x", "=x", "A B=x", "É=x"])
def test_parse_assignments_rejects_bad_items(item: str) -> None:
    with pytest.raises(CLIError) as caught:
        parse_assignments([item])
    assert caught.value.code == "invalid_input"
    assert caught.value.hint


def test_check_name() -> None:
    assert check_name("SECRET_KEY") == "SECRET_KEY"
    with pytest.raises(CLIError, match="not a valid name"):
        check_name("9LIVES")


def test_secret_values_display() -> None:
    assert display_value({"name": "A", "value": None, "is_secret": True}) == "[secret]"
    assert display_value({"name": "A", "value": None, "is_secret": False}) == "-"
    assert display_value({"name": "A", "value": "x=1", "is_secret": False}) == "x=1"


# --------------------------------------------------------------------------------------------- config


def test_login_file_is_private_and_round_trips(tmp_path: Path) -> None:
    directory = tmp_path / "cfg"
    path = config.save(directory, url="http://127.0.0.1:8000/", token="tok")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"url": "http://127.0.0.1:8000", "token": "tok"}
    assert list(directory.iterdir()) == [path]  # no temporary file left behind

    path.chmod(0o644)
    config.save(directory, url="http://127.0.0.1:8000", token="tok2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    loaded = config.Config.load({"FASTAPI_DEPLOY_CONFIG_DIR": str(directory)})
    assert (loaded.url, loaded.token, loaded.file) == ("http://127.0.0.1:8000", "tok2", path)
    assert config.remove(directory) is True
    assert config.remove(directory) is False


def test_environment_overrides_the_stored_config(tmp_path: Path) -> None:
    config.save(tmp_path, url="http://stored:8000", token="stored-token")
    base = {"FASTAPI_DEPLOY_CONFIG_DIR": str(tmp_path)}

    both = config.Config.load({**base, "FASTAPI_DEPLOY_URL": "http://ci:9000/", "FASTAPI_DEPLOY_TOKEN": "ci"})
    assert (both.url, both.token) == ("http://ci:9000", "ci")

    token_only = config.Config.load({**base, "FASTAPI_DEPLOY_TOKEN": "ci"})
    assert (token_only.url, token_only.token) == ("http://stored:8000", "ci")

    # The stored token belongs to the stored server: never send it elsewhere.
    url_only = config.Config.load({**base, "FASTAPI_DEPLOY_URL": "http://elsewhere:8000"})
    assert (url_only.url, url_only.token) == ("http://elsewhere:8000", None)
    same_url = config.Config.load({**base, "FASTAPI_DEPLOY_URL": "http://stored:8000/api/v1"})
    assert same_url.token == "stored-token"


def test_defaults_without_any_config(tmp_path: Path) -> None:
    loaded = config.Config.load({"HOME": str(tmp_path)})
    assert loaded.url == config.DEFAULT_URL
    assert loaded.token is None
    assert loaded.directory == tmp_path / ".config" / "fastapi-deploy"


def test_bad_config_and_urls_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CLIError, match="not valid JSON"):
        config.Config.load({"FASTAPI_DEPLOY_CONFIG_DIR": str(tmp_path)})
    with pytest.raises(CLIError) as caught:
        config.normalize_url("ftp://host")
    assert caught.value.title == "Invalid server URL"


# --------------------------------------------------------------------------------------------- errors


def _output(*, json_mode: bool) -> tuple[Output, io.StringIO, io.StringIO]:
    stdout, stderr = io.StringIO(), io.StringIO()
    out = Output(
        json_mode=json_mode,
        stdout=Console(file=stdout, width=200, color_system=None),
        stderr=Console(file=stderr, width=200, color_system=None),
    )
    return out, stdout, stderr


ERR = CLIError(
    "Archive too large", "The archive is 300 MB.", hint="Use a .fastapicloudignore file.", code="too_large"
)


def test_human_error_goes_to_stderr() -> None:
    out, stdout, stderr = _output(json_mode=False)
    out.error(ERR)
    assert stdout.getvalue() == ""
    assert stderr.getvalue().splitlines() == [
        "Error: Archive too large",
        "The archive is 300 MB.",
        "Hint: Use a .fastapicloudignore file.",
    ]


def test_human_error_without_message_or_hint() -> None:
    out, _, stderr = _output(json_mode=False)
    out.error(CLIError("Not found"))
    assert stderr.getvalue() == "Error: Not found\n"


def test_json_error_goes_to_stdout() -> None:
    out, stdout, stderr = _output(json_mode=True)
    out.say("human chatter is dropped")
    out.error(ERR)
    assert stderr.getvalue() == ""
    assert json.loads(stdout.getvalue()) == {
        "error": {
            "code": "too_large",
            "title": "Archive too large",
            "message": "The archive is 300 MB.",
            "hint": "Use a .fastapicloudignore file.",
        }
    }


def test_markup_in_data_is_printed_verbatim() -> None:
    out, stdout, _ = _output(json_mode=False)
    out.say("[bold]not markup[/bold]")
    assert stdout.getvalue() == "[bold]not markup[/bold]\n"


def test_table_cells_are_not_markup() -> None:
    out, stdout, _ = _output(json_mode=False)
    out.table(
        ["NAME", "VALUE"], [["SECRET", display_value({"name": "SECRET", "value": None, "is_secret": True})]]
    )
    assert "[secret]" in stdout.getvalue()


def test_error_object_wins_over_detail() -> None:
    body = {
        "detail": "App not found",
        "error": {
            "code": "app_not_found",
            "title": "App not found",
            "message": "No app x.",
            "hint": "List apps.",
        },
    }
    err = error_from_response(404, body)
    assert isinstance(err, APIError)
    assert (err.status, err.code, err.title, err.message, err.hint) == (
        404,
        "app_not_found",
        "App not found",
        "No app x.",
        "List apps.",
    )
    assert not err.retryable


def test_detail_only_errors() -> None:
    err = error_from_response(409, {"detail": "Nothing to roll back to"})
    assert (err.title, err.message, err.code) == ("Conflict", "Nothing to roll back to", "invalid_input")
    validation = {
        "detail": [{"loc": ["body", "name"], "msg": "Value error, bad name", "type": "value_error"}]
    }
    assert error_from_response(422, validation).message == "bad name"


def test_unauthorized_and_server_errors() -> None:
    unauthorized = error_from_response(401, None)
    assert unauthorized.title == "Not logged in"
    assert "fastapi-deploy login" in unauthorized.hint
    server = error_from_response(503, "<html>")
    assert server.retryable and server.title == "Server error" and server.message


def test_error_classes() -> None:
    unreachable = ServerUnreachable("http://127.0.0.1:1")
    assert unreachable.retryable and isinstance(unreachable, TransportError)
    assert unreachable.hint == "Is the server running? Start it with `fastapi-deploy server`"
    assert Unconfirmed("x").exit_code == 3
    assert CLIError("x").exit_code == 1


# --------------------------------------------------------------------------------------------- statuses


def test_status_table_agrees_with_the_official_client() -> None:
    official = official_models.DeploymentStatus
    for member in official:
        ours = statuses.Status(member.value)
        assert ours.value == member.value
        assert (
            statuses.label(member.value) == official.to_human_readable(member) or member is official.unknown
        )
        assert statuses.is_terminal(member.value) == (member in official_models.TERMINAL_STATUSES)
        assert statuses.is_success(member.value) == (member in official_models.SUCCESSFUL_STATUSES)
        assert statuses.is_failure(member.value) == (member in official_models.FAILED_STATUSES)
        build_failed = statuses.outcome(member.value) is statuses.Outcome.BUILD_FAILED
        assert build_failed == (member in official_models.BUILD_FAILED_STATUSES)
    assert {s.value for s in statuses.Status} == {s.value for s in official}


def test_unknown_status_is_pending() -> None:
    assert statuses.outcome("brand_new_status") is statuses.Outcome.PENDING
    assert not statuses.is_terminal("brand_new_status")
    assert statuses.label("brand_new_status") == "brand_new_status"
    assert not statuses.is_terminal("upload_cancelled")  # as the official client


def test_deployment_results() -> None:
    failed = {
        "id": "d1",
        "app_id": "a1",
        "status": "building_image_failed",
        "url": "http://hello.localhost:8080/",
        "dashboard_url": "http://127.0.0.1:8000/t/apps/hello",
        "failure": {
            "error_code": "building_image_failed",
            "error_title": "Build failed",
            "error_message": "No module named 'fastapi'",
            "error_hint": "Add fastapi to your dependencies.",
        },
    }
    assert watch.result(failed, app_slug="hello") == {
        "deployment_id": "d1",
        "app_id": "a1",
        "app": "hello",
        "status": "building_image_failed",
        "url": "http://hello.localhost:8080/",
        "dashboard_url": "http://127.0.0.1:8000/t/apps/hello",
        "failure": failed["failure"],
    }
    assert not watch.Finished(failed).ok
    err = watch.failure_error(failed)
    assert (err.title, err.message, err.hint) == (
        "Build failed",
        "No module named 'fastapi'",
        "Add fastapi to your dependencies.",
    )

    bare = {"id": "d2", "status": "verifying_failed", "failure": None, "dashboard_url": "http://dash/d2"}
    bare_err = watch.failure_error(bare)
    assert bare_err.title == "Deployment failed: Verification Failed"
    assert bare_err.hint == "Build logs: http://dash/d2"

    assert watch.Finished({"status": "verifying_skipped"}).ok
    assert not watch.Finished({"status": "success"}, build_failed=True).ok
    assert not watch.Finished({"status": "upload_cancelled"}).ok


def test_build_log_lines() -> None:
    assert watch.parse_build_line('{"type": "message", "message": "hi", "id": "3"}') == {
        "type": "message",
        "message": "hi",
        "id": "3",
    }
    assert watch.parse_build_line('{"type": "complete"}') == {"type": "complete"}
    for skipped in ("not json", "[1]", '{"message": "no type"}', '{"type": "message"}', '{"type": 1}'):
        assert watch.parse_build_line(skipped) is None


def test_backoff() -> None:
    assert [watch.backoff(n) for n in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 8.0, 30.0]


def test_log_entry_format() -> None:
    entry = {"timestamp": "2024-05-01T12:00:00.123456+00:00", "level": "WARNING", "message": "disk low\n"}
    assert format_entry(entry).plain == "2024-05-01T12:00:00.123Z WARNING  disk low"
    assert format_timestamp("2024-05-01T14:00:00+02:00") == "2024-05-01T12:00:00.000Z"
    assert format_timestamp("yesterday") == "yesterday"


# --------------------------------------------------------------------------------------------- entry point


def _run(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FASTAPI_DEPLOY_")}
    environ.update(FASTAPI_DEPLOY_CONFIG_DIR=str(tmp_path / "config"), COLUMNS="200", **env)
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, env=environ, timeout=60, check=False
    )


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = _run("--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("login", "logout", "whoami", "push", "apps", "status", "logs", "env", "deployments"):
        assert command in result.stdout
    assert "rollback" in result.stdout and "delete" in result.stdout


def test_push_help(tmp_path: Path) -> None:
    result = _run("push", "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--app", "--team", "--no-wait", "--json"):
        assert option in result.stdout


def test_unreachable_server(tmp_path: Path) -> None:
    result = _run("apps", tmp_path=tmp_path, FASTAPI_DEPLOY_URL="http://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Error: Cannot reach the server" in result.stderr
    assert "Hint: Is the server running? Start it with `fastapi-deploy server`" in result.stderr


def test_unreachable_server_json(tmp_path: Path) -> None:
    result = _run("apps", "--json", tmp_path=tmp_path, FASTAPI_DEPLOY_URL="http://127.0.0.1:1")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert set(error) == {"code", "title", "message", "hint"}
    assert error["hint"] == "Is the server running? Start it with `fastapi-deploy server`"


def test_env_set_rejects_bad_names_before_any_request(tmp_path: Path) -> None:
    result = _run("env", "set", "hello", "1BAD=x", tmp_path=tmp_path, FASTAPI_DEPLOY_URL="http://127.0.0.1:1")
    assert result.returncode == 1
    assert "Error: Invalid environment variable name" in result.stderr
