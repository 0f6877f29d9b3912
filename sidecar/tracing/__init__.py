"""Optional OpenTelemetry spans (``[tracing]``, extra ``sidecar[otel]``), off by default.

Off, nothing here imports OpenTelemetry and the runner holds ``None`` instead of a tracer:
its only cost is one ``is not None`` test per batch. On, :mod:`sidecar.tracing.spans` makes
one span per batch (consumed -> scored -> produced -> committed) with child spans for the
champion stage, the candidate stage and each hand-over to the producer until acknowledged,
linked to the traces of the batch's requests (their W3C ``traceparent`` headers), and one
span per control command handled.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import SidecarConfig, TracingConfig
    from .spans import BatchTracer

INSTALL_HINT = "pip install 'sidecar[otel]'"


def _spans(settings: TracingConfig) -> ModuleType:
    """:mod:`sidecar.tracing.spans`, or a ConfigError saying what to install."""
    try:
        from . import spans

        if settings.exporter == "otlp":
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError as exc:
        missing = exc.name or "opentelemetry"
        raise ConfigError(
            f"tracing.enabled = true needs OpenTelemetry, and {missing} is not installed: "
            f"{INSTALL_HINT} (or set tracing.enabled = false)"
        ) from exc
    return spans


def check_tracing(settings: TracingConfig) -> None:
    """Raise a ConfigError now if tracing is on but OpenTelemetry is not installed."""
    if settings.enabled:
        _spans(settings)


def new_tracer(config: SidecarConfig, instance_id: str) -> BatchTracer | None:
    """The batch tracer the config asks for; None (and no import) when tracing is off."""
    if not config.tracing.enabled:
        return None
    tracer: BatchTracer = _spans(config.tracing).BatchTracer.from_config(config, instance_id)
    return tracer
