"""`edgefleet keys ...` and `edgefleet package ...`: thin commands over runtime.signing/package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import msgspec

from runtime.errors import PackageError
from runtime.package import Manifest, load_package


@click.group()
def keys() -> None:
    """Manage the fleet's Ed25519 signing keys."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for fleet.key (private, mode 0600) and fleet.pub.")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def keys_generate(out_dir: Path, force: bool, as_json: bool) -> None:
    """Generate a signing key pair.

    Keep fleet.key where packages are built; copy fleet.pub to every device and list it in
    `[security] trusted_keys`.

    \b
    Example:
      edgefleet keys generate --out ~/.edgefleet/keys
    """
    from runtime.signing import generate_keypair

    priv, pub, fp = generate_keypair(out_dir, overwrite=force)
    if as_json:
        click.echo(json.dumps({"private_key": str(priv), "public_key": str(pub), "fingerprint": fp}))
    else:
        click.echo(f"wrote {priv} (keep secret) and {pub}; fingerprint {fp}")


@click.group()
def package() -> None:
    """Inspect and verify model packages."""


@package.command("info")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def package_info(directory: Path, as_json: bool) -> None:
    """Show a package's manifest (name, version, inputs, outputs, compression, metrics).

    \b
    Example:
      edgefleet package info models/digits --json | jq .sha256
    """
    pkg = load_package(directory, check_hash=False)
    if as_json:
        doc = json.loads(pkg.manifest_bytes)
        click.echo(json.dumps(doc, indent=2))
        return
    _print_manifest(pkg.manifest, signed=pkg.signed)


@package.command("verify")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--key", "key_paths", type=click.Path(dir_okay=False, path_type=Path),
              multiple=True, required=True, help="Trusted public key (PEM); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def package_verify(directory: Path, key_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check a package's signature and model hash: exit 0 if both hold, else 1 with the reason.

    \b
    Example:
      edgefleet package verify models/digits --key keys/fleet.pub
    """
    from runtime.signing import load_public_key

    trusted = [load_public_key(p) for p in key_paths]  # a bad key file is bad usage: exit 2
    try:
        pkg = load_package(directory, trusted_keys=trusted, require_signed=True)
    except PackageError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc)}))
        exc.exit_code = 1
        raise
    m, by = pkg.manifest, pkg.verified_by
    assert by is not None
    if as_json:
        click.echo(json.dumps({"ok": True, "name": m.name, "version": m.version,
                               "sha256": m.sha256, "key": by.fingerprint}))
    else:
        click.echo(f"ok: {m.name} v{m.version}, sha256 {m.sha256[:16]}…, "
                   f"signed by {by.fingerprint} ({by.source})")


def _print_manifest(m: Manifest, *, signed: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{m.name} v{m.version}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    def specs(items: list[Any]) -> str:
        return "\n".join(f"{s.name}: {s.describe()}" for s in items)

    rows: list[tuple[str, str]] = [
        ("format", m.format), ("created", m.created), ("file", f"{m.file} ({m.size:,} bytes)"),
        ("sha256", m.sha256), ("signed", f"yes, key {m.signer}" if signed else "no"),
        ("inputs", specs(m.inputs)), ("outputs", specs(m.outputs)),
        ("labels", _short(m.labels)), ("preprocess", _compact(m.preprocess)),
        ("postprocess", f"{m.postprocess}, top {m.top_k}"),
        ("compression", _compact(m.compression)), ("metrics", _compact(m.metrics)),
    ]
    for key, value in rows:
        table.add_row(key, Text(value))  # Text: shapes like [batch,1,8,8] are not markup
    Console().print(table)


def _short(labels: list[str] | None) -> str:
    if not labels:
        return "none"
    text = ", ".join(labels[:12])
    return f"{text}, … ({len(labels)} in all)" if len(labels) > 12 else text


def _compact(value: Any) -> str:
    if not value:
        return "none"
    if hasattr(value, "items"):
        value = msgspec.to_builtins(value)
    return json.dumps(value, separators=(", ", ": "))
