"""In-order acknowledgement: PUBACKs go out in arrival order whatever order answers come in, and a
message left without its answer shows as a stall (what the watchdog checks)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from device_agents.acks import AckSequencer


@dataclass
class Received:
    mid: int
    qos: int = 1
    generation: int = 1


class Acker:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def ack(self, mid: int, qos: int, generation: int) -> None:
        self.sent.append(mid)


def test_acknowledgements_go_out_in_arrival_order() -> None:
    acker = Acker()
    acks = AckSequencer(acker)
    tokens = [acks.register(Received(mid)) for mid in (10, 11, 12, 13)]
    acks.done(tokens[2])
    acks.done(tokens[1])
    assert acker.sent == []  # 10 has no answer yet: nothing may go before it
    acks.done(tokens[0])
    assert acker.sent == [10, 11, 12]
    acks.done(tokens[3])
    acks.done(tokens[3])  # a second end of one message sends nothing more
    assert acker.sent == [10, 11, 12, 13]
    assert acks.waiting() == 0


def test_the_head_of_the_order_shows_how_long_it_waited() -> None:
    acks = AckSequencer(Acker())
    assert acks.oldest_wait_s() == 0.0
    first = acks.register(Received(1))
    second = acks.register(Received(2))
    acks.done(second)
    time.sleep(0.05)
    assert acks.oldest_wait_s() >= 0.05  # the unanswered first holds the done second
    acks.done(first)
    assert acks.oldest_wait_s() == 0.0
    acks.register(Received(3))
    acks.reset()  # a new connection: the broker delivers again what was not acknowledged
    assert (acks.waiting(), acks.oldest_wait_s()) == (0, 0.0)
