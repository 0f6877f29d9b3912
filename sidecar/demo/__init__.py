"""``sidecar demo``: the rollout story on the embedded broker, with a live terminal view and an
HTML report at the end. See :mod:`sidecar.demo.run`."""

from __future__ import annotations

from .run import DemoOptions, DemoResult, run_demo

__all__ = ["DemoOptions", "DemoResult", "run_demo"]
