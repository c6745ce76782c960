"""Blocking calls in async code, found statically (runtime/insights).

The corpus under ``tests/corpus/blocking/<case>/`` holds small apps, each with the findings it must
produce in ``expected.json`` (by file, line, call and the async function affected; ``routes``, ``chain``,
``kind`` and ``severity`` are checked where an entry gives them). The other tests build projects in a
temporary directory.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from runtime.insights import Finding, analyze_project, format_findings
from runtime.insights.blocking import MAX_DEPTH

CORPUS = Path(__file__).parent / "corpus" / "blocking"
CASES = sorted(path.name for path in CORPUS.iterdir() if (path / "expected.json").is_file())


def _key(item: dict[str, object]) -> tuple[object, ...]:
    return (item["file"], item["line"], item["call"], item["function"])


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def _calls(findings: tuple[Finding, ...]) -> list[tuple[str, int, str]]:
    return sorted((f.file, f.line, f.call) for f in findings)


def test_corpus_covers_the_patterns() -> None:
    assert {
        "direct",
        "helper_same_module",
        "helper_other_module",
        "dependency",
        "router_prefix",
        "aliases",
        "false_positives",
    } <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_corpus(case: str) -> None:
    expected = json.loads((CORPUS / case / "expected.json").read_text())
    report = analyze_project(CORPUS / case)

    assert report.errors == ()
    got = [finding.as_dict() for finding in report.findings]
    assert Counter(map(_key, got)) == Counter(map(_key, expected))
    by_key = {_key(item): item for item in got}
    for item in expected:
        finding = by_key[_key(item)]
        for field in ("routes", "chain", "kind", "severity"):
            if field in item:
                assert finding[field] == item[field], (field, item)
    for finding in report.findings:
        assert finding.chain[0] == finding.function and finding.chain[-1] == finding.call
        assert finding.dependency == (finding.function if finding.kind == "dependency" else None)
        assert finding.routes and finding.fix and finding.column >= 1


def test_findings_are_json_and_say_what_to_do() -> None:
    report = analyze_project(CORPUS / "direct")
    data = json.loads(json.dumps(report.as_dict()))

    assert data["files_scanned"] == 1 and data["errors"] == [] and data["truncated"] is False
    sleepy = next(f for f in data["findings"] if f["function"] == "main.sleepy")
    assert sleepy == {
        "file": "main.py",
        "line": 15,
        "column": 5,
        "call": "time.sleep",
        "category": "sleep",
        "severity": "high",
        "chain": ["main.sleepy", "time.sleep"],
        "routes": ["GET /sleep"],
        "function": "main.sleepy",
        "kind": "endpoint",
        "dependency": None,
        "fix": "use `await asyncio.sleep(...)`; or make `sleepy` a plain `def` "
        "(FastAPI runs it in a worker thread)",
        "message": "`time.sleep` blocks the event loop in async endpoint `main.sleepy` (GET /sleep)",
    }
    assert report.duration_s < 1


def test_fixes_name_the_async_replacement() -> None:
    fixes = {f.call: f.fix for f in analyze_project(CORPUS / "aliases").findings}
    fixes |= {f.call: f.fix for f in analyze_project(CORPUS / "databases").findings}
    fixes |= {f.call: f.fix for f in analyze_project(CORPUS / "subprocess_files").findings}

    assert "httpx.AsyncClient" in fixes["requests.get"] and "run_in_threadpool" in fixes["requests.get"]
    assert "plain `def`" in fixes["requests.get"]
    assert "redis.asyncio" in fixes["redis.Redis.get"]
    assert "aiosqlite" in fixes["sqlite3.Connection.execute"]
    assert "AsyncSession" in fixes["sqlalchemy.orm.Session.query"]
    assert "anyio.Path" in fixes["pathlib.Path.read_text"]
    assert "create_subprocess_exec" in fixes["subprocess.run"]


def test_format_findings_for_the_build_log() -> None:
    report = analyze_project(CORPUS / "helper_same_module")
    lines = format_findings(report.findings)

    assert lines[0] == (
        "main.py:14:5: high: `time.sleep` blocks the event loop in async endpoint `main.slow` (GET /slow)"
    )
    assert lines[1] == "    via main.slow → main.outer → main.wait_a_bit → time.sleep"
    assert lines[2].startswith("    fix: use `await asyncio.sleep(...)`")
    assert format_findings([]) == []
    middleware = format_findings(analyze_project(CORPUS / "app_factory").findings)
    assert any("in async middleware `main.create_app.timing` (every request)" in line for line in middleware)


def test_bad_files_are_reported_not_raised(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "main.py": """
                import time
                from fastapi import FastAPI
                import broken

                app = FastAPI()

                @app.get("/")
                async def index():
                    time.sleep(1)
            """,
            "broken.py": "def oops(:\n    pass\n",
            "escapes.py": 'PATTERN = "\\d+"\n',
        },
    )
    (tmp_path / "latin1.py").write_bytes(b"# -*- coding: utf-8 -*-\nname = '\xff\xfe'\n")
    (tmp_path / "nul.py").write_bytes(b"x = 1\x00\n")

    report = analyze_project(tmp_path)

    assert _calls(report.findings) == [("main.py", 10, "time.sleep")]
    errors = {error.file: error for error in report.errors}
    assert set(errors) == {"broken.py", "latin1.py", "nul.py"}
    assert errors["broken.py"].line == 1 and "SyntaxError" in errors["broken.py"].message
    assert report.files_scanned == 5
    json.dumps(report.as_dict())


def test_pathological_code_does_not_break_the_analysis(tmp_path: Path) -> None:
    chain = "x" + ".y" * 150
    _write(
        tmp_path,
        {
            "main.py": f"""
                import time
                from fastapi import FastAPI
                from loop_a import *
                from ...... import nothing

                a = b
                b = a
                class A(A): pass
                class B(A): pass

                app = FastAPI()
                app.include_router(app)

                @app.get("/")
                async def index(value=Depends(index)):
                    {chain}()
                    a()
                    B().missing()
                    undefined_name()
                    time.sleep(1)
            """,
            "loop_a.py": "from loop_b import *\n",
            "loop_b.py": "from loop_a import *\n",
        },
    )

    report = analyze_project(tmp_path)

    assert _calls(report.findings) == [("main.py", 21, "time.sleep")]
    assert report.errors == ()


def test_only_the_projects_own_files_are_read(tmp_path: Path) -> None:
    blocking = """
        import time
        from fastapi import FastAPI
        app = FastAPI()

        @app.get("/")
        async def index():
            time.sleep(1)
    """
    files = {
        f"{folder}/main.py": blocking
        for folder in (
            ".venv/lib",
            ".hidden",
            "env/lib/python3.11/site-packages/pkg",
            "tests",
            "node_modules/x",
        )
    }
    files |= {"myenv/pyvenv.cfg": "home = /usr/bin\n", "myenv/lib/main.py": blocking}
    files |= {"test_app.py": blocking, "conftest.py": blocking, "app_test.py": blocking}
    _write(tmp_path, {**files, "main.py": blocking})

    report = analyze_project(tmp_path)

    assert report.files_scanned == 1
    assert _calls(report.findings) == [("main.py", 8, "time.sleep")]


def test_entrypoint_directory_resolves_namespace_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "service/pkg/main.py": """
                from fastapi import FastAPI
                from pkg.util.net import fetch

                app = FastAPI()

                @app.get("/")
                async def index():
                    fetch()
            """,
            "service/pkg/util/__init__.py": "",
            "service/pkg/util/net.py": """
                import requests

                def fetch():
                    return requests.get("https://example.com")
            """,
        },
    )

    assert analyze_project(tmp_path).findings == ()
    report = analyze_project(tmp_path, "pkg.main:app")
    assert _calls(report.findings) == [("service/pkg/util/net.py", 5, "requests.get")]
    assert report.entrypoint == "pkg.main:app"


def test_src_layout(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "src/shop/__init__.py": "",
            "src/shop/main.py": """
                from fastapi import FastAPI
                from shop.db import load

                app = FastAPI()

                @app.get("/")
                async def index():
                    return load()
            """,
            "src/shop/db.py": """
                import sqlite3

                def load():
                    return sqlite3.connect("shop.db")
            """,
        },
    )

    report = analyze_project(tmp_path)

    assert _calls(report.findings) == [("src/shop/db.py", 5, "sqlite3.connect")]
    assert report.findings[0].chain == ("shop.main.index", "shop.db.load", "sqlite3.connect")


def test_depth_limit(tmp_path: Path) -> None:
    helpers = "\n".join(f"def h{i}():\n    h{i + 1}()\n" for i in range(MAX_DEPTH + 5))
    source = f"""
import time
from fastapi import FastAPI

app = FastAPI()

{helpers}
def h{MAX_DEPTH + 5}():
    time.sleep(1)

def h_near():
    h{MAX_DEPTH + 5 - (MAX_DEPTH - 2)}()

@app.get("/far")
async def far():
    h0()

@app.get("/near")
async def near():
    h_near()
"""
    (tmp_path / "main.py").write_text(source)

    findings = analyze_project(tmp_path).findings

    assert [(f.function, len(f.chain)) for f in findings] == [("main.near", MAX_DEPTH + 2)]


def test_cycles_do_not_hide_findings_from_other_routes(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "main.py": """
                import time
                from fastapi import FastAPI

                app = FastAPI()

                def a(n):
                    if n:
                        b(n)

                def b(n):
                    a(n - 1)
                    time.sleep(1)

                @app.get("/first")
                async def first():
                    a(2)

                @app.get("/second")
                async def second():
                    b(2)
            """
        },
    )

    findings = analyze_project(tmp_path).findings

    assert sorted((f.function, f.chain) for f in findings) == [
        ("main.first", ("main.first", "main.a", "main.b", "time.sleep")),
        ("main.second", ("main.second", "main.b", "time.sleep")),
    ]


def test_a_local_name_shadows_only_its_own_scope(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "main.py": """
                import time
                from fastapi import FastAPI

                app = FastAPI()

                @app.get("/shadowed")
                async def shadowed(time=None):
                    time.sleep(1)

                @app.get("/module")
                async def module():
                    time.sleep(1)

                @app.get("/ambiguous")
                async def ambiguous(flag: bool):
                    nap = time.sleep if flag else None
                    client = object()
                    if flag:
                        client = __import__("requests")
                    client.get("x")
            """
        },
    )

    assert [f.function for f in analyze_project(tmp_path).findings] == ["main.module"]


def test_two_hundred_files_with_cross_module_helpers(tmp_path: Path) -> None:
    """A large project (its speed is measured by bench/insights.py, not asserted here)."""
    for i in range(200):
        helpers = "\n\n".join(
            f"def helper_{j}(value):\n    data = {{'k': value, 'j': {j}}}\n    return sorted(data.items())"
            for j in range(12)
        )
        routes = "\n\n".join(
            f"@router.get('/r{j}')\nasync def route_{j}(q: int = 0):\n"
            f"    helper_{j}(q)\n    other.helper_{j}(q)\n    return {{'ok': True}}"
            for j in range(8)
        )
        previous = max(i - 1, 0)
        (tmp_path / f"mod{i}.py").write_text(
            f"import time\nfrom fastapi import APIRouter\nimport mod{previous} as other\n\n"
            f"router = APIRouter(prefix='/m{i}')\n\n{helpers}\n\n{routes}\n\n"
            f"@router.get('/slow')\nasync def slow():\n    time.sleep(1)\n"
        )
    (tmp_path / "main.py").write_text(
        "from fastapi import FastAPI\n"
        + "".join(f"import mod{i}\n" for i in range(200))
        + "app = FastAPI()\n"
        + "".join(f"app.include_router(mod{i}.router)\n" for i in range(200))
    )

    report = analyze_project(tmp_path)

    assert report.files_scanned == 201
    assert len(report.findings) == 200 and report.async_functions == 200 * 9
    assert report.findings[0].routes == ("GET /m0/slow",)
