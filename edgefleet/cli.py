"""The umbrella `edgefleet` command: a click group whose subcommands are imported only when used.

`edgefleet agent ...` on an edge box must never import torch, and `edgefleet --help` should not
pay for every library, so each subcommand lives in its own package and is named here by import
path. Library errors become one line on stderr with exit code 2; never a traceback.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from edgefleet import __version__

# name -> (module:attribute, one-line help shown by `edgefleet --help` without importing it)
COMMANDS: dict[str, tuple[str, str]] = {
    "compress": ("compress.cli:compress", "Compress a model into a signed, measured package."),
    "keys": ("runtime.cli:keys", "Generate the fleet's Ed25519 signing key pair."),
    "package": ("runtime.cli:package", "Inspect and verify model packages."),
    "demo": ("edgefleet.demo:demo", "Run the whole system end to end on this machine."),
    "broker": ("device_agents.cli:broker", "Run the embedded MQTT broker (for laptops and demos)."),
    "agent": ("device_agents.cli:agent", "The edge daemon: serve sensors over MQTT, report, sync."),
    "fleet": ("device_agents.fleet.cli:fleet",
              "Operate the fleet: deploy, roll back, call devices, status, collect results."),
    "sensor": ("device_agents.sensors.cli:sensor", "Simulated sensors: publish samples, score the answers."),
    "pki": ("device_agents.fleet.pki_cli:pki_group",
            "Fleet identities (X.509 CA, broker, operator, devices) and a Mosquitto config."),
    "linkem": ("device_agents.linkem.cli:linkem",
               "Emulate a 5G/LTE/NB-IoT link (delay, bandwidth, outages) as a TCP proxy."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module on first use, and maps our errors to exit 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, help_text) in sorted(COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from runtime.errors import EdgefleetError

        try:
            return super().invoke(ctx)
        except EdgefleetError as exc:
            raise CliError(str(exc), exc.exit_code) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("EDGEFLEET_DEBUG"):
                raise
            raise CliError(f"internal error: {type(exc).__name__}: {exc} "
                           "(set EDGEFLEET_DEBUG=1 for the traceback)", 1) from exc


class CliError(click.ClickException):
    """One line on stderr and a chosen exit code (2 for bad input, 1 for failed checks)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it per class

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
def cli() -> None:
    """edgefleet: compress neural networks into signed ONNX packages and run them on fleets of
    edge boxes over MQTT.

    \b
    Example:
      edgefleet keys generate --out keys/
      edgefleet package verify models/digits --key keys/fleet.pub
    """


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":
    main()
