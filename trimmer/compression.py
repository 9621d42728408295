"""HTTP body compression in one place: bounded, streaming request decoders and the upstream compressors.

Why our own reader: aiohttp's automatic request inflation decodes gzip and
deflate *before* a handler can apply its body limit (a 1 MB gzip of 1 GB of
zeros raised the root's RSS by ~430 MB before its 413), turns a corrupt gzip
stream into a 500 with a traceback, and knows nothing of lz4, zstd or br. So
the root and the leaf switch it off (`auto_decompress=False`) and decode here:

- one streaming decoder per Content-Encoding (gzip / x-gzip, deflate, lz4
  frame, zstd, br), fed the body chunk by chunk as it arrives;
- every decoder hands out its output in pieces of at most `PIECE` bytes and
  the caller's limit is checked after each piece, so a bomb stops within one
  piece of the limit (`BodyTooLarge` -> 413) without ever inflating further;
- anything the decoder cannot read, a truncated stream and trailing garbage
  are a one-line `DecompressError` (a `PayloadError`: 400);
- an encoding not listed is `UnsupportedEncoding` (415).

zstd has no output-bounded streaming call in python-zstandard, so its decoder
feeds the input in slices small enough that one slice cannot expand past the
remaining budget: a zstd block holds at most 128 KiB of output and takes at
least 4 bytes of input (an RLE block), so a slice of `4 * remaining / 128 KiB`
bytes (at least 64) cannot overshoot the limit by more than ~2 MiB. The window
is capped at 8 MiB (RFC 9659) so a frame cannot make the decoder allocate a
large history buffer.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterator

from .errors import PayloadError, TrimmerError

PIECE = 256 * 1024  # largest output piece a decoder hands out before the limit is checked again
ENCODINGS = ("gzip", "x-gzip", "deflate", "lz4", "zstd", "br")
UPSTREAM_COMPRESSIONS = ("none", "lz4", "zstd")
ZSTD_MAX_WINDOW = 8 * 1024 * 1024  # RFC 9659: HTTP zstd decoders need not accept windows over 8 MB
_ZSTD_BLOCK = 128 * 1024  # ZSTD_BLOCKSIZE_MAX: output of one block
_ZSTD_MIN_BLOCK_INPUT = 4  # an RLE block: 3-byte header + 1 byte


class DecompressError(PayloadError):
    """A compressed body that cannot be decoded: corrupt, truncated, or followed by garbage (HTTP 400)."""


class BodyTooLarge(TrimmerError):
    """The decoded body passed the caller's limit (HTTP 413). `decoded` is how many bytes were produced."""

    def __init__(self, encoding: str, limit: int, decoded: int) -> None:
        super().__init__(f"decompressed body exceeds {limit} bytes ({encoding})")
        self.encoding = encoding
        self.limit = limit
        self.decoded = decoded


class UnsupportedEncoding(TrimmerError):
    """A Content-Encoding this module does not decode (HTTP 415)."""


def normalize(encoding: str | None) -> str | None:
    """The one encoding named by a Content-Encoding header, lower case; None for identity / absent."""
    enc = (encoding or "").strip().lower()
    if enc in ("", "identity"):
        return None
    if "," in enc:
        raise UnsupportedEncoding(
            f"unsupported Content-Encoding {(encoding or '')[:60]!r}: one encoding at a time ({', '.join(ENCODINGS)})")
    if enc not in ENCODINGS:
        raise UnsupportedEncoding(
            f"unsupported Content-Encoding {(encoding or '')[:60]!r}; use one of {', '.join(ENCODINGS)}")
    return enc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------------- codecs
class _Zlib:
    """gzip (wbits 31, concatenated members allowed) or deflate (zlib-wrapped, or raw as some clients send it)."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.gzip = encoding != "deflate"
        self.d: zlib._Decompress | None = zlib.decompressobj(31) if self.gzip else None
        self.head = b""  # deflate: the first bytes, until the wrapper can be told from raw deflate
        self.started = False

    def _start_deflate(self, data: bytes) -> bytes:
        self.head += data
        if len(self.head) < 2:
            return b""
        cmf, flg = self.head[0], self.head[1]
        wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
        self.d = zlib.decompressobj(15 if wrapped else -15)
        data, self.head = self.head, b""
        return data

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.started = self.started or bool(data)
        if self.d is None:
            data = self._start_deflate(data)
            if self.d is None:
                return
        d = self.d
        while data:
            if d.eof:  # a gzip body may hold several members; anything else after the end is garbage
                if not self.gzip or not data.lstrip(b"\x00"):
                    if data.strip(b"\x00"):
                        raise DecompressError(
                            f"cannot decompress {self.encoding} body: {len(data)} bytes of garbage after its end")
                    return
                d = self.d = zlib.decompressobj(31)
            out = d.decompress(data, PIECE)
            if out:
                yield out
            data = d.unused_data if d.eof else d.unconsumed_tail  # at the end both hold the rest: take it once

    def finish(self) -> Iterator[bytes]:
        if not self.started:
            raise DecompressError(f"cannot decompress {self.encoding} body: empty")
        if self.d is None or not self.d.eof:
            raise DecompressError(f"cannot decompress {self.encoding} body: truncated")
        return iter(())


class _Lz4:
    def __init__(self) -> None:
        import lz4.frame

        self.encoding = "lz4"
        self._new = lz4.frame.LZ4FrameDecompressor
        self.d = self._new()
        self.started = False
        self.ended = False  # the last frame fed so far is complete

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            self.started = True
            if self.ended:  # another frame follows: a fresh decompressor (garbage fails in it)
                self.d, self.ended = self._new(), False
            d = self.d
            out = d.decompress(data, max_length=PIECE)
            data = b""
            if out:
                yield out
            while not d.eof and not d.needs_input:  # more output from the input it holds
                out = d.decompress(b"", max_length=PIECE)
                if not out:
                    break
                yield out
            if d.eof:
                self.ended = True
                data = d.unused_data or b""

    def finish(self) -> Iterator[bytes]:
        if not self.started:
            raise DecompressError("cannot decompress lz4 body: empty")
        if not self.ended:
            raise DecompressError("cannot decompress lz4 body: truncated")
        return iter(())


class _Zstd:
    def __init__(self, limit: int) -> None:
        import zstandard

        self.encoding = "zstd"
        self.limit = limit
        self.out = 0
        self.dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self.d = self.dctx.decompressobj(write_size=PIECE)
        self.started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            self.started = True
            if self.d.eof:  # another frame follows (a zstd stream may hold several); garbage fails in the next call
                self.d = self.dctx.decompressobj(write_size=PIECE)
            remaining = max(self.limit - self.out, 0)
            step = max(64, _ZSTD_MIN_BLOCK_INPUT * (remaining // _ZSTD_BLOCK))
            piece, data = data[:step], data[step:]
            out = self.d.decompress(piece)
            if self.d.eof and self.d.unused_data:
                data = self.d.unused_data + data
            if out:
                self.out += len(out)
                if len(out) <= PIECE:
                    yield out
                else:
                    view = memoryview(out)
                    for i in range(0, len(out), PIECE):
                        yield bytes(view[i:i + PIECE])

    def finish(self) -> Iterator[bytes]:
        if not self.started:
            raise DecompressError("cannot decompress zstd body: empty")
        if not self.d.eof:
            raise DecompressError("cannot decompress zstd body: truncated")
        return iter(())


class _Brotli:
    def __init__(self) -> None:
        import brotli

        self.encoding = "br"
        self.d = brotli.Decompressor()
        self.started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        d = self.d
        if data:
            self.started = True
            if d.is_finished():
                raise DecompressError(f"cannot decompress br body: {len(data)} bytes of garbage after its end")
            out = d.process(data, output_buffer_limit=PIECE)
            if out:
                yield out
            while not d.is_finished():  # output held back by the limit (a piece can reach ~2 x PIECE)
                out = d.process(b"", output_buffer_limit=PIECE)
                if not out:
                    break
                yield out

    def finish(self) -> Iterator[bytes]:
        if not self.started:
            raise DecompressError("cannot decompress br body: empty")
        if not self.d.is_finished():
            raise DecompressError("cannot decompress br body: truncated")
        return iter(())


# ---------------------------------------------------------------------- the bounded decoder
class Decoder:
    """Decode one request body chunk by chunk; at most `limit` output bytes, else `BodyTooLarge`.

    `feed(chunk)` and `finish()` return the output produced (possibly empty pieces omitted).
    Every codec error surfaces as a one-line `DecompressError`.
    """

    def __init__(self, encoding: str, limit: int) -> None:
        enc = normalize(encoding)
        if enc is None:
            raise UnsupportedEncoding("identity needs no decoder")
        self.encoding = enc
        self.limit = limit
        self.decoded = 0
        self.received = 0
        self._codec: _Zlib | _Lz4 | _Zstd | _Brotli
        if enc in ("gzip", "x-gzip", "deflate"):
            self._codec = _Zlib(enc)
        elif enc == "lz4":
            self._codec = _Lz4()
        elif enc == "zstd":
            self._codec = _Zstd(limit)
        else:
            self._codec = _Brotli()

    def _take(self, pieces: Iterator[bytes]) -> list[bytes]:
        out: list[bytes] = []
        try:
            for piece in pieces:
                self.decoded += len(piece)
                if self.decoded > self.limit:
                    raise BodyTooLarge(self.encoding, self.limit, self.decoded)
                out.append(piece)
        except (BodyTooLarge, DecompressError):
            raise
        except Exception as exc:  # noqa: BLE001 - zlib.error, lz4's RuntimeError, ZstdError, brotli.error: the client's bytes
            raise DecompressError(f"cannot decompress {self.encoding} body: {_first_line(exc)}") from None
        return out

    def feed(self, data: bytes) -> list[bytes]:
        self.received += len(data)
        return self._take(self._codec.feed(bytes(data)))

    def finish(self) -> list[bytes]:
        return self._take(self._codec.finish())


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The whole decoded body (identity: `body` itself); raises BodyTooLarge, DecompressError, UnsupportedEncoding."""
    if normalize(encoding) is None:
        return body
    d = Decoder(encoding or "", limit)
    pieces = d.feed(body)
    pieces += d.finish()
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


# ---------------------------------------------------------------------- upstream compressors
def compressor(kind: str) -> Callable[[bytes], bytes] | None:
    """The body compressor for a partition's `compression` (none | lz4 | zstd); None for none."""
    if kind == "lz4":
        import lz4.frame

        return lambda b: lz4.frame.compress(b, compression_level=0)
    if kind == "zstd":
        import zstandard

        cctx = zstandard.ZstdCompressor(level=1)
        return cctx.compress
    return None


__all__ = ["Decoder", "decompress", "compressor", "normalize", "DecompressError", "BodyTooLarge", "UnsupportedEncoding",
           "ENCODINGS", "UPSTREAM_COMPRESSIONS", "PIECE"]
