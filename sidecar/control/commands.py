"""Control commands: the wire format, their HMAC signatures, and the checks done before the
state machine sees them.

A command is JSON on the control topic. Its signature is a hex HMAC-SHA256 over its
*canonical bytes* (see :func:`canonical_bytes`), keyed by one of several secrets held in a
:class:`Keyring` so that keys can be rotated without downtime.

Every check here is a pure function of the command, the keyring and a ``now_ms``. The Kafka
layer passes the **record timestamp** as ``now_ms`` (live and on replay alike), so every
instance reaches the same verdict on the same record, however late it reads it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from ..errors import ConfigError, SidecarError
from ..hashing import BUCKETS
from ..untrusted import error_text

Action = Literal[
    "shadow", "canary", "ramp", "promote", "rollback", "pause", "resume", "retire", "advance"
]
ACTIONS: tuple[Action, ...] = (
    "shadow",
    "canary",
    "ramp",
    "promote",
    "rollback",
    "pause",
    "resume",
    "retire",
    "advance",
)

#: Prefix of the HMAC input: a signature made for anything else can never verify here.
SIGNATURE_DOMAIN = b"sidecar-control-v1\n"
#: Commands bigger than this are rejected before decoding.
MAX_COMMAND_BYTES = 64 * 1024
#: Env variable read by :meth:`Keyring.from_env`.
KEYS_ENV_VAR = "SIDECAR_CONTROL_KEYS"
#: Secrets shorter than this (bytes) are refused: HMAC is only as strong as its key.
MIN_SECRET_BYTES = 16
MAX_RAMP_STEPS = 64

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_HEX_SIG_RE = re.compile(r"^[0-9a-f]{64}$")

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class RampStep(msgspec.Struct, frozen=True, kw_only=True):
    """One ramp step: hold ``share_bp`` for at least ``min_hold_s`` *and* ``min_samples``
    compared records before moving on."""

    share_bp: int
    min_hold_s: float
    min_samples: int


class CommandArgs(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Action arguments. Each action accepts only the fields it uses (see STATES.md)."""

    share_bp: int | None = None
    plan: list[RampStep] | None = None
    score_shadow_arm: bool | None = None
    #: ``advance`` only: compared records the issuer counted in the current step (audited).
    samples: int | None = None


class ControlCommand(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One operator (or sidecar-issued ``advance``) command.

    ``omit_defaults`` keeps ``None`` fields off the wire *and* out of the canonical bytes, so
    adding an optional field in a later version leaves old signatures valid.
    """

    command_id: NonEmpty
    rollout: NonEmpty
    action: Action
    args: CommandArgs = CommandArgs()
    issued_by: NonEmpty
    reason: NonEmpty
    issued_at_ms: NonNegInt
    #: Compare-and-set: applied only while the rollout is at exactly this epoch.
    expected_epoch: NonNegInt | None = None
    key_id: str | None = None
    #: Lower-case hex HMAC-SHA256 over :func:`canonical_bytes`.
    signature: str | None = None


class RejectReason(enum.StrEnum):
    """Why a command was not applied; the value is the code written to the audit topic."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"  # not JSON
    SCHEMA = "schema"  # JSON, but not a valid command (unknown action, missing field...)
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale"
    FUTURE = "future"
    OTHER_ROLLOUT = "other_rollout"
    RETIRED = "retired"
    EPOCH_CONFLICT = "epoch_conflict"
    INVALID_ARGS = "invalid_args"
    ILLEGAL_TRANSITION = "illegal_transition"
    NO_CANDIDATE = "no_candidate"
    TOO_EARLY = "too_early"
    NO_CHANGE = "no_change"
    #: Processing the record raised an unexpected error (a bug; the detail names it).
    UNPROCESSABLE = "unprocessable"
    #: The Kafka client could not parse the record (see ``sidecar.kafka.unreadable``).
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Rejected:
    """Outcome: the command was refused; the state is unchanged."""

    reason: RejectReason
    detail: str
    command: ControlCommand | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Outcome: this command id was already applied; ignored (idempotent), not an error."""

    command: ControlCommand


class CommandRejected(SidecarError):
    """Raised by :meth:`Keyring.verify` and :func:`check_fresh`; carries the audit code."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class KeyringError(ConfigError):
    """The control keys could not be loaded; the message never contains a secret."""


@dataclass(frozen=True, slots=True)
class Freshness:
    """How far a command's ``issued_at_ms`` may lie from the record time it is judged at."""

    max_age_s: float = 300.0
    max_future_s: float = 30.0


# --------------------------------------------------------------------------- canonical form


def _normalise(cmd: ControlCommand) -> ControlCommand:
    """Round-trip through the wire form so Python-built and decoded commands compare equal
    (e.g. ``min_hold_s=300`` becomes ``300.0``), and validate it on the way."""
    try:
        return msgspec.json.decode(msgspec.json.encode(cmd), type=ControlCommand)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise CommandRejected(RejectReason.SCHEMA, str(exc)) from None


def canonical_bytes(cmd: ControlCommand) -> bytes:
    """The bytes a signature covers: the command with ``signature`` removed, normalised to its
    decoded wire form, encoded as compact JSON (no whitespace) with object keys sorted
    recursively, ``None`` fields omitted, floats in shortest round-trip form.

    Fields unknown to this version are dropped on decoding, so a command signed over a newer
    field fails verification here (fails closed) rather than being half-understood.
    """
    unsigned = _normalise(msgspec.structs.replace(cmd, signature=None))
    return msgspec.json.encode(msgspec.to_builtins(unsigned), order="sorted")


def encode_command(cmd: ControlCommand) -> bytes:
    """Wire bytes of a command (signature included)."""
    return msgspec.json.encode(cmd)


def decode_command(raw: bytes) -> ControlCommand | Rejected:
    """Decode a record value; never raises, whatever the bytes (see ``sidecar.untrusted``)."""
    if len(raw) > MAX_COMMAND_BYTES:
        return Rejected(RejectReason.OVERSIZE, f"{len(raw)} bytes > {MAX_COMMAND_BYTES}")
    try:
        return msgspec.json.decode(raw, type=ControlCommand)
    except msgspec.ValidationError as exc:
        return Rejected(RejectReason.SCHEMA, error_text(exc))
    except Exception as exc:  # DecodeError, RecursionError (deep nesting), ValueError...
        return Rejected(RejectReason.MALFORMED, error_text(exc))


# --------------------------------------------------------------------------- keyring


class Keyring:
    """HMAC keys by id; several ids are valid at once so keys rotate without downtime.

    Rotation: add the new key everywhere, switch signers to it, and drop the old key only once
    no command signed with it remains on the control topic (replay must still verify it).
    Secrets never appear in ``repr``/``str`` or in any error message.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        for key_id, secret in keys.items():
            if not _KEY_ID_RE.match(key_id):
                raise KeyringError(f"invalid control key id {key_id!r}: use [A-Za-z0-9_.-]{{1,64}}")
            if len(secret) < MIN_SECRET_BYTES:
                raise KeyringError(
                    f"control key {key_id!r} is {len(secret)} bytes; at least "
                    f"{MIN_SECRET_BYTES} are required (e.g. `openssl rand -hex 32`)"
                )
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return f"Keyring(key_ids={sorted(self._keys)!r})"

    __str__ = __repr__

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], *, source: str) -> Keyring:
        """Build from ``(key_id, hex_secret)`` pairs; ``source`` names the origin in errors."""
        keys: dict[str, bytes] = {}
        for key_id, hex_secret in pairs:
            if key_id in keys:
                raise KeyringError(f"{source}: control key id {key_id!r} is defined twice")
            try:
                keys[key_id] = bytes.fromhex(hex_secret)
            except ValueError:
                raise KeyringError(
                    f"{source}: the secret of control key {key_id!r} is not hex"
                ) from None
        return cls(keys)

    @classmethod
    def parse(cls, text: str, *, source: str = "keys") -> Keyring:
        """Parse the key-file format: one ``key_id=hexsecret`` per line; blank lines and lines
        starting with ``#`` are ignored. Commas also separate entries, and ``:`` is accepted
        instead of ``=``, so the same parser reads ``SIDECAR_CONTROL_KEYS="k1:hex1,k2:hex2"``."""
        pairs: list[tuple[str, str]] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            for entry in stripped.split(","):
                entry = entry.strip()
                if not entry:
                    continue
                sep = "=" if "=" in entry else ":"
                key_id, found, secret = entry.partition(sep)
                if not found or not key_id.strip() or not secret.strip():
                    raise KeyringError(
                        f"{source}:{lineno}: expected `key_id=hexsecret` (secret not shown)"
                    )
                pairs.append((key_id.strip(), secret.strip()))
        return cls.from_pairs(pairs, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Load a key file (see :meth:`parse`); keep it readable by the sidecar user only."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyringError(
                f"cannot read control key file {str(path)!r}: {exc.strerror}"
            ) from None
        return cls.parse(text, source=str(path))

    @classmethod
    def from_env(cls, var: str = KEYS_ENV_VAR, environ: Mapping[str, str] | None = None) -> Keyring:
        """Load ``k1:hex1,k2:hex2`` from an environment variable."""
        env = os.environ if environ is None else environ
        value = env.get(var)
        if value is None or not value.strip():
            raise KeyringError(f"environment variable {var} is not set or empty")
        return cls.parse(value, source=f"${var}")

    def _mac(self, key_id: str, cmd: ControlCommand) -> str:
        return hmac.new(
            self._keys[key_id], SIGNATURE_DOMAIN + canonical_bytes(cmd), hashlib.sha256
        ).hexdigest()

    def sign(self, cmd: ControlCommand, key_id: str) -> ControlCommand:
        """Return ``cmd`` (normalised) with ``key_id`` and ``signature`` set."""
        if key_id not in self._keys:
            raise KeyringError(f"unknown control key id {key_id!r}; known: {list(self.key_ids)}")
        with_key = _normalise(msgspec.structs.replace(cmd, key_id=key_id, signature=None))
        return msgspec.structs.replace(with_key, signature=self._mac(key_id, with_key))

    def verify(self, cmd: ControlCommand) -> None:
        """Raise :class:`CommandRejected` unless ``cmd`` carries a valid signature."""
        if cmd.signature is None or cmd.key_id is None:
            raise CommandRejected(RejectReason.UNSIGNED, "command has no key_id/signature")
        if cmd.key_id not in self._keys:
            raise CommandRejected(
                RejectReason.UNKNOWN_KEY, f"key id {cmd.key_id!r} is not in the keyring"
            )
        if not _HEX_SIG_RE.match(cmd.signature):
            raise CommandRejected(
                RejectReason.BAD_SIGNATURE, "signature is not 64 lower-case hex digits"
            )
        try:
            expected = self._mac(cmd.key_id, cmd)
        except CommandRejected as exc:
            raise CommandRejected(RejectReason.BAD_SIGNATURE, exc.detail) from None
        if not hmac.compare_digest(expected.encode(), cmd.signature.encode()):
            raise CommandRejected(
                RejectReason.BAD_SIGNATURE, f"signature does not match key {cmd.key_id!r}"
            )


# --------------------------------------------------------------------------- checks


def check_fresh(cmd: ControlCommand, now_ms: int, freshness: Freshness) -> None:
    """Raise :class:`CommandRejected` when ``issued_at_ms`` is too old or too far ahead of
    ``now_ms`` (the record timestamp), which stops re-publication of old signed commands."""
    age_ms = now_ms - cmd.issued_at_ms
    if age_ms > freshness.max_age_s * 1000:
        raise CommandRejected(
            RejectReason.STALE,
            f"issued {age_ms / 1000:.1f}s before the record time; max age {freshness.max_age_s:g}s",
        )
    if -age_ms > freshness.max_future_s * 1000:
        raise CommandRejected(
            RejectReason.FUTURE,
            f"issued {-age_ms / 1000:.1f}s after the record time; max clock skew "
            f"{freshness.max_future_s:g}s",
        )


def authenticate(
    raw: bytes | ControlCommand,
    now_ms: int,
    *,
    keyring: Keyring,
    freshness: Freshness = Freshness(),
    require_signature: bool = True,
) -> ControlCommand | Rejected:
    """Decode (if bytes), verify the signature and check freshness; never raises.

    With ``require_signature=False`` (local demos only) unsigned commands pass, but a command
    that *does* carry a signature must still verify. Duplicates are detected later, by the
    state machine, since only the state knows which ids were applied.
    """
    cmd = decode_command(raw) if isinstance(raw, bytes) else raw
    if isinstance(cmd, Rejected):
        return cmd
    try:
        if require_signature or cmd.signature is not None or cmd.key_id is not None:
            keyring.verify(cmd)
        check_fresh(cmd, now_ms, freshness)
    except CommandRejected as exc:
        return Rejected(exc.reason, exc.detail, cmd)
    return cmd


# --------------------------------------------------------------------------- ramp plans

_SHARE_RE = re.compile(r"^(?:(\d+(?:\.\d{1,2})?)%|(\d+)bp)$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SAMPLES_RE = re.compile(r"^(\d+)([kKmM]?)$")


def parse_share(text: str) -> int:
    """``"5%"`` / ``"0.25%"`` / ``"250bp"`` -> basis points."""
    m = _SHARE_RE.match(text.strip())
    if m is None:
        raise ValueError(f"share {text!r}: expected a percentage like '5%' or '0.5%', or '50bp'")
    bp = round(float(m.group(1)) * 100) if m.group(1) is not None else int(m.group(2))
    if not 0 <= bp <= BUCKETS:
        raise ValueError(f"share {text!r} is outside 0%..100%")
    return bp


def parse_duration(text: str) -> float:
    """``"90s"``, ``"5m"``, ``"1h30m"``, ``"2d"`` or plain seconds ``"300"`` -> seconds."""
    t = text.strip()
    try:
        seconds = float(t)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION_RE.finditer(t):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise ValueError(
                f"duration {text!r}: expected e.g. '30s', '5m', '1h30m', '2d' or seconds"
            ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {text!r} must be a finite, non-negative number of seconds")
    return seconds


def parse_samples(text: str) -> int:
    """``"5000"``, ``"5_000"``, ``"5k"``, ``"2M"`` -> int."""
    m = _SAMPLES_RE.match(text.strip().replace("_", ""))
    if m is None:
        raise ValueError(f"sample count {text!r}: expected an integer like '5000' or '5k'")
    return int(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]


def validate_plan(plan: Iterable[RampStep]) -> list[RampStep]:
    """Return ``plan`` as a list or raise ValueError: non-empty, at most MAX_RAMP_STEPS steps,
    shares strictly increasing within 1..10000 bp, holds and sample floors non-negative."""
    steps = list(plan)
    if not steps:
        raise ValueError("ramp plan is empty")
    if len(steps) > MAX_RAMP_STEPS:
        raise ValueError(f"ramp plan has {len(steps)} steps; at most {MAX_RAMP_STEPS}")
    previous = 0
    for i, step in enumerate(steps, start=1):
        if not 1 <= step.share_bp <= BUCKETS:
            raise ValueError(f"step {i}: share {step.share_bp} bp is outside 1..{BUCKETS}")
        if step.share_bp <= previous:
            raise ValueError(
                f"step {i}: share {step.share_bp} bp does not increase on the previous "
                f"step's {previous} bp"
            )
        if not math.isfinite(step.min_hold_s) or step.min_hold_s < 0:
            raise ValueError(f"step {i}: hold {step.min_hold_s!r}s must be finite and >= 0")
        if step.min_samples < 0:
            raise ValueError(f"step {i}: min samples {step.min_samples} must be >= 0")
        previous = step.share_bp
    return steps


def parse_ramp_plan(text: str) -> list[RampStep]:
    """Parse ``"1%:5m:1000,5%:10m:5k,25%:30m:20k,100%:1h:50k"`` (share:hold:min_samples per
    step, comma separated) into a validated plan."""
    steps: list[RampStep] = []
    for i, part in enumerate(text.split(","), start=1):
        fields = part.strip().split(":")
        if len(fields) != 3:
            raise ValueError(
                f"ramp step {i} {part.strip()!r}: expected share:hold:min_samples, "
                "e.g. '5%:10m:5000'"
            )
        try:
            step = RampStep(
                share_bp=parse_share(fields[0]),
                min_hold_s=parse_duration(fields[1]),
                min_samples=parse_samples(fields[2]),
            )
        except ValueError as exc:
            raise ValueError(f"ramp step {i}: {exc}") from None
        steps.append(step)
    return validate_plan(steps)


def format_ramp_plan(plan: Iterable[RampStep]) -> str:
    """Inverse of :func:`parse_ramp_plan` (shares in %, holds in seconds)."""
    return ",".join(f"{s.share_bp / 100:g}%:{s.min_hold_s:g}s:{s.min_samples}" for s in plan)
