"""An agent that stops answering (here: the whole VM frozen with SIGSTOP) ends its command
streams with an error after the keepalive timeout — never a hang — and fails the sandbox."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec, SandboxState

from .manager_helpers import make_config

pytestmark = pytest.mark.vm


async def test_frozen_vm_is_detected_by_keepalive(backend, guest_image, tmp_path):
    cfg = make_config(backend, guest_image, tmp_path)
    cfg.agent.keepalive_interval_s = 1
    cfg.agent.keepalive_timeout_s = 3
    mgr = SandboxManager(cfg)
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
        info = await mgr.wait_ready(sid)
        stream = await mgr.run_in_sandbox(sid, ["sleep", "1000"])
        os.kill(info.pid, signal.SIGSTOP)
        t = time.monotonic()
        chunks = [c async for c in stream]  # must end by itself
        waited = time.monotonic() - t
        assert chunks[-1].stream == "error" and b"did not answer" in chunks[-1].data, chunks
        assert waited < 30
        while True:
            ev = await events.recv(timeout=30)
            if ev.sandbox_id == sid and ev.action == "failed":
                break
        assert ev.attributes["reason"] == "agent_unresponsive"
        assert mgr.inspect_sandbox(sid).state == SandboxState.FAILED
        for _ in range(100):
            if not os.path.exists(f"/proc/{info.pid}"):
                break
            await asyncio.sleep(0.1)
        assert not os.path.exists(f"/proc/{info.pid}"), "the frozen VMM is killed"
    finally:
        await mgr.close()
