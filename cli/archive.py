"""Packing a project into the tar.zst archive that ``push`` uploads.

This is the official client's ``commands/deploy/archive.py`` (fastapi-cloud-cli 0.28) rule for rule, so a
project uploads the same files with either client:

* ``rignore`` walks the tree (ripgrep's ``ignore`` crate): ``.ignore`` and ``.fastapicloudignore`` are
  honoured everywhere, ``.gitignore`` only inside a git repository; hidden files are included.
* Always left out: any path component named ``.venv``, ``__pycache__``, ``.mypy_cache``, ``.pytest_cache``,
  ``.git``, ``.gitignore``, ``.fastapicloudignore`` or ``.fastapicloud``; ``*.pyc``; ``.env`` and
  ``.env.*`` (but ``.envrc`` is uploaded).
* ``fastar`` writes a zstd-compressed tar of regular files, named relative to the project root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fastar
import rignore

EXCLUDED_PARTS = frozenset(
    {
        ".venv",
        "__pycache__",
        ".mypy_cache",
        ".pytest_cache",
        ".git",
        ".gitignore",
        ".fastapicloudignore",
        ".fastapicloud",
    }
)
IGNORE_FILE = ".fastapicloudignore"
LARGE_FILE_BYTES = 10 * 1024 * 1024  # the official client's default warning threshold


@dataclass(frozen=True)
class Archive:
    path: Path
    file_count: int
    size_bytes: int
    """Size of the compressed archive: what ``archive_size_bytes`` reports."""


def should_exclude(path: Path) -> bool:
    """True for paths that are never uploaded, whatever the ignore files say."""
    if EXCLUDED_PARTS.intersection(path.parts):
        return True
    if path.suffix == ".pyc":
        return True
    return path.name == ".env" or path.name.startswith(".env.")


def files_to_upload(root: Path) -> list[Path]:
    """The files ``build`` would pack, as absolute paths, in walk order."""
    walker = rignore.walk(
        root,
        should_exclude_entry=should_exclude,
        additional_ignore_paths=[IGNORE_FILE],
        ignore_hidden=False,
    )
    return [path for path in walker if not path.is_dir()]


def build(root: Path, tar_path: Path) -> Archive:
    """Write the project at ``root`` to ``tar_path`` (tar + zstd); ``file_count`` 0: nothing to deploy."""
    count = 0
    with fastar.open(tar_path, "w:zst", sparse=False) as tar:
        for path in files_to_upload(root):
            tar.append(path, arcname=path.relative_to(root))
            count += 1
    return Archive(path=tar_path, file_count=count, size_bytes=tar_path.stat().st_size)


def large_files(root: Path, threshold: int = LARGE_FILE_BYTES) -> list[tuple[Path, int]]:
    """Uploaded files above ``threshold`` bytes, largest first, relative to ``root``."""
    sizes = [(path.relative_to(root), path.stat().st_size) for path in files_to_upload(root)]
    return sorted((item for item in sizes if item[1] > threshold), key=lambda item: item[1], reverse=True)
