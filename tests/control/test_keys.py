"""Trust files, key files, roles, validity dates and revocation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from ctl_support import T0, CommandFactory, fixed_key

from sidecar.cli import main
from sidecar.control import (
    ControlRecord,
    RejectReason,
    SigningKey,
    TrustError,
    TrustStore,
    encode_command,
    initial_state,
    replay,
    sign_command,
)
from sidecar.control.keys import Refusal, trust_entry_text, write_key_set

ALICE = fixed_key("ops-alice", "operator", 11, "alice@example.com")


def store(**dates: str) -> TrustStore:
    entry = trust_entry_text(ALICE.trusted())
    extra = "".join(f'{k} = "{v}"\n' for k, v in dates.items())
    return TrustStore.parse(entry + extra)


def outcome_at(trust: TrustStore, cmd: CommandFactory, at_ms: int) -> object:
    record = ControlRecord(
        encode_command(sign_command(cmd("promote", expected_epoch=0), ALICE)), at_ms
    )
    _, outcomes = replay([record], initial=initial_state("r1"), trust=trust)
    return getattr(outcomes[0], "reason", "applied")


def test_a_key_is_valid_between_its_dates(cmd: CommandFactory) -> None:
    trust = store(not_before="2023-11-14T00:00:00Z", not_after="2023-11-15T00:00:00Z")
    day = 86_400_000
    assert outcome_at(trust, cmd, T0) == "applied"  # 2023-11-14T22:13Z
    assert outcome_at(trust, cmd, T0 - day) is RejectReason.KEY_NOT_YET_VALID
    assert outcome_at(trust, cmd, T0 + day) is RejectReason.KEY_EXPIRED


def test_a_revoked_key_still_verifies_the_history_it_signed_before(cmd: CommandFactory) -> None:
    trust = store(revoked_at="2023-11-14T23:00:00Z")
    assert outcome_at(trust, cmd, T0) == "applied"  # appended before the revocation
    assert outcome_at(trust, cmd, T0 + 3_600_000) is RejectReason.KEY_REVOKED


def test_narrowed_actions_and_roles() -> None:
    entry = trust_entry_text(fixed_key("g", "guard", 5).trusted())
    narrowed = TrustStore.parse(entry + 'actions = ["rollback"]\n')
    key = fixed_key("g", "guard", 5)
    assert narrowed.check("g", key.sign(b"m"), b"m", 0, "rollback").role == "guard"
    with pytest.raises(Refusal, match="may not sign pause"):
        narrowed.check("g", key.sign(b"m"), b"m", 0, "pause")
    with pytest.raises(TrustError, match="not allowed to role guard"):
        TrustStore.parse(entry + 'actions = ["promote"]\n')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[keys]]\nid = "a"\nrole = "operator"\npublic_key = "not base64!"\n', "not base64"),
        ('[[keys]]\nid = "a"\nrole = "operator"\npublic_key = "AAAA"\n', "3 bytes"),
        ('[[keys]]\nid = "a"\nrole = "boss"\npublic_key = "AAAA"\n', "role"),
        ('[[keys]]\nid = "a b"\nrole = "operator"\npublic_key = "AAAA"\n', "id"),
        ("[[keys]\n", "trust"),
        (
            trust_entry_text(ALICE.trusted()) + trust_entry_text(ALICE.trusted()),
            "listed twice",
        ),
        (trust_entry_text(ALICE.trusted()) + 'not_after = "soon"\n', "ISO-8601"),
    ],
)
def test_bad_trust_files_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(TrustError, match=message):
        TrustStore.parse(text)


def test_key_files_round_trip_and_never_show_the_secret(tmp_path: Path) -> None:
    key = SigningKey.generate("k", "guard", "aggregator")
    text = key.key_file_text()
    path = tmp_path / "k.key"
    path.write_text(text)
    loaded = SigningKey.from_file(path)
    assert (loaded.id, loaded.role, loaded.holder) == ("k", "guard", "aggregator")
    assert loaded.public_key() == key.public_key()
    secret = text.split('private_key = "')[1].split('"')[0]
    for shown in (repr(loaded), str(loaded), repr(TrustStore([loaded.trusted()]))):
        assert secret not in shown
    path.write_text(text.replace(secret, secret[:-4] + "!!!!"))
    with pytest.raises(TrustError) as err:
        SigningKey.from_file(path)
    assert secret[:20] not in str(err.value)


def test_write_key_set_makes_one_private_key_per_role(tmp_path: Path) -> None:
    keys = write_key_set(tmp_path / "k")
    trust = TrustStore.from_file(keys.trust_file)
    assert trust.key_ids == ("dev-guard", "dev-operator", "dev-sidecar")
    for path in (keys.operator, keys.guard, keys.sidecar):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, trust = tmp_path / "bob.key", tmp_path / "trust.toml"
    argv = ["ctl", "keygen", "--id", "ops-bob", "--role", "operator", "--out", str(out)]
    assert main([*argv, "--principal", "bob@example.com", "--trust-file", str(trust)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    loaded = TrustStore.from_file(trust)
    entry = loaded.key("ops-bob")
    assert entry is not None and entry.principal == "bob@example.com"
    assert entry.public_key == SigningKey.from_file(out).public_key()
    capsys.readouterr()
    assert main(argv) == 1  # never overwrites a key
    assert "exists" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "x.key"), "--not-after", "tomorrow"]) == 1
    assert "ISO-8601" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "y.key")]) == 0
    assert "[[keys]]" in capsys.readouterr().out


def test_operators_may_sign_every_action_and_no_role_an_unknown_one() -> None:
    from sidecar.control.commands import ACTIONS
    from sidecar.control.keys import ROLE_ACTIONS

    assert ROLE_ACTIONS["operator"] == frozenset(ACTIONS)  # a new action is an operator's too
    assert all(actions <= frozenset(ACTIONS) for actions in ROLE_ACTIONS.values())
    assert ROLE_ACTIONS["guard"] == {"rollback", "pause", "verdict"}  # guards only stop or judge
