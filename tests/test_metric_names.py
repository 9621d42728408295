"""The leaf's metric names: docs/metrics.md's leaf table is exactly what a real leaf exports, the renamed
series are gone, and the per-feature families add up to their aggregates (one real leaf on loopback)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.procs import free_port, start
from root.drift import parse_leaf_metrics
from promtext import metric_sum

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def _section(title: str, stop: str) -> str:
    text = DOC.read_text()
    return text.split(title, 1)[1].split(stop, 1)[0]


def _documented() -> set[str]:
    return set(re.findall(r"^\| `(trimmer_leaf_[a-z_]+)`", _section("# Leaf metrics", "## Renamed"), re.M))


def _renamed() -> dict[str, str]:
    return dict(re.findall(r"^\| `(trimmer_leaf_[a-z_]+)` \| `(trimmer_leaf_[a-z_]+)` \|",
                           _section("## Renamed", "\n# "), re.M))


def _exposed(text: str) -> set[str]:
    """Every family the leaf declares, as a query names it (counters with _total)."""
    out = set()
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created"):
            continue
        out.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return out


@pytest.fixture(scope="module")
def leaf(tmp_path_factory):
    from archives import make_repo

    tmp = tmp_path_factory.mktemp("names")
    repo = make_repo(tmp / "repo", {"m": {"1": ["x", "y"]}})
    port = free_port()
    proc = start("leaf", ["leaf", "--repo", str(repo), "--port", str(port), "--torch-threads", "1"],
                 port, "/v2/health/ready", tmp)
    yield proc.url
    proc.stop()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_the_documented_leaf_table_is_what_a_leaf_exports(leaf):
    documented = _documented()
    assert len(documented) > 20  # the table was found
    assert documented == _exposed(_scrape(leaf))


def test_renamed_series_are_gone_and_their_new_names_exist(leaf):
    renamed = _renamed()
    assert renamed == {  # the renames this release made, written out (docs/metrics.md says the same)
        "trimmer_leaf_bytes_received_total": "trimmer_leaf_received_bytes_total",
        "trimmer_leaf_feature_unused_total": "trimmer_leaf_features_unused_by_feature_total",
        "trimmer_leaf_feature_defaulted_total": "trimmer_leaf_inputs_defaulted_by_feature_total",
    }
    exposed = _exposed(_scrape(leaf))
    assert not set(renamed) & exposed and set(renamed.values()) <= exposed


def test_counts_per_feature_add_up_to_the_aggregate_and_bytes_are_counted(leaf):
    body = msgspec.msgpack.encode({"features": {"x": [1.0, 2.0], "y": [3.0, 4.0], "unused_a": 1, "unused_b": [5]}})
    req = urllib.request.Request(leaf + "/v1/models/m/versions/1/score", data=body,
                                 headers={"Content-Type": "application/msgpack"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    text = _scrape(leaf)
    assert metric_sum(text, "trimmer_leaf_received_bytes_total", model="m", version="1") == len(body)
    assert metric_sum(text, "trimmer_leaf_features_unused_total", model="m", version="1") == 2
    per = {f: metric_sum(text, "trimmer_leaf_features_unused_by_feature_total", model="m", version="1", feature=f)
           for f in ("unused_a", "unused_b", "x", "y")}
    assert per == {"unused_a": 1, "unused_b": 1, "x": 0, "y": 0}
    # and the root's drift report reads the new names from this very exposition
    assert dict(parse_leaf_metrics(text)[("m", "1")]["unused"]) == {"unused_a": 1, "unused_b": 1}


def test_drift_still_reads_a_leaf_that_exports_the_old_names():
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    reg = CollectorRegistry()  # what a leaf of the previous release exported
    Counter("trimmer_leaf_feature_unused", "old",
            ["model", "version", "feature"], registry=reg).labels("m", "1", "a").inc(3)
    Counter("trimmer_leaf_feature_defaulted", "old",
            ["model", "version", "feature"], registry=reg).labels("m", "1", "b").inc(2)
    got = parse_leaf_metrics(generate_latest(reg).decode())[("m", "1")]
    assert dict(got["unused"]) == {"a": 3} and dict(got["defaulted"]) == {"b": 2}
