"""Every MQTT topic and payload of CONTRACT section 5, in one place.

Nothing else formats a topic string. Payloads are JSON; msgspec encodes and decodes them (it is
several times faster than the json module, and the agent does this for every message).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import numpy as np

ROOT: Final = "edgefleet/v1"
BLOBS_PREFIX: Final = f"{ROOT}/blobs/"  # + sha256: a retained chunk of a package being delivered
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# error codes of the `error` topic
BAD_PAYLOAD: Final = "bad_payload"
BAD_INPUT: Final = "bad_input"
UNKNOWN_STREAM: Final = "unknown_stream"
MODEL_ERROR: Final = "model_error"
OVERLOADED: Final = "overloaded"

# dtypes a b64 tensor may declare, little-endian on the wire
WIRE_DTYPES: Final = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8",
                      "bool"}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class _IdOnly(msgspec.Struct):
    id: str | int | None = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


def peek_id(payload: bytes) -> str | int | None:
    """The message's id without building its tensors (for refusing it cheaply), if it has one."""
    try:
        return _id_decoder.decode(payload).id
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None


class ProtocolError(Exception):
    """A message that cannot be served; `code` is the error topic's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Topics:
    """The topics of one device."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        base = f"{ROOT}/{device_id}"
        self.base = base
        self.status = f"{base}/status"
        self.telemetry = f"{base}/telemetry"
        self.error = f"{base}/error"
        self.inputs = f"{base}/in/+"
        self.requests = f"{base}/request/+"
        self._in_prefix = f"{base}/in/"
        self._request_prefix = f"{base}/request/"

    def input(self, stream: str) -> str:
        return f"{self.base}/in/{stream}"

    def output(self, stream: str) -> str:
        return f"{self.base}/out/{stream}"

    def request(self, command: str) -> str:
        return f"{self.base}/request/{command}"

    def response(self, command: str) -> str:
        return f"{self.base}/response/{command}"

    def model_state(self, name: str) -> str:
        return f"{self.base}/model/{name}/state"

    def stream_of(self, topic: str) -> str | None:
        """The stream of an `in/{stream}` topic of this device, else None."""
        return topic[len(self._in_prefix):] if topic.startswith(self._in_prefix) else None

    def command_of(self, topic: str) -> str | None:
        return topic[len(self._request_prefix):] if topic.startswith(self._request_prefix) else None


def blob_topic(sha256: str) -> str:
    return f"{BLOBS_PREFIX}{sha256}"


def encode(doc: Any) -> bytes:
    return _encoder.encode(doc)


def now() -> float:
    return round(time.time(), 6)


@dataclass(slots=True)
class SensorMessage:
    """A parsed sensor message: inputs by name, or one unnamed tensor for a single-input model."""

    id: Any
    ts: Any
    inputs: dict[str, np.ndarray] | np.ndarray


def parse_sensor(payload: bytes, max_bytes: int) -> SensorMessage:
    """Parse and validate a sensor message (CONTRACT 5.3); raises ProtocolError(bad_payload).

    Shapes, dtypes and NaN/Inf are the model's business (runtime.schema checks them).
    """
    if len(payload) > max_bytes:
        raise ProtocolError(BAD_PAYLOAD, f"message of {len(payload)} bytes is over the "
                            f"{max_bytes}-byte limit")
    try:
        doc = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(BAD_PAYLOAD, f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(BAD_PAYLOAD, f"a sensor message is a JSON object, got "
                            f"{type(doc).__name__}")
    msg_id = doc.get("id")
    if msg_id is not None and not isinstance(msg_id, str | int):
        raise ProtocolError(BAD_PAYLOAD, "id must be a string or an integer")
    if "inputs" in doc:
        raw = doc["inputs"]
        if not isinstance(raw, dict) or not raw:
            raise ProtocolError(BAD_PAYLOAD, "inputs must be an object of input name -> tensor")
        inputs: dict[str, np.ndarray] | np.ndarray = {
            str(k): tensor(v, f"inputs.{k}") for k, v in raw.items()}
    elif "data" in doc:
        inputs = tensor(doc["data"], "data")
    else:
        raise ProtocolError(BAD_PAYLOAD, 'a sensor message needs "inputs" (an object) or "data"')
    return SensorMessage(msg_id, doc.get("ts"), inputs)


def tensor(value: Any, where: str) -> np.ndarray:
    """A tensor of the wire: nested lists of numbers, or {"dtype","shape","b64"}."""
    if isinstance(value, dict):
        return _b64_tensor(value, where)
    if not isinstance(value, list | int | float) or isinstance(value, bool):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: a tensor is nested lists of numbers or "
                            '{"dtype", "shape", "b64"}')
    try:
        arr = np.asarray(value)
    except ValueError:
        raise ProtocolError(BAD_PAYLOAD, f"{where}: nested lists of different lengths") from None
    if arr.dtype.kind not in "iuf":
        raise ProtocolError(BAD_PAYLOAD, f"{where}: tensor values must be numbers")
    return arr


def _b64_tensor(value: dict[str, Any], where: str) -> np.ndarray:
    extra = set(value) - {"dtype", "shape", "b64"}
    if extra or {"dtype", "shape", "b64"} - set(value):
        raise ProtocolError(BAD_PAYLOAD, f'{where}: an encoded tensor has exactly "dtype", '
                            '"shape" and "b64"')
    dtype, shape, data = value["dtype"], value["shape"], value["b64"]
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(BAD_PAYLOAD, f"{where}: dtype {dtype!r} is not one of "
                            f"{sorted(WIRE_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: shape must be a list of at most 8 "
                            "non-negative integers")
    if not isinstance(data, str):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: b64 must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(BAD_PAYLOAD, f"{where}: b64 is not valid base64") from None
    wire = np.dtype(dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * wire.itemsize
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


def error_payload(msg_id: Any, stream: str | None, code: str, message: str) -> bytes:
    return encode({"id": msg_id, "stream": stream, "code": code, "message": message, "ts": now()})


def birth(epoch: int, agent: str, groups: list[str], models: list[dict[str, str]]) -> bytes:
    return encode({"state": "online", "epoch": epoch, "agent": agent, "groups": groups,
                   "models": models, "ts": now()})


def offline(epoch: int) -> bytes:
    return encode({"state": "offline", "epoch": epoch})


def response(transaction: Any, status: str, data: Any = None, error: str | None = None) -> bytes:
    return encode({"transaction": transaction, "status": status, "data": data, "error": error})
