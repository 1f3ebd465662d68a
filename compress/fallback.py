"""Accuracy-aware fallback: leave the most sensitive nodes in float until a candidate is within tolerance.

Like Intel Neural Compressor's tuner, most sensitive first. Up to 64 quantizable nodes,
sensitivity is measured: each node left in float on its own, the quality it wins back on a
subset ranks it. Past that, one pass ranks them: the float and quantized models run with every
node's input and output exposed, and a node's sensitivity is the relative error it adds. Nodes
then go back to float in growing steps (1, 2, 3, 4, 6, 8, 12, ...), re-measured each time.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.candidates import Candidate
from compress.data import Dataset
from compress.errors import QuantizationError
from compress.evaluate import file_sizes, outputs, quality
from compress.passes.quantize_weights import NAME as WEIGHTS_PASS
from compress.passes.quantize_weights import OPS as WEIGHT_OPS

if TYPE_CHECKING:
    from compress.pipeline import _Context

RANKING_SAMPLES = 8  # an order, not a figure: a few samples suffice
MEASURED_SAMPLES = 16
MEASURED_RANKING_LIMIT = 64  # nodes; past it, one re-quantization per node costs too much
STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def quantizable_nodes(path: Path, ops: tuple[str, ...]) -> list[str]:
    """Named nodes of these kinds; a Gather only when it reads a weight table (an embedding)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in ops and n.name
            and (n.op_type != "Gather" or n.input[0] in weights)]


def fall_back_until_within(ctx: _Context, baseline: Candidate, cand: Candidate) -> Candidate | None:
    """A new candidate with the fewest float nodes that meets the tolerance, or None."""
    step = _step_of(ctx, cand)
    if step is None:
        return None
    if step.name.startswith("dynamic"):
        ops: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
    elif step.name == WEIGHTS_PASS:
        ops = WEIGHT_OPS
    else:
        ops = ("Conv", "MatMul", "Gemm")
    origin = cand.origin or baseline.path
    nodes = quantizable_nodes(origin, ops)
    if step.name.startswith("dynamic"):
        from compress.passes.quantize_dynamic import activation_products

        skipped = set(activation_products(origin))
        nodes = [n for n in nodes if n not in skipped]
    if len(nodes) < 2:
        return None
    if len(nodes) <= MEASURED_RANKING_LIMIT:
        ranking = rank_by_measurement(ctx, origin, cand, step, nodes)
    else:
        ctx.reporter.stage(f"{cand.name}: ranking {len(nodes)} nodes by the error they add")
        ranking = rank_by_added_error(ctx, origin, cand.path, nodes)
    counts = [c for c in STEPS if c < len(nodes)]
    ctx.reporter.start("fallback", len(counts))
    try:
        for count in counts:
            excluded = ranking[:count]
            try:
                trial = _build(ctx, origin, cand, step, excluded, f"{cand.name}+float{count}")
            except QuantizationError as exc:  # every weight worth quantizing is in float now
                ctx.notes.append(f"{cand.name}: {exc}")
                return None
            ctx.reporter.advance("fallback")
            if trial.within(ctx.recipe.tolerance):
                trial.note = f"{count} sensitive node(s) left in float: {', '.join(excluded)}"
                return trial
    finally:
        ctx.reporter.finish("fallback")
    ctx.notes.append(f"{cand.name}: still over tolerance with {counts[-1] if counts else 0} "
                     "node(s) in float")
    return None


def rank_by_measurement(ctx: _Context, origin: Path, cand: Candidate, step: Any,
                        nodes: list[str]) -> list[str]:
    """Each node left in float on its own: the quality it wins back ranks it (on a subset)."""
    n = min(len(ctx.eval_data), MEASURED_SAMPLES)
    labels = ctx.eval_data.labels
    subset = Dataset(ctx.eval_data.batch(0, n), None if labels is None else labels[:n],
                     ctx.eval_data.source)
    reference = _build(ctx, origin, cand, step, [], f"{cand.name}-rank", subset)
    assert reference.quality is not None
    gains: dict[str, float] = {}
    ctx.reporter.start("ranking nodes", len(nodes))
    for i, node in enumerate(nodes):
        try:
            trial = _build(ctx, origin, cand, step, [node], f"{cand.name}-rank{i}", subset)
        except QuantizationError:  # the node held the only weight worth quantizing
            gains[node] = reference.quality.loss
        else:
            assert trial.quality is not None
            gains[node] = reference.quality.loss - trial.quality.loss
        ctx.reporter.advance("ranking nodes")
    ctx.reporter.finish("ranking nodes")
    return sorted(nodes, key=lambda name: -gains[name])


def rank_by_added_error(ctx: _Context, origin: Path, quantized: Path, nodes: list[str]
                        ) -> list[str]:
    """Nodes sorted by the relative error each adds, largest first."""
    import onnx

    graph = onnx.load(str(origin), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    wanted = set(nodes)
    io: dict[str, tuple[str, list[str]]] = {}
    for node in graph.node:
        if node.name in wanted:  # a Gather's other input is integer indices: no float error
            ins = [] if node.op_type == "Gather" else [i for i in node.input if i and i not in weights]
            io[node.name] = (node.output[0], ins)
    tensors = sorted({t for out, ins in io.values() for t in (out, *ins)})
    n = min(len(ctx.eval_data), RANKING_SAMPLES)
    feeds = ctx.eval_data.batch(0, n)
    ref = _run_exposed(origin, tensors, feeds, ctx.recipe.threads)
    got = _run_exposed(quantized, tensors, feeds, ctx.recipe.threads)

    def err(name: str) -> float:
        if name not in ref or name not in got or ref[name].shape != got[name].shape:
            return 0.0
        r, g = ref[name].astype(np.float64), got[name].astype(np.float64)
        return float(np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-12))

    added = {name: err(out) - max((err(i) for i in ins), default=0.0)
             for name, (out, ins) in io.items()}
    return sorted(nodes, key=lambda name: -added.get(name, 0.0))


def _run_exposed(path: Path, tensors: list[str], feeds: dict[str, np.ndarray], threads: int
                 ) -> dict[str, np.ndarray]:
    """Run a copy of the model whose graph also outputs `tensors` (those it has, in float)."""
    import onnx
    from onnx import TensorProto, helper

    from compress.evaluate import session

    model = onnx.load(str(path))
    graph = model.graph
    present = {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
    existing = {o.name for o in graph.output}
    exposed = [t for t in tensors if t in present and t not in existing
               and t not in {i.name for i in graph.input}]
    graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in exposed)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "exposed.onnx"
        onnx.save(model, str(copy))
        sess = session(copy, threads)
        names = [o.name for o in sess.get_outputs() if o.name in exposed]
        values = sess.run(names, feeds)
    return dict(zip(names, values, strict=True))


def _step_of(ctx: _Context, cand: Candidate) -> Any:
    from compress.passes.quantize_dynamic import DynamicQuantize
    from compress.passes.quantize_static import StaticQuantize
    from compress.passes.quantize_weights import WeightQuantize

    last = cand.steps[-1]
    if last["pass"] == "dynamic-int8":
        return DynamicQuantize(per_channel=last["per_channel"])
    if last["pass"] == WEIGHTS_PASS:
        return WeightQuantize()
    if last["pass"] == "static-int8-qdq" and ctx.calibration is not None:
        return StaticQuantize(ctx.calibration, per_channel=last["per_channel"],
                              method=last["calibration"])
    return None


def _build(ctx: _Context, origin: Path, cand: Candidate, step: Any, excluded: list[str],
           name: str, data: Dataset | None = None) -> Candidate:
    variant = dataclasses.replace(step, exclude=tuple(excluded))
    path = variant.run(origin, ctx.work / f"{name}.onnx")
    trial = Candidate(name, path, steps=[*cand.steps[:-1], variant.describe()], origin=origin,
                      float_compute=cand.float_compute)
    trial.size, trial.transfer_size = file_sizes(path)
    data = data or ctx.eval_data
    out = outputs(path, data, ctx.recipe.threads)
    assert ctx.baseline_out is not None
    trial.quality = quality(ctx.metric, out, ctx.baseline_out[: len(data)], data.labels,
                            ctx.baseline_value if data is ctx.eval_data else None)
    return trial
