"""Error types whose message is always a single line fit for a user."""

from __future__ import annotations


class TrimmerError(ValueError):
    """Base class: a user-facing, one-line error."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class PayloadError(TrimmerError):
    """A request body that cannot be decoded or violates the wire protocol (HTTP 400)."""


class SignatureError(TrimmerError):
    """A model archive whose signature cannot be read."""


class BundleError(TrimmerError):
    """A bundle file or repository that cannot be turned into allowlists."""


class ConfigError(TrimmerError):
    """An invalid YAML configuration."""
