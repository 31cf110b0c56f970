"""arcbox-vm benchmark: our agent protocol vs. the bare channel, measured in one run.

    .venv/bin/python bench/run.py [--vmm qemu] [--boots 3] [--execs 100] [--mib 64] [--vcpus 1]

For each measure, the same thing is done twice on the same kind of VM (``--vcpus`` vCPUs)
and the same transport (virtio-serial under QEMU, vsock under Firecracker): once through our
framed, multiplexed protocol and once over the raw channel with the agent in
`arcbox.rawbench=1` mode (it writes b"R" when up, echoes `E<n>` payloads, streams `S<n>`
zero bytes, swallows `U<n>` bytes). The ratio column is protocol / bare (for times: >1 =
slower; for throughput: <1 = slower). Each figure is set against its honest limit in the
same run: stdout and download against the raw channel guest→host, upload against the raw
channel host→guest, exec against an in-guest spawn of the same command
(`bench/guest_ceilings.py`, run by the guest's Python), and stdout also against what a
Python reader in the guest gets out of a pipe (the ceiling for a Python agent). Exec and
its spawn+wait limit alternate in rounds (EXEC_ROUNDS) in the same VM: under emulation
both drift by ±15 % over a run, so each round's p50 ratio is printed as a range and its
median, besides the pooled p50/p99.

The raw channel is not reachable by a relay: a command's output must cross a pipe before
the channel, and an upload must end in a file. So the raw VM also measures native code in
the guest (rawbench's `C<n>`, `P<n>`, `W<n>`): `head -c n /dev/zero | dd bs=1M` onto the
channel (a C relay), the same pipe spliced into the channel by the kernel (zero-copy, the
limit of any pipe relay), and `dd` from the channel into a file with fsync (a native
upload). stdout is set against the two relays and upload against the dd, and each native
figure against the raw channel, to show how far below it the limits themselves are.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import json
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arcbox_vm.agent.protocol import exec_request  # noqa: E402
from arcbox_vm.images import build_image
from arcbox_vm.config import DEFAULT_BOOT_ARGS
from arcbox_vm.manager.boot import BootRequest, boot_vm
from arcbox_vm.paths import data_dir
from arcbox_vm.ports import MachineSpec
from arcbox_vm.storage.disks import clone_disk
from arcbox_vm.composition import select_driver
from arcbox_vm.config import VmmConfig


EXEC_ROUNDS = 5  # exec `true` through the agent and spawn+wait in the guest, alternated


def print_table(title: str, col_a: str, col_b: str, rows, lead: str = "\n") -> None:  # noqa: ANN001
    """A heading and rows of (measure, first column, second column, ratio or None)."""
    print(f"{lead}{title:38} {col_a:>14} {col_b:>14} {'ratio':>7}")
    for name, a, b, r in rows:
        print(f"{name:38} {a:>14} {b:>14} {'' if r is None else f'{r:7.2f}':>7}".rstrip())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    idx = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[idx]


class RawVm:
    """A VM whose agent runs in raw bench mode: no protocol, just bytes."""

    def __init__(self, driver, image, ddir: Path, vcpus: int = 1) -> None:
        self.driver, self.image, self.vcpus = driver, image, vcpus
        self.sid = "bench-raw-" + secrets.token_hex(3)
        self.workdir = ddir / "bench" / self.sid
        self.proc = None
        self.server = None
        self.conn: asyncio.Future = asyncio.get_running_loop().create_future()

    async def boot(self) -> float:
        t0 = time.perf_counter()
        self.workdir.mkdir(parents=True)
        disk = self.workdir / "rootfs.ext4"
        await clone_disk(self.image.rootfs, disk)
        endpoint = self.driver.agent_endpoint(self.workdir)

        def on_conn(r, w):
            if not self.conn.done():
                self.conn.set_result((r, w))

        self.server = await asyncio.start_unix_server(on_conn, path=str(endpoint.listen_path), limit=1 << 22)
        spec = MachineSpec(sandbox_id=self.sid, workdir=self.workdir,
                           kernel=self.driver.kernel_for(self.image.kernel, self.image.vmlinux),
                           rootfs=disk, initrd=self.image.initrd, boot_args=DEFAULT_BOOT_ARGS,
                           vcpus=self.vcpus, memory_mib=512, extra_boot_args=("arcbox.rawbench=1",))
        self.proc = await self.driver.launch(spec, endpoint)
        self.reader, self.writer = await asyncio.wait_for(self.conn, 120)
        first = await asyncio.wait_for(self.reader.readexactly(1), 120)
        assert first == b"R", first
        return time.perf_counter() - t0

    async def echo_rtt(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.writer.write(b"E1\nx")
            await self.writer.drain()
            await self.reader.readexactly(1)
            out.append(time.perf_counter() - t)
        return out

    async def stream(self, nbytes: int) -> float:
        """Guest→host: the agent writes n zero bytes itself (``S``)."""
        return await self._pull("S", nbytes)

    async def relay_dd(self, nbytes: int) -> float:
        """Guest→host through a pipe: ``head -c n /dev/zero | dd bs=1M`` onto the channel (``C``)."""
        return await self._pull("C", nbytes)

    async def relay_splice(self, nbytes: int) -> float:
        """Guest→host through a pipe the agent splices into the channel (``P``)."""
        return await self._pull("P", nbytes)

    async def _pull(self, kind: str, nbytes: int, timeout: float = 300) -> float:
        t = time.perf_counter()
        self.writer.write(f"{kind}{nbytes}\n".encode())
        await self.writer.drain()
        left = nbytes
        async with asyncio.timeout(timeout):
            while left:
                chunk = await self.reader.read(min(left, 1 << 20))
                if not chunk:
                    raise RuntimeError(f"raw {kind} stream ended early")
                left -= len(chunk)
        return time.perf_counter() - t

    async def upload(self, nbytes: int) -> float:
        """Host→guest: n bytes the guest reads and drops, then its ``K``."""
        t = time.perf_counter()
        self.writer.write(f"U{nbytes}\n".encode())
        await self._push_zeros(nbytes)
        assert await self.reader.readexactly(1) == b"K"
        return time.perf_counter() - t

    async def upload_dd(self, nbytes: int, timeout: float = 300) -> float:
        """Host→guest into a file: ``dd`` in the guest from the channel, fsynced (``W``).

        The bytes go out only after the guest's ``G``, once dd is about to read them.
        """
        t = time.perf_counter()
        self.writer.write(f"W{nbytes}\n".encode())
        await self.writer.drain()
        async with asyncio.timeout(timeout):
            go = await self.reader.readexactly(1)
            if go != b"G":
                raise RuntimeError(f"raw W: expected G, got {go!r}")
            await self._push_zeros(nbytes)
            done = await self.reader.readexactly(1)
        if done != b"K":
            raise RuntimeError(f"raw W: dd failed in the guest ({done!r})")
        return time.perf_counter() - t

    async def _push_zeros(self, nbytes: int) -> None:
        block = bytes(1 << 20)
        left = nbytes
        while left:
            k = min(left, len(block))
            self.writer.write(block if k == len(block) else block[:k])
            await self.writer.drain()
            left -= k

    async def close(self) -> None:
        if self.proc is not None:
            await self.proc.kill()
            await self.proc.cleanup()
        if self.server is not None:
            self.server.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


async def protocol_side(driver, image, ddir: Path, args) -> dict:
    res: dict = {"boot": []}
    vm = None
    for i in range(args.boots):
        sid = "bench-" + secrets.token_hex(3)
        req = BootRequest(sandbox_id=sid, workdir=ddir / "bench" / sid,
                          kernel=driver.kernel_for(image.kernel, image.vmlinux), rootfs=image.rootfs,
                          initrd=image.initrd, vcpus=args.vcpus, memory_mib=512)
        t0 = time.perf_counter()
        candidate = await boot_vm(driver, req, clone_disk=clone_disk)
        res["boot"].append(time.perf_counter() - t0)
        if i < args.boots - 1:
            await candidate.destroy()
        else:
            vm = candidate
    try:
        for _ in range(5):  # warm up: first execs pay for TCG translation
            await (await vm.agent.exec(exec_request(["true"]))).collect()
        probe = (Path(__file__).parent / "guest_ceilings.py").read_text()
        res["spawn_rounds"], res["exec_rounds"] = [], []
        per_round = max(1, args.execs // EXEC_ROUNDS)
        for _ in range(EXEC_ROUNDS):  # exec and its in-guest limit alternate: drift hits both alike
            rtts = []
            for _ in range(per_round):
                t = time.perf_counter()
                await (await vm.agent.exec(exec_request(["true"]))).collect()
                rtts.append(time.perf_counter() - t)
            out, err, status = await (await vm.agent.exec(exec_request(
                ["python3", "-c", probe, "spawn", str(per_round)]))).collect()
            assert status.exit_code == 0, err
            res["exec_rounds"].append(rtts)
            res["spawn_rounds"].append(json.loads(out))
        res["ping"] = [await vm.agent.ping() for _ in range(args.execs)]
        nbytes = args.mib << 20
        session = await vm.agent.exec(exec_request(["head", "-c", str(nbytes), "/dev/zero"]))
        t = time.perf_counter()
        got = 0
        async for chunk in session:
            got += len(chunk.data)
        res["stream"] = time.perf_counter() - t
        assert got == nbytes, got
        await files_side(vm, args.mib << 20, res)
        out, err, status = await (await vm.agent.exec(exec_request(
            ["python3", "-c", probe, str(args.execs), str(args.mib)]))).collect()
        assert status.exit_code == 0, err
        res["ceilings"] = json.loads(out)
    finally:
        await vm.destroy()
    return res


async def files_side(vm, nbytes: int, res: dict) -> None:  # noqa: ANN001
    """Upload then download ``nbytes`` through the agent's file transfer (in-process)."""
    block = os.urandom(1 << 20)

    async def chunks():
        for i in range(0, nbytes, len(block)):
            yield block[: min(len(block), nbytes - i)]

    t = time.perf_counter()
    await vm.agent.write_file("/root/bench.bin", chunks(), size=nbytes)
    res["upload"] = time.perf_counter() - t
    t = time.perf_counter()
    got = 0
    async with await vm.agent.read_file("/root/bench.bin") as reader:
        async for chunk in reader:
            got += len(chunk)
    res["download"] = time.perf_counter() - t
    assert got == nbytes, got
    await (await vm.agent.exec(exec_request(["rm", "-f", "/root/bench.bin"]))).collect()


async def raw_side(driver, image, ddir: Path, args) -> dict:
    res: dict = {"boot": []}
    for i in range(args.boots):
        vm = RawVm(driver, image, ddir, vcpus=args.vcpus)
        try:
            res["boot"].append(await vm.boot())
            if i == args.boots - 1:
                await vm.echo_rtt(5)
                res["echo"] = await vm.echo_rtt(args.execs)
                res["stream"] = await vm.stream(args.mib << 20)
                res["upload"] = await vm.upload(args.mib << 20)
                res["relay_dd"] = await vm.relay_dd(args.mib << 20)
                res["relay_splice"] = await vm.relay_splice(args.mib << 20)
                res["upload_dd"] = await vm.upload_dd(args.mib << 20)
        finally:
            await vm.close()
    return res


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", default="auto", choices=["auto", "qemu", "firecracker"])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--vcpus", type=int, default=1, help="vCPUs of the channel section's two VMs")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    ap.add_argument("--only", choices=["channel", "manager", "daemon", "snapshots", "templates"], help="run one section only")
    ap.add_argument("--file-mib", type=int, default=256, help="file size for the daemon's upload/download")
    args = ap.parse_args()
    ddir = data_dir()
    (ddir / "bench").mkdir(parents=True, exist_ok=True)
    image = build_image(ddir)
    driver = select_driver(VmmConfig(backend=args.vmm))
    print(f"arcbox-vm bench (ratios: first column / second column, measured in this run): vmm={driver.name} accel={getattr(driver, 'accel', lambda: '-')()} "
          f"vcpus={args.vcpus} boots={args.boots} execs={args.execs} stream={args.mib} MiB", flush=True)
    if args.only in (None, "manager"):
        from bench.manager_bench import run as manager_run

        print_table("manager vs bare driver boot", "manager", "bare boot", await manager_run(image, driver.name))
        if args.only == "manager":
            return
    if args.only in (None, "snapshots") and driver.name == "qemu":
        from bench.snapshot_bench import run as snapshot_run

        print_table("snapshots", "snapshot", "cold / other", await snapshot_run(image, driver.name))
        if args.only == "snapshots":
            return
    if args.only in (None, "templates") and driver.name == "qemu":
        from bench.template_bench import run as template_run

        print_table("templates", "template", "cold / other", await template_run(image, driver.name))
        if args.only == "templates":
            return
    raw_rate = raw_up = None
    if args.only in (None, "channel"):
        print()
        proto = await protocol_side(driver, image, ddir, args)
        raw = await raw_side(driver, image, ddir, args)
        raw_rate, raw_up = args.mib / raw["stream"], args.mib / raw["upload"]
        print_channel(proto, raw, args)
    if args.only in (None, "daemon") and driver.name == "qemu":
        from bench.daemon_bench import run as daemon_run

        print_table("daemon (gRPC) vs in-process", "daemon", "in-process", await daemon_run(image, raw_rate, args.execs, args.file_mib, raw_up))


def print_channel(proto: dict, raw: dict, args) -> None:  # noqa: ANN001
    ms = lambda s: f"{s * 1000:9.1f} ms"  # noqa: E731
    rate = lambda v: f"{v:9.1f} MiB/s"  # noqa: E731
    execs = [t for r in proto["exec_rounds"] for t in r]
    spawns = [t for r in proto["spawn_rounds"] for t in r]
    rows = []
    pb, rb = statistics.median(proto["boot"]), statistics.median(raw["boot"])
    rows.append(("boot to ready (median)", ms(pb), ms(rb), pb / rb))
    for q in (50, 99):
        pe, re_ = pct(execs, q), pct(raw["echo"], q)
        rows.append((f"exec `true` vs raw echo p{q}", ms(pe), ms(re_), pe / re_))
    for q in (50, 99):
        pp, re_ = pct(proto["ping"], q), pct(raw["echo"], q)
        rows.append((f"protocol ping vs raw echo p{q}", ms(pp), ms(re_), pp / re_))
    pt, rt, ru = args.mib / proto["stream"], args.mib / raw["stream"], args.mib / raw["upload"]
    up, down = args.mib / proto["upload"], args.mib / proto["download"]
    rows.append((f"stdout {args.mib} MiB vs raw guest→host", rate(pt), rate(rt), pt / rt))
    rows.append((f"download {args.mib} MiB vs raw guest→host", rate(down), rate(rt), down / rt))
    rows.append((f"upload {args.mib} MiB vs raw host→guest", rate(up), rate(ru), up / ru))
    print_table("measure", "protocol", "bare channel", rows, lead="")

    c = proto["ceilings"]
    rows = []
    for q in (50, 99):
        pe, sp = pct(execs, q), pct(spawns, q)
        rows.append((f"exec `true` vs spawn+wait p{q}", ms(pe), ms(sp), pe / sp))
    ratios = sorted(pct(e, 50) / pct(g, 50) for e, g in zip(proto["exec_rounds"], proto["spawn_rounds"]))
    rows.append((f"  p50 ratio, median of {len(ratios)} alternating rounds", "",
                 f"{ratios[0]:.2f}..{ratios[-1]:.2f}", statistics.median(ratios)))
    pe, fe = pct(execs, 50), pct(c["fork_exec_true"], 50)
    rows.append(("exec `true` vs fork+execve+wait p50", ms(pe), ms(fe), pe / fe))
    rows.append(("stdout vs Python pipe reader", rate(pt), rate(c["pipe_read"]), pt / c["pipe_read"]))
    # the agent's one thread does both halves of a transfer one after the other (so does
    # one vCPU): their times add up
    up_lim = 1 / (1 / ru + 1 / c["file_write"])
    down_lim = 1 / (1 / rt + 1 / c["file_read"])
    rows.append(("upload vs raw host→guest + file write", rate(up), rate(up_lim), up / up_lim))
    rows.append(("download vs file read + raw guest→host", rate(down), rate(down_lim), down / down_lim))
    rows.append(("  (file write / file read in the guest)", rate(c["file_write"]), rate(c["file_read"]), None))
    print_table("vs in-guest limits (guest Python)", "protocol", "in guest", rows)

    cr, sr, wr = (args.mib / raw[k] for k in ("relay_dd", "relay_splice", "upload_dd"))
    print_table("vs native code in the guest", "protocol", "native", [
        ("stdout vs C relay (head|dd) in guest", rate(pt), rate(cr), pt / cr),
        ("stdout vs splice relay in guest", rate(pt), rate(sr), pt / sr),
        ("upload vs dd channel→file (fsync)", rate(up), rate(wr), up / wr)])
    print_table("native code vs bare channel", "native", "bare channel", [
        ("C relay (head|dd) vs raw guest→host", rate(cr), rate(rt), cr / rt),
        ("splice relay vs raw guest→host", rate(sr), rate(rt), sr / rt),
        ("dd channel→file vs raw host→guest", rate(wr), rate(ru), wr / ru)])
    if args.json:
        print(json.dumps({"protocol": proto, "raw": raw}))


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
