"""Every MQTT topic and payload of CONTRACT section 5, in one place: built here, parsed here.

Nothing else formats or splits a topic string. Payloads are JSON; msgspec encodes and decodes
them (several times faster than the json module, and the agent does this for every message)
into typed structs with limits: string and array sizes, names against the contract's patterns,
tensor shapes checked with Python integers (no int64 wrap-around). Whatever the bytes, every
parser either returns a value or raises one `ProtocolError`: msgspec raises RecursionError, not
DecodeError, on deep nesting, and numpy raises ValueError, TypeError or MemoryError on crafted
arrays; all of them become ProtocolError here, so no caller needs to know.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
import numpy as np
from msgspec import Meta

ROOT: Final = "edgefleet/v1"
BLOBS_PREFIX: Final = f"{ROOT}/blobs/"  # + sha256: a retained chunk of a package being delivered
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"  # device ids, model names, deployments
STREAM_PATTERN: Final = r"^[A-Za-z0-9_.-]{1,128}\Z"  # sensor streams and request commands
VERSION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}\Z"
# subscription filters over the whole fleet
ALL_STATUS: Final = f"{ROOT}/+/status"
ALL_TELEMETRY: Final = f"{ROOT}/+/telemetry"
ALL_RESULTS: Final = f"{ROOT}/+/out/+"
NAME_RE: Final = re.compile(NAME_PATTERN)
STREAM_RE: Final = re.compile(STREAM_PATTERN)
SHA256_RE: Final = re.compile(SHA256_PATTERN)

# error codes of the `error` topic
BAD_PAYLOAD: Final = "bad_payload"
BAD_INPUT: Final = "bad_input"
UNKNOWN_STREAM: Final = "unknown_stream"
MODEL_ERROR: Final = "model_error"
OVERLOADED: Final = "overloaded"
# codes of errors that never reach a sensor: a topic or a document the fleet sent or received
BAD_TOPIC: Final = "bad_topic"
BAD_REQUEST: Final = "bad_request"
UNAUTHORIZED: Final = "unauthorized"  # a command not signed by a key the device obeys

# dtypes a b64 tensor may declare, little-endian on the wire
WIRE_DTYPES: Final = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8",
                      "bool"}
MAX_DIMS: Final = 8  # a tensor's rank on the wire
MAX_DEPTH: Final = 32  # JSON nesting of request arguments (tensors are bounded by MAX_DIMS)
MAX_ID: Final = 256  # characters of a message id or a transaction
MAX_TEXT: Final = 4096  # characters of a free-text field (an error message, an agent name)
MAX_ITEMS: Final = 4096  # entries of a list in a status or a state (groups, models)
MAX_TOPIC_BYTES: Final = 1024  # MQTT allows 65,535; no topic of ours comes near this
_INT64: Final = (1 << 63) - 1
_T = TypeVar("_T")


class ProtocolError(Exception):
    """A message or topic that breaks the contract; `code` is the error topic's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
Version = Annotated[str, Meta(pattern=VERSION_PATTERN)]
Sha256 = Annotated[str, Meta(pattern=SHA256_PATTERN)]
MessageId = Annotated[str, Meta(max_length=MAX_ID)] | Annotated[int, Meta(ge=-_INT64 - 1, le=_INT64)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Count = Annotated[int, Meta(ge=0, le=_INT64)]
NonNegative = Annotated[float, Meta(ge=0)]


class _Doc(msgspec.Struct, kw_only=True):
    """A payload of the contract: unknown fields are ignored (later agents may add some)."""


# -- topics ------------------------------------------------------------------------------------

def check_publish_topic(topic: str) -> str:
    """`topic` if a broker accepts it for PUBLISH, else ProtocolError(bad_topic).

    paho refuses wildcards (raising in the publishing thread); Mosquitto disconnects a client
    that publishes control characters, non-characters or invalid UTF-8 (mosquitto_validate_utf8),
    and a reconnecting agent would publish the same row again: such a topic must never reach an
    outbox row or paho.
    """
    if not topic or len(topic) > MAX_TOPIC_BYTES or "+" in topic or "#" in topic:
        raise ProtocolError(BAD_TOPIC, f"not a topic one may publish to: {topic[:80]!r}")
    if not topic.isascii() or not topic.isprintable():
        for ch in topic:
            cp = ord(ch)
            if (cp < 0x20 or 0x7F <= cp <= 0x9F or 0xD800 <= cp <= 0xDFFF
                    or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE):
                raise ProtocolError(BAD_TOPIC, f"topic {topic[:80]!r} holds character "
                                    f"U+{cp:04X}, which brokers refuse")
        if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
            raise ProtocolError(BAD_TOPIC, f"topic of over {MAX_TOPIC_BYTES} bytes")
    return topic


MAX_CORRELATION: Final = 1024  # bytes of MQTT 5 correlation data a response carries back


def check_response_topic(topic: str, device: str) -> str:
    """`topic` if `device` may answer a request there (an MQTT 5 ResponseTopic), else
    ProtocolError(bad_topic). Only this device's own response topics
    (`edgefleet/v1/{device}/response/{name}`, what the ACL of `edgefleet pki mosquitto` lets it
    publish): a requester must not make the agent publish for it anywhere else, onto another
    device's inputs, requests, status or responses, the delivery blobs, or another system's
    topics (an actuator's, say), where the device's identity would lend the message weight."""
    check_publish_topic(topic)
    try:
        parsed: DeviceTopic | None = parse_topic(topic)
    except ProtocolError:
        parsed = None
    if parsed is None or parsed.kind != "response" or parsed.device != device:
        raise ProtocolError(BAD_TOPIC, f"{topic[:80]!r} is not one of {device}'s response "
                            f"topics ({ROOT}/{device}/response/NAME)")
    return topic


def check_name(value: Any, what: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    """`value` if it is a name of the contract (it goes into topics and paths), else
    ProtocolError(bad_payload) naming the field."""
    if not isinstance(value, str) or not pattern.match(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise ProtocolError(BAD_PAYLOAD, f"{what} {shown!r} does not match {pattern.pattern}")
    return value


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A topic under ROOT/{device}/: its device, its kind (status, telemetry, error, event, in,
    out, request, response, model) and the name after the kind, if any (a stream, a command, a
    model name)."""

    device: str
    kind: str
    name: str | None = None


_SIMPLE_KINDS: Final = frozenset({"status", "telemetry", "error", "event"})
_NAMED_KINDS: Final = frozenset({"in", "out", "request", "response"})


def parse_topic(topic: str) -> DeviceTopic:
    """A device topic of the contract, split; ProtocolError(bad_topic) for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != ROOT or not NAME_RE.match(parts[2]):
        raise ProtocolError(BAD_TOPIC, f"not a device topic of {ROOT}: {topic[:120]!r}")
    device, kind = parts[2], parts[3]
    if len(parts) == 4 and kind in _SIMPLE_KINDS:
        return DeviceTopic(device, kind)
    if len(parts) == 5 and kind in _NAMED_KINDS and STREAM_RE.match(parts[4]):
        return DeviceTopic(device, kind, parts[4])
    if len(parts) == 6 and kind == "model" and parts[5] == "state" and NAME_RE.match(parts[4]):
        return DeviceTopic(device, kind, parts[4])
    raise ProtocolError(BAD_TOPIC, f"not a topic of the contract: {topic[:120]!r}")


class Topics:
    """The topics of one device. Names that go into a topic are checked against the contract's
    patterns first: a name from a message (a model name in a deploy request, a stream) never
    makes a topic a broker would refuse."""

    def __init__(self, device_id: str) -> None:
        self.device_id = check_name(device_id, "device id")
        base = f"{ROOT}/{device_id}"
        self.base = base
        self.status = f"{base}/status"
        self.telemetry = f"{base}/telemetry"
        self.error = f"{base}/error"
        self.event = f"{base}/event"
        self.inputs = f"{base}/in/+"
        self.requests = f"{base}/request/+"
        self.outputs = f"{base}/out/+"
        self.responses = f"{base}/response/+"
        self.model_states = f"{base}/model/+/state"
        self._in_prefix = f"{base}/in/"
        self._request_prefix = f"{base}/request/"

    def input(self, stream: str) -> str:
        return f"{self.base}/in/{check_name(stream, 'stream', STREAM_RE)}"

    def output(self, stream: str) -> str:
        return f"{self.base}/out/{check_name(stream, 'stream', STREAM_RE)}"

    def request(self, command: str) -> str:
        return f"{self.base}/request/{check_name(command, 'command', STREAM_RE)}"

    def response(self, command: str) -> str:
        return f"{self.base}/response/{check_name(command, 'command', STREAM_RE)}"

    def model_state(self, name: str) -> str:
        return f"{self.base}/model/{check_name(name, 'model name')}/state"

    def stream_of(self, topic: str) -> str | None:
        """The part after `in/` of an input topic of this device (checked by the caller: an
        unroutable name is the sensor's error to hear about), else None."""
        return topic[len(self._in_prefix):] if topic.startswith(self._in_prefix) else None

    def command_of(self, topic: str) -> str | None:
        return topic[len(self._request_prefix):] if topic.startswith(self._request_prefix) else None


def blob_topic(sha256: str) -> str:
    return f"{BLOBS_PREFIX}{check_name(sha256, 'chunk sha256', SHA256_RE)}"


def blob_of(topic: str) -> str | None:
    """The sha256 of a blob topic, else None."""
    if not topic.startswith(BLOBS_PREFIX):
        return None
    sha = topic[len(BLOBS_PREFIX):]
    return sha if SHA256_RE.match(sha) else None


# -- encoding ----------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def encode(doc: Any) -> bytes:
    return _encoder.encode(doc)


def now() -> float:
    return round(time.time(), 6)


def _decode(decoder: msgspec.json.Decoder[Any], payload: bytes, what: str,
            code: str = BAD_PAYLOAD) -> Any:
    """One decode, every failure as ProtocolError (see the module docstring)."""
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise ProtocolError(code, f"{what}: {exc}") from None
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise ProtocolError(code, f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(code, f"{what} is nested too deeply") from None


def _convert(value: Any, kind: type[Any], what: str, code: str = BAD_PAYLOAD) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise ProtocolError(code, f"{what}: {exc}") from None
    except UnicodeError:  # a lone surrogate: never from the wire (msgspec refuses it there)
        raise ProtocolError(code, f"{what}: a string that is not valid Unicode") from None
    except RecursionError:
        raise ProtocolError(code, f"{what} is nested too deeply") from None


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """ProtocolError(bad_request) when `value` nests deeper than `limit` (without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ProtocolError(BAD_REQUEST, f"nested deeper than {limit} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


# -- sensor messages (CONTRACT 5.3) ------------------------------------------------------------

class _SensorDoc(_Doc, kw_only=True):
    id: MessageId | None = None
    ts: float | int | Annotated[str, Meta(max_length=MAX_ID)] | None = None
    inputs: dict[Annotated[str, Meta(max_length=MAX_ID)], Any] | None = None
    data: Any = msgspec.UNSET


class _IdOnly(_Doc):
    id: Any = None


_sensor_decoder = msgspec.json.Decoder(_SensorDoc)
_id_decoder = msgspec.json.Decoder(_IdOnly)


@dataclass(slots=True)
class SensorMessage:
    """A parsed sensor message: inputs by name, or one unnamed tensor for a single-input model."""

    id: str | int | None
    ts: float | int | str | None
    inputs: dict[str, np.ndarray] | np.ndarray


def peek_id(payload: bytes, max_bytes: int) -> str | int | None:
    """The message's id, if a readable one, without building its tensors (for refusing a
    message cheaply); None for anything else, whatever the bytes."""
    if len(payload) > max_bytes:
        return None
    try:
        value = _id_decoder.decode(payload).id
    except (msgspec.DecodeError, UnicodeError, RecursionError):
        return None
    if isinstance(value, str) and len(value) <= MAX_ID:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and -_INT64 - 1 <= value <= _INT64:
        return value
    return None


def parse_sensor(payload: bytes, max_bytes: int) -> SensorMessage:
    """Parse and validate a sensor message; raises ProtocolError(bad_payload).

    Shapes, dtypes and NaN/Inf are the model's business (runtime.schema checks them); here a
    tensor only has to be a well-formed array of at most MAX_DIMS dimensions and max_bytes.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(BAD_PAYLOAD, f"message of {len(payload)} bytes is over the "
                            f"{max_bytes}-byte limit")
    doc: _SensorDoc = _decode(_sensor_decoder, payload, "sensor message")
    if doc.inputs is not None:
        if not doc.inputs:
            raise ProtocolError(BAD_PAYLOAD, "inputs must be an object of input name -> tensor")
        inputs: dict[str, np.ndarray] | np.ndarray = {
            k: tensor(v, f"inputs.{k}", max_bytes) for k, v in doc.inputs.items()}
    elif doc.data is not msgspec.UNSET:
        inputs = tensor(doc.data, "data", max_bytes)
    else:
        raise ProtocolError(BAD_PAYLOAD, 'a sensor message needs "inputs" (an object) or "data"')
    return SensorMessage(doc.id, doc.ts, inputs)


def tensor(value: Any, where: str, max_bytes: int = 1 << 20) -> np.ndarray:
    """A tensor of the wire: nested lists of numbers, or {"dtype","shape","b64"}."""
    if isinstance(value, dict):
        return _b64_tensor(value, where, max_bytes)
    if not isinstance(value, list | int | float) or isinstance(value, bool):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: a tensor is nested lists of numbers or "
                            '{"dtype", "shape", "b64"}')
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError, MemoryError, RecursionError):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: nested lists of different lengths or "
                            f"depths over {MAX_DIMS}") from None
    if arr.dtype.kind not in "iuf":  # big integers, booleans and strings come out as others
        raise ProtocolError(BAD_PAYLOAD, f"{where}: tensor values must be numbers")
    if arr.ndim > MAX_DIMS:
        raise ProtocolError(BAD_PAYLOAD, f"{where}: {arr.ndim} dimensions, at most {MAX_DIMS}")
    return arr


def _b64_tensor(value: dict[str, Any], where: str, max_bytes: int) -> np.ndarray:
    extra = set(value) - {"dtype", "shape", "b64"}
    if extra or {"dtype", "shape", "b64"} - set(value):
        raise ProtocolError(BAD_PAYLOAD, f'{where}: an encoded tensor has exactly "dtype", '
                            '"shape" and "b64"')
    dtype, shape, data = value["dtype"], value["shape"], value["b64"]
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise ProtocolError(BAD_PAYLOAD, f"{where}: dtype {str(dtype)[:40]!r} is not one of "
                            f"{sorted(WIRE_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d <= max_bytes for d in shape)):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: shape must be a list of at most {MAX_DIMS} "
                            f"integers from 0 to {max_bytes}")
    if not isinstance(data, str):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: b64 must be a base64 string")
    wire = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * wire.itemsize  # Python integers: a product never wraps
    # an empty tensor still needs a shape numpy can hold: bound the product of the others too
    if (math.prod(d for d in shape if d) > max_bytes or expected > max_bytes
            or len(data) > 4 * (expected + 2) // 3 + 4):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: dtype {dtype} and shape {shape} need "
                            f"{expected} bytes; b64 holds {len(data) * 3 // 4}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: b64 is not valid base64") from None
    if len(raw) != expected:
        raise ProtocolError(BAD_PAYLOAD, f"{where}: {len(raw)} bytes of data, but dtype {dtype} "
                            f"and shape {shape} need {expected}")
    return np.frombuffer(raw, dtype=wire).reshape(shape).astype(np.dtype(dtype), copy=False)


def encode_tensor(arr: np.ndarray) -> dict[str, Any]:
    """The compact wire form of a tensor (what sensors with binary data should send)."""
    arr = np.ascontiguousarray(arr)
    return {"dtype": str(arr.dtype), "shape": list(arr.shape),
            "b64": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
                                    ).decode()}


# -- what the agent publishes ------------------------------------------------------------------

def error_payload(msg_id: Any, stream: str | None, code: str, message: str) -> bytes:
    return encode({"id": msg_id, "stream": None if stream is None else stream[:MAX_ID],
                   "code": code, "message": message[:MAX_TEXT], "ts": now()})


def birth(epoch: int, agent: str, groups: list[str], models: list[dict[str, str]]) -> bytes:
    return encode({"state": "online", "epoch": epoch, "agent": agent, "groups": groups,
                   "models": models, "ts": now()})


def offline(epoch: int) -> bytes:
    return encode({"state": "offline", "epoch": epoch})


def response(transaction: Any, status: str, data: Any = None,
             error: str | dict[str, str] | None = None) -> bytes:
    return encode({"transaction": transaction, "status": status, "data": data, "error": error})


def event(kind: str, **fields: Any) -> bytes:
    """An `event` topic message: a fault the agent recovered from, a drift change."""
    return encode({"type": kind, **fields, "ts": now()})


def model_state(deployment: str, version: str, phase: str, progress: float,
                error: str | None = None, **extra: Any) -> bytes:
    return encode({"deployment": deployment, "version": version, "phase": phase,
                   "progress": progress, "error": None if error is None else error[:MAX_TEXT],
                   "ts": now(), **extra})


# -- requests (CONTRACT 5.4) -------------------------------------------------------------------

class _RequestHead(_Doc):
    transaction: Any = None


_request_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_head_decoder = msgspec.json.Decoder(_RequestHead)


def peek_transaction(payload: bytes, max_bytes: int) -> str | int | None:
    """A request's transaction, when it can be read, to echo in an error response."""
    if len(payload) > max_bytes:
        return None
    try:
        value = _head_decoder.decode(payload).transaction
    except (msgspec.DecodeError, UnicodeError, RecursionError):
        return None
    return value if isinstance(value, str | int) and not isinstance(value, bool) \
        and (not isinstance(value, str) or len(value) <= MAX_ID) \
        and (not isinstance(value, int) or abs(value) <= _INT64) else None


def parse_request(payload: bytes, max_bytes: int) -> tuple[str | int | None, dict[str, Any]]:
    """(transaction, arguments) of a request; raises ProtocolError(bad_request). An empty
    payload is a request without arguments."""
    if len(payload) > max_bytes:
        raise ProtocolError(BAD_REQUEST, f"request of {len(payload)} bytes is over the "
                            f"{max_bytes}-byte limit")
    if not payload:
        return None, {}
    args = _decode(_request_decoder, payload, "request", BAD_REQUEST)
    if not isinstance(args, dict):
        raise ProtocolError(BAD_REQUEST, "a request is a JSON object")
    check_depth(args)
    transaction = args.get("transaction")
    if transaction is not None and (
            not isinstance(transaction, str | int) or isinstance(transaction, bool)
            or (isinstance(transaction, str) and len(transaction) > MAX_ID)
            or (isinstance(transaction, int) and abs(transaction) > _INT64)):
        raise ProtocolError(BAD_REQUEST, f"transaction must be a string of at most {MAX_ID} "
                            "characters or a 64-bit integer")
    return transaction, args


# -- signed commands (CONTRACT 10) ------------------------------------------------------------

COMMAND_DOMAIN: Final = b"edgefleet-command/1\n"  # a command signature can be nothing else
MAX_COMMAND_LIFETIME_S: Final = 3600  # the furthest ahead a command may expire (nonces kept so long)


class Auth(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request's `auth`: which key signed it, a nonce used once, when it stops being valid
    (Unix seconds), and the Ed25519 signature (base64) over `command_bytes`."""

    key: Annotated[str, Meta(pattern=r"^[0-9a-f]{16}\Z")]  # runtime.signing.fingerprint
    nonce: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{16,64}\Z")]
    expires: Annotated[int, Meta(ge=0, le=1 << 40)]
    sig: Annotated[str, Meta(min_length=1, max_length=128)]


def command_bytes(device: str, command: str, args: dict[str, Any], key: str, nonce: str,
                  expires: int) -> bytes:
    """What a command's signature covers: the device it is for, the command, every argument
    (the transaction too; not `auth`), the key, the nonce and the expiry, as JSON with sorted
    keys and no spaces after a domain tag. Binding the device and the command means a request
    signed for one device or one command is worth nothing for another."""
    body = {k: v for k, v in args.items() if k != "auth"}
    return COMMAND_DOMAIN + msgspec.json.encode(
        {"device": device, "command": command, "args": body, "key": key, "nonce": nonce,
         "expires": expires}, order="sorted")


def parse_auth(value: Any) -> Auth:
    """A request's `auth` object; raises ProtocolError(unauthorized)."""
    try:
        return msgspec.convert(value, Auth)
    except msgspec.ValidationError as exc:
        raise ProtocolError(UNAUTHORIZED, f"auth: {exc}") from None


def signature_of(auth: Auth) -> bytes:
    """The raw 64 bytes of an Auth's signature; raises ProtocolError(unauthorized)."""
    try:
        sig = base64.b64decode(auth.sig, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(UNAUTHORIZED, "auth.sig is not base64") from None
    if len(sig) != 64:
        raise ProtocolError(UNAUTHORIZED, f"auth.sig holds {len(sig)} bytes, not an Ed25519 "
                            "signature's 64")
    return sig


class DeployDescriptor(_Doc, kw_only=True):
    """The `deploy` request's arguments (docs/protocol.md): a signed manifest and its chunks."""

    deployment: Name
    name: Name
    version: Version
    manifest: Annotated[str, Meta(max_length=1 << 20)]
    signature: Annotated[str, Meta(max_length=1024)] | None = None
    chunks: Annotated[list[tuple[Sha256, Annotated[int, Meta(ge=0, le=1 << 40)]]],
                      Meta(max_length=1 << 16)]
    sha256: Sha256 | None = None
    health_window_s: Annotated[float, Meta(ge=0, le=86400)] = 30.0
    max_error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.2


def parse_deploy(args: dict[str, Any]) -> DeployDescriptor:
    """A deploy request's arguments, typed; ProtocolError(bad_request) naming the bad field."""
    value: DeployDescriptor = _convert(args, DeployDescriptor, "deploy request", BAD_REQUEST)
    return value


def parse_rollback(args: dict[str, Any]) -> str:
    """The model a rollback request names."""
    return check_name(args.get("model"), "rollback needs {\"model\": <name>}; model")


# -- what the fleet reads ----------------------------------------------------------------------

class ModelRef(_Doc, kw_only=True):
    name: Name
    version: Version
    sha256: Sha256 | None = None


class Status(_Doc, kw_only=True):
    """A retained `status`: the birth, or the Last Will / clean-shutdown `offline`."""

    state: Literal["online", "offline"]
    epoch: Count
    agent: Text | None = None
    groups: Annotated[list[Annotated[str, Meta(max_length=MAX_ID)]], Meta(max_length=MAX_ITEMS)] = (
        msgspec.field(default_factory=list))
    models: Annotated[list[ModelRef], Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=list)
    ts: float | None = None


class OutboxFigures(_Doc, kw_only=True):
    depth: Count | None = None
    bytes: Count | None = None
    oldest_s: NonNegative | None = None
    dropped: Count | None = None


class InferenceFigures(_Doc, kw_only=True):
    count: Count | None = None
    errors: Count | None = None
    p50_ms: NonNegative | None = None
    p99_ms: NonNegative | None = None


class Telemetry(_Doc, kw_only=True):
    ts: float | None = None
    uptime_s: NonNegative | None = None
    rss_bytes: Count | None = None
    cpu_percent: NonNegative | None = None
    epoch: Count | None = None
    outbox: OutboxFigures = msgspec.field(default_factory=OutboxFigures)
    inference: InferenceFigures = msgspec.field(default_factory=InferenceFigures)


class Result(_Doc, kw_only=True):
    """A result as the collector stores it: the fields it indexes, typed; the rest stays in the
    stored JSON text."""

    seq: Count
    epoch: Count
    id: MessageId | None = None
    stream: Annotated[str, Meta(pattern=STREAM_PATTERN)] | None = None
    run: Annotated[str, Meta(max_length=MAX_ID)] | None = None
    model: ModelRef | None = None
    label: Text | int | None = None
    score: float | None = None
    latency_ms: dict[Annotated[str, Meta(max_length=32)], float] | None = None
    ts_in: float | None = None
    ts_out: float | None = None


class ModelState(_Doc, kw_only=True):
    deployment: Name | None = None
    version: Version | None = None
    phase: Literal["downloading", "verifying", "staged", "active", "failed", "rolled_back"]
    progress: Annotated[float, Meta(ge=0, le=1)] | None = None
    error: Text | None = None
    ts: float | None = None
    healthy: bool = False  # active and through its health window


class Response(_Doc, kw_only=True):
    transaction: MessageId | None = None
    status: Literal["ok", "error"]
    data: Any = None
    error: Any = None


def _typed(kind: type[_T], what: str) -> Callable[[bytes], _T]:
    """The parser of one payload kind: a typed decode, every failure a ProtocolError."""
    decoder = msgspec.json.Decoder(kind)

    def parse(payload: bytes) -> _T:
        value: _T = _decode(decoder, payload, what)
        return value

    parse.__name__ = parse.__qualname__ = f"parse_{what.replace(' ', '_')}"
    parse.__doc__ = f"A {what} payload, typed; ProtocolError(bad_payload) for anything else."
    return parse


parse_status = _typed(Status, "status")
parse_telemetry = _typed(Telemetry, "telemetry")
parse_result = _typed(Result, "result")
parse_model_state = _typed(ModelState, "model state")
parse_response = _typed(Response, "response")
