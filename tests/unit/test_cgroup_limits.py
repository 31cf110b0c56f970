"""VMM cgroup limits (vmm/cgroup_limits.py through vmm/cgroup.py): memory = guest +
`[limits] vmm_overhead_mib`, CPU time = its vCPUs, `[limits] pids_max` — in the sandbox's
cgroup2 directory on a hierarchy with controllers (pure v2), in per-sandbox cgroup v1
directories beside it on hybrid hosts; a missing controller is logged once; a limit that
cannot be written never fails a boot. Fake trees in tmp_path, and one round trip on this
machine's real hierarchy."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from arcbox_vm.vmm import cgroup as cg
from arcbox_vm.vmm import cgroup_limits as cl
from arcbox_vm.vmm.cgroup import SandboxCgroups, find_cgroup1_mount, find_cgroup2_mount
from arcbox_vm.vmm.cgroup_limits import CgroupLimits

MIB = 1 << 20


def v2_line(mount: Path) -> str:
    return f"41 31 0:38 / {mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate"


def v1_line(mount: Path, controllers: str, opts: str = "rw,relatime") -> str:
    return f"35 31 0:32 / {mount} {opts} - cgroup cgroup rw,{controllers}"


class Tree:
    """A fake host: a cgroup2 mount offering `v2` controllers, v1 mounts for `v1`."""

    def __init__(self, tmp_path: Path, v2: str, v1: dict[str, str]) -> None:
        self.mount = tmp_path / "cg" / "unified"
        self.mount.mkdir(parents=True)
        (self.mount / "cgroup.controllers").write_text(v2 + "\n")
        self.v1 = {}
        lines = [v2_line(self.mount)]
        for name, controllers in v1.items():
            path = tmp_path / "cg" / name
            path.mkdir()
            self.v1[name] = path
            lines.append(v1_line(path, controllers))
        self.mountinfo = tmp_path / "mountinfo"
        self.mountinfo.write_text("\n".join(lines) + "\n")
        self_cgroup = tmp_path / "self-cgroup"
        self_cgroup.write_text("0::/\n")
        self.self_cgroup = self_cgroup

    def open(self, overhead: int = 160, pids: int = 512) -> SandboxCgroups:
        return SandboxCgroups.open("arcbox-vm", "ab12", mountinfo=self.mountinfo, self_cgroup=self.self_cgroup,
                                   vmm_overhead_mib=overhead, pids_max=pids)


@pytest.fixture
def writes(monkeypatch):
    """Every limit file write, in order, into plain files: the fake tree has no kernel to
    show them (and subtree_control collects its writes instead of keeping the last)."""
    seen: list[tuple[str, str]] = []

    def record(path: Path, text: str) -> None:
        seen.append((str(path), text))
        with open(path, "a" if path.name == "cgroup.subtree_control" else "w") as f:
            f.write(text + "\n" if path.name == "cgroup.subtree_control" else text)

    monkeypatch.setattr(cl, "_write", record)
    monkeypatch.setattr(cg, "_write", record)
    return seen


def fake_rmdir(monkeypatch) -> None:
    """rmdir of a fake cgroup directory (real cgroupfs removes its files with it)."""
    def rmdir_tree(path: Path) -> bool:
        shutil.rmtree(path)
        return True

    monkeypatch.setattr(cg, "_rmdir_tree", rmdir_tree)


def prepare(path: Path, *files: str) -> None:
    """What the kernel shows in a new cgroup directory (the fake tree needs the files)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("cgroup.procs", *files):
        (path / name).touch()


def test_limits_for_a_vm():
    lim = CgroupLimits.for_vm(vcpus=2, memory_mib=512, overhead_mib=160, pids_max=512)
    assert lim == CgroupLimits(memory_bytes=672 * MIB, cpu_quota_us=200_000, pids=512, cpu_period_us=100_000)
    assert lim.files("memory", 2) == [("memory.max", str(672 * MIB))]
    assert lim.files("cpu", 2) == [("cpu.max", "200000 100000")]
    assert lim.files("memory", 1) == [("memory.limit_in_bytes", str(672 * MIB))]
    assert lim.files("cpu", 1) == [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "200000")]
    assert lim.files("pids", 1) == lim.files("pids", 2) == [("pids.max", "512")]


def test_pure_v2_writes_limits_in_the_sandbox_cgroup_and_enables_controllers_above_it(tmp_path, writes):
    tree = Tree(tmp_path, "cpuset cpu io memory hugetlb pids rdma misc", {})
    cgs = tree.open()
    assert cgs.limits.v2 == ("memory", "cpu", "pids") and cgs.limits.v1 == {} and cgs.limits.missing == ()
    handle = cgs.sandbox("sb-1", vcpus=2, memory_mib=512)
    assert handle is not None and handle.limits is not None
    sb = tree.mount / "arcbox-vm" / "ab12" / "sb-1"
    assert handle.place(4242)
    assert (sb / "memory.max").read_text() == str(672 * MIB)
    assert (sb / "cpu.max").read_text() == "200000 100000"
    assert (sb / "pids.max").read_text() == "512"
    assert (sb / "cgroup.procs").read_text() == "4242"
    for level in (tree.mount, tree.mount / "arcbox-vm", tree.mount / "arcbox-vm" / "ab12"):
        assert (level / "cgroup.subtree_control").read_text().split() == ["+memory", "+cpu", "+pids"], level
    order = [Path(p).name for p, _ in writes]
    assert order.index("memory.max") < order.index("cgroup.procs"), "limited before the VMM is moved in"


def test_hybrid_falls_back_to_v1_cgroups_made_and_removed_with_the_v2_one(tmp_path, writes, monkeypatch):
    tree = Tree(tmp_path, "", {"memory": "memory", "cpu,cpuacct": "cpu,cpuacct", "pids": "pids"})
    cgs = tree.open()
    assert cgs.limits.v2 == () and cgs.limits.missing == ()
    assert cgs.limits.v1 == {"memory": tree.v1["memory"] / "arcbox-vm/ab12",
                             "cpu": tree.v1["cpu,cpuacct"] / "arcbox-vm/ab12",
                             "pids": tree.v1["pids"] / "arcbox-vm/ab12"}
    handle = cgs.sandbox("sb-1", vcpus=1, memory_mib=256)
    assert handle.place(4242)
    mem, cpu, pids = (cgs.limits.v1[c] / "sb-1" for c in ("memory", "cpu", "pids"))
    assert (mem / "memory.limit_in_bytes").read_text() == str(416 * MIB)
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000" and (cpu / "cpu.cfs_quota_us").read_text() == "100000"
    assert (pids / "pids.max").read_text() == "512"
    for d in (mem, cpu, pids, cgs.root / "sb-1"):
        assert (d / "cgroup.procs").read_text() == "4242", d
    assert not (cgs.root / "sb-1" / "memory.max").exists(), "nothing written where no controller is"
    assert not any(Path(p).name == "cgroup.subtree_control" for p, _ in writes)

    # listing and pids see the v1 side too; a v1-only leftover (e.g. a crash) is found
    prepare(cgs.limits.v1["pids"] / "only-v1")
    assert cgs.list() == ["only-v1", "sb-1"]
    assert cgs.pids("sb-1") == [4242]

    # removal (the pid is long gone): the v2 cgroup and all its v1 companions, and our roots
    (cgs.root / "sb-1" / "cgroup.procs").write_text("")
    for d in (mem, cpu, pids):
        (d / "cgroup.procs").write_text("")
    fake_rmdir(monkeypatch)
    assert asyncio.run(handle.remove()) is True
    assert not any(d.exists() for d in (mem, cpu, pids, cgs.root / "sb-1"))
    assert asyncio.run(cgs.kill("only-v1")) is True
    assert not any(root.exists() for root in cgs.limits.v1.values()) and not cgs.root.exists()


def test_a_controller_in_neither_hierarchy_is_logged_once_and_not_limited(tmp_path, writes, caplog):
    tree = Tree(tmp_path, "memory", {"cpu": "cpu"})
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup_limits"):
        cgs = tree.open()
        for sid in ("sb-1", "sb-2"):
            assert cgs.sandbox(sid, vcpus=1, memory_mib=64).place(1000)
    assert (cgs.limits.v2, cgs.limits.missing) == (("memory",), ("pids",))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no pids controller" in warnings[0], warnings
    assert (cgs.root / "sb-1" / "memory.max").read_text() == str(224 * MIB)
    assert not (cgs.root / "sb-1" / "pids.max").exists()


def test_a_limit_that_cannot_be_set_never_fails_the_boot(tmp_path, writes, caplog, monkeypatch):
    tree = Tree(tmp_path, "memory cpu pids", {})
    real = cl._write

    def refuse_cpu(path: Path, text: str) -> None:
        if path.name == "cgroup.subtree_control" and text == "+cpu":
            raise OSError(16, "Device or resource busy")
        if path.name == "memory.max":
            raise OSError(22, "Invalid argument")
        real(path, text)

    monkeypatch.setattr(cl, "_write", refuse_cpu)
    cgs = tree.open()
    with caplog.at_level(logging.WARNING, logger="arcbox_vm.vmm.cgroup_limits"):
        assert cgs.sandbox("sb-1", vcpus=1, memory_mib=64).place(1000)
        assert cgs.sandbox("sb-2", vcpus=1, memory_mib=64).place(1001)
    assert "cannot enable the cpu controller" in caplog.text and "cannot set memory.max" in caplog.text
    assert caplog.text.count("cannot enable the cpu controller") == 1, "dropped after the first failure"
    assert cgs.limits.v2 == ("memory", "pids")
    assert (cgs.root / "sb-1" / "pids.max").read_text() == "512"
    assert (cgs.root / "sb-1" / "cgroup.procs").read_text() == "1000"


def test_without_limit_settings_or_a_vm_size_nothing_is_limited(tmp_path, writes):
    tree = Tree(tmp_path, "memory cpu pids", {})
    plain = SandboxCgroups.open("arcbox-vm", "ab12", mountinfo=tree.mountinfo, self_cgroup=tree.self_cgroup)
    assert plain.limits is None and plain.sandbox("sb-1", vcpus=1, memory_mib=64).limits is None
    limited = tree.open()
    assert limited.sandbox("sb-1").limits is None, "an adopted VMM's handle: its cgroup exists already"
    assert SandboxCgroups.off().limits is None


def test_read_only_v1_hierarchies_are_not_used(tmp_path):
    tree = Tree(tmp_path, "", {})
    path = tmp_path / "cg" / "memory"
    path.mkdir()
    tree.mountinfo.write_text(v2_line(tree.mount) + "\n" + v1_line(path, "memory", opts="ro,relatime") + "\n")
    assert tree.open().limits.missing == ("memory", "cpu", "pids")


# ---------------------------------------------------------------- the real hierarchy

def test_real_limits_round_trip():
    """On this machine (pure v2 or hybrid): a process placed with limits has them, in
    whichever hierarchy has the controller; removing the sandbox removes every directory."""
    assert os.geteuid() == 0, "the suite runs as root; this test creates real cgroups"
    mount = find_cgroup2_mount()
    assert mount is not None
    parent = f"arcbox-vm-test-{secrets.token_hex(3)}"
    cgs = SandboxCgroups.open(parent, "ab12", vmm_overhead_mib=32, pids_max=64)
    assert cgs.enabled and cgs.limits is not None
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        handle = cgs.sandbox("sb-1", vcpus=1, memory_mib=96)
        assert handle is not None and handle.place(proc.pid)
        lines = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines())
        for controller in cgs.limits.v2:
            got = (handle.path / cl.CgroupLimits.for_vm(1, 96, 32, 64).files(controller, 2)[0][0]).read_text()
            assert got.split() == {"memory": [str(128 * MIB)], "cpu": ["100000", "100000"], "pids": ["64"]}[controller]
        for controller, root in cgs.limits.v1.items():
            assert lines[next(k for k in lines if controller in k.split(","))] == f"/{parent}/ab12/sb-1"
            name, value = cl.CgroupLimits.for_vm(1, 96, 32, 64).files(controller, 1)[-1]
            assert (root / "sb-1" / name).read_text().strip() == value
        assert not cgs.limits.missing or set(cgs.limits.missing) < {"memory", "cpu", "pids"}
        assert asyncio.run(handle.remove()) is True
        assert proc.wait(10) == -9
        assert not handle.path.exists() and not any(r.exists() for r in cgs.limits.v1.values())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in cgs.list():
            asyncio.run(cgs.kill(leftover))
        for controller in ("memory", "cpu", "pids"):
            v1 = find_cgroup1_mount(controller)
            for p in ((v1 / parent / "ab12", v1 / parent) if v1 else ()):
                if p.is_dir():
                    p.rmdir()
        for p in (mount.path / parent / "ab12", mount.path / parent):
            if p.is_dir():
                p.rmdir()
