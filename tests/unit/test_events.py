"""Event fan-out: per-subscriber bounded queues; a slow subscriber is told it lagged."""

from __future__ import annotations

import asyncio

from arcbox_vm.manager.events import EventBus


async def test_each_subscriber_gets_every_event_in_order():
    bus = EventBus()
    a, b = bus.subscribe(), bus.subscribe()
    for i in range(3):
        bus.publish("sb", "created" if i == 0 else "ready", n=i)
    for sub in (a, b):
        got = [await sub.recv(1) for _ in range(3)]
        assert [e.attributes["n"] for e in got] == ["0", "1", "2"]
        assert got[0].timestamp_ns <= got[-1].timestamp_ns


async def test_slow_subscriber_lags_without_blocking_others():
    bus = EventBus(capacity=4)
    slow, fast = bus.subscribe(), bus.subscribe()
    for i in range(10):
        bus.publish("sb", "x", n=i)  # never blocks
        assert (await fast.recv(1)).attributes["n"] == str(i)
    lag = await slow.recv(1)
    assert lag.action == "lagged" and lag.attributes["missed"] == "6"
    assert [(await slow.recv(1)).attributes["n"] for _ in range(4)] == ["6", "7", "8", "9"]


async def test_close_ends_iteration():
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("sb", "created")
    sub.close()
    assert [e.action async for e in sub] == ["created"]
    bus.publish("sb", "ready")  # nobody subscribed: fine


async def test_recv_times_out():
    bus = EventBus()
    sub = bus.subscribe()
    try:
        await sub.recv(0.05)
    except asyncio.TimeoutError:
        return
    raise AssertionError("expected a timeout")
