"""Pruning, on the PyTorch model before export.

- magnitude: global unstructured magnitude pruning of Conv/Linear weights. It buys sparsity and
  a smaller compressed transfer (zeros compress), not speed: the dense kernels still multiply zeros.
- channel: structured pruning with Torch-Pruning, which traces the dependency graph and removes
  whole channels consistently across coupled layers, so the exported graph really is smaller.
Both can be followed by recovery fine-tuning (`--finetune DATA.npz` with labels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from compress.data import load_npz
from compress.errors import CompressError
from compress.progress import Quiet, Reporter
from compress.recipe import Recipe
from runtime.schema import TensorSpec

if TYPE_CHECKING:
    import torch


def prune(module: torch.nn.Module, recipe: Recipe, reporter: Reporter | None = None
          ) -> torch.nn.Module:
    import torch

    reporter = reporter or Quiet()
    if isinstance(module, torch.jit.ScriptModule):
        raise CompressError("pruning needs the Python module, not TorchScript: give the source as "
                            "package.module:factory with --weights")
    reporter.stage(f"pruning {recipe.prune:.0%} ({recipe.prune_method})")
    if recipe.prune_method == "channel":
        module = _channel(module, recipe)
        if recipe.finetune:
            finetune(module, recipe, reporter)
    else:
        masks = _magnitude(module, recipe.prune)
        if recipe.finetune:
            finetune(module, recipe, reporter)  # the masks keep pruned weights at zero
        _make_permanent(masks)
    return module.eval()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sparsity(module: torch.nn.Module) -> float:
    import torch

    weights = [m.weight for m in module.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.Conv1d)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def _prunable(module: torch.nn.Module) -> list[torch.nn.Module]:
    import torch

    return [m for m in module.modules()
            if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear)]


def _magnitude(module: torch.nn.Module, ratio: float) -> list[torch.nn.Module]:
    from torch.nn.utils import prune as tprune

    layers = _prunable(module)
    if not layers:
        raise CompressError("magnitude pruning found no Conv or Linear layer to prune")
    tprune.global_unstructured([(m, "weight") for m in layers],
                               pruning_method=tprune.L1Unstructured, amount=ratio)
    return layers


def _make_permanent(layers: list[torch.nn.Module]) -> None:
    from torch.nn.utils import prune as tprune

    for m in layers:
        tprune.remove(m, "weight")  # type: ignore[no-untyped-call]


def _channel(module: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    import torch
    import torch_pruning as tp

    examples = tuple(torch.randn(*shape) for shape in recipe.input_shapes.values())
    layers = _prunable(module)
    if not layers:
        raise CompressError("channel pruning found no Conv or Linear layer to prune")
    # The last layer's outputs are the model's classes or features: never remove those.
    ignored = [layers[-1]]
    try:
        pruner = tp.pruner.MetaPruner(
            module, examples, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=recipe.prune, ignored_layers=ignored, round_to=4)
        pruner.step()
    except Exception as exc:
        raise CompressError(f"channel pruning failed (Torch-Pruning could not trace the model): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return module


def finetune(module: torch.nn.Module, recipe: Recipe, reporter: Reporter) -> dict[str, Any]:
    """A few epochs of Adam on labelled data, to recover what pruning cost."""
    import torch

    assert recipe.finetune is not None
    specs = [TensorSpec(name=n, dtype="float32", shape=["batch", *s[1:]])
             for n, s in recipe.input_shapes.items()]
    data = load_npz(recipe.finetune, specs, role="finetune")
    if data.labels is None:
        raise CompressError(f"finetune data {recipe.finetune} needs a `labels` array")
    names = [s.name for s in specs]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    labels = torch.from_numpy(data.labels.astype(np.int64))
    tensors = [torch.from_numpy(data.inputs[n]) for n in names]
    steps_per_epoch = (len(data) + 63) // 64
    reporter.start("fine-tuning", recipe.finetune_epochs * steps_per_epoch)
    module.train()
    last = 0.0
    for _ in range(recipe.finetune_epochs):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            loss = loss_fn(module(*[t[idx] for t in tensors]), labels[idx])
            loss.backward()
            opt.step()
            last = loss.item()
            reporter.advance("fine-tuning")
    reporter.finish("fine-tuning")
    module.eval()
    return {"epochs": recipe.finetune_epochs, "final_loss": round(last, 4)}
