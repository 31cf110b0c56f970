"""`[limits]`: the (N+1)th sandbox, too much memory, oversized records — refused before
anything is made."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from arcbox_vm import SandboxManager, SandboxSpec, VmmConfig
from arcbox_vm.errors import InvalidArgument, ResourceExhausted
from arcbox_vm.ports import AgentEndpoint


class NeverBoots:
    """A VMM driver whose VMs never come up: sandboxes stay STARTING (holding their share)."""

    name = "never"

    def agent_endpoint(self, workdir: Path) -> AgentEndpoint:
        return AgentEndpoint(workdir / "agent.sock", "")

    def kernel_for(self, bzimage: Path, vmlinux: Path) -> Path:
        return bzimage

    async def launch(self, spec, endpoint):  # noqa: ANN001, ANN201
        await asyncio.Event().wait()

    async def adopt(self, spec):  # noqa: ANN001, ANN201
        raise AssertionError("nothing to adopt")


@pytest.fixture
def images(tmp_path):
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "r").write_bytes(b"r")
    return SandboxSpec(kernel=str(tmp_path / "k"), rootfs=str(tmp_path / "r"), network={"mode": "none"})


def manager(tmp_path, **limits) -> SandboxManager:
    cfg = VmmConfig(backend="qemu", data_dir=tmp_path / "data", limits=limits, daemon={"cgroup_parent": ""})
    return SandboxManager(cfg, driver=NeverBoots())


async def test_the_n_plus_first_sandbox_is_refused(tmp_path, images):
    async with manager(tmp_path, max_sandboxes=2) as mgr:
        a, _ = await mgr.create_sandbox(images)
        await mgr.create_sandbox(images)
        with pytest.raises(ResourceExhausted, match="at most 2"):
            await mgr.create_sandbox(images.model_copy(update={"id": "third"}))
        assert "third" not in {s.id for s in mgr.list_sandboxes()}
        assert not (tmp_path / "data" / "sandboxes" / "third").exists()
        await mgr.remove_sandbox(a)
        await mgr.create_sandbox(images.model_copy(update={"id": "third"}))  # room again


async def test_total_guest_memory_is_bounded(tmp_path, images):
    async with manager(tmp_path, max_total_memory_mib=1000) as mgr:
        await mgr.create_sandbox(images.model_copy(update={"memory_mib": 600}))
        with pytest.raises(ResourceExhausted, match="1000 MiB"):
            await mgr.create_sandbox(images.model_copy(update={"memory_mib": 600}))
        await mgr.create_sandbox(images.model_copy(update={"memory_mib": 400}))


@pytest.mark.parametrize("update, match", [
    ({"memory_mib": 70000}, "per sandbox"),
    ({"vcpus": 9}, "vcpus"),
    ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
    ({"labels": {"k": "v" * 2000}}, "longer"),
    ({"env": {"A": "x" * 200_000}}, "env"),
    ({"boot_args": "console=ttyS0 " + "x" * 2000}, "boot_args"),
])
async def test_oversized_requests_are_invalid(tmp_path, images, update, match):
    async with manager(tmp_path) as mgr:
        with pytest.raises(InvalidArgument, match=match):
            await mgr.create_sandbox(images.model_copy(update=update))
        assert mgr.list_sandboxes() == []


def test_exec_timeouts_have_a_documented_maximum():
    from arcbox_vm.models import MAX_EXEC_TIMEOUT_S, ExecSpec

    assert ExecSpec(["true"], timeout_seconds=MAX_EXEC_TIMEOUT_S).timeout_seconds == MAX_EXEC_TIMEOUT_S
    for bad in (MAX_EXEC_TIMEOUT_S + 1, 2.0 ** 31, -1):
        with pytest.raises(ValueError, match="timeout_seconds"):
            ExecSpec(["true"], timeout_seconds=bad)
    with pytest.raises(ValueError, match="non-empty"):
        ExecSpec([])
    with pytest.raises(ValueError, match="tty_size"):
        ExecSpec(["sh"], tty=True, tty_size=(0, 24))
