"""Real data (scikit-learn digits) and small real models for the compression tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

FACTORY_MODULE = '''
import torch
from torch import nn


def cnn():
    from compress.examples.digits import build_cnn
    return build_cnn(width=8)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def broken():
    raise ValueError("no such checkpoint")


def not_a_module():
    return 42
'''


@pytest.fixture(scope="session")
def cdata(tmp_path_factory, digits_split) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """Normalized digits as .npz files, a trained CNN (state dict and ONNX), labels, a factory."""
    from compress.examples import digits

    root = tmp_path_factory.mktemp("compress-data")
    s = digits_split
    np.savez(root / "train.npz", input=digits.normalize(s.x_train), labels=s.y_train)
    np.savez(root / "test.npz", input=digits.normalize(s.x_test), labels=s.y_test)
    np.savez(root / "calib.npz", input=digits.normalize(s.x_train[:128]))
    (root / "labels.txt").write_text("\n".join(digits.LABELS) + "\n")
    (root / "factories.py").write_text(FACTORY_MODULE)
    torch.manual_seed(0)
    net = digits.build_cnn(width=8)
    digits.train(net, s, epochs=5)
    torch.save(net.state_dict(), root / "cnn.pt")
    digits.export_onnx(net, root / "cnn.onnx")
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 10))
    digits.train(mlp, s, epochs=5)
    torch.save(mlp.state_dict(), root / "mlp.pt")
    traced = torch.jit.trace(net.eval(), torch.zeros(1, 1, 8, 8))
    traced.save(str(root / "cnn.ts"))
    return {k: root / v for k, v in {
        "root": ".", "train": "train.npz", "test": "test.npz", "calib": "calib.npz",
        "labels": "labels.txt", "cnn_weights": "cnn.pt", "cnn_onnx": "cnn.onnx",
        "mlp_weights": "mlp.pt", "cnn_ts": "cnn.ts"}.items()}


@pytest.fixture
def factories(cdata, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(cdata["root"]))
    return "factories"
