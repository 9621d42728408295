"""The `trimmer` console script: a dispatcher that knows no service by name.

`trimmer` is the library at the bottom of the project; root, leaf and loadtest build on it, so it must not
import them (tests/test_layering.py). The commands therefore come to the dispatcher: every top-level package
installed with this distribution that has a `cli` module with `register(sub)` adds its subcommands
(`root.cli` adds `trimmer root` and `trimmer drift`, `loadtest.cli` adds `trimmer loadtest`, `demo` and the
benchmarks). A package left out of an install simply has no commands. The packages come from the
distribution's metadata (top_level.txt, else RECORD), or, in a source tree that was never installed, from the
folders beside this package. A package's `ORDER` places its commands in `trimmer --help`.

Subcommand modules must not import heavy dependencies (torch) at import time:
`trimmer inspect` and `trimmer root` never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from .errors import TrimmerError

DISTRIBUTION = "feature-trimmer"
COMMANDS_MODULE = "cli"  # <package>.cli: register(sub) adds that package's subcommands

# Modules only an extra installs (pyproject.toml): a command that needs one says which extra, in one line.
OPTIONAL_MODULES = {"torch": "leaf", "rich": "loadtest", "matplotlib": "loadtest",
                    "hdrh": "loadtest", "psutil": "loadtest"}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _packages() -> list[str]:
    """Top-level packages installed with this distribution, other than this one."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree that was never installed: its packages lie beside this one
        here = Path(__file__).resolve().parent
        names = {d.name for d in here.parent.iterdir() if (d / "__init__.py").is_file()
                 and (d / f"{COMMANDS_MODULE}.py").is_file()}
    else:
        top = dist.read_text("top_level.txt")
        names = set(top.split()) if top else {
            f.parts[0] for f in dist.files or () if len(f.parts) == 2 and f.name == "__init__.py"}
    return sorted(n for n in names if n.isidentifier() and n != __package__)


def command_modules() -> list[ModuleType]:
    """Each package's `cli` module, in their declared ORDER (a module may add actions to another's command,
    as loadtest adds `trimmer root bench`, so it comes after that one)."""
    modules = []
    for package in _packages():
        name = f"{package}.{COMMANDS_MODULE}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # that package (or its cli module) is not installed: its subcommands are absent
            raise
        if callable(getattr(module, "register", None)):
            modules.append(module)
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def actions(parser: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:
    """The ACTION sub-parsers of a command (`trimmer root ACTION`), made on first use, so that one package can
    add an action to a command another package owns (loadtest adds `trimmer root bench` and `trimmer leaf bench`)."""
    for action in parser._actions:  # argparse keeps no public handle on an existing sub-parsers action
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=dest, metavar="ACTION")


def build_parser() -> argparse.ArgumentParser:
    from . import cli_core

    parser = argparse.ArgumentParser(prog="trimmer",
                                     description="Send what you use: per-model feature trimming for ML serving.")
    parser.add_argument("--version", action="version", version=f"trimmer (feature-trimmer) {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_core.register(sub)
    for module in command_modules():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TrimmerError as exc:
        print(f"trimmer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_MODULES.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"trimmer {args.command}: error: needs {exc.name!r}, which the base install leaves out; "
              f"pip install 'feature-trimmer[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trimmer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
