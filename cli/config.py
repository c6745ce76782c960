"""Where the CLI finds the server and the token.

Resolved once, at the entry point, from the environment and ``config.json``:

* ``$FASTAPI_DEPLOY_CONFIG_DIR`` (default ``~/.config/fastapi-deploy``) holds ``config.json``:
  ``{"url": ..., "token": ...}``, written by ``login`` with mode 0600 (it holds a credential).
* ``$FASTAPI_DEPLOY_URL`` / ``$FASTAPI_DEPLOY_TOKEN`` override the stored values (for CI).

A stored token is only sent to the URL it was stored for: pointing ``FASTAPI_DEPLOY_URL`` at another server
without ``FASTAPI_DEPLOY_TOKEN`` must not leak the saved credential to it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cli.errors import CLIError

DEFAULT_URL = "http://127.0.0.1:8000"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Config:
    """The resolved connection settings."""

    url: str
    """Base URL of the control plane, without ``/api/v1`` and without a trailing slash."""
    token: str | None
    """Bearer token, or ``None`` when not logged in (requests go out unauthenticated; the server says 401)."""
    directory: Path
    """The config folder (``config.json`` lives there)."""

    @property
    def file(self) -> Path:
        return self.directory / CONFIG_FILE

    @classmethod
    def load(cls, environ: Mapping[str, str]) -> Config:
        """Read ``config.json`` and apply the environment overrides.

        Raises CLIError when ``config.json`` exists but is unreadable.
        """
        directory = config_dir(environ)
        stored = read_stored(directory)
        stored_url = normalize_url(stored["url"]) if "url" in stored else None
        url = normalize_url(environ.get("FASTAPI_DEPLOY_URL") or stored_url or DEFAULT_URL)
        token = environ.get("FASTAPI_DEPLOY_TOKEN") or (stored.get("token") if url == stored_url else None)
        return cls(url=url, token=token or None, directory=directory)


def config_dir(environ: Mapping[str, str]) -> Path:
    explicit = environ.get("FASTAPI_DEPLOY_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(environ.get("HOME") or Path.home()) / ".config" / "fastapi-deploy"


def normalize_url(url: str) -> str:
    """``http://host:8000/`` -> ``http://host:8000``; rejects anything that is not http(s)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CLIError(
            "Invalid server URL",
            f"{url!r} is not an http:// or https:// URL.",
            hint="Use the control plane's address, e.g. http://127.0.0.1:8000",
            code="invalid_input",
        )
    return url.removesuffix("/api/v1")


def read_stored(directory: Path) -> dict[str, str]:
    path = directory / CONFIG_FILE
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CLIError("Cannot read the config", f"{path}: {exc.strerror}", code="config_error") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CLIError(
            "Invalid config file",
            f"{path} is not valid JSON.",
            hint="Run `fastapi-deploy login` again, or delete the file.",
            code="config_error",
        ) from exc
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k in ("url", "token") and isinstance(v, str)}


def save(directory: Path, *, url: str, token: str) -> Path:
    """Write ``config.json`` atomically with mode 0600 (the folder 0700); returns its path."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / CONFIG_FILE
    # mkstemp creates the file 0600, so the token is never readable by others, not even briefly.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"url": normalize_url(url), "token": token}, f)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove(directory: Path) -> bool:
    """Delete ``config.json``; False when there was none."""
    try:
        (directory / CONFIG_FILE).unlink()
    except FileNotFoundError:
        return False
    return True
