"""scikit-learn's bundled digits (1,797 real 8x8 scans, no download) and small CNNs trained on them.

Used wherever the project needs a real model with a real accuracy: the demo, the benchmarks and
the tests. Training is seeded and takes seconds on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.processing import Normalize

if TYPE_CHECKING:
    import torch

LABELS = [str(i) for i in range(10)]
# Pixels are 0..16; the package declares this normalization so sensors send raw values.
SCALE, MEAN, STD = 1.0 / 16.0, 0.5, 0.5


def preprocess() -> dict[str, Normalize]:
    """The manifest's `preprocess` for these models: the same normalization `train` applies."""
    return {"image": Normalize(scale=SCALE, mean=MEAN, std=STD)}


@dataclass(frozen=True)
class DigitsSplit:
    """Raw pixel values (0..16), float32, shape (N, 1, size, size); labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(size: int = 8, test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """A stratified train/test split, optionally upsampled (bilinear) to size x size."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype(np.float32)[:, np.newaxis]
    if size != 8:
        x = _resize(x, size)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, data.target.astype(np.int64), test_size=test_fraction, random_state=seed,
        stratify=data.target)
    return DigitsSplit(x_tr, y_tr, x_te, y_te)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F  # noqa: N812

    out = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                        align_corners=False)
    return out.numpy().astype(np.float32)


def build_cnn(width: int = 16, size: int = 8, hidden: int = 0) -> torch.nn.Module:
    """conv-relu-conv-relu-pool-(fc)-fc; `width` and `hidden` scale the cost per call."""
    from torch import nn

    layers: list[nn.Module] = [
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
    ]
    features = 2 * width * (size // 2) ** 2
    if hidden:
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, 10))
    return nn.Sequential(*layers)


def normalize(x: np.ndarray) -> np.ndarray:
    """The same normalization the package's manifest declares (for training in torch)."""
    return ((x * SCALE - MEAN) / STD).astype(np.float32)


def train(model: torch.nn.Module, split: DigitsSplit, *, epochs: int = 8, seed: int = 0,
          lr: float = 3e-3, batch_size: int = 64) -> float:
    """Adam on normalized pixels; returns test accuracy (0..1)."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(normalize(split.x_train))
    y = torch.from_numpy(split.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(normalize(split.x_test))).argmax(1).numpy()
    return float((pred == split.y_test).mean())


def export_onnx(model: torch.nn.Module, path: Path, size: int = 8, *,
                embed_processing: bool = False) -> Path:
    """Export with a dynamic batch axis named 'batch', input 'image' and output 'logits'.

    embed_processing=True puts the normalization and a softmax inside the graph, so the model
    takes raw pixels and returns probabilities, and the manifest declares no pre/post-processing:
    onnxruntime then does in one call what numpy would do in several.

    Uses the TorchScript exporter: for these plain CNNs it is exact and takes a fraction of a
    second, where the dynamo exporter takes several (the compression pipeline uses dynamo first).
    """
    import warnings

    import torch

    if embed_processing:
        model = torch.nn.Sequential(_normalize_layer(), model, torch.nn.Softmax(dim=1))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 1, size, size),), str(path), input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17, dynamo=False)
    return path



def _normalize_layer() -> torch.nn.Module:
    """x -> (x * SCALE - MEAN) / STD as a 1x1 convolution over the single channel."""
    import torch

    layer = torch.nn.Conv2d(1, 1, kernel_size=1)
    with torch.no_grad():
        layer.weight.fill_(SCALE / STD)
        assert layer.bias is not None
        layer.bias.fill_(-MEAN / STD)
    return layer


def build_resnet(width: int = 48) -> torch.nn.Module:
    """A small ResNet for 32x32 digits: a stem, three residual stages (width, 2x, 4x; the last two
    downsample), global pooling, a classifier. width=48 has about 0.68 M parameters, enough
    that compute, not per-call overhead, dominates a run."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.short: nn.Module = nn.Identity() if stride == 1 and cin == cout else \
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.bn1(self.conv1(x)))
            out: torch.Tensor = self.relu(self.bn2(self.conv2(y)) + self.short(x))
            return out

    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def resnet() -> torch.nn.Module:
    """Zero-argument factory for `edgefleet compress compress.examples.digits:resnet`."""
    return build_resnet()
