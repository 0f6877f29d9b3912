"""Log set-up: plain text for people, one JSON object per line for log pipelines."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import orjson

from .untrusted import printable

#: Kinds of message a RepeatLimit remembers before it starts afresh (bounds its memory).
_MAX_KINDS = 1024


class JsonFormatter(logging.Formatter):
    """One JSON object a line; the message escaped as by :class:`TextFormatter` too."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": printable(record.getMessage()),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class TextFormatter(logging.Formatter):
    """One line per message: control characters in it (a newline and a forged log line, an
    ANSI escape, a bidi override, from a record's text such as a refused command's id) are
    shown escaped (``\\n``, ``\\x1b``), so no record can forge a line or drive the operator's
    terminal. A traceback still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        original = record.message
        record.message = printable(original)
        try:
            return super().formatMessage(record)
        finally:  # other handlers (a test's capture) see the record as it was
            record.message = original


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    # While a broker is away aiokafka repeats each failure many times a second.
    handler.addFilter(RepeatLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every transient connection error at ERROR; our own lines say what matters.
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))


class RepeatLimit(logging.Filter):
    """At most one line per ``window_s`` for each message of a chatty third-party logger.

    aiokafka logs every failed connection, metadata refresh, fetch and heartbeat while a
    broker is away: ~100 lines a second per process, which buries our own lines and fills
    the log pipeline during exactly the incident someone reads it for. The first line of a
    kind (logger, level, message template) passes; repeats within the window are counted,
    and the next line after it says how many were left out.
    """

    def __init__(
        self,
        prefixes: tuple[str, ...] = ("aiokafka",),
        window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.window_s = window_s
        self.clock = clock
        #: kind -> (when its window opened, lines left out since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        kind = (record.name, record.levelno, str(record.msg)[:200])
        now = self.clock()
        seen = self._seen.get(kind)
        if seen is not None and now - seen[0] < self.window_s:
            self._seen[kind] = (seen[0], seen[1] + 1)
            return False
        if len(self._seen) >= _MAX_KINDS:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if seen is not None and seen[1]:
            record.msg = (
                f"{record.msg} [{seen[1]:,} more like this in the last "
                f"{now - seen[0]:.0f}s left out]"
            )
        return True
