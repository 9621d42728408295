"""Root config validation (one-line errors, CLI exit code) and PreparedBody's trim against an independent encoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from root.dataplane import Body
from root.config import load_config, parse_config
from root.dataplane import NativeFormat, PreparedBody
from trimmer.codec import JSON, MSGPACK, encode_json, encode_msgpack
from trimmer.errors import ConfigError, PayloadError
from trimmer.tensor import Tensor

REPO = Path(__file__).resolve().parent.parent


def base(**over):
    doc = {"partitions": {"p": {"replicas": ["http://127.0.0.1:9"]}}, "models": {"m": "p"}}
    doc.update(over)
    return doc


def test_minimal_config_defaults(tmp_path):
    cfg = parse_config(base(), "c.yaml", tmp_path)
    assert cfg.host == "127.0.0.1" and cfg.port == 8080 and cfg.workers == 1
    assert cfg.partitions["p"].protocol == "native" and cfg.partitions["p"].compression == "none"
    assert cfg.partition_for("m") == "p" and cfg.partition_for("x") is None


@pytest.mark.parametrize("doc,needle", [
    (base(listen={"hots": "x"}), "unknown key(s) hots"),
    (base(colour=1), "unknown key(s) colour"),
    (base(partitions={"p": {"replicas": ["ftp://x"]}}), "bad URL"),
    (base(partitions={"p": {"replicas": ["http://h:99999"]}}), "bad URL"),
    (base(partitions={"p": {"replicas": []}}), "non-empty list"),
    (base(partitions={"p": {"replicas": ["http://a:1"], "compression": "gzip"}}), "not one of none, lz4, zstd"),
    (base(partitions={"p": {"replicas": ["http://a:1"], "protocol": "grpc"}}), "protocol"),
    (base(models={"m": "q"}), "no partition named 'q'"),
    (base(bundles=["missing.json"]), "missing.json: no such file"),
    (base(repositories=["nodir"]), "nodir: no such directory"),
    (base(overrides="nofile.yaml"), "nofile.yaml: no such file"),
    (base(unknown_models={"policy": "passthrough"}), "required when policy is passthrough"),
    (base(timeouts={"request_s": -1}), "timeouts.request_s"),
    (base(limits={"max_body_bytes": "big"}), "max_body_bytes"),
    (base(workers=0), "workers"),
    (base(admin={"on_service_port": True, "port": 9000}), "on_service_port"),
        (base(models={"../x": "p"}), "invalid model name"),
        (base(limits={"max_fanout_targets": 0}), "max_fanout_targets"),
    ({"models": {}}, "partitions"),
])
def test_bad_configs_are_one_line_errors(tmp_path, doc, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(doc, "c.yaml", tmp_path)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    cfg_path = tmp_path / "sub" / "root.yaml"
    cfg_path.write_text(json.dumps(base(bundles=["b.json"])))
    assert load_config(cfg_path).bundles == (tmp_path / "sub" / "b.json",)


@pytest.mark.parametrize("text,needle", [
    ("partitions: {p: {replicas: [http://127.0.0.1:1]}}\nbogus: 1\n", "unknown key(s) bogus"),
    ("partitions: [", "invalid YAML"),
    ("partitions: {p: {replicas: ['not a url']}}\n", "bad URL"),
])
def test_cli_exits_nonzero_with_one_line(tmp_path, text, needle):
    cfg = tmp_path / "root.yaml"
    cfg.write_text(text)
    out = subprocess.run([sys.executable, "-m", "trimmer", "root", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_shipped_configs_parse(tmp_path):
    """Every shipped root config parses as shipped. The demo model directory they point at (../build/demo-models)
    is made, empty, beside a copy of configs/, so the check runs whether or not `build-demo` ran here."""
    import shutil

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "build" / "demo-models").mkdir(parents=True)
    for name in ("root.yaml", "root-sidecar.yaml"):
        cfg = load_config(tmp_path / "configs" / name)
        assert cfg.partitions, name


# ---------------------------------------------------------------- PreparedBody: exactly the kept features
values = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.text(max_size=5), st.booleans(),
                   st.lists(st.integers(0, 9), max_size=3))
feature_maps = st.dictionaries(st.text(min_size=1, max_size=4), values, max_size=12)


@settings(max_examples=150, deadline=None)
@given(feats=feature_maps, allow=st.sets(st.text(min_size=1, max_size=4), max_size=8), json_mode=st.booleans(),
       with_models=st.booleans())
def test_prepared_trim_is_the_document_with_only_kept_features(feats, allow, json_mode, with_models):
    doc = {"request_id": "x", "features": feats, "context": {"a": 1}}
    if with_models:
        doc = {"models": [{"name": "m"}], **doc}
    enc, media = (encode_json, JSON) if json_mode else (encode_msgpack, MSGPACK)
    body = enc(doc)
    without_models = enc({k: v for k, v in doc.items() if k != "models"})
    allow = set(allow) | set(list(feats)[: len(feats) // 2])
    p = PreparedBody(Body.of(body), media)
    t = NativeFormat(media).trim(p.base, allow, None)
    out, n_in, n_kept = t.body, t.features_in, t.features_kept
    # independent oracle: the same document encoded with only the kept features (not trimmer.trim)
    kept = {n: v for n, v in feats.items() if n in allow}
    expected_body = enc({k: (kept if k == "features" else v) for k, v in doc.items() if k != "models"})
    assert (out, n_in, n_kept) == (expected_body, len(feats), len(kept))
    assert p.base.joined() == without_models
    # the shortcut route trims the body as received, in chunks (3 bytes: every header and key straddles)
    chunked = Body([without_models[i:i + 3] for i in range(0, len(without_models), 3)])
    t = NativeFormat(media).trim(chunked, allow, None)
    assert (t.body, t.features_in, t.features_kept) == (expected_body, len(feats), len(kept))
    assert chunked.joined() == without_models


def test_prepared_trim_keeps_tensor_bytes():
    import numpy as np

    t = Tensor.from_numpy(np.arange(6, dtype=np.float32))
    body = encode_msgpack({"models": [{"name": "m"}], "features": {"a": t, "b": 1}})
    p = PreparedBody(Body.of(body), MSGPACK)
    assert NativeFormat(MSGPACK).trim(p.base, {"a"}, None).body == encode_msgpack({"features": {"a": t}})
    assert [r.name for r in p.models()] == ["m"]


@pytest.mark.parametrize("models", [None, [], "m", [{"nam": "m"}], [{"name": 3}]])
def test_bad_models_lists(models):
    doc = {"features": {}} if models is None else {"models": models, "features": {}}
    with pytest.raises(PayloadError):
        PreparedBody(Body.of(msgspec.msgpack.encode(doc)), MSGPACK).models()


def test_a_trim_fed_as_the_body_landed_gives_the_trim_of_the_whole_body():
    """root/front.py feeds the plan's StreamTrim each slice where it landed (memoryviews of one buffer); the result
    is the independent oracle's encoding of the kept features, and the stream is consumed."""
    from trimmer.trim import StreamTrim

    body = encode_msgpack({"request_id": "r", "features": {"a": 1, "b": 2, "c": 3}})
    buf = bytearray(body)
    view = memoryview(buf)
    slices = [view[i:i + 4] for i in range(0, len(body), 4)]
    stream = StreamTrim(frozenset({"b", "c"}), len(body))
    for piece in slices:
        stream.feed(piece)
    t = NativeFormat(MSGPACK).trim(Body([view]), frozenset({"b", "c"}), stream)
    assert (t.body,
            t.features_in, t.features_kept) == (encode_msgpack({"request_id": "r", "features": {"b": 2, "c": 3}}), 3, 2)
    with pytest.raises(RuntimeError, match="twice"):  # the streamed result was the one used
        stream.finish(slices)


def test_admin_defaults_to_a_loopback_listener_apart_from_the_service_port(tmp_path):
    cfg = parse_config(base(listen={"host": "0.0.0.0", "port": 8080}), "c.yaml", tmp_path)
    assert (cfg.admin_host, cfg.admin_port) == ("127.0.0.1", 9901)
    shared = parse_config(base(admin={"on_service_port": True}), "c.yaml", tmp_path)
    assert (shared.admin_host, shared.admin_port) == (None, None)
    exposed = parse_config(base(admin={"host": "0.0.0.0"}), "c.yaml", tmp_path)
    assert (exposed.admin_host, exposed.admin_port) == ("0.0.0.0", 9901)
