"""The event log: ids, per-subscriber positions, replay with `since`, lag only past retention."""

from __future__ import annotations

import asyncio

import pytest

from arcbox_vm.manager.events import EventLog
from arcbox_vm.storage.state import StateStore


@pytest.fixture
def log(tmp_path):
    store = StateStore(tmp_path)
    store.open()
    yield EventLog(store, retain=50)
    store.close()


async def test_each_subscriber_gets_every_event_in_order(log):
    a, b = log.subscribe(), log.subscribe()
    for i in range(3):
        log.append("sb", "created" if i == 0 else "ready", n=i)
    for sub in (a, b):
        got = [await sub.recv(1) for _ in range(3)]
        assert [e.attributes["n"] for e in got] == ["0", "1", "2"]
        assert [e.id for e in got] == sorted(e.id for e in got)


async def test_since_replays_what_a_disconnected_client_missed(log):
    first = log.subscribe()
    log.append("sb", "created")
    seen = await first.recv(1)
    first.close()  # the client disconnects ...
    for i in range(5):
        log.append("sb", "x", n=i)  # ... events happen ...
    again = log.subscribe(since=seen.id)  # ... and it reconnects
    assert [(await again.recv(1)).attributes["n"] for _ in range(5)] == ["0", "1", "2", "3", "4"]
    log.append("sb", "live")
    assert (await again.recv(1)).action == "live"


async def test_slow_subscriber_never_blocks_and_lags_only_past_retention(log):
    slow, fast = log.subscribe(), log.subscribe()
    for i in range(1200):  # pruning runs every 1000 appends and keeps the newest 50
        log.append("sb", "x", n=i)
        if i < 10:
            assert (await fast.recv(1)).attributes["n"] == str(i)
    lag = await slow.recv(1)
    assert lag.action == "lagged" and int(lag.attributes["missed"]) > 0
    nxt = await slow.recv(1)
    assert nxt.action == "x" and nxt.id == lag.id + 1


async def test_close_ends_iteration_and_recv_times_out(log):
    sub = log.subscribe()
    log.append("sb", "created")
    sub.close()
    assert [e.action async for e in sub] == ["created"]
    other = log.subscribe()
    with pytest.raises(asyncio.TimeoutError):
        await other.recv(0.05)
