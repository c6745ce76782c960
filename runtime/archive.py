"""Safe extraction of an uploaded source archive.

The official CLI uploads a tar compressed with Zstandard (``fastar.open(path, "w:zst")``, magic
``28 b5 2f fd``); tar.gz and plain tar are accepted too. The format is detected from the first bytes,
never from the file name.

The upload is untrusted, so extraction is all or nothing: members are checked one by one while the
archive streams through (nothing is ever decompressed into memory whole), written into a staging
directory beside ``dest``, and the staging directory is renamed to ``dest`` only when the whole
archive was read and verified. Any failure removes the staging directory, so nothing is left at
``dest`` and nothing is ever written outside it.

Links. Symbolic links are allowed only when relative and resolving inside the tree (``static ->
shared/static``); they are created after every regular file has been written, so no member is ever
written through a link, and each one is then checked with ``realpath`` (which sees chains such as
``a -> .`` plus ``b -> a/..``). Hard links to a regular file earlier in the archive are
materialised as copies. Any other link rejects the whole archive.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, cast

import zstandard

from runtime.errors import ArchiveTooLarge, ExtractionError

__all__ = ["ExtractLimits", "ExtractResult", "extract_archive"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_FORMATS = {b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"7z\xbc\xaf": "7z"}

_CHUNK = 1024 * 1024
# Compressed bytes handed to the zstd decoder per call. A zstd block of 4 bytes can expand to 128 KiB,
# so this bounds the memory one call can produce (about 4 MiB) whatever the archive claims.
_ZSTD_FEED = 128
# Tar metadata (pax headers, GNU long names) between two members' data. tarfile reads it into memory
# whole, so an archive may not use more than this before the next member.
_HEADER_BUDGET = 1024 * 1024
# tarfile reads ahead in records of 10 KiB; positions may run this far past what it has parsed.
_READ_AHEAD = 64 * 1024
# Tiny archives have a high ratio from tar padding alone (10 KiB of zeros compresses to a few bytes),
# so the bomb ratio is only judged past this many decompressed bytes.
_RATIO_FLOOR = 1024 * 1024
# Bytes per member the tar framing may add to the sum of file sizes (header, long name, padding).
_FRAMING_PER_MEMBER = 4096

_TOO_LARGE_HINT = (
    "Keep data files, build outputs and virtual environments out of the upload: list them in a "
    ".fastapicloudignore file (same syntax as .gitignore)."
)
_REPACK_HINT = (
    "Deploy again with `fastapi deploy` or `fastapi-deploy push`, which pack the project correctly."
)
_LINK_HINT = (
    "Replace the link with a copy of what it points to (links must be relative and stay inside "
    "the project), or exclude it with .fastapicloudignore."
)


@dataclass(frozen=True)
class ExtractLimits:
    """Size limits for one upload. All sizes in bytes."""

    max_archive_bytes: int = 100 * 1024 * 1024
    """Size of the uploaded (compressed) file; the official CLI reports the same number at create time."""
    max_total_bytes: int = 1024 * 1024 * 1024
    """Sum of the sizes of the extracted files, counted as bytes are actually decompressed."""
    max_files: int = 20_000
    """Entries created: files, directories (explicit or implied by a path) and links, so a flood of
    empty directories is bounded too."""
    max_file_bytes: int = 512 * 1024 * 1024
    """Size of any one file."""
    max_ratio: float = 200.0
    """Decompressed over compressed size; above it the upload is treated as a decompression bomb."""


@dataclass(frozen=True)
class ExtractResult:
    files: int
    """Regular files written (hard links count, as they become copies)."""
    total_bytes: int
    """Sum of their sizes."""


def extract_archive(archive: Path, dest: Path, limits: ExtractLimits = ExtractLimits()) -> ExtractResult:
    """Extract ``archive`` (tar.zst, tar.gz or tar) into ``dest``, all or nothing.

    ``dest`` must not exist or be an empty directory; its parent is created if needed. Files get mode
    0644 (0755 when any executable bit is set), directories 0755; owners, times and special bits
    from the archive are ignored.

    Raises:
        ArchiveTooLarge: a size, count or ratio limit was exceeded (checked while streaming).
        ExtractionError: not an archive, corrupt or truncated data, or an unsafe member (absolute or
            ``..`` path, link leaving the tree, device or FIFO, bad name, file over a directory).
        FileExistsError: ``dest`` exists and is not an empty directory (a caller bug, not the user's).
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"extraction target {dest} exists and is not an empty directory")
    try:
        compressed_size = archive.stat().st_size
    except OSError as exc:
        raise ExtractionError(
            f"The uploaded archive could not be read: {exc.strerror}.", hint=_REPACK_HINT
        ) from exc
    if compressed_size > limits.max_archive_bytes:
        raise ArchiveTooLarge(
            f"The archive is {_size(compressed_size)}, over the limit of {_size(limits.max_archive_bytes)}.",
            hint=_TOO_LARGE_HINT,
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extracting-", dir=dest.parent))
    try:
        with archive.open("rb") as raw:
            source = _open_decompressed(raw)
            meter = _Meter(source, limits, compressed_size)
            writer = _TreeWriter(staging, limits)
            _extract_stream(meter, writer)
        writer.create_links()
        staging.chmod(0o755)
        os.rename(staging, dest)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, ExtractionError):
            raise
        if isinstance(exc, tarfile.TarError | zstandard.ZstdError | EOFError | zlib.error | gzip.BadGzipFile):
            raise ExtractionError(
                f"The archive is corrupt or truncated ({exc}).", hint=_REPACK_HINT, title="Corrupt archive"
            ) from exc
        if isinstance(exc, OSError) and exc.filename is not None and str(staging) in str(exc.filename):
            raise ExtractionError(
                f"A member could not be written: {exc.strerror} ({_relative(exc.filename, staging)}).",
                hint="Check the file names in the project (length, depth), then deploy again.",
            ) from exc
        raise
    return ExtractResult(files=writer.files, total_bytes=writer.total_bytes)


def _extract_stream(meter: _Meter, writer: _TreeWriter) -> None:
    try:
        tar = tarfile.open(fileobj=cast(BinaryIO, meter), mode="r|")
    except tarfile.ReadError as exc:
        if meter.position == 0:
            raise ExtractionError("The archive is empty.", hint=_REPACK_HINT) from exc
        raise ExtractionError(
            "The upload is not a tar archive (expected a Zstandard-compressed tar, as the FastAPI CLI "
            "sends; tar.gz and plain tar are accepted too).",
            hint=_REPACK_HINT,
            title="Not an archive",
        ) from exc
    with tar:
        for count, member in enumerate(tar, start=1):
            # tarfile keeps every header it has read; bound them even when members repeat a name.
            if count > writer.limits.max_files:
                raise ArchiveTooLarge(
                    f"The archive has more than {writer.limits.max_files} members.", hint=_TOO_LARGE_HINT
                )
            # Allow the member's data plus the next member's metadata; a pax header claiming
            # gigabytes is refused here instead of being read into memory by tarfile.
            data_bytes = _round_block(member.size) if member.isreg() else 0
            meter.budget_end = member.offset_data + data_bytes + _HEADER_BUDGET
            writer.add(tar, member)
        _check_end_of_archive(meter, tar.offset)
    # Read what is left (end padding) so the compression layer verifies its checksums and notices a
    # stream cut short; the meter keeps limiting it.
    meter.budget_end = None
    while meter.read(_CHUNK):
        pass


def _check_end_of_archive(meter: _Meter, offset: int) -> None:
    # tarfile ends iteration silently on a missing, short or invalid header after the first one, so a
    # cut at a member boundary would look like a smaller archive. Demand the zero block it stopped at.
    block = meter.history(offset, tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise ExtractionError(
            "The archive is truncated: it ends before the end-of-archive marker.",
            hint=_REPACK_HINT,
            title="Corrupt archive",
        )
    if block.count(0) != tarfile.BLOCKSIZE:
        raise ExtractionError(
            f"The archive is corrupt: invalid member header at byte {offset}.",
            hint=_REPACK_HINT,
            title="Corrupt archive",
        )


class _Source(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _open_decompressed(raw: BinaryIO) -> _Source:
    head = raw.read(8)
    raw.seek(0)
    if head.startswith(_ZSTD_MAGIC):
        return _ZstdSource(raw)
    if head.startswith(_GZIP_MAGIC):
        return cast(_Source, gzip.GzipFile(fileobj=raw, mode="rb"))
    for magic, name in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise ExtractionError(
                f"The upload is a {name} archive; only tar (Zstandard, gzip or uncompressed) is accepted.",
                hint=_REPACK_HINT,
                title="Not an archive",
            )
    # Anything else may be a plain tar; tarfile checks the first header's checksum.
    return cast(_Source, raw)


class _ZstdSource:
    """Decompresses zstd frames with bounded memory, and notices a frame cut short.

    ``zstandard``'s stream reader returns a silent EOF on truncated input, so frames are decoded with a
    ``decompressobj`` fed a few bytes at a time (``_ZSTD_FEED``), which bounds each call's output.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._decoder = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._input = b""
        self._input_pos = 0
        self._output = b""
        self._output_pos = 0
        self._done = False

    def read(self, size: int, /) -> bytes:
        while self._output_pos >= len(self._output):
            if self._done:
                return b""
            self._output = self._step()
            self._output_pos = 0
        data = self._output[self._output_pos : self._output_pos + size]
        self._output_pos += len(data)
        return data

    def _step(self) -> bytes:
        if self._input_pos >= len(self._input):
            self._input = self._raw.read(64 * 1024)
            self._input_pos = 0
            if not self._input:
                self._done = True
                if self._in_frame:
                    raise ExtractionError(
                        "The archive is truncated: the Zstandard stream ends in the middle of a frame.",
                        hint=_REPACK_HINT,
                        title="Corrupt archive",
                    )
                return b""
        piece = self._input[self._input_pos : self._input_pos + _ZSTD_FEED]
        self._input_pos += len(piece)
        out = []
        while piece:
            self._in_frame = True
            out.append(self._decoder.decompress(piece))
            if self._decoder.eof:
                # Frames may be concatenated; the bytes after this one start the next.
                piece = self._decoder.unused_data
                self._decoder = zstandard.ZstdDecompressor().decompressobj()
                self._in_frame = False
            else:
                piece = b""
        return b"".join(out)


class _Meter:
    """The decompressed byte stream tarfile reads, counted and limited as it flows.

    Position is in the same coordinates as tarfile's offsets. Keeps the last bytes read so the end of
    the archive can be checked after tarfile has consumed it.
    """

    _HISTORY = 64 * 1024

    def __init__(self, source: _Source, limits: ExtractLimits, compressed_size: int) -> None:
        self._source = source
        self.limits = limits
        self._compressed_size = max(compressed_size, 1)
        self._max_stream = limits.max_total_bytes + (limits.max_files + 1) * _FRAMING_PER_MEMBER
        self.position = 0
        self.budget_end: int | None = _HEADER_BUDGET
        self._history = bytearray()
        self._history_start = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(_CHUNK if size < 0 else size)
        self.position += len(data)
        self._history += data
        if len(self._history) > 2 * self._HISTORY:
            drop = len(self._history) - self._HISTORY
            del self._history[:drop]
            self._history_start += drop
        self._check()
        return data

    def history(self, offset: int, size: int) -> bytes:
        start = offset - self._history_start
        if start < 0:
            return b""
        return bytes(self._history[start : start + size])

    def _check(self) -> None:
        if self.position > _RATIO_FLOOR and self.position > self.limits.max_ratio * self._compressed_size:
            raise ArchiveTooLarge(
                f"The archive expands to more than {self.limits.max_ratio:g} times its compressed size "
                f"({_size(self._compressed_size)}); it was rejected as a likely decompression bomb.",
                hint=_TOO_LARGE_HINT,
            )
        if self.position > self._max_stream:
            raise ArchiveTooLarge(
                f"The archive expands to more than {_size(self.limits.max_total_bytes)}.",
                hint=_TOO_LARGE_HINT,
            )
        if self.budget_end is not None and self.position > self.budget_end + _READ_AHEAD:
            raise ExtractionError(
                f"The archive has over {_size(_HEADER_BUDGET)} of tar metadata (pax headers or long "
                "names) before a member; it was rejected.",
                hint=_REPACK_HINT,
            )


_Kind = Literal["file", "dir", "link"]
_Parts = tuple[str, ...]


class _TreeWriter:
    """Writes members into the staging root after checking each one; links are deferred."""

    def __init__(self, root: Path, limits: ExtractLimits) -> None:
        self._root = root
        self.limits = limits
        self._kinds: dict[_Parts, _Kind] = {(): "dir"}
        self._links: list[tuple[_Parts, str]] = []
        self.files = 0
        self.total_bytes = 0

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _member_parts(member.name, what="member")
        if member.type in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}.get(
                member.type, "FIFO"
            )
            raise ExtractionError(
                f"The archive contains a {kind} ({member.name!r}); only files, directories and links "
                "are allowed.",
                hint="Exclude it from the upload with .fastapicloudignore.",
            )
        if member.issparse():
            raise ExtractionError(
                f"The archive contains a sparse file ({member.name!r}), which is not supported.",
                hint=_REPACK_HINT,
            )
        if member.isdir():
            if parts:
                self._make_dirs(parts, member.name)
        elif member.isreg():
            self._write_file(tar, member, parts)
        elif member.issym():
            self._record_symlink(member, parts)
        elif member.islnk():
            self._copy_hardlink(member, parts)
        else:
            raise ExtractionError(
                f"The archive contains a member of unsupported type {member.type!r} ({member.name!r}).",
                hint=_REPACK_HINT,
            )

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: _Parts) -> None:
        limits = self.limits
        if member.size > limits.max_file_bytes:
            raise ArchiveTooLarge(
                f"{member.name!r} is {_size(member.size)}, over the per-file limit of "
                f"{_size(limits.max_file_bytes)}.",
                hint=_TOO_LARGE_HINT,
            )
        if self.total_bytes + member.size > limits.max_total_bytes:
            raise ArchiveTooLarge(
                f"The extracted files add up to more than {_size(limits.max_total_bytes)}.",
                hint=_TOO_LARGE_HINT,
            )
        path = self._prepare(parts, member.name, "file")
        data = tar.extractfile(member)
        if data is None:  # pragma: no cover - tarfile returns a reader for every regular file
            raise ExtractionError(f"{member.name!r} has no data.", hint=_REPACK_HINT)
        written = 0
        with data, _create(path, 0o755 if member.mode & 0o111 else 0o644) as out:
            while chunk := data.read(_CHUNK):
                written += len(chunk)
                # The header's size is only a claim; count what actually arrives.
                if written > limits.max_file_bytes or self.total_bytes + written > limits.max_total_bytes:
                    raise ArchiveTooLarge(
                        f"{member.name!r} expands past the size limits.", hint=_TOO_LARGE_HINT
                    )
                out.write(chunk)
        self.total_bytes += written

    def _copy_hardlink(self, member: tarfile.TarInfo, parts: _Parts) -> None:
        target = _hardlink_target(member)
        if self._kinds.get(target) != "file":
            raise ExtractionError(
                f"The archive contains a hard link {member.name!r} -> {member.linkname!r} whose target is "
                "not a file earlier in the archive.",
                hint=_LINK_HINT,
                title="Unsafe link in archive",
            )
        source = self._root.joinpath(*target)
        size = source.stat().st_size
        if self.total_bytes + size > self.limits.max_total_bytes:
            raise ArchiveTooLarge(
                f"The extracted files add up to more than {_size(self.limits.max_total_bytes)}.",
                hint=_TOO_LARGE_HINT,
            )
        path = self._prepare(parts, member.name, "file")
        with source.open("rb") as src, _create(path, source.stat().st_mode & 0o755) as out:
            shutil.copyfileobj(src, out, _CHUNK)
        self.total_bytes += size

    def _record_symlink(self, member: tarfile.TarInfo, parts: _Parts) -> None:
        target = member.linkname
        unsafe = (
            not target
            or target.startswith("/")
            or "\x00" in target
            or not _is_utf8(target)
            or _escapes(parts[:-1], target)
        )
        if unsafe:
            raise ExtractionError(
                f"The archive contains a symbolic link {member.name!r} -> {target!r} that points outside "
                "the project.",
                hint=_LINK_HINT,
                title="Unsafe link in archive",
            )
        self._prepare(parts, member.name, "link")
        self._links.append((parts, target))

    def create_links(self) -> None:
        """Create the deferred symlinks, then check where each really resolves (chains included)."""
        for parts, target in self._links:
            os.symlink(target, self._root.joinpath(*parts))
        root = os.path.realpath(self._root)
        for parts, target in self._links:
            resolved = os.path.realpath(self._root.joinpath(*parts))
            if resolved != root and not resolved.startswith(root + os.sep):
                raise ExtractionError(
                    f"The archive contains a symbolic link {'/'.join(parts)!r} -> {target!r} that resolves "
                    "outside the project (through another link).",
                    hint=_LINK_HINT,
                    title="Unsafe link in archive",
                )

    def _prepare(self, parts: _Parts, name: str, kind: _Kind) -> Path:
        """Checks that an entry of ``kind`` may be created at ``parts``; creates its parents."""
        if not parts:
            raise ExtractionError(f"The archive contains a {kind} with an empty name.", hint=_REPACK_HINT)
        self._make_dirs(parts[:-1], name)
        existing = self._kinds.get(parts)
        path = self._root.joinpath(*parts)
        if existing == "dir":
            raise ExtractionError(
                f"The archive member {name!r} would overwrite a directory of the same name.",
                hint=_REPACK_HINT,
            )
        if existing == "link" or (existing == "file" and kind == "link"):
            raise ExtractionError(
                f"The archive contains {name!r} twice, once as a symbolic link.", hint=_REPACK_HINT
            )
        if existing == "file":
            # A later duplicate wins, as with tar; the earlier copy's bytes stay counted.
            path.unlink()
        else:
            self._count_entry()
        self._kinds[parts] = kind
        if kind == "file" and existing is None:
            self.files += 1
        return path

    def _make_dirs(self, parts: _Parts, name: str) -> None:
        for depth in range(1, len(parts) + 1):
            prefix = parts[:depth]
            existing = self._kinds.get(prefix)
            if existing == "dir":
                continue
            if existing is not None:
                raise ExtractionError(
                    f"The archive member {name!r} needs {'/'.join(prefix)!r} to be a directory, but it is "
                    f"a {'symbolic link' if existing == 'link' else 'file'}.",
                    hint=_REPACK_HINT,
                )
            self._count_entry()
            path = self._root.joinpath(*prefix)
            path.mkdir()
            path.chmod(0o755)
            self._kinds[prefix] = "dir"

    def _count_entry(self) -> None:
        if len(self._kinds) > self.limits.max_files:
            raise ArchiveTooLarge(
                f"The archive has more than {self.limits.max_files} files and directories.",
                hint=_TOO_LARGE_HINT,
            )


def _member_parts(name: str, *, what: str) -> _Parts:
    """The path components of a member name, or ExtractionError if it is not a safe relative path."""
    if "\x00" in name or not _is_utf8(name):
        raise ExtractionError(
            f"The archive contains a {what} whose name is not valid UTF-8 text ({name!r}).", hint=_REPACK_HINT
        )
    if name.startswith("/"):
        raise ExtractionError(
            f"The archive contains an absolute path ({name!r}); members must be relative to the project.",
            hint=_REPACK_HINT,
            title="Unsafe path in archive",
        )
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ExtractionError(
            f"The archive contains a path with '..' ({name!r}) that could escape the project.",
            hint=_REPACK_HINT,
            title="Unsafe path in archive",
        )
    return parts


def _hardlink_target(member: tarfile.TarInfo) -> _Parts:
    # Hard link targets name another member, so they follow the member name rules.
    try:
        return _member_parts(member.linkname, what="link target")
    except ExtractionError as exc:
        raise ExtractionError(
            f"The archive contains a hard link {member.name!r} -> "
            f"{member.linkname!r} that points outside the project.",
            hint=_LINK_HINT,
            title="Unsafe link in archive",
        ) from exc


def _escapes(directory: _Parts, target: str) -> bool:
    """Whether ``target``, relative to ``directory``, climbs above the root (lexically)."""
    depth = len(directory)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _create(path: Path, mode: int) -> BinaryIO:
    # O_EXCL and O_NOFOLLOW: never write through something that appeared at the path.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, mode)  # exact mode whatever the umask; never setuid/setgid/sticky
    return os.fdopen(fd, "wb")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # surrogates stand for bytes that were not UTF-8
    except UnicodeEncodeError:
        return False
    return True


def _round_block(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _relative(filename: object, root: Path) -> str:
    return os.path.relpath(str(filename), root)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
