"""``fastapi-deploy push``: archive a project, upload it, follow the build, print the URL.

The sequence is the official ``fastapi deploy``'s (fastapi-cloud-api.md §4.1), with the app found or
created by name instead of through a linked ``.fastapicloud/cloud.json``:

    archive -> GET /teams/ (default team) -> GET /apps/?team_id= -> POST /apps/ (when new)
    -> POST /apps/{id}/deployments/ -> POST /deployments/{id}/upload -> POST <storage url>
    -> POST /deployments/{id}/upload-complete -> build log -> status polling
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Annotated, Any, BinaryIO, cast

import httpx
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cli import archive, watch
from cli.client import Client, error_from_response
from cli.errors import APIError, CLIError, TransportError
from cli.output import JsonOption, Output
from cli.resolve import App, default_team, find_app, iter_apps, slugify
from cli.session import use

app = typer.Typer()

# The storage upload goes to a presigned URL with a fresh client: no Bearer token leaves for it.
UPLOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
IGNORE_HINT = (
    "Exclude files from the upload with a .fastapicloudignore file (same syntax as .gitignore), "
    "e.g. data sets, build output or virtual environments."
)


@app.command()
def push(
    ctx: typer.Context,
    path: Annotated[
        Path | None,
        typer.Argument(metavar="PATH", help="Folder of the FastAPI project (default: the current folder)."),
    ] = None,
    app_name: Annotated[
        str | None, typer.Option("--app", help="App name (default: the folder name, slugified).")
    ] = None,
    team: Annotated[str | None, typer.Option("--team", help="Team id (default: your first team).")] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once uploaded; don't follow the build.")
    ] = False,
    fail_on_breaking: Annotated[
        bool,
        typer.Option(
            "--fail-on-breaking",
            help="Refuse to switch traffic if the new revision's API breaks the serving one's.",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Deploy a FastAPI project: upload it, build it, and print its URL."""
    session = use(ctx, json_output)
    out, client = session.output, session.client

    root = (path or Path.cwd()).resolve()
    if not root.is_dir():
        raise CLIError(
            "Not a folder", f"{root} is not a directory.", hint="Pass the folder of your FastAPI project."
        )
    name = app_name or slugify(root.name)
    if not name:
        raise CLIError(
            "Cannot name the app",
            f"The folder name {root.name!r} has no letters or digits to build an app name from.",
            hint="Pass --app NAME.",
            code="invalid_input",
        )

    with tempfile.TemporaryDirectory(prefix="fastapi-deploy-") as tmp:
        # Pack first: an empty project must not leave a new, empty app behind.
        packed = archive.build(root, Path(tmp) / "archive.tar")
        if packed.file_count == 0:
            raise CLIError(
                "Nothing to deploy",
                f"No files to upload in {root}.",
                hint="Check the path, and that .gitignore or .fastapicloudignore don't exclude your files.",
                code="invalid_input",
            )
        target = find_or_create_app(client, out, team_id=team or default_team(client), name=name)
        slug = str(target["slug"])
        out.say(f"Deploying {root} to app {slug}")
        for rel, size in archive.large_files(root)[:3]:
            out.warn(f"{rel} is large ({format_size(size)})", IGNORE_HINT)
        files = "file" if packed.file_count == 1 else "files"
        out.say(f"Packed {packed.file_count} {files} ({format_size(packed.size_bytes)})")

        deployment = create_deployment(client, str(target["id"]), packed, fail_on_breaking=fail_on_breaking)
        deployment = upload(client, out, str(deployment["id"]), packed)

    if no_wait:
        if out.json_mode:
            out.emit(watch.result(deployment, app_slug=slug))
        else:
            out.say(f"Deployment {deployment['id']} uploaded; the build runs on the server.")
            out.say(f"Follow it with `fastapi-deploy deployments {slug}`.")
            out.say(f"Dashboard: {deployment.get('dashboard_url')}")
        return

    final = watch.follow(client, out, deployment, build_log=True)
    watch.report(out, final, app_slug=slug, fallback_url=deployment.get("url"))


def find_or_create_app(client: Client, out: Output, *, team_id: str, name: str) -> App:
    """The team's app called ``name`` (by id, slug or name), created when there is none."""
    apps = list(iter_apps(client, team_id=team_id))
    slug = slugify(name)
    found = find_app(apps, name) or next((a for a in apps if a.get("slug") == slug), None)
    if found is not None:
        return dict(found)
    created: App = client.post("/apps/", json={"team_id": team_id, "name": name, "directory": None})
    out.say(f"Created app {created['slug']}")
    return created


def create_deployment(
    client: Client, app_id: str, packed: archive.Archive, *, fail_on_breaking: bool = False
) -> dict[str, Any]:
    body: dict[str, Any] = {"archive_size_bytes": packed.size_bytes}
    if fail_on_breaking:
        body["fail_on_breaking"] = True
    try:
        created: dict[str, Any] = client.post(f"/apps/{app_id}/deployments/", json=body)
    except APIError as err:
        if err.status != 413:
            raise
        size = f"{format_size(packed.size_bytes)} compressed, {packed.file_count} files"
        raise CLIError(
            "Archive too large",
            err.message or f"The app source code ({size}) exceeds the maximum allowed size.",
            hint=IGNORE_HINT,
            code="too_large",
        ) from err
    return created


def upload(client: Client, out: Output, deployment_id: str, packed: archive.Archive) -> dict[str, Any]:
    """Upload the archive and mark it complete; returns the upload-complete Deployment.

    Ctrl-C on the way tells the server (``upload-cancelled``) before giving up.
    """
    try:
        target = client.post(f"/deployments/{deployment_id}/upload")
        send_archive(out, str(target["url"]), dict(target.get("fields") or {}), packed)
        completed: dict[str, Any] = client.post(f"/deployments/{deployment_id}/upload-complete")
    except KeyboardInterrupt:
        cancel_upload(client, deployment_id)
        raise
    return completed


def cancel_upload(client: Client, deployment_id: str) -> None:
    try:
        client.post(f"/deployments/{deployment_id}/upload-cancelled", timeout=5.0)
    except CLIError:
        pass  # best effort, like the official client: the server expires abandoned uploads anyway


def send_archive(out: Output, url: str, fields: dict[str, str], packed: archive.Archive) -> None:
    """POST the archive as multipart/form-data: ``fields`` first, then ``file`` (S3 presigned-POST shape)."""
    with packed.path.open("rb") as raw:
        if out.interactive:
            columns = (TextColumn("Uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, console=out.stderr, transient=True) as progress:
                task = progress.add_task("upload", total=packed.size_bytes)
                reader = ProgressReader(raw, lambda done: progress.update(task, completed=done))
                response = _post_multipart(url, fields, reader)
        else:
            response = _post_multipart(url, fields, raw)
    if response.is_error:
        err = error_from_response(response.status_code, _json_or_none(response))
        raise CLIError("Upload failed", err.message or err.title, hint=err.hint, code=err.code)
    summary = f"Uploaded {format_size(packed.size_bytes)}"
    if out.json_mode:
        out.note(summary)
    else:
        out.say(summary)


def _post_multipart(url: str, fields: dict[str, str], file: IO[bytes] | ProgressReader) -> httpx.Response:
    try:
        with httpx.Client(timeout=UPLOAD_TIMEOUT, follow_redirects=False) as http:
            return http.post(
                url, data=fields, files={"file": ("archive.tar", cast(BinaryIO, file), "application/x-tar")}
            )
    except httpx.HTTPError as exc:
        raise TransportError("Upload failed", f"Could not send the archive to {url}: {exc}") from exc


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class ProgressReader:
    """A binary file that reports how far it has been read.

    httpx streams a multipart file part in 64 KiB ``read()`` calls, so the callback moves a progress bar
    as bytes go out. ``fileno``/``seek``/``tell`` let httpx compute Content-Length without reading.
    """

    def __init__(self, file: BinaryIO, on_progress: Callable[[int], None]) -> None:
        self._file = file
        self._on_progress = on_progress

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._on_progress(self._file.tell())
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


def format_size(size: int) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary units, as the official client)."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    if size >= 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size} bytes"
