"""Log lines are one line each, whatever a record made them say."""

from __future__ import annotations

import logging

import orjson
import pytest

from sidecar.logs import setup_logging

FORGED = (
    "evil\n2026-12-01 01:00:00,000 INFO    sidecar.control.plane: control: applied rollback "
    "FORGED (epoch 1 -> 2) by ops: \x1b[2Jall good\u202e"
)


def _formatted(fmt: str, *args: object, exc: bool = False) -> str:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", fmt)
        formatter = root.handlers[0].formatter
        assert formatter is not None
        exc_info = None
        if exc:
            try:
                raise ValueError("boom")
            except ValueError:
                import sys

                exc_info = sys.exc_info()
        record = logging.LogRecord(
            "sidecar.control.plane",
            logging.WARNING,
            __file__,
            1,
            "control: rejected %s: %s",
            args,
            exc_info,
        )
        return formatter.format(record)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_forged_command_id_cannot_forge_a_log_line_or_drive_the_terminal(fmt: str) -> None:
    """A control record's command id (unauthenticated until its signature is checked, and
    logged when it is refused) holding a newline and a fake log line made the text log show a
    forged "applied rollback" line, and an ANSI escape cleared the operator's terminal."""
    line = _formatted(fmt, FORGED, "bad_signature")
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    message = orjson.loads(line)["message"] if fmt == "json" else line
    assert "evil\\n2026-12-01 01:00:00,000 INFO" in message and "\\x1b[2J" in message


def test_a_traceback_still_spans_its_lines() -> None:
    text = _formatted("text", "x", "y", exc=True)
    assert text.splitlines()[0].endswith("control: rejected x: y")
    assert "Traceback (most recent call last)" in text and "ValueError: boom" in text
