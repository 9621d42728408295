"""Error types whose message is always a single line fit for a user, and the one translation of msgspec's errors.

Every place that decodes untrusted bytes with msgspec used to catch its own set of exceptions (some missed
RecursionError or the ValueError of invalid UTF-8, each worded the failure its own way); `decode_errors` is the
one set and the one wording.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import msgspec


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


# Everything a msgspec decode of untrusted bytes can raise: DecodeError and ValidationError are ValueErrors, and so is
# the error for invalid UTF-8; RecursionError for nesting deeper than the interpreter's stack. For code that falls back
# (e.g. shows raw text instead) rather than answering 400; `decode_errors` below is the 400.
DECODE_FAILURES: tuple[type[Exception], ...] = (ValueError, RecursionError)


def first_line(exc: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def decode_errors(what: str, shape: str | None = None, error: type[TrimmerError] = PayloadError) -> Iterator[None]:
    """Turn a failed msgspec decode of `what` ("msgpack body", "JSON body") into one `error` (PayloadError: a 400):

    * bytes that are not the format (DecodeError; ValueError: invalid UTF-8) -> `malformed {what}: {why}`
    * nesting past the interpreter's or msgspec's depth (RecursionError)    -> `malformed {what}: nested too deeply`
    * the right format, the wrong shape (ValidationError)                   -> `{shape} ({why})`, else as malformed.

    A TrimmerError raised inside (e.g. by an ext hook) passes through unchanged.
    """
    try:
        yield
    except TrimmerError:
        raise
    except msgspec.ValidationError as exc:
        raise error(f"{shape} ({first_line(exc)})" if shape else f"malformed {what}: {first_line(exc)}") from None
    except RecursionError:
        raise error(f"malformed {what}: nested too deeply") from None
    except ValueError as exc:  # msgspec.DecodeError, or invalid UTF-8
        raise error(f"malformed {what}: {first_line(exc)}") from None
