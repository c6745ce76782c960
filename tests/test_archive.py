"""Safe extraction: real archives written with tarfile, zstandard and fastar (what the official CLI uses)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import uuid
from collections.abc import Iterable
from pathlib import Path

import fastar
import pytest
import zstandard

from runtime.archive import ExtractLimits, ExtractResult, extract_archive
from runtime.errors import ArchiveTooLarge, ExtractionError

Entry = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    return info, None


def with_pax(entry: Entry, **headers: str) -> Entry:
    # A pax header carries what ustar cannot: a NUL in a name, a huge comment.
    entry[0].pax_headers = headers
    return entry


def tar_bytes(entries: Iterable[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def zst(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw)


class Workspace:
    """An archive file and an extraction target, each in its own directory so strays are visible."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.work = root / "work"
        self.inbox.mkdir()
        self.work.mkdir()
        self.archive = self.inbox / "archive.tar"
        self.dest = self.work / "dest"

    def write(self, data: bytes) -> Path:
        self.archive.write_bytes(data)
        return self.archive

    def extract(self, data: bytes | None = None, limits: ExtractLimits = ExtractLimits()) -> ExtractResult:
        if data is not None:
            self.write(data)
        return extract_archive(self.archive, self.dest, limits)

    def assert_untouched(self) -> None:
        """Nothing at dest, no staging leftovers, nothing written next to the archive or above."""
        assert list(self.work.iterdir()) == []
        assert sorted(p.name for p in self.inbox.iterdir()) == ["archive.tar"]
        assert sorted(p.name for p in self.root.iterdir()) == ["inbox", "work"]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def tree(root: Path) -> dict[str, str]:
    """Relative path -> 'dir', 'link:<target>' or the file's text."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = path.read_text()
    return out


# --- good archives ---------------------------------------------------------------------------------


def test_official_cli_archive_made_with_fastar(ws: Workspace, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "app" / "routers").mkdir(parents=True)
    (project / ".hidden").mkdir()
    (project / "main.py").write_text("from fastapi import FastAPI\napp = FastAPI()\n")
    (project / "app" / "__init__.py").write_text("")
    (project / "app" / "routers" / "items.py").write_text("ITEMS = []\n")
    (project / ".hidden" / "config").write_text("hidden\n")
    (project / ".envrc").write_text("export X=1\n")
    (project / "run.sh").write_text("#!/bin/sh\n")
    (project / "run.sh").chmod(0o4755)  # setuid must not survive
    (project / "static").mkdir()
    (project / "static" / "config").symlink_to("../.hidden/config")  # fastar stores the link itself
    files = ["main.py", "app/__init__.py", "app/routers/items.py", ".hidden/config", ".envrc", "run.sh"]
    # Exactly how fastapi-cloud-cli packs a deploy (commands/deploy/archive.py).
    with fastar.open(ws.archive, "w:zst", sparse=False) as tar:
        for name in [*files, "static/config"]:
            tar.append(project / name, arcname=name)
    assert ws.archive.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"

    result = ws.extract()

    assert result == ExtractResult(files=6, total_bytes=sum((project / f).stat().st_size for f in files))
    assert tree(ws.dest) == {
        ".envrc": "export X=1\n",
        ".hidden": "dir",
        ".hidden/config": "hidden\n",
        "app": "dir",
        "app/__init__.py": "",
        "app/routers": "dir",
        "app/routers/items.py": "ITEMS = []\n",
        "main.py": "from fastapi import FastAPI\napp = FastAPI()\n",
        "run.sh": "#!/bin/sh\n",
        "static": "dir",
        "static/config": "link:../.hidden/config",
    }
    assert (ws.dest / "static" / "config").read_text() == "hidden\n"
    assert stat.S_IMODE((ws.dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((ws.dest / "main.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((ws.dest / "app" / "routers").stat().st_mode) == 0o755
    assert stat.S_IMODE(ws.dest.stat().st_mode) == 0o755
    assert [p.name for p in ws.work.iterdir()] == ["dest"]  # no staging directory left beside it


@pytest.mark.parametrize("compress", ["zst", "gz", "plain", "zst-multiframe"])
def test_formats_detected_by_magic(ws: Workspace, compress: str) -> None:
    entries = [
        special("pkg/", tarfile.DIRTYPE),
        reg("pkg/a.py", b"A = 1\n"),
        reg("pkg/deep/er/b.txt", b"b" * 5000),
        reg(".dotfile", b""),
        reg("./c.py", b"C\n", mode=0o6777),
    ]
    raw = tar_bytes(entries)
    data = {
        "zst": lambda: zst(raw),
        "gz": lambda: _gzip(raw),
        "plain": lambda: raw,
        # Concatenated frames decode as one stream.
        "zst-multiframe": lambda: zst(raw[:3000]) + zst(raw[3000:]),
    }[compress]()

    result = ws.extract(data)

    assert result == ExtractResult(files=4, total_bytes=6 + 5000 + 0 + 2)
    assert tree(ws.dest)["pkg/deep/er/b.txt"] == "b" * 5000
    assert (ws.dest / ".dotfile").read_bytes() == b""
    assert stat.S_IMODE((ws.dest / "c.py").stat().st_mode) == 0o755  # no setuid, setgid or world-write


def _gzip(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw)


def test_dest_may_be_an_existing_empty_directory(ws: Workspace) -> None:
    ws.dest.mkdir()
    ws.extract(zst(tar_bytes([reg("main.py", b"x")])))
    assert tree(ws.dest) == {"main.py": "x"}


def test_dest_must_be_empty(ws: Workspace) -> None:
    ws.dest.mkdir()
    (ws.dest / "old").write_text("keep")
    with pytest.raises(FileExistsError):
        ws.extract(zst(tar_bytes([reg("main.py", b"x")])))
    assert tree(ws.dest) == {"old": "keep"}


def test_in_tree_links(ws: Workspace) -> None:
    ws.extract(
        zst(
            tar_bytes(
                [
                    reg("shared/style.css", b"body{}"),
                    special("static/style.css", tarfile.SYMTYPE, "../shared/style.css"),
                    special("assets", tarfile.SYMTYPE, "shared"),
                    special("copy.css", tarfile.LNKTYPE, "shared/style.css"),
                    reg("shared/style.css", b"body{color:red}"),  # later duplicate wins
                ]
            )
        )
    )
    assert tree(ws.dest) == {
        "assets": "link:shared",
        "copy.css": "body{}",
        "shared": "dir",
        "shared/style.css": "body{color:red}",
        "static": "dir",
        "static/style.css": "link:../shared/style.css",
    }
    assert not (ws.dest / "copy.css").is_symlink()  # hard links become independent copies
    assert (ws.dest / "static" / "style.css").read_text() == "body{color:red}"


def test_empty_tar_extracts_nothing(ws: Workspace) -> None:
    assert ws.extract(zst(tar_bytes([]))) == ExtractResult(files=0, total_bytes=0)
    assert tree(ws.dest) == {}


# --- unsafe members: the whole archive is rejected ------------------------------------------------

OUTSIDE = f"/tmp/fastapi-deploy-test-{uuid.uuid4().hex}"

UNSAFE: dict[str, tuple[list[Entry], str]] = {
    "traversal": ([reg("ok.py", b"ok"), reg("../x", b"evil")], "'..'"),
    "nested traversal": ([reg("app/../../x", b"evil")], "'..'"),
    "absolute": ([reg(OUTSIDE, b"evil")], "absolute path"),
    "symlink absolute": ([special("passwd", tarfile.SYMTYPE, "/etc/passwd")], "outside the project"),
    "symlink up": ([special("app/up", tarfile.SYMTYPE, "../../")], "outside the project"),
    "symlink chain": (
        [special("here", tarfile.SYMTYPE, "."), special("escape", tarfile.SYMTYPE, "here/..")],
        "resolves outside the project",
    ),
    "write through symlink": (
        [reg("sub/keep", b""), special("d", tarfile.SYMTYPE, "sub"), reg("d/f", b"evil")],
        "is a symbolic link",
    ),
    "hardlink up": ([special("h", tarfile.LNKTYPE, "../../etc/passwd")], "hard link"),
    "hardlink absolute": ([special("h", tarfile.LNKTYPE, "/etc/passwd")], "hard link"),
    "hardlink to nothing": ([special("h", tarfile.LNKTYPE, "missing.py")], "not a file earlier"),
    "char device": ([special("null", tarfile.CHRTYPE)], "character device"),
    "block device": ([special("sda", tarfile.BLKTYPE)], "block device"),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], "FIFO"),
    "file over directory": ([reg("app/main.py", b""), reg("app", b"evil")], "overwrite a directory"),
    "file over directory entry": (
        [special("app/", tarfile.DIRTYPE), reg("app", b"")],
        "overwrite a directory",
    ),
    "directory under a file": ([reg("app", b""), reg("app/main.py", b"")], "to be a directory"),
    "NUL in name": ([with_pax(reg("placeholder.py"), path="a\x00b.py")], "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_member_rejects_whole_archive(ws: Workspace, case: str) -> None:
    entries, expected = UNSAFE[case]
    with pytest.raises(ExtractionError) as info:
        ws.extract(zst(tar_bytes(entries)))
    error = info.value
    assert type(error) is ExtractionError
    assert error.code == "extracting_failed"
    assert expected in error.message
    assert error.hint
    ws.assert_untouched()
    assert not Path(OUTSIDE).exists()


def test_non_utf8_name(ws: Workspace) -> None:
    raw = tar_bytes([reg("bad\udcff.py", b"")], fmt=tarfile.GNU_FORMAT)  # the raw byte 0xff
    assert b"bad\xff.py" in raw
    with pytest.raises(ExtractionError, match="not valid UTF-8"):
        ws.extract(zst(raw))
    ws.assert_untouched()


def test_oversized_pax_header_is_not_read_into_memory(ws: Workspace) -> None:
    comment = os.urandom(3 * 1024 * 1024).hex()  # incompressible, so not taken for a bomb
    with pytest.raises(ExtractionError, match="tar metadata") as err:
        ws.extract(zst(tar_bytes([with_pax(reg("main.py", b"x"), comment=comment)])))
    assert type(err.value) is ExtractionError
    ws.assert_untouched()


# --- corrupt, truncated, not an archive ------------------------------------------------------------


def test_truncated_zstd_frame(ws: Workspace) -> None:
    data = zst(tar_bytes([reg("a.py", os.urandom(100_000)), reg("b.py", b"b")]))
    with pytest.raises(ExtractionError, match="truncated") as err:
        ws.extract(data[: len(data) // 2])
    assert err.value.title == "Corrupt archive"
    ws.assert_untouched()


def test_tar_cut_at_a_member_boundary(ws: Workspace) -> None:
    raw = tar_bytes([reg("a.py", b"a" * 512), reg("b.py", b"b")], fmt=tarfile.USTAR_FORMAT)
    # Header + one data block: a well-formed prefix that tarfile alone would take for a smaller archive.
    with pytest.raises(ExtractionError, match="truncated"):
        ws.extract(zst(raw[:1024]))
    ws.assert_untouched()


def test_tar_cut_inside_member_data(ws: Workspace) -> None:
    raw = tar_bytes([reg("a.py", b"a" * 5000)])
    with pytest.raises(ExtractionError, match="corrupt or truncated"):
        ws.extract(zst(raw[:2000]))
    ws.assert_untouched()


def test_corrupt_compressed_data(ws: Workspace) -> None:
    data = bytearray(zst(tar_bytes([reg("a.py", os.urandom(50_000))])))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(ExtractionError, match="corrupt"):
        ws.extract(bytes(data))
    ws.assert_untouched()


def test_corrupt_second_header(ws: Workspace) -> None:
    raw = bytearray(tar_bytes([reg("a.py", b"a"), reg("b.py", b"b")], fmt=tarfile.USTAR_FORMAT))
    raw[1024 + 148 : 1024 + 156] = b"0000000\x00"  # wrong checksum on b.py's header
    with pytest.raises(ExtractionError, match="invalid member header"):
        ws.extract(zst(bytes(raw)))
    ws.assert_untouched()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (b"def main():\n    pass\n" * 100, "not a tar archive"),
        (b"PK\x03\x04" + b"\x00" * 100, "zip archive"),
        (b"\x1f\x8b" + b"\x00" * 100, "corrupt or truncated"),
    ],
)
def test_not_an_archive(ws: Workspace, data: bytes, expected: str) -> None:
    with pytest.raises(ExtractionError, match=expected) as err:
        ws.extract(data)
    assert err.value.hint
    ws.assert_untouched()


# --- size limits ----------------------------------------------------------------------------------


def zero_bomb(declared: int, *, chunk: int = 64 * 1024 * 1024) -> bytes:
    """A tar.zst of one member of zeros with ``declared`` size, built without allocating it.

    The header goes in one zstd frame; the zeros are the same small compressed frame repeated (frames
    concatenate), so a multi-gigabyte member costs a few hundred kilobytes.
    """
    info = tarfile.TarInfo("zeros.bin")
    info.size = declared
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    full, rest = divmod(declared, chunk)
    zeros_frame = zst(b"\x00" * chunk)
    parts = [zst(header), zeros_frame * full]
    tail = rest + (-declared % tarfile.BLOCKSIZE) + 2 * tarfile.BLOCKSIZE
    parts.append(zst(b"\x00" * tail))
    return b"".join(parts)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        # Its header alone gives it away under the default per-file limit...
        (ExtractLimits(), "per-file limit"),
        # ...and with size limits out of the way, the ratio stops it after a few dozen megabytes.
        (ExtractLimits(max_file_bytes=2**40, max_total_bytes=2**40), "decompression bomb"),
    ],
)
def test_ten_gigabyte_bomb(ws: Workspace, limits: ExtractLimits, expected: str) -> None:
    data = zero_bomb(10 * 1024**3)
    assert len(data) < 2 * 1024 * 1024
    with pytest.raises(ArchiveTooLarge, match=expected) as err:
        ws.extract(data, limits)
    assert err.value.code == "extracting_failed_archive_too_large"
    assert err.value.hint
    ws.assert_untouched()


def test_bomb_within_size_limits_is_stopped_by_ratio_while_streaming(ws: Workspace) -> None:
    # 400 MiB passes the per-file and total limits on its header; only the bytes give it away.
    data = zero_bomb(400 * 1024 * 1024)
    with pytest.raises(ArchiveTooLarge, match="decompression bomb"):
        ws.extract(data)
    ws.assert_untouched()


def test_trailing_zeros_after_the_end_marker_are_counted(ws: Workspace) -> None:
    # Every header is honest; gigabytes follow the end-of-archive marker. Only counting bytes stops it.
    raw = tar_bytes([reg("main.py", b"x")])
    data = zst(raw) + zst(b"\x00" * 64 * 1024 * 1024) * 64
    limits = ExtractLimits(max_ratio=1e12, max_total_bytes=10 * 1024 * 1024, max_files=100)
    with pytest.raises(ArchiveTooLarge, match=r"expands to more than 10\.0 MiB"):
        ws.extract(data, limits)
    ws.assert_untouched()


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (ExtractLimits(max_archive_bytes=1000), "over the limit"),
        (ExtractLimits(max_files=10), "more than 10"),
        (ExtractLimits(max_total_bytes=15_000), "add up to more than"),
        (ExtractLimits(max_file_bytes=1_000), "per-file limit"),
    ],
)
def test_limits(ws: Workspace, limits: ExtractLimits, expected: str) -> None:
    entries = [reg(f"pkg/m{i}.py", os.urandom(1500)) for i in range(11)]
    with pytest.raises(ArchiveTooLarge, match=expected) as err:
        ws.extract(zst(tar_bytes(entries)), limits)
    assert err.value.title == "Archive too large"
    assert ".fastapicloudignore" in err.value.hint
    ws.assert_untouched()


def test_file_count_includes_implied_directories(ws: Workspace) -> None:
    entries = [reg("/".join(f"d{i}" for i in range(12)) + "/f.py", b"")]
    with pytest.raises(ArchiveTooLarge, match="more than 10"):
        ws.extract(zst(tar_bytes(entries)), ExtractLimits(max_files=10))
    ws.assert_untouched()


def test_limits_exactly_at_the_edge_pass(ws: Workspace) -> None:
    entries = [reg(f"m{i}.py", b"x" * 100) for i in range(10)]
    limits = ExtractLimits(max_files=10, max_total_bytes=1000, max_file_bytes=100)
    assert ws.extract(zst(tar_bytes(entries)), limits) == ExtractResult(files=10, total_bytes=1000)
