"""Daemon figures: exec round trip through gRPC vs in-process, file transfer vs the raw
channel, and the daemon's memory with 4 sandboxes — measured side by side in one run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from arcbox_vm import DefaultVmConfig, FirecrackerConfig, SandboxManager, SandboxNetworkSpec, SandboxSpec, VmmConfig
from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.api.sandbox.v1 import sandbox_pb2_grpc as pb_grpc

ARCBOX = str(Path(sys.executable).with_name("arcbox-vm"))
CHUNK = 1 << 20


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _config_text(image, data_dir: Path, sock: Path) -> str:
    return (f'backend = "qemu"\n[firecracker]\ndata_dir = "{data_dir}"\n[grpc]\nunix_socket = "{sock}"\n'
            f'[defaults]\nmemory_mib = 256\nkernel = "{image.kernel}"\ninitrd = "{image.initrd}"\n'
            f'rootfs = "{image.rootfs}"\n[daemon]\non_shutdown = "remove"\nmax_file_mib = 0\n')


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _wait_ready(stub, sid: str) -> None:
    while stub.Inspect(pb.InspectSandboxRequest(id=sid)).state != "ready":
        time.sleep(0.2)


def daemon_side(image, tmp: Path, execs: int, file_mib: int) -> dict:
    sock = tmp / "d.sock"
    cfg = tmp / "d.toml"
    cfg.write_text(_config_text(image, tmp / "daemon-data", sock))
    proc = subprocess.Popen([ARCBOX, "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "daemon.log", "wb"))
    res: dict = {}
    try:
        while not sock.exists():
            time.sleep(0.05)
        stub = pb_grpc.SandboxServiceStub(grpc.insecure_channel(
            f"unix:{sock}", options=[("grpc.max_receive_message_length", 64 << 20)]))
        ids = [stub.Create(pb.CreateSandboxRequest(network=pb.NetworkSpec(mode="none"))).id for _ in range(4)]
        for sid in ids:
            _wait_ready(stub, sid)
        res["rss_4_kib"] = _rss_kib(proc.pid)
        sid = ids[0]

        def run_true() -> None:
            for msg in stub.Run(pb.RunRequest(id=sid, cmd=["true"])):
                pass

        for _ in range(5):
            run_true()
        rtts = []
        for _ in range(execs):
            t = time.perf_counter()
            run_true()
            rtts.append(time.perf_counter() - t)
        res["exec"] = rtts
        block = os.urandom(CHUNK)

        def upload():
            yield pb.UploadRequest(header=pb.UploadHeader(id=sid, path="/root/bench.bin", size=file_mib * CHUNK))
            for _ in range(file_mib):
                yield pb.UploadRequest(data=block)
            yield pb.UploadRequest(done=True)

        t = time.perf_counter()
        stub.UploadFile(upload())
        res["upload_s"] = time.perf_counter() - t
        t = time.perf_counter()
        got = sum(len(c.data) for c in stub.DownloadFile(pb.DownloadRequest(id=sid, path="/root/bench.bin")))
        res["download_s"] = time.perf_counter() - t
        assert got == file_mib * CHUNK, got
        res["rss_after_files_kib"] = _rss_kib(proc.pid)
        for i in ids:
            stub.Remove(pb.RemoveSandboxRequest(id=i, force=True))
    finally:
        proc.terminate()
        proc.wait(60)
    return res


async def inprocess_side(image, tmp: Path, execs: int) -> list[float]:
    cfg = VmmConfig(backend="qemu", firecracker=FirecrackerConfig(data_dir=str(tmp / "lib-data")),
                    defaults=DefaultVmConfig(memory_mib=256, kernel=str(image.kernel), initrd=str(image.initrd),
                                             rootfs=str(image.rootfs)))
    async with SandboxManager(cfg) as mgr:
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
        await mgr.wait_ready(sid)
        for _ in range(5):
            await (await mgr.run_in_sandbox(sid, ["true"])).collect()
        rtts = []
        for _ in range(execs):
            t = time.perf_counter()
            await (await mgr.run_in_sandbox(sid, ["true"])).collect()
            rtts.append(time.perf_counter() - t)
    return rtts


async def run(image, raw_stream_mib_s: float | None, execs: int = 100, file_mib: int = 256,
              raw_upload_mib_s: float | None = None):
    rows = []
    with tempfile.TemporaryDirectory(prefix="arcbox-bench-d-") as d:
        tmp = Path(d)
        lib = await inprocess_side(image, tmp, execs)
        dmn = await asyncio.to_thread(daemon_side, image, tmp, execs, file_mib)
    ms = lambda s: f"{s * 1000:9.1f} ms"  # noqa: E731
    for q in (50, 99):
        a, b = pct(dmn["exec"], q), pct(lib, q)
        rows.append((f"exec `true` p{q}", ms(a), ms(b), a / b))
    up, down = file_mib / dmn["upload_s"], file_mib / dmn["download_s"]
    raw = raw_stream_mib_s
    rup = raw_upload_mib_s
    rows.append((f"upload {file_mib} MiB (vs raw host→guest)", f"{up:8.1f} MiB/s",
                 f"{rup:8.1f} MiB/s" if rup else "", up / rup if rup else None))
    rows.append((f"download {file_mib} MiB (vs raw guest→host)", f"{down:8.1f} MiB/s",
                 f"{raw:8.1f} MiB/s" if raw else "", down / raw if raw else None))
    rows.append(("daemon RSS with 4 sandboxes", f"{dmn['rss_4_kib'] / 1024:8.1f} MiB", "", None))
    rows.append(("daemon RSS after the transfers", f"{dmn['rss_after_files_kib'] / 1024:8.1f} MiB", "", None))
    return rows
