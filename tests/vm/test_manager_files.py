"""Files in and out of a real sandbox through SandboxManager.

One sandbox serves the whole module (booting costs seconds under TCG). Throughput and
memory figures are printed (`pytest -s` shows them). The big streaming write goes to
/dev/null (written in place, like any character device): the guest has ~1 GiB free on its
root filesystem and its /tmp is RAM, so 1 GiB of real file would not fit; the transfer
path (host -> channel -> agent -> write(2)) is the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import pytest_asyncio

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec, SandboxState
from arcbox_vm.errors import (
    FileTooLarge,
    GuestFileError,
    GuestFileNotFound,
    GuestPermissionDenied,
    InvalidArgument,
    InvalidState,
)

from .manager_helpers import make_config

pytestmark = pytest.mark.vm

MIB = 1 << 20
SANDBOX_UID = 1000  # the image's "sandbox" user


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pattern(seed: int) -> bytes:
    return hashlib.sha256(b"seed%d" % seed).digest() * (MIB // 32 + 128)


async def stream(total: int, chunk: int = MIB, seed: int = 1, h: "hashlib._Hash | None" = None):
    """`total` bytes in `chunk`-sized pieces that differ from each other, hashed into `h`."""
    base = pattern(seed)
    sent = 0
    i = 0
    while sent < total:
        n = min(chunk, total - sent)
        off = (i * 97) % 4096
        piece = base[off : off + n] if n <= MIB else (base[off : off + MIB] * (n // MIB + 1))[:n]
        if h is not None:
            h.update(piece)
        yield piece
        sent += n
        i += 1


async def run(mgr: SandboxManager, sid: str, cmd: list[str], user: str = "root") -> tuple[bytes, int]:
    out, err, code = await (await mgr.run_in_sandbox(sid, cmd, user=user)).collect()
    return out + err, code


@pytest_asyncio.fixture(scope="module")
async def box(backend, guest_image, tmp_path_factory):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path_factory.mktemp("files"),
                                     cidr="172.99.7.0/24"))
    try:
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none"), memory_mib=512))
        await mgr.wait_ready(sid)
        yield mgr, sid
    finally:
        await mgr.close()


async def test_64mib_upload_and_download_are_byte_exact(box):
    mgr, sid = box
    size = 64 * MIB
    h_up = hashlib.sha256()
    started = time.monotonic()
    upload = asyncio.ensure_future(mgr.write_file(sid, "/root/big.bin", stream(size, h=h_up), size=size))
    await asyncio.sleep(0.5)
    assert not upload.done() and mgr.inspect_sandbox(sid).state == SandboxState.READY  # transfers leave it READY
    assert await upload == size
    up = time.monotonic() - started
    out, code = await run(mgr, sid, ["sha256sum", "/root/big.bin"])
    assert code == 0 and out.split()[0].decode() == h_up.hexdigest()  # what landed on the guest's disk

    started = time.monotonic()
    reader = await mgr.read_file(sid, "/root/big.bin")
    assert reader.size == size
    h_down = hashlib.sha256()
    got = 0
    async for chunk in reader:
        h_down.update(chunk)
        got += len(chunk)
    down = time.monotonic() - started
    assert got == size and h_down.hexdigest() == h_up.hexdigest()
    print(f"\n64 MiB over the real VM: upload {size / MIB / up:.1f} MiB/s ({up:.1f} s), "
          f"download {size / MIB / down:.1f} MiB/s ({down:.1f} s)")
    assert mgr.inspect_sandbox(sid).state == SandboxState.READY
    await run(mgr, sid, ["rm", "-f", "/root/big.bin"])


async def test_1gib_streaming_write_in_bounded_host_memory_while_execs_run(box):
    """1 GiB streamed into the guest: host RSS must not follow the size; execs keep working."""
    mgr, sid = box
    size = 1024 * MIB
    events = mgr.subscribe_events()
    rss_before = rss_kib()
    peak = rss_before

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib())
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    started = time.monotonic()
    upload = asyncio.ensure_future(mgr.write_file(sid, "/dev/null", stream(size, chunk=4 * MIB, seed=2)))
    try:
        exec_times = []
        while not upload.done():  # commands keep flowing while the transfer runs
            t0 = time.monotonic()
            out, code = await asyncio.wait_for(run(mgr, sid, ["echo", "alive"]), 30)
            exec_times.append(time.monotonic() - t0)
            assert (out, code) == (b"alive\n", 0)
            await asyncio.wait({upload}, timeout=1.0)
        assert await upload == size
    finally:
        watcher.cancel()
        upload.cancel()
    elapsed = time.monotonic() - started
    print(f"\n1 GiB streamed to /dev/null in {elapsed:.1f} s ({size / MIB / elapsed:.1f} MiB/s); host RSS "
          f"{rss_before // 1024} -> peak {peak // 1024} MiB (+{(peak - rss_before) // 1024} MiB); "
          f"{len(exec_times)} execs during it, slowest {max(exec_times):.2f} s")
    assert peak - rss_before < 64 * 1024, f"host RSS grew by {(peak - rss_before) // 1024} MiB"
    assert len(exec_times) >= 2
    # the transfer itself never changed the state: only the execs' running/idle events exist
    actions = []
    while True:
        try:
            actions.append((await events.recv(timeout=0.2)).action)
        except asyncio.TimeoutError:
            break
    assert set(actions) <= {"running", "idle"}
    assert mgr.inspect_sandbox(sid).state == SandboxState.READY


async def test_permissions_owners_and_nested_paths(box):
    mgr, sid = box
    # nested, as the sandbox user, in its home: directories and file belong to it
    path = "/home/sandbox/a/b/c/notes.txt"
    assert await mgr.write_file(sid, path, stream(1000), mode=0o640, uid=SANDBOX_UID, gid=SANDBOX_UID,
                                make_parents=True) == 1000
    out, code = await run(mgr, sid, ["stat", "-c", "%u:%g %a %s", path, "/home/sandbox/a", "/home/sandbox/a/b/c"])
    assert code == 0
    assert out.decode().split("\n")[:3] == ["1000:1000 640 1000", "1000:1000 755 4096", "1000:1000 755 4096"]
    out, _ = await run(mgr, sid, ["cat", path], user="sandbox")  # readable by its owner
    assert len(out) == 1000

    # the sandbox user cannot write where it may not, however the path is spelled
    for bad in ("/root/x", "/etc/evil.conf", "/home/sandbox/../../root/x", "/usr/bin/sh"):
        with pytest.raises(GuestPermissionDenied):
            await mgr.write_file(sid, bad, stream(10), uid=SANDBOX_UID, gid=SANDBOX_UID)
    with pytest.raises(GuestPermissionDenied):
        await mgr.write_file(sid, "/opt/new/dir/f", stream(10), uid=SANDBOX_UID, gid=SANDBOX_UID, make_parents=True)
    out, _ = await run(mgr, sid, ["sh", "-c", "ls -a /root /opt; test -e /etc/evil.conf && echo EVIL"])
    assert b"arcbox-tmp" not in out and b"EVIL" not in out and b"new" not in out

    # root writes anywhere and can hand a file to someone else
    assert await mgr.write_file(sid, "/etc/arcbox-test.conf", stream(10), mode=0o600, uid=0, gid=SANDBOX_UID) == 10
    out, code = await run(mgr, sid, ["stat", "-c", "%u:%g %a", "/etc/arcbox-test.conf"])
    assert out == b"0:1000 600\n"
    out, code = await run(mgr, sid, ["cat", "/etc/arcbox-test.conf"], user="sandbox")
    assert code != 0  # 0600 root-owned: not for the sandbox user


async def test_stat_list_and_errors(box):
    mgr, sid = box
    await mgr.write_file(sid, "/srv/listing/one.txt", stream(11), make_parents=True)
    await mgr.write_file(sid, "/srv/listing/two.bin", stream(22))
    await run(mgr, sid, ["sh", "-c", "mkdir -p /srv/listing/sub && ln -sf one.txt /srv/listing/link"])
    st = await mgr.stat_path(sid, "/srv/listing/one.txt")
    assert (st.type, st.size, st.mode, st.uid, st.name, st.path) == ("file", 11, 0o644, 0, "one.txt",
                                                                      "/srv/listing/one.txt")
    assert st.mtime > 0
    assert (await mgr.stat_path(sid, "/srv/listing")).type == "dir"
    entries = await mgr.list_dir(sid, "/srv/listing")
    assert [(e.name, e.type) for e in entries] == [("link", "symlink"), ("one.txt", "file"), ("sub", "dir"),
                                                   ("two.bin", "file")]
    assert entries[0].link_target == "one.txt" and entries[3].size == 22
    assert entries[3].path == "/srv/listing/two.bin"
    assert not getattr(entries, "truncated", False)

    with pytest.raises(GuestFileNotFound):
        await mgr.stat_path(sid, "/srv/nope")
    with pytest.raises(GuestFileNotFound):
        await mgr.read_file(sid, "/srv/nope")
    with pytest.raises(GuestFileNotFound):
        await mgr.write_file(sid, "/srv/missing/dir/f", stream(1))
    with pytest.raises(GuestFileError) as isdir:
        await mgr.read_file(sid, "/srv/listing")
    assert "directory" in str(isdir.value)
    with pytest.raises(GuestFileError):
        await mgr.write_file(sid, "/srv/listing/sub", stream(1))
    with pytest.raises(GuestFileError):
        await mgr.list_dir(sid, "/srv/listing/one.txt")
    for bad in ("relative/path", "/a\x00b", ""):
        with pytest.raises(InvalidArgument):
            await mgr.write_file(sid, bad, stream(1))
        with pytest.raises(InvalidArgument):
            await mgr.stat_path(sid, bad)
    with pytest.raises(InvalidArgument):
        await mgr.write_file(sid, "/srv/x", stream(1), mode=0o17777)
    out, _ = await run(mgr, sid, ["ls", "-a", "/srv/listing"])
    assert b"arcbox-tmp" not in out
    assert mgr.inspect_sandbox(sid).state == SandboxState.READY


async def test_size_limit_and_aborted_uploads(box):
    mgr, sid = box
    limit_was = mgr.config.daemon.max_file_mib
    mgr.config.daemon.max_file_mib = 1
    try:
        with pytest.raises(FileTooLarge, match="max_file_mib"):
            await mgr.write_file(sid, "/root/limited", stream(2 * MIB), size=2 * MIB)
        with pytest.raises(FileTooLarge, match="max_file_mib"):
            await mgr.write_file(sid, "/root/limited", stream(2 * MIB))  # no declared size: caught in flight
        assert await mgr.write_file(sid, "/root/limited", stream(MIB)) == MIB
        mgr.config.daemon.max_file_mib = 0
        await mgr.write_file(sid, "/root/limited", stream(3 * MIB))
        mgr.config.daemon.max_file_mib = 1
        with pytest.raises(FileTooLarge, match="max_file_mib"):
            await mgr.read_file(sid, "/root/limited")
    finally:
        mgr.config.daemon.max_file_mib = limit_was

    async def broken():
        async for piece in stream(3 * MIB):
            yield piece
        raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError):
        await mgr.write_file(sid, "/root/limited", broken())
    st = await mgr.stat_path(sid, "/root/limited")
    assert st.size == 3 * MIB  # the previous version is intact
    await asyncio.sleep(0.2)
    out, _ = await run(mgr, sid, ["ls", "-a", "/root"])
    assert b"arcbox-tmp" not in out

    # a download closed half-way leaves the channel usable
    reader = await mgr.read_file(sid, "/root/limited")
    await reader.__anext__()
    await reader.aclose()
    assert (await mgr.stat_path(sid, "/root/limited")).size == 3 * MIB


async def test_files_need_a_live_sandbox(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path, cidr="172.99.8.0/24"))
    try:
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
        with pytest.raises(InvalidState):  # still starting
            await mgr.stat_path(sid, "/")
        await mgr.wait_ready(sid)
        assert (await mgr.stat_path(sid, "/")).type == "dir"
        await mgr.stop_sandbox(sid, 5)
        for call in (mgr.stat_path(sid, "/"), mgr.list_dir(sid, "/"), mgr.read_file(sid, "/etc/hostname"),
                     mgr.write_file(sid, "/x", stream(1))):
            with pytest.raises(InvalidState):
                await call
    finally:
        await mgr.close()
