"""The agent's TOML config (CONTRACT 5.1): typed, every field described, unknown keys refused.

Structs are msgspec's (already in the agent for the wire protocol; pydantic would add about
11 MB to a daemon with a 90 MB budget). `load_config` walks the file against them and reports
every problem at once, so `check-config` can list them all. Secrets never live in the file: a
password is named by the environment variable that holds it (`password_env`).
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from device_agents.errors import DeviceAgentError

DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
STREAM = r"^[A-Za-z0-9_.-]+\Z"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


class ConfigError(DeviceAgentError):
    """The config file is missing, not TOML, or breaks the schema; `problems` lists each one."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


def _doc(text: str) -> Meta:
    return Meta(description=text)


class BrokerConfig(_Strict, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: Annotated[str, _doc("mqtt://host:port or mqtts://host:port (TLS).")] = DEFAULT_BROKER
    username: Annotated[str | None, _doc("MQTT username.")] = None
    password_env: Annotated[str | None, _doc("Environment variable holding the password.")] = None
    ca_file: Annotated[str | None, _doc("CA bundle for mqtts (default: the system's).")] = None
    cert_file: Annotated[str | None, _doc("Client certificate (PEM) for mutual TLS.")] = None
    key_file: Annotated[str | None, _doc("Private key (PEM) of the client certificate.")] = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600, description="MQTT keepalive; a dead link "
                                     "is noticed after 1.5 x this.")] = 30
    session_expiry_s: Annotated[int, Meta(ge=0, description="How long the broker keeps the "
                                          "session while offline.")] = 7 * 86400

    def __post_init__(self) -> None:
        parse_broker_url(self.url)
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if self.password_env is not None and self.username is None:
            raise ValueError("password_env is set but username is not")

    @property
    def host(self) -> str:
        return parse_broker_url(self.url)[1]

    @property
    def port(self) -> int:
        return parse_broker_url(self.url)[2]

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.url)[0] == "mqtts"

    def password(self) -> str | None:
        """The password, read from the environment now (never kept in the config object)."""
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError("environment", [f"{self.password_env} is not set (the broker "
                                              "password is read from it)"])
        return value


class ModelConfig(_Strict, frozen=True, forbid_unknown_fields=True, kw_only=True):
    package: Annotated[str, _doc("Package directory installed at first start.")]
    streams: Annotated[list[Annotated[str, Meta(pattern=STREAM)]] | None,
                       _doc("Streams routed to this model; omitted: streams no other model "
                            "takes.")] = None


class SecurityConfig(_Strict, frozen=True, forbid_unknown_fields=True, kw_only=True):
    trusted_keys: Annotated[list[str], _doc("Ed25519 public keys (PEM) accepted as signers.")] = (
        msgspec.field(default_factory=list))
    require_signed: Annotated[bool, _doc("Refuse packages without a trusted signature.")] = True
    command_keys: Annotated[list[str], _doc("Ed25519 public keys (PEM) whose signed commands "
                                            "this device obeys (CONTRACT 10).")] = (
        msgspec.field(default_factory=list))
    require_signed_commands: Annotated[bool | None, _doc(
        "Refuse every command but ping unless signed by a command key; default: true when "
        "command_keys is set.")] = None

    @property
    def commands_signed(self) -> bool:
        """Whether commands must be signed: the explicit setting, else whether keys are set."""
        if self.require_signed_commands is None:
            return bool(self.command_keys)
        return self.require_signed_commands


class OutboxConfig(_Strict, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_bytes: Annotated[int, Meta(ge=64 * 1024, description="Disk bound of the outbox.")] = 256 << 20
    ttl_s: Annotated[float, Meta(gt=0, description="Older results are dropped (counted).")] = 86400.0
    on_full: Annotated[Literal["drop-oldest", "reject-new"],
                       _doc("What gives way when max_bytes is reached.")] = "drop-oldest"


class RuntimeConfig(_Strict, frozen=True, forbid_unknown_fields=True, kw_only=True):
    threads: Annotated[int, Meta(ge=1, le=64, description="onnxruntime threads (a ceiling).")] = 2
    max_batch: Annotated[int, Meta(ge=1, le=1024, description="Micro-batch size limit.")] = 32
    max_delay_ms: Annotated[float, Meta(ge=0, le=1000, description="How long a request may wait "
                                        "for batch-mates.")] = 2.0


class AgentLimits(_Strict, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_payload_bytes: Annotated[int, Meta(ge=1024, description="Larger sensor messages and "
                                           "requests are refused with an error; announced to "
                                           "MQTT 5 brokers as the Maximum Packet Size.")] = 1 << 20
    max_queue: Annotated[int, Meta(ge=1, description="Messages waiting for inference; past this "
                                   "they are refused with overloaded.")] = 1024
    max_queue_bytes: Annotated[int, Meta(ge=64 * 1024, description="Bytes of messages waiting for "
                                         "inference; past this they are refused with "
                                         "overloaded.")] = 32 << 20
    telemetry_interval_s: Annotated[float, Meta(gt=0, description="Seconds between telemetry "
                                                "messages.")] = 30.0


class AgentConfig(_Strict, frozen=True, forbid_unknown_fields=True, kw_only=True):
    device_id: Annotated[str, Meta(pattern=DEVICE_ID, description="Unique id of this box.")]
    groups: Annotated[list[str], _doc("Fleet groups for deployments.")] = msgspec.field(
        default_factory=list)
    data_dir: Annotated[str, _doc("Models, outbox and state; must survive restarts.")] = (
        "/var/lib/edgefleet")
    uplink: Annotated[BrokerConfig, _doc("The fleet broker.")] = msgspec.field(
        default_factory=BrokerConfig)
    sensors: Annotated[BrokerConfig | None, _doc("Local broker for sensors; default: the "
                                                 "uplink connection.")] = None
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    outbox: OutboxConfig = msgspec.field(default_factory=OutboxConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    agent: AgentLimits = msgspec.field(default_factory=AgentLimits)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for model in self.models:
            for stream in model.streams or ():
                if stream in seen:
                    raise ValueError(f"stream {stream!r} is routed to two models "
                                     f"({seen[stream]} and {model.package})")
                seen[stream] = model.package

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def redacted(self) -> dict[str, Any]:
        """The effective config for the `config` request. The file holds no secrets: the
        password's variable name is shown, never its value."""
        doc: dict[str, Any] = msgspec.to_builtins(self)
        return doc


def parse_broker_url(url: str) -> tuple[str, str, int]:
    """'mqtt://host:port' or 'mqtts://host:port' -> (scheme, host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"broker URL {url!r} has a bad port") from None
    return parts.scheme, parts.hostname, port or (8883 if parts.scheme == "mqtts" else 1883)


def load_config(path: Path | str, **overrides: Any) -> AgentConfig:
    """Read and validate a config file; overrides (device_id, broker url) win over the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    if overrides.get("device_id"):
        raw["device_id"] = overrides["device_id"]
    if overrides.get("broker"):
        raw.setdefault("uplink", {})["url"] = overrides["broker"]
    problems = schema_problems(raw, AgentConfig, "")
    if problems:
        raise ConfigError(path, problems)
    config = msgspec.convert(raw, AgentConfig)
    problems = _file_problems(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def schema_problems(raw: Any, cls: type[msgspec.Struct], where: str) -> list[str]:
    """Every way `raw` breaks the struct `cls`: unknown and missing keys, and each field's own
    error, recursing into nested tables; then the struct's cross-field checks."""
    here = where or "(top level)"
    if not isinstance(raw, dict):
        return [f"{here}: expected a table, got {type(raw).__name__}"]
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    problems = [f"{_join(where, k)}: unknown key" for k in raw if k not in fields]
    for name, field in fields.items():
        at = _join(where, name)
        if name not in raw:
            if field.required:
                problems.append(f"{at}: required")
            continue
        value, (kind, inner) = raw[name], _shape(field.type)
        if kind == "struct" and value is not None:
            problems += schema_problems(value, inner, at)
        elif kind == "structs" and isinstance(value, list):
            for i, item in enumerate(value):
                problems += schema_problems(item, inner, f"{at}.{i}")
        else:
            try:
                msgspec.convert(value, field.type)
            except msgspec.ValidationError as exc:
                problems.append(f"{at}: {_message(exc)}")
    if not problems:
        try:
            msgspec.convert(raw, cls)  # the cross-field checks in __post_init__
        except msgspec.ValidationError as exc:
            problems.append(f"{here}: {_message(exc)}")
    return problems


def _shape(tp: Any) -> tuple[str, Any]:
    """('struct', cls) for a (possibly optional) struct field, ('structs', cls) for a list of
    structs, else ('value', None)."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _shape(args[0])
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "struct", tp
    if typing.get_origin(tp) is list:
        kind, inner = _shape(typing.get_args(tp)[0])
        if kind == "struct":
            return "structs", inner
    return "value", None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _message(exc: msgspec.ValidationError) -> str:
    return re.sub(r" - at `\$[^`]*`$", "", str(exc))


def _file_problems(config: AgentConfig) -> list[str]:
    """Files the config names must exist (checked after the schema, so all are listed)."""
    problems = []
    for name, broker in (("uplink", config.uplink), ("sensors", config.sensors)):
        if broker is None:
            continue
        for field in ("ca_file", "cert_file", "key_file"):
            value = getattr(broker, field)
            if value is not None and not Path(value).is_file():
                problems.append(f"{name}.{field}: {value} does not exist")
        if broker.password_env and broker.password_env not in os.environ:
            problems.append(f"{name}.password_env: environment variable {broker.password_env} "
                            "is not set")
    cert = config.uplink.cert_file
    if cert is not None and Path(cert).is_file():
        problems += _identity_problems(Path(cert), config.device_id)
    for i, key in enumerate(config.security.trusted_keys):
        if not Path(key).is_file():
            problems.append(f"security.trusted_keys.{i}: {key} does not exist")
    for i, model in enumerate(config.models):
        if not (Path(model.package) / "manifest.json").is_file():
            problems.append(f"models.{i}.package: {model.package} is not a package "
                            "(no manifest.json)")
    for i, key in enumerate(config.security.command_keys):
        if not Path(key).is_file():
            problems.append(f"security.command_keys.{i}: {key} does not exist")
    if config.security.require_signed_commands and not config.security.command_keys:
        problems.append("security.command_keys: empty, but require_signed_commands is true "
                        "(no command could ever be obeyed)")
    if config.security.require_signed and config.models and not config.security.trusted_keys:
        problems.append("security.trusted_keys: empty, but require_signed is true")
    return problems


def _identity_problems(cert_path: Path, device_id: str) -> list[str]:
    """A device's client certificate must name it (CN = device id): brokers configured by
    `edgefleet pki mosquitto` authorize by the CN, so a box whose config says another id would
    publish where its certificate may not, or, with a wrong certificate, as another device."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        return [f"uplink.cert_file: {cert_path} is not a PEM certificate: {exc}"]
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else None
    if cn != device_id:
        return [f"uplink.cert_file: the certificate is for {cn!r}, but device_id is "
                f"{device_id!r} (issue one with: edgefleet pki issue --device {device_id})"]
    return []
