"""report.json, report.md and report.png in the package: every candidate, what was chosen and why."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.passes.base import machine
from compress.recipe import Recipe

if TYPE_CHECKING:
    from compress.pipeline import Result


def write_reports(result: Result, recipe: Recipe) -> None:
    out = result.package.path
    doc = report_dict(result, recipe)
    (out / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "report.md").write_text(markdown(doc))
    _chart(doc, out / "report.png")


def report_dict(result: Result, recipe: Recipe) -> dict[str, Any]:
    base = result.baseline
    rows = []
    for c in result.candidates:
        row = c.as_dict()
        row["size_ratio"] = round(base.size / c.size, 3) if c.size else None
        row["speedup"] = round(base.latency_ms / c.latency_ms, 3) \
            if c.latency_ms and not math.isnan(c.latency_ms) else None
        row["within_tolerance"] = c.within(recipe.tolerance)
        row["chosen"] = c is result.chosen
        rows.append(row)
    return {
        "name": recipe.model_name, "version": recipe.version, "source": recipe.source,
        "metric": result.metric, "tolerance": recipe.tolerance, "threads": recipe.threads,
        "export": {"method": result.export.method, "max_abs_diff": result.export.max_abs_diff},
        "machine": machine(),
        "candidates": rows, "chosen": result.chosen.name, "reason": result.reason,
        "notes": result.notes, "seconds": round(result.seconds, 2),
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# {doc['name']} v{doc['version']}: compression report", "",
        f"Chosen: **{doc['chosen']}**: {doc['reason']}.", "",
        f"Quality metric: {doc['metric']} (tolerance {doc['tolerance']}); latency: median of warm "
        f"single-sample runs with {doc['threads']} thread(s), measured side by side, on "
        f"{_machine_line(doc['machine'])}.", "",
        "| candidate | size | vs fp32 | transfer (zlib) | latency ms | speedup | quality | loss | within |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in doc["candidates"]:
        q = r["quality"] or {}
        name = f"**{r['name']}**" if r["chosen"] else r["name"]
        lines.append(
            f"| {name} | {r['size']:,} | {r['size_ratio']}x | {r['transfer_size']:,} | "
            f"{r['latency_ms']} | {r['speedup']}x | {q.get('value')} | {q.get('loss')} | "
            f"{'yes' if r['within_tolerance'] else 'no'} |")
    lines += ["", f"Export: {doc['export']['method']} (max abs diff vs torch: "
              f"{doc['export']['max_abs_diff']})."]
    notes = [r for r in doc["candidates"] if r["note"]]
    for r in notes:
        lines.append(f"- {r['name']}: {r['note']}")
    for note in doc["notes"]:
        lines.append(f"- {note}")
    lines.append(f"\nCompression took {doc['seconds']} s.\n")
    return "\n".join(lines)


def _machine_line(m: dict[str, Any]) -> str:
    int8 = ("with VNNI: INT8 kernels can beat float" if m["avx512_vnni"] else
            "without VNNI: INT8 kernels may run no faster than float here, and buy size rather "
            "than speed")
    return f"{m['cpu']} ({m['cores']} cores), onnxruntime {m['onnxruntime']}, {int8}"


def _chart(doc: dict[str, Any], path: Path) -> None:
    """Latency against quality, marker area by file size: the trade-off at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["candidates"] if r["latency_ms"] is not None and r["quality"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    biggest = max(r["size"] for r in rows)
    for r in rows:
        q = r["quality"]["value"]
        color = "#d62728" if r["chosen"] else ("#1f77b4" if r["within_tolerance"] else "#999999")
        ax.scatter(r["latency_ms"], q, s=60 + 1400 * r["size"] / biggest, color=color, alpha=0.55,
                   edgecolors="black", linewidths=1.5 if r["chosen"] else 0.5, zorder=3)
        label = f"{r['name']}\n{r['size'] / 1024:.0f} KiB" + ("  (chosen)" if r["chosen"] else "")
        ax.annotate(label, (r["latency_ms"], q), textcoords="offset points", xytext=(8, 6),
                    fontsize=8)
    base = next(r for r in doc["candidates"] if r["name"] == "fp32")
    if base["quality"]:
        bq = base["quality"]["value"]
        limit = bq - doc["tolerance"] if doc["metric"] in ("accuracy", "cosine") else \
            doc["tolerance"]
        ax.axhline(limit, color="#d62728", linestyle="--", linewidth=1,
                   label=f"tolerance ({doc['metric']} {limit:.4g})")
        ax.axvline(base["latency_ms"], color="#555555", linestyle=":", linewidth=1,
                   label="fp32 latency")
    ax.margins(x=0.15, y=0.15)  # room for the labels
    ax.set_xlabel(f"median latency, ms (batch 1, {doc['threads']} thread(s))")
    ax.set_ylabel(doc["metric"])
    ax.set_title(f"{doc['name']}: candidates (marker area = file size)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
