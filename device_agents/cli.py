"""`edgefleet agent run` and `edgefleet agent check-config`: thin commands over agent.Agent."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from device_agents.config import ConfigError, load_config


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers (when stderr is not a terminal)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("edgefleet")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


@click.group()
def agent() -> None:
    """The edge daemon: serve sensors over MQTT with local inference, report, sync."""


@agent.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="Agent config (TOML).")
@click.option("--device-id", help="Overrides device_id from the file.")
@click.option("--broker", envvar="EDGEFLEET_BROKER", help="Overrides [uplink] url "
              "(mqtt://host:port or mqtts://host:port; env EDGEFLEET_BROKER).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: Path, device_id: str | None, broker: str | None, log_level: str) -> None:
    """Run the agent until SIGTERM or Ctrl-C, then finish accepted work, flush the outbox while
    connected, publish the offline status and exit 0.

    \b
    Example:
      EDGEFLEET_PASSWORD=... edgefleet agent run --config /etc/edgefleet/agent.toml
    """
    from device_agents.agent import Agent

    setup_logging(log_level)
    config = load_config(config_path, device_id=device_id, broker=broker)
    daemon = Agent(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon.start()
    while not stop.wait(1.0):
        pass
    daemon.stop()


@agent.command("check-config")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="Agent config (TOML).")
@click.option("--json", "as_json", is_flag=True, help="Print the effective config as JSON.")
def check_config(config_path: Path, as_json: bool) -> None:
    """Validate a config file: exit 0, or 2 with every problem listed, one per line.

    \b
    Example:
      edgefleet agent check-config --config /etc/edgefleet/agent.toml
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {config_path}: {len(exc.problems)} problem(s)", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(config.redacted(), indent=2))
    else:
        click.echo(f"{config_path}: ok (device {config.device_id}, {len(config.models)} model(s), "
                   f"uplink {config.uplink.url})")


@click.command("broker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=1883, show_default=True, type=click.IntRange(1, 65535))
def broker(host: str, port: int) -> None:
    """Run the embedded MQTT broker (amqtt) in the foreground until Ctrl-C.

    For laptops and demos: nothing to install beyond `pip install 'edgefleet[broker]'`. It speaks
    MQTT 3.1.1 and keeps state in memory; use Mosquitto for a site, a clustered broker (EMQX,
    HiveMQ) for a large fleet.

    \b
    Example:
      edgefleet broker --port 1883 &
      edgefleet agent run --config agent.toml --broker mqtt://127.0.0.1:1883
    """
    from device_agents.broker import serve

    def ready(b: Any) -> None:
        click.echo(f"edgefleet broker listening on {b.url} (Ctrl-C to stop)", err=True)

    serve(host, port, on_ready=ready)
