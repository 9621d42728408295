"""The bad-input matrix: every hostile or broken input gets a clear 4xx (or a one-line CLI error).

One table, CASES, names each case, its target (root | leaf | cli), the request
and the expected status (or exit code) and message fragment. HTTP cases run
against ONE real leaf (demo models) and ONE real root in front of it, started
once for the module; CLI cases run `python -m trimmer ...` in a subprocess.
After the matrix both processes must still be alive and serve a good request
bit-identically. The summary lives in docs/hardening.md.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgspec
import pytest

from loadtest.payload import make_request, universe_for_models
from loadtest.procs import free_port, start, trimmer_cmd
from trimmer.codec import encode_msgpack
from trimmer.repository import scan_repository

MP, JS = "application/msgpack", "application/json"
ROOT_MAX_BODY = 256 * 1024
LEAF_MAX_BODY = 512 * 1024
INFO = {"input_names": ["x", "y"], "output_names": ["score"]}


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badinputs")
    repo = tmp / "models"
    subprocess.run(trimmer_cmd("leaf", "build-demo", "--out", str(repo), "--items", "1000"), check=True,
                   capture_output=True, timeout=240)
    sig = scan_repository(repo).versions[("ranker", "1")].signature
    good = make_request(universe_for_models([sig], usage_ratio=0.5, seed=1), candidates=4, seed=1)
    leaf_cfg = tmp / "leaf.yaml"
    leaf_cfg.write_text(json.dumps({"repo": str(repo), "max_body_bytes": LEAF_MAX_BODY, "torch_threads": 1,
                                    "batching": {"max_batch_size": 1}}))
    lport = free_port()
    leaf = start("leaf", ["leaf", "--config", str(leaf_cfg), "--port", str(lport)], lport,
                 "/v2/health/ready", tmp, timeout=180)
    root = None
    try:
        root_cfg = tmp / "root.yaml"
        root_cfg.write_text(json.dumps({
            "repositories": [str(repo)], "watch": False,
            "admin": {"on_service_port": True}, "partitions": {"leaves": {"replicas": [leaf.url]}},
            "models": {"ranker": {"partition": "leaves", "default_version": "1"}, "retrieval": "leaves"},
            "timeouts": {"request_s": 20}, "limits": {"max_body_bytes": ROOT_MAX_BODY}}))
        rport = free_port()
        root = start("root", ["root", "--config", str(root_cfg), "--port", str(rport)], rport,
                     "/readyz", tmp, timeout=60)
        files = make_files(tmp, repo)
        yield {"leaf": leaf, "root": root, "good": good, "tmp": tmp, "files": files, "repo": repo}
    finally:
        if root is not None:
            root.stop()
        leaf.stop()


# ---------------------------------------------------------------------- bodies
def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _bomb() -> bytes:
    """A deflated module_info.json that inflates to 64 MiB of spaces (a few dozen KiB on disk)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/extra/module_info.json", b"{" + b" " * (64 << 20) + b"}")
    return buf.getvalue()


def make_files(tmp: Path, repo: Path) -> dict[str, Path]:
    good = _zip({"m/extra/module_info.json": json.dumps(INFO).encode(), "m/data.pkl": b"\x80\x04."})
    docs: dict[str, bytes] = {
        "not_zip.pt": b"definitely not a zip archive",
        "truncated.pt": good[: len(good) // 2],
        "bomb.pt": _bomb(),
        "traversal.pt": _zip({"../extra/module_info.json": json.dumps(INFO).encode()}),
        "abs_traversal.pt": _zip({"/extra/module_info.json": json.dumps(INFO).encode()}),
        "bad_json.pt": _zip({"m/extra/module_info.json": b"{not json"}),
        "bad_bundle.json": b'{"kind": "something else"}',
        "bad_yaml.yaml": b"partitions: [unclosed\n  - : :\n",
        "unknown_key.yaml": b"listen: {host: 127.0.0.1}\nfrobnicate: 3\n",
        "leaf_unknown_key.yaml": b"frobnicate: 3\n",
        "bad_overrides.yaml": b"models: [\n",
    }
    out = {name: tmp / "files" / name for name in docs}
    for name, data in docs.items():
        out[name].parent.mkdir(parents=True, exist_ok=True)
        out[name].write_bytes(data)
    # a repository whose only archive is truncated, and one with a bomb
    for rname, data in (("repo_truncated", docs["truncated.pt"]), ("repo_bomb", docs["bomb.pt"])):
        p = tmp / rname / "m" / "1" / "model.pt"
        p.parent.mkdir(parents=True)
        p.write_bytes(data)
        out[rname] = tmp / rname
    out["overrides_cfg.yaml"] = tmp / "files" / "overrides_cfg.yaml"
    out["overrides_cfg.yaml"].write_text(json.dumps({"repositories": [str(repo)],
                                                     "overrides": str(out["bad_overrides.yaml"]),
                                                    "admin": {"on_service_port": True},
                                                    "partitions": {"p": {"replicas": ["http://127.0.0.1:9"]}},
                                                    "models": {"ranker": "p"}}))
    return out


def tensor_ext(code: int, dims: list[int], data: bytes) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(1, bytes([code, len(dims)]) + b"".join(struct.pack("<I", d) for d in dims) + data)


def with_feature(name: str, value: Any) -> Callable[[dict], bytes]:
    def build(e: dict) -> bytes:
        feats = dict(e["good"]["features"])
        feats[name] = value
        return msgspec.msgpack.encode({**_to_plain(e["good"]), "features": {k: _plain(v) for k, v in feats.items()}})
    return build


def _plain(v: Any) -> Any:
    """Tensors as raw ext so msgspec.msgpack can mix them with hand-made Ext values."""
    if hasattr(v, "ext_payload"):
        return msgspec.msgpack.Ext(1, bytes(v.ext_payload()))
    return v


def _to_plain(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "features"}


def good_mp(e: dict, **extra: Any) -> bytes:
    return encode_msgpack({**e["good"], **extra})


def good_js(e: dict, **extra: Any) -> bytes:
    from trimmer.codec import encode_json

    return encode_json({**e["good"], **extra})


DEEP_MP = b"\x82\xa6models\x91\x81\xa4name\xa6ranker\xa8features\x81\xaauser_dense" + b"\x91" * 100_000 + b"\x01"
DEEP_JS = b'{"features": {"user_dense": ' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}}"
HUGE_MAP = b"\xdf\xff\xff\xff\xff\xa1a"  # map32 declaring 4 billion entries, 2 bytes of them
HUGE_BIN = b"\x81\xa8features\x81\xa1a\xc6\xff\xff\xff\xf0" + b"x" * 16  # bin32 declaring ~4 GiB
HUGE_ARR = b"\x82\xa6models\x91\x81\xa4name\xa6ranker\xa8features\x81\xa1a\xdd\xff\xff\xff\xff\x01"


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    name: str
    target: str  # root | leaf | cli
    status: int  # HTTP status; for cli the exit code
    fragment: str  # must appear (case-insensitive) in the error message / stderr line
    path: str = ""
    body: bytes | Callable[[dict], bytes] = b""
    ctype: str | None = MP
    headers: dict[str, str] = field(default_factory=dict)
    argv: Callable[[dict], list[str]] | None = None
    raw_http: bool = False  # raw socket: declares more bytes than it sends, then half-closes


R_FAN = "/v1/score"
R_ONE = "/v1/models/ranker/score"
L_ONE = "/v1/models/ranker/versions/1/score"
F = lambda name: (lambda e: str(e["files"][name]))  # noqa: E731

CASES: list[Case] = [
    # --- root: body encoding and shape
    Case("root malformed msgpack", "root", 400, "malformed msgpack", R_FAN, b"\xc1\xc1\xc1"),
    Case("root malformed json", "root", 400, "malformed json", R_FAN, b'{"models": [', JS),
    Case("root truncated msgpack", "root", 400, "truncated", R_FAN,
         lambda e: good_mp(e, models=[{"name": "ranker"}])[:-7]),
    Case("root truncated json", "root", 400, "malformed json", R_FAN,
         lambda e: good_js(e, models=[{"name": "ranker"}])[:-3], JS),
    Case("root wrong content type", "root", 400, "unsupported content type", R_FAN, lambda e: good_mp(e), "text/plain"),
    Case("root missing content type", "root", 400, "unsupported content type", R_FAN, lambda e: good_mp(e), None),
    Case("root non-map top level", "root", 400, "map", R_FAN, msgspec.msgpack.encode([1, 2, 3])),
    Case("root non-string top-level keys", "root", 400, "string keys", R_FAN,
         msgspec.msgpack.encode({1: "x", "models": []})),
    Case("root features wrong type", "root", 400, "features", R_ONE, msgspec.msgpack.encode({"features": [1, 2, 3]})),
    Case("root features non-string keys", "root", 400, "strings", R_ONE, msgspec.msgpack.encode({"features": {1: 2}})),
    Case("root deep nesting msgpack", "root", 400, "nested too deeply", R_FAN, DEEP_MP),
    Case("root deep nesting json", "root", 400, "malformed json", R_ONE, DEEP_JS, JS),
    Case("root huge declared map", "root", 400, "truncated", R_FAN, HUGE_MAP),
    Case("root huge declared array", "root", 400, "truncated", R_FAN, HUGE_ARR),
    Case("root huge declared bin", "root", 400, "truncated", R_ONE, HUGE_BIN),
    Case("root oversized body", "root", 413, "too large", R_ONE, b"\x80" + b"\x00" * (ROOT_MAX_BODY + 1)),
    Case("root gzip bomb", "root", 413, "too large", R_ONE,
         lambda e: __import__("gzip").compress(b"\x00" * (8 * ROOT_MAX_BODY)), headers={"Content-Encoding": "gzip"}),
    Case("root corrupt gzip", "root", 400, "cannot decompress gzip", R_ONE, b"\x1f\x8b\x08\x00garbage",
         headers={"Content-Encoding": "gzip"}),
    Case("root corrupt br", "root", 400, "br", R_ONE, b"\xff" * 32, headers={"Content-Encoding": "br"}),
    Case("root truncated zstd", "root", 400, "truncated", R_ONE,
         lambda e: __import__("zstandard").ZstdCompressor().compress(good_mp(e))[:-4],
         headers={"Content-Encoding": "zstd"}),
    Case("root unknown content-encoding", "root", 415, "content-encoding", R_ONE, lambda e: good_mp(e),
         headers={"Content-Encoding": "compress"}),
    Case("root lying content-length", "root", 400, "truncated", R_ONE, lambda e: good_mp(e), raw_http=True),
    Case("root lying content-length (fan-out)", "root", 400, "truncated", R_FAN,
         lambda e: good_mp(e, models=[{"name": "ranker"}]), raw_http=True),
    Case("root bad deadline header", "root", 400, "x-deadline-ms", R_ONE, lambda e: good_mp(e),
         headers={"X-Deadline-Ms": "-5"}),
    # --- root: targets
    Case("root unknown model (shortcut)", "root", 404, "unknown model", "/v1/models/nope/score", lambda e: good_mp(e)),
    Case("root unknown model (fan-out)", "root", 404, "unknown model", R_FAN,
         lambda e: good_mp(e, models=[{"name": "nope"}])),
    Case("root unknown version", "root", 404, "unknown version",
         "/v1/models/ranker/versions/77/score", lambda e: good_mp(e)),
    Case("root no models key", "root", 400, "no \"models\"", R_FAN, lambda e: good_mp(e)),
    Case("root empty model list", "root", 400, "empty", R_FAN, lambda e: good_mp(e, models=[])),
    Case("root models wrong type", "root", 400, "models", R_FAN, lambda e: good_mp(e, models="ranker")),
    Case("root model entry unknown key", "root", 400, "models", R_FAN,
         lambda e: good_mp(e, models=[{"name": "ranker", "x": 1}])),
    Case("root empty model name", "root", 400, "non-empty", R_FAN, lambda e: good_mp(e, models=[{"name": ""}])),
    Case("root duplicate targets", "root", 400, "listed twice", R_FAN,
         lambda e: good_mp(e, models=[{"name": "ranker", "version": "1"}, {"name": "ranker", "version": 1}])),
    Case("root typed tensor wrong byte length (leaf's 400 relayed)", "root", 400, "needs 16 bytes", R_ONE,
         with_feature("cand_ctr", tensor_ext(8, [4], b"\x00" * 12))),
    Case("root oip body not json", "root", 415, "json", "/v2/models/ranker/infer", b"\x80", MP),
    Case("root oip malformed json", "root", 400, "json", "/v2/models/ranker/infer", b'{"inputs": [', JS),
    # --- leaf
    Case("leaf malformed msgpack", "leaf", 400, "malformed msgpack", L_ONE, b"\xc1"),
    Case("leaf malformed json", "leaf", 400, "malformed json", L_ONE, b"{nope", JS),
    Case("leaf truncated msgpack", "leaf", 400, "truncated", L_ONE, lambda e: good_mp(e)[:-5]),
    Case("leaf wrong content type", "leaf", 415, "unsupported content type", L_ONE, lambda e: good_mp(e), "text/csv"),
    Case("leaf non-map top level", "leaf", 400, "map at the top level", L_ONE, msgspec.msgpack.encode("hello")),
    Case("leaf features wrong type", "leaf", 400, "features", L_ONE, msgspec.msgpack.encode({"features": "abc"})),
    Case("leaf features non-string keys", "leaf", 400, "non-empty strings", L_ONE,
         msgspec.msgpack.encode({"features": {7: 1}})),
    Case("leaf deep nesting", "leaf", 400, "nested too deeply", L_ONE, DEEP_MP),
    Case("leaf lying content-length", "leaf", 400, "truncated", L_ONE, lambda e: good_mp(e), raw_http=True),
    Case("leaf huge declared bin", "leaf", 400, "truncated", L_ONE, HUGE_BIN),
    Case("leaf tensor byte length disagrees", "leaf", 400, "needs 16 bytes, got 12", L_ONE,
         with_feature("cand_ctr", tensor_ext(8, [4], b"\x00" * 12))),
    Case("leaf tensor unknown dtype code", "leaf", 400, "unknown tensor dtype code 42", L_ONE,
         with_feature("cand_ctr", tensor_ext(42, [4], b"\x00" * 16))),
    Case("leaf tensor too many dims", "leaf", 400, "at most", L_ONE,
         with_feature("cand_ctr", tensor_ext(8, [1] * 9, b"\x00" * 4))),
    Case("leaf tensor huge declared dims", "leaf", 400, "needs", L_ONE,
         with_feature("cand_ctr", tensor_ext(8, [0xFFFFFFFF, 0xFFFFFFFF], b"\x00" * 16))),
    Case("leaf unknown ext type", "leaf", 400, "ext type 9", L_ONE,
         with_feature("cand_ctr", msgspec.msgpack.Ext(9, b"x"))),
    Case("leaf json tensor unknown dtype", "leaf", 400, "dtype", L_ONE,
         json.dumps({"features": {"cand_ctr": {"$tensor": {"dtype": "float128", "shape": [1],
                                                           "data": "AAAAAAAAAAAAAAAAAAAAAA=="}}}}).encode(), JS),
    Case("leaf tensor wrong shape for model", "leaf", 400, "cand_emb", L_ONE,
         with_feature("cand_emb", tensor_ext(8, [4, 3], b"\x00" * 48))),
    Case("leaf missing required feature", "leaf", 400, "missing required", L_ONE,
         msgspec.msgpack.encode({"features": {"x": 1}})),
    Case("leaf oversized body", "leaf", 413, "too large", L_ONE, b"\x80" + b"\x00" * (LEAF_MAX_BODY + 1)),
    Case("leaf zstd bomb", "leaf", 413, "decompressed body exceeds", L_ONE,
         lambda e: __import__("zstandard").ZstdCompressor().compress(b"\x00" * (8 * LEAF_MAX_BODY)),
         headers={"Content-Encoding": "zstd"}),
    Case("leaf corrupt lz4", "leaf", 400, "lz4", L_ONE, b"\x04\x22\x4d\x18garbage",
         headers={"Content-Encoding": "lz4"}),
    Case("leaf unknown content-encoding", "leaf", 415, "content-encoding", L_ONE, lambda e: good_mp(e),
         headers={"Content-Encoding": "compress"}),
    Case("leaf unknown model", "leaf", 404, "unknown model", "/v1/models/nope/score", lambda e: good_mp(e)),
    Case("leaf unknown version", "leaf", 404, "unknown version",
         "/v1/models/ranker/versions/9/score", lambda e: good_mp(e)),
    Case("leaf oip bad datatype", "leaf", 400, "unsupported datatype", "/v2/models/ranker/versions/1/infer",
         json.dumps({"inputs": [{"name": "cand_ctr", "shape": [1], "datatype": "FP128", "data": [1]}]}).encode(), JS),
    # --- CLI: archives, bundles, configs
    Case("cli inspect not a zip", "cli", 2, "not a valid zip", argv=lambda e: ["inspect", F("not_zip.pt")(e)]),
    Case("cli inspect truncated archive", "cli", 2, "not a valid zip",
         argv=lambda e: ["inspect", F("truncated.pt")(e)]),
    Case("cli inspect zip bomb", "cli", 2, "limit", argv=lambda e: ["inspect", F("bomb.pt")(e)]),
    Case("cli inspect path traversal", "cli", 2, "no <prefix>/extra", argv=lambda e: ["inspect", F("traversal.pt")(e)]),
    Case("cli inspect absolute path entry", "cli", 2, "no <prefix>/extra",
         argv=lambda e: ["inspect", F("abs_traversal.pt")(e)]),
    Case("cli inspect signature not json", "cli", 2, "not valid json", argv=lambda e: ["inspect", F("bad_json.pt")(e)]),
    Case("cli inspect missing file", "cli", 2, "no such", argv=lambda e: ["inspect", str(e["tmp"] / "absent.pt")]),
    Case("cli inspect bad bundle", "cli", 2, "bundle", argv=lambda e: ["inspect", F("bad_bundle.json")(e)]),
    Case("cli bundle build truncated archive", "cli", 2, "m/1",
         argv=lambda e: ["bundle", "build", F("repo_truncated")(e), "-o", str(e["tmp"] / "o1.json")]),
    Case("cli bundle build zip bomb", "cli", 2, "limit",
         argv=lambda e: ["bundle", "build", F("repo_bomb")(e), "-o", str(e["tmp"] / "o2.json")]),
    Case("cli bundle build missing repo", "cli", 2, "absent",
         argv=lambda e: ["bundle", "build", str(e["tmp"] / "absent"), "-o", str(e["tmp"] / "o3.json")]),
    Case("cli root invalid yaml", "cli", 2, "yaml", argv=lambda e: ["root", "--config", F("bad_yaml.yaml")(e)]),
    Case("cli root unknown config key", "cli", 2, "frobnicate",
         argv=lambda e: ["root", "--config", F("unknown_key.yaml")(e)]),
    Case("cli root bad overrides yaml", "cli", 2, "bad_overrides.yaml",
         argv=lambda e: ["root", "--config", F("overrides_cfg.yaml")(e)]),
    Case("cli root missing config", "cli", 2, "absent.yaml",
         argv=lambda e: ["root", "--config", str(e["tmp"] / "absent.yaml")]),
    Case("cli leaf invalid yaml", "cli", 2, "yaml", argv=lambda e: ["leaf", "--config", F("bad_yaml.yaml")(e)]),
    Case("cli leaf unknown config key", "cli", 2, "frobnicate",
         argv=lambda e: ["leaf", "--config", F("leaf_unknown_key.yaml")(e)]),
]


# ---------------------------------------------------------------------- running one case
def _raw_post(url: str, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
    """Declare Content-Length len(body)+1000, send body, half-close: the server sees a truncated body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: "
                f"{len(body) + 1000}\r\nConnection: close\r\n\r\n").encode()
        s.sendall(head + body)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data:
        return 0, b""  # closed without an answer: acceptable only as "no crash"; the test treats it as a failure
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def _http(case: Case, e: dict) -> tuple[int, bytes, str]:
    import urllib.error
    import urllib.request

    base = e[case.target].url
    body = case.body(e) if callable(case.body) else case.body
    if case.raw_http:
        status, payload = _raw_post(base, case.path, body, case.ctype or MP)
        return status, payload, "application/json"
    req = urllib.request.Request(base + case.path, data=body, method="POST", headers=dict(case.headers))
    if case.ctype is not None:
        req.add_header("Content-Type", case.ctype)
    else:
        req.add_header("Content-Type", "")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def _error_text(payload: bytes, ctype: str) -> str:
    """The error message(s): {"error": ...} or, for a fan-out, every target's {"errors": {k: {"error": ...}}}."""
    doc = msgspec.msgpack.decode(payload) if "msgpack" in ctype else json.loads(payload)
    assert isinstance(doc, dict), doc
    if "error" in doc:
        assert isinstance(doc["error"], str) and "\n" not in doc["error"], doc
        return doc["error"]
    assert doc.get("results") == {} and doc.get("errors"), doc
    msgs = [v["error"] for v in doc["errors"].values()]
    assert all(isinstance(m, str) and "\n" not in m for m in msgs)
    return " | ".join(msgs)


def _client_errors(e: dict, target: str) -> float:
    """Requests the process refused as the client's error: the root's 400s, the leaf's bad_request failures."""
    from promtext import scrape

    name, labels = (("trimmer_root_client_requests_total", {"status": "400"}) if target == "root"
                    else ("trimmer_leaf_failures_total", {"reason": "bad_request"}))
    return scrape(e[target].url, name, **labels)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(env, case: Case):
    if case.target == "cli":
        out = subprocess.run(trimmer_cmd(*case.argv(env)), capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == case.status, (out.returncode, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-2000:]
        assert case.fragment.lower() in lines[0].lower(), lines[0]
        return
    before = _client_errors(env, case.target) if case.raw_http else 0.0
    status, payload, ctype = _http(case, env)
    if case.raw_http and status == 0:
        # The peer half-closed mid-body, so the server may drop the connection instead of answering. It must
        # still have refused the request as the client's error (counted once), not crashed or passed it on.
        import time

        deadline = time.monotonic() + 10
        while _client_errors(env, case.target) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _client_errors(env, case.target) == before + 1
        return
    assert status == case.status, (status, payload[:500])
    text = _error_text(payload, ctype)
    assert case.fragment.lower() in text.lower(), text
    assert "Traceback" not in text and "internal error" not in text


# ---------------------------------------------------------------------- HTTP fuzz against the real processes
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_OK = {200, 400, 404, 413, 415}
FUZZ_TARGETS = [("root", R_ONE), ("root", R_FAN), ("leaf", L_ONE)]


def _mutate(body: bytes, kind: int, pos: int, val: int, n: int) -> bytes:
    """Byte flips, truncation, random insertion: near-valid bodies reach deeper code than random bytes."""
    b = bytearray(body)
    if kind == 0:
        for i in range(n):
            b[(pos + i * 7919) % len(b)] = (val + i) % 256
    elif kind == 1:
        del b[pos % len(b):]
    else:
        b[pos % len(b):pos % len(b)] = bytes([val]) * n
    return bytes(b)


@pytest.mark.parametrize("target,path", FUZZ_TARGETS, ids=[f"{t}{p}" for t, p in FUZZ_TARGETS])
def test_http_fuzz_never_5xx(env, target: str, path: str):
    """Bounded (40 examples each, derandomized): mutated good bodies and random bytes, msgpack and JSON."""
    import urllib.error
    import urllib.request

    base = good_mp(env, models=[{"name": "ranker"}]) if path == R_FAN else good_mp(env)
    base_js = good_js(env, models=[{"name": "ranker"}]) if path == R_FAN else good_js(env)

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(kind=st.integers(0, 3), pos=st.integers(0, 1 << 20), val=st.integers(0, 255), n=st.integers(1, 16),
           js=st.booleans(), noise=st.binary(max_size=256))
    def one(kind: int, pos: int, val: int, n: int, js: bool, noise: bytes) -> None:
        body = noise if kind == 3 else _mutate(base_js if js else base, kind, pos, val, n)
        req = urllib.request.Request(env[target].url + path, data=body, method="POST",
                                     headers={"Content-Type": JS if js else MP})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, payload, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        assert status in FUZZ_OK, (status, body[:80], payload[:300])
        if status >= 400:
            _error_text(payload, ctype)  # JSON/msgpack {"error": one line} (or a fan-out envelope of them)

    one()


def test_processes_survive_and_serve_after_the_matrix(env):
    """Runs last in the module: nothing above crashed or wedged either process; a good request is bit-identical."""
    import urllib.request

    for name in ("leaf", "root"):
        assert env[name].proc.poll() is None, env[name].log_tail()
    body = good_mp(env)
    out = {}
    for name in ("leaf", "root"):
        req = urllib.request.Request(env[name].url + L_ONE, data=body, method="POST", headers={"Content-Type": MP})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
            out[name] = resp.read()
    assert out["leaf"] == out["root"]
    assert "outputs" in msgspec.msgpack.decode(out["root"])
    for name in ("leaf", "root"):
        assert "Traceback" not in env[name].log_path.read_text(errors="replace"), env[name].log_tail()
    with urllib.request.urlopen(env["root"].url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counted = [ln for ln in text.splitlines() if ln.startswith("trimmer_root_client_requests_total{")]
    assert any('status="400"' in ln for ln in counted)  # the check can fail: the matrix was counted
    assert not [ln for ln in counted if 'status="5' in ln], counted
