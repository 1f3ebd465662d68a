"""`Model`: one package (or bare .onnx) loaded into onnxruntime, checked, warmed up, ready to serve.

Session options are chosen for small CPUs: a fixed intra-op thread count, no busy-spinning
(spinning threads burn a core that the agent and the radio stack need), one inter-op thread, and
full graph optimization. The first real request must not be the slow one, so loading ends with a
warm-up at batch 1 and at the largest batch the micro-batcher will form.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnxruntime as ort

from runtime.errors import InferenceError, InputError, ModelLoadError
from runtime.metrics import Metrics
from runtime.package import Package, load_package
from runtime.processing import Preprocessor, Scored, postprocess, top_k
from runtime.schema import CheckedInputs, InputChecker, TensorSpec

if TYPE_CHECKING:
    from runtime.signing import PublicKey

Optimization = Literal["disabled", "basic", "extended", "all"]
_OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    """How onnxruntime may use the box: the agent's `[runtime]` config maps onto this."""

    threads: int = 2
    #: let pool threads spin between operators inside a run (never between runs)
    spinning: bool = False
    memory_arena: bool = True
    optimization: Optimization = "all"
    #: treat `threads` as a ceiling and keep one thread when the model runs as fast on it
    auto_threads: bool = True

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, self.threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = _OPT_LEVELS[self.optimization]
        so.enable_cpu_mem_arena = self.memory_arena
        so.log_severity_level = 3  # warnings from ORT go to its own stderr, not our logs
        spin = "1" if self.spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        # Even with spinning allowed, stop it when a run returns: idle threads never burn CPU.
        so.add_session_config_entry("session.force_spinning_stop", "1")
        return so


def read_io_specs(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an ONNX file, as onnxruntime sees them."""
    session = _open_session(model_path, SessionConfig(threads=1, optimization="disabled"))
    return _specs(session.get_inputs()), _specs(session.get_outputs())


class Model:
    """A loaded model. Thread-safe: onnxruntime sessions may run concurrently."""

    def __init__(
        self,
        source: Path | str | Package,
        *,
        config: SessionConfig | None = None,
        trusted_keys: Sequence[PublicKey] = (),
        require_signed: bool = False,
        warmup_batches: Iterable[int] = (1,),
    ) -> None:
        self.config = config or SessionConfig()
        if isinstance(source, Package):
            self.package: Package | None = source
        else:
            path = Path(source)
            self.package = None if path.suffix == ".onnx" and path.is_file() else load_package(
                path, trusted_keys=trusted_keys, require_signed=require_signed)
        model_path = self.package.model_path if self.package else Path(source)  # type: ignore[arg-type]
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path} does not exist")
        self._session = _open_session(model_path, self.config)
        self.threads = self.config.threads
        self._run = _fast_run(self._session)
        self.inputs = _specs(self._session.get_inputs())
        self.outputs = _specs(self._session.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        manifest = self.package.manifest if self.package else None
        self.name = manifest.name if manifest else model_path.stem
        self.version = manifest.version if manifest else "0"
        self.sha256 = manifest.sha256 if manifest else ""
        self.labels = manifest.labels if manifest else None
        self.top_k = manifest.top_k if manifest else 5
        self._postprocess = manifest.postprocess if manifest else "none"
        if manifest:
            _check_manifest_matches(manifest.inputs, self.inputs, "input")
            _check_manifest_matches(manifest.outputs, self.outputs, "output")
        self._checker = InputChecker(self.inputs)
        self.exact_sample = self._checker.exact_sample  # read by the batcher on every request
        # Requests can be concatenated only when every input and output has a batch axis.
        self.batchable = all(s.batch_dynamic for s in (*self.inputs, *self.outputs))
        #: every accepted sample has the same shape (all dimensions but the batch are fixed), so
        #: any requests for this model can be concatenated without comparing shapes
        self.uniform_samples = self.batchable and all(
            isinstance(d, int) for s in self.inputs for d in s.shape[1:])
        self._pre = Preprocessor(manifest.preprocess if manifest else None,
                                 {s.name: len(s.shape) for s in self.inputs})
        self.metrics = Metrics()
        batches = sorted({1, *warmup_batches}) if self.batchable else [1]
        self._warm_call_s = 0.0  # one batch-1 call, measured by the warm-up
        self._warm_up(batches)
        if self.config.threads > 1 and self.config.auto_threads:
            self._pick_threads(model_path, batches)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, version={self.version!r})"

    @property
    def input_checker(self) -> InputChecker:
        return self._checker

    def check(self, inputs: Mapping[str, Any] | Any, *, finite: bool = True) -> CheckedInputs:
        """Validate and convert inputs (see runtime.schema); raises InputError."""
        return self._checker.check(inputs, finite=finite)

    def run(self, inputs: Mapping[str, Any] | Any) -> dict[str, np.ndarray]:
        """Check, pre-process, run and post-process one request; outputs keep the caller's batching.

        A single sample sent without its batch axis gets outputs without it too. This is the
        per-request hot path: every Python operation here shows beside a small model's run.
        """
        start = time.perf_counter()
        try:
            arrays, _, added = self._checker.check(inputs)
        except InputError:
            self.metrics.record_rejected()
            raise
        values = self._infer(arrays)
        if added:
            values = [v[0] for v in values]
        self.metrics.record(time.perf_counter() - start)
        return dict(zip(self._output_names, values, strict=True))

    def run_checked(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run arrays that already passed `check` (with their batch axis); used by the batcher."""
        return dict(zip(self._output_names, self._infer(arrays), strict=True))

    def _infer(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._pre:
            arrays = self._pre.apply(dict(arrays))
        try:
            values: list[np.ndarray] = self._run(self._output_names, arrays, None)
        except Exception as exc:  # onnxruntime raises its own pybind classes
            self.metrics.record_error()
            raise InferenceError(f"model {self.name} v{self.version} failed: "
                                 f"{_ort_message(exc)}") from exc
        if self._postprocess != "none":
            values[0] = postprocess(self._postprocess, values[0])
        return values

    def classify(self, outputs: Mapping[str, np.ndarray]) -> list[Scored] | None:
        """Top-k labels per sample from the first output, when the package declares labels."""
        if not self.labels:
            return None
        return top_k(np.asarray(outputs[self._output_names[0]]), self.labels, self.top_k)

    def sample_inputs(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zeros of the declared shapes (dynamic dimensions set to `batch` first, then 1)."""
        feeds = {}
        for spec in self.inputs:
            shape = [d if isinstance(d, int) else (batch if i == 0 else 1)
                     for i, d in enumerate(spec.shape)]
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feeds

    def _warm_up(self, batches: Sequence[int]) -> None:
        for size in batches:
            feeds = self.sample_inputs(size)
            try:
                started = time.perf_counter()
                self._run(self._output_names, feeds, None)
                spent = time.perf_counter() - started
                if spent <= 0.02:  # light: a second, warm call measures it
                    started = time.perf_counter()
                    self._run(self._output_names, feeds, None)
                    spent = time.perf_counter() - started
            except Exception as exc:
                raise ModelLoadError(f"model {self.name} loads but fails on a zero input of batch "
                                     f"{size}: {_ort_message(exc)}") from exc
            if size == batches[0]:
                self._warm_call_s = spent
            if spent > 0.02:
                # A heavy model (over 20 ms a call): one call has warmed it up, and each more
                # (or a bigger batch) takes every core from the models serving beside it while
                # it is being installed.
                break

    def _pick_threads(self, model_path: Path, batches: Sequence[int]) -> None:
        """Keep a single-threaded session when it is at least as fast at every warm-up batch.

        For small models the intra-op pool's wake-ups (worse with spinning off) cost more than
        the parallelism saves; large models (over ~2 ms a call) keep every allowed thread.
        """
        if self._warm_call_s > 0.01:
            return  # clearly a large model (the warm-up said so): it keeps its threads
        probe = [self.sample_inputs(b) for b in batches]
        if _median_time(self._run, self._output_names, probe[0], n=5) > 0.002:
            return  # a large model: it keeps its threads, and is not timed at every batch
        multi = [_median_time(self._run, self._output_names, f) for f in probe]
        if max(multi) > 0.002:
            return
        single_cfg = SessionConfig(threads=1, spinning=self.config.spinning,
                                   memory_arena=self.config.memory_arena,
                                   optimization=self.config.optimization, auto_threads=False)
        single = _open_session(model_path, single_cfg)
        run = _fast_run(single)
        for feeds in probe:
            run(self._output_names, feeds, None)
        # measure both again side by side, so that noise hits them alike
        one = [_median_time(run, self._output_names, f) for f in probe]
        multi = [_median_time(self._run, self._output_names, f) for f in probe]
        if all(a <= b for a, b in zip(one, multi, strict=True)):
            self._session, self._run, self.threads = single, run, 1


def _fast_run(session: ort.InferenceSession) -> Any:
    """The session's run(names, feeds, run_options).

    InferenceSession.run re-validates the feed names on every call, which `check` already did;
    the binding underneath skips that (about 10 µs a call). Falls back to the public method if a
    future onnxruntime moves the binding.
    """
    sess = getattr(session, "_sess", None)
    if sess is not None and callable(getattr(sess, "run", None)):
        return sess.run
    return lambda names, feeds, _opts: session.run(names, feeds)


def _median_time(run: Any, names: list[str], feeds: dict[str, np.ndarray], n: int = 25) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run(names, feeds, None)
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def _open_session(model_path: Path, config: SessionConfig) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(model_path), sess_options=config.session_options(),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load {model_path}: {_ort_message(exc)}") from exc


def _specs(args: Sequence[Any]) -> list[TensorSpec]:
    return [TensorSpec.from_ort(a.name, a.type, a.shape) for a in args]


def _check_manifest_matches(declared: Sequence[TensorSpec], actual: Sequence[TensorSpec],
                            kind: str) -> None:
    """The manifest is what sensors are told; it must describe the model that really runs."""
    got = {s.name: s for s in actual}
    for spec in declared:
        real = got.get(spec.name)
        if real is None:
            raise ModelLoadError(f"manifest declares {kind} {spec.name!r}, the model has "
                                 f"{', '.join(got)}")
        if real.dtype != spec.dtype or len(real.shape) != len(spec.shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b
                for a, b in zip(real.shape, spec.shape, strict=True)):
            raise ModelLoadError(f"manifest declares {kind} {spec.name!r} as {spec.describe()}, "
                                 f"the model has {real.describe()}")


def _ort_message(exc: Exception) -> str:
    """onnxruntime messages start with a C++ location; keep the part a user can act on."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(" : ", 1)[-1] if text.startswith("[ONNXRuntimeError]") else text
