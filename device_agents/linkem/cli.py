"""`edgefleet linkem`: run the link emulator in the foreground, or control a running one."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import click

from device_agents.errors import LinkError
from device_agents.linkem.profiles import PROFILES, LinkProfile, get_profile


def parse_address(text: str, option: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (loopback) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise LinkError(f"{option} {text!r} is not HOST:PORT (e.g. 127.0.0.1:18830)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _say(message: str) -> None:
    click.echo(f"linkem: {message}", err=True)


@click.command()
@click.option("--listen", help="Where clients connect, HOST:PORT (e.g. 127.0.0.1:18830).")
@click.option("--upstream", help="Where connections are forwarded, HOST:PORT (e.g. the broker).")
@click.option("--profile", "profile_name", default="5g-embb", show_default=True,
              type=click.Choice(list(PROFILES)), help="Nominal link figures to start from.")
@click.option("--rtt-ms", type=float, help="Round-trip time to add, split evenly both ways.")
@click.option("--jitter-ms", type=float, help="Each direction varies by +- half of this.")
@click.option("--down-mbps", type=float, help="Cap upstream -> client (Mbit/s on the wire).")
@click.option("--up-mbps", type=float, help="Cap client -> upstream (Mbit/s on the wire).")
@click.option("--loss", type=float, help="Fraction of TCP segments lost (each costs one RTO).")
@click.option("--outage-every", type=float, help="Cut the link after this many seconds up...")
@click.option("--outage-for", type=float, help="...for this many seconds, repeatedly.")
@click.option("--outage-mode", type=click.Choice(["blackhole", "reset"]), default="blackhole",
              show_default=True, help="blackhole: traffic stalls; reset: connections are closed.")
@click.option("--control", help="HOST:PORT of a control port (commands: cut [blackhole|reset], "
              "restore, stats). With --send, the port of a running emulator.")
@click.option("--send", "send_command", help="Send this command to the running emulator at "
              "--control, print its JSON reply and exit.")
@click.option("--seed", type=int, help="Seed for jitter and loss, for repeatable runs.")
@click.option("--list-profiles", is_flag=True, help="Print the profiles and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the final counters as JSON.")
def linkem(listen: str | None, upstream: str | None, profile_name: str, rtt_ms: float | None,
           jitter_ms: float | None, down_mbps: float | None, up_mbps: float | None,
           loss: float | None, outage_every: float | None, outage_for: float | None,
           outage_mode: str, control: str | None, send_command: str | None, seed: int | None,
           list_profiles: bool, as_json: bool) -> None:
    """Emulate a radio link (5G, LTE, NB-IoT) between a client and its upstream, in user space.

    Delay, jitter and bandwidth are applied per direction ("up" is client to upstream), byte
    order is kept, and the link can be cut and restored: on a schedule (--outage-every/-for), from
    another process (--control, or SIGUSR1 to cut and SIGUSR2 to restore), or from Python
    (device_agents.linkem.LinkEmulator). Counters are printed on exit (Ctrl-C).

    \b
    Example: an agent reaching the broker on 1883 over LTE, with a 10 s outage every minute
      edgefleet linkem --listen 127.0.0.1:18830 --upstream 127.0.0.1:1883 --profile lte \\
          --outage-every 60 --outage-for 10 --control 127.0.0.1:18831
      edgefleet linkem --control 127.0.0.1:18831 --send "cut reset"
    """
    if list_profiles:
        for profile in PROFILES.values():
            click.echo(profile.describe())
        return
    if send_command is not None:
        if control is None:
            raise LinkError("--send needs --control HOST:PORT of the running emulator")
        from device_agents.linkem.control import send

        reply = send(parse_address(control, "--control"), send_command)
        click.echo(json.dumps(reply))
        if not reply.get("ok"):
            sys.exit(1)
        return
    if listen is None or upstream is None:
        raise LinkError("give --listen HOST:PORT and --upstream HOST:PORT (see --help)")
    if (outage_every is None) != (outage_for is None):
        raise LinkError("--outage-every and --outage-for go together")
    profile = get_profile(profile_name).with_overrides(
        rtt_ms=rtt_ms, jitter_ms=jitter_ms, down_mbps=down_mbps, up_mbps=up_mbps, loss=loss)
    stats = asyncio.run(_serve(
        parse_address(listen, "--listen"), parse_address(upstream, "--upstream"), profile,
        None if control is None else parse_address(control, "--control"),
        None if outage_every is None else (outage_every, outage_for or 0.0, outage_mode), seed))
    click.echo(json.dumps(stats) if as_json else stats["summary"])


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], profile: LinkProfile,
                 control: tuple[str, int] | None, outages: tuple[float, float, str] | None,
                 seed: int | None) -> dict[str, Any]:
    from device_agents.linkem import control as control_port
    from device_agents.linkem.proxy import Link

    link = Link(upstream, profile, listen, seed)
    await link.start()
    host, port = link.address
    _say(f"{host}:{port} -> {upstream[0]}:{upstream[1]}, {profile.describe()}")
    server = None
    if control is not None:
        server = await control_port.serve(link, *control)
        _say(f"control on {control[0]}:{control[1]}")
    if outages is not None:
        every, for_s, mode = outages
        link.schedule_outages(every, for_s, mode)  # type: ignore[arg-type]  # click checked it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def cut() -> None:
        link.cut("blackhole")
        _say("cut (blackhole)")

    def restore() -> None:
        link.restore()
        _say("restored")

    loop.add_signal_handler(signal.SIGUSR1, cut)
    loop.add_signal_handler(signal.SIGUSR2, restore)
    try:
        await stop.wait()
    finally:
        if server is not None:
            server.close()
        await link.close()
    stats = link.snapshot().as_dict()
    stats["summary"] = link.snapshot().summary()
    return stats
