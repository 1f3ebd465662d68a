"""The compression pipeline's error tree: each is one clear line for the CLI (exit code 2)."""

from __future__ import annotations

from runtime.errors import EdgefleetError


class CompressError(EdgefleetError):
    """compress cannot do what was asked; the message says what to change."""


class SourceError(CompressError):
    """The model source cannot be loaded: missing file, factory that does not import, bad weights."""


class ExportError(CompressError):
    """torch.onnx.export failed, or the exported graph does not match the torch model."""


class DataError(CompressError):
    """A data file (.npz) is missing or does not fit the model's inputs."""


class QuantizationError(CompressError):
    """onnxruntime.quantization could not quantize the model (e.g. unsupported operator)."""


class ToleranceError(CompressError):
    """No candidate, not even the float model, meets the requested quality tolerance."""
