"""manager/execs.py without a VM: restart reconciliation and attach's refusals.

The real path (a daemon killed under a streaming command, restarted, Attach) is in
tests/vm/test_durability.py; these pin the rules on a real StateStore with a stand-in agent.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from arcbox_vm.errors import ExecError, ExecNotAttachable, ExecNotFound
from arcbox_vm.manager import execs
from arcbox_vm.storage.state import StateStore


class FakeAgent:
    """What execs.py uses of an AgentConnection: detached, supports_attach, reserve_channels, attach."""

    def __init__(self, detached: dict[int, dict], supports_attach: bool = True) -> None:
        self.detached = detached
        self.supports_attach = supports_attach
        self.reserved: int | None = None

    def reserve_channels(self, up_to: int) -> None:
        self.reserved = up_to

    async def attach(self, channel: int):
        raise ExecError("no detached session", code="no_such_channel")


@pytest.fixture
def store(tmp_path):
    st = StateStore(tmp_path)
    st.open()
    yield st
    st.close()


def book(store: StateStore) -> execs.ExecBook:
    return execs.ExecBook(store, lambda *a, **k: None, lambda: False, lambda: False)


def sandbox(sid: str = "s1") -> SimpleNamespace:
    return SimpleNamespace(id=sid, active_execs=0, state=None, removed=False, held={}, streams={})


def test_reconcile_marks_held_commands_detached_and_others_lost(store):
    for ch in (1, 2, 3):
        store.put_exec("s1", ch, ["cmd", str(ch)])
    store.finish_exec("s1", 3, 0, "exited")
    store.put_exec("s1", 9, ["old"])
    store.set_exec_status("s1", 9, "detached")  # detached by an earlier restart, still held
    agent = FakeAgent({2: {"channel": 2}, 9: {"channel": 9}, 12: {"channel": 12}})
    assert execs.reconcile(store, sandbox(), agent) == (2, 1)
    status = {e.exec_id: e.status for e in book(store).list(sandbox())}
    assert status == {"1": "lost", "2": "detached", "3": "exited", "9": "detached"}
    assert agent.reserved == 12, "new channels go above the database's and the agent's"


def test_reconcile_without_attach_support_or_agent_marks_all_lost(store):
    store.put_exec("s1", 1, ["a"])
    store.put_exec("s1", 2, ["b"])
    assert execs.reconcile(store, sandbox(), FakeAgent({1: {}}, supports_attach=False)) == (0, 2)
    store.put_exec("s1", 5, ["c"])
    assert execs.reconcile(store, sandbox(), None) == (0, 1)
    assert {e.status for e in book(store).list(sandbox())} == {"lost"}


def test_attach_refusals(store):
    store.put_exec("s1", 1, ["a"])
    store.put_exec("s1", 2, ["b"])
    store.set_exec_status("s1", 2, "detached")
    agent = FakeAgent({})

    def attach(exec_id):
        return asyncio.run(book(store).attach(sandbox(), agent, exec_id))

    for bad in ("7", "x", "-1", "0", ""):
        with pytest.raises(ExecNotFound):
            attach(bad)
    with pytest.raises(ExecNotAttachable) as err:
        attach("1")  # a client holds it
    assert err.value.status == "running"
    with pytest.raises(ExecNotAttachable) as err:
        attach("2")  # listed detached, but the agent no longer has it (guest rebooted, forgotten)
    assert err.value.status == "lost"
    assert {e.exec_id: e.status for e in book(store).list(sandbox())}["2"] == "lost"
    with pytest.raises(ExecNotAttachable):  # signals need a running command the manager streams
        asyncio.run(book(store).signal(sandbox(), "1", 15))
    with pytest.raises(ExecNotFound):
        asyncio.run(book(store).signal(sandbox(), "77", 15))


def test_hello_detached_list_is_parsed_defensively():
    from arcbox_vm.agent.host import _detached_sessions

    hello = {"detached": [{"channel": 3}, {"channel": "4"}, {"channel": True}, "junk", {"channel": 0}, {"channel": 7}]}
    assert sorted(_detached_sessions(hello)) == [3, 7]
    assert _detached_sessions({}) == {} and _detached_sessions({"detached": "x"}) == {}


def test_background_commands_are_capped_per_sandbox(store):
    from arcbox_vm.errors import ResourceExhausted
    from arcbox_vm.manager.background import MAX_RUNNING

    sb = sandbox()
    sb.held = {i: SimpleNamespace(finished=False) for i in range(MAX_RUNNING - 1)}
    sb.held[999] = SimpleNamespace(finished=True)  # finished ones do not count
    book(store).check_room(sb)
    sb.held[MAX_RUNNING] = SimpleNamespace(finished=False)
    with pytest.raises(ResourceExhausted, match="background commands"):
        book(store).check_room(sb)
