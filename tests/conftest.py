"""Shared fixtures. Tests that need Kafka get ``bootstrap``:

* by default, an embedded Tansu broker started once per test session;
* ``SIDECAR_TEST_BROKER=host:port[,host:port]`` points them at an external broker instead;
* ``SIDECAR_TEST_BROKER=testcontainers`` starts Apache Kafka in a container (needs a Docker
  engine and the ``testcontainers`` package; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sidecar.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    target = os.environ.get("SIDECAR_TEST_BROKER", "").strip()
    if target == "testcontainers":
        try:
            from testcontainers.kafka import KafkaContainer
        except ImportError:
            pytest.skip("SIDECAR_TEST_BROKER=testcontainers needs `pip install testcontainers`")
        try:
            container = KafkaContainer().with_kraft()
            container.start()
        except Exception as exc:  # no Docker engine here
            pytest.skip(f"could not start a Kafka container: {exc}")
        try:
            yield container.get_bootstrap_server()
        finally:
            container.stop()
        return
    if target:
        yield target
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap_servers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first (each module's tests still together and in order): with
    two test processes (`-n 2`) the long ones then start early and the short ones fill in at
    the end, instead of one process running the last slow module while the other waits."""

    def module(item: pytest.Item) -> str:
        return item.module.__name__ if item.module is not None else ""

    slow: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(module(item), i)
        if item.get_closest_marker("slow") is not None:
            slow[module(item)] = slow.get(module(item), 0) + 1
    order = sorted(
        range(len(items)),
        key=lambda i: (-slow.get(module(items[i]), 0), first_seen[module(items[i])], i),
    )
    items[:] = [items[i] for i in order]
