"""The `trimmer` console script. Each package registers its own subcommands.

Subcommand modules must not import heavy dependencies (torch) at import time:
`trimmer inspect` and `trimmer root` never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import TrimmerError

SUBCOMMAND_MODULES = ("trimmer.cli_core", "leaf.cli", "root.cli", "loadtest.cli")

# Modules only an extra installs (pyproject.toml): a command that needs one says which extra, in one line.
OPTIONAL_MODULES = {"torch": "leaf", "rich": "loadtest", "matplotlib": "loadtest", "hdrh": "loadtest", "psutil": "loadtest"}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("feature-trimmer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimmer", description="Send what you use: per-model feature trimming for ML serving.")
    parser.add_argument("--version", action="version", version=f"trimmer (feature-trimmer) {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # that package is not installed: its subcommands are absent
            raise
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
