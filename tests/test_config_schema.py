"""Declarative configs (trimmer/configschema.py): the committed JSON Schemas match the code, every shipped config
validates against its schema (checked by `jsonschema`, an independent validator) and loads, and a bad file still
fails with one line that names the key path and, for unknown keys, every allowed key."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import jsonschema
import msgspec
import pytest
import yaml

from trimmer.configschema import SCHEMAS, convert, defaults, json_schema
from trimmer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
MODELINE = re.compile(r"^# yaml-language-server: \$schema=\.\./docs/schema/(\w+)\.json$")


def shipped_configs() -> dict[str, str]:
    """configs/<name>.yaml -> its schema kind, read from the file's modeline."""
    out = {}
    for f in sorted((REPO / "configs").glob("*.yaml")):
        first = f.read_text().splitlines()[0]
        m = MODELINE.match(first)
        assert m, f"{f.name}: first line should be the modeline naming its schema, got {first!r}"
        out[f.name] = m.group(1)
    return out


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_committed_schema_is_the_generated_one(kind):
    committed = json.loads((REPO / "docs" / "schema" / f"{kind}.json").read_text())
    assert committed == json_schema(kind), f"regenerate: trimmer config schema {kind} > docs/schema/{kind}.json"
    jsonschema.Draft202012Validator.check_schema(committed)


def test_cli_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "trimmer", "config", "schema", "leaf"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads((REPO / "docs" / "schema" / "leaf.json").read_text())


def test_every_shipped_config_validates_and_loads(tmp_path):
    from leaf.config import load_config as load_leaf
    from loadtest.config import parse_loadtest_config
    from root.config import load_config as load_root
    from trimmer.overrides import load_overrides

    kinds = shipped_configs()
    assert set(kinds.values()) == set(SCHEMAS) and len(kinds) == len(list((REPO / "configs").glob("*.yaml")))
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "build" / "demo-models").mkdir(parents=True)  # what the shipped configs point at
    for name, kind in kinds.items():
        doc = yaml.safe_load((tmp_path / "configs" / name).read_text())
        schema = json.loads((REPO / "docs" / "schema" / f"{kind}.json").read_text())
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
        path = tmp_path / "configs" / name
        {"root": load_root, "leaf": lambda p: load_leaf(str(p)), "overrides": load_overrides,
         "loadtest": lambda p: parse_loadtest_config(yaml.safe_load(p.read_text()), str(p), tmp_path)}[kind](path)


def test_the_schema_rejects_what_the_loader_rejects():
    """The editor's view and the loader agree on the basics: an unknown key, a wrong type, a bad choice."""
    schema = json_schema("root")
    good = {"partitions": {"p": {"replicas": ["http://127.0.0.1:1"]}}}
    jsonschema.validate(good, schema)
    for bad in ({**good, "colour": 1}, {**good, "workers": 0},
                {"partitions": {"p": {"replicas": "http://a:1", "protocol": "grpc"}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# ---------------------------------------------------------------- the one-line errors
class Inner(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    size: int = 3
    mode: str = "a"


class Outer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    parts: dict[str, Inner] = {}
    items: list[Inner] = []
    flag: bool = True
    maybe: int | None = 5


@pytest.mark.parametrize("doc, message", [
    ({"parts": {"mine": {"replica": 1, "zeta": 2}}},
     "f.yaml: parts.mine: unknown key(s) replica, zeta; allowed: mode, size"),
    ({"items": [{}, {"size": "x"}]}, "f.yaml: items[1].size: expected an integer, got 'x'"),
    ({"flag": 1}, "f.yaml: flag: expected true or false, got 1"),
    ({"parts": []}, "f.yaml: parts: expected a mapping, got []"),
    ([], "f.yaml: must be a mapping"),
])
def test_errors_name_the_real_key_path(doc, message):
    with pytest.raises(ConfigError) as exc:
        convert(doc, Outer, "f.yaml")
    assert str(exc.value) == message


def test_null_means_the_default_unless_null_is_a_value():
    out = convert({"flag": None, "maybe": None, "parts": {"a": None}}, Outer, "f.yaml")
    assert (out.flag, out.maybe, out.parts) == (True, None, {"a": Inner()})
    assert convert(None, Outer, "f.yaml") == Outer()


def test_root_errors_keep_their_shape(tmp_path):
    from root.config import parse_config

    with pytest.raises(ConfigError) as exc:
        parse_config({"partitions": {"mine": {"replicas": ["http://a:1"], "replica": 2}}}, "c.yaml", tmp_path)
    assert str(exc.value) == ("c.yaml: partitions.mine: unknown key(s) replica; allowed: allowlists_from_metadata, "
                              "balance, compression, "
                              "health_path, max_connections, protocol, replicas, version_policy, versioned_paths")
    with pytest.raises(ConfigError,
                       match=r"^c\.yaml: partitions\.p\.compression: 'gzip' is not one of none, lz4, zstd$"):
        parse_config({"partitions": {"p": {"replicas": "http://a:1", "compression": "gzip"}}}, "c.yaml", tmp_path)


# ---------------------------------------------------------------- runtime classes keep the schema's defaults
def test_runtime_defaults_are_the_schema_defaults():
    from leaf.config import LeafConfig, LeafFile, Listen
    from loadtest.config import LoadFile, PayloadFile, PayloadSpec
    from loadtest.runner import LoadSpec
    from root.config import MetadataAllowlists, MetadataSpec, PartitionConfig, PartitionSpec

    def same(runtime: type, schema: type, skip: frozenset[str] = frozenset()) -> None:
        d = defaults(schema)
        for f in fields(runtime):
            if f.name in d and f.name not in skip:
                assert getattr(runtime(**_required(runtime)), f.name) == d[f.name], (runtime.__name__, f.name)

    same(PartitionConfig, PartitionSpec)
    same(MetadataAllowlists, MetadataSpec)
    same(LeafConfig, LeafFile, skip={"host", "port", "models"})
    assert (LeafConfig().host, LeafConfig().port) == (Listen().host, Listen().port)
    same(PayloadSpec, PayloadFile)
    same(LoadSpec, LoadFile)


def _required(cls: type) -> dict:
    from dataclasses import MISSING

    return {f.name: ("p" if f.name == "name" else ("http://a:1",) if f.name in ("replicas", "models") else None)
            for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}


# ---------------------------------------------------------------- the leaf's listen: (the root's shape)
def test_leaf_listen_and_the_deprecated_flat_host_port(tmp_path, caplog):
    from leaf.config import load_config

    cfg = tmp_path / "leaf.yaml"
    cfg.write_text("listen: {host: 0.0.0.0, port: 9100}\n")
    with caplog.at_level(logging.WARNING, logger="leaf"):
        c = load_config(str(cfg))
    assert (c.host, c.port) == ("0.0.0.0", 9100) and not caplog.records
    cfg.write_text("port: 9101\n")
    with caplog.at_level(logging.WARNING, logger="leaf"):
        c = load_config(str(cfg))
    assert (c.host, c.port) == ("127.0.0.1", 9101)
    assert len(caplog.records) == 1 and "deprecated" in caplog.records[0].getMessage() \
        and "listen" in caplog.records[0].getMessage()
    cfg.write_text("listen: {port: 1}\nport: 2\n")
    with pytest.raises(ConfigError, match="both set"):
        load_config(str(cfg))
