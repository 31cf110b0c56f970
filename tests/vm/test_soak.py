"""Soak: 50 create → run → remove cycles through the daemon, 4 at a time; zero leaks."""

from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.paths import socket_dir

from .daemon_helpers import (
    Daemon,
    fd_count,
    leases,
    memory_kib,
    processes_mentioning,
    run,
    taps_in,
    wait_state,
    write_config,
)
from .manager_helpers import netns_list, sandbox_cgroups

pytestmark = pytest.mark.vm

CYCLES = int(os.environ.get("ARCBOX_SOAK_CYCLES", "50"))
PARALLEL = 4


def test_soak_create_run_remove(tmp_path, guest_image, capsys):
    netns = f"arcbox-t-{secrets.token_hex(3)}"
    data_dir = tmp_path / "data"
    cfg = write_config(tmp_path / "c.toml", guest_image, data_dir, tmp_path / "d.sock", netns=netns,
                       cidr="10.242.0.0/24", on_shutdown="remove")
    daemon = Daemon(cfg, tmp_path / "d.sock", tmp_path / "daemon.log").start()
    try:
        _soak(daemon, data_dir, netns, capsys)
    finally:
        daemon.stop()  # also when an assertion failed: never leave a daemon behind
    assert netns not in netns_list()


def _soak(daemon: Daemon, data_dir, netns: str, capsys) -> None:  # noqa: ANN001
    stub = daemon.stub()
    # warm up once so lazily-created things (thread pools, caches) are not counted as leaks
    sid = stub.Create(pb.CreateSandboxRequest()).id
    wait_state(stub, sid, ("ready",))
    stub.Remove(pb.RemoveSandboxRequest(id=sid, force=True))
    fds_before = fd_count(daemon.pid)
    created: list[str] = []

    def cycle(i: int) -> float:
        t = time.monotonic()
        r = stub.Create(pb.CreateSandboxRequest(labels={"soak": str(i)}))
        created.append(r.id)
        wait_state(stub, r.id, ("ready",), timeout=300)
        out, _, code = run(stub, r.id, ["sh", "-c", f"echo cycle-{i}"])
        assert (out, code) == (f"cycle-{i}\n".encode(), 0)
        assert any(c.endswith("/" + r.id) for c in sandbox_cgroups()), "its VMM runs in its own cgroup"
        stub.Remove(pb.RemoveSandboxRequest(id=r.id, force=True))
        return time.monotonic() - t

    start = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        durations = list(pool.map(cycle, range(CYCLES)))
    elapsed = time.monotonic() - start
    peak_kib = memory_kib(daemon.pid, "VmHWM")
    rss_kib = memory_kib(daemon.pid, "VmRSS")
    leaks = {
        "sandboxes": [s.id for s in stub.List(pb.ListSandboxesRequest()).sandboxes],
        "processes": processes_mentioning(data_dir),
        "taps": taps_in(netns),
        "leases": leases(data_dir),
        "fds": fd_count(daemon.pid) - fds_before,
        "dirs": os.listdir(data_dir / "sandboxes"),
        "sockdirs": [sid for sid in created if socket_dir(data_dir / "sandboxes" / sid).exists()],
        "cgroups": sorted(c for c in sandbox_cgroups() if c.rsplit("/", 1)[-1] in created),
    }
    with capsys.disabled():
        print(f"\nsoak: {CYCLES} cycles ({PARALLEL} at a time) in {elapsed:.1f} s; per cycle median "
              f"{sorted(durations)[len(durations) // 2]:.1f} s, max {max(durations):.1f} s; daemon peak RSS "
              f"{peak_kib / 1024:.1f} MiB (now {rss_kib / 1024:.1f} MiB); leaks: {leaks}")
    assert leaks == {"sandboxes": [], "processes": [], "taps": [], "leases": {}, "fds": 0, "dirs": [],
                     "sockdirs": [], "cgroups": []}
    assert daemon.stop() == 0
