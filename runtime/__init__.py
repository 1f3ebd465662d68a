"""ONNX inference for edge boxes: packages, input checks, micro-batching, hot swap, metrics.

Imports onnxruntime and numpy only (never torch or onnx), so an edge box runs it as it is.
"""

from runtime.batching import BatchResult, MicroBatcher
from runtime.errors import EdgefleetError, InputError
from runtime.metrics import Metrics, MetricsSnapshot
from runtime.model import Model, SessionConfig
from runtime.package import Manifest, Package, load_package, write_package
from runtime.schema import TensorSpec
from runtime.slot import ModelSlot

__all__ = [
    "BatchResult",
    "EdgefleetError",
    "InputError",
    "Manifest",
    "Metrics",
    "MetricsSnapshot",
    "MicroBatcher",
    "Model",
    "ModelSlot",
    "Package",
    "SessionConfig",
    "TensorSpec",
    "load_package",
    "write_package",
]
