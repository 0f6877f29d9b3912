from __future__ import annotations

import json
import secrets
from pathlib import Path

import msgspec
import pytest
from ctl_support import SECRET_1, SECRET_2, T0, CommandFactory

from sidecar.control import (
    CommandArgs,
    CommandRejected,
    ControlCommand,
    Freshness,
    Keyring,
    KeyringError,
    RampStep,
    Rejected,
    RejectReason,
    authenticate,
    canonical_bytes,
    check_fresh,
    decode_command,
    encode_command,
    format_ramp_plan,
    parse_duration,
    parse_ramp_plan,
    parse_samples,
    parse_share,
)
from sidecar.errors import SidecarError

# ------------------------------------------------------------------ canonical bytes


def test_canonical_bytes_sorted_compact_without_signature(
    keyring: Keyring, cmd: CommandFactory
) -> None:
    signed = keyring.sign(cmd("canary", share_bp=500), "k1")
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


def test_sign_verify_round_trip_over_the_wire(keyring: Keyring, cmd: CommandFactory) -> None:
    plan = [RampStep(share_bp=100, min_hold_s=60, min_samples=10)]
    signed = keyring.sign(cmd("ramp", plan=plan, expected_epoch=4), "k1")
    assert signed.key_id == "k1"
    assert signed.signature is not None and len(signed.signature) == 64
    decoded = decode_command(encode_command(signed))
    assert isinstance(decoded, ControlCommand)
    keyring.verify(decoded)
    assert decoded == signed


def test_key_rotation_two_ids_valid(keyring: Keyring, cmd: CommandFactory) -> None:
    c = cmd("shadow")
    a, b = keyring.sign(c, "k1"), keyring.sign(c, "k2")
    assert a.signature != b.signature
    keyring.verify(a)
    keyring.verify(b)
    # After rotation: k1 dropped, k2 kept.
    rotated = Keyring.parse(f"k2={SECRET_2}")
    rotated.verify(b)
    with pytest.raises(CommandRejected) as exc:
        rotated.verify(a)
    assert exc.value.reason is RejectReason.UNKNOWN_KEY


def test_forged_signature(keyring: Keyring, cmd: CommandFactory) -> None:
    forged = msgspec.structs.replace(cmd("promote"), key_id="k1", signature=secrets.token_hex(32))
    with pytest.raises(CommandRejected) as exc:
        keyring.verify(forged)
    assert exc.value.reason is RejectReason.BAD_SIGNATURE


def test_signature_by_other_secret_under_same_id(keyring: Keyring, cmd: CommandFactory) -> None:
    attacker = Keyring.parse(f"k1={'33' * 32}")
    with pytest.raises(CommandRejected) as exc:
        keyring.verify(attacker.sign(cmd("promote"), "k1"))
    assert exc.value.reason is RejectReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [
        {"rollout": "other"},
        {"action": "promote"},
        {"args": CommandArgs(share_bp=10_000)},
        {"expected_epoch": 8},
        {"issued_at_ms": T0 + 1},
        {"command_id": "c-other"},
        {"issued_by": "mallory"},
        {"reason": "changed"},
        {"key_id": "k2"},
    ],
)
def test_tampered_field_after_signing(
    keyring: Keyring, cmd: CommandFactory, change: dict[str, object]
) -> None:
    signed = keyring.sign(cmd("canary", share_bp=100, expected_epoch=7), "k1")
    tampered = msgspec.structs.replace(signed, **change)
    with pytest.raises(CommandRejected) as exc:
        keyring.verify(tampered)
    assert exc.value.reason is RejectReason.BAD_SIGNATURE


def test_tampered_wire_bytes(keyring: Keyring, cmd: CommandFactory) -> None:
    raw = encode_command(keyring.sign(cmd("canary", share_bp=100), "k1"))
    out = authenticate(raw.replace(b'"share_bp":100', b'"share_bp":9000'), T0, keyring=keyring)
    assert isinstance(out, Rejected) and out.reason is RejectReason.BAD_SIGNATURE


def test_unknown_extra_field_is_ignored_and_signature_still_verifies(
    keyring: Keyring, cmd: CommandFactory
) -> None:
    raw = encode_command(keyring.sign(cmd("shadow"), "k1"))
    out = authenticate(raw[:-1] + b',"extra":1}', T0, keyring=keyring)
    assert isinstance(out, ControlCommand)


@pytest.mark.parametrize("change", [{}, {"key_id": "k1"}, {"signature": "ab" * 32}])
def test_unsigned(keyring: Keyring, cmd: CommandFactory, change: dict[str, object]) -> None:
    c = msgspec.structs.replace(cmd("shadow"), **change)
    with pytest.raises(CommandRejected) as exc:
        keyring.verify(c)
    assert exc.value.reason is RejectReason.UNSIGNED
    out = authenticate(c, T0, keyring=keyring)
    assert isinstance(out, Rejected) and out.reason is RejectReason.UNSIGNED


def test_signature_must_be_lowercase_hex(keyring: Keyring, cmd: CommandFactory) -> None:
    signed = keyring.sign(cmd("shadow"), "k1")
    assert signed.signature is not None
    upper = msgspec.structs.replace(signed, signature=signed.signature.upper())
    with pytest.raises(CommandRejected) as exc:
        keyring.verify(upper)
    assert exc.value.reason is RejectReason.BAD_SIGNATURE


def test_sign_with_unknown_key_id(keyring: Keyring, cmd: CommandFactory) -> None:
    with pytest.raises(KeyringError, match="unknown control key id 'k9'"):
        keyring.sign(cmd("shadow"), "k9")


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


def test_freshness_window(keyring: Keyring, cmd: CommandFactory) -> None:
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


def test_authenticate_stale_and_future(keyring: Keyring, cmd: CommandFactory) -> None:
    signed = keyring.sign(cmd("shadow", issued_at_ms=T0), "k1")
    fresh = Freshness(max_age_s=300, max_future_s=30)
    assert authenticate(signed, T0 + 1000, keyring=keyring, freshness=fresh) == signed
    stale = authenticate(signed, T0 + 301_000, keyring=keyring, freshness=fresh)
    assert isinstance(stale, Rejected) and stale.reason is RejectReason.STALE
    assert stale.command == signed
    future = authenticate(signed, T0 - 31_000, keyring=keyring, freshness=fresh)
    assert isinstance(future, Rejected) and future.reason is RejectReason.FUTURE


def test_signature_checked_before_freshness(keyring: Keyring, cmd: CommandFactory) -> None:
    out = authenticate(cmd("shadow", issued_at_ms=0), T0, keyring=keyring)
    assert isinstance(out, Rejected) and out.reason is RejectReason.UNSIGNED


def test_require_signature_false_accepts_unsigned_but_checks_signed(
    keyring: Keyring, cmd: CommandFactory
) -> None:
    c = cmd("shadow")
    assert authenticate(c, T0, keyring=keyring, require_signature=False) == c
    bad = msgspec.structs.replace(c, key_id="k1", signature="00" * 32)
    out = authenticate(bad, T0, keyring=keyring, require_signature=False)
    assert isinstance(out, Rejected) and out.reason is RejectReason.BAD_SIGNATURE
    old = authenticate(cmd("shadow", issued_at_ms=0), T0, keyring=keyring, require_signature=False)
    assert isinstance(old, Rejected) and old.reason is RejectReason.STALE


# ------------------------------------------------------------------ keyring loading


def test_keyring_from_file(tmp_path: Path, cmd: CommandFactory) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# control keys\n\nk1 = {SECRET_1}\nk2={SECRET_2}\n")
    ring = Keyring.from_file(path)
    assert ring.key_ids == ("k1", "k2")
    assert "k1" in ring and len(ring) == 2
    ring.verify(ring.sign(cmd("shadow"), "k2"))


def test_keyring_from_env(cmd: CommandFactory) -> None:
    ring = Keyring.from_env(environ={"SIDECAR_CONTROL_KEYS": f"k1:{SECRET_1}, k2:{SECRET_2}"})
    assert ring.key_ids == ("k1", "k2")
    with pytest.raises(KeyringError, match="SIDECAR_CONTROL_KEYS is not set"):
        Keyring.from_env(environ={})


def test_keyring_file_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read control key file"):
        Keyring.from_file(tmp_path / "nope")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"k1={SECRET_1}\nk1={SECRET_2}", "defined twice"),
        ("k1=nothex" + "z" * 40, "not hex"),
        ("k1=abcd", "at least 16"),
        ("k1", "expected `key_id=hexsecret`"),
        ("=" + SECRET_1, "expected `key_id=hexsecret`"),
        (f"bad id={SECRET_1}", "invalid control key id"),
    ],
)
def test_keyring_parse_errors(text: str, match: str) -> None:
    with pytest.raises(KeyringError, match=match) as exc:
        Keyring.parse(text)
    assert SECRET_1 not in str(exc.value) and SECRET_2 not in str(exc.value)
    assert "z" * 40 not in str(exc.value)


def test_keyring_never_shows_secrets(keyring: Keyring) -> None:
    for text in (repr(keyring), str(keyring), f"{keyring}"):
        assert SECRET_1 not in text and SECRET_2 not in text
        assert bytes.fromhex(SECRET_1).decode("latin-1") not in text
        assert "k1" in text and "k2" in text


# ------------------------------------------------------------------ ramp plans


def test_parse_ramp_plan() -> None:
    plan = parse_ramp_plan("1%:5m:1000, 5%:10m:5k,25%:1h30m:20_000,100%:90s:1M")
    assert plan == [
        RampStep(share_bp=100, min_hold_s=300, min_samples=1000),
        RampStep(share_bp=500, min_hold_s=600, min_samples=5000),
        RampStep(share_bp=2500, min_hold_s=5400, min_samples=20000),
        RampStep(share_bp=10000, min_hold_s=90, min_samples=1_000_000),
    ]
    assert parse_ramp_plan(format_ramp_plan(plan)) == plan


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "ramp step 1 ''"),
        ("5%:1m", "expected share:hold:min_samples"),
        ("5%:1m:10,5%:1m:10", "step 2: share 500 bp does not increase"),
        ("10%:1m:10,5%:1m:10", "does not increase"),
        ("0%:1m:10", "outside 1..10000"),
        ("101%:1m:10", "outside 0%..100%"),
        ("5:1m:10", "expected a percentage"),
        ("5%:soon:10", "duration 'soon'"),
        ("5%:-1:10", "non-negative"),
        ("5%:1m:lots", "sample count 'lots'"),
        ("5%:1m:-3", "sample count"),
        (",".join(f"{i}bp:1s:1" for i in range(1, 70)), "at most 64"),
    ],
)
def test_parse_ramp_plan_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_ramp_plan(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300", 300),
        ("1.5", 1.5),
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("0", 0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "5m3", "inf", "nan", "1h 30m"])
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_share_and_samples() -> None:
    assert parse_share("0.25%") == 25
    assert parse_share("50bp") == 50
    assert parse_share("100%") == 10_000
    assert parse_samples("5k") == 5000
    with pytest.raises(ValueError):
        parse_share("0.125%")
