"""Log set-up: plain text for people, one JSON object per line for log pipelines."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from .untrusted import printable


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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every transient connection error at ERROR; our own lines say what matters.
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))
