"""FastAPI-aware insights in the deploy pipeline: blocking calls found in the source at build time, and
the API contract of each revision against the one serving (``runtime/insights``, ``runtime/contract``).

Both are kept beside the build (``deployments/{artifact}/insights.json``, ``contract.json``) and read
back by the API, the CLI and the dashboard. Neither blocks a deploy unless asked to: the app's
``fail_on_blocking`` setting refuses a build with blocking calls, a push with ``--fail-on-breaking``
refuses to switch traffic to a revision that breaks its API.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.contract import diff_schemas, format_changes, summarize
from runtime.errors import BuildError, VerifyError
from runtime.insights import analyze_project, format_findings

Log = Callable[[str], None]

INSIGHTS_FILE = "insights.json"
CONTRACT_FILE = "contract.json"
OPENAPI_FILE = "openapi.json"
_LOG_FINDINGS = 40  # findings printed in the build log; all are kept in the report


def analyze_build(
    root: Path, entrypoint: str | None, kept: Path, *, fail_on_blocking: bool, log: Log
) -> dict[str, Any]:
    """Blocking calls in the project's async code: logged, kept at ``kept``; raises
    :class:`BuildError` (``building_image_failed_blocking_calls``) when the app refuses them."""
    report = analyze_project(root, entrypoint)
    data = report.as_dict()
    data.pop("root", None)  # a path on the build host: nobody's business
    _write(kept, data)
    findings = report.findings
    if not findings:
        log(f"Insights: no blocking calls in {report.async_functions} async endpoint(s) and dependencies")
        return data
    log(f"Insights: {len(findings)} blocking call(s) in async code (they stall every request meanwhile)")
    for line in format_findings(list(findings[:_LOG_FINDINGS])):
        log(f"  {line}")
    if len(findings) > _LOG_FINDINGS:
        log(f"  ... and {len(findings) - _LOG_FINDINGS} more (`fastapi-deploy insights APP`)")
    if fail_on_blocking:
        first = findings[0]
        raise BuildError(
            f"{len(findings)} blocking call(s) in async code, e.g. "
            f"{first.file}:{first.line}: {first.message}.",
            title="Blocking calls in async code",
            hint="Fix them (the build log says how), or turn the check off with "
            "`fastapi-deploy insights APP --no-fail-on-blocking`.",
            code="building_image_failed_blocking_calls",
        )
    return data


def compare_contract(
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    against: str | None,
    kept: Path,
    *,
    fail_on_breaking: bool,
    log: Log,
) -> dict[str, Any] | None:
    """The new revision's OpenAPI document against the serving one's: logged, kept at ``kept``; raises
    :class:`VerifyError` (``verifying_failed_breaking_changes``) when breaking changes are refused.
    None when there is nothing to compare (a first deploy, an app without an OpenAPI document)."""
    if old is None or new is None:
        if fail_on_breaking and new is None and old is not None:
            raise VerifyError(
                "The new revision serves no OpenAPI document, so its contract cannot be checked.",
                title="Contract unknown",
                hint="Keep FastAPI's openapi_url, or push without --fail-on-breaking.",
                code="verifying_failed_breaking_changes",
            )
        return None
    changes = diff_schemas(old, new)
    summary = summarize(changes)
    data = {"against": against, "summary": summary, "changes": [c.as_dict() for c in changes]}
    _write(kept, data)
    breaking = [c for c in changes if c.severity == "breaking"]
    if not changes:
        log(f"API contract: unchanged against deployment {str(against)[:8]}")
        return data
    log(
        f"API contract against deployment {str(against)[:8]}: {len(breaking)} breaking, "
        f"{len(changes) - len(breaking)} compatible change(s)"
    )
    for line in format_changes(changes)[:_LOG_FINDINGS]:
        log(f"  {line}")
    if breaking and fail_on_breaking:
        raise VerifyError(
            f"{len(breaking)} breaking API change(s), e.g. {breaking[0].message}; traffic stays on the "
            "serving revision.",
            title="Breaking API changes",
            hint="Version the API (a new path) or keep the old shape, or push without --fail-on-breaking.",
            code="verifying_failed_breaking_changes",
        )
    return data


def read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # a rollback's own folder may not exist yet
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)
