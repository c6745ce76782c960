"""The dashboard's pages against the API's JSON for the same data: time to first byte, and JS per page.

Run it with ``.venv/bin/python bench/dashboard.py [--requests N] [--traffic N]``. It starts its own
``fastapi-deploy server`` subprocess on free loopback ports, pushes ``examples/hello`` with the real CLI,
sends ``--traffic`` requests (default 300, some of them 404s) through the router so that metrics, traces
and logs have something to show, signs in to the dashboard by pasting the admin token, then times each
page ``--requests`` times (default 30, after 3 unreported warm-ups), turn by turn with the API call that
returns the same data:

* **TTFB**: from sending the request to the response's first byte, on a kept-alive connection
  (``httpx``'s ``elapsed``: the headers arrived), median and p90. **vs API** is the page's median over
  its API call's: what server-side rendering costs on top of the data.
* **HTML** bytes of the page, and **JS**: the total size of the ``<script src>`` files it loads.

Targets (issue 5): TTFB under 50 ms locally, under 150 KB of JavaScript per page.

Bounded: a fixed number of requests, each with a timeout; everything on 127.0.0.1, stopped at exit.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _server import CLI, BenchServer, running

ROOT = Path(__file__).resolve().parent.parent
TTFB_TARGET_MS = 50.0
JS_BUDGET_BYTES = 150 * 1024
APP = "bench-dash"


def push(server: BenchServer, project: Path) -> None:
    result = subprocess.run(
        [CLI, "push", str(project), "--app", APP, "--json"],
        env=server.cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        sys.exit(f"push failed:\n{result.stdout}\n{result.stderr}")


def traffic(server: BenchServer, count: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.router_port}", timeout=10) as client:
        for i in range(count):
            path = f"/items/{i}" if i % 10 else "/no-such-route"
            client.get(path, headers={"Host": f"{APP}.localhost"})


def sign_in(server: BenchServer) -> httpx.Client:
    client = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
    page = client.get("/dashboard/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if csrf is None:
        sys.exit("no CSRF field on the sign-in page")
    r = client.post("/dashboard/login", data={"csrf_token": csrf.group(1), "token": server.token})
    if r.status_code != 303:
        sys.exit(f"sign-in answered {r.status_code}: {r.text[:300]}")
    return client


def js_bytes(client: httpx.Client, html: str, cache: dict[str, int]) -> int:
    total = 0
    for src in re.findall(r'<script src="([^"]+)"', html):
        if src not in cache:
            cache[src] = len(client.get(src).content)
        total += cache[src]
    return total


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page (default 30)")
    parser.add_argument("--traffic", type=int, default=300, help="app requests before timing (default 300)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fdp-bench-dash-") as tmp, running(Path(tmp) / "srv") as server:
        project = Path(tmp) / "hello"
        shutil.copytree(ROOT / "examples" / "hello", project, ignore=shutil.ignore_patterns("__pycache__"))
        push(server, project)
        traffic(server, args.traffic)
        time.sleep(6)  # the rollups and the trace batch flush (a few seconds each)
        api = httpx.Client(
            base_url=f"{server.url}/api/v1", timeout=30, headers={"Authorization": f"Bearer {server.token}"}
        )
        app_id = next(a["id"] for a in api.get("/apps/").json()["data"] if a["slug"] == APP)
        traces = api.get(f"/apps/{app_id}/traces").json().get("data", [])
        deployments = api.get(f"/apps/{app_id}/deployments/").json()["data"]
        web = sign_in(server)
        base = f"/dashboard/apps/{APP}"
        dep = deployments[0]["id"]
        pages: list[tuple[str, str, str]] = [
            ("apps", "/dashboard/", "/apps/"),
            ("app", base, f"/apps/{app_id}"),
            ("deployments", f"{base}/deployments", f"/apps/{app_id}/deployments/"),
            ("deployment", f"{base}/deployments/{dep}", f"/deployments/{dep}"),
            ("metrics 1h", f"{base}/metrics", f"/apps/{app_id}/metrics?range=1h"),
            ("metrics 7d", f"{base}/metrics?range=7d", f"/apps/{app_id}/metrics?range=7d"),
            ("traces", f"{base}/traces", f"/apps/{app_id}/traces"),
            ("logs", f"{base}/logs", f"/apps/{app_id}/logs?limit=200"),
            ("insights", f"{base}/insights", f"/apps/{app_id}/insights"),
            ("alerts", f"{base}/alerts", f"/apps/{app_id}/alerts"),
            ("settings", f"{base}/settings", f"/apps/{app_id}/scaling"),
            ("admin status", "/dashboard/admin", "/admin/status"),
            ("admin users", "/dashboard/admin/users", "/admin/users"),
        ]
        if traces:
            trace_id = traces[0]["trace_id"]
            pages.append(("trace waterfall", f"/dashboard/traces/{trace_id}", f"/traces/{trace_id}"))

        scripts: dict[str, int] = {}
        rows = []
        for name, page, call in pages:
            first = web.get(page)
            if first.status_code != 200:
                print(f"{name}: {page} answered {first.status_code}, skipped", file=sys.stderr)
                continue
            times: dict[str, list[float]] = {"page": [], "api": []}
            for i in range(3 + args.requests):
                for kind, client, path in (("page", web, page), ("api", api, call)):
                    r = client.get(path)
                    if i >= 3:
                        times[kind].append(r.elapsed.total_seconds())
            rows.append(
                (
                    name,
                    ms(times["page"], 0.5),
                    ms(times["page"], 0.9),
                    ms(times["api"], 0.5),
                    len(first.content),
                    js_bytes(web, first.text, scripts),
                )
            )
        web.close()
        api.close()

    print(f"\n{args.requests} requests per page, kept-alive connection, after {args.traffic} app requests\n")
    print(f"{'page':<16} {'TTFB p50':>9} {'p90':>8} {'API p50':>8} {'vs API':>7} {'HTML':>8} {'JS':>8}")
    for name, p50, p90, api50, html, js in rows:
        ratio = p50 / api50 if api50 else float("nan")
        print(
            f"{name:<16} {p50:>7.1f}ms {p90:>6.1f}ms {api50:>6.1f}ms {ratio:>6.1f}x "
            f"{html / 1024:>6.1f}KB {js / 1024:>6.1f}KB"
        )
    worst = max((r[1] for r in rows), default=0.0)
    heaviest = max((r[5] for r in rows), default=0)
    print(
        f"\nslowest page p50 {worst:.1f} ms (target < {TTFB_TARGET_MS:.0f} ms: "
        f"{'met' if worst < TTFB_TARGET_MS else 'MISSED'}); heaviest JS {heaviest / 1024:.1f} KB "
        f"(budget {JS_BUDGET_BYTES // 1024} KB: {'met' if heaviest < JS_BUDGET_BYTES else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
