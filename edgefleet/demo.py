"""`edgefleet demo`: the whole system end to end on this machine, in one command.

Trains two CNNs on scikit-learn's digits, compresses each into a signed package (printing the
compression report), starts the embedded broker (or uses `--broker`), starts an agent process with
version 1, streams the digits test split to it as an MQTT sensor, deploys version 2 over MQTT while
the stream runs, and prints accuracy per version, latency, sent/answered/lost and what the update
cost. Every process it starts is stopped on the way out, also on Ctrl-C.

The broker and the agent run as separate processes, as they would on a site: the demo's own
process (the sensor and the operator) then never shares a GIL with them, and the figures it
prints are what a real sensor would see.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import numpy as np

DEVICE = "demo-box"
STREAM = "camera0"


@click.command()
@click.option("--broker", "broker_url", envvar="EDGEFLEET_BROKER", default=None,
              help="Use this broker (mqtt://host:port) instead of starting the embedded one.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep keys, packages, logs and the agent's data here (default: a temporary "
                   "directory, removed after).")
@click.option("--quick", is_flag=True, help="Shorter training and stream (same code path).")
@click.option("--rate", default=100.0, show_default=True, type=click.FloatRange(min=1),
              help="Sensor messages per second.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def demo(broker_url: str | None, workdir: Path | None, quick: bool, rate: float,
         as_json: bool) -> None:
    """Run the whole system end to end on this machine: train, compress, serve over MQTT,
    update over MQTT while streaming, and account for every message.

    \b
    Example:
      edgefleet demo
      edgefleet demo --quick --json
      edgefleet demo --broker mqtt://127.0.0.1:1883   # a Mosquitto you run
    """
    try:
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"the demo trains a model and needs the compress extra "
                                   f"(pip install 'edgefleet[all]'): {exc}") from None
    from rich.console import Console

    console = Console(stderr=as_json, quiet=as_json)
    tmp = None if workdir else tempfile.mkdtemp(prefix="edgefleet-demo-")
    root = workdir or Path(tmp)  # type: ignore[arg-type]
    # SIGTERM is handled like Ctrl-C, so the processes started here are stopped either way.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = Demo(root, quick, rate, broker_url, console).run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopped every process the demo started")
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    problems = []
    if summary["stream"]["lost"]:
        problems.append(f"{summary['stream']['lost']} sensor messages were lost")
    if not summary["update"]["ok"]:
        problems.append(f"the update failed: {summary['update']['error']}")
    if problems:
        raise click.ClickException("; ".join(problems))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class Demo:
    """The steps, in order; each prints what it did."""

    def __init__(self, root: Path, quick: bool, rate: float, broker_url: str | None,
                 console: Any) -> None:
        self.root, self.quick, self.rate = root, quick, rate
        self.broker_url, self.console = broker_url, console
        self.logs = root / "logs"

    def run(self) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        started = time.monotonic()
        packages, reports = self.build_packages()
        with ExitStack() as stack:
            url = self.broker_url or self.start_broker(stack)
            self.start_agent(stack, url, packages["1"])
            stream, update = self.stream_and_update(url, packages["2"])
        summary = {"stream": stream, "update": update, "compression": reports,
                   "broker": "external" if self.broker_url else "embedded (amqtt)",
                   "seconds": round(time.monotonic() - started, 1)}
        self.print_summary(summary)
        return summary

    # -- 1-2. train and compress ------------------------------------------------------------------

    def build_packages(self) -> tuple[dict[str, Path], dict[str, Any]]:
        from compress.examples import digits
        from compress.pipeline import run
        from compress.recipe import Recipe
        from compress.report import report_dict
        from runtime.signing import generate_keypair

        console = self.console
        console.rule("[bold]1. Train two CNNs on scikit-learn's digits (real 8x8 scans)")
        split = digits.load_digits_split()
        keys = self.root / "keys"
        if not (keys / "fleet.key").exists():
            generate_keypair(keys)
        data = self.root / "data-files"
        data.mkdir(exist_ok=True)
        np.savez(data / "eval.npz", image=split.x_test, labels=split.y_test)
        np.savez(data / "calibration.npz", image=split.x_train[:256])
        (data / "labels.txt").write_text("\n".join(digits.LABELS) + "\n")
        onnx: dict[str, Path] = {}
        plan = (("1", 2 if self.quick else 3, 8, 0), ("2", 4 if self.quick else 8, 16, 1))
        for version, epochs, width, seed in plan:
            with console.status(f"training version {version} ({epochs} epochs, width {width})"):
                model = digits.build_cnn(width=width)
                accuracy = digits.train(model, split, epochs=epochs, seed=seed)
                # raw pixels in, probabilities out: any sensor can send what it reads
                onnx[version] = digits.export_onnx(model, self.root / f"digits-v{version}.onnx",
                                                   embed_processing=True)
            console.print(f"version {version}: {accuracy:.1%} test accuracy in torch")

        from compress.cli import RichReporter, print_summary

        console.rule("[bold]2. Compress each into a signed package (edgefleet compress)")
        packages, reports = {}, {}
        for version, path in onnx.items():
            recipe = Recipe(source=str(path), output=self.root / f"digits-v{version}",
                            eval=data / "eval.npz", calibration=data / "calibration.npz",
                            labels=data / "labels.txt", name="digits", version=version,
                            sign_key=keys / "fleet.key", threads=2)
            with RichReporter(self.console) as reporter:
                result = run(recipe, reporter)
            doc = report_dict(result, recipe)
            print_summary(doc, console)
            packages[version] = result.package.path
            chosen = next(c for c in doc["candidates"] if c["chosen"])
            reports[version] = {"chosen": chosen["name"], "bytes": chosen["size"],
                                "size_ratio": chosen["size_ratio"], "speedup": chosen["speedup"],
                                "accuracy": (chosen["quality"] or {}).get("value")}
        return packages, reports

    # -- 3-4. broker and agent ------------------------------------------------------------------

    def start_broker(self, stack: ExitStack) -> str:
        self.console.rule("[bold]3. Start the embedded MQTT broker (edgefleet broker)")
        port = _free_port()
        proc = self._spawn(stack, "broker", ["broker", "--port", str(port)])
        _wait_listening("127.0.0.1", port, proc, self.logs / "broker.log")
        url = f"mqtt://127.0.0.1:{port}"
        self.console.print(f"broker listening on {url} (pid {proc.pid})")
        return url

    def start_agent(self, stack: ExitStack, url: str, package: Path) -> None:
        from device_agents.fleet.client import FleetClient

        self.console.rule("[bold]4. Start an agent (edgefleet agent run) serving version 1")
        config = self.root / "agent.toml"
        config.write_text("\n".join([
            f'device_id = "{DEVICE}"', 'groups = ["demo"]', f'data_dir = "{self.root / "agent"}"',
            "", "[uplink]", f'url = "{url}"', "keepalive_s = 10", "",
            "[[models]]", f'package = "{package}"', f'streams = ["{STREAM}"]', "",
            "[security]", f'trusted_keys = ["{self.root / "keys" / "fleet.pub"}"]',
            "require_signed = true", "", "[agent]", "telemetry_interval_s = 2", ""]))
        proc = self._spawn(stack, "agent", ["agent", "run", "--config", str(config)])
        with FleetClient(_broker(url), "demo-watch") as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = client.devices(wait_s=0.5).get(DEVICE)
                if status and status.get("state") == "online":
                    models = ", ".join(f"{m['name']} v{m['version']}" for m in status["models"])
                    self.console.print(f"{DEVICE} online (epoch {status['epoch']}, pid {proc.pid}) "
                                       f"serving {models}")
                    return
                if proc.poll() is not None:
                    break
        raise click.ClickException(f"the agent did not come online; see {self.logs / 'agent.log'}:"
                                   f" {_tail(self.logs / 'agent.log')}")

    def _spawn(self, stack: ExitStack, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "edgefleet", *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C reaches the demo only
        log.close()
        stack.callback(_stop_process, proc, name, self.console)
        return proc

    # -- 5-6. stream, and update mid-stream -----------------------------------------------------

    def stream_and_update(self, url: str, package_v2: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from device_agents.sensors.datasets import digits
        from device_agents.sensors.simulate import SensorSimulator

        console = self.console
        dataset = digits()
        count = len(dataset) * (2 if self.quick else 4)
        console.rule(f"[bold]5. Stream the digits test split as an MQTT sensor ({count} images at "
                     f"{self.rate:g}/s); 6. deploy version 2 over MQTT mid-stream")
        update: dict[str, Any] = {"ok": False, "error": "not started"}
        deployer: threading.Thread | None = None
        columns = (TextColumn("streaming"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"))
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("stream", total=count, info="")

            def on_progress(p: Any) -> None:
                nonlocal deployer
                acc = f"{p.accuracy:.1%}" if p.accuracy is not None else "-"
                p50 = f"{p.p50_ms:.1f} ms" if p.p50_ms is not None else "-"
                bar.update(task, completed=p.answered + p.errors,
                           info=f"v{p.version or '?'}  accuracy {acc}  p50 {p50}  "
                                f"update: {update.get('phase', '-')}")
                if deployer is None and p.sent >= count // 4:
                    deployer = threading.Thread(target=self.deploy, args=(url, package_v2, update,
                                                                          bar.console),
                                                name="demo-deploy", daemon=True)
                    deployer.start()

            sim = SensorSimulator(_broker(url), DEVICE, STREAM, dataset,
                                  rate_hz=self.rate, count=count, qos=1, wait_results=True,
                                  timeout=60, on_progress=on_progress, progress_interval_s=0.2)
            summary = sim.run()
            if summary.interrupted:
                raise KeyboardInterrupt
            bar.update(task, completed=(summary.answered or 0) + (summary.errors or 0))
        if deployer is not None:
            deployer.join(120)
        return summary.as_dict(), update

    def deploy(self, url: str, package: Path, update: dict[str, Any], console: Any) -> None:
        """`edgefleet fleet deploy` in a thread: chunked, signed, self-tested, health-checked."""
        from device_agents.fleet.client import FleetClient
        from device_agents.fleet.deploy import deploy, plan

        started = time.monotonic()
        update.update(phase="starting", error=None)
        try:
            the_plan = plan(package, health_window_s=3.0, max_error_rate=0.05)
            with FleetClient(_broker(url), "demo-deploy") as client:
                console.print(f"deploying digits v{the_plan.version} ({the_plan.total_bytes:,} "
                              f"bytes, {len(the_plan.chunks)} chunks) to {DEVICE} over MQTT")
                outcome = deploy(client, the_plan, [DEVICE], timeout=120,
                                 on_update=lambda o: update.update(phase=o.phase))[0]
        except Exception as exc:  # reported in the summary; the stream goes on
            update.update(ok=False, phase="failed", error=str(exc))
            return
        update.update(outcome.as_dict())
        update.update(seconds=round(time.monotonic() - started, 2),
                      package_bytes=the_plan.total_bytes, sent_bytes=outcome.need_bytes)
        console.print(f"update {'active and healthy' if outcome.ok else 'FAILED'} in "
                      f"{update['seconds']} s: {outcome.need_bytes:,} of {the_plan.total_bytes:,} "
                      f"bytes sent{'' if outcome.ok else ': ' + str(outcome.error)}")

    # -- summary --------------------------------------------------------------------------------

    def print_summary(self, s: dict[str, Any]) -> None:
        from rich.table import Table

        self.console.rule("[bold]Summary")
        st, up = s["stream"], s["update"]
        table = Table(show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for version, acc in sorted(st["accuracy_by_version"].items()):
            table.add_row(f"accuracy v{version}", f"{acc:.1%} ({st['answered_by_version'][version]} "
                                                  "answers)")
        lat = st.get("latency_ms") or {}
        table.add_row("round trip (sensor -> agent -> sensor)",
                      f"p50 {lat.get('p50', '-')} ms, p99 {lat.get('p99', '-')} ms")
        table.add_row("sent / answered / errors / lost",
                      f"{st['sent']} / {st['answered']} / {st['errors']} / {st['lost']}")
        if up.get("ok"):
            table.add_row("update v2", f"active and healthy in {up['seconds']} s; "
                                       f"{up['sent_bytes']:,} of {up['package_bytes']:,} bytes sent")
        else:
            table.add_row("update v2", f"[red]failed: {up.get('error')}")
        for version, c in s["compression"].items():
            table.add_row(f"package v{version}", f"{c['chosen']}, {c['bytes']:,} bytes "
                                                 f"({c['size_ratio']}x smaller, {c['speedup']}x faster)")
        table.add_row("took", f"{s['seconds']} s, broker {s['broker']}")
        self.console.print(table)


def _broker(url: str) -> Any:
    from device_agents.config import BrokerConfig

    return BrokerConfig(url=url, session_expiry_s=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log: Path,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the broker exited ({proc.returncode}): {_tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise click.ClickException(f"the broker did not listen on {host}:{port} within {timeout:g} s")


def _stop_process(proc: subprocess.Popen[bytes], name: str, console: Any) -> None:
    """SIGTERM (the agent flushes and says offline), then SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    console.print(f"stopped the {name} (pid {proc.pid}, exit {proc.returncode})")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
