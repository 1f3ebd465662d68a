"""`edgefleet pki ...`: thin commands over fleet/pki.py (certificates) and fleet/mosquitto_conf.py
(the broker's configuration). Errors are PkiError: one line, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import click

from device_agents.fleet import mosquitto_conf, pki


@click.group("pki")
def pki_group() -> None:
    """Fleet identities (X.509) and a ready Mosquitto configuration.

    \b
    Example:
      edgefleet pki init --out /etc/edgefleet/pki --host fleet.example
      edgefleet pki issue --pki /etc/edgefleet/pki --device edge-001
      edgefleet pki mosquitto --pki /etc/edgefleet/pki --port 8883 --out /etc/edgefleet/broker
    """


def _report(issued: list[pki.Issued], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([{"cert": str(i.cert), "key": str(i.key), "subject": i.subject,
                                "not_after": i.not_after.isoformat()} for i in issued]))
        return
    for item in issued:
        click.echo(f"wrote {item.cert} and {item.key} (0600): {item.subject}, valid until "
                   f"{item.not_after:%Y-%m-%d}")


@pki_group.command("init")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the CA, broker and operator files.")
@click.option("--host", "hosts", multiple=True,
              help="Another name or IP address devices use to reach the broker (repeatable); "
                   "127.0.0.1 and localhost are always in.")
@click.option("--days", type=int, default=pki.DEFAULT_DAYS, show_default=True,
              help="Validity of the CAs and certificates.")
@click.option("--force", is_flag=True,
              help="Replace an existing PKI (every device certificate it issued stops working).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def init_command(out_dir: Path, hosts: tuple[str, ...], days: int, force: bool,
                 as_json: bool) -> None:
    """Create the fleet CA (ca.pem, ca.key), the broker's certificate (broker.pem, broker.key),
    and the operator identity (operator.pem, operator.key, CN `operator`) with its own CA
    (operator-ca.pem, operator-ca.key). Keys are EC P-256, mode 0600. Keep ca.key and
    operator-ca.key offline where you can: whoever holds them can mint any identity.

    \b
    Example:
      edgefleet pki init --out pki/ --host fleet.example --host 10.0.0.5
    """
    _report(pki.init_pki(out_dir, hosts, days, force), as_json)


@pki_group.command("issue")
@click.option("--pki", "pki_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Directory made by `edgefleet pki init`.")
@click.option("--device", "device_id", required=True,
              help="Device id: the certificate's CN, hence its MQTT username "
                   "(^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$).")
@click.option("--days", type=int, default=pki.DEFAULT_DAYS, show_default=True,
              help="Validity (never past the CA's).")
@click.option("--force", is_flag=True, help="Replace the device's existing certificate and key.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def issue_command(pki_dir: Path, device_id: str, days: int, force: bool, as_json: bool) -> None:
    """Issue a device certificate: PKI/devices/ID.pem and ID.key (0600). Copy both and ca.pem
    to the device and name them in its `[uplink]` cert_file, key_file and ca_file.

    \b
    Example:
      edgefleet pki issue --pki pki/ --device edge-001
    """
    _report([pki.issue_device(pki_dir, device_id, days, force)], as_json)


@pki_group.command("mosquitto")
@click.option("--pki", "pki_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Directory made by `edgefleet pki init`.")
@click.option("--port", type=int, required=True, help="TLS port for devices (e.g. 8883).")
@click.option("--operator-port", type=int, default=None,
              help="TLS port for operator tools (default: --port + 1).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for mosquitto.conf, acl, clients-ca.pem and the broker's "
                   "persistence file.")
@click.option("--user", default=mosquitto_conf.DEFAULT_USER, show_default=True,
              help="User Mosquitto switches to when started as root.")
def mosquitto_command(pki_dir: Path, port: int, operator_port: int | None, out_dir: Path,
                      user: str) -> None:
    """Write a Mosquitto configuration for this PKI: a TLS listener on --port for devices
    (client certificate required, its CN the username and the client id, so no device can take
    over another's session) and one on --operator-port for operator tools (operator
    certificates only, free client ids), with an ACL that confines each device to its own
    topics. Sensors publish to a broker on the device (`[sensors] url`); on this broker nobody
    may publish a device's in/ topics.

    \b
    Example:
      edgefleet pki mosquitto --pki pki/ --port 8883 --out broker/
      mosquitto -c broker/mosquitto.conf
      edgefleet fleet call edge-001 ping --broker mqtts://fleet.example:8884 \\
          --ca-file pki/ca.pem --cert-file pki/operator.pem --key-file pki/operator.key
    """
    files = mosquitto_conf.write_mosquitto(pki_dir, out_dir, port, operator_port, user)
    click.echo(f"wrote {files.conf}, {files.acl} and {files.client_cas}: devices on port "
               f"{files.port}, operator tools on port {files.operator_port}")
    click.echo(f"run: mosquitto -c {files.conf}")
    for note in files.notes:
        click.echo(f"warning: {note}", err=True)
