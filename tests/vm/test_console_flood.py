"""A guest that writes to its serial console for 90 s, as root, leaves a console log no
bigger than the cap — and `logs` still shows its newest output."""

from __future__ import annotations

import asyncio

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec

from .manager_helpers import make_config

pytestmark = pytest.mark.vm

CAP = 256 * 1024
FLOOD_S = 90


async def test_a_console_flood_stays_within_the_cap(backend, guest_image, tmp_path):
    cfg = make_config(backend, guest_image, tmp_path)
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"console_log_max_bytes": CAP})})
    async with SandboxManager(cfg) as mgr:
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
        await mgr.wait_ready(sid)
        log = mgr.console_log(sid)
        # numbered lines so the newest can be recognised; batches done are counted in a file
        script = ("n=0; while :; do i=0; while [ $i -lt 200 ]; do "
                  "echo \"flood $n $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; "
                  "i=$((i+1)); done > /dev/ttyS0; n=$((n+1)); echo $n > /tmp/batches; done")
        flood = await mgr.start_exec(sid, ["sh", "-c", script])
        biggest = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLOOD_S  # host time: a TCG guest's clock may run fast
        while loop.time() < deadline:
            size = sum(p.stat().st_size for p in (log, log.with_name(log.name + ".1")) if p.exists())
            biggest = max(biggest, size)
            await asyncio.sleep(0.25)
        await mgr.signal_exec(sid, flood)
        out, err, code = await (await mgr.run_in_sandbox(sid, ["cat", "/tmp/batches"])).collect()
        assert code == 0, err
        batches = int(out.strip())
        print(f"guest wrote {batches} batches of 200 lines in {FLOOD_S} s; console files peaked at {biggest} bytes")
        written = batches * 200 * 90
        assert written > 4 * CAP, f"the guest wrote only {written} bytes: the test proves nothing"
        assert biggest <= CAP, f"console files reached {biggest} bytes (cap {CAP})"
        shown = b"".join([c async for c in mgr.console_output(sid)])
        assert len(shown) <= CAP
        assert f"flood {batches - 1} ".encode() in shown, "logs show the newest output"
