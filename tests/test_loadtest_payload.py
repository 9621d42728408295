"""Payload generator determinism and usage ratio; config validation; report rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.config import parse_loadtest_config, parse_rate
from loadtest.payload import make_request, reference_payload, reference_universe, universe_for_models
from loadtest.report import add_comparisons, write_report
from trimmer.codec import MSGPACK, decode_request, encode_msgpack
from trimmer.errors import ConfigError
from trimmer.signature import parse_signature
from trimmer.trim import trim

SIG_A = parse_signature(json.dumps({
    "input_names": ["user_dense", "cand_ctr", "cand_emb", "user_country"], "output_names": ["score"],
    "inputs": {"user_dense": {"dtype": "float32", "shape": [16]}, "cand_ctr": {"dtype": "float32", "shape": [-1]},
               "cand_emb": {"dtype": "float32", "shape": [-1, 8]}, "user_country": {"dtype": "int64", "shape": []}},
}).encode(), "a")
SIG_B = parse_signature(
    json.dumps({"input_names": ["user_dense", "user_recent_items"], "output_names": ["ids"]}).encode(), "b")


def test_generator_is_deterministic_per_seed() -> None:
    u1 = universe_for_models([SIG_A, SIG_B], 0.2, seed=3)
    u2 = universe_for_models([SIG_A, SIG_B], 0.2, seed=3)
    assert [f.name for f in u1.features] == [f.name for f in u2.features]
    b1 = encode_msgpack(make_request(u1, 64, seed=7))
    b2 = encode_msgpack(make_request(u2, 64, seed=7))
    assert b1 == b2
    assert encode_msgpack(make_request(u1, 64, seed=8)) != b1
    assert [f.name for f in universe_for_models([SIG_A, SIG_B], 0.2, seed=4).features] != [f.name for f in u1.features]
    assert reference_payload(seed=1,
                             n_features=200, candidates=16) == reference_payload(seed=1, n_features=200, candidates=16)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5, 1.0])
def test_usage_ratio_and_every_model_input_present(ratio: float) -> None:
    u = universe_for_models([SIG_A, SIG_B], ratio, seed=0)
    used = set(SIG_A.input_names) | set(SIG_B.input_names)
    assert u.used == used
    assert u.usage_ratio == pytest.approx(ratio, abs=0.5 / len(u.features) + 1e-9)
    req = decode_request(encode_msgpack(make_request(u, 32, seed=1)), MSGPACK)
    assert used <= set(req["features"])
    assert len(req["features"]) == len(u.features)
    # shapes follow the signature: -1 is the candidate dimension
    assert req["features"]["cand_emb"].shape == (32, 8)
    assert req["features"]["user_dense"].shape == (16,)


def test_reference_universe_mix_and_allowlist() -> None:
    u, allow = reference_universe()
    assert len(u.features) == 2000 and len(allow) == 400
    kinds = {}
    for f in u.features:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    assert kinds == {"float_col": 800, "id_col": 400, "context": 400, "history": 200, "string": 200}


def test_minimum_is_the_request_with_only_kept_features() -> None:
    u = universe_for_models([SIG_A], 0.2, seed=0)
    req = make_request(u, 256, seed=0)
    body = encode_msgpack(req)
    kept = {k: v for k, v in req["features"].items() if k in SIG_A.allowlist}
    assert trim(body, SIG_A.allowlist, MSGPACK).body == encode_msgpack({**req, "features": kept})
    assert len(trim(body, SIG_A.allowlist, MSGPACK).body) < len(body)


def test_config_validation_one_line_errors(tmp_path: Path) -> None:
    cfg = parse_loadtest_config({"models": ["ranker", {"name": "retrieval", "version": 1}],
                                 "scenarios": ["trim", "passthrough"],
                                 "load": {"mode": "closed", "concurrency": 4, "duration_s": 3}}, "t.yaml", tmp_path)
    assert [m.name for m in cfg.models] == ["ranker", "retrieval"] and cfg.models[1].version == "1"
    assert cfg.load.mode == "closed" and cfg.scenarios == ("trim", "passthrough")
    bad = [
        ({"scenarios": ["turbo"]}, "unknown scenario"),
        ({"load": {"rate": 0}}, "load.rate"),
        ({"load": {"mode": "sideways"}}, "open or closed"),
        ({"payload": {"usage_ratio": 2}}, "usage_ratio"),
        ({"repo": "nope/dir"}, "no such directory"),
        ({"bogus": 1}, "unknown key"),
        ({"link_rates": ["fast"]}, "not a rate"),
        ({"models": []}, "non-empty list"),
    ]
    for doc, needle in bad:
        with pytest.raises(ConfigError, match=needle) as exc:
            parse_loadtest_config(doc, "t.yaml", tmp_path)
        assert "\n" not in str(exc.value)
    assert parse_rate("1gbit") == 10**9 and parse_rate("100mbit") == 10**8 and parse_rate("2.5kbit") == 2500


def _row(name: str, wire: float, link: str | None = None) -> dict:
    return {"scenario": name, "link_rate": link, "wire_bytes_per_request": wire, "ratio_to_min": wire / 100,
            "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 4.0}, "achieved_rate": 50.0,
            "root_cpu_s_per_1k": 1.5, "errors": {}, "crosscheck": {"agreement_pct": 0.0, "ok": True}}


def test_report_files_and_saved_percent(tmp_path: Path) -> None:
    rows = [_row("passthrough", 1000), _row("trim", 250), _row("passthrough", 1000, "1gbit"),
            _row("trim", 500, "1gbit")]
    report = {"generated": "now", "config": "x", "models": ["ranker/1"], "payload": {"min_bytes": 100},
              "load": {"mode": "open", "rate": 10}, "scenarios": rows}
    files = write_report(report, tmp_path)
    assert [r["saved_pct"] for r in rows] == [0.0, 75.0, 0.0, 50.0]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["scenarios"][1]["saved_pct"] == 75.0
    md = (tmp_path / "report.md").read_text()
    assert "| trim | loopback | 250 B | 75.0 % |" in md
    for name in ("bytes_per_request", "latency_by_mode", "rps_vs_link_rate"):
        assert Path(files[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    add_comparisons(rows)  # idempotent
    assert rows[1]["saved_pct"] == 75.0
