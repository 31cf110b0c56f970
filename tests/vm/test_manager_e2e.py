"""The original's five e2e tests, ported one by one (same names), on real VMs.

QEMU here; also Firecracker when FC_BINARY, FC_KERNEL and FC_ROOTFS are set. The TAP
tests run with `network.netns` set to a namespace of their own and a private CIDR, so no
traffic or device touches the host's namespace.
"""

from __future__ import annotations

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec, SandboxState
from arcbox_vm.errors import SandboxNotFound

from .manager_helpers import iface_exists, make_config, netns_list, fresh_netns_name, wait_for_event

pytestmark = pytest.mark.vm


def no_tap() -> SandboxSpec:
    return SandboxSpec(network=SandboxNetworkSpec(mode="none"))


async def test_e2e_sandbox_basic_lifecycle(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ip = await mgr.create_sandbox(no_tap())
        assert await wait_for_event(events, sid, "ready"), "sandbox did not reach ready state"
        assert mgr.inspect_sandbox(sid).state == SandboxState.READY
        await mgr.stop_sandbox(sid, 5)
        assert mgr.inspect_sandbox(sid).state == SandboxState.STOPPED
        await mgr.remove_sandbox(sid, True)
        with pytest.raises(SandboxNotFound):
            mgr.inspect_sandbox(sid)
    finally:
        await mgr.close()


async def test_e2e_event_broadcast_ready(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(no_tap())
        assert await wait_for_event(events, sid, "ready"), f"expected ready event for sandbox {sid}"
        await mgr.remove_sandbox(sid, True)
    finally:
        await mgr.close()


async def test_e2e_two_sandboxes_distinct_ips(backend, guest_image, tmp_path):
    ns = fresh_netns_name()
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path, netns=ns))
    try:
        ev1 = mgr.subscribe_events()
        ev2 = mgr.subscribe_events()
        id1, ip1 = await mgr.create_sandbox(SandboxSpec())
        id2, ip2 = await mgr.create_sandbox(SandboxSpec())
        assert ip1 != ip2, "sandboxes must receive distinct IP addresses"
        assert await wait_for_event(ev1, id1, "ready"), "sandbox 1 did not reach ready"
        assert await wait_for_event(ev2, id2, "ready"), "sandbox 2 did not reach ready"
        await mgr.remove_sandbox(id1, True)
        await mgr.remove_sandbox(id2, True)
    finally:
        await mgr.close()
    assert ns not in netns_list(), "the namespace the manager created must be removed"


async def test_e2e_sandbox_with_tap_network(backend, guest_image, tmp_path):
    ns = fresh_netns_name()
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path, netns=ns))
    try:
        events = mgr.subscribe_events()
        sid, ip = await mgr.create_sandbox(SandboxSpec())
        assert ip, "tap mode should assign an IP address"
        assert await wait_for_event(events, sid, "ready"), "sandbox did not reach ready"
        net = mgr.inspect_sandbox(sid).network
        assert net is not None, "tap mode should populate network info"
        assert iface_exists(net.tap_name, ns), f"TAP {net.tap_name} should exist while sandbox is running"
        assert not iface_exists(net.tap_name), "the TAP must live in the configured namespace, not the host's"
        await mgr.remove_sandbox(sid, True)
        assert not iface_exists(net.tap_name, ns), f"TAP {net.tap_name} should be removed after remove"
    finally:
        await mgr.close()


async def test_e2e_run_command(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(no_tap())
        assert await wait_for_event(events, sid, "ready"), "sandbox did not reach ready"
        rx = await mgr.run_in_sandbox(sid, ["echo", "hello from vm"], {}, "/", "root", False, None, 10)
        stdout, exit_code = "", -1
        async for chunk in rx:
            if chunk.stream == "stdout":
                stdout += chunk.data.decode(errors="replace")
            elif chunk.stream == "exit":
                exit_code = chunk.exit_code
        assert "hello from vm" in stdout, f"expected 'hello from vm' in stdout, got: {stdout!r}"
        assert exit_code == 0, "echo should exit with code 0"
        await mgr.remove_sandbox(sid, True)
    finally:
        await mgr.close()
