"""Failure paths of SandboxManager on real VMs: every one ends clean, nothing leaked."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec, SandboxState
from arcbox_vm.errors import (
    InvalidArgument,
    InvalidState,
    ResourceExhausted,
    SandboxAlreadyExists,
    SandboxNotFound,
)

from .manager_helpers import fresh_netns_name, iface_exists, make_config, wait_for_event

pytestmark = pytest.mark.vm

NONE = SandboxNetworkSpec(mode="none")


def vmm_processes_mentioning(path) -> list[int]:
    from arcbox_vm.manager.leftovers import processes_using

    return processes_using(path)


async def test_unknown_id_wrong_state_duplicate_id_and_bad_ids(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        with pytest.raises(SandboxNotFound):
            mgr.inspect_sandbox("nope")
        with pytest.raises(SandboxNotFound):
            await mgr.stop_sandbox("nope", 1)
        with pytest.raises(SandboxNotFound):
            await mgr.remove_sandbox("nope")
        with pytest.raises(SandboxNotFound):
            await mgr.run_in_sandbox("nope", ["true"])
        for bad in ("../x", "a/b", "-x", "a b", "x" * 64, "é"):
            with pytest.raises(ValueError):
                SandboxSpec(id=bad)
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(id="dup-1", network=NONE, labels={"team": "a"}))
        with pytest.raises(SandboxAlreadyExists):
            await mgr.create_sandbox(SandboxSpec(id="dup-1", network=NONE))
        # still booting: commands and stop are refused with a clear state error
        assert mgr.inspect_sandbox(sid).state == SandboxState.STARTING
        with pytest.raises(InvalidState):
            await mgr.run_in_sandbox(sid, ["true"])
        with pytest.raises(InvalidState):
            await mgr.stop_sandbox(sid, 1)
        assert await wait_for_event(events, sid, "ready")
        with pytest.raises(InvalidArgument):
            await mgr.run_in_sandbox(sid, [])
        assert [s.id for s in mgr.list_sandboxes(labels={"team": "a"})] == [sid]
        assert mgr.list_sandboxes(labels={"team": "b"}) == []
        assert [s.id for s in mgr.list_sandboxes(state="ready")] == [sid]
        await mgr.stop_sandbox(sid, 5)
        with pytest.raises(InvalidState):
            await mgr.stop_sandbox(sid, 5)
        with pytest.raises(InvalidState):
            await mgr.run_in_sandbox(sid, ["true"])
        await mgr.remove_sandbox(sid)
        assert not (tmp_path / "sandboxes" / sid).exists()
    finally:
        await mgr.close()


async def test_pool_exhaustion_is_clear_and_leaks_nothing(backend, guest_image, tmp_path):
    ns = fresh_netns_name()
    # a /30 has exactly one guest address: .0 network, .1 gateway, .3 broadcast
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path, cidr="10.233.0.0/30", netns=ns))
    try:
        sid, ip = await mgr.create_sandbox(SandboxSpec())
        assert ip == "10.233.0.2"
        with pytest.raises(ResourceExhausted) as info:
            await mgr.create_sandbox(SandboxSpec(id="second"))
        assert "exhausted" in str(info.value)
        assert [s.id for s in mgr.list_sandboxes()] == [sid]
        assert not (tmp_path / "sandboxes" / "second").exists()
        tap = mgr.inspect_sandbox(sid).network.tap_name
        await mgr.remove_sandbox(sid, force=True)  # removing while it still boots cancels the boot
        assert not iface_exists(tap, ns)
        assert vmm_processes_mentioning(tmp_path / "sandboxes" / sid) == []
        sid2, ip2 = await mgr.create_sandbox(SandboxSpec())
        assert ip2 == ip, "a released address is reused"
        await mgr.remove_sandbox(sid2, force=True)
    finally:
        await mgr.close()


async def test_missing_kernel_fails_with_event_and_leaks_nothing(backend, guest_image, tmp_path):
    ns = fresh_netns_name()
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path, netns=ns))
    try:
        events = mgr.subscribe_events()
        sid, ip = await mgr.create_sandbox(SandboxSpec(kernel=str(tmp_path / "no-such-vmlinux")))
        assert not await wait_for_event(events, sid, "ready", timeout=60)
        info = mgr.inspect_sandbox(sid)
        assert info.state == SandboxState.FAILED
        assert "no-such-vmlinux" in info.error
        assert info.network is None, "the IP lease and TAP are released on boot failure"
        assert not (tmp_path / "sandboxes" / sid).exists()
        assert not iface_exists(mgr.adapters.network.tap_name(ip), ns), "the TAP is removed on boot failure"
        sid2, ip2 = await mgr.create_sandbox(SandboxSpec(kernel=str(tmp_path / "no-such-vmlinux")))
        assert ip2 == ip, "the failed sandbox's address went back to the pool"
        await mgr.remove_sandbox(sid)
        await mgr.remove_sandbox(sid2)
    finally:
        await mgr.close()


async def test_failed_event_carries_the_error(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=NONE, rootfs=str(tmp_path / "missing.ext4")))
        while True:
            ev = await events.recv(timeout=60)
            if ev.sandbox_id == sid and ev.action == "failed":
                break
        assert "missing.ext4" in ev.attributes["error"]
        assert ev.attributes["reason"] == "boot_error"
    finally:
        await mgr.close()


async def test_killing_the_vmm_fails_the_sandbox_and_ends_running_execs(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=NONE))
        info = await mgr.wait_ready(sid)
        stream = await mgr.run_in_sandbox(sid, ["sleep", "1000"])
        assert mgr.inspect_sandbox(sid).state == SandboxState.RUNNING
        os.kill(info.pid, signal.SIGKILL)
        chunks = [c async for c in stream]
        assert chunks[-1].stream == "error", chunks
        while True:
            ev = await events.recv(timeout=30)
            if ev.sandbox_id == sid and ev.action == "failed":
                break
        assert ev.attributes["reason"] == "vmm_exited"
        info = mgr.inspect_sandbox(sid)
        assert info.state == SandboxState.FAILED
        assert "VMM exited" in info.error
        await mgr.remove_sandbox(sid)
        assert vmm_processes_mentioning(tmp_path / "sandboxes" / sid) == []
    finally:
        await mgr.close()


async def test_client_that_stops_reading_does_not_block_or_stick(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=NONE, ttl_seconds=3600))
        await mgr.wait_ready(sid)
        # a command producing far more than the flow-control window, read by nobody
        flood = await mgr.run_in_sandbox(sid, ["sh", "-c", "yes flood | head -c 100000000"])
        first = await flood.__anext__()
        assert first.stream == "stdout"
        # the manager and the agent keep serving other commands meanwhile
        out, _, code = await (await mgr.run_in_sandbox(sid, ["echo", "alive"])).collect()
        assert (out, code) == (b"alive\n", 0)
        assert mgr.inspect_sandbox(sid).state == SandboxState.RUNNING
        await flood.aclose()  # the client goes away: the command is killed, state corrected
        assert mgr.inspect_sandbox(sid).state == SandboxState.READY
        seen = []
        while "idle" not in seen:
            seen.append((await events.recv(timeout=30)).action)
        # an abandoned stream (dropped without aclose) is cleaned up too
        dropped = await mgr.run_in_sandbox(sid, ["sleep", "1000"])
        assert mgr.inspect_sandbox(sid).state == SandboxState.RUNNING
        del dropped
        for _ in range(50):
            await asyncio.sleep(0.1)
            if mgr.inspect_sandbox(sid).state == SandboxState.READY:
                break
        assert mgr.inspect_sandbox(sid).state == SandboxState.READY
    finally:
        await mgr.close()


async def test_ttl_removes_the_sandbox_after_ready(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=NONE, ttl_seconds=2))
        info = await mgr.wait_ready(sid)
        while True:
            ev = await events.recv(timeout=60)
            if ev.sandbox_id == sid and ev.action == "removed":
                break
        assert ev.attributes["reason"] == "ttl"
        assert ev.timestamp_ns / 1e9 - info.ready_at >= 2
        with pytest.raises(SandboxNotFound):
            mgr.inspect_sandbox(sid)
        assert not (tmp_path / "sandboxes" / sid).exists()
    finally:
        await mgr.close()
