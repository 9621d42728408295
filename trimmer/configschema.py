"""Declarative YAML configs: msgspec Structs are the schema, `convert` turns a loaded document into them.

Every config (root, leaf, load test, allowlist overrides) is a tree of `Section` Structs with
`forbid_unknown_fields`; msgspec checks the types, ranges and choices, and `msgspec.json.schema` turns the same
classes into the JSON Schema editors read (`trimmer config schema`, docs/schema/*.json). What msgspec cannot
give is the error a person needs, so `convert` walks the document beside the type itself, down to the leaves:

* the path names real keys (`partitions.mine.replicas[0]`; msgspec says `$.partitions[...]`),
* an unknown key lists every unknown key and the allowed ones (`unknown key(s) replica; allowed: ...`),
* a bad value says what it got (`workers: expected int >= 1, got 0`), a bad choice lists the choices,
* `null` for a key whose type has no null means "the default", as the hand-written validators had it.

Leaves (scalars, enums, ranges) are converted by msgspec itself, one value at a time, so the checks are its own.
Cross-field rules (a model's partition must exist, ...) stay small explicit functions in each config module.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

from .errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=0, le=65535, description="TCP port 0..65535 (0: any free port)")]
Host = Annotated[str,
                 msgspec.Meta(min_length=1, description="bind address; 127.0.0.1 (loopback) unless set deliberately")]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1)]


class Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A mapping in a YAML config: unknown keys are an error, every key has a default unless required."""


def _strip(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    metas: list[msgspec.Meta] = []
    while get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        metas += [m for m in extra if isinstance(m, msgspec.Meta)]
    return tp, metas


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _branches(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def _admits_none(tp: Any) -> bool:
    return any(_strip(b)[0] is type(None) for b in _branches(_strip(tp)[0]))


def _at(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)


def _fail(where: str, path: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _container(tp: Any, obj: Any) -> Any:
    """The branch of a union a mapping or list goes down (msgspec allows one of each), else None."""
    for b in _branches(tp):
        inner = _strip(b)[0]
        if isinstance(obj, dict) and (_is_struct(inner) or get_origin(inner) is dict):
            return b
        if isinstance(obj, list) and get_origin(inner) in (list, tuple):
            return b
    return None


def _convert(obj: Any, tp: Any, where: str, path: str) -> Any:
    inner, metas = _strip(tp)
    if obj is None and any(_is_struct(_strip(b)[0]) for b in _branches(inner)):
        obj = {}  # an empty section (`listen:` with nothing under it): all defaults
    branch = _container(inner, obj)
    if branch is None:
        return _leaf(obj, tp, where, path)
    if get_origin(inner) in (Union, types.UnionType):
        return _convert(obj, branch, where, path)
    lengths = [m for m in metas if m.min_length is not None or m.max_length is not None]
    for m in lengths:
        kind = "mapping" if isinstance(obj, dict) else "list"
        if m.min_length and len(obj) < m.min_length:
            raise _fail(where, path,
                        f"must be a non-empty {kind}" if m.min_length == 1 else f"needs at least {m.min_length} items")
        if m.max_length is not None and len(obj) > m.max_length:
            raise _fail(where, path, f"at most {m.max_length} items, got {len(obj)}")
    if _is_struct(inner):
        fields = {f.encode_name: f for f in msgspec.structs.fields(inner)}
        unknown = sorted(str(k) for k in obj if str(k) not in fields)
        if unknown:
            raise _fail(where, path, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
        out = {}
        for key, value in obj.items():
            f = fields[str(key)]
            if value is None and not _admits_none(f.type):
                continue  # null: the default
            out[f.name] = _convert(value, f.type, where, _at(path, str(key)))
        missing = [n for n, f in fields.items() if f.required and f.name not in out]
        if missing:
            raise _fail(where, _at(path, missing[0]), "required")
        try:
            return inner(**out)
        except (ValueError, TypeError) as exc:  # a Struct's own __post_init__ check
            raise _fail(where, path, str(exc)) from None
    args = get_args(inner)
    if get_origin(inner) is dict:
        return {_leaf(str(k), args[0], where, _at(path, str(k))): _convert(v, args[1], where, _at(path, str(k)))
                for k, v in obj.items()}
    items = [_convert(v, args[0], where, _at(path, i)) for i, v in enumerate(obj)]
    return tuple(items) if get_origin(inner) is tuple else items


def _choices(tp: Any) -> list[str] | None:
    inner = _strip(tp)[0]
    lits = [a for b in _branches(inner) if get_origin(_strip(b)[0]) is Literal for a in get_args(_strip(b)[0])]
    return [str(a) for a in lits] or None


_WORDS = {"object": "a mapping", "array": "a list", "str": "a string", "int": "an integer", "float": "a number",
          "bool": "true or false", "null": "null"}


def _show(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _leaf(obj: Any, tp: Any, where: str, path: str) -> Any:
    try:
        return msgspec.convert(obj, tp)
    except msgspec.ValidationError as exc:
        text = str(exc).split(" - at ")[0]
        hint = next((m.extra["error"] for m in _strip(tp)[1] if m.extra and "error" in m.extra), None)
        # the type's own words, e.g. Meta(extra={"error": "must be a list of feature names"}); {value}: the value
        if hint:
            raise _fail(where, path,
                        hint.format(value=obj) if "{value" in hint else f"{hint}, got {_show(obj)}") from None
        choices = _choices(tp)
        if choices and text.startswith("Invalid enum value"):
            raise _fail(where, path, f"{_show(obj)} is not one of {', '.join(choices)}") from None
        mismatch = re.fullmatch(r"Expected `(.+?)`, got `.+?`", text)
        if mismatch:  # a wrong type: say it in YAML's words
            wanted = " or ".join(_WORDS.get(w, w) for w in mismatch.group(1).split(" | "))
            raise _fail(where, path, f"expected {wanted}, got {_show(obj)}") from None
        text = re.sub(r"`(\w+)`", lambda m: _WORDS.get(m.group(1), m.group(1)), text).replace("Expected ", "expected ")
        raise _fail(where, path, f"{text}, got {_show(obj)}") from None


def convert(doc: Any, tp: type[msgspec.Struct], where: str) -> Any:
    """The document as `tp`, or a one-line ConfigError `where: key.path: what is wrong`. A null document: all
    defaults."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: must be a mapping")
    return _convert(doc, tp, where, "")


def defaults(tp: type[msgspec.Struct]) -> dict[str, Any]:
    """A Struct's field defaults by name (for runtime classes that keep their own constructor defaults)."""
    out = {}
    for f in msgspec.structs.fields(tp):
        if f.default is not msgspec.NODEFAULT:
            out[f.name] = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            out[f.name] = f.default_factory()
    return out


# ------------------------------------------------------------------ JSON Schema: `trimmer config schema KIND`

SCHEMAS = {  # kind -> (module, top-level Struct); imported lazily so `trimmer` never pulls in torch
    "root": ("root.config", "RootFile"),
    "leaf": ("leaf.config", "LeafFile"),
    "loadtest": ("loadtest.config", "LoadtestFile"),
    "overrides": ("trimmer.overrides", "OverridesFile"),
}


def _field_comments(cls: type) -> dict[str, str]:
    """A Struct field's comment -> its description: the code's comments are the docs. The comment is the one that
    ends the field's first or last line (`name: type = default  # this text`), else the comment line(s) just above."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # line number -> comment text
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        tree = ast.parse(source)
    except (tokenize.TokenError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    src_lines = source.splitlines()
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = comments.get(node.lineno) or comments.get(node.end_lineno or node.lineno)
        if text is None:  # comment lines right above the field
            above: list[str] = []
            n = node.lineno - 1
            while n in comments and src_lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            text = " ".join(above) or None
        if text and not text.startswith("type:"):
            out[node.target.id] = text
    return out


def _structs(tp: Any, seen: dict[str, type]) -> dict[str, type]:
    inner = _strip(tp)[0]
    if _is_struct(inner) and inner.__name__ not in seen:
        seen[inner.__name__] = inner
        for f in msgspec.structs.fields(inner):
            _structs(f.type, seen)
    for arg in get_args(inner):
        _structs(arg, seen)
    return seen


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one config kind, as committed under docs/schema/<kind>.json."""
    module, name = SCHEMAS[kind]
    top = getattr(importlib.import_module(module), name)
    schema = msgspec.json.schema(top)
    for cname, cls in _structs(top, {}).items():
        props = schema["$defs"].get(cname, {}).get("properties", {})
        for field_name, text in _field_comments(cls).items():
            if field_name in props and "description" not in props[field_name]:
                props[field_name]["description"] = text
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"trimmer {kind} config", **schema}


def schema_text(kind: str) -> str:
    return json.dumps(json_schema(kind), indent=2, sort_keys=True) + "\n"


def _schema_cmd(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text(args.kind))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="config tools: `config schema KIND` prints a config's JSON Schema (for editors)")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    s = csub.add_parser("schema", help="print the JSON Schema of a YAML config (docs/schema/KIND.json)")
    s.add_argument("kind", nargs="?", choices=sorted(SCHEMAS), default="root", help="which config (default root)")
    s.set_defaults(func=_schema_cmd)
