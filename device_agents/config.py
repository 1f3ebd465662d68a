"""The agent's TOML config (CONTRACT 5.1): typed, every field described, unknown keys refused.

`load_config` reports every problem at once (pydantic collects them), so `check-config` can list
them all. Secrets never live in the file: a password is named by the environment variable that
holds it (`password_env`) and read when connecting.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from device_agents.errors import DeviceAgentError

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STREAM = re.compile(r"^[A-Za-z0-9_.-]+$")
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


class ConfigError(DeviceAgentError):
    """The config file is missing, not TOML, or breaks the schema; `problems` lists each one."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Strict):
    url: str = Field(DEFAULT_BROKER, description="mqtt://host:port or mqtts://host:port (TLS).")
    username: str | None = Field(None, description="MQTT username.")
    password_env: str | None = Field(
        None, description="Name of the environment variable holding the password.")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts (default: the system's).")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(None, description="Private key (PEM) of the client certificate.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive; a dead link is "
                             "noticed after 1.5 x this.")
    session_expiry_s: int = Field(7 * 86400, ge=0, description="How long the broker keeps the "
                                  "session (subscriptions, unacknowledged QoS 1) while offline.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @model_validator(mode="after")
    def _pairs(self) -> BrokerConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if self.password_env is not None and self.username is None:
            raise ValueError("password_env is set but username is not")
        return self

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
        """The password, read from the environment now (never stored in the config object)."""
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError("environment", [f"{self.password_env} is not set (the uplink "
                                              "password is read from it)"])
        return value


class ModelConfig(_Strict):
    package: Path = Field(description="Package directory installed at first start.")
    streams: list[Annotated[str, Field(pattern=STREAM.pattern)]] | None = Field(
        None, description="Streams routed to this model; omitted: every stream no other model takes.")


class SecurityConfig(_Strict):
    trusted_keys: list[Path] = Field(default_factory=list, description="Ed25519 public keys "
                                     "(PEM) whose signatures are accepted.")
    require_signed: bool = Field(True, description="Refuse packages without a trusted signature.")


class OutboxConfig(_Strict):
    max_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024, description="Disk bound of the outbox.")
    ttl_s: float = Field(86400, gt=0, description="Results older than this are dropped (counted).")
    on_full: Literal["drop-oldest", "reject-new"] = Field(
        "drop-oldest", description="What gives way when max_bytes is reached.")


class RuntimeConfig(_Strict):
    threads: int = Field(2, ge=1, le=64, description="onnxruntime intra-op threads (a ceiling).")
    max_batch: int = Field(32, ge=1, le=1024, description="Micro-batch size limit.")
    max_delay_ms: float = Field(2, ge=0, le=1000, description="How long a request may wait for "
                                "batch-mates.")


class AgentLimits(_Strict):
    max_payload_bytes: int = Field(1024 * 1024, ge=1024, description="Larger sensor messages "
                                   "are refused with bad_payload.")
    max_queue: int = Field(1024, ge=1, description="Sensor messages waiting for inference; past "
                           "this they are refused with overloaded.")
    telemetry_interval_s: float = Field(30, gt=0, description="Seconds between telemetry messages.")


class AgentConfig(_Strict):
    device_id: str = Field(description="Unique id of this box: letters, digits, _ . -")
    groups: list[str] = Field(default_factory=list, description="Fleet groups for deployments.")
    data_dir: Path = Field(Path("/var/lib/edgefleet"), description="Models, outbox and state; "
                           "must survive restarts.")
    uplink: BrokerConfig = Field(default_factory=lambda: BrokerConfig(), description="The fleet broker.")
    sensors: BrokerConfig | None = Field(None, description="Local broker for sensors; default: "
                                         "the uplink connection.")
    models: list[ModelConfig] = Field(default_factory=list)
    security: SecurityConfig = Field(default_factory=lambda: SecurityConfig())
    outbox: OutboxConfig = Field(default_factory=lambda: OutboxConfig())
    runtime: RuntimeConfig = Field(default_factory=lambda: RuntimeConfig())
    agent: AgentLimits = Field(default_factory=lambda: AgentLimits())

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not DEVICE_ID.match(value):
            raise ValueError(f"{value!r} must match {DEVICE_ID.pattern}")
        return value

    @model_validator(mode="after")
    def _streams(self) -> AgentConfig:
        seen: dict[str, str] = {}
        for model in self.models:
            for stream in model.streams or ():
                if stream in seen:
                    raise ValueError(f"stream {stream!r} is routed to two models "
                                     f"({seen[stream]} and {model.package})")
                seen[stream] = str(model.package)
        return self

    def redacted(self) -> dict[str, Any]:
        """The effective config for the `config` request: paths as strings, no secrets (the
        file holds none; the password's variable name is shown, never its value)."""
        return self.model_dump(mode="json")


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
    """Read and validate a config file; overrides (device_id, uplink url) win over the file."""
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
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(path, [_problem(e) for e in exc.errors()]) from None
    problems = _file_problems(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def _problem(error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required"
    return f"{where}: {message}"


def _file_problems(config: AgentConfig) -> list[str]:
    """Files the config names must exist (checked after the schema, so all are listed)."""
    problems = []
    for name, broker in (("uplink", config.uplink), ("sensors", config.sensors)):
        if broker is None:
            continue
        for field in ("ca_file", "cert_file", "key_file"):
            value = getattr(broker, field)
            if value is not None and not value.is_file():
                problems.append(f"{name}.{field}: {value} does not exist")
        if broker.password_env and broker.password_env not in os.environ:
            problems.append(f"{name}.password_env: environment variable {broker.password_env} "
                            "is not set")
    for i, key in enumerate(config.security.trusted_keys):
        if not key.is_file():
            problems.append(f"security.trusted_keys.{i}: {key} does not exist")
    for i, model in enumerate(config.models):
        if not (model.package / "manifest.json").is_file():
            problems.append(f"models.{i}.package: {model.package} is not a package "
                            "(no manifest.json)")
    if config.security.require_signed and config.models and not config.security.trusted_keys:
        problems.append("security.trusted_keys: empty, but require_signed is true")
    return problems
