"""`trimmer inspect`, `trimmer bundle build`: the library's own commands (the benchmarks are loadtest's)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .bundle import build_bundle, read_bundle, write_bundle
from .repository import scan_repository
from .signature import Signature, read_signature


def spec_warnings(where: str, signature: Signature) -> list[str]:
    """Why a leaf may fail on this signature: inputs with no dtype/shape spec are converted by guess, and
    a torch.export model (fixed dtypes) then fails with a dtype mismatch at run time."""
    missing = [n for n in signature.input_names if n not in signature.inputs or signature.inputs[n].dtype is None]
    if not missing:
        return []
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    return [f"{where}: no dtype spec for input(s) {shown}: declare inputs.<name>.dtype (and shape) in "
            "module_info.json; the leaf guesses the dtype from the values sent, which torch.export models reject"]


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"trimmer inspect: warning: {line}", file=sys.stderr)


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        scan = scan_repository(path)
        _warn([w for (m, v), mv in sorted(scan.versions.items()) for w in spec_warnings(f"{m}/{v}", mv.signature)])
        out = {
            "models": {
                f"{m}/{v}": {"path": str(mv.path), **mv.signature.to_json()} for (m, v),
                mv in sorted(scan.versions.items())
            },
            "errors": {f"{m}/{v}": e for (m, v), e in sorted(scan.errors.items())},
        }
        print(json.dumps(out, indent=2))
        return 1 if scan.errors else 0
    if path.suffix == ".json":
        signatures, defaults = read_bundle(path)
        _warn([w for (m, v), sig in sorted(signatures.items()) for w in spec_warnings(f"{m}/{v}", sig)])
        out = {"models": {f"{m}/{v}": s.to_json() for (m, v), s in sorted(signatures.items())},
               "default_versions": defaults}
        print(json.dumps(out, indent=2))
        return 0
    signature = read_signature(path)
    _warn(spec_warnings(path.name, signature))
    print(json.dumps(signature.to_json(), indent=2))
    return 0


def _bundle_build(args: argparse.Namespace) -> int:
    bundle = build_bundle(args.repos)
    write_bundle(bundle, args.output)
    n = sum(len(m["versions"]) for m in bundle["models"].values())
    print(f"wrote {args.output}: {len(bundle['models'])} model(s), {n} version(s)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .configschema import register as register_config

    register_config(sub)  # `trimmer config schema KIND`
    p = sub.add_parser("inspect",
                       help="print a model archive's signature (or a repository's / bundle's allowlists) as JSON")
    p.add_argument("path", help="model.pt / model.pt2 archive, a model repository directory, or a bundle .json")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("bundle", help="build allowlist bundles from model repositories")
    bsub = p.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    b = bsub.add_parser("build", help="aggregate REPO... into one bundle.json")
    b.add_argument("repos", nargs="+", metavar="REPO")
    b.add_argument("-o", "--output", required=True, help="bundle file to write (atomically)")
    b.set_defaults(func=_bundle_build)


__all__ = ["register"]
