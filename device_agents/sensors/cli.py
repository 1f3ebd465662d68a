"""`edgefleet sensor simulate`: a thin command over sensors.simulate.SensorSimulator."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from device_agents.config import BrokerConfig
from device_agents.fleet.cli import broker_options
from device_agents.sensors.datasets import load_dataset
from device_agents.sensors.simulate import Progress, SensorSimulator


@click.group()
def sensor() -> None:
    """Simulated sensors: publish real or synthetic samples to a device's input stream.

    \b
    Example:
      edgefleet sensor simulate --device edge-001 --stream camera0 --dataset digits --wait-results
    """


@sensor.command("simulate", short_help="Stream a dataset to a device; score its answers.")
@click.option("--device", required=True, help="Device id to send to.")
@click.option("--stream", required=True, help="Sensor stream: edgefleet/v1/DEVICE/in/STREAM.")
@click.option("--dataset", required=True,
              help="digits (scikit-learn's digits test split, with labels), sine, or a .npz file "
                   "(array x, or the first array; optional labels in y or labels).")
@click.option("--rate", "rate_hz", type=float, default=10.0, show_default=True,
              help="Messages per second; 0 sends as fast as possible.")
@click.option("--count", type=int, default=100, show_default=True,
              help="Messages to send (cycling through the dataset).")
@click.option("--qos", type=int, default=1, show_default=True, help="MQTT QoS: 0 or 1.")
@click.option("--encoding", type=click.Choice(["lists", "b64"]), default="lists",
              show_default=True, help='Tensor wire form: nested lists, or {"dtype","shape","b64"}.')
@click.option("--wait-results", is_flag=True,
              help="Subscribe to the device's results and errors, match them by id and report "
                   "answered, errors, lost, accuracy and latency; exit 1 if any message is lost.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait after the last message for the missing answers.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the broker at start.")
@click.option("--window", type=int, default=32, show_default=True,
              help="sine: samples per message.")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="sine: standard deviation of added Gaussian noise.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (no progress bar).")
@broker_options
def simulate_command(device: str, stream: str, dataset: str, rate_hz: float, count: int, qos: int,
                     encoding: str, wait_results: bool, timeout: float, connect_timeout: float,
                     window: int, noise: float, as_json: bool, broker_config: BrokerConfig) -> None:
    """Publish sensor messages {"id", "ts", "data"} to a device at a steady rate, and with
    --wait-results score the answers.

    \b
    Example:
      edgefleet sensor simulate --device edge-001 --stream camera0 --dataset digits \\
          --rate 50 --count 500 --wait-results
      edgefleet sensor simulate --device edge-001 --stream vib0 --dataset sine --window 64 \\
          --noise 0.1 --rate 0 --count 10000 --qos 0
    """
    samples = load_dataset(dataset, window=window, noise=noise)
    bar = _Bar(count, wait_results, disabled=as_json)
    simulator = SensorSimulator(broker_config, device, stream, samples, rate_hz=rate_hz,
                                count=count, qos=qos, wait_results=wait_results, timeout=timeout,
                                encoding=encoding, connect_timeout=connect_timeout,
                                on_progress=bar.update)
    try:
        with _transport_warnings_silenced():
            summary = simulator.run()
    finally:
        bar.close()
    doc = summary.as_dict()
    if as_json:
        click.echo(json.dumps(doc))
    else:
        _print_summary(doc)
    if summary.interrupted:
        sys.exit(130)  # the shell's code for Ctrl-C, after the summary of what was done
    sys.exit(1 if wait_results and summary.lost else 0)


class _Bar:
    """A rich progress bar on stderr (stdout stays for the summary). It starts at the first
    update, which comes once connected: a failure to connect prints only its error line."""

    def __init__(self, count: int, wait_results: bool, disabled: bool) -> None:
        self.count, self.wait_results, self.disabled = count, wait_results, disabled
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def update(self, p: Progress) -> None:
        if self.disabled:
            return
        if self._progress is None:
            self._start()
        bar = self._progress
        bar.update(self._tasks["sent"], completed=p.sent)
        if self.wait_results:
            info = [f"{p.errors} errors"]
            if p.accuracy is not None:
                info.append(f"accuracy {p.accuracy:.1%}")
            if p.p50_ms is not None:
                info.append(f"p50 {p.p50_ms:.1f} ms")
            if p.version is not None:
                info.append(f"v{p.version}")
            bar.update(self._tasks["answered"], completed=p.answered + p.errors,
                       info="  ".join(info))

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        self._tasks["sent"] = self._progress.add_task("sent", total=self.count, info="")
        if self.wait_results:
            self._tasks["answered"] = self._progress.add_task("answered", total=self.count,
                                                              info="")
        self._progress.start()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextlib.contextmanager
def _transport_warnings_silenced() -> Iterator[None]:
    """Without a logging setup, Python prints the transport's connect warnings on stderr by
    itself, doubling the one error line; the summary reports reconnects instead."""
    logger = logging.getLogger("edgefleet")
    if logger.handlers or logging.getLogger().handlers:
        yield  # someone configured logging: their choice
        return
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=f"{s['dataset']} -> {s['device']}/{s['stream']}",
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rate = s["achieved_rate_hz"]
    table.add_row("sent", f"{s['sent']} in {s['seconds']:.2f} s"
                  + (f" ({rate:.1f} msg/s)" if rate else "") + f", QoS {s['qos']}, {s['encoding']}")
    if s["interrupted"]:
        table.add_row("interrupted", "stopped by Ctrl-C; answers were not waited for")
    if s["unconfirmed"]:
        table.add_row("not taken by the broker", str(s["unconfirmed"]))
    if s["reconnects"]:
        table.add_row("reconnects", str(s["reconnects"]))
    if s["answered"] is not None:
        table.add_row("sent / answered / errors / lost",
                      f"{s['sent']} / {s['answered']} / {s['errors']} / {s['lost']}")
        if s["error_codes"]:
            table.add_row("error codes", ", ".join(f"{k} {v}" for k, v in s["error_codes"].items()))
        if s["duplicates"]:
            table.add_row("duplicates (counted once)", str(s["duplicates"]))
        if s["accuracy"] is not None:
            table.add_row("accuracy", f"{s['accuracy']:.1%}")
        for version, answers in s["answered_by_version"].items():
            acc = s["accuracy_by_version"].get(version)
            table.add_row(f"model v{version}", f"{answers} answers"
                          + (f", accuracy {acc:.1%}" if acc is not None else ""))
        if s["latency_ms"]:
            table.add_row("round trip", f"p50 {s['latency_ms']['p50']:.1f} ms, "
                          f"p99 {s['latency_ms']['p99']:.1f} ms")
    Console().print(table)
