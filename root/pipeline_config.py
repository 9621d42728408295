"""The `pipelines:` section of the root config: declarative multi-stage requests (root/pipeline.py).

A pipeline is an ordered list of stages, each one model call. A stage's request is the client's features
plus, under the names its `inputs` gives, named outputs of earlier stages; the data plane then trims it to the
stage model's allowlist like any other request. Kept apart from root/config.py (which only calls
`build_pipelines`) so the section has one home and root/config.py stays small. The shape is declared by
`PipelineSpec` (msgspec, trimmer/configschema.py); `build_pipelines` adds the rules that need the rest of the
config (a stage's model must route to a native partition) or the order of stages (inputs name earlier ones).

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
from typing import Annotated, Callable, Union

import msgspec

from trimmer.configschema import Name, Section
from trimmer.errors import ConfigError
from trimmer.names import valid_name

MAX_STAGES = 16


class StageSpec(Section, frozen=True):
    """One stage: a model call. `inputs` maps a feature name of this stage to `<earlier stage>.<output>`."""

    model: Name  # the model this stage calls
    name: Union[Name, None] = None  # how later stages and the response refer to it; default: the model name
    version: Union[str, int, None] = None  # default: the model's default version
    inputs: Annotated[dict[str, str],
                      msgspec.Meta(extra={"error": "must map a feature name to '<earlier stage>.<output>'"})] = {}


class PipelineSpec(Section, frozen=True):
    """A multi-stage request: POST /v1/pipelines/{name}/score runs the stages in order (root/pipeline.py)."""

    stages: Annotated[list[Union[Name, StageSpec]], msgspec.Meta(min_length=1, max_length=MAX_STAGES)]


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


def _name(value: str, where: str) -> str:
    if not valid_name(value):
        raise ConfigError(f"{where}: must be a name (letters, digits, '_', '-', '.'), got {value!r}")
    return value


def build_pipelines(specs: dict[str, PipelineSpec], path: str, route: Callable[[str], str | None],
                    protocol_of: Callable[[str], str]) -> dict[str, PipelineConfig]:
    """The checks the schema cannot make. `route(model)`: the partition a model goes to (None: unroutable, per models /
    unknown_models); `protocol_of(partition)`: stages call the native score route, so OIP partitions are refused."""
    out: dict[str, PipelineConfig] = {}
    for pname, spec in specs.items():
        w = f"{path}: pipelines.{pname}"
        _name(pname, w)
        stages: list[StageConfig] = []
        for i, st in enumerate(spec.stages):
            sw = f"{w}.stages[{i}]"
            st = StageSpec(model=st) if isinstance(st, str) else st
            model = _name(st.model, f"{sw}.model")
            part = route(model)
            if part is None:
                raise ConfigError(f"{sw}.model: {model!r} is not in models (and unknown_models.policy is reject)")
            if protocol_of(part) != "native":
                raise ConfigError(f"{sw}.model: {model!r} routes to partition {part!r}, which speaks the Open "
                                  "Inference "
                                  f"Protocol; pipeline stages need native partitions")
            sname = _name(st.name or model, f"{sw}.name")
            if any(s.name == sname for s in stages):
                raise ConfigError(f"{sw}.name: stage {sname!r} appears twice; give one a 'name'")
            version = None if st.version is None else _name(str(st.version), f"{sw}.version")
            if i == 0 and st.inputs:
                raise ConfigError(f"{sw}.inputs: the first stage reads the client's features only")
            inputs = []
            for feat, ref in st.inputs.items():
                feat = _name(feat, f"{sw}.inputs key")
                if "." not in ref:
                    raise ConfigError(f"{sw}.inputs.{feat}: must be '<earlier stage>.<output>', got {ref!r}")
                # names may hold dots: the longest earlier stage name that prefixes the reference wins
                src = max((s.name for s in stages if ref.startswith(s.name + ".")), key=len, default=None)
                if src is None:
                    raise ConfigError(f"{sw}.inputs.{feat}: {ref!r} names no earlier stage; earlier: "
                                      f"{', '.join(s.name for s in stages)}")
                inputs.append((feat, src, _name(ref[len(src) + 1:], f"{sw}.inputs.{feat} output")))
            stages.append(StageConfig(sname, model, version, tuple(inputs)))
        out[pname] = PipelineConfig(pname, tuple(stages))
    return out
