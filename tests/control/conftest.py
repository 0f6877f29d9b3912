from __future__ import annotations

import pytest
from ctl_support import CommandFactory, Keys, command_factory, make_keys


@pytest.fixture
def keys() -> Keys:
    return make_keys()


@pytest.fixture
def cmd() -> CommandFactory:
    return command_factory()
