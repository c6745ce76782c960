"""Reading a level out of an app's log line: uvicorn/logging's ``LEVEL:`` prefix, JSON logs, tracebacks."""

from __future__ import annotations

import json
import re

LEVELS = ("debug", "info", "warning", "error", "critical")
LEVEL_RANK = {name: i for i, name in enumerate(LEVELS)}
_ALIASES = {"warn": "warning", "fatal": "critical", "err": "error", "trace": "debug", "notice": "info"}
_PREFIX = re.compile(r"^\s*\[?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]?[:\s]", re.IGNORECASE)
_ANYWHERE = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_TRACEBACK_START = "Traceback (most recent call last)"


def normalize_level(name: str) -> str:
    low = name.strip().lower()
    low = _ALIASES.get(low, low)
    return low if low in LEVEL_RANK else "info"


def parse_level(line: str, stream: str, previous: str | None = None) -> str:
    """The level of one output line.

    ``previous`` is the level of the line before on the same stream: an indented continuation (a
    traceback frame) keeps it, so a whole traceback reads as ``error``.
    """
    stripped = line.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            for key in ("level", "levelname", "severity", "log.level"):
                value = obj.get(key)
                if isinstance(value, str):
                    return normalize_level(value)
    match = _PREFIX.match(line)
    if match:
        return normalize_level(match.group(1))
    if stripped.startswith(_TRACEBACK_START):
        return "error"
    if previous is not None and (line[:1] in (" ", "\t") or (previous == "error" and _looks_like_exc(line))):
        return previous
    match = _ANYWHERE.search(line[:80])
    if match:
        return normalize_level(match.group(1))
    return "info"


def _looks_like_exc(line: str) -> bool:
    # The last line of a traceback: "ValueError: boom", "module.Error: x"
    head = line.split(":", 1)[0]
    return bool(head) and (head.endswith("Error") or head.endswith("Exception")) and " " not in head
