"""Control commands: the wire format, their Ed25519 signatures, and the checks done before
the state machine sees them.

A command is JSON on the control topic. Its ``signature`` is an Ed25519 signature (base64url)
over :data:`SIGNATURE_DOMAIN` + its *canonical bytes* (:func:`canonical_bytes`), by the key
``key_id`` of the trust file (:mod:`sidecar.control.keys`), which also says whether that key's
role may sign the action, and when the key is valid.

Every check here is a pure function of the command, the trust store and the record's time.
The Kafka layer passes the broker's append time of the record (live and on replay alike), so
every instance reaches the same verdict on the same record, however late it reads it.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import msgspec

from ..errors import SidecarError
from ..hashing import BUCKETS
from ..untrusted import error_text
from .keys import Refusal, SigningKey, TrustStore

Action = Literal[
    "shadow",
    "canary",
    "ramp",
    "promote",
    "rollback",
    "pause",
    "resume",
    "retire",
    "advance",
    "verdict",
    "deprecate",
    "sunset",
]
ACTIONS: tuple[Action, ...] = get_args(Action)
#: Actions on an older output version (``outputs.versions``), not on the routing: they change
#: no epoch and apply even to a retired rollout (its consumers still migrate).
OUTPUT_ACTIONS = frozenset({"deprecate", "sunset"})

#: Prefix of the signed bytes: a signature made for anything else never verifies here.
SIGNATURE_DOMAIN = b"sidecar-control-v2\n"
#: Commands bigger than this are rejected before decoding.
MAX_COMMAND_BYTES = 64 * 1024
MAX_RAMP_STEPS = 64

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
#: A model version as comparisons carry it (``ModelResult.version``).
ModelVersion = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class RampStep(msgspec.Struct, frozen=True, kw_only=True):
    """One ramp step: hold ``share_bp`` for at least ``min_hold_s`` *and* ``min_samples``
    compared records before moving on."""

    share_bp: int
    min_hold_s: float
    min_samples: int


class Verdict(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A judgement of the rollout from the windows its issuer has seen. ``guards_ok`` (the
    aggregator's guards, about the current epoch): may a ramp move on. ``quality_ok`` (the
    outcomes stage, about the two models on labelled traffic): is the candidate good enough
    to promote. A verdict carries one or both; None leaves that judgement as it was."""

    guards_ok: bool | None = None
    quality_ok: bool | None = None
    #: End of the newest window (event time) the verdict is based on.
    window_end_ms: NonNegInt
    detail: Annotated[str, msgspec.Meta(max_length=256)] = ""
    #: ``quality_ok`` verdicts: the two model versions judged. A promotion gated on quality
    #: counts a verdict only about the candidate version being promoted.
    candidate_version: ModelVersion | None = None
    champion_version: ModelVersion | None = None


class CommandArgs(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Action arguments. Each action accepts only the fields it uses (see STATES.md)."""

    share_bp: int | None = None
    plan: list[RampStep] | None = None
    score_shadow_arm: bool | None = None
    #: ``advance`` only: compared records the issuer counted in the current step (audited).
    samples: int | None = None
    #: ``verdict`` only.
    verdict: Verdict | None = None
    #: ``promote`` and ``advance``: the candidate version the issuer promotes (``sidecar ctl``
    #: takes it from the instances' heartbeats; a sidecar from its own candidate). With
    #: ``control.promote_gate = "quality"`` the quality verdict must be about this version.
    candidate_version: ModelVersion | None = None
    #: ``deprecate`` and ``sunset``: the older output version (``outputs.versions``).
    output_version: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    #: ``deprecate``: when it may be switched off (epoch ms); required.
    sunset_ms: NonNegInt | None = None
    #: ``deprecate``: when it is deprecated (epoch ms; default: the command's record time).
    deprecation_ms: NonNegInt | None = None
    #: ``deprecate``: the migration guide (a URL).
    link: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    #: ``sunset``: consumer groups the issuer saw still reading the version (audited); the
    #: sunset is refused unless it is 0, or ``force``.
    active_readers: NonNegInt | None = None
    #: ``sunset``: switch it off despite active readers or before its sunset date.
    force: bool | None = None


class ControlCommand(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One command of an operator, a guard, or a sidecar (``advance``).

    ``omit_defaults`` keeps ``None`` fields off the wire *and* out of the canonical bytes, so
    adding an optional field in a later version leaves old signatures valid.
    """

    command_id: NonEmpty
    rollout: NonEmpty
    action: Action
    args: CommandArgs = CommandArgs()
    #: The signing key's holder (its principal, else its id): bound, checked on verification.
    issued_by: NonEmpty
    reason: NonEmpty
    issued_at_ms: NonNegInt
    #: The epoch the issuer saw: the command applies only while the rollout is at exactly
    #: this epoch. Required for every action but ``rollback`` (always safe to apply).
    expected_epoch: NonNegInt | None = None
    key_id: str | None = None
    #: Ed25519 over ``SIGNATURE_DOMAIN`` + :func:`canonical_bytes`, unpadded base64url.
    signature: str | None = None


class RejectReason(enum.StrEnum):
    """Why a control record was not applied; the value is the code on the audit topic."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"  # not JSON
    SCHEMA = "schema"  # JSON, but not a valid command (unknown action, missing field...)
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    KEY_NOT_YET_VALID = "key_not_yet_valid"
    KEY_EXPIRED = "key_expired"
    KEY_REVOKED = "key_revoked"
    #: The key's role (or its ``actions``) does not allow the action.
    ROLE = "role"
    #: ``issued_by`` is not the principal of the signing key.
    BAD_ISSUER = "bad_issuer"
    #: The record's time was chosen by its producer (CreateTime) and the control plane is
    #: configured to trust only the broker's append time.
    UNTRUSTED_TIME = "untrusted_time"
    STALE = "stale"
    FUTURE = "future"
    OTHER_ROLLOUT = "other_rollout"
    #: This command id was seen before (and refused then): a command applies once or never.
    REPLAYED = "replayed"
    RETIRED = "retired"
    EPOCH_CONFLICT = "epoch_conflict"
    INVALID_ARGS = "invalid_args"
    ILLEGAL_TRANSITION = "illegal_transition"
    NO_CANDIDATE = "no_candidate"
    TOO_EARLY = "too_early"
    NO_CHANGE = "no_change"
    #: ``sunset`` while consumer groups still read the version (and not forced).
    ACTIVE_READERS = "active_readers"
    #: A record carrying the start-up barrier header and a value (barriers have none).
    BARRIER = "barrier"
    #: Processing the record raised an unexpected error (a bug; the detail names it).
    UNPROCESSABLE = "unprocessable"
    #: The Kafka client could not parse the record (see ``sidecar.kafka.unreadable``).
    UNREADABLE = "unreadable"


#: Rejections after which the command counts as *seen*: it was authentic, so its id may never
#: apply later (a replay of a refused command must stay refused).
AUTHENTIC_REJECTIONS = frozenset(
    {
        RejectReason.STALE,
        RejectReason.FUTURE,
        RejectReason.RETIRED,
        RejectReason.EPOCH_CONFLICT,
        RejectReason.INVALID_ARGS,
        RejectReason.ILLEGAL_TRANSITION,
        RejectReason.NO_CANDIDATE,
        RejectReason.TOO_EARLY,
        RejectReason.NO_CHANGE,
        RejectReason.REPLAYED,
        RejectReason.ACTIVE_READERS,
    }
)


@dataclass(frozen=True, slots=True)
class Rejected:
    """Outcome: the record was refused; the state is unchanged."""

    reason: RejectReason
    detail: str
    command: ControlCommand | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Outcome: this command id was already applied; ignored (idempotent), not an error."""

    command: ControlCommand


class CommandRejected(SidecarError):
    """Raised by :func:`check_fresh`; carries the audit code."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


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


# --------------------------------------------------------------------------- signatures


def sign_command(cmd: ControlCommand, key: SigningKey) -> ControlCommand:
    """``cmd`` (normalised) signed by ``key``; ``issued_by`` becomes the key's holder (its
    principal, else its id): verifiers insist on it."""
    with_key = _normalise(
        msgspec.structs.replace(cmd, key_id=key.id, issued_by=key.holder, signature=None)
    )
    signature = key.sign(SIGNATURE_DOMAIN + canonical_bytes(with_key))
    return msgspec.structs.replace(with_key, signature=signature)


def verify_command(cmd: ControlCommand, trust: TrustStore, at_ms: int) -> None:
    """Raise :class:`CommandRejected` unless ``cmd`` is signed by a key of ``trust`` that may
    sign its action at ``at_ms``, with ``issued_by`` bound to the key's principal."""
    try:
        message = SIGNATURE_DOMAIN + canonical_bytes(cmd)
    except CommandRejected as exc:
        raise CommandRejected(RejectReason.BAD_SIGNATURE, exc.detail) from None
    try:
        key = trust.check(cmd.key_id, cmd.signature, message, at_ms, cmd.action)
    except Refusal as exc:
        raise CommandRejected(RejectReason(exc.code), exc.detail) from None
    if cmd.issued_by != key.holder:
        raise CommandRejected(
            RejectReason.BAD_ISSUER,
            f"issued_by {cmd.issued_by!r} is not {key.holder!r}, the holder of key {key.id!r}",
        )


# --------------------------------------------------------------------------- checks


def check_fresh(cmd: ControlCommand, now_ms: int, freshness: Freshness) -> None:
    """Raise :class:`CommandRejected` when ``issued_at_ms`` is too old or too far ahead of
    ``now_ms`` (the record's time), which stops late publication of captured commands."""
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
    trust: TrustStore,
    freshness: Freshness = Freshness(),
    require_signature: bool = True,
) -> ControlCommand | Rejected:
    """Decode (if bytes), verify the signature and the key's rights, check freshness; never
    raises.

    With ``require_signature=False`` (local demos only) unsigned commands pass, but a command
    that *does* carry a signature must still verify. Replays are detected later, by the state
    machine, since only the state knows which ids were seen.
    """
    cmd = decode_command(raw) if isinstance(raw, bytes) else raw
    if isinstance(cmd, Rejected):
        return cmd
    try:
        if require_signature or cmd.signature is not None or cmd.key_id is not None:
            verify_command(cmd, trust, now_ms)
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
