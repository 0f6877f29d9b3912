"""Versioned output streams: older API versions of the decisions served through
compatibility adapters, their lifecycle (deprecation, sunset) and who still reads them."""

from __future__ import annotations

from .adapters import Adapter, CallableAdapter, DeclarativeAdapter, compile_adapter
from .lifecycle import OutputState, configured_outputs, version_headers
from .settings import FieldMap, OutputsSettings, OutputVersion

__all__ = [
    "Adapter",
    "CallableAdapter",
    "DeclarativeAdapter",
    "FieldMap",
    "OutputState",
    "OutputVersion",
    "OutputsSettings",
    "compile_adapter",
    "configured_outputs",
    "version_headers",
]
