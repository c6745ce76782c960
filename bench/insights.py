"""How fast the build-time analysis of blocking calls is: ``analyze_project`` on generated projects.

Run it with ``.venv/bin/python bench/insights.py [--files N ...]``. Each project has N modules of 12
helpers and 8 async routes that call them across modules, plus one blocking route per module (the shape
of ``tests/test_insights_blocking.py``'s large project); the figure is CPU seconds per analysis, the best
of ``--runs``. Target: a 200-file project well under 1 s, so it never weighs on a build.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.insights import analyze_project


def make_project(root: Path, files: int) -> None:
    for i in range(files):
        helpers = "\n\n".join(
            f"def helper_{j}(value):\n    data = {{'k': value, 'j': {j}}}\n    return sorted(data.items())"
            for j in range(12)
        )
        routes = "\n\n".join(
            f"@router.get('/r{j}')\nasync def route_{j}(q: int = 0):\n"
            f"    helper_{j}(q)\n    other.helper_{j}(q)\n    return {{'ok': True}}"
            for j in range(8)
        )
        (root / f"mod{i}.py").write_text(
            f"import time\nfrom fastapi import APIRouter\nimport mod{max(i - 1, 0)} as other\n\n"
            f"router = APIRouter(prefix='/m{i}')\n\n{helpers}\n\n{routes}\n\n"
            f"@router.get('/slow')\nasync def slow():\n    time.sleep(1)\n"
        )
    (root / "main.py").write_text(
        "from fastapi import FastAPI\n"
        + "".join(f"import mod{i}\n" for i in range(files))
        + "app = FastAPI()\n"
        + "".join(f"app.include_router(mod{i}.router)\n" for i in range(files))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, nargs="*", default=[20, 200, 1000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{'files':>7}{'findings':>10}{'cpu s':>9}{'per file ms':>13}")
    for files in args.files:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_project(root, files)
            best = float("inf")
            findings = 0
            for _ in range(args.runs):
                started = time.process_time()
                report = analyze_project(root)
                best = min(best, time.process_time() - started)
                findings = len(report.findings)
            print(f"{files + 1:>7}{findings:>10}{best:>9.3f}{best / (files + 1) * 1000:>13.2f}")


if __name__ == "__main__":
    main()
