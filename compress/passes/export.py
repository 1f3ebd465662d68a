"""Sources -> ONNX: an .onnx file, a TorchScript file, or `package.module:factory` (+ weights).

PyTorch models go through torch.onnx.export, the dynamo exporter first and the TorchScript
exporter as a fallback, with a dynamic batch axis. Every export is verified: the graph's outputs
against the torch model's on sample inputs; a mismatch is an error, not a warning.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import ExportError, SourceError

if TYPE_CHECKING:
    import torch

# outputs must agree within ATOL + RTOL * max|reference|
ATOL, RTOL = 1e-4, 1e-3


@dataclass(frozen=True)
class Exported:
    path: Path
    method: str  # "onnx" (given), "dynamo", "torchscript"
    max_abs_diff: float | None
    module: Any = None  # the torch module, for passes that work before export (pruning)


def load_torch_source(source: str, weights: Path | None) -> torch.nn.Module:
    """A TorchScript file or `package.module:factory` (+ a state dict) as an nn.Module in eval mode."""
    import torch

    if ":" in source and not Path(source).exists():
        module_name, _, attr = source.partition(":")
        sys.path.insert(0, str(Path.cwd()))
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SourceError(f"cannot import {source}: {exc}") from None
        finally:
            sys.path.pop(0)
        try:
            model = factory()
        except Exception as exc:
            raise SourceError(f"{source}() failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, torch.nn.Module):
            raise SourceError(f"{source}() returned {type(model).__name__}, not a torch.nn.Module")
        if weights is not None:
            _load_weights(model, weights)
        return model.eval()
    path = Path(source)
    if not path.exists():
        raise SourceError(f"model source {source} does not exist (an .onnx file, a TorchScript "
                          ".pt/.ts file, or package.module:factory)")
    try:
        scripted: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(path), map_location="cpu")
    except Exception as exc:
        raise SourceError(f"{path} is not a TorchScript file: {str(exc).splitlines()[0]}") from None
    return scripted.eval()


def _load_weights(model: torch.nn.Module, weights: Path) -> None:
    import torch

    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SourceError(f"weights file {weights} does not exist") from None
    except Exception as exc:
        raise SourceError(f"cannot read weights {weights}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise SourceError(f"weights {weights} do not fit the model: "
                          f"{str(exc).splitlines()[0]}") from None


def copy_onnx(source: Path, out: Path) -> Exported:
    import onnx

    if not source.exists():
        raise SourceError(f"model source {source} does not exist")
    try:
        onnx.checker.check_model(str(source))
    except Exception as exc:
        raise SourceError(f"{source} is not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    shutil.copyfile(source, out)
    return Exported(path=out, method="onnx", max_abs_diff=None)


def export_torch(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]], out: Path,
                 opset: int) -> Exported:
    """Export with a dynamic batch axis and verify against torch; dynamo first."""
    import torch

    names = list(shapes)
    torch.manual_seed(0)
    sample = tuple(torch.randn(2, *shape[1:]) for shape in shapes.values())
    errors = []
    for method in ("dynamo", "torchscript"):
        try:
            _export(module, sample, names, out, opset, dynamo=method == "dynamo")
        except Exception as exc:
            errors.append(f"{method}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        _name_batch_axis(out)
        diff = _verify(module, out, names, sample)
        return Exported(path=out, method=method, max_abs_diff=diff, module=module)
    raise ExportError("torch.onnx.export failed with both exporters: " + "; ".join(errors))


def _export(module: torch.nn.Module, sample: tuple[Any, ...], names: list[str], out: Path,
            opset: int, *, dynamo: bool) -> None:
    import torch

    # the exporters print progress on stdout, which belongs to `--json` output, and log
    # warnings about optional operator sets (torchvision) that say nothing about this model
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim.DYNAMIC
            program = torch.onnx.export(
                module, sample, input_names=names, dynamic_shapes=tuple({0: batch} for _ in names),
                dynamo=True, opset_version=max(opset, 18), verbose=False)
            assert program is not None
            program.save(str(out))
        else:
            torch.onnx.export(
                module, sample, str(out), input_names=names, opset_version=opset, dynamo=False,
                dynamic_axes={n: {0: "batch"} for n in names})


def _name_batch_axis(path: Path) -> None:
    """Call the dynamic first axis 'batch' on every input and output, whatever the exporter chose."""
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.save(model, str(path))


def _verify(module: torch.nn.Module, path: Path, names: list[str], sample: tuple[Any, ...]
            ) -> float:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (2, 1):
        inputs = tuple(t[:batch] for t in sample)
        with torch.no_grad():
            ref = module(*inputs)
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        for r, g in zip(refs, got, strict=False):
            r_np = r.detach().numpy()
            if r_np.shape != g.shape:
                raise ExportError(f"exported graph gives shape {list(g.shape)} where torch gives "
                                  f"{list(r_np.shape)} (batch {batch})")
            diff = float(np.max(np.abs(r_np - g))) if r_np.size else 0.0
            if diff > ATOL + RTOL * float(np.max(np.abs(r_np), initial=0.0)):
                raise ExportError(f"exported graph differs from the torch model by {diff:.3g} "
                                  f"(batch {batch}); the export is not faithful")
            worst = max(worst, diff)
    return worst
