"""The scenario matrix and the root config generated for each scenario.

A scenario is (upstream compression, trimming mode). Each runs against a
freshly started root whose only partition points at the byte-counting relay,
so counters, CPU accounting and connection pools never carry over from one
scenario to the next; the leaf and the relay stay up for the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml


@dataclass(frozen=True)
class Scenario:
    name: str
    compression: str  # none | lz4 | zstd (root -> leaf Content-Encoding)
    mode: str  # root trimming mode: off | enforce | shadow
    description: str

    @property
    def trims(self) -> bool:
        return self.mode == "enforce"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("passthrough", "none", "off", "no trimming, no compression (the baseline)"),
        Scenario("lz4", "lz4", "off", "no trimming, lz4 frame compression"),
        Scenario("zstd", "zstd", "off", "no trimming, zstd level 1 compression"),
        Scenario("trim", "none", "enforce", "trim to the model's allowlist"),
        Scenario("trim+lz4", "lz4", "enforce", "trim, then lz4"),
        Scenario("shadow", "none", "shadow", "compute the trim, send untrimmed (adoption dry run)"),
    )
}
BASELINE = "passthrough"
PARTITION = "leaf"


def root_config(scenario: Scenario, *, port: int, upstream_url: str, repo: Path, overrides_path: Path,
                models: Mapping[str, str | None], workers: int = 1, max_connections: int = 64,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The root YAML document for one scenario (schema: root/config.py)."""
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "workers": workers,
        "repositories": [str(repo)],
        "overrides": str(overrides_path),
        "watch": False,
        "admin": {"on_service_port": True}, "partitions": {PARTITION: {"replicas": [upstream_url], "protocol": "native",
                                                                       "compression": scenario.compression,
                                   "max_connections": max_connections}},
        # default_version: a repository source names no default, and a version-less request
        # with no default is an allowlist miss (forwarded untrimmed), so pin the version under test.
        "models": {m: {"partition": PARTITION, **({"default_version": v} if v else {})} for m, v in models.items()},
        "timeouts": {"request_s": 30.0, "health_interval_s": 5.0},
    }
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    return doc


def overrides_doc(scenario: Scenario) -> dict[str, Any]:
    """The per-scenario overrides YAML (trimmer/overrides.py): only the default mode changes."""
    return {"defaults": {"mode": scenario.mode}}


def write_scenario_configs(scenario: Scenario, out_dir: Path, tag: str | None = None, **kwargs: Any) -> Path:
    """Write overrides-<tag>.yaml and root-<tag>.yaml into out_dir; return the root config path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = tag or scenario.name.replace("+", "_")
    ov = out_dir / f"overrides-{safe}.yaml"
    ov.write_text(yaml.safe_dump(overrides_doc(scenario), sort_keys=False))
    cfg = out_dir / f"root-{safe}.yaml"
    cfg.write_text(yaml.safe_dump(root_config(scenario, overrides_path=ov, **kwargs), sort_keys=False))
    return cfg
