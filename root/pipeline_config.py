"""The `pipelines:` section of the root config: declarative multi-stage requests (root/pipeline.py).

A pipeline is an ordered list of stages, each one model call. A stage's request is the client's features
plus, under the names its `inputs` gives, named outputs of earlier stages; the Router then trims it to the
stage model's allowlist like any other request. Kept apart from root/config.py (which only calls
`parse_pipelines`) so the section has one home and root/config.py stays small.

    pipelines:
      feed:
        stages:
          - model: retrieval
          - model: item_features
            inputs: {cand_item_id: retrieval.item_ids}
          - model: ranker
            inputs: {cand_item_id: retrieval.item_ids, cand_emb: item_features.cand_emb, ...}
          - model: diversifier
            inputs: {cand_score: ranker.score, cand_emb: item_features.cand_emb}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from trimmer.errors import ConfigError
from trimmer.names import valid_name

_PIPELINE = {"stages"}
_STAGE = {"model", "name", "version", "inputs"}
MAX_STAGES = 16


@dataclass(frozen=True)
class StageConfig:
    name: str  # how later stages and the response refer to this stage (default: the model name)
    model: str
    version: str | None
    inputs: tuple[tuple[str, str, str], ...]  # (feature name of this stage, earlier stage name, output name)


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    stages: tuple[StageConfig, ...]


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or not valid_name(value):
        raise ConfigError(f"{where}: must be a name (letters, digits, '_', '-', '.'), got {value!r}")
    return value


def parse_pipelines(raw: Any, path: str, route: Callable[[str], str | None], protocol_of: Callable[[str], str]) -> dict[str, PipelineConfig]:
    """Validate the section. `route(model)`: the partition a model goes to (None: unroutable, per models /
    unknown_models); `protocol_of(partition)`: stages call the native score route, so OIP partitions are refused."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: pipelines: must be a mapping of pipeline name to {{stages: [...]}}")
    out: dict[str, PipelineConfig] = {}
    for pname, body in raw.items():
        w = f"{path}: pipelines.{pname}"
        pname = _name(pname, w)
        if not isinstance(body, dict):
            raise ConfigError(f"{w}: must be a mapping with a 'stages' list")
        unknown = sorted(set(body) - _PIPELINE)
        if unknown:
            raise ConfigError(f"{w}: unknown key(s) {', '.join(map(str, unknown))}; allowed: stages")
        raw_stages = body.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise ConfigError(f"{w}.stages: must be a non-empty list")
        if len(raw_stages) > MAX_STAGES:
            raise ConfigError(f"{w}.stages: at most {MAX_STAGES} stages, got {len(raw_stages)}")
        stages: list[StageConfig] = []
        outputs_of: set[str] = set()
        for i, st in enumerate(raw_stages):
            sw = f"{w}.stages[{i}]"
            if isinstance(st, str):
                st = {"model": st}
            if not isinstance(st, dict):
                raise ConfigError(f"{sw}: must be a mapping with 'model' (and optional name, version, inputs)")
            unknown = sorted(set(st) - _STAGE)
            if unknown:
                raise ConfigError(f"{sw}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(_STAGE))}")
            model = _name(st.get("model"), f"{sw}.model")
            part = route(model)
            if part is None:
                raise ConfigError(f"{sw}.model: {model!r} is not in models (and unknown_models.policy is reject)")
            if protocol_of(part) != "native":
                raise ConfigError(f"{sw}.model: {model!r} routes to partition {part!r}, which speaks the Open Inference "
                                  f"Protocol; pipeline stages need native partitions")
            sname = _name(st.get("name", model), f"{sw}.name")
            if sname in outputs_of:
                raise ConfigError(f"{sw}.name: stage {sname!r} appears twice; give one a 'name'")
            version = st.get("version")
            if version is not None:
                if isinstance(version, bool) or not isinstance(version, (str, int)):
                    raise ConfigError(f"{sw}.version: must be a string, got {version!r}")
                version = _name(str(version), f"{sw}.version")
            inputs_raw = st.get("inputs") or {}
            if not isinstance(inputs_raw, dict):
                raise ConfigError(f"{sw}.inputs: must map a feature name to '<earlier stage>.<output>'")
            if i == 0 and inputs_raw:
                raise ConfigError(f"{sw}.inputs: the first stage reads the client's features only")
            inputs = []
            for feat, ref in inputs_raw.items():
                feat = _name(feat, f"{sw}.inputs key")
                if not isinstance(ref, str) or "." not in ref:
                    raise ConfigError(f"{sw}.inputs.{feat}: must be '<earlier stage>.<output>', got {ref!r}")
                # names may hold dots: the longest earlier stage name that prefixes the reference wins
                src = max((s.name for s in stages if ref.startswith(s.name + ".")), key=len, default=None)
                if src is None:
                    raise ConfigError(f"{sw}.inputs.{feat}: {ref!r} names no earlier stage; earlier: {', '.join(s.name for s in stages)}")
                inputs.append((feat, src, _name(ref[len(src) + 1:], f"{sw}.inputs.{feat} output")))
            stages.append(StageConfig(sname, model, version, tuple(inputs)))
            outputs_of.add(sname)
        out[pname] = PipelineConfig(pname, tuple(stages))
    return out
