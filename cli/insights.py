"""``insights APP``: what the platform found inside the app: blocking calls in its async code (at build
time), its API contract against the revision before, its instances' event loops, and recent blocks."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from cli.output import JsonOption, Output
from cli.resolve import AppArgument, resolve_app
from cli.session import use

app = typer.Typer()


@app.command()
def insights(
    ctx: typer.Context,
    app_ref: AppArgument,
    deployment: Annotated[
        str | None, typer.Option("--deployment", "-d", help="A deployment id (default: the serving one).")
    ] = None,
    fail_on_blocking: Annotated[
        bool | None,
        typer.Option(
            "--fail-on-blocking/--no-fail-on-blocking",
            help="Refuse (or allow again) builds whose async code calls blocking APIs.",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Blocking calls in async code, API contract changes, event-loop lag and blocks of an app."""
    session = use(ctx, json_output)
    client, out = session.client, session.output
    app_id = str(resolve_app(client, app_ref)["id"])
    if fail_on_blocking is not None:
        client.patch(f"/apps/{app_id}/insights", json={"fail_on_blocking": fail_on_blocking})
    result: dict[str, Any] = client.get(f"/apps/{app_id}/insights")
    if deployment:
        result.update(client.get(f"/deployments/{deployment}/insights"))
    blocks = client.get(f"/apps/{app_id}/events", params={"kind": "insight", "limit": 20})["data"]
    result["recent_blocks"] = blocks
    if out.json_mode:
        out.emit(result)
        return
    render(out, result)


def render(out: Output, r: dict[str, Any]) -> None:
    if r.get("deployment_id") is None:
        out.say("Nothing deployed yet: insights come with the first build.")
        return
    setting = "refused" if r.get("fail_on_blocking") else "reported, not refused"
    out.say(
        Text.assemble(
            ("Deployment ", "dim"), str(r["deployment_id"]), ("  blocking calls are ", "dim"), setting
        )
    )
    blocking = r.get("blocking")
    out.say()
    if blocking is None:
        out.say("Blocking calls: not analysed for this build (built before insights existed).")
    elif not blocking["findings"]:
        out.say(f"Blocking calls: none in {blocking['async_functions']} async endpoint(s) and dependencies.")
    else:
        out.say(Text(f"Blocking calls in async code: {len(blocking['findings'])}", style="bold yellow"))
        for f in blocking["findings"]:
            out.say(
                Text.assemble(
                    (f"{f['file']}:{f['line']}", "bold"),
                    f"  {f['call']}  ",
                    (", ".join(f["routes"]), "cyan"),
                    ("  via " + " → ".join(f["chain"]), "dim"),
                )
            )
            out.say(Text(f"    fix: {f['fix']}"))
    contract = r.get("contract")
    out.say()
    if contract is None:
        out.say("API contract: no earlier revision to compare with.")
    else:
        summary = contract["summary"]
        style = "bold red" if summary.get("breaking") else ""
        against = str(contract.get("against"))[:8]
        counts = f"{summary.get('breaking', 0)} breaking, {summary.get('non_breaking', 0)} compatible"
        out.say(Text(f"API contract against {against}: {counts} change(s)", style=style))
        if contract["changes"]:
            out.table(
                ["", "WHERE", "CHANGE"],
                [
                    [
                        Text(
                            "breaking" if c["severity"] == "breaking" else "ok",
                            style="red" if c["severity"] == "breaking" else "green",
                        ),
                        f"{(c.get('method') or '').upper()} {c.get('path') or ''}".strip(),
                        c["message"],
                    ]
                    for c in contract["changes"]
                ],
            )
    runtime = r.get("runtime") or []
    out.say()
    if runtime:
        out.say(Text("Event loops (since each instance started)", style="bold"))
        out.table(
            ["INSTANCE", "LAG P50", "LAG P99", "MAX", "BLOCKS", "THREADS BUSY"],
            [
                [
                    str(i["instance_id"]),
                    _ms(i["lag_p50_ms"]),
                    _ms(i["lag_p99_ms"]),
                    _ms(i["lag_max_ms"]),
                    str(i["blocks"]),
                    "-" if i["threadpool_busy"] is None else f"{i['threadpool_busy']}/{i['threadpool_size']}",
                ]
                for i in runtime
            ],
        )
    else:
        out.say("Event loops: no instance reported yet (they do every 10 s while tracing is on).")
    blocks = r.get("recent_blocks") or []
    if blocks:
        out.say()
        out.say(Text("Recent blocks", style="bold"))
        out.table(
            ["TIME", "EVENT", "TRACE"],
            [[str(e["at"])[:19], str(e["message"]), str(e["data"].get("trace_id") or "-")] for e in blocks],
        )


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} ms"
