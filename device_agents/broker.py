"""`edgefleet broker`: an embedded MQTT broker for laptops, demos and tests.

It is amqtt (the `[broker]` extra), a pure-Python asyncio broker, so `pip install edgefleet[broker]`
is all a newcomer needs. amqtt speaks MQTT 3.1.1 only; the transport notices and falls back (agents
keep persistent sessions, QoS 1, retained status and the Last Will; MQTT 5 response topics and
shared subscriptions are not available). It keeps sessions and retained messages in memory, so
they do not survive a broker restart. For a site use Mosquitto; for a large fleet a clustered
broker (EMQX, HiveMQ). See README "Which broker".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import Any

from device_agents.errors import DeviceAgentError

log = logging.getLogger("edgefleet.broker")


class BrokerError(DeviceAgentError):
    """The embedded broker cannot start (extra missing, port taken)."""


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener, anonymous clients, no $SYS chatter."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _require_amqtt() -> Any:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise BrokerError("the embedded broker needs the broker extra: "
                          f"pip install 'edgefleet[broker]' ({exc})") from None

    class OwnFiltersBroker(Broker):  # type: ignore[misc]
        """amqtt 0.12 with one fix: when a client connects, amqtt replays the retained messages
        matching *every* client's subscriptions to it, so a fresh `mosquitto_sub -t a/out`
        also receives another client's retained `a/status`. Only the client's own filters
        count here."""

        async def _publish_retained_messages_for_subscription(
                self, subscription: tuple[str, int], session: Any) -> None:
            owners = self._subscriptions.get(subscription[0], ())
            if any(owner.client_id == session.client_id for owner, _ in owners):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return OwnFiltersBroker


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                              "(is another broker running? pick --port)") from None


class EmbeddedBroker:
    """amqtt on its own event loop thread; a context manager for the demo and tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        broker_cls = _require_amqtt()
        _check_port_free(self.host, self.port)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._broker = broker_cls(broker_config(self.host, self.port), loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        _quiet_amqtt()
        self._loop = loop
        self._thread = threading.Thread(target=run, name="edgefleet-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise BrokerError(f"the embedded broker did not start within {timeout:g} s")
        if failure:
            raise BrokerError(f"the embedded broker failed to start: {failure[0]}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or self._thread is None:
            return
        if broker is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        with contextlib.suppress(RuntimeError):
            loop.close()
        self._loop = self._thread = self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _quiet_amqtt() -> None:
    """amqtt logs every connection at INFO; keep its warnings, drop the chatter."""
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)


def serve(host: str, port: int, on_ready: Any = None) -> None:
    """Run the broker in the foreground until SIGTERM or Ctrl-C."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(host, port) as broker:
        if on_ready is not None:
            on_ready(broker)
        while not stop.wait(0.5):
            pass
