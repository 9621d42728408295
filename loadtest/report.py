"""report.json (every figure), report.md, PNG plots and the terminal table.

Each scenario row is a plain dict (built by loadtest.matrix); this module only
derives the comparative figures (saved % against the passthrough baseline of
the same link rate) and renders them, so the same report can be re-rendered
from report.json alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

BASELINE = "passthrough"


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Fill `saved_pct` (wire bytes per request vs passthrough at the same link rate) in place."""
    base = {r.get("link_rate"): r for r in rows if r["scenario"] == BASELINE}
    for r in rows:
        b = base.get(r.get("link_rate"))
        bpr = r.get("wire_bytes_per_request")
        if b is None or not b.get("wire_bytes_per_request") or bpr is None:
            r["saved_pct"] = None
        else:
            r["saved_pct"] = round(100.0 * (1.0 - bpr / b["wire_bytes_per_request"]), 2)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f} B"


def _fmt(x: Any, spec: str, suffix: str = "") -> str:
    x = _num(x)
    return "-" if x is None else f"{format(x, spec)}{suffix}"


COLUMNS = ("scenario", "link", "bytes/req", "saved", "x min", "p50 ms", "p99 ms", "req/s",
           "CPU s/1k", "err", "relay vs root")
AUDIT_COLUMN = "audit"


def audit_cell(r: dict[str, Any]) -> str:
    """`-` without audits; else `ok 0/N` or `MISMATCH m/N` (mismatches over audits run), `+e err` when some failed."""
    a = r.get("audit")
    if not a or not a.get("run"):
        return "none run" if a and r.get("mode") == "enforce" else "-"  # audits only sample trimmed (enforce) requests
    cell = f"{'MISMATCH' if a.get('mismatches') else 'ok'} {a.get('mismatches', 0)}/{a['run']}"
    return cell + (f" +{a['errors']} err" if a.get("errors") else "")


def columns(report: dict[str, Any]) -> tuple[str, ...]:
    """The table's columns: `audit` only when some scenario's root had audit_sample_rate > 0."""
    return COLUMNS + ((AUDIT_COLUMN,) if any(r.get("audit") for r in report.get("scenarios", [])) else ())


def row_cells(r: dict[str, Any]) -> list[str]:
    lat = r.get("latency_ms", {})
    errors = sum((r.get("errors") or {}).values())
    cc = r.get("crosscheck") or {}
    check = "-" if cc.get(
        "agreement_pct") is None else f"{'ok' if cc.get('ok') else 'MISMATCH'} {cc['agreement_pct']:.2f} %"
    return [
        r["scenario"], r.get("link_rate") or "loopback", _fmt_bytes(r.get("wire_bytes_per_request")),
        _fmt(r.get("saved_pct"), ".1f", " %"), _fmt(r.get("ratio_to_min"), ".2f", "x"),
        _fmt(lat.get("p50"), ".2f"), _fmt(lat.get("p99"), ".2f"),
        _fmt(r.get("achieved_rate"), ".1f"), _fmt(r.get("root_cpu_s_per_1k"), ".2f"), str(errors), check,
    ]


def cells(r: dict[str, Any], cols: Sequence[str]) -> list[str]:
    out = row_cells(r)
    return out + [audit_cell(r)] if AUDIT_COLUMN in cols else out


def rich_table(report: dict[str, Any]) -> Table:
    profile = report.get("payload", {}).get("profile", "random")
    t = Table(
        title=f"root -> leaf bytes, latency and root CPU by mode ({profile} feature values)", title_justify="left")
    cols = columns(report)
    for c in cols:
        t.add_column(
            c, justify="left" if c in ("scenario", "link", "relay vs root", AUDIT_COLUMN) else "right", no_wrap=True)
    for r in report["scenarios"]:
        t.add_row(*cells(r, cols))
    return t


def markdown(report: dict[str, Any]) -> str:
    p = report.get("payload", {})
    cols = columns(report)
    lines = [
        "# Load test report", "",
        f"Generated {report.get('generated')} from `{report.get('config')}`. "
        f"Load: {report.get('load', {}).get('mode')} loop, "
        + (f"{report['load']['rate']:g} req/s target" if report.get("load", {}).get("mode") == "open"
           else f"concurrency {report.get('load', {}).get('concurrency')}")
        + f", {report.get('load', {}).get('duration_s')} s measured after {report.get('load', {}).get('warmup_s')} s "
          "warm-up.", "",
        f"Payload: {p.get('features')} features ({p.get('used')} used by the target models, usage ratio "
        f"{p.get('usage_ratio')}), {p.get('candidates')} candidates, {p.get('profile', 'random')} values, "
        f"{_fmt_bytes(p.get('body_bytes'))} per "
        f"request; minimum (kept features only) {_fmt_bytes(p.get('min_bytes'))}. Targets: "
        f"{', '.join(report.get('models', []))}.", "",
        "Bytes are counted by a TCP relay between the root and the leaf (HTTP framing included, load requests only); "
        "`x min` is wire bytes per request over the bytes of the request with only the kept features; "
        "`relay vs root` compares the relay's body bytes with the root's `trimmer_root_upstream_sent_bytes` metric "
        "(agreement within 1 % required); `CPU s/1k` is the root process's CPU seconds per 1,000 requests.", "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(cells(r, cols)) + " |" for r in report["scenarios"]]
    audited = [
        r for r in report["scenarios"] if r.get("audit") and (r["audit"].get("run") or r.get("mode") == "enforce")]
    if audited:
        lines += ["", "## Equivalence audit", "",
                  "A sampled share of trimmed requests was also sent untrimmed to the same leaf and the outputs "
                  "compared bit for bit (root `audit_sample_rate`). A mismatch means the allowlist dropped a feature "
                  "the model reads; near matches differ only in float noise within `audit_tolerance`. Audit copies are "
                  "left out of bytes/req.", "",
                  "| scenario | sample rate | run | matches | near matches | mismatches | errors | dropped |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in audited:
            a = r["audit"]
            lines.append(f"| {r['scenario']} | {a.get('sample_rate')} | {a.get('run', 0)} | {a.get('matches', 0)} | "
                         f"{a.get('near_matches', 0)} "
                         f"| {a.get('mismatches', 0)} | {a.get('errors', 0)} | {a.get('dropped', 0)} |")
    rss_rows = [r for r in report["scenarios"] if r.get("rss")]
    if rss_rows:
        lines += ["", "## Memory (RSS, sampled while under load)", "",
                  "`after warm-up` is the first sample after load.warmup_s; `flat` means the end is within "
                  f"{rss_rows[0]['rss'].get('flat_pct', 10.0):g} % of it.", "",
                  "| scenario | process | start MB | after warm-up MB | end MB | max MB | growth MB | growth % "
                  "| flat |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rss_rows:
            for proc in ("root", "leaf"):
                m = r["rss"].get(proc)
                if m:
                    flat = "—" if "flat" not in m else ("yes" if m["flat"] else "**NO**")
                    lines.append(f"| {r['scenario']} | {proc} | {m['start_mb']} | {m.get('baseline_mb', '—')} | "
                                 f"{m['end_mb']} | {m['max_mb']} "
                                 f"| {m['growth_mb']} | {m.get('growth_pct', '—')} | {flat} |")
    for note in report.get("notes", []):
        lines += ["", f"> {note}"]
    plots = report.get("plots", [])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """bytes per request by mode, latency percentiles by mode, req/s vs link rate (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["scenarios"] if not r.get("link_rate")] or report["scenarios"]
    names = [r["scenario"] for r in rows]
    written: list[str] = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    vals = [(r.get("wire_bytes_per_request") or 0) / 1e3 for r in rows]
    bars = ax.bar(names, vals, color=["#888" if n == BASELINE else "#2a7" if "trim" in n else "#47a" for n in names])
    mn = report.get("payload", {}).get("min_bytes")
    if mn:
        ax.axhline(mn / 1e3, color="#c33", linestyle="--", label="minimum (kept features only)")
        ax.legend()
    for b, r in zip(bars, rows):
        if r.get("saved_pct") is not None:
            ax.annotate(f"{r['saved_pct']:.0f} %", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("root -> leaf kB per request")
    ax.set_title("Bytes per request by mode")
    written.append(_save(fig, out_dir / "bytes_per_request.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    pcts = ("p50", "p90", "p99", "p99.9")
    width = 0.8 / len(pcts)
    for i, p in enumerate(pcts):
        ax.bar([x + i * width for x in range(len(rows))],
               [_num(r.get("latency_ms", {}).get(p)) or 0 for r in rows], width, label=p)
    ax.set_xticks([x + width * (len(pcts) - 1) / 2 for x in range(len(rows))], names)
    ax.set_ylabel("latency ms (from intended send time)")
    ax.set_yscale("log")
    ax.set_title("Latency percentiles by mode")
    ax.legend()
    written.append(_save(fig, out_dir / "latency_by_mode.png"))

    linked = [r for r in report["scenarios"] if r.get("link_rate")]
    if linked:
        from .config import parse_rate

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in dict.fromkeys(r["scenario"] for r in linked):
            pts = sorted((parse_rate(r["link_rate"]) / 1e6, r.get("achieved_rate") or 0) for r in linked
                         if r["scenario"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("link rate, Mbit/s")
        ax.set_ylabel("req/s achieved")
        ax.set_title("Throughput vs link rate")
        ax.legend()
        written.append(_save(fig, out_dir / "rps_vs_link_rate.png"))
    return written


def write_report(report: dict[str, Any], out_dir: Path, with_plots: bool = True) -> dict[str, str]:
    """Write report.json, report.md and the plots into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    add_comparisons(report["scenarios"])
    report["plots"] = plots(report, out_dir) if with_plots else []
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(markdown(report))
    return {"json": str(out_dir / "report.json"), "md": str(out_dir / "report.md"),
            **{Path(p).stem: p for p in report["plots"]}}
