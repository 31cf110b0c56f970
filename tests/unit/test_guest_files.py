"""File transfer through the guest agent, run on the host as an ordinary process.

The first part drives the agent with raw frames (``agent_harness.Client``) to pin the
protocol down: atomic writes, temp-file clean-up, credentials, errors, credit and memory.
The second part goes through the real host side (``AgentConnection.write_file`` & co.)
over the same kind of socket, to check the error mapping and the host's own bounds.
Tests that switch uids need root (they are skipped otherwise).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import pytest_asyncio
from agent_harness import IS_ROOT, AgentProcess, Client, rss_kib, spawn_agent

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import AgentConnection, AgentListener, DirListing
from arcbox_vm.errors import (
    AgentError,
    FileTooLarge,
    GuestFileError,
    GuestFileNotFound,
    GuestPermissionDenied,
    InvalidArgument,
)

needs_root = pytest.mark.skipif(not IS_ROOT, reason="switching uids needs root")
USER = 4321  # a uid/gid with no passwd entry; any non-root id works


class FileFailed(Exception):
    def __init__(self, body: Dict[str, Any]) -> None:
        super().__init__("%s: %s" % (body.get("code"), body.get("message")))
        self.code = body.get("code")
        self.message = str(body.get("message", ""))


@pytest.fixture
def agent():
    a = AgentProcess()
    yield a
    log = a.log()
    a.stop()
    print("---- agent log ----\n%s" % log)  # shown only when the test failed


@pytest.fixture
def client(agent: AgentProcess) -> Client:
    c, _ = agent.connect()
    return c


@pytest.fixture
def box() -> Iterator[Path]:
    """A directory every uid can traverse (pytest's tmp_path is 0700, root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="agf"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---- a blocking host side for file transfers ----------------------------------------------


def _expect(client: Client, ch: int, *types: int) -> p.Frame:
    """The next frame on ``ch`` that is not a WINDOW; ERROR raises FileFailed."""
    while True:
        f = client.next(ch)
        if f.type == p.MsgType.WINDOW and p.MsgType.WINDOW not in types:
            continue
        if f.type == p.MsgType.ERROR:
            raise FileFailed(f.json())
        assert f.type in types, "expected %s, got %r" % ([p.MsgType(t).name for t in types], f)
        return f


def start_write(client: Client, ch: int, path: str, **kw: Any) -> Dict[str, Any]:
    client.send_json(p.MsgType.FILE_WRITE, ch, p.file_write_request(path, **kw))
    return _expect(client, ch, p.MsgType.FILE_READY).json()


class Sender:
    """Sends FILE_DATA within the agent's credit, reading WINDOW frames when it runs out."""

    def __init__(self, client: Client, ch: int) -> None:
        self.client, self.ch = client, ch
        self.credit = p.INITIAL_WINDOW
        self.sent = 0

    def send(self, data: bytes, frame: int = p.DATA_CHUNK) -> None:
        off = 0
        while off < len(data):
            while self.credit <= 0:
                f = _expect(self.client, self.ch, p.MsgType.WINDOW)
                self.credit += p.decode_window(f.payload)
            n = min(frame, self.credit, len(data) - off)
            self.client.send(p.MsgType.FILE_DATA, self.ch, data[off : off + n])
            off += n
            self.credit -= n
            self.sent += n

    def end(self) -> Dict[str, Any]:
        self.client.send(p.MsgType.FILE_END, self.ch)
        return _expect(self.client, self.ch, p.MsgType.FILE_DONE).json()


def write_file(client: Client, ch: int, path: str, data: bytes, **kw: Any) -> Dict[str, Any]:
    start_write(client, ch, path, **kw)
    s = Sender(client, ch)
    s.send(data)
    return s.end()


def read_file(client: Client, ch: int, path: str, **kw: Any) -> Tuple[Dict[str, Any], bytes]:
    client.send_json(p.MsgType.FILE_READ, ch, dict(path=path, **kw))
    info = _expect(client, ch, p.MsgType.FILE_INFO).json()
    data = bytearray()
    consumed = 0
    while True:
        f = _expect(client, ch, p.MsgType.FILE_DATA, p.MsgType.FILE_END)
        if f.type == p.MsgType.FILE_END:
            return info, bytes(data)
        data += f.payload
        consumed += len(f.payload)
        if consumed >= p.INITIAL_WINDOW // 4:
            client.send_raw(p.encode_window(ch, consumed))
            consumed = 0


def request(client: Client, ch: int, type: int, reply: int, **body: Any) -> Dict[str, Any]:
    client.send_json(type, ch, body)
    return _expect(client, ch, reply).json()


def failure(fn: Any, *args: Any, **kw: Any) -> FileFailed:
    with pytest.raises(FileFailed) as exc:
        fn(*args, **kw)
    return exc.value


def temps(d: Path) -> List[str]:
    return [n for n in os.listdir(d) if ".arcbox-tmp-" in n]


def wait_no_temps(d: Path, limit: float = 5.0) -> List[str]:
    deadline = time.monotonic() + limit
    while temps(d) and time.monotonic() < deadline:
        time.sleep(0.02)
    return temps(d)


async def no_temps_soon(d: Path, limit: float = 5.0) -> List[str]:
    deadline = time.monotonic() + limit
    while temps(d) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return temps(d)


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# ---- writing and reading ------------------------------------------------------------------


def test_hello_announces_file_transfer(agent: AgentProcess) -> None:
    _, hello = agent.connect()
    assert p.FEATURE_FILES in hello["features"]


def test_write_then_read_round_trip(client: Client, box: Path) -> None:
    data = blob(3 * p.INITIAL_WINDOW + 12345)  # needs credit back from the agent
    target = box / "round.bin"
    done = write_file(client, 1, str(target), data, mode=0o640)
    assert done == {"size": len(data), "path": str(target)}
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    info, got = read_file(client, 2, str(target))
    assert got == data
    assert (info["type"], info["size"], info["mode"], info["path"], info["name"]) == (
        "file", len(data), 0o640, str(target), "round.bin")
    assert temps(box) == []


def test_empty_file_and_odd_frame_sizes(client: Client, box: Path) -> None:
    assert write_file(client, 1, str(box / "empty"), b"")["size"] == 0
    assert (box / "empty").read_bytes() == b""
    assert read_file(client, 2, str(box / "empty"))[1] == b""
    data = blob(700_001, seed=3)
    start_write(client, 3, str(box / "odd"))
    s = Sender(client, 3)
    s.send(data, frame=777)  # many small frames: credit returns in batches all the same
    assert s.end()["size"] == len(data)
    assert (box / "odd").read_bytes() == data


def test_declared_size_must_match(client: Client, box: Path) -> None:
    start_write(client, 1, str(box / "f"), size=10)
    client.send(p.MsgType.FILE_DATA, 1, b"12345")
    client.send(p.MsgType.FILE_END, 1)
    err = failure(_expect, client, 1, p.MsgType.FILE_DONE)
    assert err.code == p.ErrorCode.BAD_REQUEST and "declared 10" in err.message
    start_write(client, 2, str(box / "f"), size=3)
    client.send(p.MsgType.FILE_DATA, 2, b"12345")
    assert failure(_expect, client, 2, p.MsgType.FILE_DONE).code == p.ErrorCode.BAD_REQUEST
    assert not (box / "f").exists() and wait_no_temps(box) == []
    assert write_file(client, 3, str(box / "f"), b"abc", size=3)["size"] == 3


def test_declared_size_beyond_free_space_is_refused_up_front(client: Client, box: Path) -> None:
    err = failure(start_write, client, 1, str(box / "huge"), size=1 << 60)
    assert err.code == p.ErrorCode.NO_SPACE and "free" in err.message
    assert os.listdir(box) == []


def test_no_space_while_writing(client: Client) -> None:
    start_write(client, 1, "/dev/full")  # a character device: written in place, ENOSPC on write
    client.send(p.MsgType.FILE_DATA, 1, b"x" * 1000)
    err = failure(_expect, client, 1, p.MsgType.FILE_DONE)
    assert err.code == p.ErrorCode.NO_SPACE and "/dev/full" in err.message


def test_character_devices_are_written_in_place(client: Client) -> None:
    assert write_file(client, 1, "/dev/null", blob(2 * p.INITIAL_WINDOW))["size"] == 2 * p.INITIAL_WINDOW
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # not replaced by a regular file


def test_atomic_replace_readers_never_see_a_partial_file(client: Client, box: Path) -> None:
    target = box / "config"
    old, new = b"A" * 300_000, b"B" * (2 * p.INITIAL_WINDOW)
    target.write_bytes(old)
    old_inode = target.stat().st_ino
    seen: set = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            seen.add((data[:1], len(data)))

    t = threading.Thread(target=reader)
    t.start()
    try:
        start_write(client, 1, str(target))
        s = Sender(client, 1)
        for off in range(0, len(new), 100_000):
            s.send(new[off : off + 100_000])
            time.sleep(0.01)
        time.sleep(0.1)
        assert target.read_bytes() == old  # everything sent, not yet committed
        assert len(temps(box)) == 1
        s.end()
        time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert target.read_bytes() == new and target.stat().st_ino != old_inode
    assert seen <= {(b"A", len(old)), (b"B", len(new))} and (b"A", len(old)) in seen
    assert temps(box) == []


def test_host_error_aborts_the_write_and_removes_the_temp_file(client: Client, box: Path) -> None:
    target = box / "keep"
    target.write_bytes(b"original")
    start_write(client, 1, str(target))
    Sender(client, 1).send(blob(200_000))
    client.send(p.MsgType.PING, 1, b"sync")  # the agent handled everything before the PONG
    assert _expect(client, 1, p.MsgType.PONG).payload == b"sync"
    assert len(temps(box)) == 1
    client.send_json(p.MsgType.ERROR, 1, {"code": p.ErrorCode.CANCELLED, "message": "changed my mind"})
    assert wait_no_temps(box) == []
    assert target.read_bytes() == b"original"
    client.send(p.MsgType.FILE_DATA, 1, b"late")  # frames after the abort are ignored quietly
    client.send(p.MsgType.FILE_END, 1)
    assert client.quiet_for(1, 0.3) == []


def test_lost_connection_removes_the_temp_file(agent: AgentProcess, box: Path) -> None:
    client, _ = agent.connect()
    start_write(client, 1, str(box / "partial"))
    Sender(client, 1).send(blob(300_000))
    client.send(p.MsgType.PING, 1, b"sync")
    _expect(client, 1, p.MsgType.PONG)
    assert len(temps(box)) == 1
    client.sock.close()
    assert wait_no_temps(box) == []
    assert not (box / "partial").exists()
    client2, _ = agent.connect()  # the agent redials and serves again
    assert write_file(client2, 1, str(box / "partial"), b"ok")["size"] == 2


def test_write_credit_comes_back_in_batches_as_data_is_written(client: Client, box: Path) -> None:
    start_write(client, 1, str(box / "f"))
    for _ in range(p.INITIAL_WINDOW // p.DATA_CHUNK):  # exactly the initial window
        client.send(p.MsgType.FILE_DATA, 1, bytes(p.DATA_CHUNK))
    frames = client.quiet_for(1, 0.3)
    assert all(f.type == p.MsgType.WINDOW for f in frames)
    assert sum(p.decode_window(f.payload) for f in frames) == p.INITIAL_WINDOW
    client.send(p.MsgType.FILE_DATA, 1, b"x" * 1000)  # below a batch: no WINDOW yet
    assert client.quiet_for(1, 0.3) == []
    client.send(p.MsgType.FILE_END, 1)
    assert _expect(client, 1, p.MsgType.FILE_DONE).json()["size"] == p.INITIAL_WINDOW + 1000


def test_data_beyond_the_window_ends_the_write(box: Path) -> None:
    a = AgentProcess(prelude="import arcbox_vm.agent.guest.filewrite as f\nf.GRANT_BATCH = 1 << 40  # never grant")
    try:
        client, _ = a.connect()
        start_write(client, 1, str(box / "greedy"))
        for _ in range(p.INITIAL_WINDOW // p.DATA_CHUNK + 1):  # one frame more than the credit
            client.send(p.MsgType.FILE_DATA, 1, bytes(p.DATA_CHUNK))
        err = failure(_expect, client, 1, p.MsgType.FILE_DONE)
        assert err.code == p.ErrorCode.BAD_REQUEST and "window" in err.message
        assert wait_no_temps(box) == [] and not (box / "greedy").exists()
    finally:
        a.stop()


def test_make_parents_and_missing_parents(client: Client, box: Path) -> None:
    deep = box / "a" / "b" / "c" / "f.txt"
    err = failure(write_file, client, 1, str(deep), b"x")
    assert err.code == p.ErrorCode.NOT_FOUND and "make_parents" in err.message
    assert write_file(client, 2, str(deep), b"x", make_parents=True)["size"] == 1
    for d in (box / "a", box / "a" / "b", box / "a" / "b" / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    (box / "plain").write_bytes(b"")
    err = failure(write_file, client, 3, str(box / "plain" / "x" / "f"), b"x", make_parents=True)
    assert err.code == p.ErrorCode.NOT_A_DIRECTORY


def test_writing_onto_a_directory_or_special_file_is_refused(client: Client, box: Path) -> None:
    (box / "dir").mkdir()
    assert failure(start_write, client, 1, str(box / "dir")).code == p.ErrorCode.IS_A_DIRECTORY
    os.mkfifo(box / "fifo")
    assert failure(start_write, client, 2, str(box / "fifo")).code == p.ErrorCode.NOT_REGULAR
    assert failure(start_write, client, 3, str(box) + "/").code == p.ErrorCode.BAD_REQUEST
    assert sorted(os.listdir(box)) == ["dir", "fifo"]


def test_a_symlink_at_the_target_is_followed(client: Client, box: Path) -> None:
    (box / "real").write_bytes(b"old")
    (box / "link").symlink_to("real")
    assert write_file(client, 1, str(box / "link"), b"new")["path"] == str(box / "real")
    assert (box / "link").is_symlink() and (box / "real").read_bytes() == b"new"


@pytest.mark.parametrize(
    "body",
    [{"path": "relative/file"}, {"path": "/tmp/a\x00b"}, {"path": ""}, {}, {"path": "/x", "mode": 0o10000},
     {"path": "/x", "uid": -1}, {"path": "/x", "make_parents": "yes"}, {"path": "/" + "a" * 5000}],
)
def test_bad_write_requests(client: Client, body: Dict[str, Any]) -> None:
    client.send_json(p.MsgType.FILE_WRITE, 1, body)
    assert failure(_expect, client, 1, p.MsgType.FILE_READY).code == p.ErrorCode.BAD_REQUEST
    client.send(p.MsgType.FILE_DATA, 1, b"pipelined")  # dropped quietly after the refusal
    assert client.quiet_for(1, 0.2) == []


def test_read_errors(client: Client, box: Path) -> None:
    err = failure(read_file, client, 1, str(box / "missing"))
    assert err.code == p.ErrorCode.NOT_FOUND and str(box / "missing") in err.message
    err = failure(read_file, client, 2, str(box))
    assert err.code == p.ErrorCode.IS_A_DIRECTORY and "directory" in err.message
    os.mkfifo(box / "fifo")
    assert failure(read_file, client, 3, str(box / "fifo")).code == p.ErrorCode.NOT_REGULAR
    assert failure(read_file, client, 4, "rel").code == p.ErrorCode.BAD_REQUEST
    (box / "f").write_bytes(b"")
    assert failure(read_file, client, 5, str(box / "f" / "x")).code == p.ErrorCode.NOT_A_DIRECTORY


def test_file_and_exec_channels_do_not_mix(client: Client, box: Path) -> None:
    client.exec(1, ["cat"], stdin=True)
    client.send_json(p.MsgType.FILE_READ, 1, {"path": "/etc/hostname"})
    assert failure(_expect, client, 1, p.MsgType.FILE_INFO).code == p.ErrorCode.CHANNEL_IN_USE
    client.send(p.MsgType.FILE_DATA, 1, b"x")
    assert failure(_expect, client, 1, p.MsgType.FILE_INFO).code == p.ErrorCode.BAD_REQUEST
    start_write(client, 2, str(box / "f"))
    client.send(p.MsgType.STDIN, 2, b"x")
    assert failure(_expect, client, 2, p.MsgType.FILE_DONE).code == p.ErrorCode.BAD_REQUEST
    assert wait_no_temps(box) == []


# ---- stat and list ------------------------------------------------------------------------


def test_stat(client: Client, box: Path) -> None:
    (box / "f").write_bytes(b"12345")
    os.chmod(box / "f", 0o604)
    (box / "l").symlink_to("f")
    st = request(client, 1, p.MsgType.FILE_STAT, p.MsgType.FILE_STAT_RESULT, path=str(box / "f"))
    assert (st["type"], st["size"], st["mode"], st["name"], st["path"]) == ("file", 5, 0o604, "f", str(box / "f"))
    assert st["uid"] == os.getuid() and abs(st["mtime"] - (box / "f").stat().st_mtime) < 1e-3
    st = request(client, 2, p.MsgType.FILE_STAT, p.MsgType.FILE_STAT_RESULT, path=str(box / "l"),
                 follow_symlinks=False)
    assert (st["type"], st["link_target"]) == ("symlink", "f")
    st = request(client, 3, p.MsgType.FILE_STAT, p.MsgType.FILE_STAT_RESULT, path=str(box / "l"))
    assert (st["type"], st["size"], st["link_target"]) == ("file", 5, "")
    st = request(client, 4, p.MsgType.FILE_STAT, p.MsgType.FILE_STAT_RESULT, path=str(box))
    assert st["type"] == "dir"
    st = request(client, 5, p.MsgType.FILE_STAT, p.MsgType.FILE_STAT_RESULT, path="/dev/null")
    assert st["type"] == "other"
    err = failure(request, client, 6, p.MsgType.FILE_STAT, p.MsgType.FILE_STAT_RESULT, path=str(box / "nope"))
    assert err.code == p.ErrorCode.NOT_FOUND


def test_list(client: Client, box: Path) -> None:
    (box / "b.txt").write_bytes(b"bb")
    (box / "a-dir").mkdir()
    (box / "c-link").symlink_to("/nowhere")
    res = request(client, 1, p.MsgType.FILE_LIST, p.MsgType.FILE_LIST_RESULT, path=str(box))
    assert res["truncated"] is False and res["path"] == str(box)
    assert [(e["name"], e["type"]) for e in res["entries"]] == [("a-dir", "dir"), ("b.txt", "file"),
                                                                ("c-link", "symlink")]
    assert res["entries"][1]["size"] == 2 and res["entries"][2]["link_target"] == "/nowhere"
    res = request(client, 2, p.MsgType.FILE_LIST, p.MsgType.FILE_LIST_RESULT, path=str(box), limit=2)
    assert res["truncated"] is True and len(res["entries"]) == 2
    err = failure(request, client, 3, p.MsgType.FILE_LIST, p.MsgType.FILE_LIST_RESULT, path=str(box / "b.txt"))
    assert err.code == p.ErrorCode.NOT_A_DIRECTORY
    err = failure(request, client, 4, p.MsgType.FILE_LIST, p.MsgType.FILE_LIST_RESULT, path=str(box / "zz"))
    assert err.code == p.ErrorCode.NOT_FOUND


def test_a_huge_directory_is_truncated_within_one_frame(client: Client, box: Path) -> None:
    n = p.LIST_LIMIT + 50
    for i in range(n):
        os.close(os.open(box / ("file-with-a-longish-name-%06d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
    started = time.monotonic()
    client.send_json(p.MsgType.FILE_LIST, 1, {"path": str(box)})
    f = _expect(client, 1, p.MsgType.FILE_LIST_RESULT)
    res = f.json()
    assert res["truncated"] is True and 1000 < len(res["entries"]) <= p.LIST_LIMIT
    assert len(f.payload) <= p.DEFAULT_MAX_PAYLOAD
    names = [e["name"] for e in res["entries"]]
    assert names == sorted(names)
    assert time.monotonic() - started < 5


# ---- credentials (the agent is root; requests act as another user) -----------------------


@needs_root
def test_owner_and_mode_are_applied_as_root(client: Client, box: Path) -> None:
    write_file(client, 1, str(box / "f"), b"x", mode=0o4750, uid=0, gid=USER)
    st = (box / "f").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, USER, 0o4750)
    write_file(client, 2, str(box / "new" / "deeper" / "g"), b"y", uid=0, gid=USER, make_parents=True)
    for d in (box / "new", box / "new" / "deeper"):
        assert (d.stat().st_uid, d.stat().st_gid, stat.S_IMODE(d.stat().st_mode)) == (0, USER, 0o755)


@needs_root
def test_writes_as_a_user_go_where_that_user_may_write(client: Client, box: Path) -> None:
    home = box / "home"
    home.mkdir()
    os.chown(home, USER, USER)
    done = write_file(client, 1, str(home / "sub" / "f"), b"mine", mode=0o600, uid=USER, gid=USER,
                      make_parents=True)
    assert done["size"] == 4
    for path in (home / "sub", home / "sub" / "f"):
        assert (path.stat().st_uid, path.stat().st_gid) == (USER, USER)
    assert stat.S_IMODE((home / "sub" / "f").stat().st_mode) == 0o600
    info, data = read_file(client, 2, str(home / "sub" / "f"), uid=USER, gid=USER)
    assert data == b"mine" and info["uid"] == USER


@needs_root
def test_a_user_cannot_write_into_a_root_only_directory(client: Client, box: Path) -> None:
    secret = box / "root-only"
    secret.mkdir(mode=0o700)
    home = box / "home"
    home.mkdir()
    os.chown(home, USER, USER)
    for n, path in enumerate([secret / "f", home / ".." / "root-only" / "f", box / "f"], start=1):
        err = failure(write_file, client, n, str(path), b"x", uid=USER, gid=USER)
        assert err.code == p.ErrorCode.PERMISSION, err
        assert "as uid %d" % USER in err.message
    err = failure(write_file, client, 9, str(secret / "a" / "b"), b"x", uid=USER, gid=USER, make_parents=True)
    assert err.code == p.ErrorCode.PERMISSION
    assert os.listdir(secret) == [] and "f" not in os.listdir(box)
    # root itself may
    assert write_file(client, 10, str(secret / "f"), b"root")["size"] == 4


@needs_root
def test_a_user_cannot_replace_or_read_a_file_it_may_not_touch(client: Client, box: Path) -> None:
    shared = box / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # writable by all, not sticky: rename would be allowed
    theirs = shared / "roots.conf"
    theirs.write_bytes(b"root data")
    os.chmod(theirs, 0o600)
    err = failure(write_file, client, 1, str(theirs), b"mine", uid=USER, gid=USER)
    assert err.code == p.ErrorCode.PERMISSION
    assert theirs.read_bytes() == b"root data" and temps(shared) == []
    assert failure(read_file, client, 2, str(theirs), uid=USER, gid=USER).code == p.ErrorCode.PERMISSION
    err = failure(request, client, 3, p.MsgType.FILE_LIST, p.MsgType.FILE_LIST_RESULT, path="/root", uid=USER,
                  gid=USER)
    assert err.code == p.ErrorCode.PERMISSION
    # ... and the agent is root again afterwards
    assert read_file(client, 4, str(theirs))[1] == b"root data"
    assert client.run(["id", "-u"], ch=5).stdout == b"0\n"


@needs_root
def test_credentials_without_ctypes_use_seteuid(box: Path) -> None:
    a = AgentProcess(prelude="import arcbox_vm.agent.guest.fscreds as f\nf._libc = False  # as on python3-minimal")
    try:
        client, _ = a.connect()
        (box / "root-only").mkdir(mode=0o700)
        home = box / "home"
        home.mkdir()
        os.chown(home, USER, USER)
        err = failure(write_file, client, 1, str(box / "root-only" / "f"), b"x", uid=USER, gid=USER)
        assert err.code == p.ErrorCode.PERMISSION
        write_file(client, 2, str(home / "f"), b"x", uid=USER, gid=USER)
        assert ((home / "f").stat().st_uid, (home / "f").stat().st_gid) == (USER, USER)
        assert client.run(["id", "-u"], ch=3).stdout == b"0\n"  # back to root
        assert write_file(client, 4, str(box / "root-only" / "f"), b"x")["size"] == 1
    finally:
        a.stop()


# ---- flow control and memory --------------------------------------------------------------


def test_read_sends_exactly_the_granted_credit(agent: AgentProcess, client: Client, box: Path) -> None:
    data = blob(6 * p.INITIAL_WINDOW, seed=9)
    (box / "big").write_bytes(data)
    client.send_json(p.MsgType.FILE_READ, 1, {"path": str(box / "big")})
    assert _expect(client, 1, p.MsgType.FILE_INFO).json()["size"] == len(data)
    frames = client.quiet_for(1, 0.5)
    assert all(f.type == p.MsgType.FILE_DATA for f in frames)
    got = b"".join(f.payload for f in frames)
    assert len(got) == p.INITIAL_WINDOW  # the initial credit, then silence
    client.send_raw(p.encode_window(1, 100_000))
    more = b"".join(f.payload for f in client.quiet_for(1, 0.5))
    assert len(more) == 100_000
    client.send_raw(p.encode_window(1, len(data)))
    rest = bytearray()
    while True:
        f = _expect(client, 1, p.MsgType.FILE_DATA, p.MsgType.FILE_END)
        if f.type == p.MsgType.FILE_END:
            break
        rest += f.payload
    assert got + more + bytes(rest) == data


def test_closing_a_read_early(client: Client, box: Path) -> None:
    (box / "big").write_bytes(blob(4 * p.INITIAL_WINDOW))
    client.send_json(p.MsgType.FILE_READ, 1, {"path": str(box / "big")})
    _expect(client, 1, p.MsgType.FILE_INFO)
    client.send_json(p.MsgType.ERROR, 1, {"code": p.ErrorCode.CANCELLED, "message": "enough"})
    client.send_raw(p.encode_window(1, 4 * p.INITIAL_WINDOW))  # credit after the abort: ignored
    frames = client.quiet_for(1, 0.5)
    assert sum(len(f.payload) for f in frames) <= p.INITIAL_WINDOW
    assert all(f.type == p.MsgType.FILE_DATA for f in frames)
    assert read_file(client, 2, str(box / "big"))[1][:10]  # still serving


def _stream(n: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    base = blob(chunk + 4096, seed=5)
    for i in range(n // chunk):
        yield base[i % 4096 : i % 4096 + chunk]


def test_big_transfers_run_in_bounded_agent_memory(agent: AgentProcess, client: Client, box: Path) -> None:
    size = 96 << 20
    target = box / "big.bin"
    rss_start = rss_kib(agent.proc.pid)
    peak = rss_start
    start_write(client, 1, str(target))
    s = Sender(client, 1)
    h = hashlib.sha256()
    for i, chunk in enumerate(_stream(size)):
        s.send(chunk)
        h.update(chunk)
        if i % 8 == 0:
            peak = max(peak, rss_kib(agent.proc.pid))
    assert s.end()["size"] == size
    assert target.stat().st_size == size
    write_growth = peak - rss_start

    # read it back with a slow consumer: credit trickles back, the agent must not read ahead
    client.send_json(p.MsgType.FILE_READ, 2, {"path": str(target)})
    _expect(client, 2, p.MsgType.FILE_INFO)
    h2 = hashlib.sha256()
    received, granted, pending = 0, p.INITIAL_WINDOW, 0
    started = time.monotonic()
    while True:
        f = _expect(client, 2, p.MsgType.FILE_DATA, p.MsgType.FILE_END)
        if f.type == p.MsgType.FILE_END:
            break
        received += len(f.payload)
        assert received <= granted, "the agent sent beyond the credit"
        h2.update(f.payload)
        pending += len(f.payload)
        if pending >= p.INITIAL_WINDOW // 2:
            if received < 16 << 20:
                time.sleep(0.05)  # slow at first: the agent has to wait for us
            peak = max(peak, rss_kib(agent.proc.pid))
            client.send_raw(p.encode_window(2, pending))
            granted += pending
            pending = 0
    assert received == size and h2.digest() == h.digest()
    print("agent RSS: start %d KiB, peak %d KiB (write growth %d KiB); read in %.1f s"
          % (rss_start, peak, write_growth, time.monotonic() - started))
    assert peak - rss_start < 24 * 1024, "agent RSS grew by %d KiB" % (peak - rss_start)


def test_execs_keep_flowing_during_a_transfer(client: Client, box: Path) -> None:
    (box / "big").write_bytes(blob(16 << 20))
    client.send_json(p.MsgType.FILE_READ, 1, {"path": str(box / "big")})
    _expect(client, 1, p.MsgType.FILE_INFO)
    start_write(client, 2, str(box / "upload"))
    up = Sender(client, 2)
    up.send(blob(3 << 20))  # a write in progress too
    client.exec(3, ["echo", "still here"])
    res = client.collect(3, timeout=5)
    assert res.stdout == b"still here\n" and res.code == 0
    # the read has not finished (no credit came back yet), and still completes
    assert all(f.type == p.MsgType.FILE_DATA for f in client.queues[1])
    client.send_raw(p.encode_window(1, 16 << 20))
    total = 0
    while True:
        f = _expect(client, 1, p.MsgType.FILE_DATA, p.MsgType.FILE_END)
        if f.type == p.MsgType.FILE_END:
            break
        total += len(f.payload)
    assert total == 16 << 20
    assert up.end()["size"] == 3 << 20


# ---- through the host side (AgentConnection) ----------------------------------------------


@pytest_asyncio.fixture
async def conn() -> Any:
    d = tempfile.mkdtemp(prefix="agh")
    listener = AgentListener(Path(d) / "a.sock")
    await listener.start()
    proc = spawn_agent(str(Path(d) / "a.sock"), os.path.join(d, "agent.log"))
    try:
        c = await listener.accept(timeout=15)
        yield c
        await c.close()
    finally:
        await listener.close()
        proc.terminate()
        proc.wait(5)
        print("---- agent log ----\n" + Path(d, "agent.log").read_text(errors="replace"))
        shutil.rmtree(d, ignore_errors=True)


async def _agen(chunks: Any, fail_after: Optional[int] = None) -> Any:
    for i, c in enumerate(chunks):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("the source broke")
        yield c
        await asyncio.sleep(0)


async def test_host_round_trip(conn: AgentConnection, box: Path) -> None:
    data = blob(5 << 20, seed=11)
    chunks = [data[i : i + 300_000] for i in range(0, len(data), 300_000)]
    n = await conn.write_file(str(box / "d" / "f.bin"), _agen(chunks), mode=0o600, make_parents=True,
                              size=len(data))
    assert n == len(data) and (box / "d" / "f.bin").read_bytes() == data
    reader = await conn.read_file(str(box / "d" / "f.bin"))
    assert reader.size == len(data) and reader.info is not None and reader.info.mode == 0o600
    got = bytearray()
    async for chunk in reader:
        assert len(chunk) <= 1 << 20
        got += chunk
    assert bytes(got) == data
    st = await conn.stat(str(box / "d" / "f.bin"))
    assert (st.type, st.size, st.name, st.path) == ("file", len(data), "f.bin", str(box / "d" / "f.bin"))
    listing = await conn.list_dir(str(box))
    assert isinstance(listing, DirListing) and not listing.truncated
    assert [(e.name, e.type, e.path) for e in listing] == [("d", "dir", str(box / "d"))]
    assert (await conn.list_dir(str(box / "d"), limit=1)).truncated is False


async def test_host_error_mapping(conn: AgentConnection, box: Path) -> None:
    with pytest.raises(GuestFileNotFound) as nf:
        await conn.write_file(str(box / "no" / "f"), _agen([b"x"]))
    assert nf.value.path == str(box / "no" / "f") and "make_parents" in str(nf.value)
    with pytest.raises(GuestFileNotFound):
        await conn.read_file(str(box / "missing"))
    with pytest.raises(GuestFileNotFound):
        await conn.stat(str(box / "missing"))
    with pytest.raises(GuestFileError) as isdir:
        await conn.read_file(str(box))
    assert isdir.value.code == p.ErrorCode.IS_A_DIRECTORY  # type: ignore[attr-defined]
    with pytest.raises(GuestFileError) as notdir:
        await conn.list_dir(str(box / "missing") + "/..")
    assert notdir.value.code in (p.ErrorCode.NOT_FOUND, p.ErrorCode.NOT_A_DIRECTORY)  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        await conn.write_file("relative", _agen([b"x"]))
    with pytest.raises(InvalidArgument):
        await conn.stat("/a\x00b")
    if IS_ROOT:
        (box / "locked").mkdir(mode=0o700)
        with pytest.raises(GuestPermissionDenied):
            await conn.write_file(str(box / "locked" / "f"), _agen([b"x"]), uid=USER, gid=USER)


async def test_host_failures_mid_upload_remove_the_temp_file(conn: AgentConnection, box: Path) -> None:
    target = box / "f"
    target.write_bytes(b"original")
    chunks = [bytes(200_000)] * 20
    with pytest.raises(RuntimeError, match="source broke"):
        await conn.write_file(str(target), _agen(chunks, fail_after=8))
    assert await no_temps_soon(box) == [] and target.read_bytes() == b"original"

    with pytest.raises(FileTooLarge):
        await conn.write_file(str(target), _agen(chunks), max_bytes=1 << 20)
    assert await no_temps_soon(box) == [] and target.read_bytes() == b"original"

    async def slow() -> Any:
        for c in chunks:
            yield c
            await asyncio.sleep(0.05)

    task = asyncio.ensure_future(conn.write_file(str(target), slow()))
    await asyncio.sleep(0.3)
    assert len(temps(box)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await no_temps_soon(box) == [] and target.read_bytes() == b"original"
    assert len(conn._table) == 0


async def test_host_reader_is_bounded_and_closable(conn: AgentConnection, box: Path) -> None:
    (box / "big").write_bytes(blob(16 << 20))
    reader = await conn.read_file(str(box / "big"))
    first = await reader.__anext__()
    await asyncio.sleep(0.3)  # the consumer stalls: the guest stops at the window
    queued = sum(len(c) for c in reader._queue)
    assert len(first) + queued <= p.INITIAL_WINDOW
    await reader.aclose()
    with pytest.raises(AgentError, match="closed"):
        await reader.__anext__()
    assert (await conn.stat(str(box / "big"))).size == 16 << 20  # the channel still works
    with pytest.raises(FileTooLarge):
        await conn.read_file(str(box / "big"), max_bytes=1 << 20)
    async with await conn.read_file(str(box / "big")) as r:
        assert len(await r.__anext__()) > 0
    await asyncio.sleep(0.1)
    assert len(conn._table) == 0


async def test_an_old_agent_is_reported_clearly() -> None:
    r, w = await asyncio.open_connection(sock=__import__("socket").socketpair()[0])
    old = AgentConnection(r, w, {"proto": 1, "features": ["exec", "tty"]}, p.FrameDecoder())
    try:
        for call in (old.stat("/x"), old.list_dir("/x"), old.read_file("/x"),
                     old.write_file("/x", _agen([b"x"]))):
            with pytest.raises(GuestFileError, match="too old for file transfer; rebuild the image"):
                await call
    finally:
        await old.close()


async def test_host_concurrent_transfers_share_the_channel(conn: AgentConnection, box: Path) -> None:
    blobs = {i: blob((i + 1) * 700_000, seed=20 + i) for i in range(4)}
    (box / "src").write_bytes(blob(3 << 20, seed=99))

    async def up(i: int) -> int:
        data = blobs[i]
        return await conn.write_file(str(box / ("up%d" % i)), _agen([data[o : o + 100_000] for o in
                                                                     range(0, len(data), 100_000)]))

    async def down() -> bytes:
        return await (await conn.read_file(str(box / "src"))).read_all()

    results = await asyncio.gather(*[up(i) for i in blobs], down(), down(), conn.stat(str(box)))
    assert results[:4] == [len(blobs[i]) for i in blobs]
    assert results[4] == results[5] == (box / "src").read_bytes()
    for i, data in blobs.items():
        assert (box / ("up%d" % i)).read_bytes() == data
    assert len(conn._table) == 0 and temps(box) == []
