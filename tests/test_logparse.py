"""Levels read out of app output (runtime/logparse.py): JSON logs by their ``level`` / ``levelname`` /
``severity`` / ``log.level`` key, ``LEVEL:`` prefixes, tracebacks and their continuation lines."""

from __future__ import annotations

import json

import pytest

from runtime.logparse import normalize_level, parse_level


@pytest.mark.parametrize(
    ("record", "level"),
    [
        ({"level": "warning", "msg": "disk almost full"}, "warning"),  # structlog, loguru serialize
        ({"levelname": "ERROR", "message": "payment failed"}, "error"),  # python-json-logger
        ({"severity": "CRITICAL", "message": "down"}, "critical"),  # Google Cloud Logging
        ({"log.level": "debug", "message": "cache miss"}, "debug"),  # Elastic Common Schema
        ({"severity": "WARN"}, "warning"),
        ({"level": "fatal"}, "critical"),
        ({"level": "err"}, "error"),
        ({"level": "trace"}, "debug"),
        ({"level": "notice"}, "info"),
        ({"level": "Info"}, "info"),
        ({"level": "verbose"}, "info"),  # unknown names are info, never dropped
    ],
)
def test_json_log_lines_are_read_by_their_level_key(record: dict[str, str], level: str) -> None:
    assert parse_level(json.dumps(record), "stdout") == level


def test_the_json_key_wins_over_words_in_the_message() -> None:
    # A plain-text line with these words would read as an error; the record says what it is.
    line = json.dumps({"level": "info", "message": "ERROR count is 0, WARNING threshold 5"})
    assert parse_level(line, "stderr") == "info"
    assert parse_level("ERROR count is 0, WARNING threshold 5", "stderr") == "error"


def test_the_first_level_key_that_is_a_string_counts() -> None:
    assert parse_level(json.dumps({"level": "error", "severity": "debug"}), "stdout") == "error"
    # pino's numeric levels are not names: the next key that is one decides.
    assert parse_level(json.dumps({"level": 50, "levelname": "warning"}), "stdout") == "warning"
    assert parse_level(json.dumps({"level": 50, "msg": "boom"}), "stdout") == "info"


def test_json_lines_keep_their_own_level_inside_a_traceback() -> None:
    # An indented continuation takes the previous line's level, but a JSON record says its own.
    assert parse_level('  {"level": "info", "msg": "retrying"}', "stderr", previous="error") == "info"
    assert parse_level('  File "main.py", line 3, in <module>', "stderr", previous="error") == "error"


@pytest.mark.parametrize(
    "line",
    [
        "{not json} ERROR: connection refused",
        '{"level": "info", "msg": "ERROR: cut off mid-way',  # not JSON: the text rules read ERROR
        '["ERROR", "connection refused"]',  # JSON, but not an object
    ],
)
def test_lines_that_are_not_json_objects_fall_back_to_the_text_rules(line: str) -> None:
    assert parse_level(line, "stderr") == "error"


@pytest.mark.parametrize(
    ("line", "level"),
    [
        ('INFO:     127.0.0.1:5000 - "GET / HTTP/1.1" 200 OK', "info"),
        ("WARNING:  careful", "warning"),
        ("[ERROR] broken", "error"),
        ("Traceback (most recent call last):", "error"),
        ("hello", "info"),
    ],
)
def test_text_lines(line: str, level: str) -> None:
    assert parse_level(line, "stdout") == level


def test_normalize_level() -> None:
    assert [normalize_level(n) for n in (" WARN ", "Fatal", "error", "bogus")] == [
        "warning",
        "critical",
        "error",
        "info",
    ]
