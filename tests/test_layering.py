"""The import direction between the packages, and torch kept out of the root and the library.

Layers, bottom up: `trimmer` (the library) imports none of the others; `root` and `leaf` build on
`trimmer` only, never on each other; `loadtest` (load test, benchmarks, stand-in upstream) and a
top-level `bench` package, if one appears, may use all three. Imports are read with `ast` from every .py
file of the packages (absolute and relative imports, and `importlib.import_module` / `__import__` with a
literal name), so a violation anywhere in a module, a function body included, fails the test. The checker
is also run on planted violations, so the test can fail.

The root and the library never import torch: a fresh interpreter imports every module under `trimmer/`
and `root/` and must not have loaded it; the same probe with `leaf` added must (a control that the probe sees
torch at all).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("trimmer", "root", "leaf", "loadtest", "bench")
ALLOWED = {
    "trimmer": {"trimmer"},
    "root": {"root", "trimmer"},
    "leaf": {"leaf", "trimmer"},
    "loadtest": {"loadtest", "bench", "trimmer", "root", "leaf"},
    "bench": {"bench", "loadtest", "trimmer", "root", "leaf"},
}


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in a module named `module`."""
    here = module.split(".") if is_package else module.split(".")[:-1]  # the package a relative import starts from
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level - 1 <= len(here) else []
                name = ".".join([*base, *([node.module] if node.module else [])]) or "."
            else:
                name = node.module or ""
            out.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
            node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def layering_violations(root: Path) -> list[str]:
    """'path:line: package imports module' for each import against the layering, over the packages under `root`."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            is_package = path.name == "__init__.py"
            module = ".".join(rel.parent.parts if is_package else (*rel.parent.parts, path.stem))
            for line, name in _imported(ast.parse(path.read_text(), str(path)), module, is_package):
                top = name.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[package]:
                    found.append(f"{rel}:{line}: {package} imports {name}")
    return found


def test_packages_import_downwards_only() -> None:
    assert layering_violations(REPO) == []


def test_the_checker_finds_planted_violations(tmp_path: Path) -> None:
    files = {
        "trimmer/__init__.py": "",
        "trimmer/bad.py": "import os\nfrom root import app\n\ndef f():\n    import loadtest.procs\n",
        "trimmer/dynamic.py": "import importlib\nimportlib.import_module('leaf.cli')\n",
        "trimmer/ok.py": "from . import bad\nfrom .bad import f\nimport trimmer.errors\n",
        "root/__init__.py": "",
        "root/cross.py": "from leaf.models import Models\n",
        "root/up.py": "from loadtest.sink import build_app\n",
        "root/ok.py": "from trimmer.codec import encode_msgpack\nfrom .cross import Models\n",
        "leaf/__init__.py": "",
        "leaf/sub/__init__.py": "from ...root import cli\n",
        "leaf/sub/ok.py": "from .. import cli\nfrom trimmer import errors\n",
        "loadtest/__init__.py": "",
        "loadtest/ok.py": "import root.app\nimport leaf.models\nfrom trimmer import trim\nfrom bench import x\n",
        "bench/__init__.py": "from loadtest import procs\nfrom root import sink\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(layering_violations(tmp_path)) == sorted([
        "trimmer/bad.py:2: trimmer imports root",
        "trimmer/bad.py:5: trimmer imports loadtest.procs",
        "trimmer/dynamic.py:2: trimmer imports leaf.cli",
        "root/cross.py:1: root imports leaf.models",
        "root/up.py:1: root imports loadtest.sink",
        "leaf/sub/__init__.py:1: leaf imports root",
    ])


_PROBE = """
import importlib, json, pkgutil, sys
names = []
for top in sys.argv[1:]:
    pkg = importlib.import_module(top)
    for m in pkgutil.walk_packages(pkg.__path__, top + "."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
            names.append(m.name)
print(json.dumps({"modules": names, "torch": "torch" in sys.modules}))
"""


def _probe(*packages: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, *packages], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_root_and_trimmer_never_import_torch() -> None:
    out = _probe("trimmer", "root")
    assert {"trimmer.trim", "trimmer.cli", "root.app", "root.dataplane",
            "root.front", "root.cli"} <= set(out["modules"])
    assert out["torch"] is False
    # The control: the probe does see torch once a package that needs it is imported.
    assert _probe("trimmer", "root", "leaf")["torch"] is True


def test_every_command_is_still_wired() -> None:
    """The dispatcher names no service, so each package must bring its own commands: all of them, where users know
    them."""
    import argparse

    from trimmer.cli import build_parser

    def actions(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(subs[0].choices) if subs else {}

    top = actions(build_parser())
    assert list(top) == ["config", "inspect", "bundle", "leaf", "root", "drift", "loadtest", "demo", "bench"]
    assert list(actions(top["config"])) == ["schema"]
    assert list(actions(top["bundle"])) == ["build"]
    assert list(actions(top["bench"])) == ["trim"]
    assert list(actions(top["root"])) == ["bench"]
    assert list(actions(top["leaf"])) == ["build-demo", "bench"]
