"""The VMM with least privilege, on real VMs (QEMU, the default config): a guest that takes
over its QEMU is an unprivileged process of a uid of its own — no capabilities,
no-new-privs, seccomp, an empty network namespace — that can open none of the host's or
another sandbox's files, connect to no other sandbox's agent socket, signal no other VMM;
its cgroup limits its memory, CPU time and process count. Everything goes with the sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec
from arcbox_vm.config.qemu import QemuConfig
from arcbox_vm.paths import socket_dir
from arcbox_vm.vmm.cgroup import find_cgroup1_mount, find_cgroup2_mount
from arcbox_vm.vmm.users import CLAIMS_DIR

from .manager_helpers import fresh_netns_name, make_config, netns_list

pytestmark = pytest.mark.vm

MIB = 1 << 20
OVERHEAD_MIB = 160  # [limits] vmm_overhead_mib default
PIDS_MAX = 512  # [limits] pids_max default

# Runs as the confined VMM's uid (and gid, no groups): what could a QEMU taken over by its
# guest open, connect to or signal? Prints {target: errno name or "ok"}.
PROBE = r"""
import errno, json, os, socket, sys
targets = json.loads(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
for name, path in targets["files"].items():
    attempt(name, lambda p=path: open(p, "rb").close())
for name, path in targets["sockets"].items():
    def connect(p=path):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(p)
        finally:
            s.close()
    attempt(name, connect)
for name, pid in targets["pids"].items():
    attempt(name, lambda p=pid: os.kill(p, 0))
print(json.dumps(out))
"""


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def probe_as(uid: int, targets: dict) -> dict[str, str]:
    """Run PROBE as `uid`:`uid` with no supplementary groups (the confined VMM's credentials)."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    res = subprocess.run([python, "-I", "-c", PROBE, json.dumps(targets)], user=uid, group=uid, extra_groups=[],
                         capture_output=True, text=True, cwd="/", timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def limit_files(pid: int) -> dict[str, Path]:
    """Where the VMM's memory/cpu/pids limits are: its cgroup2 directory's files when the
    hierarchy has the controllers, else its cgroup v1 directories' (hybrid hosts)."""
    lines = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    mount = find_cgroup2_mount()
    assert mount is not None
    v2 = mount.path / lines[""].lstrip("/")
    files: dict[str, Path] = {}
    for controller, v2_file, v1_file in (("memory", "memory.max", "memory.limit_in_bytes"),
                                         ("cpu", "cpu.max", "cpu.cfs_quota_us"), ("pids", "pids.max", "pids.max")):
        if (v2 / v2_file).exists():
            files[controller] = v2 / v2_file
        else:
            v1_mount = find_cgroup1_mount(controller)
            assert v1_mount is not None and controller in lines, f"no {controller} controller on this host"
            files[controller] = v1_mount / lines[controller].lstrip("/") / v1_file
    return files


def claims_of(sockdir: Path) -> list[str]:
    if not CLAIMS_DIR.is_dir():
        return []
    return [p.name for p in CLAIMS_DIR.iterdir() if p.name.isdigit() and p.read_text().strip() == str(sockdir)]


async def test_the_vmm_is_unprivileged_confined_and_limited(guest_image, tmp_path):
    ns = fresh_netns_name()
    mgr = SandboxManager(make_config("qemu", guest_image, tmp_path / "data", netns=ns))
    try:
        a, ip_a = await mgr.create_sandbox(SandboxSpec(id="priv-a"))
        b, _ = await mgr.create_sandbox(SandboxSpec(id="priv-b", network=SandboxNetworkSpec(mode="none")))
        await mgr.wait_ready(a)
        await mgr.wait_ready(b)
        pid_a, pid_b = mgr.inspect_sandbox(a).pid, mgr.inspect_sandbox(b).pid
        work = {sid: tmp_path / "data" / "sandboxes" / sid for sid in (a, b)}

        # -- who the VMM is
        sa, sb = status(pid_a), status(pid_b)
        for s in (sa, sb):
            print({k: s[k] for k in ("Uid", "Gid", "Groups", "Seccomp", "NoNewPrivs", "CapEff", "CapPrm")})
        uid_a, uid_b = int(sa["Uid"].split()[0]), int(sb["Uid"].split()[0])
        first, last = QemuConfig().uids
        assert first <= uid_a <= last and first <= uid_b <= last and uid_a != uid_b, "a uid of its own each"
        assert sa["Uid"].split() == [str(uid_a)] * 4 and sa["Gid"].split() == [str(uid_a)] * 4
        assert sa["Groups"] == ""
        assert sa["Seccomp"] == "2", "QEMU's seccomp filter (-sandbox on,...)"
        assert sa["NoNewPrivs"] == "1"
        assert sa["CapEff"] == sa["CapPrm"] == "0000000000000000"
        assert os.readlink(f"/proc/{pid_a}/ns/net") != os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{pid_a}/ns/net") != os.readlink(f"/proc/{pid_b}/ns/net"), \
            "each VMM has an empty network namespace of its own"
        cmdline = Path(f"/proc/{pid_a}/cmdline").read_bytes().split(b"\0")
        assert b"-runas" not in cmdline and b"-sandbox" in cmdline

        # -- the sandbox works: the guest's TAP (a descriptor QEMU got) carries traffic
        ping = await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "5", ip_a],
                                       capture_output=True, text=True, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        out, _, code = await (await mgr.run_in_sandbox(b, ["echo", "alive"], timeout_seconds=60)).collect()
        assert (out, code) == (b"alive\n", 0)

        # -- what it can reach: its files only through its descriptors
        for sid in (a, b):
            assert stat.S_IMODE(work[sid].stat().st_mode) == 0o700 and work[sid].stat().st_uid == 0
            disk = (work[sid] / "rootfs.ext4").stat()
            assert stat.S_IMODE(disk.st_mode) == 0o600 and disk.st_uid == 0
        sock_a = socket_dir(work[a])
        st = sock_a.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, uid_a, 0o710), "only A's group passes"
        st = (sock_a / "agent.sock").stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (uid_a, 0o660)
        seen = probe_as(uid_a, {
            "files": {"B's disk": str(work[b] / "rootfs.ext4"), "B's console": str(work[b] / "console.log"),
                      "own disk by path": str(work[a] / "rootfs.ext4"), "state db": str(tmp_path / "data" / "state.db"),
                      "/etc/shadow": "/etc/shadow"},
            "sockets": {"B's agent socket": str(socket_dir(work[b]) / "agent.sock")},
            "pids": {"B's QEMU": pid_b, "the daemon": os.getpid()},
        })
        print(seen)
        assert seen == {"B's disk": "EACCES", "B's console": "EACCES", "own disk by path": "EACCES",
                        "state db": "EACCES", "/etc/shadow": "EACCES", "B's agent socket": "EACCES",
                        "B's QEMU": "EPERM", "the daemon": "EPERM"}
        held = {os.readlink(f"/proc/{pid_a}/fd/{fd}") for fd in os.listdir(f"/proc/{pid_a}/fd")}
        assert {str(work[a] / "rootfs.ext4"), str(work[a] / "console.log")} <= held, "QEMU holds them open"

        # -- its cgroup limits (memory: guest + overhead; cpu: its vCPUs; pids)
        files = limit_files(pid_a)
        print({k: (str(v), v.read_text().strip()) for k, v in files.items()})
        memory_mib = mgr.inspect_sandbox(a).memory_mib
        assert int(files["memory"].read_text()) == (memory_mib + OVERHEAD_MIB) * MIB
        if files["cpu"].name == "cpu.max":
            assert files["cpu"].read_text().split() == ["100000", "100000"]
        else:
            assert int(files["cpu"].read_text()) == 100000
            assert int((files["cpu"].parent / "cpu.cfs_period_us").read_text()) == 100000
        assert int(files["pids"].read_text()) == PIDS_MAX
        cgroup_dirs = {f.parent for f in files.values()}

        claimed = claims_of(sock_a)
        assert claimed == [str(uid_a)], "A's uid is claimed for it host-wide"
        await mgr.remove_sandbox(a, force=True)
        assert not Path(f"/proc/{pid_a}").exists() or status(pid_a).get("State", "").startswith("Z")
        assert not any(d.exists() for d in cgroup_dirs), "its cgroups (v2 and v1) go with the sandbox"
        assert claims_of(sock_a) == [] and not sock_a.exists(), "its uid is given back, its socket dir gone"
        assert not work[a].exists()
    finally:
        await mgr.close()
        if ns in netns_list():
            await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", ns], check=False)


async def test_unconfined_qemu_only_when_configured(guest_image, tmp_path):
    """`[qemu] sandbox = false` is the explicit way back to an unconfined QEMU (as the
    daemon's user, no seccomp); the default never falls back to it by itself."""
    cfg = make_config("qemu", guest_image, tmp_path)
    cfg.qemu = QemuConfig(sandbox=False)
    mgr = SandboxManager(cfg)
    try:
        sid, _ = await mgr.create_sandbox(SandboxSpec(network=SandboxNetworkSpec(mode="none")))
        await mgr.wait_ready(sid)
        s = status(mgr.inspect_sandbox(sid).pid)
        assert s["Uid"].split()[0] == str(os.getuid()) and s["Seccomp"] == "0"
        out, _, code = await (await mgr.run_in_sandbox(sid, ["echo", "ok"], timeout_seconds=60)).collect()
        assert (out, code) == (b"ok\n", 0)
    finally:
        await mgr.close()
