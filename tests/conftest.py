"""Shared fixtures: the real Mosquitto broker, signing keys, tiny models and a real digits package."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.package import Package, write_package
from tests.support.embedded import EmbeddedBrokerProcess
from tests.support.mosquitto import Mosquitto
from tests.support.onnx_models import linear_model


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One real broker for the whole test session, on a free port."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


# The integration suite runs against both brokers a user may point edgefleet at: Mosquitto and the
# embedded one (`edgefleet broker`). EDGEFLEET_TEST_BROKERS=mosquitto narrows it while developing.
BROKERS = os.environ.get("EDGEFLEET_TEST_BROKERS", "mosquitto,amqtt").split(",")


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBrokerProcess]:
    """`edgefleet broker` (amqtt) as its own process, for the whole test session."""
    broker = EmbeddedBrokerProcess(tmp_path_factory.mktemp("amqtt"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> Mosquitto | EmbeddedBrokerProcess:
    """A running broker (a test before may have stopped it for an outage): Mosquitto, then the
    embedded one. A test that needs what only Mosquitto has is marked `mosquitto_only` with why."""
    if request.param == "amqtt":
        marker = request.node.get_closest_marker("mosquitto_only")
        if marker is not None:
            pytest.skip(f"not run on the embedded broker: {marker.kwargs.get('reason', marker.args)}")
        chosen: Mosquitto | EmbeddedBrokerProcess = request.getfixturevalue("embedded_broker")
    else:
        chosen = request.getfixturevalue("mosquitto")
    chosen.start()
    return chosen


@pytest.fixture
def unique_topic() -> str:
    """A topic prefix no other test uses, so tests sharing the broker never see each other."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.signing import generate_keypair

    out = tmp_path_factory.mktemp("keys")
    generate_keypair(out)
    return out


@pytest.fixture(scope="session")
def other_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.signing import generate_keypair

    out = tmp_path_factory.mktemp("other-keys")
    generate_keypair(out)
    return out


@pytest.fixture(scope="session")
def linear_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return linear_model(tmp_path_factory.mktemp("linear") / "linear.onnx")


@pytest.fixture(scope="session")
def digits_split():  # type: ignore[no-untyped-def]
    from compress.examples.digits import load_digits_split

    return load_digits_split()


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory, digits_split) -> Path:  # type: ignore[no-untyped-def]
    """A small CNN really trained on scikit-learn's digits (a few seconds, once per session)."""
    from compress.examples import digits

    model = digits.build_cnn(width=8)
    accuracy = digits.train(model, digits_split, epochs=6)
    assert accuracy > 0.9, f"digits CNN trained to only {accuracy:.3f}"
    return digits.export_onnx(model, tmp_path_factory.mktemp("digits") / "digits.onnx")


@pytest.fixture(scope="session")
def signed_digits_package(tmp_path_factory: pytest.TempPathFactory, digits_onnx: Path,
                          keys_dir: Path) -> Package:
    from compress.examples.digits import LABELS, preprocess
    from runtime.signing import load_private_key

    return write_package(
        tmp_path_factory.mktemp("pkg") / "digits", digits_onnx, name="digits", version="1",
        labels=LABELS, preprocess=preprocess(), postprocess="softmax",
        top_k=3, sign_key=load_private_key(keys_dir / "fleet.key"),
        compression={"quantize": "none"})


@pytest.fixture
def digits_package(tmp_path: Path, signed_digits_package: Package) -> Path:
    """A private copy of the signed digits package that a test may tamper with."""
    return Path(shutil.copytree(signed_digits_package.path, tmp_path / "digits"))
