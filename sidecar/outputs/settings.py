"""The ``[outputs]`` config section: the API versions of the decisions a rollout serves.

``topics.decisions`` carries the current :class:`~sidecar.contracts.Decision` contract, named
``outputs.api_version``. Each ``[[outputs.versions]]`` entry serves an older shape of it on its
own topic, produced from the same batch through a compatibility adapter: declarative (``map``,
``rename``, ``drop``, ``defaults``, applied in that order) or a Python callable. Kept here (not
in ``sidecar.config``) so the feature owns its knobs.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Meta = msgspec.Meta

#: An API version name: what the ``api_version`` header carries, e.g. ``v1``.
VersionName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,32}$")]


class FieldMap(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """How one field's value changes in an older shape: a table of values, or arithmetic.

    ``values`` keys are the field's value as text: a string as it is, anything else as JSON
    (``"true"``, ``"null"``, ``"3"``). ``scale``/``offset``/``round`` apply to numbers
    (``value * scale + offset``, then rounded to ``round`` decimals; 0 gives an integer);
    null stays null.
    """

    values: dict[str, Any] | None = None
    #: With ``values``: the value of anything not in the table (unset: kept as it is).
    other: Any = msgspec.UNSET
    scale: float | None = None
    offset: float | None = None
    round: Annotated[int, Meta(ge=0, le=12)] | None = None


class OutputVersion(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One older API version of the decisions, served through an adapter on its own topic."""

    #: The ``api_version`` header of its records, e.g. ``v1``.
    version: VersionName
    #: Its topic (created with the others by ``sidecar broker`` / ``--create-topics``).
    topic: Annotated[str, Meta(min_length=1)]
    #: Date it is (or will be) deprecated, ISO-8601 (``2026-01-31`` or with a time, UTC when
    #: no zone): its records carry a ``deprecation`` header (RFC 9745). ``sidecar ctl
    #: deprecate`` sets it at run time.
    deprecation: str | None = None
    #: Date after which it may be switched off (``sunset`` header, RFC 8594).
    sunset: str | None = None
    #: The migration guide: a ``link`` header with ``rel="deprecation"`` on its records.
    link: str | None = None
    #: Declarative adapter, applied in this order: ``map`` (field -> FieldMap), ``rename``
    #: (old name -> new name), ``drop`` (fields left out), ``defaults`` (field -> value, set
    #: when the field is absent or null). Names are the Decision's fields; ``defaults`` names
    #: are the old shape's.
    map: dict[str, FieldMap] = {}
    rename: dict[str, str] = {}
    drop: list[str] = []
    defaults: dict[str, Any] = {}
    #: Callable adapter ``package.module:function`` (instead of the declarative one): called
    #: with each Decision, returns an instance of ``struct`` (or a dict of its fields).
    adapter: str | None = None
    #: ``package.module:Type``: the msgspec Struct the callable returns; its JSON Schema is
    #: the version's schema. Required with ``adapter``.
    struct: str | None = None


class OutputsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """API versions of the decisions (README "Versioned outputs")."""

    #: API version of ``topics.decisions`` (the current Decision contract), carried in an
    #: ``api_version`` header by each of its records. Unset (the default): unversioned, no
    #: header; required when ``versions`` is not empty.
    api_version: VersionName | None = None
    versions: list[OutputVersion] = []
    #: Where ``sidecar schemas --config`` writes and checks each version's JSON Schema
    #: (``decision.<version>.json``), relative to the working directory.
    schema_dir: str = "schemas/outputs"
    #: How often each instance looks at the consumer groups that read an older version's
    #: topic (``sidecar_output_active_readers``); 0 turns it off.
    readers_interval_s: Annotated[float, Meta(ge=0)] = 30.0
    #: A group is an active reader while its committed offsets on the topic move, or while
    #: the last record it committed past is younger than this (see README).
    active_window_s: Annotated[float, Meta(gt=0)] = 900.0

    @property
    def enabled(self) -> bool:
        return bool(self.versions)

    def topics(self) -> list[str]:
        return [v.topic for v in self.versions]

    def version(self, name: str) -> OutputVersion | None:
        return next((v for v in self.versions if v.version == name), None)
