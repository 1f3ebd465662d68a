"""What does `runtime` cost over bare onnxruntime, and what does micro-batching buy?

A. single-request latency of runtime.Model vs a bare InferenceSession.run loop (same model file,
   same thread count) for a tiny digits CNN and for a ~5 ms CNN; B. throughput of 64 concurrent
   producers of single samples with micro-batching on vs off; C. peak RSS of a process that
   imports runtime and loads the signed digits package.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Report, Target, interleaved_medians

THREADS = 2


def build_models(workdir: Path, quick: bool) -> dict[str, Any]:
    """Train the tiny digits CNN; build the ~5 ms CNN (random weights: latency does not depend on
    them); write both as signed packages.

    The packages carry normalization and softmax inside the graph, so the bare session and
    runtime.Model run the very same work and the ratio is the runtime's own overhead. A third
    package declares the same processing in its manifest instead (done by the runtime in numpy),
    to show what that costs.
    """
    import torch

    from compress.examples import digits
    from runtime.package import write_package
    from runtime.signing import generate_keypair, load_private_key

    _, pub, _ = generate_keypair(workdir / "keys")
    key = load_private_key(workdir / "keys" / "fleet.key")
    split = digits.load_digits_split()
    tiny = digits.build_cnn(width=8)
    accuracy = digits.train(tiny, split, epochs=4 if quick else 8)
    torch.manual_seed(0)
    wide = digits.build_cnn(width=64, size=32, hidden=256)  # ~5 ms per call on 2 cores
    packages = {}
    for name, module, size in (("tiny", tiny, 8), ("wide", wide, 32)):
        onnx_path = digits.export_onnx(module, workdir / f"{name}.onnx", size=size,
                                       embed_processing=True)
        packages[name] = write_package(workdir / name, onnx_path, name=f"digits-{name}",
                                       labels=digits.LABELS, sign_key=key).path
    plain = digits.export_onnx(tiny, workdir / "tiny-plain.onnx")
    packages["tiny_declared"] = write_package(
        workdir / "tiny-declared", plain, name="digits-tiny", labels=digits.LABELS,
        preprocess=digits.preprocess(), postprocess="softmax", sign_key=key).path
    return {"packages": packages, "pub": pub, "split": split, "accuracy": accuracy}


def latency(pkg: Path, sample: np.ndarray, calls: int, rounds: int,
            declared: Path | None = None) -> dict[str, float]:
    """Median per-call seconds: a bare session on a prepared batch-1 array vs Model.run on the
    raw single sample (schema check, batch axis, NaN check and metrics included); optionally also
    Model.run on `declared`, the same model with its processing in the manifest."""
    import onnxruntime as ort

    from runtime import Model, SessionConfig

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    bare = ort.InferenceSession(str(pkg / "model.onnx"), sess_options=options,
                                providers=["CPUExecutionProvider"])
    feed = {"image": sample[np.newaxis]}
    config = SessionConfig(threads=THREADS)
    model = Model(pkg, config=config)
    calls_by_name: dict[str, Callable[[], Any]] = {"bare": lambda: bare.run(None, feed),
                                                   "runtime": lambda: model.run(sample)}
    if declared is not None:
        declared_model = Model(declared, config=config)
        calls_by_name["declared"] = lambda: declared_model.run(sample)
    for fn in calls_by_name.values():
        for _ in range(20):
            fn()
    medians = interleaved_medians(calls_by_name, calls, rounds)
    medians["threads_chosen"] = model.threads  # the runtime may keep fewer than THREADS
    return medians


def throughput(pkg: Path, samples: np.ndarray, seconds: float, rounds: int,
               producers: int = 64) -> dict[str, Any]:
    """Requests/s completed by `producers` threads each sending single samples back to back.

    on: the micro-batcher as configured (max_batch 32, max_delay 2 ms); off: the same batcher
    with micro-batching switched off (max_batch 1); direct: no batcher, every thread calling
    Model.run itself (onnxruntime sessions accept concurrent calls).

    The modes alternate for `rounds` rounds and the speedup is the median of each round's on/off
    ratio: neighbouring runs share the host's noise of the moment, which the ratio cancels.

    Then on and off again with the producer threads under Linux's SCHED_BATCH policy, for
    reference (the target is judged on the default policy above). With 64 threads taking turns
    at the GIL, a woken thread often preempts the one waking it while that one still holds the
    GIL or its mutex, and both sleep again; a SCHED_BATCH thread does not preempt on
    wake-up. It is what a threaded server calling the runtime gains from `chrt -b 0`.
    """
    from runtime import MicroBatcher, Model, SessionConfig

    model = Model(pkg, config=SessionConfig(threads=THREADS), warmup_batches=(32,))
    on = MicroBatcher(model, max_batch=32, max_delay_ms=2)
    off = MicroBatcher(model, max_batch=1, max_delay_ms=2)
    batch_policy = getattr(os, "SCHED_BATCH", None)

    def drive(call: Any, policy: int | None = None) -> float:
        done = [0] * producers
        stop = threading.Event()

        def producer(k: int) -> None:
            if policy is not None:
                os.sched_setscheduler(0, policy, os.sched_param(0))  # this thread only
            i = k
            while not stop.is_set():
                call(samples[i % len(samples)])
                done[k] += 1
                i += 1

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(producers)]
        for t in threads:
            t.start()
        time.sleep(min(0.5, seconds / 4))  # every thread started and in its loop
        start, counted = time.perf_counter(), sum(done)
        time.sleep(seconds)
        rate = (sum(done) - counted) / (time.perf_counter() - start)
        stop.set()
        for t in threads:
            t.join()
        return rate

    modes: dict[str, Any] = {"direct": model.run, "off": lambda x: off.run(x, timeout=30),
                             "on": lambda x: on.run(x, timeout=30)}
    results: dict[str, list[float]] = {k: [] for k in modes}
    for r in range(rounds):
        for name in modes if r % 2 == 0 else reversed(modes):
            results[name].append(drive(modes[name]))
    policy: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds if batch_policy is not None else 0):
        for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
            policy[name].append(drive(modes[name], batch_policy))
    on.close()
    off.close()
    out: dict[str, Any] = {k: float(np.median(v)) for k, v in results.items()}
    out["speedups"] = [a / b for a, b in zip(results["on"], results["off"], strict=True)]
    if policy["on"]:
        out.update(on_batch_policy=float(np.median(policy["on"])),
                   off_batch_policy=float(np.median(policy["off"])),
                   speedups_batch_policy=[a / b for a, b in zip(policy["on"], policy["off"],
                                                                 strict=True)])
    return out


def peak_rss_mb(pkg: Path, pub: Path) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process serving the signed package, and of one that only loads
    the same file with bare onnxruntime, for reference."""
    ours = f"""
        from pathlib import Path
        import runtime
        from runtime.signing import load_public_key
        model = runtime.Model(Path({str(pkg)!r}), trusted_keys=[load_public_key(Path({str(pub)!r}))],
                              require_signed=True)
        model.run(model.sample_inputs()["image"][0])
        print(peak())
    """
    bare = f"""
        import numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(pkg / 'model.onnx')!r}, providers=["CPUExecutionProvider"])
        s.run(None, {{"image": np.zeros((1, 1, 8, 8), np.float32)}})
        print(peak())
    """
    # VmHWM, not ru_maxrss: after fork+exec, ru_maxrss still counts this (torch-laden) parent.
    peak = ("def peak():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            "            return int(line.split()[1])\n")

    def measure(code: str) -> float:
        out = subprocess.run([sys.executable, "-c", peak + textwrap.dedent(code)], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        return int(out.stdout.split()[-1]) / 1024

    return {"runtime": measure(ours), "bare": measure(bare)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 60 s)")
    args = parser.parse_args(argv)
    quick = args.quick
    calls, rounds = (200, 6) if quick else (500, 10)
    tput_rounds, tput_seconds = (3, 1.5) if quick else (5, 3.0)

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        built = build_models(Path(tmp), quick)
        split, packages = built["split"], built["packages"]
        sample = split.x_test[0]
        tiny = latency(packages["tiny"], sample, calls, rounds, packages["tiny_declared"])
        wide_sample = _upsample(sample)
        wide = latency(packages["wide"], wide_sample, max(50, calls // 5), rounds)
        tput = throughput(packages["tiny"], split.x_test, tput_seconds, tput_rounds)
        rss = peak_rss_mb(packages["tiny"], built["pub"])

    report = Report("runtime_overhead", params={
        "threads": THREADS, "quick": quick, "processing": "inside the graph (see docstring)",
        "calls_per_round": calls, "rounds": rounds,
        "producers": 64, "max_batch": 32, "max_delay_ms": 2, "throughput_seconds": tput_seconds,
        "throughput_rounds": tput_rounds})
    report.figures = {
        "tiny_accuracy": round(built["accuracy"], 4),
        "tiny_bare_ms": tiny["bare"] * 1e3, "tiny_runtime_ms": tiny["runtime"] * 1e3,
        "tiny_latency_ratio": tiny["runtime"] / tiny["bare"],
        "tiny_runtime_threads": int(tiny["threads_chosen"]),
        "tiny_manifest_processing_ms": tiny["declared"] * 1e3,
        "tiny_manifest_processing_ratio": tiny["declared"] / tiny["bare"],
        "wide_bare_ms": wide["bare"] * 1e3, "wide_runtime_ms": wide["runtime"] * 1e3,
        "wide_latency_ratio": wide["runtime"] / wide["bare"],
        "wide_runtime_threads": int(wide["threads_chosen"]),
        "throughput_off_rps": tput["off"], "throughput_on_rps": tput["on"],
        "batching_speedup": float(np.median(tput["speedups"])),
        "batching_speedup_rounds": [round(r, 3) for r in tput["speedups"]],
        "throughput_direct_rps": tput["direct"],
        "speedup_vs_direct_calls": tput["on"] / tput["direct"],
        **({"batch_policy_on_rps": tput["on_batch_policy"],
            "batch_policy_off_rps": tput["off_batch_policy"],
            "batch_policy_speedup": float(np.median(tput["speedups_batch_policy"])),
            "batch_policy_speedup_rounds": [round(r, 3) for r in tput["speedups_batch_policy"]]}
           if "speedups_batch_policy" in tput else {}),
        "peak_rss_mb": rss["runtime"], "bare_ort_peak_rss_mb": rss["bare"],
    }
    report.targets = [
        Target("tiny_latency_ratio", "<=", 1.5), Target("wide_latency_ratio", "<=", 1.10),
        Target("batching_speedup", ">=", 3.0), Target("peak_rss_mb", "<=", 80.0),
    ]
    report.write()
    return 0


def _upsample(sample: np.ndarray) -> np.ndarray:
    return np.kron(sample, np.ones((4, 4), dtype=np.float32))  # 8x8 -> 32x32


if __name__ == "__main__":
    sys.exit(main())
