"""The lifecycle of an older output version: active, deprecated (with a sunset date and a
migration guide), sunset. Pure: the control state machine keeps one :class:`OutputState` per
version, built from the config and changed only by signed ``deprecate`` and ``sunset``
commands; the pipeline turns it into the headers every record of the version carries.

Headers (values are ASCII bytes):

* ``api_version``: the version's name, on every record of every version;
* ``deprecation``: ``@<epoch seconds>`` -- RFC 9745's structured date: when the version is (or
  will be) deprecated;
* ``sunset``: an HTTP-date (RFC 8594), e.g. ``Wed, 01 Apr 2026 00:00:00 GMT``: after it the
  version may stop at any time;
* ``link``: ``<URL>; rel="deprecation"; type="text/html"``: the migration guide (RFC 9745).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re

import msgspec

from ..errors import ConfigError
from .settings import OutputVersion

Header = tuple[str, bytes]
#: What a link may hold: a URL without spaces, quotes, angle brackets or control characters
#: (it goes between ``<`` and ``>`` in a header).
_LINK = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s<>\"\x00-\x1f\x7f]{1,2000}$")


class OutputState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where one older output version stands."""

    version: str
    deprecation_ms: int | None = None
    sunset_ms: int | None = None
    link: str | None = None
    #: When the version was switched off (a ``sunset`` command's record time).
    sunset_at_ms: int | None = None

    @property
    def is_sunset(self) -> bool:
        return self.sunset_at_ms is not None

    def deprecated_at(self, now_ms: int) -> bool:
        return self.deprecation_ms is not None and self.deprecation_ms <= now_ms


def parse_date(text: str, *, what: str) -> int:
    """``2026-01-31`` (midnight UTC) or an ISO-8601 time (UTC when no zone) -> epoch ms."""
    raw = text.strip()
    try:
        if len(raw) == 10:
            when = dt.datetime.combine(dt.date.fromisoformat(raw), dt.time(), dt.UTC)
        else:
            when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{what} {text!r}: expected a date (2026-01-31) or an ISO-8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def link_ok(link: str) -> bool:
    """Whether a header can carry ``link`` as it is."""
    return _LINK.match(link) is not None


def check_link(link: str, *, what: str) -> str:
    if not link_ok(link):
        raise ConfigError(
            f"{what} {link[:80]!r} is not a URL a header can carry (no spaces, quotes, angle "
            "brackets or control characters)"
        )
    return link


def deprecation_value(ms: int) -> bytes:
    """RFC 9745: an sf-date, ``@`` and whole epoch seconds."""
    return f"@{ms // 1000}".encode()


def sunset_value(ms: int) -> bytes:
    """RFC 8594: an HTTP-date (IMF-fixdate)."""
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return email.utils.format_datetime(when, usegmt=True).encode()


def link_value(url: str) -> bytes:
    return f'<{url}>; rel="deprecation"; type="text/html"'.encode()


def version_headers(state: OutputState) -> list[Header]:
    """The headers every record of ``state``'s version carries (``api_version`` first)."""
    headers: list[Header] = [("api_version", state.version.encode())]
    if state.deprecation_ms is not None:
        headers.append(("deprecation", deprecation_value(state.deprecation_ms)))
    if state.sunset_ms is not None:
        headers.append(("sunset", sunset_value(state.sunset_ms)))
    if state.link:
        headers.append(("link", link_value(state.link)))
    return headers


def configured_outputs(versions: list[OutputVersion]) -> tuple[OutputState, ...]:
    """The start state of each configured version (``outputs.versions``), dates parsed."""
    states = []
    for v in versions:
        where = f"outputs.versions[{v.version}]"
        state = OutputState(
            version=v.version,
            deprecation_ms=None
            if v.deprecation is None
            else parse_date(v.deprecation, what=f"{where}.deprecation"),
            sunset_ms=None if v.sunset is None else parse_date(v.sunset, what=f"{where}.sunset"),
            link=None if v.link is None else check_link(v.link, what=f"{where}.link"),
        )
        if (
            state.deprecation_ms is not None
            and state.sunset_ms is not None
            and state.sunset_ms < state.deprecation_ms
        ):
            raise ConfigError(f"{where}: sunset is before deprecation")
        states.append(state)
    return tuple(states)
