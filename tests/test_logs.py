from __future__ import annotations

import logging

import orjson
import pytest

from sidecar.logs import RepeatLimit, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeats_of_a_chatty_client_line_are_counted_and_said_once_per_window() -> None:
    clock = Clock()
    limit = RepeatLimit(window_s=30.0, clock=clock)
    passed = [
        limit.filter(_record("aiokafka", "Unable connect to node with id %s: %s", 111, i))
        for i in range(500)
    ]
    assert passed[0] and sum(passed) == 1
    # Another kind of line (another template, logger or level) has its own window.
    assert limit.filter(_record("aiokafka", "Unable to update metadata from %s", [111]))
    assert limit.filter(_record("aiokafka.consumer.fetcher", "Failed fetch messages"))
    assert limit.filter(
        _record("aiokafka", "Unable connect to node with id %s: %s", 1, 2, level=30)
    )
    clock.now += 30.0
    again = _record("aiokafka", "Unable connect to node with id %s: %s", 111, "refused")
    assert limit.filter(again)
    assert again.getMessage() == (
        "Unable connect to node with id 111: refused [499 more like this in the last 30s left out]"
    )
    clock.now += 31.0  # nothing left out since: said as it is
    plain = _record("aiokafka", "Unable connect to node with id %s: %s", 111, "refused")
    assert limit.filter(plain) and "left out" not in plain.getMessage()


def test_our_own_lines_are_never_limited() -> None:
    limit = RepeatLimit(clock=Clock())
    assert all(limit.filter(_record("sidecar.runner", "producing failed")) for _ in range(100))


def test_the_log_set_up_limits_the_kafka_clients_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a broker outage wrote ~130 aiokafka lines a second per process (counted on a
    2-core machine: 2,620 ERROR lines in the first 20 s), burying the sidecar's own."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("aiokafka").level
    try:
        setup_logging("INFO")
        client = logging.getLogger("aiokafka.test-repeat-limit")
        for i in range(1000):
            client.error("Unable connect to node with id %s: [Errno 111] test-refused", i)
        logging.getLogger("sidecar.test").warning("our own line")
        # Only these lines: clients of other tests may log while they are collected.
        lines = capsys.readouterr().err.splitlines()
        assert len([line for line in lines if "test-refused" in line]) == 1, lines
        assert any("our own line" in line for line in lines)
    finally:
        root.handlers[:], level, client_level = saved
        root.setLevel(level)
        logging.getLogger("aiokafka").setLevel(client_level)


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
