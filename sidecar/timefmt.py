"""Times and windows as people read them: UTC, to the second (milliseconds when needed).

Windows and command timestamps are epoch milliseconds on the wire; everything a person reads
(command reasons, logs, the report, ``ctl`` output) goes through these. ``humanise`` rewrites
the raw ``[start,end) ms`` windows that older guard commands carry in their reasons.
"""

from __future__ import annotations

import datetime as dt
import re

_WINDOW = re.compile(r"\[\s*(\d{12,14})\s*,\s*(\d{12,14})\s*\)(?:\s*ms)?")


def utc(ms: int | float) -> str:
    """``2024-06-10 08:00:00 UTC`` (``08:00:00.250`` when not on a whole second)."""
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    text = t.strftime("%Y-%m-%d %H:%M:%S")
    if int(ms) % 1000:
        text += f".{int(ms) % 1000:03d}"
    return text + " UTC"


def _clock(ms: int | float) -> str:
    return utc(ms).split(" ")[1]


def utc_window(start_ms: int | float, end_ms: int | float) -> str:
    """``2024-06-10 08:00:00-08:01:00 UTC``: one date when the window stays within one day."""
    start, end = utc(start_ms), utc(end_ms)
    if start[:10] == end[:10]:
        return f"{start[:-4]}-{_clock(end_ms)} UTC"
    return f"{start[:-4]} to {end}"


def humanise(text: str) -> str:
    """Every raw epoch-millisecond window ``[1718006400000,1718006460000) ms`` in ``text``
    written as a UTC window."""
    return _WINDOW.sub(lambda m: utc_window(int(m.group(1)), int(m.group(2))), text)


__all__ = ["humanise", "utc", "utc_window"]
