"""Model names and versions as the edge accepts them: one conservative character set.

Names and versions end up in upstream URL paths, metric labels and log lines.
aiohttp hands handlers percent-decoded path segments, so `%2F..%2Fmetrics` as a
version arrives as `/../metrics`; the root once built upstream paths from such
values and reached the leaf's internal routes. Both root and leaf check every
name and version against one rule before anything else:

    [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}

No `/`, no `%`, no segment made only of dots (the first character cannot be a
dot), nothing that normalises to another value: two spellings are two values.
"""

from __future__ import annotations

import re

from .errors import PayloadError

MAX_NAME_CHARS = 128
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def valid_name(value: str) -> bool:
    return _NAME.fullmatch(value) is not None


def version_key(version: str) -> tuple[int, int | str]:
    """Order of versions, as our leaf and Triton pick the latest: numeric ones numerically ("10" > "9") and
    above non-numeric ones, which sort as text."""
    return (1, int(version)) if version.isdigit() else (0, version)


def check_name(kind: str, value: object) -> str:
    """`value` if it is a valid model name or version, else PayloadError (HTTP 400) naming `kind`."""
    if not isinstance(value, str) or not value:
        raise PayloadError(f"invalid {kind}: must be a non-empty string, got {repr(value)[:60]}")
    if _NAME.fullmatch(value) is None:
        shown = repr(value)[:60]
        raise PayloadError(f"invalid {kind} {shown}: use 1-{MAX_NAME_CHARS} characters from A-Z a-z 0-9 _ . -, "
                           f"not starting with '.' or '-'")
    return value


__all__ = ["valid_name", "check_name", "version_key", "MAX_NAME_CHARS"]
