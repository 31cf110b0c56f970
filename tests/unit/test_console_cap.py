"""The console ring: a guest printing forever leaves at most about the cap on disk, and
`logs` still shows the newest output in order."""

from __future__ import annotations

import os

from arcbox_vm.manager.console import cap_console, follow_console, rotated, tail_text


def append(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # as the VMM writes it
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_the_console_stays_under_its_cap_and_keeps_the_newest_bytes(tmp_path):
    log = tmp_path / "console.log"
    cap = 64 * 1024
    written = b""
    for i in range(400):
        line = b"line %06d " % i + b"x" * 300 + b"\n"
        append(log, line)
        written += line
        cap_console(log, cap)
        assert log.stat().st_size + (rotated(log).stat().st_size if rotated(log).exists() else 0) <= cap
    kept = rotated(log).read_bytes() + log.read_bytes()
    assert written.endswith(kept), "what is kept is exactly the newest output, in order"
    assert len(kept) >= cap // 4


async def test_logs_show_the_rotated_part_then_the_live_one(tmp_path):
    log = tmp_path / "console.log"
    append(log, b"a" * 100)
    assert cap_console(log, 128) == 100  # over a quarter of the cap: rotated
    assert log.stat().st_size == 0
    append(log, b"b" * 10)
    chunks = [c async for c in follow_console(log, follow=False, alive=lambda: True)]
    assert b"".join(chunks) == b"a" * 32 + b"b" * 10


async def test_a_follower_survives_a_rotation(tmp_path):
    log = tmp_path / "console.log"
    append(log, b"first\n")
    seen = []
    it = follow_console(log, follow=True, alive=lambda: len(seen) < 2)
    seen.append(await anext(it))
    append(log, b"x" * 100)
    assert cap_console(log, 64) and log.stat().st_size == 0  # rotated away under the follower
    append(log, b"second\n")
    seen.append(await anext(it))
    assert seen == [b"first\n", b"second\n"], "restarts at the new beginning, not at the old offset"
    await it.aclose()


def test_boot_failure_messages_read_only_the_end(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"junk\n" * 100_000 + b"Kernel panic - not syncing\n")
    assert tail_text(log).splitlines()[-1] == "Kernel panic - not syncing"
