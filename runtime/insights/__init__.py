"""FastAPI-aware insights about a project, computed from its source at build time.

``blocking``: ``async def`` endpoints and dependencies that call blocking APIs (``time.sleep``,
``requests``, sync database drivers, ``subprocess``, large synchronous file reads), directly or through
the project's own helpers, with the route each one stalls and the fix. Static: the project's code is
parsed, never imported or executed.

    report = analyze_project(project.root, project.entrypoint)
    for line in format_findings(report.findings):
        build_log.write(line)
"""

from runtime.insights.blocking import Finding, ParseError, Report, analyze_project, format_findings

__all__ = ["Finding", "ParseError", "Report", "analyze_project", "format_findings"]
