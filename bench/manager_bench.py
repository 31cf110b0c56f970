"""SandboxManager figures: create→ready for 1 and for 4 at once, the manager's overhead over
a bare driver boot (same run), and the memory the manager itself holds per sandbox."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from arcbox_vm import DefaultVmConfig, FirecrackerConfig, SandboxManager, SandboxNetworkSpec, SandboxSpec, VmmConfig
from arcbox_vm.manager.boot import BootRequest, boot_vm
from arcbox_vm.storage.disks import clone_disk

NONE = SandboxNetworkSpec(mode="none")


def config(image, data_dir: Path, backend: str) -> VmmConfig:
    return VmmConfig(backend=backend, firecracker=FirecrackerConfig(data_dir=str(data_dir)),
                     defaults=DefaultVmConfig(memory_mib=256, kernel=str(image.kernel), initrd=str(image.initrd),
                                              rootfs=str(image.rootfs)))


async def bare_boot(driver, image, data_dir: Path) -> float:
    sid = "bare-" + secrets.token_hex(3)
    req = BootRequest(sandbox_id=sid, workdir=data_dir / "sandboxes" / sid,
                      kernel=driver.kernel_for(image.kernel, image.vmlinux), rootfs=image.rootfs,
                      initrd=image.initrd, vcpus=1, memory_mib=256)
    (data_dir / "sandboxes").mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    vm = await boot_vm(driver, req, clone_disk=clone_disk)
    took = time.perf_counter() - t
    await vm.destroy()
    return took


async def manager_boots(mgr: SandboxManager, n: int) -> tuple[list[float], float]:
    """Create n sandboxes at once; per-sandbox create→ready and the wall time for all."""
    sub = mgr.subscribe_events()
    t0 = time.perf_counter()
    ids = [sid for sid, _ in await asyncio.gather(*(mgr.create_sandbox(SandboxSpec(network=NONE))
                                                    for _ in range(n)))]
    ready: dict[str, float] = {}
    while len(ready) < n:
        ev = await sub.recv(timeout=300)
        if ev.sandbox_id in ids and ev.action == "ready":
            ready[ev.sandbox_id] = time.perf_counter() - t0
        elif ev.sandbox_id in ids and ev.action == "failed":
            raise RuntimeError(ev.attributes)
    sub.close()
    return list(ready.values()), time.perf_counter() - t0


async def run(image, backend: str, rounds: int = 3) -> list[tuple[str, str, str, float | None]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="arcbox-bench-") as tmp:
        ddir = Path(tmp)
        mgr = SandboxManager(config(image, ddir / "m", backend))
        try:
            bare, managed = [], []
            for _ in range(rounds):  # alternate so machine noise hits both alike
                bare.append(await bare_boot(mgr.driver, image, ddir / "b"))
                times, _ = await manager_boots(mgr, 1)
                managed.append(times[0])
                for s in mgr.list_sandboxes():
                    await mgr.remove_sandbox(s.id, force=True)
            b, m = statistics.median(bare), statistics.median(managed)
            rows.append(("create→ready, 1 sandbox (median)", f"{m:8.2f} s", f"{b:8.2f} s", m / b))
            tracemalloc.start()
            base = tracemalloc.take_snapshot()
            times, wall = await manager_boots(mgr, 4)
            held = tracemalloc.take_snapshot().compare_to(base, "filename")
            tracemalloc.stop()
            per_sb = sum(s.size_diff for s in held) / 4
            rows.append(("create→ready, 4 at once (max / wall)", f"{max(times):8.2f} s", f"{b:8.2f} s",
                         max(times) / b))
            rows.append(("  4 at once: mean per sandbox", f"{statistics.mean(times):8.2f} s", "", None))
            rows.append(("manager memory held per sandbox", f"{per_sb / 1024:8.1f} KiB", "", None))
        finally:
            await mgr.close()
    return rows
