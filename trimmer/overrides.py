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
from typing import Any

import yaml

from .errors import ConfigError

MODES = ("enforce", "shadow", "off")
_TOP_KEYS = {"defaults", "models"}
_DEFAULT_KEYS = {"mode"}
_MODEL_KEYS = {"mode", "default_version", "keep", "allowlist", "versions", "allow_extra_features"}
_VERSION_KEYS = {"mode", "keep", "allowlist", "allow_extra_features"}


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


def check_section(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """A config mapping (None -> {}) with no keys outside `allowed`; shared by every YAML config."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = sorted(str(k) for k in set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return obj


def _mode(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    if value not in MODES:
        raise ConfigError(f"{where}.mode: {value!r} is not one of {', '.join(MODES)}")
    return str(value)


def _flag(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false")
    return value


def _names(value: Any, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a list of non-empty feature names")
    return frozenset(value)


def parse_overrides(doc: Any, where: str = "allowlists.yaml") -> Overrides:
    doc = check_section(doc, _TOP_KEYS, where)
    defaults = check_section(doc.get("defaults"), _DEFAULT_KEYS, f"{where}: defaults")
    models: dict[str, ModelOverride] = {}
    raw_models = doc.get("models") or {}
    if not isinstance(raw_models, dict):
        raise ConfigError(f"{where}: models must be a mapping of model name to settings")
    for name, raw in raw_models.items():
        mw = f"{where}: models.{name}"
        raw = check_section(raw, _MODEL_KEYS, mw)
        versions: dict[str, VersionOverride] = {}
        raw_versions = raw.get("versions") or {}
        if not isinstance(raw_versions, dict):
            raise ConfigError(f"{mw}.versions: must be a mapping of version to settings")
        for version, vraw in raw_versions.items():
            vw = f"{mw}.versions.{version}"
            vraw = check_section(vraw, _VERSION_KEYS, vw)
            versions[str(version)] = VersionOverride(
                _mode(vraw.get("mode"), vw), _names(vraw.get("keep"), f"{vw}.keep") or frozenset(), _names(vraw.get("allowlist"), f"{vw}.allowlist"),
                _flag(vraw.get("allow_extra_features"), f"{vw}.allow_extra_features"),
            )
        dv = raw.get("default_version")
        models[str(name)] = ModelOverride(
            mode=_mode(raw.get("mode"), mw),
            default_version=None if dv is None else str(dv),
            keep=_names(raw.get("keep"), f"{mw}.keep") or frozenset(),
            allowlist=_names(raw.get("allowlist"), f"{mw}.allowlist"),
            versions=versions,
            allow_extra_features=_flag(raw.get("allow_extra_features"), f"{mw}.allow_extra_features"),
        )
    return Overrides(_mode(defaults.get("mode"), f"{where}: defaults") or "enforce", models)


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
