"""`edgefleet demo`: the system end to end on this machine, with what exists so far.

Trains a CNN on scikit-learn's digits, writes it as a signed package, verifies it, serves the
digits test split through the runtime (micro-batched, from concurrent sensor threads), hot-swaps
a retrained version mid-stream, and prints accuracy, latency and sent/answered/lost.
The MQTT agent, model delivery and the embedded broker join this demo as they land.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

SENSORS = 16
RATE_HZ = 500  # all sensors together: a busy site, and slow enough to watch


@dataclass
class Tally:
    """What the sensors saw: answers per version, latencies, failures."""

    sent: int = 0
    answered: int = 0
    errors: int = 0
    correct: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accuracy(self, version: str | None = None) -> float:
        versions = [version] if version else list(self.count)
        n = sum(self.count.get(v, 0) for v in versions)
        return sum(self.correct.get(v, 0) for v in versions) / n if n else 0.0


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep keys and packages here (default: a temporary directory, removed after).")
@click.option("--quick", is_flag=True, help="Shorter training and stream (same code path).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(workdir: Path | None, quick: bool, as_json: bool) -> None:
    """Run the whole system end to end on this machine.

    \b
    Example:
      edgefleet demo --quick
    """
    try:
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"the demo trains a model and needs the compress extra "
                                   f"(pip install 'edgefleet[compress]'): {exc}") from None
    from rich.console import Console

    console = Console(stderr=as_json, quiet=as_json)
    tmp = None if workdir else tempfile.mkdtemp(prefix="edgefleet-demo-")
    root = workdir or Path(tmp)  # type: ignore[arg-type]
    try:
        summary = _run(root, quick, console)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    if summary["lost"]:
        raise click.ClickException(f"{summary['lost']} requests were lost")


def _run(root: Path, quick: bool, console: Any) -> dict[str, Any]:
    from compress.examples import digits
    from runtime import MicroBatcher, Model, ModelSlot, load_package, write_package
    from runtime.signing import generate_keypair, load_private_key, load_public_key

    root.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1. Train a CNN on scikit-learn's digits")
    split = digits.load_digits_split()
    packages, key_dir = {}, root / "keys"
    if not (key_dir / "fleet.key").exists():
        generate_keypair(key_dir)
    key = load_private_key(key_dir / "fleet.key")
    for version, epochs, seed in (("1", 2 if quick else 4, 0), ("2", 5 if quick else 10, 1)):
        with console.status(f"training version {version} ({epochs} epochs)"):
            model = digits.build_cnn(width=8)
            accuracy = digits.train(model, split, epochs=epochs, seed=seed)
            onnx_path = digits.export_onnx(model, root / f"digits-v{version}.onnx")
        packages[version] = write_package(
            root / f"digits-v{version}", onnx_path, name="digits", version=version,
            labels=digits.LABELS, preprocess=digits.preprocess(), postprocess="softmax", top_k=3,
            sign_key=key, metrics={"package": {"accuracy": round(accuracy, 4)}}).path
        console.print(f"version {version}: test accuracy in torch {accuracy:.1%}")

    console.rule("[bold]2. Signed package")
    trusted = [load_public_key(key_dir / "fleet.pub")]
    pkg = load_package(packages["1"], trusted_keys=trusted, require_signed=True)
    console.print(f"{pkg.path}: {pkg.manifest.size:,} bytes, sha256 {pkg.manifest.sha256[:16]}…, "
                  f"signature verified with key {pkg.verified_by.fingerprint if pkg.verified_by else '?'}")

    console.rule("[bold]3. Serve the test split from concurrent sensors, hot-swap v2 mid-stream")
    slot = ModelSlot(Model(pkg, warmup_batches=(32,)))
    batcher = MicroBatcher(slot, max_batch=32, max_delay_ms=2)
    rounds = 2 if quick else 6
    total = rounds * len(split.x_test)
    v2 = Model(packages["2"], trusted_keys=trusted, require_signed=True, warmup_batches=(32,))
    tally = _stream(batcher, slot, split, total, v2, console)
    batcher.close()

    lat = np.array(tally.latencies) * 1000 if tally.latencies else np.zeros(1)
    summary = {
        "sent": tally.sent, "answered": tally.answered, "errors": tally.errors,
        "lost": tally.sent - tally.answered - tally.errors,
        "accuracy": {v: round(tally.accuracy(v), 4) for v in sorted(tally.count)},
        "answered_by_version": dict(sorted(tally.count.items())),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 3),
                       "p99": round(float(np.percentile(lat, 99)), 3)},
        "package_bytes": pkg.manifest.size,
    }
    _print_summary(console, summary)
    return summary


def _stream(batcher: Any, slot: Any, split: Any, total: int, v2: Any, console: Any) -> Tally:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    tally = Tally()
    start = time.perf_counter()
    next_index = iter(range(total))
    index_lock = threading.Lock()

    def sensor() -> None:
        while True:
            with index_lock:
                i = next(next_index, None)
            if i is None:
                return
            delay = start + i / RATE_HZ - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            j = i % len(split.x_test)
            with tally.lock:
                tally.sent += 1
            try:
                result = batcher.run(split.x_test[j], timeout=30)
            except Exception:
                with tally.lock:
                    tally.errors += 1
                continue
            version = result.model.version
            hit = int(np.argmax(result.outputs["logits"]) == split.y_test[j])
            with tally.lock:
                tally.answered += 1
                tally.count[version] = tally.count.get(version, 0) + 1
                tally.correct[version] = tally.correct.get(version, 0) + hit
                tally.latencies.append(result.queue_s + result.inference_s)

    threads = [threading.Thread(target=sensor, daemon=True) for _ in range(SENSORS)]
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    swapped = False
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("streaming", total=total, info="")
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.1)
            with tally.lock:
                done, acc = tally.answered + tally.errors, tally.accuracy()
                p50 = float(np.median(tally.latencies[-500:])) * 1000 if tally.latencies else 0
            progress.update(task, completed=done,
                            info=f"v{slot.current.version}  accuracy {acc:.1%}  p50 {p50:.2f} ms")
            if not swapped and done >= total // 2:
                slot.swap(v2)
                swapped = True
                progress.console.print(f"hot swap to version 2 after {done} answers")
        progress.update(task, completed=tally.answered + tally.errors)
    return tally


def _print_summary(console: Any, s: dict[str, Any]) -> None:
    from rich.table import Table

    console.rule("[bold]Summary")
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for version, acc in s["accuracy"].items():
        table.add_row(f"accuracy v{version}", f"{acc:.1%} ({s['answered_by_version'][version]} answers)")
    table.add_row("latency", f"p50 {s['latency_ms']['p50']} ms, p99 {s['latency_ms']['p99']} ms")
    table.add_row("sent / answered / errors / lost",
                  f"{s['sent']} / {s['answered']} / {s['errors']} / {s['lost']}")
    console.print(table)
