"""Static assets (CSS, JS, the vendored uPlot), served from memory with content-hashed URLs.

Every file under ``dashboard/static`` is read once, when the dashboard is first used. Pages link to
``/dashboard/static/NAME?v=DIGEST``: a URL that changes with the content, so browsers may keep it a
year (``immutable``) and an upgrade is picked up at once. Text assets are also kept gzipped. Nothing is
fetched from anywhere else: the platform may run offline, and a CDN would see every page view.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

STATIC = Path(__file__).parent / "static"
PREFIX = "/dashboard/static/"
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_COMPRESS = (".js", ".css", ".svg", ".txt")


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    media_type: str
    digest: str
    """The first 16 hex digits of the content's SHA-256: the ``v`` of its URL, and its ETag."""


class Assets:
    """The static files by name (``vendor/uplot/uPlot.iife.min.js``), loaded once."""

    def __init__(self, root: Path = STATIC) -> None:
        self.files: dict[str, Asset] = {}
        for path in sorted(root.rglob("*")):
            media = _TYPES.get(path.suffix)
            if media is None or not path.is_file():
                continue
            body = path.read_bytes()
            packed = gzip.compress(body, 9, mtime=0) if path.suffix in _COMPRESS else None
            name = path.relative_to(root).as_posix()
            self.files[name] = Asset(
                body=body,
                gzipped=packed if packed is not None and len(packed) < len(body) else None,
                media_type=media,
                digest=hashlib.sha256(body).hexdigest()[:16],
            )

    def url(self, name: str) -> str:
        """The versioned URL of ``name``; KeyError for a file that does not exist (a template bug)."""
        return f"{PREFIX}{name}?v={self.files[name].digest}"

    def size(self, name: str) -> int:
        return len(self.files[name].body)
