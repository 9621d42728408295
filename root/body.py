"""A request body kept as the chunks the server received, joined only when something needs one buffer.

A megabyte body arrives in a handful of ~256 KiB chunks. Joining them costs a
full copy per request (about a tenth of the root's CPU on the reference
payload); the msgpack trim reads the chunks in place (`trim_msgpack_chunks`)
and a passthrough forwards them as they are (`ChunksPayload`).
"""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import payload, web

from trimmer.errors import PayloadError


class Body:
    """`chunks` are bytes, or memoryviews of a buffer the receiving listener reuses (root/front.py): `joined()`
    is then a copy of its own, and `pinned` is set when an upstream connection was closed with them unsent."""

    __slots__ = ("chunks", "size", "pinned", "_joined")

    def __init__(self, chunks: list[bytes] | list[memoryview]) -> None:
        self.chunks = chunks
        self.size = sum(map(len, chunks))
        self.pinned = False
        self._joined: bytes | None = chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else None  # type: ignore[assignment]

    @classmethod
    def of(cls, data: bytes) -> Body:
        return cls([data])

    def __len__(self) -> int:
        return self.size

    def joined(self) -> bytes:
        """One buffer (one copy, made once) for the paths that decode or compress the whole body."""
        if self._joined is None:
            if self.size and not self.chunks:
                raise RuntimeError("request body used after release()")
            self._joined = b"".join(self.chunks)
        return self._joined

    def release(self) -> None:
        """Drop the bytes, keep the size: a trimmed request need not hold its whole body while the model runs."""
        self.chunks = []
        self._joined = None


class ChunksPayload(payload.Payload):
    """An upstream request body written chunk by chunk, with its Content-Length known up front."""

    _autoclose = True  # in memory: nothing to close

    def __init__(self, body: Body, content_type: str) -> None:
        super().__init__(body.chunks, content_type=content_type)
        self._size = body.size
        self._body = body

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._body.joined().decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        remaining = content_length
        for chunk in self._body.chunks:
            if remaining is not None:
                if remaining <= 0:
                    return
                chunk = chunk[:remaining]
                remaining -= len(chunk)
            await writer.write(chunk)


def outgoing(body: Body | bytes | None, content_type: str) -> Any:
    """What to hand aiohttp's client: the bytes themselves, or the chunks as one payload."""
    if body is None or isinstance(body, bytes):
        return body
    if body._joined is not None:
        return body._joined
    return ChunksPayload(body, content_type)


async def read_chunks(request: web.Request, n: int, on_chunk: Callable[[bytes], None] | None = None) -> Body:
    """Exactly the Content-Length bytes of a plain (not chunked, not encoded) body, without joining them.

    `on_chunk` sees each chunk as it arrives (the streaming trim scans it then).
    """
    chunks: list[bytes] = []
    got = 0
    content = request.content
    try:
        while got < n:
            chunk, _ = await content.readchunk()
            if not chunk:
                raise PayloadError(f"request body truncated: Content-Length {n}, got {got} bytes")
            chunks.append(chunk)
            got += len(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
    except ConnectionError:  # the client went away mid-body: its error, not a 500 with a traceback
        raise PayloadError(f"request body truncated: client closed the connection before {n} bytes arrived") from None
    if got > n:  # the parser never hands out more than Content-Length; guard anyway
        raise PayloadError(f"request body longer than its Content-Length {n}")
    return Body(chunks)


__all__ = ["Body", "ChunksPayload", "outgoing", "read_chunks"]
