"""Accuracy-aware fallback: leave the most sensitive nodes in float until a candidate is within tolerance.

Like Intel Neural Compressor's tuner, one node at a time, most sensitive first. Sensitivity is
measured, not guessed, while the model is small enough (each quantizable node left in float on its
own, the quality regained ranks it); past that, first and last layers go first, the usual culprits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.candidates import Candidate
from compress.evaluate import file_sizes, outputs, quality

if TYPE_CHECKING:
    from compress.pipeline import _Context

MEASURED_RANKING_LIMIT = 24  # nodes; beyond it each ranking run costs more than it saves
MAX_FALLBACK_STEPS = 16


def quantizable_nodes(path: Any, ops: tuple[str, ...]) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in ops and n.name]


def fall_back_until_within(ctx: _Context, baseline: Candidate, cand: Candidate) -> Candidate | None:
    """A new candidate with the fewest float nodes that meets the tolerance, or None."""
    step = _step_of(ctx, cand)
    if step is None:
        return None
    ops = ("MatMul", "Gemm") if step.name.startswith("dynamic") else ("Conv", "MatMul", "Gemm")
    origin = cand.origin or baseline.path
    nodes = quantizable_nodes(origin, ops)
    if len(nodes) < 2:
        return None
    ranking = _rank(ctx, origin, cand, step, nodes)
    excluded: list[str] = []
    ctx.reporter.start("fallback", min(len(ranking) - 1, MAX_FALLBACK_STEPS))
    try:
        for node in ranking[: min(len(ranking) - 1, MAX_FALLBACK_STEPS)]:
            excluded.append(node)
            trial = _build(ctx, origin, cand, step, excluded, f"{cand.name}+float{len(excluded)}")
            ctx.reporter.advance("fallback")
            if trial.within(ctx.recipe.tolerance):
                trial.note = f"{len(excluded)} sensitive node(s) left in float: {', '.join(excluded)}"
                return trial
    finally:
        ctx.reporter.finish("fallback")
    ctx.notes.append(f"{cand.name}: still over tolerance with {len(excluded)} node(s) in float")
    return None


def _step_of(ctx: _Context, cand: Candidate) -> Any:
    from compress.passes.quantize_dynamic import DynamicQuantize
    from compress.passes.quantize_static import StaticQuantize

    last = cand.steps[-1]
    if last["pass"] == "dynamic-int8":
        return DynamicQuantize(per_channel=last["per_channel"])
    if last["pass"] == "static-int8-qdq" and ctx.calibration is not None:
        return StaticQuantize(ctx.calibration, per_channel=last["per_channel"],
                              method=last["calibration"])
    return None


def _rank(ctx: _Context, origin: Path, cand: Candidate, step: Any, nodes: list[str]
          ) -> list[str]:
    if len(nodes) > MEASURED_RANKING_LIMIT:
        return [nodes[0], nodes[-1], *nodes[1:-1]]
    assert cand.quality is not None
    gains: dict[str, float] = {}
    ctx.reporter.start("ranking nodes", len(nodes))
    for i, node in enumerate(nodes):
        trial = _build(ctx, origin, cand, step, [node], f"{cand.name}-rank{i}")
        assert trial.quality is not None
        gains[node] = cand.quality.loss - trial.quality.loss
        ctx.reporter.advance("ranking nodes")
    ctx.reporter.finish("ranking nodes")
    return sorted(nodes, key=lambda n: -gains[n])


def _build(ctx: _Context, origin: Path, cand: Candidate, step: Any, excluded: list[str],
           name: str) -> Candidate:
    variant = dataclasses.replace(step, exclude=tuple(excluded))
    path = variant.run(origin, ctx.work / f"{name}.onnx")
    trial = Candidate(name, path, steps=[*cand.steps[:-1], variant.describe()], origin=origin)
    trial.size, trial.transfer_size = file_sizes(path)
    out = outputs(path, ctx.eval_data, ctx.recipe.threads)
    assert ctx.baseline_out is not None
    trial.quality = quality(ctx.metric, out, ctx.baseline_out, ctx.eval_data.labels,
                            ctx.baseline_value)
    return trial
