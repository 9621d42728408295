"""Coverage-guided fuzzing of the codec and the trim with atheris (libFuzzer), for long sessions.

The hypothesis tests (tests/test_codec_fuzz.py, tests/test_trim.py, the HTTP
fuzz in tests/test_bad_inputs.py) run on every commit; this harness is for
hours-long runs. atheris is NOT a dependency: `pip install atheris` first.

    python tests/fuzz/atheris_trim.py -max_total_time=3600 -rss_limit_mb=2048 \
        -max_len=65536 tests/fuzz/corpus            # corpus dir: created if missing

Property: for any bytes, as msgpack and as JSON, `decode_request`, `trim`
(C accelerator and pure Python) and `trim_oip` either succeed or raise
PayloadError with a one-line message; a successful trim equals decoding the
input, filtering `features` and re-encoding. Anything else (another exception,
a crash in the C extension, a hang caught by -timeout) is a finding; libFuzzer
writes the input to crash-<sha1> for replay: `python tests/fuzz/atheris_trim.py crash-<sha1>`.
The C engine, its chunk-by-chunk form and the pure-Python engine (trimmer/_trim_py.py) are also
checked against each other: the same bytes or the same error message.
Without atheris, `python tests/fuzz/atheris_trim.py --smoke` runs the same property over
20,000 mutated seeds (seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import atheris
except ImportError:  # `--smoke` still runs the property over the seed corpus and random bytes
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        import msgspec

        from trimmer import trim as trim_mod
        from trimmer.codec import decode_request, encode_msgpack
        from trimmer.errors import PayloadError
else:
    import msgspec

    from trimmer import trim as trim_mod
    from trimmer.codec import decode_request, encode_msgpack
    from trimmer.errors import PayloadError

ALLOW = frozenset({"a", "b", "user_age", "cand_ctr", ""})
PAYLOAD_ERRORS = (PayloadError,)


def _check_one_line(exc: Exception) -> None:
    msg = str(exc)
    if not msg or "\n" in msg:
        raise AssertionError(f"PayloadError message must be one non-empty line: {msg!r}")


def _same_after_trim(body: bytes, trimmed: bytes) -> None:
    """A trim that succeeded keeps exactly the allowlisted features, values unchanged."""
    full = msgspec.msgpack.decode(body)
    out = msgspec.msgpack.decode(trimmed)
    feats = full.get("features", {})
    want = {k: v for k, v in feats.items() if k in ALLOW} if isinstance(feats, dict) else feats
    if "features" in full and out.get("features") != want:
        raise AssertionError("trim changed or lost an allowlisted feature")


def _outcome(fn, data: bytes):
    try:
        r = fn(data, ALLOW)
        return ("ok", bytes(r.body), r.features_in, r.features_kept)
    except PAYLOAD_ERRORS as exc:
        return ("PayloadError", str(exc))


def _c_agrees_with_python(data: bytes) -> None:
    """Differential: the C engine and its Python twin (trimmer/_trim_py.py), whole and chunked, give the same
    bytes or the same error message. Only the Python engine where the C one is off or not built."""
    py = _outcome(trim_mod.trim_msgpack_py, data)
    # the streaming trim (chunks as the server receives them), cut at points derived from the input
    cuts = sorted({(b * 7 + i) % (len(data) + 1) for i, b in enumerate(data[:6])})
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    runs = {"python chunked": lambda _d, allow: trim_mod.trim_msgpack_chunks_py(chunks, allow)}
    if trim_mod.ACCELERATED:
        runs["C"] = trim_mod.trim_msgpack_c
        runs["C chunked"] = lambda _d, allow: trim_mod.trim_msgpack_chunks_c(chunks, allow)
    for name, fn in runs.items():
        other = _outcome(fn, data)
        if other != py:
            raise AssertionError(
                f"{name} trim {other[0]} vs Python trim {py[0]} disagree: {other[1:]!r:.200} vs {py[1:]!r:.200}")


def test_one_input(data: bytes) -> None:
    for ctype in ("application/msgpack", "application/json"):
        try:
            decode_request(data, ctype)
        except PAYLOAD_ERRORS as exc:
            _check_one_line(exc)
        try:
            r = trim_mod.trim(data, ALLOW, ctype)
        except PAYLOAD_ERRORS as exc:
            _check_one_line(exc)
        else:
            if ctype == "application/msgpack":
                try:
                    _same_after_trim(data, r.body)
                except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, TypeError, ValueError):
                    pass  # trim validates structure only; values it never decodes may be invalid msgpack text etc.
    _c_agrees_with_python(data)
    try:
        trim_mod.trim_oip(data, ALLOW)
    except PAYLOAD_ERRORS as exc:
        _check_one_line(exc)


def _seed_corpus(corpus: Path) -> None:
    if corpus.exists() and any(corpus.iterdir()):
        return
    corpus.mkdir(parents=True, exist_ok=True)
    import numpy as np

    seeds = [
        {"request_id": "r", "features": {"a": 1, "b": [1, 2], "c": "x", "cand_ctr": np.arange(8, dtype=np.float32)}},
        {"models": [{"name": "m"}], "features": {"user_age": 3.5, "zz": {"n": [1, {"k": None}]}}},
    ]
    for i, doc in enumerate(seeds):
        (corpus / f"seed{i}.mp").write_bytes(encode_msgpack(doc))
    (corpus / "seed.json").write_bytes(
        b'{"features": {"a": {"$tensor": {"dtype": "float32", "shape": [1], "data": "AACAPw=="}}, "q": 1}}')
    (corpus / "oip.json").write_bytes(
        b'{"id": "x", "inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]}')


def smoke(n: int = 20000, seed: int = 0) -> None:
    """No atheris: the property over the seed corpus, its truncations and byte flips, and random bytes."""
    import random
    import tempfile

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        _seed_corpus(Path(d))
        seeds = [p.read_bytes() for p in sorted(Path(d).iterdir())]
    for i in range(n):
        base = bytearray(rng.choice(seeds))
        kind = i % 3
        if kind == 0 and base:
            for _ in range(rng.randint(1, 4)):
                base[rng.randrange(len(base))] = rng.randrange(256)
        elif kind == 1:
            base = base[: rng.randrange(len(base) + 1)]
        else:
            base = bytearray(rng.randbytes(rng.randint(0, 64)))
        test_one_input(bytes(base))
    print(f"smoke: {n} inputs, no finding")


def main() -> None:
    if "--smoke" in sys.argv:
        smoke()
        return
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris (or run with --smoke)")
    dirs = [a for a in sys.argv[1:] if not a.startswith("-") and not Path(a).is_file()]
    if dirs:
        _seed_corpus(Path(dirs[0]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
