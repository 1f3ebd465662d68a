"""`edgefleet fleet ...`: deploy packages, roll back, and call devices over MQTT."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from device_agents.config import BrokerConfig, ConfigError, parse_broker_url

if TYPE_CHECKING:  # cryptography is imported only by the commands that sign
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--broker/--username/--password/--ca-file/--cert-file/--key-file, as every MQTT command."""
    options = [
        click.option("--broker", envvar="EDGEFLEET_BROKER", default="mqtt://127.0.0.1:1883",
                     show_default=True, help="mqtt://host:port or mqtts://host:port "
                     "(env EDGEFLEET_BROKER)."),
        click.option("--username", help="MQTT username."),
        click.option("--password", envvar="EDGEFLEET_PASSWORD", help="MQTT password "
                     "(env EDGEFLEET_PASSWORD; prefer the variable to the flag)."),
        click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="CA bundle."),
        click.option("--cert-file", type=click.Path(exists=True, dir_okay=False),
                     help="Client certificate (PEM)."),
        click.option("--key-file", type=click.Path(exists=True, dir_okay=False),
                     help="Client key (PEM)."),
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, broker: str, username: str | None, password: str | None,
                ca_file: str | None, cert_file: str | None, key_file: str | None,
                **kwargs: Any) -> Any:
        try:
            parse_broker_url(broker)
        except ValueError as exc:
            raise ConfigError("--broker", [str(exc)]) from None
        if password is not None:
            os.environ["EDGEFLEET_PASSWORD"] = password  # read by the transport, never logged
        config = BrokerConfig(url=broker, username=username,
                              password_env="EDGEFLEET_PASSWORD" if password and username else None,
                              ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                              session_expiry_s=0)
        return fn(*args, broker_config=config, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def sign_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--sign-key: the operator's Ed25519 key every request is signed with (CONTRACT 10)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, sign_key: str | None, **kwargs: Any) -> Any:
        from runtime.signing import load_private_key

        return fn(*args, sign_key=load_private_key(Path(sign_key)) if sign_key else None,
                  **kwargs)

    return click.option("--sign-key", envvar="EDGEFLEET_SIGN_KEY",
                        type=click.Path(exists=True, dir_okay=False),
                        help="Ed25519 private key (PEM) that signs the requests, for devices "
                        "with command_keys (env EDGEFLEET_SIGN_KEY).")(wrapper)


@click.group()
def fleet() -> None:
    """Operate the fleet: deploy packages, roll back, call devices, watch their status, collect
    their results."""


@fleet.command("deploy")
@click.argument("package_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--device", "devices", multiple=True, help="Target device (repeatable).")
@click.option("--group", help="Every device that announced this group.")
@click.option("--canary", type=click.IntRange(min=0), default=0, show_default=True,
              help="Deploy to this many devices first; go on only if they end active and healthy.")
@click.option("--timeout", type=float, default=600, show_default=True,
              help="Seconds each wave may take.")
@click.option("--health-window", type=float, default=30, show_default=True,
              help="Seconds a new version must stay healthy before it counts as done.")
@click.option("--max-error-rate", type=float, default=0.2, show_default=True,
              help="Error rate in the health window that triggers an automatic rollback.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@broker_options
@sign_option
def deploy_command(package_dir: Path, devices: tuple[str, ...], group: str | None, canary: int,
                   timeout: float, health_window: float, max_error_rate: float, as_json: bool,
                   broker_config: BrokerConfig, sign_key: Ed25519PrivateKey | None) -> None:
    """Deliver a package over MQTT and wait for every device's outcome (exit 0 only if every
    target ends active). With --group, a device whose status breaks the contract is skipped
    with a warning (and listed under `skipped` in --json); the others are deployed to.

    \b
    Example:
      edgefleet fleet deploy models/digits-v2 --group plant-a --canary 1 --timeout 300
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    from device_agents.fleet.client import FleetClient, FleetError
    from device_agents.fleet.deploy import Outcome, deploy, plan, resolve_targets

    if bool(devices) == bool(group):
        raise FleetError("give --device ID (repeatable) or --group G")
    the_plan = plan(package_dir, health_window, max_error_rate)
    err = Console(stderr=True)
    skipped: list[dict[str, str]] = []

    def skip(who: str, reason: str) -> None:  # the other devices of the group go on
        skipped.append({"device": who, "error": reason})
        click.echo(f"warning: skipping {who}: its status breaks the contract: {reason}", err=True)

    with FleetClient(broker_config, "deploy", sign_key) as client:
        targets = resolve_targets(client, devices, group, on_skip=skip)
        if not as_json:
            err.print(f"deploying {the_plan.name} {the_plan.version} "
                      f"({the_plan.total_bytes / 1e6:.2f} MB, {len(the_plan.chunks)} chunks) to "
                      f"{len(targets)} device(s)" + (f", {canary} canary first" if canary else ""))
        with Progress(TextColumn("{task.description:<24}"), BarColumn(),
                      TextColumn("{task.percentage:>3.0f}% {task.fields[phase]}"),
                      console=err, disable=as_json) as progress:
            tasks = {d: progress.add_task(d, total=1.0, phase="pending") for d in targets}

            def update(out: Outcome) -> None:
                progress.update(tasks[out.device], completed=out.progress,
                                phase=out.phase + (" (healthy)" if out.healthy else ""))

            outcomes = deploy(client, the_plan, targets, canary=canary, timeout=timeout,
                              wait_healthy=health_window > 0, on_update=update)
    ok = all(o.ok for o in outcomes)
    if as_json:
        click.echo(json.dumps({"name": the_plan.name, "version": the_plan.version, "ok": ok,
                               "bytes": the_plan.total_bytes, "devices": [o.as_dict() for o in outcomes],
                               "skipped": skipped}))
    else:
        table = Table(title=f"{the_plan.name} {the_plan.version}", title_justify="left")
        for col in ("device", "phase", "healthy", "sent", "seconds", "error"):
            table.add_column(col)
        for o in outcomes:
            table.add_row(o.device, o.phase, "yes" if o.healthy else "-",
                          f"{o.need_bytes / 1e3:.0f} kB", f"{o.seconds:.1f}", o.error or "")
        Console().print(table)
    sys.exit(0 if ok else 1)


@fleet.command("rollback")
@click.option("--device", required=True, help="The device.")
@click.option("--model", "model_name", required=True, help="The model to roll back.")
@click.option("--timeout", type=float, default=30, show_default=True)
@broker_options
@sign_option
def rollback_command(device: str, model_name: str, timeout: float,
                     broker_config: BrokerConfig, sign_key: Ed25519PrivateKey | None) -> None:
    """Ask a device to go back to the previous version of a model.

    \b
    Example:
      edgefleet fleet rollback --device edge-001 --model digits
    """
    from device_agents import protocol
    from device_agents.fleet.client import FleetClient

    with FleetClient(broker_config, "rollback", sign_key) as client:
        response = client.request(device, "rollback", {"model": model_name}, timeout)
    click.echo(protocol.encode(response).decode())
    sys.exit(0 if response.status == "ok" else 1)


@fleet.command("call")
@click.argument("device")
@click.argument("command")
@click.option("--arg", "args", multiple=True, help="k=v argument (repeatable; v may be JSON).")
@click.option("--timeout", type=float, default=10, show_default=True)
@broker_options
@sign_option
def call_command(device: str, command: str, args: tuple[str, ...], timeout: float,
                 broker_config: BrokerConfig, sign_key: Ed25519PrivateKey | None) -> None:
    """One request/response with a device; prints the response JSON.

    \b
    Example:
      edgefleet fleet call edge-001 ping
      edgefleet fleet call edge-001 rollback --arg model=digits
    """
    from device_agents import protocol
    from device_agents.fleet.client import FleetClient, FleetError

    payload: dict[str, Any] = {}
    for item in args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FleetError(f"--arg {item!r} is not k=v")
        try:
            payload[key] = json.loads(value)
        except (ValueError, RecursionError):
            payload[key] = value
    with FleetClient(broker_config, "call", sign_key) as client:
        response = client.request(device, command, payload, timeout)
    click.echo(protocol.encode(response).decode())
    sys.exit(0 if response.status == "ok" else 1)


@fleet.command("status")
@click.option("--watch", is_flag=True, help="Keep the table up to date until Ctrl-C.")
@click.option("--wait", type=float, default=1.5, show_default=True,
              help="At most this many seconds listening for retained status and telemetry before "
                   "printing (less once every status is in and online devices reported).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@broker_options
def status_command(watch: bool, wait: float, as_json: bool, broker_config: BrokerConfig) -> None:
    """One row per device seen: online, epoch, groups, models, outbox depth, p50 latency, last
    telemetry. A device whose status breaks the contract shows as `invalid`: why is on stderr,
    and in the `error` field of --json.

    \b
    Example:
      edgefleet fleet status --watch
      edgefleet fleet status --json | jq '.[] | select(.state != "online")'
    """
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from device_agents.fleet.client import FleetClient
    from device_agents.fleet.status import FleetView

    def table(rows: list[dict[str, Any]]) -> Table:
        out = Table(title=f"{len(rows)} device(s)", title_justify="left")
        for col in ("device", "state", "epoch", "groups", "models", "outbox", "p50 ms",
                    "telemetry"):
            out.add_column(col, no_wrap=col in ("device", "state"))
        for r in rows:
            out.add_row(r["device"], r["state"], str(r["epoch"]), ",".join(r["groups"]),
                        " ".join(r["models"]), "-" if r["outbox_depth"] is None else str(r["outbox_depth"]),
                        "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}",
                        "-" if r["last_telemetry_s"] is None else f"{r['last_telemetry_s']:.0f} s ago")
        return out

    with FleetClient(broker_config, "status") as client:
        view = FleetView(client)
        view.settle(wait)
        for line in view.problems():  # the row says `invalid`; here is why
            click.echo(f"warning: {line}", err=True)
        if as_json:
            click.echo(json.dumps(view.snapshot()))
            return
        if not watch:
            Console().print(table(view.snapshot()))
            return
        with Live(table(view.snapshot()), refresh_per_second=2) as live:
            try:
                while True:
                    time.sleep(0.5)
                    live.update(table(view.snapshot()))
            except KeyboardInterrupt:
                pass


@fleet.command("collect")
@click.option("--db", "db_path", type=click.Path(path_type=Path), required=True,
              help="SQLite file the results go to (created if missing; its directory must exist).")
@click.option("--group", default="edgefleet-collect", show_default=True,
              help="Shared-subscription group: collectors in one group split the results.")
@click.option("--device", "devices", multiple=True,
              help="Only this device's results (repeatable); default every device.")
@click.option("--name", help="This collector's name, unique per collector: its MQTT client id "
              "and persistent session come from it. Default: the host name and a hash of --db.")
@click.option("--count", type=click.IntRange(min=1),
              help="Stop once this many new results are stored.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Stop after this many seconds (with --count: exit 1 if it was not reached).")
@click.option("--batch", "batch_rows", type=click.IntRange(1, 100_000), default=1000,
              show_default=True, help="Most rows per transaction.")
@click.option("--synchronous", type=click.Choice(["normal", "full"]), default="normal",
              show_default=True, help="SQLite sync: normal survives a crash of the collector, "
              "full also a power cut of its machine (an fsync per commit).")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=10,
              show_default=True, help="Seconds to wait for the broker at start.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON on stdout at the end.")
@broker_options
def collect_command(db_path: Path, group: str, devices: tuple[str, ...], name: str | None,
                    count: int | None, duration: float | None, batch_rows: int, synchronous: str,
                    connect_timeout: float, as_json: bool, broker_config: BrokerConfig) -> None:
    """Ingest results from every device into SQLite; several collectors share the load.

    Runs until Ctrl-C or SIGTERM (then commits what arrived and exits 0), or until --count or
    --duration. A result is acknowledged to the broker only once committed, and the session
    persists, so a collector that restarts under the same --name misses nothing.

    \b
    Example:
      edgefleet fleet collect --db results.db
      edgefleet fleet collect --db results-b.db --name collector-b    # a second, sharing the load
      edgefleet fleet collect --db run.db --device edge-001 --count 1000 --duration 60 --json
    """
    import logging
    import signal
    import threading

    from device_agents.fleet.collect import Collector, ProgressLine, WarningLines

    collector = Collector(db_path, broker_config, group=group, devices=devices, name=name,
                          batch_rows=batch_rows, synchronous=synchronous.upper(),
                          connect_timeout_s=connect_timeout)
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    with contextlib.suppress(ValueError):  # signals can only be caught on the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    progress = ProgressLine()
    warnings = WarningLines(collector)
    logging.getLogger("edgefleet").addHandler(warnings)
    try:
        reached = collector.run(count=count, duration=duration, stop=stop, on_tick=progress.update)
    finally:
        logging.getLogger("edgefleet").removeHandler(warnings)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = collector.stats
    progress.close(stats)
    if as_json:
        click.echo(json.dumps({"db": str(db_path), "name": collector.name,
                               "client_id": collector.client_id, "filters": collector.filters,
                               "reached": reached, **stats.as_dict()}))
    if not reached and not stop.is_set():  # Ctrl-C is the operator's choice, not a failure
        click.echo(f"error: stored {stats.stored} of --count {count} results within --duration "
                   f"{duration:g} s", err=True)
        sys.exit(1)
