from __future__ import annotations

import pytest
from ctl_support import SECRET_1, SECRET_2, CommandFactory, command_factory

from sidecar.control import Keyring


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.parse(f"k1={SECRET_1}\nk2={SECRET_2}\n")


@pytest.fixture
def cmd() -> CommandFactory:
    return command_factory()
