"""The real pretrained transformer path: all-MiniLM-L6-v2 (offline) through export and dynamic INT8,
measured by cosine against the float model. (The 0.01 tolerance with its node fallback takes
minutes on this model and runs in benchmarks.compression.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli

pytestmark = pytest.mark.slow


def test_minilm_dynamic_int8(tmp_path):
    from compress.examples import minilm

    onnx_path = minilm.export_onnx(tmp_path / "minilm.onnx")
    toks = minilm.tokens(minilm.SENTENCES[:12])
    np.savez(tmp_path / "eval.npz", input_ids=toks["input_ids"],
             attention_mask=toks["attention_mask"])
    result = CliRunner().invoke(cli, [
        "compress", str(onnx_path), "--output", str(tmp_path / "pkg"), "--eval",
        str(tmp_path / "eval.npz"), "--metric", "cosine", "--tolerance", "0.05",
        "--quantize", "dynamic", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    chosen = next(c for c in doc["candidates"] if c["chosen"])
    assert chosen["name"].startswith("dynamic-int8")
    assert chosen["quality"]["value"] >= 0.95  # min cosine over the sentences
    assert chosen["size_ratio"] > 3.0  # embeddings and weight MatMuls in int8
