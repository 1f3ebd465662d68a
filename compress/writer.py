"""Write the chosen candidate as a signed package, with what was done and measured in its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.candidates import Candidate
from compress.errors import CompressError
from compress.passes.export import Exported
from compress.recipe import Recipe
from runtime.package import Package, write_package

if TYPE_CHECKING:
    from compress.pipeline import _Context


def write(recipe: Recipe, chosen: Candidate, baseline: Candidate, candidates: list[Candidate],
          reason: str, exported: Exported, ctx: _Context) -> Package:
    labels = _labels(recipe.labels) if recipe.labels else None
    key = None
    if recipe.sign_key:
        from runtime.signing import load_private_key

        key = load_private_key(recipe.sign_key)
    compression: dict[str, Any] = {
        "source": recipe.source, "export": exported.method,
        "export_max_abs_diff": exported.max_abs_diff, "chosen": chosen.name, "reason": reason,
        "steps": chosen.steps, "candidates": [c.name for c in candidates],
    }
    if recipe.prune:
        compression["prune"] = {"ratio": recipe.prune, "method": recipe.prune_method,
                                "finetune": str(recipe.finetune) if recipe.finetune else None}
    metrics = {"metric": ctx.metric, "threads": recipe.threads, "eval": ctx.eval_data.source,
               "baseline": _figures(baseline), "package": _figures(chosen)}
    return write_package(recipe.output, chosen.path, name=recipe.model_name,
                         version=recipe.version, labels=labels, compression=compression,
                         metrics=metrics, sign_key=key)


def _figures(c: Candidate) -> dict[str, Any]:
    doc = c.as_dict()
    return {k: doc[k] for k in ("size", "transfer_size", "latency_ms", "quality")}


def _labels(path: Path) -> list[str]:
    try:
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise CompressError(f"cannot read labels {path}: {exc.strerror}") from None
    if not labels:
        raise CompressError(f"labels file {path} is empty (one label per line)")
    return labels
