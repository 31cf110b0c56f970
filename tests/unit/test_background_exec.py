"""manager/background.py with a stand-in command: the kept tail, backpressure while a
client is attached, detach on close, forgetting once the end was read."""

from __future__ import annotations

import asyncio

import pytest

from arcbox_vm.errors import ExecNotAttachable
from arcbox_vm.manager import background
from arcbox_vm.models import OutputChunk


class FakeHandle:
    """The part of ExecHandle a HeldExec uses; output is fed by the test."""

    exec_id = "5"
    pid = 123
    timed_out = False

    def __init__(self) -> None:
        self.queue: asyncio.Queue[OutputChunk] = asyncio.Queue()
        self.taken = 0  # chunks the pump took (i.e. credit the guest got back)
        self.stdin: list[bytes] = []

    def __aiter__(self) -> "FakeHandle":
        return self

    async def __anext__(self) -> OutputChunk:
        chunk = await self.queue.get()
        self.taken += 1
        return chunk

    async def send_stdin(self, data: bytes) -> None:
        self.stdin.append(data)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def chunk(i: int, size: int = 64 * 1024) -> OutputChunk:
    return OutputChunk("stdout", bytes([i % 256]) * size)


def test_without_a_client_only_the_newest_output_is_kept():
    async def main() -> None:
        forgotten: list[object] = []
        h = FakeHandle()
        held = background.HeldExec("sb", h, forgotten.append)
        n = 3 * background.TAIL_BYTES // (64 * 1024)
        for i in range(n):
            h.queue.put_nowait(chunk(i))
        await settle()
        assert h.taken == n, "the pump reads everything: the command never blocks"
        assert held.dropped == 2 * background.TAIL_BYTES
        h.queue.put_nowait(OutputChunk("exit", b"", 3))
        att = held.attach()
        got = [c async for c in att]
        assert got[-1].stream == "exit" and got[-1].exit_code == 3
        data = b"".join(c.data for c in got[:-1])
        assert len(data) == background.TAIL_BYTES and data[-1] == (n - 1) % 256
        assert forgotten == [held], "its end was read: no longer held"

    asyncio.run(main())


def test_an_attached_client_sets_the_pace_and_leaving_detaches():
    async def main() -> None:
        h = FakeHandle()
        held = background.HeldExec("sb", h, lambda _: None)
        att = held.attach()
        with pytest.raises(ExecNotAttachable):
            held.attach()
        n = 2 * background.TAIL_BYTES // (64 * 1024)
        for i in range(n):
            h.queue.put_nowait(chunk(i))
        await settle()
        assert h.taken < n, "with a client attached nothing is dropped: the pump waits for it"
        assert held.dropped == 0
        first = await att.__anext__()
        assert first.data[0] == 0
        await att.aclose()  # detach: the pump goes on, dropping old output again
        await settle()
        assert h.taken == n and held.dropped > 0
        again = held.attach()  # a new client may attach now
        await again.send_stdin(b"hi")
        assert h.stdin == [b"hi"]
        held.forget()

    asyncio.run(main())


def test_evict_finished_keeps_the_newest():
    async def main() -> None:
        held: dict[int, background.HeldExec] = {}
        for i in range(background.KEEP_FINISHED + 3):
            h = FakeHandle()
            x = background.HeldExec("sb", h, lambda e, i=i: held.pop(i, None))
            held[i] = x
            h.queue.put_nowait(OutputChunk("exit", b"", 0))
        await settle()
        background.evict_finished(held)
        assert sorted(held) == list(range(3, background.KEEP_FINISHED + 3))
        for x in list(held.values()):
            x.forget()

    asyncio.run(main())


def test_held_tail_round_trip_and_damage(tmp_path):
    from arcbox_vm.manager import held_tail

    chunks = [OutputChunk("stdout", b"a" * 10), OutputChunk("stderr", b"err"), OutputChunk("stdout", b"\x00\xff")]
    held_tail.save(tmp_path, "7", chunks + [OutputChunk("exit", b"", 0)])
    assert held_tail.take(tmp_path, "7") == chunks
    assert held_tail.take(tmp_path, "7") == [], "taken once"
    held_tail.save(tmp_path, "8", chunks)
    path = held_tail.tail_path(tmp_path, "8")
    path.write_bytes(path.read_bytes()[:-1])  # cut short
    assert held_tail.take(tmp_path, "8") == chunks[:2]
    held_tail.save(tmp_path, "9", [])
    assert not held_tail.tail_path(tmp_path, "9").exists()


def test_kept_output_is_delivered_first():
    async def main() -> None:
        h = FakeHandle()
        held = background.HeldExec("sb", h, lambda _: None, kept=[OutputChunk("stdout", b"old ")])
        h.queue.put_nowait(OutputChunk("stdout", b"new"))
        h.queue.put_nowait(OutputChunk("exit", b"", 0))
        out, _, code = await held.attach().collect()
        assert (out, code) == (b"old new", 0)

    asyncio.run(main())
