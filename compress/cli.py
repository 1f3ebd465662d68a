"""`edgefleet compress`: a thin command over compress.pipeline.run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from compress.recipe import Recipe, parse_input_shape

_PATH = click.Path(path_type=Path)


@click.command()
@click.argument("source")
@click.option("--output", type=_PATH, required=True, help="Package directory to write.")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="[NAME=]1x3x32x32 for PyTorch sources (repeatable).")
@click.option("--weights", type=_PATH, help="State dict for a module:factory source.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--prune", type=float, default=0.0, show_default=True, help="Ratio 0..0.95.")
@click.option("--prune-method", type=click.Choice(["magnitude", "channel"]), default="magnitude",
              show_default=True)
@click.option("--finetune", type=_PATH, help="DATA.npz with labels for recovery training.")
@click.option("--finetune-epochs", type=int, default=3, show_default=True)
@click.option("--quantize", type=click.Choice(["auto", "dynamic", "static", "fp16", "none"]),
              default="auto", show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True)
@click.option("--calibration", type=_PATH, help="DATA.npz for static INT8 calibration.")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]),
              default="minmax", show_default=True)
@click.option("--eval", "eval_path", type=_PATH, help="DATA.npz to measure quality on.")
@click.option("--metric", type=click.Choice(["accuracy", "cosine", "mse"]),
              help="Default: accuracy when the eval data has labels, else cosine.")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Allowed loss: accuracy points as a fraction, or 1 - cosine.")
@click.option("--name", help="Package name (default: from the source).")
@click.option("--version", "version", default="1", show_default=True)
@click.option("--labels", type=_PATH, help="Text file, one label per line.")
@click.option("--sign-key", type=_PATH, help="Ed25519 private key (edgefleet keys generate).")
@click.option("--threads", type=int, default=2, show_default=True,
              help="Threads for latency measurement (as on the device).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout.")
def compress(source: str, output: Path, input_shapes: tuple[str, ...], weights: Path | None,
             opset: int, prune: float, prune_method: Any, finetune: Path | None,
             finetune_epochs: int, quantize: Any, per_channel: bool, calibration: Path | None,
             calibration_method: Any, eval_path: Path | None, metric: Any, tolerance: float,
             name: str | None, version: str, labels: Path | None, sign_key: Path | None,
             threads: int, as_json: bool) -> None:
    """Compress a model into a signed package and prove it: smaller, faster, still accurate.

    SOURCE is an .onnx file, a TorchScript file (.pt/.ts), or package.module:factory.

    \b
    Example:
      edgefleet compress digits.onnx --output pkg/digits --eval test.npz \\
          --calibration train.npz --labels labels.txt --sign-key keys/fleet.key
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for i, text in enumerate(input_shapes):
        key, shape = parse_input_shape(text)
        shapes[key or ("input" if len(input_shapes) == 1 else f"input{i}")] = shape
    recipe = Recipe(
        source=source, output=output, input_shapes=shapes, weights=weights, opset=opset,
        prune=prune, prune_method=prune_method, finetune=finetune,
        finetune_epochs=finetune_epochs, quantize=quantize, per_channel=per_channel,
        calibration=calibration, calibration_method=calibration_method, eval=eval_path,
        metric=metric, tolerance=tolerance, name=name, version=version, labels=labels,
        sign_key=sign_key, threads=threads)
    from compress.pipeline import run
    from compress.report import report_dict

    if as_json:
        result = run(recipe)
        click.echo(json.dumps(report_dict(result, recipe), indent=2))
        return
    with RichReporter() as reporter:
        result = run(recipe, reporter)
    print_summary(report_dict(result, recipe))
    click.echo(f"wrote {result.package.path} ({result.chosen.name}"
               f"{', signed' if result.package.signed else ''}); full report in report.md")


def print_summary(doc: dict[str, Any], console: Any = None) -> None:
    """The report as a table: one row per candidate, the chosen one starred (also the demo's)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{doc['name']} v{doc['version']}: {doc['metric']}, tolerance "
                        f"{doc['tolerance']}, {doc['threads']} thread(s)", title_justify="left")
    for col, justify in (("candidate", "left"), ("KiB", "right"), ("smaller", "right"),
                         ("send KiB", "right"), ("ms", "right"), ("faster", "right"),
                         (doc["metric"], "right"), ("ok", "center")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in doc["candidates"]:
        q = r["quality"] or {}
        table.add_row(f"[bold]{r['name']} *[/bold]" if r["chosen"] else r["name"],
                      f"{r['size'] / 1024:,.0f}", f"{r['size_ratio']}x",
                      f"{r['transfer_size'] / 1024:,.0f}", f"{r['latency_ms']}",
                      f"{r['speedup']}x", f"{q.get('value')}",
                      "yes" if r["within_tolerance"] else "no")
    console = console or Console()
    console.print(table)
    console.print(f"* chosen: {doc['reason']}")
    for note in doc["notes"]:
        console.print(f"- {note}")


class RichReporter:
    """Progress bars for the long steps (calibration, evaluation, timing, fallback) on stderr."""

    def __init__(self, console: Any = None) -> None:
        self.console = console

    def __enter__(self) -> RichReporter:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), console=self.console or Console(stderr=True),
                                  transient=True)
        self._progress.__enter__()
        self._tasks: dict[str, Any] = {}
        self._stage = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def stage(self, text: str) -> None:
        self._progress.update(self._stage, description=text)

    def start(self, task: str, total: int) -> None:
        self._tasks[task] = self._progress.add_task(task, total=total)

    def advance(self, task: str, amount: int = 1) -> None:
        if task in self._tasks:
            self._progress.advance(self._tasks[task], amount)

    def finish(self, task: str) -> None:
        if task in self._tasks:
            self._progress.remove_task(self._tasks.pop(task))
