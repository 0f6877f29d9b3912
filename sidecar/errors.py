"""The sidecar's errors: one root class; ``retriable`` says whether trying again can help."""

from __future__ import annotations


class SidecarError(Exception):
    """Root of every error the sidecar raises on purpose."""

    retriable = False


class ConfigError(SidecarError):
    """The configuration is invalid; the message says which setting and how to fix it."""


class ContractError(SidecarError):
    """A message or model violates a declared contract."""


class ModelLoadError(SidecarError):
    """A model could not be loaded from its declared loader and target."""


class BrokerError(SidecarError):
    """The Kafka broker could not be reached or refused a request."""

    retriable = True


class EmbeddedBrokerError(SidecarError):
    """The embedded Tansu broker could not be started."""
