"""The trim: exact kept subset, byte-identical values and non-feature keys, both implementations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgpack
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.payload import reference_payload
from trimmer import trim as trim_mod
from trimmer.codec import decode_request, encode_json, encode_msgpack
from trimmer.errors import PayloadError
from trimmer.tensor import TENSOR_EXT_CODE, Tensor

def _in_chunks(body: bytes, size: int = 5) -> list[bytes]:
    """Small chunks so that headers, keys and values straddle chunk boundaries."""
    return [body[i:i + size] for i in range(0, len(body), size)] or [b""]


# Both engines (the C extension and its Python twin) where the C one is built and not switched off, whole and
# chunked: every property below holds for each, and they give the same bytes and the same errors.
NO_EXTENSIONS = os.environ.get("TRIMMER_NO_EXTENSIONS", "").strip() not in ("", "0")
CHUNKED = {"c": trim_mod.trim_msgpack_chunks_c, "python": trim_mod.trim_msgpack_chunks_py}
IMPLS = {}
for _engine in sorted(trim_mod.ENGINES):
    IMPLS[_engine] = trim_mod.trim_msgpack_c if _engine == "c" else trim_mod.trim_msgpack_py
    IMPLS[f"{_engine}_chunks"] = lambda body, allow, _f=CHUNKED[_engine]: _f(_in_chunks(body), allow)
ENGINES = sorted(trim_mod.ENGINES)


def test_engine_follows_the_switch() -> None:
    if NO_EXTENSIONS:  # the no-extension test run: everything goes through the Python twin
        assert not trim_mod.ACCELERATED and trim_mod.IMPLEMENTATION == "python"
        assert trim_mod.trim_msgpack is trim_mod.trim_msgpack_py \
            and trim_mod.trim_msgpack_chunks is trim_mod.trim_msgpack_chunks_py
    else:
        # `make test` installs with a compiler present; a silent fallback would hide a 10x regression.
        assert trim_mod.ACCELERATED and trim_mod.IMPLEMENTATION == "c" \
            and trim_mod.trim_msgpack is trim_mod.trim_msgpack_c


def _probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRIMMER_NO_EXTENSIONS"}
    if env_value is not None:
        env["TRIMMER_NO_EXTENSIONS"] = env_value
    r = subprocess.run([sys.executable, "-c", "from trimmer import codec, trim; "
                        "print(trim.IMPLEMENTATION, trim.ACCELERATED, codec.ext_hook is codec._ext_hook)"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip() + " | " + r.stderr


def test_one_switch_turns_both_extensions_off_in_a_new_process() -> None:
    out = _probe("1")
    assert out.startswith("python False True | ") and "TRIMMER_NO_EXTENSIONS=1: C extensions off" in out
    assert out.count("\n") <= 1  # one log line, not one per extension
    for value in (None, "0", ""):
        assert _probe(value).startswith("c True False | ")


def test_an_extension_that_fails_to_import_falls_back_with_one_line_each() -> None:
    """As on a machine where the build failed: the Python twins serve, the same bytes, and the log says why."""
    code = ("import sys; sys.modules['trimmer._fasttrim'] = sys.modules['trimmer._tensorext'] = None  # import fails\n"
            "import msgpack; from trimmer import codec, trim\n"
            "body = msgpack.packb({'features': {'a': 1, 'b': 2}, 'z': 0})\n"
            "print(trim.IMPLEMENTATION, codec.ext_hook is codec._ext_hook, "
            "trim.trim_msgpack(body, frozenset({'a'})).body == msgpack.packb({'features': {'a': 1}, 'z': 0}))")
    env = {k: v for k, v in os.environ.items() if k != "TRIMMER_NO_EXTENSIONS"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["python", "True", "True"], r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all("unavailable" in line and "pure-Python twin" in line for line in lines), r.stderr


def test_switch_reaches_a_spawned_root(tmp_path) -> None:
    """A real root started as the service tests start theirs (loadtest.procs.start, which passes the test's
    environment on) trims with the engine the switch selects: it says so once in its log."""
    from loadtest.procs import free_port, start

    cfg = tmp_path / "root.yaml"
    cfg.write_text(
        json.dumps({"partitions": {"p": {"replicas": [f"http://127.0.0.1:{free_port()}"]}}, "models": {"m": "p"}}))
    for value, expect in (("1", True), ("0", False)):
        port = free_port()
        root = start(f"root{value}", ["root", "--config", str(cfg), "--port", str(port)], port, "/healthz", tmp_path,
                     timeout=60, env={"TRIMMER_NO_EXTENSIONS": value})
        root.stop()
        log = (tmp_path / f"root{value}.log").read_text()
        assert ("C extensions off" in log) is expect, log[-2000:]


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=20),
    st.binary(max_size=40),
)
tensors = st.builds(
    lambda dtype, n: msgpack.ExtType(TENSOR_EXT_CODE, Tensor.from_numpy(np.arange(n, dtype=dtype)).ext_payload()),
    st.sampled_from(["float32", "int64", "int8", "float64"]), st.integers(0, 300),
)
values = st.recursive(
    st.one_of(scalars, tensors),
    lambda inner: st.one_of(st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=20,
)
feature_names = st.text(min_size=1, max_size=12)
features = st.dictionaries(feature_names, values, max_size=40)
others = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "features"), values, max_size=4)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feats=features, other=others, data=st.data())
def test_trim_keeps_exactly_the_allowed_subset(impl: str, feats: dict, other: dict, data: st.DataObject) -> None:
    names = sorted(feats)
    allow = frozenset(data.draw(st.lists(st.sampled_from(names), unique=True)) if names else []) | data.draw(
        st.frozensets(feature_names, max_size=3)
    )
    request = {**other, "features": feats}
    body = msgpack.packb(request, use_bin_type=True)
    result = IMPLS[impl](body, allow)

    kept = {k: v for k, v in feats.items() if k in allow}
    # the output is exactly what encoding the kept features alone produces
    assert result.body == msgpack.packb({**other, "features": kept}, use_bin_type=True)
    decoded = msgpack.unpackb(result.body, raw=False, strict_map_key=False)
    assert set(decoded["features"]) == set(feats) & allow
    assert (result.features_in, result.features_kept) == (len(feats), len(kept))
    # non-feature keys and kept values leave byte-identical
    raw_in = msgspec.msgpack.decode(body, type=dict[str, msgspec.Raw])
    raw_out = msgspec.msgpack.decode(result.body, type=dict[str, msgspec.Raw])
    assert {k: bytes(v) for k, v in raw_out.items() if k != "features"} == {
        k: bytes(v) for k, v in raw_in.items() if k != "features"
    }
    fin = msgspec.msgpack.decode(raw_in["features"], type=dict[str, msgspec.Raw])
    fout = msgspec.msgpack.decode(raw_out["features"], type=dict[str, msgspec.Raw])
    assert {k: bytes(v) for k, v in fout.items()} == {k: bytes(fin[k]) for k in kept}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@settings(max_examples=200, deadline=None)
@given(feats=features, cut=st.integers(0, 10_000), noise=st.binary(max_size=64))
def test_truncated_or_garbled_bodies_raise_payload_error_only(impl: str, feats: dict, cut: int, noise: bytes) -> None:
    body = msgpack.packb({"features": feats, "x": 1}, use_bin_type=True)
    for candidate in (body[: cut % (len(body) + 1)], noise, body[:cut % (len(body) + 1)] + noise):
        try:
            IMPLS[impl](candidate, frozenset(feats))
        except PayloadError as exc:
            assert "\n" not in str(exc)


def _outcome(fn, *args):
    try:
        r = fn(*args)
        return (r.body, r.features_in, r.features_kept)
    except PayloadError as exc:
        return str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feats=features, other=others, data=st.data())
def test_chunked_trim_equals_one_shot_for_any_split(feats: dict, other: dict, data: st.DataObject) -> None:
    """Fed chunk by chunk (scanning as they arrive), the trim gives the same bytes or the same error, with
    either engine, and both engines give the same."""
    body = msgpack.packb({**other, "features": feats}, use_bin_type=True)
    # also broken bodies
    body = body[: data.draw(st.integers(len(body) - 8, len(body)))] + data.draw(st.binary(max_size=3))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    allow = frozenset(list(feats)[::2])
    outcomes = {_outcome(CHUNKED[e], chunks, allow) for e in ENGINES} | {
        _outcome(IMPLS[e], body, allow) for e in ENGINES}
    assert len(outcomes) == 1, outcomes


def test_c_and_python_agree_on_the_reference_payload() -> None:
    body, allow = reference_payload()
    results = {name: fn(body, allow) for name, fn in IMPLS.items()}
    bodies = {r.body for r in results.values()}
    assert len(bodies) == 1
    r = results["python"]
    assert (r.features_in, r.features_kept) == (2000, 400)
    assert 1.7e6 < len(body) < 1.9e6 and 0.3e6 < len(r.body) < 0.4e6
    # independent oracle: msgpack-python's encoding of the request with only the kept features
    doc = msgpack.unpackb(body, raw=False)
    doc["features"] = {k: v for k, v in doc["features"].items() if k in allow}
    assert r.body == msgpack.packb(doc, use_bin_type=True)


# Bodies a msgpack encoder would not write but a decoder accepts: a short key in a longer form, a map header wider
# than its count, a repeated feature or top-level key. The trim copies what it keeps as it came (a decode and
# re-encode would rewrite or merge it), whichever engine runs. Expected bytes written by hand.
NON_CANONICAL = {
    "str8 key, map16 features header": (
        b"\x82\xd9\x01x\x01\xa8features\xde\x00\x03\xd9\x01a\x01\xa1b\x02\xda\x00\x01a\x03",
        b"\x82\xd9\x01x\x01\xa8features\x82\xd9\x01a\x01\xda\x00\x01a\x03", 3, 2),
    "map32 request header, repeated top-level key": (
        b"\xdf\x00\x00\x00\x03\xa1x\x01\xa8features\x81\xa1b\x02\xa1x\x02",
        b"\x83\xa1x\x01\xa8features\x80\xa1x\x02", 1, 0),
    "repeated feature key, str16 top key": (
        b"\x82\xda\x00\x08features\x82\xa1a\x01\xa1a\x02\xa1z\xc0",
        b"\x82\xda\x00\x08features\x82\xa1a\x01\xa1a\x02\xa1z\xc0", 2, 2),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", sorted(NON_CANONICAL))
def test_kept_entries_leave_as_they_came_even_when_not_canonical(impl: str, case: str) -> None:
    body, expected, n_in, n_kept = NON_CANONICAL[case]
    assert IMPLS[impl](body, frozenset({"a"})) == trim_mod.TrimResult(expected, n_in, n_kept)


@pytest.mark.skipif(len(ENGINES) < 2, reason="C engine off or not built")
def test_engines_give_the_same_error_text() -> None:
    """The same one-line message for every malformed body below and every truncation of the odd ones."""
    bodies = [b for b, _ in BAD.values()] + list(BAD_UTF8_BODIES.values()) + [b for b, *_ in NON_CANONICAL.values()]
    bodies += [b[:cut] for b, *_ in NON_CANONICAL.values() for cut in range(len(b))]
    for body in bodies:
        assert _outcome(trim_mod.trim_msgpack_c, body, frozenset({"a"})) == _outcome(
            trim_mod.trim_msgpack_py, body, frozenset({"a"}))


def test_request_without_features_passes_unchanged() -> None:
    body = msgpack.packb({"request_id": "a", "models": []})
    for fn in IMPLS.values():
        assert fn(body, frozenset({"x"})).body == body


BAD = {
    "not a map": (msgpack.packb([1, 2, 3]), "map"),
    "features not a map": (msgpack.packb({"features": [1, 2]}), "features"),
    "non-string feature key": (msgpack.packb({"features": {1: 2}}), "string"),
    "non-string top key": (msgpack.packb({1: 2, "features": {}}), "string"),
    "trailing bytes": (msgpack.packb({"features": {}}) + b"\x00", ""),
    "truncated": (msgpack.packb({"features": {"a": "x" * 100}})[:-10], ""),
    "huge declared array": (b"\x81\xa8features\x81\xa1a\xdd\xff\xff\xff\xff", ""),
    "deep nesting": (b"\x81\xa8features\x81\xa1a" + b"\x91" * 100_000 + b"\xc0", ""),
    "reserved type byte": (b"\x81\xa8features\x81\xa1a\xc1", ""),
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_bodies(impl: str, case: str) -> None:
    body, fragment = BAD[case]
    with pytest.raises(PayloadError) as info:
        IMPLS[impl](body, frozenset({"a"}))
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_duplicate_features_key_is_rejected_not_forwarded_untrimmed(impl: str) -> None:
    body = b"\x82\xa8features\x81\xa1a\x01\xa8features\x81\xa1b\x02"
    with pytest.raises(PayloadError, match="duplicate"):
        IMPLS[impl](body, frozenset({"a"}))


# Keys that are not UTF-8 (a stray byte, an overlong NUL, a surrogate, a code point above U+10FFFF), as short
# (fixstr) and long (str8) keys, for a feature and for a top-level key: every implementation refuses them.
_BAD_UTF8 = {"stray byte": b"\xff\xfe", "overlong": b"\xc0\x80", "surrogate": b"\xed\xa0\x80",
             "above U+10FFFF": b"\xf4\x90\x80\x80", "truncated sequence": b"ab\xe2\x82"}


def _key(raw: bytes, long: bool) -> bytes:
    raw = raw + b"k" * 40 if long else raw
    return (bytes([0xD9, len(raw)]) if long else bytes([0xA0 | len(raw)])) + raw


BAD_UTF8_BODIES = {
    f"{where} key, {kind}, {'str8' if long else 'fixstr'}": (
        b"\x81\xa8features\x82\xa1a\x01" + _key(raw, long) + b"\x02" if where == "feature"
        else b"\x82" + _key(raw, long) + b"\x01\xa8features\x81\xa1a\x01")
    for where in ("feature", "top-level") for kind, raw in _BAD_UTF8.items() for long in (False, True)
}
UTF8_IMPLS = {**IMPLS, **{f"{e}_1byte_chunks": lambda body, allow,
                          _f=CHUNKED[e]: _f([body[i:i + 1] for i in range(len(body))], allow)
                           for e in ENGINES}}


@pytest.mark.parametrize("impl", sorted(UTF8_IMPLS))
@pytest.mark.parametrize("case", sorted(BAD_UTF8_BODIES))
def test_invalid_utf8_keys_are_refused_by_every_implementation(impl: str, case: str) -> None:
    body = BAD_UTF8_BODIES[case]
    for allow in (frozenset({"a"}), frozenset()):  # whether or not the bad key's neighbours are kept
        with pytest.raises(PayloadError) as info:
            UTF8_IMPLS[impl](body, allow)
        assert "UTF-8" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", sorted(_BAD_UTF8))
def test_invalid_utf8_keys_are_refused_in_json_and_oip(kind: str) -> None:
    raw = _BAD_UTF8[kind]
    with pytest.raises(PayloadError):
        trim_mod.trim(b'{"features": {"a": 1, "' + raw + b'": 2}}', frozenset({"a"}), "application/json")
    with pytest.raises(PayloadError):
        trim_mod.trim(b'{"' + raw + b'": 1, "features": {"a": 1}}', frozenset({"a"}), "application/json")
    with pytest.raises(PayloadError):
        trim_mod.trim_oip(b'{"inputs": [{"name": "' + raw + b'", "data": [1]}]}', frozenset({"a"}))


def test_fuzz_smoke_runs_in_pytest() -> None:
    """tests/fuzz/atheris_trim.py's property (one-line PayloadError or an exact trim; C, chunked C and Python
    agree) over a few thousand seeded mutations; the hours-long atheris runs stay on demand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "fuzz" / "atheris_trim.py"
    spec = importlib.util.spec_from_file_location("atheris_trim_smoke", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.smoke(4000, seed=17)
    # and the known bad inputs through the same property
    for body in (*BAD_UTF8_BODIES.values(), *(b for b, _ in BAD.values())):
        module.test_one_input(body)


def test_json_trim_matches_msgpack_semantics() -> None:
    t = Tensor.from_numpy(np.arange(4, dtype=np.float32))
    body = encode_json({"request_id": "r1", "features": {"a": 1, "b": [1, 2], "t": t}, "z": {"k": "v"}})
    result = trim_mod.trim(body, frozenset({"t", "b"}), "application/json")
    out = decode_request(result.body, "application/json")
    assert out["features"]["t"] == t and out["features"]["b"] == [1, 2] and "a" not in out["features"]
    assert out["request_id"] == "r1" and out["z"] == {"k": "v"}
    assert (result.features_in, result.features_kept) == (3, 2)


def test_oip_trim_filters_inputs_by_name_and_keeps_the_rest() -> None:
    req = {
        "id": "42",
        "inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]},
            {"name": "b", "shape": [1], "datatype": "INT64", "data": [7]},
            {"name": "c", "shape": [1], "datatype": "BYTES", "data": ["x"]},
        ],
        "outputs": [{"name": "score"}],
    }
    result = trim_mod.trim_oip(json.dumps(req).encode(), frozenset({"a", "c"}))
    out = json.loads(result.body)
    assert [i["name"] for i in out["inputs"]] == ["a", "c"]
    assert out["inputs"][0] == req["inputs"][0] and out["id"] == "42" and out["outputs"] == req["outputs"]
    assert (result.features_in, result.features_kept) == (3, 2)
    with pytest.raises(PayloadError, match="name"):
        trim_mod.trim_oip(b'{"inputs": [{"shape": [1]}]}', frozenset())
    with pytest.raises(PayloadError, match="inputs"):
        trim_mod.trim_oip(b'{"id": "1"}', frozenset())


def test_tensor_roundtrip_is_zero_copy_on_decode() -> None:
    arr = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    body = encode_msgpack({"features": {"x": arr}})
    decoded = decode_request(body, "application/msgpack")["features"]["x"]
    assert decoded.dtype == "float32" and decoded.shape == (3, 4)
    assert isinstance(decoded.data, memoryview) and decoded.data.obj is body
    np.testing.assert_array_equal(decoded.to_numpy(), arr)
    js = decode_request(encode_json({"features": {"x": arr}}), "application/json")["features"]["x"]
    np.testing.assert_array_equal(js.to_numpy(), arr)


@pytest.mark.skipif(not trim_mod.ACCELERATED, reason="C accelerator not built")
def test_values_spanning_many_chunks_are_not_rescanned_per_chunk() -> None:
    """A value that arrives over thousands of chunks (here a 4.9 MB non-feature map) is rescanned a few
    times as more of it arrives, not once per chunk (which was quadratic in the chunk count)."""
    from trimmer import _fasttrim

    body = msgpack.packb({"context": {"ids": list(range(1_000_000))}, "features": {"a": [1] * 1000, "b": 2}})
    trimmer = _fasttrim.Trimmer(frozenset({"b"}))
    for i in range(0, len(body), 1000):
        trimmer.feed(body[i:i + 1000])
    assert trimmer.finish() == _fasttrim.trim(body, frozenset({"b"}))
    assert trimmer.rescanned <= 2 * len(body)  # per-chunk rescans would be ~2,400x the body


def _list_cases() -> dict[str, list]:
    big = 2**62
    return {
        "uniform uint64": [big + i for i in range(50)],
        "uniform fixint": list(range(100)),
        "uniform float64": [0.5 + i for i in range(40)],
        "one narrower element": [big + i for i in range(20)] + [7] + [big + i for i in range(20)],
        "one wider element last": [5] * 30 + [big],
        "type byte repeats at the stride inside values": [0xCF, big, 0xCF,
                                                          big],  # 0xcf = uint64's type byte, also as a value
        "strings": ["ab", "cd", "ef"],
        "nested list": [[1, 2], [3, 4]],
        "mixed": [1, "x", 2.5, None, True, big],
    }


@pytest.mark.parametrize("case", sorted(_list_cases()))
def test_list_features_skip_exactly_whatever_their_element_encodings(case: str) -> None:
    """List values are skipped by element type bytes (a stride check when every element is encoded alike):
    uniform, almost-uniform and mixed lists all trim to the reference bytes, whole or cut anywhere."""
    value = _list_cases()[case]
    body = msgpack.packb({"features": {"before": 1, "hist": value, "after": [value, "z"], "last": value}, "id": "r"})
    doc = {"features": {"before": 1, "hist": value, "after": [value, "z"], "last": value}, "id": "r"}
    for allow in (frozenset({"hist", "last"}), frozenset({"before", "after"})):
        # independent oracle: msgpack-python's encoding of only the kept features
        expected_body = msgpack.packb({"features": {k: v for k, v in doc["features"].items() if k in allow}, "id": "r"})
        expected = trim_mod.TrimResult(expected_body, 4, 2)
        for name, fn in IMPLS.items():
            assert fn(body, allow) == expected, name
        for cut in range(1, len(body)):  # every split point: the list header or elements straddle the chunk boundary
            for e in ENGINES:
                assert CHUNKED[e]([body[:cut], body[cut:]], allow) == expected, e
    with pytest.raises(PayloadError):
        trim_mod.trim(body[:-3], frozenset({"hist"}), "application/msgpack")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("hint", [0, 1, 1000, None, 10**7])
def test_streamed_output_is_exact_whatever_the_size_hint(hint, engine: str) -> None:
    """The trimmed body is written as the scan goes into a buffer sized by the hint (None: the body's exact
    length); a short hint grows it, a long one is shrunk at the end: the bytes are the same either way.
    Few kept features behind a wide "features" header also exercise the header narrowing."""
    body, allow = reference_payload()
    few = frozenset(sorted(allow)[:3])  # 3 kept of 2,000: the reserved 3-byte map header becomes 1 byte
    for a in (allow, few):
        expected = trim_mod.trim_msgpack_py(body, a)
        stream = trim_mod.StreamTrim(a, len(body) if hint is None else hint, engine=trim_mod.ENGINES[engine])
        for i in range(0, len(body), 100_000):
            stream.feed(body[i:i + 100_000])
        assert stream.finish([body]) == expected


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_modules_share_one_api(engine: str) -> None:
    """trim(), Names and Trimmer behave alike in both engines, misuse included (trimmer.trim picks either)."""
    m = trim_mod.ENGINES[engine]
    body = msgpack.packb({"features": {"a": 1, "b": 2}, "id": "r"})
    expected = (msgpack.packb({"features": {"a": 1}, "id": "r"}), 2, 1)
    names = m.Names(frozenset({"a"}))
    assert names.allow == frozenset({"a"})
    for allow in (frozenset({"a"}), {"a"}, names):
        assert m.trim(body, allow) == expected
        assert m.trim(memoryview(body), allow) == expected
        t = m.Trimmer(allow, size_hint=len(body))
        t.feed(body[:5])
        t.feed(bytearray(body[5:]))
        assert t.finish() == expected
        with pytest.raises(RuntimeError):
            t.finish()
        with pytest.raises(RuntimeError):
            t.feed(b"")
    assert m.trim(msgpack.packb({"id": "r"}), names) is None
    with pytest.raises(TypeError):
        m.trim(body, ["a"])
    with pytest.raises(TypeError):
        m.Names({"a"})
    with pytest.raises(ValueError, match="trailing bytes"):
        m.trim(body + b"\x00", names)


@pytest.mark.skipif(not trim_mod.ACCELERATED, reason="C engine off or not built (the Python one sizes nothing)")
def test_output_sized_from_the_last_trim_still_grows_when_this_one_keeps_more() -> None:
    """The output buffer is sized from what the same allowlist kept last time; a body that keeps far more
    (here after one that kept nothing) must still come out exact."""
    body, allow = reference_payload()
    stranger = msgpack.packb({"features": {f"zz{i}": b"x" * 1000 for i in range(500)}}, use_bin_type=True)
    for first in (stranger, body, stranger):
        trim_mod.trim_msgpack_chunks([first], allow)  # sets the allowlist table's output ratio
        for fn in (trim_mod.trim_msgpack_c, lambda b, a: trim_mod.trim_msgpack_chunks([b[:70_000], b[70_000:]], a)):
            assert fn(body, allow) == trim_mod.trim_msgpack_py(body, allow)
            assert fn(stranger, allow) == trim_mod.trim_msgpack_py(stranger, allow)


def _stub_api(name: str) -> dict[str, set[str]]:
    """The names a .pyi stub declares: top-level functions and classes, with each class's members."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(trim_mod.__file__).parent / f"{name}.pyi").read_text())
    api: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            api[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            api[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"}
    return api


@pytest.mark.parametrize("engine", ENGINES)
def test_fasttrim_stub_matches_both_engines(engine: str) -> None:
    """_fasttrim.pyi declares what the C module has, and the Python twin has the same (trimmer.trim takes either)."""
    api = _stub_api("_fasttrim")
    assert set(api) == {"Names", "Trimmer", "trim"}
    module = trim_mod.ENGINES[engine]
    for name, members in api.items():
        obj = getattr(module, name)
        assert callable(obj), name
        for member in members:
            if member in {"allow", "rescanned"}:  # properties: instance attributes in Python
                continue
            assert callable(getattr(obj, member)), f"{name}.{member}"


@pytest.mark.skipif(NO_EXTENSIONS, reason="C extensions switched off")
def test_tensorext_stub_matches_the_module() -> None:
    from trimmer import _tensorext

    api = _stub_api("_tensorext")
    assert set(api) == {"configure", "hook"} and all(callable(getattr(_tensorext, n)) for n in api)
