"""trimmer.errors.decode_errors: one wording for every way a msgspec decode of untrusted bytes fails, each a
PayloadError."""

from __future__ import annotations

import msgspec
import pytest

from trimmer.errors import DECODE_FAILURES, ConfigError, PayloadError, decode_errors

SHAPE = "request must be a map with string keys"


@pytest.mark.parametrize("decode, data, message", [
    (msgspec.msgpack.decode, b"\xc1", "malformed msgpack body: "),  # not msgpack (DecodeError)
    (msgspec.json.decode, b'"\xff"', "malformed msgpack body: "),  # invalid UTF-8 in a string
    (msgspec.json.decode, b"[" * 100_000 + b"]" * 100_000, "malformed msgpack body: "),  # deeper than msgspec allows
    (lambda b: msgspec.msgpack.decode(b, type=dict[str, int]),
     msgspec.msgpack.encode({1: 1}), SHAPE + " ("),  # wrong shape
])
def test_every_decode_failure_is_one_payload_error(decode, data, message):
    with pytest.raises(PayloadError) as exc:
        with decode_errors("msgpack body", shape=SHAPE):
            decode(data)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


def test_recursion_and_shapeless_validation_and_passthrough():
    def deep():
        raise RecursionError("maximum recursion depth exceeded")

    with pytest.raises(PayloadError, match="^malformed JSON body: nested too deeply$"):
        with decode_errors("JSON body"):
            deep()
    with pytest.raises(PayloadError, match="^malformed JSON body: Expected `int`, got `str`$"):
        with decode_errors("JSON body"):
            msgspec.json.decode(b'"x"', type=int)
    with pytest.raises(ConfigError, match="^own words$"):  # a TrimmerError raised inside is not rewrapped
        with decode_errors("JSON body"):
            raise ConfigError("own words")
    with pytest.raises(ConfigError):
        with decode_errors("JSON body", error=ConfigError):
            msgspec.json.decode(b"{")


def test_decode_failures_catch_what_msgspec_raises():
    for data in (b"{", b'"\xff"', b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(DECODE_FAILURES):
            msgspec.json.decode(data)
    with pytest.raises(DECODE_FAILURES):
        msgspec.json.decode(b'"x"', type=int)
