"""A sandbox booted from an imported OCI archive of an image with no python3 and no shell.

The archive is made here from Debian's static busybox (no network, no registry): /bin/busybox,
a few applet links (no `sh`), /etc/passwd with an `app` user. `image import-oci`'s function
turns it into an ext4 with the agent and its private runtime; the manager boots it with
`network none`. Commands run (argv exec'd directly: there is no /bin/sh), files go in and
out, the image's env and working directory are the sandbox's defaults and no runtime
variable reaches a command.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytest_asyncio

from arcbox_vm import SandboxManager, SandboxNetworkSpec, SandboxSpec
from arcbox_vm.image_config import image_defaults
from arcbox_vm.images import tools
from arcbox_vm.images.oci_rootfs import build_rootfs_from_oci
from arcbox_vm.images.runtime import PREFIX

from tests.support.oci_archives import busybox_layer, oci_archive
from .manager_helpers import make_config

pytestmark = pytest.mark.vm

APPLETS = ("ls", "cat", "env", "uname", "echo", "id", "pwd", "mkdir")  # no sh


async def run(mgr: SandboxManager, sid: str, cmd: list[str], **kw) -> tuple[str, str, int]:  # noqa: ANN003
    out, err, code = await (await mgr.run_in_sandbox(sid, cmd, **kw)).collect()
    return out.decode(), err.decode(), code


@pytest_asyncio.fixture(scope="module")
async def busybox_box(backend, guest_image, tmp_path_factory):
    if backend != "qemu":
        pytest.skip("the initramfs (which starts the agent's runtime) is the built image's: QEMU here")
    tmp = tmp_path_factory.mktemp("oci")
    archive = oci_archive(tmp / "busybox-oci.tar", [busybox_layer(tools.static_busybox(), APPLETS)],
                          env=["PATH=/bin", "GREETING=hello from the image"], workdir="/srv/work")
    rootfs = tmp / "images" / "busybox.ext4"
    t0 = time.monotonic()
    build_rootfs_from_oci(archive, rootfs, 256 << 20)
    print(f"\nimport of a {archive.stat().st_size / 1e6:.1f} MB archive: {time.monotonic() - t0:.2f} s")
    mgr = SandboxManager(make_config(backend, guest_image, tmp / "data", cidr="172.99.13.0/24"))
    try:
        t0 = time.monotonic()
        sid, _ = await mgr.create_sandbox(SandboxSpec(rootfs=str(rootfs), network=SandboxNetworkSpec(mode="none"),
                                                      memory_mib=256))
        await mgr.wait_ready(sid)
        print(f"busybox image boot to ready: {time.monotonic() - t0:.2f} s")
        yield mgr, sid, rootfs
    finally:
        await mgr.close()


async def test_commands_run_in_an_image_without_python_or_shell(busybox_box):
    mgr, sid, _ = busybox_box
    out, err, code = await run(mgr, sid, ["busybox", "uname", "-a"])
    assert code == 0, err
    assert out.startswith("Linux ")
    out, _, code = await run(mgr, sid, ["ls", "/"])
    assert code == 0
    listing = out.split()
    assert {"bin", "etc", "srv", "proc", "dev"} <= set(listing)
    _, _, code = await run(mgr, sid, ["ls", "/usr/bin/python3"])
    assert code != 0, "the image must have no python3 of its own"
    _, _, code = await run(mgr, sid, ["ls", "/bin/sh"])
    assert code != 0, "the image must have no shell"
    out, _, code = await run(mgr, sid, ["cat", "/proc/1/cmdline"])
    assert f"{PREFIX}/bin/python3" in out.replace("\0", " "), "PID 1 is the agent on its private runtime"


async def test_image_config_is_the_sandbox_default(busybox_box):
    mgr, sid, rootfs = busybox_box
    assert image_defaults(rootfs).working_dir == "/srv/work"
    out, _, code = await run(mgr, sid, ["pwd"])
    assert (code, out.strip()) == (0, "/srv/work")
    out, _, code = await run(mgr, sid, ["env"])
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["GREETING"] == "hello from the image"
    assert env["PATH"] == "/bin"
    # a command's own values win over the image's
    out, _, _ = await run(mgr, sid, ["env"], env={"GREETING": "mine"}, working_dir="/")
    assert "GREETING=mine" in out.splitlines()


async def test_no_runtime_leaks_into_commands(busybox_box):
    mgr, sid, _ = busybox_box
    for user in ("root", "app"):
        out, err, code = await run(mgr, sid, ["env"], user=user)
        assert code == 0, err
        for line in out.splitlines():
            name = line.split("=", 1)[0]
            assert not name.startswith(("PYTHON", "LD_")), f"{line!r} leaked into a command run as {user}"
            assert PREFIX not in line, f"{line!r} names the agent runtime"
    out, _, code = await run(mgr, sid, ["id"], user="app")
    assert code == 0 and "uid=1000(app)" in out


async def test_files_in_and_out(busybox_box):
    mgr, sid, _ = busybox_box
    payload = b"from the host\n" * 1000

    async def chunks():
        yield payload

    assert await mgr.write_file(sid, "/srv/work/in.txt", chunks()) == len(payload)
    out, _, code = await run(mgr, sid, ["cat", "/srv/work/in.txt"])
    assert code == 0 and out.encode() == payload
    _, _, code = await run(mgr, sid, ["mkdir", "-p", "/srv/work/out"])
    assert code == 0
    await mgr.write_file(sid, "/srv/work/out/copy.txt", chunks())
    reader = await mgr.read_file(sid, "/srv/work/out/copy.txt")
    got = b"".join([c async for c in reader])
    assert got == payload
