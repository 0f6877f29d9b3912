"""Shared helpers for the control-plane tests (a unique module name, unlike ``conftest``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from sidecar.control import CommandArgs, ControlCommand

SECRET_1 = "11" * 32
SECRET_2 = "22" * 32
T0 = 1_700_000_000_000  # a fixed "now", ms

CommandFactory = Callable[..., ControlCommand]
_ARG_NAMES = frozenset({"share_bp", "plan", "score_shadow_arm", "samples"})


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
