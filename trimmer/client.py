"""HTTP clients for a root or a leaf: `Client` (sync) and `AsyncClient` (aiohttp), both pooled.

Why a client at all: the wire format (docs/protocol.md) has typed tensors as a msgpack ext type
or a `$tensor` JSON object, and OIP v2 wants flattened `data` with a datatype name. Getting those
right by hand is where users lose an afternoon. Here, features and inputs are numpy arrays, torch
tensors, Python scalars, strings or lists, and outputs come back as numpy arrays.

torch is never imported by this module: a torch tensor is recognised only when the caller has
already imported torch (it is then in `sys.modules`), so the root's lean install can use the client.

    with Client("http://127.0.0.1:8080") as c:
        r = c.score("ranker", {"user_age": 31, "cand_ctr": np.zeros(256, np.float32)})
        r.outputs["score"]                         # numpy array
        c.infer("ranker", {"cand_ctr": np.zeros(256, np.float32)}).outputs
        c.signature("ranker")                      # inputs the model reads: GET /v2/models/ranker

    async with AsyncClient("http://127.0.0.1:8080") as c:
        r = await c.score("ranker", features)

Bounds: `max_connections` pooled keep-alive connections per client (default 16), `timeout` seconds
per request (default 10), answers larger than `max_response_bytes` (default 64 MiB) are an error.
A request that fails on a reused keep-alive connection before any answer arrives (the server closed
it while idle) is sent once more on a fresh connection; nothing else is retried.
"""

from __future__ import annotations

import http.client
import json
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence
from urllib.parse import quote, urlsplit

from . import codec
from .codec import JSON, MSGPACK
from .errors import TrimmerError
from .tensor import DTYPES, Tensor

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

# Open Inference Protocol v2 datatypes <-> wire dtypes (BYTES: strings, OIP only).
OIP_TO_WIRE = {"BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
               "FP16": "float16", "FP32": "float32", "FP64": "float64"}
WIRE_TO_OIP = {v: k for k, v in OIP_TO_WIRE.items()}


class ClientError(TrimmerError):
    """An answer other than 2xx (`status`, and the server's `{"error": ...}` text), or a transport failure (status
    0)."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        self.status, self.message, self.url = status, message, url
        super().__init__(f"{url}: {status} {message}" if status else f"{url}: {message}")


@dataclass
class ScoreResult:
    """A native `/score` answer: outputs as numpy arrays (a `Tensor` for bfloat16, which numpy lacks)."""

    model: str
    version: str
    outputs: dict[str, Any]
    request_id: Any = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class InferResult:
    """An OIP v2 `/infer` answer: outputs by name as numpy arrays of the declared shape."""

    model: str
    version: str | None
    outputs: dict[str, Any]
    id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------- encoding
def _torch_tensor(value: Any) -> Tensor | None:
    """A torch tensor as a wire Tensor, without importing torch (only if the caller already did)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return None
    t = value.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TrimmerError(f"torch dtype {t.dtype} has no wire dtype; known: {', '.join(DTYPES)}")
    if name == "bfloat16":  # numpy has no bfloat16: take the raw 2-byte words
        return Tensor("bfloat16", tuple(t.shape), t.view(torch.int16).numpy().tobytes())
    return Tensor.from_numpy(t.numpy())


def to_wire(value: Any) -> Any:
    """A feature value ready for `trimmer.codec`: torch tensors become Tensors; numpy, scalars, strings, lists pass."""
    t = _torch_tensor(value)
    if t is not None:
        return t
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def encode_features(features: Mapping[str, Any], media: str = MSGPACK, **extra: Any) -> bytes:
    """A native request body `{**extra, "features": {...}}` in msgpack or JSON (docs/protocol.md)."""
    if not isinstance(features, Mapping):
        raise TrimmerError(f"features must be a mapping of feature name to value, got {type(features).__name__}")
    doc = {k: v for k, v in extra.items() if v is not None}
    doc["features"] = {str(k): to_wire(v) for k, v in features.items()}
    try:
        return codec.encode(doc, media)
    except TypeError as exc:
        raise TrimmerError(f"cannot encode features: {exc}") from None


def _as_numpy(value: Any) -> Any:
    import numpy as np

    t = _torch_tensor(value)
    if t is not None:
        if t.dtype == "bfloat16":
            raise TrimmerError("bfloat16 has no Open Inference Protocol datatype; use the native /score route")
        return t.to_numpy()
    if isinstance(value, Tensor):
        return value.to_numpy()
    return np.asarray(value)


def oip_input(name: str, value: Any) -> dict[str, Any]:
    """One OIP v2 input `{name, datatype, shape, data}`: numpy/torch/scalars/lists; strings go as BYTES."""
    arr = _as_numpy(value)
    if arr.dtype.kind in ("U", "S", "O"):
        return {"name": name, "datatype": "BYTES", "shape": list(arr.shape),
                "data": [v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel().tolist()]}
    oip = WIRE_TO_OIP.get(arr.dtype.name)
    if oip is None:
        raise TrimmerError(f"input {name!r}: numpy dtype {arr.dtype} has no Open Inference Protocol datatype")
    return {"name": name, "datatype": oip, "shape": list(arr.shape), "data": arr.ravel().tolist()}


def encode_infer(inputs: Mapping[str, Any], outputs: Sequence[str] | None = None, id: str | None = None,
                 parameters: Mapping[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {}
    if id is not None:
        doc["id"] = id
    if parameters:
        doc["parameters"] = dict(parameters)
    doc["inputs"] = [oip_input(str(n), v) for n, v in inputs.items()]
    if outputs:
        doc["outputs"] = [{"name": n} for n in outputs]
    return json.dumps(doc, separators=(",", ":")).encode()


# ---------------------------------------------------------------------- decoding
def _output(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value if value.dtype == "bfloat16" else value.to_numpy()
    return value


def decode_score(body: bytes, content_type: str | None) -> ScoreResult:
    try:
        doc = codec.decode(body, content_type)
    except TrimmerError as exc:
        raise TrimmerError(f"undecodable /score answer: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), dict):
        raise TrimmerError("a /score answer is a map with an 'outputs' map")
    return ScoreResult(str(doc.get("model", "")), str(doc.get("version", "")),
                       {str(k): _output(v) for k, v in doc["outputs"].items()}, doc.get("request_id"), doc)


def decode_infer(body: bytes) -> InferResult:
    import numpy as np

    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise TrimmerError(f"undecodable /infer answer: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise TrimmerError("an /infer answer is an object with an 'outputs' list")
    outputs: dict[str, Any] = {}
    for o in doc["outputs"]:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise TrimmerError("each /infer output is an object with a name")
        datatype = o.get("datatype")
        dtype = OIP_TO_WIRE.get(datatype) if isinstance(datatype, str) else None
        data = o.get("data", [])
        arr = np.asarray(data, dtype=object if o.get("datatype") == "BYTES" else (dtype or None))
        shape = o.get("shape")
        outputs[o["name"]] = arr.reshape(shape) if isinstance(shape, list) and arr.size == int(np.prod(shape)) else arr
    version = doc.get("model_version")
    return InferResult(str(doc.get("model_name", "")), None if version is None else str(version),
                       outputs, doc.get("id"), doc)


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and "error" in doc:
            return str(doc["error"])
    except ValueError:
        pass
    return body[:300].decode("utf-8", "replace").strip() or "(empty body)"


def _model_path(model: str, version: str | None, tail: str) -> str:
    base = f"/models/{quote(model, safe='')}"
    if version is not None:
        base += f"/versions/{quote(str(version), safe='')}"
    return base + tail


def _signature(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["name"]: {k: v for k, v in i.items() if k != "name"} for i in meta.get("inputs") or []
            if isinstance(i, dict) and "name" in i}


# ---------------------------------------------------------------------- sync
class _Pool:
    """Keep-alive `http.client` connections to one host, at most `size` at once (callers wait for a free one)."""

    def __init__(self, url: str, size: int, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TrimmerError(f"bad base URL {url!r}; expected http://host:port")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def _new(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body: bytes | None,
                headers: dict[str, str], limit: int) -> tuple[int, str, bytes]:
        if self._closed:
            raise TrimmerError("client is closed")
        if not self._slots.acquire(timeout=self.timeout):
            raise ClientError(0, f"no free connection within {self.timeout:g}s", self.prefix + path)
        try:
            for attempt in (0, 1):
                try:
                    conn, reused = self._idle.get_nowait(), True
                except queue.Empty:
                    conn, reused = self._new(), False
                try:
                    conn.request(method, self.prefix + path, body=body, headers=headers)
                    resp = conn.getresponse()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                    conn.close()
                    if reused and attempt == 0:
                        continue  # the server closed an idle keep-alive connection: once more, on a new one
                    raise ClientError(0, f"connection failed: {exc}", self.prefix + path) from None
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    raise ClientError(0, f"connection failed: {exc}", self.prefix + path) from None
                try:
                    data = resp.read(limit + 1)
                    if len(data) > limit:
                        conn.close()
                        raise ClientError(resp.status,
                                          f"answer larger than max_response_bytes ({limit})", self.prefix + path)
                    if resp.will_close:
                        conn.close()
                    else:
                        self._idle.put(conn)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    raise ClientError(0, f"reading the answer failed: {exc}", self.prefix + path) from None
                return resp.status, resp.getheader("Content-Type", ""), data
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class Client:
    """Synchronous, thread-safe client for a root or a leaf (native `/v1` and OIP `/v2` routes)."""

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 content_type: str = MSGPACK, headers: Mapping[str, str] | None = None,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        if max_connections < 1 or timeout <= 0:
            raise TrimmerError("max_connections must be >= 1 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.media = codec.media_type(content_type)
        self.headers = dict(headers or {})
        self.max_response_bytes = max_response_bytes
        self._pool = _Pool(self.base_url, max_connections, timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    def _call(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
              headers: Mapping[str, str] | None = None) -> tuple[str, bytes]:
        h = {**self.headers, **(headers or {}), "Accept": ctype or JSON}
        if ctype is not None:
            h["Content-Type"] = ctype
        status, rtype, data = self._pool.request(method, path, body, h, self.max_response_bytes)
        if not 200 <= status < 300:
            raise ClientError(status, _error_message(data), self.base_url + path)
        return rtype, data

    def score(self, model: str, features: Mapping[str, Any], *, version: str | None = None, request_id: Any = None,
              headers: Mapping[str, str] | None = None, **extra: Any) -> ScoreResult:
        """POST /v1/models/{model}[/versions/{v}]/score; extra keys (e.g. context) travel beside `features`."""
        body = encode_features(features, self.media, request_id=request_id, **extra)
        rtype, data = self._call("POST", "/v1" + _model_path(model, version, "/score"), body, self.media, headers)
        return decode_score(data, rtype)

    def infer(self, model: str, inputs: Mapping[str, Any], *, version: str | None = None,
              outputs: Sequence[str] | None = None, id: str | None = None, parameters: Mapping[str, Any] | None = None,
              headers: Mapping[str, str] | None = None) -> InferResult:
        """POST /v2/models/{model}[/versions/{v}]/infer (Open Inference Protocol v2, JSON)."""
        body = encode_infer(inputs, outputs, id, parameters)
        _, data = self._call("POST", "/v2" + _model_path(model, version, "/infer"), body, JSON, headers)
        return decode_infer(data)

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """GET /v2/models/{model}[/versions/{v}]: name, versions, inputs (name, datatype, shape), outputs."""
        _, data = self._call("GET", "/v2" + _model_path(model, version, ""))
        return json.loads(data)

    def signature(self, model: str, version: str | None = None) -> dict[str, dict[str, Any]]:
        """The inputs the model reads, by name: {datatype, shape[, default]} (from metadata)."""
        return _signature(self.metadata(model, version))

    def ready(self) -> bool:
        """GET /v2/health/ready: True on 200."""
        try:
            self._call("GET", "/v2/health/ready")
            return True
        except ClientError:
            return False


# ---------------------------------------------------------------------- async
class AsyncClient:
    """asyncio client (aiohttp, one pooled session) with the same methods as `Client`, awaited."""

    def __init__(self, base_url: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 content_type: str = MSGPACK, headers: Mapping[str, str] | None = None,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        if max_connections < 1 or timeout <= 0:
            raise TrimmerError("max_connections must be >= 1 and timeout > 0")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TrimmerError(f"bad base URL {base_url!r}; expected http://host:port")
        self.base_url = base_url.rstrip("/")
        self.media = codec.media_type(content_type)
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self._session: Any = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> Any:
        if self._session is None:  # created inside the running loop, on first use
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=False)
        return self._session

    async def _call(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
                    headers: Mapping[str, str] | None = None) -> tuple[str, bytes]:
        import asyncio

        import aiohttp

        h = {**self.headers, **(headers or {}), "Accept": ctype or JSON}
        if ctype is not None:
            h["Content-Type"] = ctype
        url = self.base_url + path
        try:
            async with self._get_session().request(method, url, data=body, headers=h) as resp:
                data = await resp.content.read(self.max_response_bytes + 1)
                if len(data) > self.max_response_bytes:
                    raise ClientError(resp.status,
                                      f"answer larger than max_response_bytes ({self.max_response_bytes})", url)
                if not 200 <= resp.status < 300:
                    raise ClientError(resp.status, _error_message(data), url)
                return resp.headers.get("Content-Type", ""), data
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ClientError(0, f"request failed: {type(exc).__name__} {exc}".strip(), url) from None

    async def score(self, model: str, features: Mapping[str, Any], *, version: str | None = None,
                    request_id: Any = None, headers: Mapping[str, str] | None = None, **extra: Any) -> ScoreResult:
        body = encode_features(features, self.media, request_id=request_id, **extra)
        rtype, data = await self._call("POST", "/v1" + _model_path(model, version, "/score"), body, self.media, headers)
        return decode_score(data, rtype)

    async def infer(self, model: str, inputs: Mapping[str, Any], *, version: str | None = None,
                    outputs: Sequence[str] | None = None,
                    id: str | None = None, parameters: Mapping[str, Any] | None = None,
                    headers: Mapping[str, str] | None = None) -> InferResult:
        body = encode_infer(inputs, outputs, id, parameters)
        _, data = await self._call("POST", "/v2" + _model_path(model, version, "/infer"), body, JSON, headers)
        return decode_infer(data)

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        _, data = await self._call("GET", "/v2" + _model_path(model, version, ""))
        return json.loads(data)

    async def signature(self, model: str, version: str | None = None) -> dict[str, dict[str, Any]]:
        return _signature(await self.metadata(model, version))

    async def ready(self) -> bool:
        try:
            await self._call("GET", "/v2/health/ready")
            return True
        except ClientError:
            return False


__all__ = ["Client", "AsyncClient", "ClientError", "ScoreResult", "InferResult", "encode_features", "encode_infer",
           "oip_input", "decode_score", "decode_infer", "to_wire", "OIP_TO_WIRE", "WIRE_TO_OIP"]
