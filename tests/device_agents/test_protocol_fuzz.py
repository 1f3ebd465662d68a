"""Every parser of device_agents.protocol, fed arbitrary bytes and crafted hostile JSON: it returns
a value or raises ProtocolError, never anything else (CONTRACT 5.3: bad input never stops it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agents import protocol
from device_agents.protocol import ProtocolError

LIMIT = 1 << 16

PAYLOAD_PARSERS: dict[str, Callable[[bytes], Any]] = {
    "sensor": lambda b: protocol.parse_sensor(b, LIMIT),
    "request": lambda b: protocol.parse_request(b, LIMIT),
    "status": protocol.parse_status,
    "telemetry": protocol.parse_telemetry,
    "result": protocol.parse_result,
    "model_state": protocol.parse_model_state,
    "response": protocol.parse_response,
}
PEEKERS: dict[str, Callable[[bytes], Any]] = {
    "peek_id": lambda b: protocol.peek_id(b, LIMIT),
    "peek_transaction": lambda b: protocol.peek_transaction(b, LIMIT),
}


def _error_of(parse: Callable[..., Any], *args: Any) -> ProtocolError | None:
    """The ProtocolError `parse` raised, or None; anything else raised fails the test."""
    try:
        parse(*args)
    except ProtocolError as exc:
        return exc
    return None


def _only_protocol_errors(parse: Callable[[bytes], Any], payload: bytes) -> None:
    error = _error_of(parse, payload)
    if error is not None:
        assert error.code in {protocol.BAD_PAYLOAD, protocol.BAD_REQUEST, protocol.BAD_TOPIC}
        assert str(error)


# -- structured hostile JSON -------------------------------------------------------------------

names = st.one_of(
    st.sampled_from(["x/#", "a+b", "", "../..", "\x00", "a\x1fb", "\u0085", "\ud800", "\ufffe",
                     "é", "digits", "a" * 300]),
    st.text(max_size=20))
huge_ints = st.one_of(st.integers(), st.sampled_from([2**64, 2**70, -(2**63) - 1, 2**32, -1,
                                                       2**63 - 1, 0]))
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(), names)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(names, inner, max_size=4)), max_leaves=30)
shapes = st.lists(huge_ints, max_size=10)
b64_tensors = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(protocol.WIRE_DTYPES)), names),
    "shape": st.one_of(shapes, json_values),
    "b64": st.one_of(st.sampled_from(["", "AAAA", "AAAAAAAAAAA=", "!!!!", "A" * 4000]), names),
})
tensors = st.one_of(json_values, b64_tensors,
                    st.lists(st.lists(st.floats(width=32), max_size=4), max_size=4))
sensor_docs = st.one_of(
    st.fixed_dictionaries({"id": scalars, "data": tensors}),
    st.fixed_dictionaries({"id": json_values, "ts": json_values,
                           "inputs": st.one_of(st.dictionaries(names, tensors, max_size=3),
                                               json_values)}),
    json_values)
fleet_docs = st.one_of(
    st.fixed_dictionaries({"state": st.one_of(st.sampled_from(["online", "offline"]), names),
                           "epoch": scalars, "groups": json_values,
                           "models": st.lists(st.fixed_dictionaries(
                               {"name": names, "version": names, "sha256": names}), max_size=3)}),
    st.fixed_dictionaries({"seq": scalars, "epoch": scalars, "id": json_values,
                           "model": json_values, "latency_ms": json_values}),
    st.fixed_dictionaries({"phase": names, "progress": scalars, "error": json_values}),
    st.fixed_dictionaries({"transaction": json_values, "status": names, "data": json_values}),
    st.fixed_dictionaries({"outbox": json_values, "inference": json_values}),
    json_values)


def _nest(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * depth + "1" + closer * depth).encode()


DEEP = [
    _nest(5000),
    b'{"data": ' + _nest(3000) + b"}",
    b'{"id": ' + _nest(3000) + b', "data": [1]}',
    b'{"inputs": {"x": ' + _nest(900) + b"}}",
    b'{"data": ' + _nest(40) + b"}",
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"transaction": "t", "args": ' + _nest(500) + b"}",
    b'{"state": "online", "epoch": 1, "models": ' + _nest(3000) + b"}",
]
CRAFTED = [
    *DEEP,
    json.dumps({"data": {"dtype": "float32", "shape": [2**70], "b64": ""}}).encode(),
    json.dumps({"data": {"dtype": "float32", "shape": [2**32, 2**32], "b64": ""}}).encode(),
    json.dumps({"data": {"dtype": "float32", "shape": [2**62, 4], "b64": "AAAA"}}).encode(),
    json.dumps({"data": {"dtype": "float32", "shape": [-1, 1], "b64": "AAAA"}}).encode(),
    json.dumps({"data": {"dtype": "float32", "shape": [0] + [10**6] * 7, "b64": ""}}).encode(),
    json.dumps({"data": {"dtype": "float32", "shape": [True], "b64": "AAAA"}}).encode(),
    json.dumps({"data": {"dtype": "float32", "shape": [1e3], "b64": "AAAA"}}).encode(),
    json.dumps({"data": {"dtype": "object", "shape": [1], "b64": "AAAA"}}).encode(),
    json.dumps({"data": {"dtype": ["float32"], "shape": [1], "b64": "AAAA"}}).encode(),
    json.dumps({"id": 2**70, "data": [1]}).encode(),
    json.dumps({"data": [2**70]}).encode(),
    json.dumps({"data": [[1], [1, 2]]}).encode(),
    json.dumps({"data": [True, False]}).encode(),
    json.dumps({"data": ["1"]}).encode(),
    json.dumps({"inputs": {}}).encode(),
    json.dumps({"inputs": []}).encode(),
    b"\xff\xfe\x00garbage",
    b"",
    b"null",
    b'{"data": NaN}',
    b'{"data": [1e999]}',
    b'{"id": "\\ud800", "data": [1]}',
]


@pytest.mark.parametrize("payload", CRAFTED, ids=range(len(CRAFTED)))
@pytest.mark.parametrize("parser", sorted({**PAYLOAD_PARSERS, **PEEKERS}))
def test_crafted_hostile_payloads_raise_only_protocol_errors(parser: str, payload: bytes) -> None:
    parse = {**PAYLOAD_PARSERS, **PEEKERS}[parser]
    _only_protocol_errors(parse, payload)


@pytest.mark.parametrize("payload", DEEP[:6], ids=range(6))
def test_deep_nesting_is_a_bad_payload_not_a_recursion_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_sensor(payload, LIMIT)
    assert caught.value.code == protocol.BAD_PAYLOAD


def test_shapes_are_checked_with_python_integers() -> None:
    """[2**32, 2**32] wraps to 0 in int64: it must not pass as an empty tensor."""
    for shape in ([2**32, 2**32], [2**70], [2**62, 4]):
        doc = {"data": {"dtype": "float32", "shape": shape, "b64": ""}}
        with pytest.raises(ProtocolError, match=r"shape|need"):
            protocol.parse_sensor(json.dumps(doc).encode(), LIMIT)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=512))
def test_arbitrary_bytes(payload: bytes) -> None:
    for parse in (*PAYLOAD_PARSERS.values(), *PEEKERS.values()):
        _only_protocol_errors(parse, payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=sensor_docs)
def test_hostile_sensor_messages(doc: Any) -> None:
    payload = json.dumps(doc).encode("utf-8", "surrogatepass")
    error = _error_of(protocol.parse_sensor, payload, LIMIT)
    if error is not None:
        assert error.code == protocol.BAD_PAYLOAD
        return
    message = protocol.parse_sensor(payload, LIMIT)
    arrays = message.inputs.values() if isinstance(message.inputs, dict) else [message.inputs]
    for arr in arrays:  # what passes is a real numeric array of bounded size
        assert isinstance(arr, np.ndarray)
        assert arr.dtype.kind in "iufb"
        assert arr.ndim <= protocol.MAX_DIMS
        assert arr.nbytes <= 8 * LIMIT
    assert message.id is None or isinstance(message.id, str | int)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=fleet_docs)
def test_hostile_fleet_payloads(doc: Any) -> None:
    payload = json.dumps(doc).encode("utf-8", "surrogatepass")
    for parse in PAYLOAD_PARSERS.values():
        _only_protocol_errors(parse, payload)


@settings(max_examples=300, deadline=None)
@given(args=st.dictionaries(names, json_values, max_size=6))
def test_hostile_deploy_and_rollback_arguments(args: dict[str, Any]) -> None:
    for parse in (protocol.parse_deploy, protocol.parse_rollback):
        error = _error_of(parse, args)
        assert error is None or error.code in {protocol.BAD_REQUEST, protocol.BAD_PAYLOAD}


@settings(max_examples=300, deadline=None)
@given(args=st.fixed_dictionaries({
    "deployment": names, "name": names, "version": names, "manifest": st.text(max_size=10),
    "chunks": st.lists(st.tuples(names, huge_ints), max_size=3)}))
def test_a_deploy_that_parses_names_only_safe_topics_and_paths(args: dict[str, Any]) -> None:
    try:
        descriptor = protocol.parse_deploy(args)
    except ProtocolError:
        return
    topics = protocol.Topics("dev-1")
    protocol.check_publish_topic(topics.model_state(descriptor.name))
    for value in (descriptor.name, descriptor.version, descriptor.deployment):
        assert "/" not in value
        assert not value.startswith(".")


@settings(max_examples=500, deadline=None)
@given(topic=st.text(max_size=80))
def test_topics(topic: str) -> None:
    error = _error_of(protocol.parse_topic, topic)
    if error is not None:
        assert error.code == protocol.BAD_TOPIC
    else:
        assert protocol.NAME_RE.match(protocol.parse_topic(topic).device)
    error = _error_of(protocol.check_response_topic, topic, "dev-1")
    assert error is None or error.code == protocol.BAD_TOPIC
    error = _error_of(protocol.check_publish_topic, topic)
    if error is not None:
        assert error.code == protocol.BAD_TOPIC
    else:
        assert topic
        assert "+" not in topic
        assert "#" not in topic
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in topic)
    for build in (protocol.Topics, lambda n: protocol.Topics("d").model_state(n),
                  lambda n: protocol.Topics("d").output(n), lambda n: protocol.Topics("d").response(n),
                  protocol.blob_topic):
        try:
            built = build(topic)
        except ProtocolError:
            continue
        if isinstance(built, str):
            protocol.check_publish_topic(built)  # whatever a builder accepts, a broker takes


def test_wildcards_and_control_characters_never_make_a_topic() -> None:
    topics = protocol.Topics("dev-1")
    for name in ("x/#", "+", "a\x00", "a\x1b[2J", "\u0085", "a/b", "", "é"):
        with pytest.raises(ProtocolError):
            topics.model_state(name)
    for topic in ("a/#", "a/+/b", "a\x00", "a\u009f", "a\ufffe", "", "x" * 2000):
        with pytest.raises(ProtocolError):
            protocol.check_publish_topic(topic)
    for topic in ("$SYS/x", "edgefleet/v1/other/in/cam", "edgefleet/v1/other/request/rollback",
                  "edgefleet/v1/other/status", f"edgefleet/v1/blobs/{'0' * 64}", "edgefleet/v1/x",
                  "edgefleet/v1/other/response/ping", "edgefleet/v1/dev-1/in/cam",
                  "replies/operator-1", "plant/valve-3/set", "edgefleet/v1/dev-1/response/a/b"):
        with pytest.raises(ProtocolError):
            protocol.check_response_topic(topic, "dev-1")
    for topic in ("edgefleet/v1/dev-1/response/ping", "edgefleet/v1/dev-1/response/op-7f3a"):
        assert protocol.check_response_topic(topic, "dev-1") == topic
    assert protocol.check_publish_topic("edgefleet/v1/d/out/cam-0") == "edgefleet/v1/d/out/cam-0"


def test_good_payloads_still_parse() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = protocol.parse_sensor(protocol.encode({"id": 7, "data": protocol.encode_tensor(arr)}),
                                LIMIT)
    assert msg.id == 7
    assert isinstance(msg.inputs, np.ndarray)
    np.testing.assert_array_equal(msg.inputs, arr)
    status = protocol.parse_status(protocol.birth(3, "a", ["g"], [
        {"name": "digits", "version": "2", "sha256": "0" * 64}]))
    assert (status.state, status.epoch, status.models[0].version) == ("online", 3, "2")
    assert protocol.parse_status(protocol.offline(4)).state == "offline"
    parsed = protocol.parse_topic("edgefleet/v1/dev-1/model/digits/state")
    assert (parsed.device, parsed.kind, parsed.name) == ("dev-1", "model", "digits")
    transaction, args = protocol.parse_request(b'{"transaction": "t1", "model": "m"}', LIMIT)
    assert transaction == "t1"
    assert protocol.parse_rollback(args) == "m"
