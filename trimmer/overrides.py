"""Per-model overrides from YAML: mode, extra `keep` features, explicit allowlists.

Precedence for the allowlist of (model, version), highest first:
  1. models.<m>.versions.<v>.allowlist   (explicit, this version)
  2. the version's signature from a bundle or repository
  3. models.<m>.allowlist                (explicit, any version; for models with no archive)
then `keep` (model-wide and per-version) is added on top. Mode: per-version >
per-model > defaults.mode > "enforce".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import msgspec
import yaml

from .configschema import Name, Section, convert
from .errors import ConfigError

MODES = ("enforce", "shadow", "off")
Mode = Union[Literal["enforce", "shadow", "off"], bool]  # YAML 1.1 reads a bare `off` as false
FeatureNames = Annotated[list[Name], msgspec.Meta(extra={"error": "must be a list of non-empty feature names"})]


# ---------------------------------------------------------------- the file (schema: docs/schema/overrides.json)
class VersionSpec(Section, frozen=True):
    """Settings for one version of a model; they win over the model's."""

    mode: Optional[Mode] = None  # enforce | shadow | off (a bare YAML off reads as false, meaning off)
    keep: FeatureNames = []  # features always forwarded, on top of the allowlist
    allowlist: Optional[FeatureNames] = None  # explicit allowlist for this version (wins over its signature)
    allow_extra_features: bool = False  # the allowlist may name features no known signature reads


class ModelSpec(Section, frozen=True):
    """Settings for one model (every version unless `versions` says otherwise)."""

    mode: Optional[Mode] = None  # enforce | shadow | off
    default_version: Union[str, int, None] = None  # the version a request without one gets
    keep: FeatureNames = []  # features always forwarded, every version
    allowlist: Optional[FeatureNames] = None  # explicit allowlist for versions without a signature
    versions: dict[str, VersionSpec] = {}  # version -> settings
    allow_extra_features: bool = False  # the allowlist may name features no known signature reads


class DefaultsSpec(Section, frozen=True):
    """Settings for every model without its own."""

    mode: Optional[Mode] = None  # mode of models without their own (default enforce)


class OverridesFile(Section, frozen=True):
    """Allowlist overrides (configs/allowlists.yaml): mode, extra `keep` features, explicit allowlists.
    docs/allowlists.md."""

    defaults: DefaultsSpec = msgspec.field(default_factory=DefaultsSpec)
    models: dict[str, ModelSpec] = {}  # model name -> settings


# ---------------------------------------------------------------- what the registry reads
@dataclass(frozen=True)
class VersionOverride:
    mode: str | None = None
    keep: frozenset[str] = frozenset()
    allowlist: frozenset[str] | None = None
    allow_extra_features: bool = False  # explicit allowlist may name features no known signature reads


@dataclass(frozen=True)
class ModelOverride:
    mode: str | None = None
    default_version: str | None = None
    keep: frozenset[str] = frozenset()
    allowlist: frozenset[str] | None = None
    versions: dict[str, VersionOverride] = field(default_factory=dict)
    allow_extra_features: bool = False


@dataclass(frozen=True)
class Overrides:
    default_mode: str = "enforce"
    models: dict[str, ModelOverride] = field(default_factory=dict)


def _mode(value: str | bool | None, where: str) -> str | None:
    if value is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    if value is True:
        raise ConfigError(f"{where}.mode: True is not one of {', '.join(MODES)}")
    return value


def _names(value: list[str] | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value)


def parse_overrides(doc: Any, where: str = "allowlists.yaml") -> Overrides:
    spec: OverridesFile = convert(doc, OverridesFile, where)
    models: dict[str, ModelOverride] = {}
    for name, m in spec.models.items():
        mw = f"{where}: models.{name}"
        versions = {v: VersionOverride(_mode(vs.mode, f"{mw}.versions.{v}"), frozenset(vs.keep),
                                       _names(vs.allowlist), vs.allow_extra_features)
                    for v, vs in m.versions.items()}
        models[name] = ModelOverride(_mode(m.mode, mw), None if m.default_version is None else str(m.default_version),
                                     frozenset(m.keep), _names(m.allowlist), versions, m.allow_extra_features)
    return Overrides(_mode(spec.defaults.mode, f"{where}: defaults") or "enforce", models)


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file; every failure becomes a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None


def load_overrides(path: str | os.PathLike[str]) -> Overrides:
    return parse_overrides(load_yaml(path), str(path))
