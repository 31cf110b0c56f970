"""The control plane's JSON bodies, from what the manager knows (`SandboxInfo`)."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from arcbox_vm.e2b import network, sandboxes
from arcbox_vm.models import SandboxInfo

ENVD_VERSION = "0.6.4"  # the envd features we serve (the SDK enables what this version has)
CLIENT_ID = "arcbox-vm"
NO_END = "9999-12-31T23:59:59Z"  # a sandbox without a timeout


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def started_at(info: SandboxInfo) -> float:
    return info.ready_at or info.created_at


def end_at(info: SandboxInfo) -> float | None:
    """When the TTL removes (or, autoPause, pauses) it, None if never: its TTL counts from
    ready, time spent paused not included."""
    if not info.ttl_seconds:
        return None
    return info.ttl_deadline or started_at(info) + info.ttl_seconds


def sandbox(info: SandboxInfo, access_token: str | None, traffic_token: str | None = None) -> dict[str, Any]:
    """`Sandbox`: what create and connect answer."""
    body: dict[str, Any] = {"templateID": sandboxes.template_of(info.labels), "sandboxID": info.id,
                            "clientID": CLIENT_ID, "envdVersion": ENVD_VERSION, "domain": None}
    if access_token:
        body["envdAccessToken"] = access_token
    if traffic_token:
        body["trafficAccessToken"] = traffic_token
    return body


def detail(info: SandboxInfo, workdir: Path | None = None) -> dict[str, Any]:
    """`SandboxDetail` (get_info) and `ListedSandbox` (list) — the same fields."""
    end = end_at(info)
    internet, net = network.e2b_view(info)
    return {
        "templateID": sandboxes.template_of(info.labels), "sandboxID": info.id, "clientID": CLIENT_ID,
        "startedAt": iso(started_at(info)), "endAt": iso(end) if end else NO_END,
        "envdVersion": ENVD_VERSION, "cpuCount": info.vcpus, "memoryMB": info.memory_mib,
        "diskSizeMB": disk_bytes(info, workdir)[1] >> 20,
        "state": "paused" if sandboxes.is_paused(info) else "running",
        "metadata": sandboxes.metadata(info.labels), "allowInternetAccess": internet, "network": net,
    }


# -- metrics: a plausible sample until the metrics feature lands ----------------------------

def _proc_stat(pid: int) -> tuple[float, float] | None:
    """(cpu seconds used, seconds since start) of a host process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    used = (int(fields[11]) + int(fields[12])) / hz  # utime + stime
    age = uptime - int(fields[19]) / hz  # starttime
    return used, max(age, 1e-3)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def disk_bytes(info: SandboxInfo, workdir: Path | None = None) -> tuple[int, int]:
    """(allocated, apparent size) of the sandbox's disk copy; (0, 0) if unknown."""
    if workdir is None:
        return 0, 0
    try:
        st = (workdir / "rootfs.ext4").stat()
    except OSError:
        return 0, 0
    return min(st.st_blocks * 512, st.st_size), st.st_size


def metric(info: SandboxInfo, workdir: Path | None) -> dict[str, Any]:
    """One `SandboxMetric` sample from the VMM process as the host sees it: CPU use
    averaged over its life, resident memory (capped at the guest's), the disk copy."""
    total = info.memory_mib << 20
    cpu_pct = 0.0
    used_mem = 0
    if info.pid:
        stat = _proc_stat(info.pid)
        if stat is not None:
            cpu_pct = min(100.0, 100.0 * stat[0] / stat[1] / max(1, info.vcpus))
        used_mem = min(total, _rss(info.pid))
    disk_used, disk_total = disk_bytes(info, workdir)
    now = time.time()
    return {"timestamp": iso(now), "timestampUnix": int(now), "cpuCount": info.vcpus,
            "cpuUsedPct": round(cpu_pct, 2), "memUsed": used_mem, "memTotal": total, "memCache": 0,
            "diskUsed": disk_used, "diskTotal": disk_total}
