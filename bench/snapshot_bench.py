"""Snapshot figures, side by side in one run: restore→ready vs cold create→ready, fork of 4
vs 4 cold creates, warm-pool hand-out latency, memory (PSS) of idle restores vs an idle
cold-booted VM, checkpoint time (and how long the VM was paused) and size."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from arcbox_vm import (DefaultVmConfig, FirecrackerConfig, RestoreSandboxSpec, SandboxManager, SandboxNetworkSpec,
                       SandboxSpec, VmmConfig)
from arcbox_vm.config import PoolConfig

NONE = SandboxNetworkSpec(mode="none")
IDLE_S = 3.0  # how long VMs sit idle before their memory is read


def config(image, data_dir: Path, backend: str, pool: int = 0) -> VmmConfig:
    return VmmConfig(backend=backend, data_dir=data_dir, firecracker=FirecrackerConfig(data_dir=str(data_dir)),
                     defaults=DefaultVmConfig(memory_mib=256, kernel=str(image.kernel), initrd=str(image.initrd),
                                              rootfs=str(image.rootfs)),
                     pool=PoolConfig(size=pool, network="none"))


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for {pid}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def cold(mgr: SandboxManager, n: int) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    ids = [sid for sid, _ in await asyncio.gather(*(mgr.create_sandbox(SandboxSpec(network=NONE))
                                                    for _ in range(n)))]
    await asyncio.gather(*(mgr.wait_ready(sid, 300) for sid in ids))
    return ids, time.perf_counter() - t0


async def restore(mgr: SandboxManager, snapshot_id: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    sid, _ = await mgr.restore_sandbox(RestoreSandboxSpec(snapshot_id=snapshot_id))
    await mgr.wait_ready(sid, 300)
    return sid, time.perf_counter() - t0


async def remove_all(mgr: SandboxManager, keep: set[str] = frozenset()) -> None:
    for s in mgr.list_sandboxes():
        if s.id not in keep:
            await mgr.remove_sandbox(s.id, force=True)


async def run(image, backend: str, rounds: int = 3, handouts: int = 50) -> list[tuple[str, str, str, float | None]]:
    rows: list[tuple[str, str, str, float | None]] = []
    s = lambda v: f"{v:8.2f} s"  # noqa: E731
    ms = lambda v: f"{v * 1000:8.1f} ms"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="arcbox-snap-bench-", dir="/var/tmp") as tmp:
        mgr = SandboxManager(config(image, Path(tmp) / "m", backend))
        try:
            colds, restores, ckpt_times, paused = [], [], [], []
            [src], _ = await cold(mgr, 1)
            stream = await mgr.run_in_sandbox(src, ["sh", "-c", "echo bench > /root/f"])
            await stream.collect()
            sub = mgr.subscribe_events(action="checkpointed")
            infos = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                infos.append(await mgr.checkpoint_sandbox(src, "bench"))
                ckpt_times.append(time.perf_counter() - t0)
                paused.append(int((await sub.recv(30)).attributes["paused_ms"]) / 1000)
            sub.close()
            snapshot_id = infos[-1].snapshot_id
            for _ in range(rounds):  # alternate so machine noise hits both alike
                (cid,), t = await cold(mgr, 1)
                colds.append(t)
                await mgr.remove_sandbox(cid, force=True)
                rid, t = await restore(mgr, snapshot_id)
                restores.append(t)
                await mgr.remove_sandbox(rid, force=True)
            c, r = statistics.median(colds), statistics.median(restores)
            rows.append(("restore→ready vs cold create→ready", s(r), s(c), r / c))
            rows.append(("checkpoint (median) / VM paused", s(statistics.median(ckpt_times)),
                         ms(statistics.median(paused)), None))
            rows.append(("checkpoint size (disk + memory + state)", f"{infos[-1].size_bytes / 2**20:8.1f} MiB", "", None))

            # fork of 4 vs 4 cold creates at once
            t0 = time.perf_counter()
            await mgr.fork_sandbox(src, 4)
            fork_wall = time.perf_counter() - t0
            await remove_all(mgr, keep={src})
            _, cold_wall = await cold(mgr, 4)
            rows.append(("fork of 4 (wall) vs 4 cold creates", s(fork_wall), s(cold_wall), fork_wall / cold_wall))
            await remove_all(mgr, keep={src})

            # memory: 4 idle restores of one checkpoint vs an idle cold VM
            restored = [await restore(mgr, snapshot_id) for _ in range(4)]
            (cold_id,), _ = await cold(mgr, 1)
            await asyncio.sleep(IDLE_S)
            pss = [pss_kib(mgr.inspect_sandbox(sid).pid) for sid, _ in restored]
            cold_pss = pss_kib(mgr.inspect_sandbox(cold_id).pid)
            worst = max(pss)
            rows.append(("PSS per idle restore (max of 4) vs cold", f"{worst / 1024:8.1f} MiB",
                         f"{cold_pss / 1024:8.1f} MiB", worst / cold_pss))
            rows.append(("  PSS of the 4 restores", " ".join(f"{p // 1024}" for p in pss) + " MiB", "", None))
        finally:
            await mgr.close()

        # the warm pool: hand-out latency (each one taken from a full pool)
        pmgr = SandboxManager(config(image, Path(tmp) / "p", backend, pool=2))
        try:
            await pmgr.start()
            waits: list[float] = []
            cpu: list[float] = []  # our own CPU time: the wall time minus waiting for a busy machine
            for _ in range(handouts):
                t_full = time.perf_counter()
                while pmgr.pool.ready() < 2:
                    await asyncio.sleep(0.05)
                    if time.perf_counter() - t_full > 300:
                        raise RuntimeError("the pool did not fill")
                t0, c0 = time.perf_counter(), time.process_time()
                sid, _ = await pmgr.create_sandbox(SandboxSpec(network=NONE, labels={"b": "1"}))
                waits.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                assert pmgr.inspect_sandbox(sid).state.value == "ready"
                await pmgr.remove_sandbox(sid, force=True)
            rows.append(("pool hand-out p50 / p99 (wall)", ms(pct(waits, 50)), ms(pct(waits, 99)), None))
            rows.append(("pool hand-out p50 / p99 (CPU)", ms(pct(cpu, 50)), ms(pct(cpu, 99)), None))
            rows.append(("  vs cold create→ready (median)", ms(pct(waits, 50)), s(c), pct(waits, 50) / c))
        finally:
            await pmgr.close()
    return rows
