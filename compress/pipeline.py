"""The compression pipeline: source -> ONNX -> baseline -> candidates -> measured choice -> package.

It only sequences passes and measurements; each pass lives in compress/passes/. `auto` builds
the candidates that fit the model, measures quality and latency here, falls back sensitive
nodes to float when a candidate misses the tolerance, and keeps the fastest candidate that is
within tolerance and not slower than the float baseline (which always qualifies); of candidates
as fast within measurement noise (SPEED_TIE), the smallest.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.candidates import Candidate
from compress.data import Dataset, load_npz
from compress.errors import CompressError, DataError, QuantizationError, ToleranceError
from compress.evaluate import calls_for, file_sizes, latencies, outputs, quality
from compress.fallback import fall_back_until_within
from compress.passes.export import Exported, copy_onnx, export_torch, load_torch_source
from compress.passes.fp16 import Float16
from compress.passes.optimize import PreProcess
from compress.passes.quantize_dynamic import DynamicQuantize
from compress.passes.quantize_static import StaticQuantize
from compress.passes.quantize_weights import WeightQuantize
from compress.progress import Quiet, Reporter
from compress.recipe import Metric, Recipe
from runtime.package import Package
from runtime.schema import TensorSpec

#: Latencies within this fraction of the fastest candidate's count as equally fast: repeated
#: measurements of one model differ by about as much on a shared 2-core machine (1.00-1.05x
#: seen for identical graphs), and a smaller package is worth more than a difference in noise.
SPEED_TIE = 0.05


@dataclass
class Result:
    package: Package
    baseline: Candidate
    chosen: Candidate
    candidates: list[Candidate]
    reason: str
    export: Exported
    metric: Metric
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Context:
    recipe: Recipe
    work: Path
    specs: list[TensorSpec]
    eval_data: Dataset
    calibration: Dataset | None
    metric: Metric
    reporter: Reporter
    notes: list[str]
    baseline_out: np.ndarray | None = None
    baseline_value: float | None = None


def run(recipe: Recipe, reporter: Reporter | None = None) -> Result:
    """Compress `recipe.source` into the package directory `recipe.output`."""
    from runtime.model import read_io_specs

    reporter = reporter or Quiet()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgefleet-compress-") as tmp:
        work = Path(tmp)
        reporter.stage("exporting")
        exported, pruned = _source_to_onnx(recipe, work, reporter)
        specs, _ = read_io_specs(exported.path)
        reporter.stage("optimizing the float graph (shape inference, fusions)")
        baseline = Candidate("fp32", PreProcess().run(exported.path, work / "fp32.onnx"),
                             steps=[PreProcess().describe()])
        ctx = _context(recipe, work, specs, reporter)
        candidates = [baseline]
        quant_base = baseline
        if pruned is not None:
            name = f"{recipe.prune_method}{round(recipe.prune * 100)}-fp32"
            quant_base = Candidate(name, PreProcess().run(pruned.path, work / f"{name}.onnx"),
                                   steps=[pruned_step(recipe, pruned), PreProcess().describe()])
            candidates.append(quant_base)
        candidates += _build_candidates(ctx, quant_base)
        _measure(ctx, candidates)
        candidates = _apply_fallback(ctx, baseline, candidates)
        chosen, reason = _choose(ctx, baseline, candidates)
        reporter.stage("writing the package")
        from compress.writer import write

        package = write(recipe, chosen, baseline, candidates, reason, exported, ctx)
        seconds = time.perf_counter() - started
        result = Result(package, baseline, chosen, candidates, reason, exported, ctx.metric,
                        ctx.notes, seconds)
        from compress.report import write_reports

        write_reports(result, recipe)
    return result


def _source_to_onnx(recipe: Recipe, work: Path, reporter: Reporter
                    ) -> tuple[Exported, Exported | None]:
    """The float model as given, and (when pruning) the pruned one, both as verified ONNX."""
    out = work / "exported.onnx"
    if recipe.source.endswith(".onnx"):
        if recipe.prune:
            raise CompressError("pruning works on PyTorch sources (a .pt/.ts file or "
                                "module:factory); this source is already ONNX")
        return copy_onnx(Path(recipe.source), out), None
    if not recipe.input_shapes:
        raise CompressError("a PyTorch source needs --input-shape (e.g. --input-shape 1x3x32x32)")
    module = load_torch_source(recipe.source, recipe.weights)
    exported = export_torch(module, recipe.input_shapes, out, recipe.opset)
    if not recipe.prune:
        return exported, None
    import copy

    from compress.passes.prune import prune

    pruned = prune(copy.deepcopy(module), recipe, reporter)
    reporter.stage("exporting the pruned model")
    return exported, export_torch(pruned, recipe.input_shapes, work / "pruned.onnx", recipe.opset)


def pruned_step(recipe: Recipe, pruned: Exported) -> dict[str, Any]:
    from compress.passes.prune import parameter_count, sparsity

    assert pruned.module is not None
    return {"pass": f"prune-{recipe.prune_method}", "ratio": recipe.prune,
            "parameters": parameter_count(pruned.module),
            "sparsity": round(sparsity(pruned.module), 4),
            "finetune": {"data": str(recipe.finetune), "epochs": recipe.finetune_epochs}
            if recipe.finetune else None}


def _context(recipe: Recipe, work: Path, specs: list[TensorSpec], reporter: Reporter) -> _Context:
    notes: list[str] = []
    eval_data = load_npz(recipe.eval, specs, role="eval") if recipe.eval else None
    calibration = load_npz(recipe.calibration, specs, role="calibration") \
        if recipe.calibration else None
    if calibration is None and eval_data is not None and recipe.quantize in ("auto", "static"):
        calibration = eval_data
        notes.append("calibrated on the eval data (no --calibration given)")
    if eval_data is None:
        eval_data = calibration or _synthetic(specs)
        notes.append("quality measured against the float model on "
                     f"{'the calibration data' if calibration else 'synthetic random inputs'}"
                     " (no --eval given)")
    metric = recipe.metric or ("accuracy" if eval_data.labels is not None else "cosine")
    if metric == "accuracy" and eval_data.labels is None:
        raise DataError(f"--metric accuracy needs a `labels` array in the eval data {recipe.eval}")
    return _Context(recipe, work, specs, eval_data, calibration, metric, reporter, notes)


def _synthetic(specs: list[TensorSpec], n: int = 64) -> Dataset:
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in specs:
        shape = [n] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
        inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype) \
            if np.dtype(spec.dtype).kind == "f" else np.zeros(shape, spec.dtype)
    return Dataset(inputs=inputs, labels=None, source="synthetic")


def op_counts(path: Path) -> dict[str, int]:
    """Operator counts, subgraphs (If/Loop bodies) included."""
    import onnx

    counts: dict[str, int] = {}

    def walk(graph: Any) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


def _build_candidates(ctx: _Context, baseline: Candidate) -> list[Candidate]:
    """Quantized variants of `baseline` (the float model, or the pruned float model)."""
    recipe, work = ctx.recipe, ctx.work
    ops = op_counts(baseline.path)
    matmuls = ops.get("MatMul", 0) + ops.get("Gemm", 0)
    convs = ops.get("Conv", 0)
    plans: list[tuple[str, Any]] = []
    mode = recipe.quantize
    if mode == "dynamic" or (mode == "auto" and matmuls and matmuls >= convs):
        plans.append((f"dynamic-int8-{'pc' if recipe.per_channel else 'pt'}",
                      DynamicQuantize(per_channel=recipe.per_channel)))
    # auto: dynamic for MatMul-heavy models (transformers), static QDQ for convolutional ones
    if mode == "static" or (mode == "auto" and convs > 0 and convs >= matmuls):
        if ctx.calibration is None:
            if mode == "static":
                raise DataError("static quantization needs calibration data: give --calibration "
                                "DATA.npz (or --eval)")
            ctx.notes.append("static INT8 skipped: no calibration data")
        else:
            granularities = [recipe.per_channel] if mode == "static" else [True, False]
            for per_channel in granularities:
                plans.append((f"static-int8-{'pc' if per_channel else 'pt'}",
                              StaticQuantize(ctx.calibration, per_channel=per_channel,
                                             method=recipe.calibration_method)))
    if mode == "fp16" or (mode == "auto" and not convs and not matmuls):
        plans.append(("fp16", Float16()))
    if mode == "auto" and (convs or matmuls or ops.get("Gather", 0)):
        # where integer kernels are no faster (no VNNI), still a quarter of the size
        plans.append((WeightQuantize.name, WeightQuantize()))
    built = []
    for name, step in plans:
        ctx.reporter.stage(f"building {name}" + (" (calibrating)" if "static" in name else ""))
        prefix = "" if baseline.name == "fp32" else baseline.name.removesuffix("-fp32") + "+"
        float_compute = isinstance(step, WeightQuantize)
        try:
            path = step.run(baseline.path, work / f"{prefix}{name}.onnx")
        except QuantizationError as exc:
            if not float_compute:
                raise
            ctx.notes.append(str(exc))  # no weight worth storing in INT8: nothing to offer
            continue
        if name != "fp16" and not float_compute and not _quantized_ops(path):
            why = (f"{name} quantized nothing: the model's MatMul/Gemm/Conv are inside control "
                   "flow (If/Loop) or of kinds onnxruntime does not quantize")
            if mode != "auto":
                raise QuantizationError(f"--quantize {mode}: {why}; use --quantize auto or none")
            ctx.notes.append(why)
            continue
        built.append(Candidate(prefix + name, path, steps=[*baseline.steps, step.describe()],
                               origin=baseline.path, float_compute=float_compute))
    return built


_QUANTIZED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                  "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                  "QGemm"}


def _quantized_ops(path: Path) -> int:
    """How many quantized operators the model holds, subgraphs included."""
    import onnx

    def walk(graph: Any) -> int:
        count = 0
        for node in graph.node:
            count += node.op_type in _QUANTIZED_OPS
            count += sum(walk(a.g) for a in node.attribute if a.HasField("g"))
        return count

    return walk(onnx.load(str(path), load_external_data=False).graph)


def _measure(ctx: _Context, candidates: list[Candidate]) -> None:
    """Size, quality against the baseline (first in the list) and side-by-side latency."""
    reporter, data = ctx.reporter, ctx.eval_data
    reporter.start("evaluating", len(candidates))
    for cand in candidates:
        cand.size, cand.transfer_size = file_sizes(cand.path)
        out = outputs(cand.path, data, ctx.recipe.threads)
        if ctx.baseline_out is None:
            ctx.baseline_out = out
        cand.quality = quality(ctx.metric, out, ctx.baseline_out, data.labels, ctx.baseline_value)
        if ctx.baseline_value is None:
            ctx.baseline_value = cand.quality.value
        reporter.advance("evaluating")
    reporter.finish("evaluating")
    measure_latency(ctx, candidates)


def measure_latency(ctx: _Context, candidates: list[Candidate]) -> None:
    sample = ctx.eval_data.batch(0, 1)
    rounds = 5
    first = latencies({"probe": candidates[0].path}, sample, ctx.recipe.threads, calls=5, rounds=1)
    calls = calls_for(first["probe"])
    ctx.reporter.start("timing", rounds)
    medians = latencies({c.name: c.path for c in candidates}, sample, ctx.recipe.threads,
                        calls=calls, rounds=rounds,
                        on_round=lambda: ctx.reporter.advance("timing"))
    ctx.reporter.finish("timing")
    for cand in candidates:
        cand.latency_ms = medians[cand.name]


def _apply_fallback(ctx: _Context, baseline: Candidate, candidates: list[Candidate]
                    ) -> list[Candidate]:
    tol = ctx.recipe.tolerance
    extra = []
    for cand in candidates[1:]:
        if cand.within(tol) or cand.origin is None or cand.name.endswith("fp16"):
            continue
        fixed = fall_back_until_within(ctx, baseline, cand)
        if fixed is not None:
            extra.append(fixed)
    if extra:
        measure_latency(ctx, [baseline, *candidates[1:], *extra])
    return [*candidates, *extra]


def _choose(ctx: _Context, baseline: Candidate, candidates: list[Candidate]
            ) -> tuple[Candidate, str]:
    tol, mode = ctx.recipe.tolerance, ctx.recipe.quantize
    compressed = candidates[1:]
    if mode == "none":
        if not compressed:
            return baseline, "no pruning or quantization asked for: the optimized float model"
        pruned = compressed[0]
        if not pruned.within(tol):
            loss = pruned.quality.loss if pruned.quality else float("nan")
            raise ToleranceError(f"pruning {ctx.recipe.prune:.0%} loses {loss:.4f} {ctx.metric}, "
                                 f"over the tolerance {tol}; prune less or add --finetune DATA.npz")
        return pruned, f"{pruned.name}: pruned as asked, within tolerance, no quantization"
    if mode != "auto":
        compressed = [c for c in compressed if c.origin is not None]
        within = [c for c in compressed if c.within(tol)]
        if not within:
            worst = min(compressed, key=lambda c: c.quality.loss if c.quality else 1e9)
            loss = worst.quality.loss if worst.quality else float("nan")
            raise ToleranceError(f"--quantize {mode} loses {loss:.4f} {ctx.metric} against the "
                                 f"float model, over the tolerance {tol} even with sensitive "
                                 "nodes in float; raise --tolerance or use --quantize auto")
        best = min(within, key=lambda c: c.latency_ms)
        return best, f"--quantize {mode}: {best.name}, within tolerance"
    # A float-compute candidate runs the float graph once loaded: its speed is the float model's
    # by construction, whatever one noisy measurement of it says.
    def speed_rank(c: Candidate) -> float:
        return baseline.latency_ms if c.float_compute else c.latency_ms

    fit = [c for c in compressed if c.within(tol) and speed_rank(c) <= baseline.latency_ms]
    if not fit:
        return baseline, ("no compressed candidate was within tolerance and not slower than "
                          "the float model; the optimized float model ships")
    fastest = min(speed_rank(c) for c in fit)
    as_fast = [c for c in fit if speed_rank(c) <= fastest * (1 + SPEED_TIE)]
    best = min(as_fast, key=lambda c: (c.size, speed_rank(c)))
    smaller = baseline.size / best.size
    tie = (f" (candidates within {SPEED_TIE:.0%} of the fastest count as as fast; the smallest "
           "of them ships)" if len(as_fast) > 1 else "")
    if best.float_compute:
        return best, (f"{best.name}: {smaller:.1f}x smaller within tolerance {tol}, at the float "
                      f"model's speed (it runs the float graph once loaded; measured "
                      f"{baseline.latency_ms / best.latency_ms:.2f}x); no candidate was "
                      f"measurably faster{tie}")
    speed = baseline.latency_ms / best.latency_ms
    return best, (f"fastest candidate within tolerance {tol}: {speed:.2f}x the float model's "
                  f"speed, {smaller:.1f}x smaller{tie}")

