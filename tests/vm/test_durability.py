"""Durability through the real daemon: kill -9 at bad moments, restart, nothing lost or leaked.

Each test runs its own daemon on a private data dir and network namespace (created by
the daemon, removed when it finally stops with nothing left to keep).
"""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import threading
import time

import grpc
import pytest

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.paths import socket_dir

from .daemon_helpers import (
    Daemon,
    leases,
    processes_mentioning,
    run,
    taps_in,
    wait_state,
    write_config,
)
from .manager_helpers import netns_list

pytestmark = pytest.mark.vm


class Env:
    def __init__(self, tmp_path, image) -> None:
        self.data_dir = tmp_path / "data"
        self.socket = tmp_path / "d.sock"
        self.netns = f"arcbox-t-{secrets.token_hex(3)}"
        cfg = write_config(tmp_path / "c.toml", image, self.data_dir, self.socket, netns=self.netns)
        self.daemon = Daemon(cfg, self.socket, tmp_path / "daemon.log")

    def restart(self) -> None:
        self.daemon.start()

    @property
    def stub(self):
        return self.daemon.stub()

    def leaks(self) -> dict[str, object]:
        """Everything that must be gone once no sandbox remains."""
        sandboxes = self.data_dir / "sandboxes"
        return {
            "processes": processes_mentioning(self.data_dir),
            "dirs": sorted(p.name for p in sandboxes.iterdir()) if sandboxes.exists() else [],
            "netns": [n for n in netns_list() if n == self.netns],
            "leases": leases(self.data_dir) if (self.data_dir / "state.db").exists() else {},
        }


@pytest.fixture
def env(tmp_path, guest_image):
    e = Env(tmp_path, guest_image)
    e.daemon.start()
    yield e
    # final clean-up through the API, then prove nothing is left
    if e.daemon.proc is None or e.daemon.proc.poll() is not None:
        e.daemon.start()
    for s in e.stub.List(pb.ListSandboxesRequest()).sandboxes:
        e.stub.Remove(pb.RemoveSandboxRequest(id=s.id, force=True))
    assert e.daemon.stop() == 0
    assert e.leaks() == {"processes": [], "dirs": [], "netns": [], "leases": {}}, e.daemon.log.read_text()[-2000:]


def create(stub, **kw) -> tuple[str, str]:
    r = stub.Create(pb.CreateSandboxRequest(**kw))
    return r.id, r.ip_address


def test_kill9_while_ready_readopts_the_running_vm(env):
    sid, ip = create(env.stub, id="durable-1")
    wait_state(env.stub, sid, ("ready",))
    assert run(env.stub, sid, ["sh", "-c", "echo kept > /root/marker; sleep 1000 >/dev/null 2>&1 &"])[2] == 0
    vm_pids = processes_mentioning(env.data_dir / "sandboxes" / sid)
    assert vm_pids
    env.daemon.kill9()
    assert processes_mentioning(env.data_dir / "sandboxes" / sid) == vm_pids, "the VM outlives the daemon"
    env.restart()
    info = wait_state(env.stub, sid, ("ready",), timeout=60)
    assert info.network.ip_address == ip
    assert info.network.tap_name in taps_in(env.netns)
    out, _, code = run(env.stub, sid, ["cat", "/root/marker"])
    assert (out, code) == (b"kept\n", 0), "same VM, same disk, background processes alive"
    out, _, _ = run(env.stub, sid, ["sh", "-c", "pgrep -c sleep || true"])
    assert out.strip() == b"1"
    events = list(_events(env.stub, since=0, idle=1.0))
    adopted = [e for e in events if e.sandbox_id == sid and e.action == "ready" and e.attributes.get("reason") == "adopted"]
    assert adopted, [(e.action, dict(e.attributes)) for e in events]


def test_kill9_while_an_exec_streams_reports_it_and_keeps_the_sandbox(env):
    sid, _ = create(env.stub, network=pb.NetworkSpec(mode="none"))
    wait_state(env.stub, sid, ("ready",))
    got: list[bytes] = []
    failure: list[grpc.RpcError] = []

    def reader() -> None:
        try:
            for msg in env.stub.Run(pb.RunRequest(id=sid, cmd=["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"])):
                got.append(msg.data)
        except grpc.RpcError as exc:
            failure.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.monotonic() + 60
    while len(got) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(got) >= 5
    env.daemon.kill9()
    t.join(30)
    assert not t.is_alive(), "the client's stream must end, not hang"
    assert failure and failure[0].code() == grpc.StatusCode.UNAVAILABLE
    env.restart()
    wait_state(env.stub, sid, ("ready",), timeout=60)
    events = [e for e in _events(env.stub, since=0, idle=1.0) if e.sandbox_id == sid]
    adopted = [e for e in events if e.attributes.get("reason") == "adopted"]
    assert adopted and adopted[-1].attributes["lost_execs"] == "1", "the lost command is reported"
    assert run(env.stub, sid, ["echo", "ok"])[0] == b"ok\n"


def test_kill9_during_boot_fails_the_sandbox_cleanly(env):
    sid, ip = create(env.stub, id="booting-1")
    time.sleep(0.5)  # the VM is starting (a boot takes seconds)
    env.daemon.kill9()
    env.restart()
    info = env.stub.Inspect(pb.InspectSandboxRequest(id=sid))
    assert info.state == "failed" and "booting" in info.error
    assert processes_mentioning(env.data_dir / "sandboxes" / sid) == []
    assert not (env.data_dir / "sandboxes" / sid / "rootfs.ext4").exists()
    assert not socket_dir(env.data_dir / "sandboxes" / sid).exists()
    assert taps_in(env.netns) == []
    assert leases(env.data_dir) == {}
    sid2, ip2 = create(env.stub)
    assert ip2 == ip, "the interrupted sandbox's address went back to the pool"
    wait_state(env.stub, sid2, ("ready",))


def test_half_done_remove_is_finished_at_start(env):
    sid, _ = create(env.stub, id="removing-1")
    wait_state(env.stub, sid, ("ready",))
    env.daemon.kill9()
    db = sqlite3.connect(env.data_dir / "state.db")  # the crash happened mid-removal
    db.execute("UPDATE sandboxes SET removing = 1 WHERE id = ?", (sid,))
    db.commit()
    db.close()
    env.restart()
    with pytest.raises(grpc.RpcError) as info:
        env.stub.Inspect(pb.InspectSandboxRequest(id=sid))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert processes_mentioning(env.data_dir / "sandboxes" / sid) == []
    assert taps_in(env.netns) == [] and leases(env.data_dir) == {}
    assert not (env.data_dir / "sandboxes" / sid).exists()


def test_vmm_killed_under_an_exec(env):
    sid, _ = create(env.stub, network=pb.NetworkSpec(mode="none"))
    wait_state(env.stub, sid, ("ready",))
    stream = env.stub.Run(pb.RunRequest(id=sid, cmd=["sleep", "1000"]))
    wait_state(env.stub, sid, ("running",))
    for pid in processes_mentioning(env.data_dir / "sandboxes" / sid):
        subprocess.run(["kill", "-9", str(pid)])
    msgs = list(stream)
    assert msgs[-1].stream == "error" and msgs[-1].done
    info = wait_state(env.stub, sid, ("failed",), timeout=30)
    assert "VMM exited" in info.error
    failed = [e for e in _events(env.stub, since=0, idle=1.0) if e.sandbox_id == sid and e.action == "failed"]
    assert failed[-1].attributes["reason"] == "vmm_exited"


def test_event_replay_after_disconnect_misses_nothing(env):
    first = env.stub.Events(pb.SandboxEventsRequest())
    sid, _ = create(env.stub, network=pb.NetworkSpec(mode="none"))
    seen = next(iter(first))
    assert seen.action == "created"
    first.cancel()  # the client goes away ...
    wait_state(env.stub, sid, ("ready",))  # ... events happen meanwhile ...
    run(env.stub, sid, ["true"])
    env.stub.Stop(pb.StopSandboxRequest(id=sid, timeout_seconds=10))
    replay = [e for e in _events(env.stub, since=seen.id, idle=1.0) if e.sandbox_id == sid]
    assert [e.action for e in replay] == ["ready", "running", "idle", "stopping", "stopped"]
    assert [e.id for e in replay] == sorted(e.id for e in replay) and replay[0].id > seen.id


def test_corrupt_state_database_refuses_to_start(env, tmp_path):
    env.daemon.stop()
    (env.data_dir / "state.db").write_bytes(b"garbage" * 4096)
    for extra in ("state.db-wal", "state.db-shm"):
        (env.data_dir / extra).unlink(missing_ok=True)
    proc = subprocess.run([env.daemon.proc.args[0], "serve", "--config", str(env.daemon.config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "state database" in proc.stderr and "mv " in proc.stderr
    (env.data_dir / "state.db").unlink()  # the operator follows the advice


def _events(stub, since: int, idle: float):
    """Events after `since` until none arrives for `idle` seconds."""
    call = stub.Events(pb.SandboxEventsRequest(since=since))
    out = []
    done = threading.Event()

    def stop_when_idle() -> None:
        last = len(out)
        while not done.wait(idle):
            if len(out) == last:
                call.cancel()
                return
            last = len(out)

    threading.Thread(target=stop_when_idle, daemon=True).start()
    try:
        for ev in call:
            out.append(ev)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise
    finally:
        done.set()
    return out



