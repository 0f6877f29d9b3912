"""Shared helpers for the control-plane tests (a unique module name, unlike ``conftest``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sidecar.control import (
    CommandArgs,
    ControlCommand,
    ControlRecord,
    RolloutState,
    SigningKey,
    TrustStore,
    apply,
    encode_command,
    sign_command,
)
from sidecar.control.keys import Role

T0 = 1_700_000_000_000  # a fixed "now", ms

CommandFactory = Callable[..., ControlCommand]
_ARG_NAMES = frozenset(CommandArgs.__struct_fields__)


def fixed_key(key_id: str, role: Role, seed: int, principal: str | None = None) -> SigningKey:
    """A deterministic key (tests only: the seed is public)."""
    private = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return SigningKey(key_id, role, private, principal)


@dataclass(frozen=True)
class Keys:
    """Test keys by id, and the trust store that lists them: ``k1``/``k2`` operators (``k1``
    held by ``alice``), ``g1`` a guard, ``s1`` a sidecar."""

    by_id: dict[str, SigningKey]
    trust: TrustStore

    def sign(self, cmd: ControlCommand, key_id: str = "k1") -> ControlCommand:
        return sign_command(cmd, self.by_id[key_id])

    def record(self, cmd: ControlCommand, ts_ms: int, key_id: str = "k1") -> ControlRecord:
        """``cmd`` signed by ``key_id`` as a control-topic record appended at ``ts_ms``."""
        return ControlRecord(encode_command(self.sign(cmd, key_id)), ts_ms)


def make_keys() -> Keys:
    keys = {
        "k1": fixed_key("k1", "operator", 1, "alice"),
        "k2": fixed_key("k2", "operator", 2),
        "g1": fixed_key("g1", "guard", 3),
        "s1": fixed_key("s1", "sidecar", 4),
    }
    return Keys(keys, TrustStore([k.trusted() for k in keys.values()]))


KEYS = make_keys()


def command_factory(prefix: str = "c") -> CommandFactory:
    """``make("canary", share_bp=500, expected_epoch=3)``: unique ids c1, c2, ..."""
    counter = itertools.count(1)

    def make(
        action: str, *, rollout: str = "r1", issued_at_ms: int = T0, **kw: Any
    ) -> ControlCommand:
        args = CommandArgs(**{k: kw.pop(k) for k in list(kw) if k in _ARG_NAMES})
        return ControlCommand(
            command_id=kw.pop("command_id", f"{prefix}{next(counter)}"),
            rollout=rollout,
            action=action,  # type: ignore[arg-type]
            args=args,
            issued_by=kw.pop("issued_by", "alice"),
            reason=kw.pop("reason", "test"),
            issued_at_ms=issued_at_ms,
            **kw,
        )

    return make


def at_epoch(state: RolloutState, cmd: ControlCommand) -> ControlCommand:
    """``cmd`` issued against ``state``'s epoch, unless it names one (or is a rollback)."""
    if cmd.expected_epoch is not None or cmd.action == "rollback":
        return cmd
    return msgspec.structs.replace(cmd, expected_epoch=state.epoch)


def apply_at(state: RolloutState, cmd: ControlCommand, now_ms: int, **kw: Any) -> Any:
    """``apply`` with the command issued against the state's current epoch."""
    return apply(state, at_epoch(state, cmd), now_ms, **kw)
