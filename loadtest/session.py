"""One load test session with a terminal UI: progress bar, matrix, report, table.

Shared by `trimmer loadtest` and `trimmer demo` so both print the same table
and write the same report files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .config import LoadtestConfig
from .matrix import run_matrix
from .report import rich_table, write_report


def usable_link_rates(link_rates: tuple[str, ...], console: Console, notes: list[str]) -> tuple[str, ...]:
    """The link rates that can be measured here; otherwise one clear line and none."""
    if not link_rates:
        return ()
    from .netns import unavailable_reason

    why = unavailable_reason()
    if why:
        line = f"link-rate {', '.join(link_rates)}: skipped ({why})"
        console.print(f"[yellow]{line}[/yellow]")
        notes.append(line)
        return ()
    return link_rates


def run_and_report(cfg: LoadtestConfig, out: Path, link_rates: tuple[str, ...] = (), plots: bool = True,
                   console: Console | None = None) -> int:
    console = console or Console()
    if not console.is_terminal and console.width < 120:
        console = Console(width=120)  # piped output (make demo | tee): keep the table on one line per row
    notes: list[str] = []
    rates = usable_link_rates(link_rates, console, notes)
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        def factory(label: str):
            task = progress.add_task(label, total=1.0)
            return lambda frac: progress.update(task, completed=frac)

        report: dict[str, Any] = run_matrix(cfg, out, factory, rates, notes)
    for r in report["scenarios"]:
        if r.get("errors"):
            what = ", ".join(f"{n} x {k}" for k, n in r["errors"].items())
            report["notes"].append(f"{r['scenario']}{' @ ' + r['link_rate'] if r.get('link_rate') else ''}: "
                                   f"{what} failed requests (logs in {out / 'logs'})")
    files = write_report(report, out, with_plots=plots)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(rich_table(report))
    bad = [r["scenario"] for r in report["scenarios"] if not (r.get("crosscheck") or {}).get("ok")]
    if bad:
        console.print(f"[red]relay bytes and the root's metrics disagree by more than 1 % for: {', '.join(bad)}[/red]")
    console.print(f"report: {files['md']} (and report.json, plots) in {out}")
    return 1 if bad else 0
