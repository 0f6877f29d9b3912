from __future__ import annotations

import json

import msgspec
import pytest
from ctl_support import T0, CommandFactory, Keys, fixed_key

from sidecar.control import (
    CommandArgs,
    CommandRejected,
    ControlCommand,
    Freshness,
    RampStep,
    Rejected,
    RejectReason,
    authenticate,
    canonical_bytes,
    check_fresh,
    decode_command,
    encode_command,
    sign_command,
    verify_command,
)
from sidecar.errors import SidecarError

R = RejectReason

# ------------------------------------------------------------------ canonical bytes


def test_canonical_bytes_sorted_compact_without_signature(keys: Keys, cmd: CommandFactory) -> None:
    signed = keys.sign(cmd("canary", share_bp=500), "k1")
    canon = canonical_bytes(signed)
    assert b" " not in canon
    assert b"signature" not in canon
    decoded = json.loads(canon)
    assert list(decoded) == sorted(decoded)
    assert decoded["key_id"] == "k1"
    assert decoded["args"] == {"share_bp": 500}
    assert canonical_bytes(signed) == canonical_bytes(
        msgspec.structs.replace(signed, signature=None)
    )


def test_canonical_bytes_normalise_int_and_float(cmd: CommandFactory) -> None:
    as_int = cmd(
        "ramp", command_id="x", plan=[RampStep(share_bp=100, min_hold_s=300, min_samples=1)]
    )
    as_float = cmd(
        "ramp", command_id="x", plan=[RampStep(share_bp=100, min_hold_s=300.0, min_samples=1)]
    )
    assert canonical_bytes(as_int) == canonical_bytes(as_float)


# ------------------------------------------------------------------ signing


def verify(keys: Keys, c: ControlCommand, at_ms: int = T0) -> RejectReason | None:
    try:
        verify_command(c, keys.trust, at_ms)
    except CommandRejected as exc:
        return exc.reason
    return None


def test_sign_verify_round_trip_over_the_wire(keys: Keys, cmd: CommandFactory) -> None:
    plan = [RampStep(share_bp=100, min_hold_s=60, min_samples=10)]
    signed = keys.sign(cmd("ramp", plan=plan, expected_epoch=4), "k1")
    assert signed.key_id == "k1" and signed.issued_by == "alice"  # bound to the key
    assert signed.signature is not None and len(signed.signature) == 86
    decoded = decode_command(encode_command(signed))
    assert isinstance(decoded, ControlCommand)
    assert verify(keys, decoded) is None
    assert decoded == signed


def test_a_key_without_principal_issues_in_its_own_name(keys: Keys, cmd: CommandFactory) -> None:
    assert keys.sign(cmd("shadow"), "k2").issued_by == "k2"


def test_forged_signature(keys: Keys, cmd: CommandFactory) -> None:
    real = keys.sign(cmd("promote"))
    assert real.signature is not None
    flipped = ("A" if real.signature[0] != "A" else "B") + real.signature[1:]
    assert verify(keys, msgspec.structs.replace(real, signature=flipped)) is R.BAD_SIGNATURE


def test_a_signature_by_another_key_under_my_id(keys: Keys, cmd: CommandFactory) -> None:
    attacker = fixed_key("k1", "operator", 77, "alice")
    forged = sign_command(cmd("promote"), attacker)
    assert verify(keys, forged) is R.BAD_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [
        {"rollout": "other"},
        {"action": "promote"},
        {"args": CommandArgs(share_bp=10_000)},
        {"expected_epoch": 8},
        {"issued_at_ms": T0 + 1},
        {"command_id": "c-other"},
        {"reason": "changed"},
        {"key_id": "k2"},
    ],
)
def test_tampered_field_after_signing(
    keys: Keys, cmd: CommandFactory, change: dict[str, object]
) -> None:
    signed = keys.sign(cmd("canary", share_bp=100, expected_epoch=7), "k1")
    assert verify(keys, msgspec.structs.replace(signed, **change)) is R.BAD_SIGNATURE


def test_issued_by_is_bound_to_the_key(keys: Keys, cmd: CommandFactory) -> None:
    signed = keys.sign(cmd("canary", share_bp=100, expected_epoch=7), "k1")
    assert verify(keys, msgspec.structs.replace(signed, issued_by="mallory")) is R.BAD_SIGNATURE
    # A key holder signing in someone else's name: the signature is good, the name is not.
    claims_bob = sign_command(cmd("shadow"), keys.by_id["k2"])
    lying = msgspec.structs.replace(claims_bob, issued_by="bob", signature=None)
    from sidecar.control.commands import SIGNATURE_DOMAIN

    forged = msgspec.structs.replace(
        lying, signature=keys.by_id["k2"].sign(SIGNATURE_DOMAIN + canonical_bytes(lying))
    )
    assert verify(keys, forged) is R.BAD_ISSUER


def test_tampered_wire_bytes(keys: Keys, cmd: CommandFactory) -> None:
    raw = encode_command(keys.sign(cmd("canary", share_bp=100), "k1"))
    out = authenticate(raw.replace(b'"share_bp":100', b'"share_bp":9000'), T0, trust=keys.trust)
    assert isinstance(out, Rejected) and out.reason is R.BAD_SIGNATURE


def test_unknown_extra_field_is_ignored_and_signature_still_verifies(
    keys: Keys, cmd: CommandFactory
) -> None:
    raw = encode_command(keys.sign(cmd("shadow"), "k1"))
    out = authenticate(raw[:-1] + b',"extra":1}', T0, trust=keys.trust)
    assert isinstance(out, ControlCommand)


@pytest.mark.parametrize("change", [{}, {"key_id": "k1"}, {"signature": "ab" * 43}])
def test_unsigned(keys: Keys, cmd: CommandFactory, change: dict[str, object]) -> None:
    c = msgspec.structs.replace(cmd("shadow"), **change)
    assert verify(keys, c) is R.UNSIGNED
    out = authenticate(c, T0, trust=keys.trust)
    assert isinstance(out, Rejected) and out.reason is R.UNSIGNED


def test_signature_must_be_unpadded_base64url(keys: Keys, cmd: CommandFactory) -> None:
    signed = keys.sign(cmd("shadow"), "k1")
    assert signed.signature is not None
    padded = msgspec.structs.replace(signed, signature=signed.signature + "==")
    assert verify(keys, padded) is R.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("key_id", "action", "reason"),
    [
        ("g1", "promote", R.ROLE),
        ("g1", "canary", R.ROLE),
        ("g1", "rollback", None),
        ("g1", "pause", None),
        ("g1", "verdict", None),
        ("s1", "advance", None),
        ("s1", "rollback", R.ROLE),
        ("s1", "promote", R.ROLE),
        ("k1", "promote", None),
        ("k2", "retire", None),
    ],
)
def test_roles_limit_what_a_key_may_sign(
    keys: Keys, cmd: CommandFactory, key_id: str, action: str, reason: RejectReason | None
) -> None:
    assert verify(keys, keys.sign(cmd(action), key_id)) is reason


def test_command_rejected_is_a_sidecar_error() -> None:
    err = CommandRejected(RejectReason.STALE, "old")
    assert isinstance(err, SidecarError)
    assert str(err) == "stale: old"


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", RejectReason.MALFORMED),
        (b"", RejectReason.MALFORMED),
        (b"\xff\xfe", RejectReason.MALFORMED),
        (b'{"command_id": "x"', RejectReason.MALFORMED),
        (b"[]", RejectReason.SCHEMA),
        (b'{"command_id": "x"}', RejectReason.SCHEMA),
        (b" " * 70_000, RejectReason.OVERSIZE),
    ],
)
def test_decode_rejections(raw: bytes, reason: RejectReason) -> None:
    out = decode_command(raw)
    assert isinstance(out, Rejected)
    assert out.reason is reason
    assert out.detail


def _raw(**fields: object) -> bytes:
    base: dict[str, object] = {
        "command_id": "c1",
        "rollout": "r1",
        "action": "shadow",
        "issued_by": "alice",
        "reason": "why",
        "issued_at_ms": T0,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_raw(action="explode"), "action"),
        (_raw(command_id=None), "command_id"),
        (_raw(reason=None), "reason"),
        (_raw(command_id=""), "command_id"),
        (_raw(issued_at_ms=-1), "issued_at_ms"),
        (_raw(args={"share_bp": "ten"}), "share_bp"),
        (_raw(expected_epoch=-1), "expected_epoch"),
    ],
)
def test_schema_rejections_name_the_field(raw: bytes, needle: str) -> None:
    out = decode_command(raw)
    assert isinstance(out, Rejected) and out.reason is RejectReason.SCHEMA
    assert needle in out.detail


def test_decode_minimal_command() -> None:
    out = decode_command(_raw())
    assert isinstance(out, ControlCommand)
    assert out.args == CommandArgs()
    assert out.expected_epoch is None


# ------------------------------------------------------------------ freshness


def test_freshness_window(cmd: CommandFactory) -> None:
    f = Freshness(max_age_s=60, max_future_s=5)
    c = cmd("shadow", issued_at_ms=T0)
    check_fresh(c, T0 + 60_000, f)  # exactly max age: ok
    check_fresh(c, T0 - 5_000, f)  # exactly max skew: ok
    with pytest.raises(CommandRejected) as stale:
        check_fresh(c, T0 + 60_001, f)
    assert stale.value.reason is RejectReason.STALE
    with pytest.raises(CommandRejected) as future:
        check_fresh(c, T0 - 5_001, f)
    assert future.value.reason is RejectReason.FUTURE


def test_authenticate_stale_and_future(keys: Keys, cmd: CommandFactory) -> None:
    signed = keys.sign(cmd("shadow", issued_at_ms=T0), "k1")
    fresh = Freshness(max_age_s=300, max_future_s=30)
    assert authenticate(signed, T0 + 1000, trust=keys.trust, freshness=fresh) == signed
    stale = authenticate(signed, T0 + 301_000, trust=keys.trust, freshness=fresh)
    assert isinstance(stale, Rejected) and stale.reason is R.STALE
    assert stale.command == signed
    future = authenticate(signed, T0 - 31_000, trust=keys.trust, freshness=fresh)
    assert isinstance(future, Rejected) and future.reason is R.FUTURE


def test_signature_checked_before_freshness(keys: Keys, cmd: CommandFactory) -> None:
    out = authenticate(cmd("shadow", issued_at_ms=0), T0, trust=keys.trust)
    assert isinstance(out, Rejected) and out.reason is R.UNSIGNED


def test_require_signature_false_accepts_unsigned_but_checks_signed(
    keys: Keys, cmd: CommandFactory
) -> None:
    c = cmd("shadow")
    assert authenticate(c, T0, trust=keys.trust, require_signature=False) == c
    bad = msgspec.structs.replace(c, key_id="k1", signature="A" * 86)
    out = authenticate(bad, T0, trust=keys.trust, require_signature=False)
    assert isinstance(out, Rejected) and out.reason is R.BAD_SIGNATURE
    old = authenticate(cmd("shadow", issued_at_ms=0), T0, trust=keys.trust, require_signature=False)
    assert isinstance(old, Rejected) and old.reason is R.STALE
