"""Allowlist registry: precedence, version resolution, fail open, hot reload, atomic swaps."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from archives import make_repo
from trimmer.bundle import build_bundle, read_bundle, write_bundle
from trimmer.errors import BundleError, ConfigError
from trimmer.overrides import load_overrides, parse_overrides
from trimmer.registry import BundleSource, Registry, RepositorySource, StaticSource
from trimmer.signature import Signature

ROOT = Path(__file__).resolve().parents[1]


def sig(*names: str) -> Signature:
    return Signature(tuple(names), ("score",))


def write_json_bundle(path: Path, models: dict[str, dict[str, list[str]]],
                      defaults: dict[str, str] | None = None) -> Path:
    doc = {"kind": "feature-trimmer/bundle", "format": 1, "models": {}}
    for m, versions in models.items():
        doc["models"][m] = {
            "versions": {v: {"input_names": names, "output_names": ["y"]} for v, names in versions.items()}}
        if defaults and m in defaults:
            doc["models"][m]["default_version"] = defaults[m]
    write_bundle(doc, path)
    return path


def test_exact_version_default_version_and_fail_open() -> None:
    reg = Registry([StaticSource("s", {("ranker", "1"): sig("a", "b"), ("ranker", "2"): sig("a", "c")})],
                   default_versions={"ranker": "2"})
    reg.reload()
    assert reg.resolve("ranker", "1").allowlist == {"a", "b"}
    assert reg.resolve("ranker", "1").reason == "exact"
    default = reg.resolve("ranker")
    assert (default.allowlist, default.version, default.reason) == ({"a", "c"}, "2", "default_version")
    miss = reg.resolve("ranker", "3")  # never guessed from another version
    assert miss.allowlist is None and miss.reason == "miss"
    assert reg.resolve("unknown").allowlist is None


def test_without_a_version_latest_resolves_to_the_highest_version_numerically() -> None:
    versions = {("m", v): sig("a", f"only{v}") for v in ("1", "2", "9", "10", "beta")}
    reg = Registry([StaticSource("s", versions)])
    reg.reload()
    res = reg.resolve("m")
    # "10" > "9" > "beta": the leaf's rule and Triton's default; the path stays unversioned (pin False).
    assert (res.version,
            res.allowlist, res.reason, res.pin) == ("10", frozenset({"a", "only10"}), "latest_version", False)


def test_explicit_policy_without_default_is_untrimmed_unless_every_version_shares_the_allowlist() -> None:
    differing = Registry([StaticSource("s", {("m", "1"): sig("a"), ("m", "2"): sig("a", "b")})],
                         version_policies={"m": "explicit"})
    differing.reload()
    assert differing.resolve("m").allowlist is None
    assert any("models.m: version_policy explicit" in p for p in differing.status()["problems"])
    shared = Registry([StaticSource("s", {("m", "1"): sig("b", "a"), ("m", "2"): sig("a", "b")})],
                      default_policy="explicit")
    shared.reload()
    res = shared.resolve("m")
    assert (res.allowlist, res.version, res.reason, res.pin) == (frozenset({"a", "b"}), None, "shared_allowlist", False)
    assert res.digest is not None  # same inputs, same digest: the handshake still applies


def test_unversioned_models_get_a_model_wide_allowlist() -> None:
    from trimmer.registry import SourceData, Source

    class Meta(Source):
        def load(self) -> SourceData:
            return SourceData(unversioned={"mls": sig("x", "y")})

    reg = Registry([Meta("meta")])
    reg.reload()
    res = reg.resolve("mls")
    assert (res.allowlist, res.version, res.reason, res.pin) == (frozenset({"x", "y"}), None, "unversioned", False)


def test_an_explicit_allowlist_with_a_typo_is_refused_and_the_last_good_stays(tmp_path: Path) -> None:
    reg = Registry([StaticSource("s", {("m", "1"): sig("cand_ctr", "user_id")})])
    reg.reload()
    good = tmp_path / "allowlists.yaml"
    good.write_text("models:\n  m:\n    versions:\n      '1':\n        allowlist: [cand_ctr]\n")
    reg.use_overrides_file(good)
    assert reg.resolve("m", "1").allowlist == {"cand_ctr"}
    good.write_text("models:\n  m:\n    versions:\n      '1':\n        allowlist: [cand_ctrr]\n")
    assert reg.reload_overrides() is False  # refused: the last good overrides stay
    assert reg.resolve("m", "1").allowlist == {"cand_ctr"}
    assert any("cand_ctrr" in p and "typo" in p for p in reg.status()["problems"])
    good.write_text("models:\n  m:\n    versions:\n      '1':\n        allowlist: [cand_ctrr]\n        "
                    "allow_extra_features: true\n")
    assert reg.reload_overrides() is True  # the opt-out for intended extras
    assert reg.resolve("m", "1").allowlist == {"cand_ctrr"}
    with pytest.raises(ConfigError, match="cand_ctrr"):
        reg.set_overrides(parse_overrides({"models": {"m": {"allowlist": ["cand_ctrr"]}}}))


def test_override_precedence_and_modes() -> None:
    overrides = parse_overrides({
        "defaults": {"mode": "shadow"},
        "models": {
            "ranker": {"mode": "enforce", "keep": ["k"], "default_version": 1,
                       "versions": {"2": {"allowlist": ["x"], "keep": ["k2"], "mode": "off",
                                          "allow_extra_features": True}}},
            "xgb": {"allowlist": ["p", "q"]},
        },
    })
    reg = Registry([StaticSource("s", {("ranker", "1"): sig("a"), ("ranker", "2"): sig("a", "b")})], overrides)
    reg.reload()
    r1 = reg.resolve("ranker", "1")
    assert (r1.allowlist, r1.mode) == ({"a", "k"}, "enforce")        # archive + keep
    r2 = reg.resolve("ranker", "2")
    assert (r2.allowlist, r2.mode) == ({"x", "k", "k2"}, "off")      # explicit version list beats archive
    assert reg.resolve("ranker").allowlist == {"a", "k"}             # default_version from overrides
    xgb = reg.resolve("xgb", "7")
    assert (xgb.allowlist, xgb.mode, xgb.reason) == ({"p", "q"}, "shadow", "model_allowlist")
    assert reg.resolve("other").mode == "shadow"


@pytest.mark.parametrize("doc, message", [
    ({"models": {"m": {"mode": "trim"}}}, "is not one of enforce, shadow, off"),
    ({"models": {"m": {"keep": "a"}}}, "must be a list of non-empty feature names"),
    ({"modles": {}}, "unknown key(s) modles"),
    ({"models": {"m": {"versions": {"1": {"allowlst": []}}}}}, "unknown key(s) allowlst"),
    ([1, 2], "must be a mapping"),
])
def test_bad_overrides(doc: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_overrides(doc)
    assert message in str(info.value)


def test_shipped_allowlists_yaml_is_valid() -> None:
    ov = load_overrides(ROOT / "configs" / "allowlists.yaml")
    assert ov.models["ranker"].default_version == "2" and ov.models["legacy_xgb"].mode == "shadow"


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "a.yaml"
    bad.write_text("models:\n  m: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_overrides(bad)
    assert "invalid YAML at line" in str(info.value) and "\n" not in str(info.value)


def test_bundle_from_real_repository_and_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = make_repo(tmp_path / "repo", {"ranker": {"1": ["a", "b"], "2": ["a", "c"]}, "retrieval": {"1": ["u"]}})
    make_repo(tmp_path / "repo", {"retrieval": {"2": ["u", "v"]}}, fmt="pt2")
    out = tmp_path / "bundle.json"
    proc = subprocess.run([sys.executable, "-m", "trimmer", "bundle", "build", str(repo), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    signatures, _ = read_bundle(out)
    assert {k: s.allowlist for k, s in signatures.items()} == {
        ("ranker", "1"): {"a", "b"}, ("ranker", "2"): {"a", "c"}, ("retrieval", "1"): {"u"},
        ("retrieval", "2"): {"u", "v"}}
    doc = json.loads(out.read_text())
    assert len(doc["models"]["ranker"]["versions"]["1"]["sha256"]) == 64
    # a corrupt archive fails the build with one line
    (repo / "ranker" / "3").mkdir()
    (repo / "ranker" / "3" / "model.pt").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "trimmer", "bundle", "build", str(repo), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not a valid zip" in proc.stderr


def test_conflicting_repositories_fail_the_build(tmp_path: Path) -> None:
    a = make_repo(tmp_path / "a", {"m": {"1": ["x"]}})
    b = make_repo(tmp_path / "b", {"m": {"1": ["y"]}})
    with pytest.raises(BundleError, match="different signatures"):
        build_bundle([a, b])


def test_repository_source_keeps_last_good_version_on_corruption(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"m": {"1": ["a"], "2": ["b"]}})
    reg = Registry([RepositorySource(repo)])
    reg.reload()
    (repo / "m" / "2" / "model.pt").write_bytes(b"truncated")
    reg.reload()
    assert reg.resolve("m", "2").allowlist == {"b"}  # last good kept
    assert reg.resolve("m", "1").allowlist == {"a"}
    status = reg.status()["sources"][0]
    assert status["failures"] == 1 and "m/2" in status["last_error"]


def test_corrupt_bundle_keeps_last_good_and_other_bundles_untouched(tmp_path: Path) -> None:
    a = write_json_bundle(tmp_path / "a.json", {"m": {"1": ["x"]}})
    b = write_json_bundle(tmp_path / "b.json", {"n": {"1": ["y"]}})
    reg = Registry([BundleSource(a), BundleSource(b)])
    reg.reload()
    a.write_text('{"kind": "feature-trimmer/bundle", "format": 1, "models": {"m": ')
    reg.reload()
    assert reg.resolve("m", "1").allowlist == {"x"} and reg.resolve("n", "1").allowlist == {"y"}
    sources = {s["name"]: s for s in reg.status()["sources"]}
    assert "not valid JSON" in sources[str(a)]["last_error"] and sources[str(b)]["last_error"] is None
    assert sources[str(a)]["failures"] == 1


def test_disagreeing_sources_forward_the_union() -> None:
    reg = Registry([StaticSource("s1", {("m", "1"): sig("a")}), StaticSource("s2", {("m", "1"): sig("b")})])
    reg.reload()
    assert reg.resolve("m", "1").allowlist == {"a", "b"}
    assert reg.status()["conflicts"]


async def rewrite_until(write, predicate, timeout: float = 20.0) -> bool:
    """Write, then poll; write again every half second until `predicate` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        write()
        for _ in range(10):
            if predicate():
                return True
            await asyncio.sleep(0.05)
    return predicate()


async def test_hot_reload_picks_up_replaced_and_corrupt_bundles(tmp_path: Path) -> None:
    path = write_json_bundle(tmp_path / "bundle.json", {"m": {"1": ["a"]}})
    reg = Registry([BundleSource(path)])
    reg.reload()
    stop = asyncio.Event()
    task = asyncio.create_task(reg.watch(stop, debounce_ms=50))

    async def until(predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        # rewritten until seen: a write made before the watcher is up would otherwise be missed (no sleep to guess)
        assert await rewrite_until(lambda: write_json_bundle(path, {"m": {"1": ["a", "b"], "2": ["c"]}}),
                                   lambda: reg.resolve("m", "2").allowlist == {"c"})
        assert reg.resolve("m", "1").allowlist == {"a", "b"}
        path.write_text("{ corrupt")
        assert await until(lambda: reg.status()["sources"][0]["failures"] == 1)
        assert reg.resolve("m", "2").allowlist == {"c"}  # last good kept
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_readers_never_see_a_half_built_map(tmp_path: Path) -> None:
    """Two complete generations alternate; every snapshot a reader grabs must be one of them, whole."""
    gen_a = {("m", str(v)): sig("a", f"x{v}") for v in range(200)}
    gen_b = {("m", str(v)): sig("b", f"y{v}") for v in range(200)}
    source = StaticSource("s", gen_a)
    reg = Registry([source])
    reg.reload()
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            snap = reg.snapshot
            firsts = {("a" in snap.resolve("m", str(v)).allowlist) for v in range(200)}
            if len(firsts) != 1:
                bad.append(f"mixed generation {snap.generation}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(100):
        source.set(gen_b if i % 2 == 0 else gen_a)
        reg.reload(["s"])
    stop.set()
    for t in threads:
        t.join(10)
    assert not bad
    assert reg.snapshot.generation >= 100


def test_bare_yaml_off_means_mode_off(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("models:\n  m:\n    mode: off\n")
    assert load_overrides(path).models["m"].mode == "off"


async def test_overrides_file_hot_reload_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "allowlists.yaml"
    path.write_text("models:\n  m:\n    keep: [k1]\n")
    reg = Registry([StaticSource("s", {("m", "1"): sig("a")})])
    reg.use_overrides_file(path)
    reg.reload()
    assert reg.resolve("m", "1").allowlist == {"a", "k1"}
    stop = asyncio.Event()
    task = asyncio.create_task(reg.watch(stop, debounce_ms=50))
    try:
        await rewrite_until(lambda: path.write_text("models:\n  m:\n    keep: [k2]\n    mode: shadow\n"),
                            lambda: reg.resolve("m", "1").allowlist == {"a", "k2"})
        assert reg.resolve("m", "1").allowlist == {"a", "k2"} and reg.resolve("m", "1").mode == "shadow"
        path.write_text("models:\n  m:\n    mode: trim-everything\n")
        for _ in range(200):
            if any(s["kind"] == "overrides" and s["failures"] for s in reg.status()["sources"]):
                break
            await asyncio.sleep(0.05)
        status = next(s for s in reg.status()["sources"] if s["kind"] == "overrides")
        assert status["failures"] == 1 and "trim-everything" in status["last_error"]
        assert reg.resolve("m", "1").allowlist == {"a", "k2"}  # last good overrides kept
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
