"""SandboxSnapshotService through the daemon, the Python client and the CLI, over the
local VMM test double with fake snapshots: checkpoint, restore, list, delete, fork,
pause, resume, and the errors a client sees."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from arcbox_vm.client import AsyncClient
from arcbox_vm.errors import CheckpointNotFound, InvalidState, SandboxAlreadyExists
from tests.support.local_snapshots import SnapshotLocalDriver
from tests.unit import test_daemon_local
from tests.unit.test_daemon_local import daemon_factory  # noqa: F401
from tests.unit.test_import_hygiene import SOURCE_ROOT


@pytest.fixture(autouse=True)
def _snapshot_driver(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setattr(test_daemon_local, "LocalDriver", SnapshotLocalDriver)
    monkeypatch.setenv("ARCBOX_VM_MEMORY_DIR", str(tmp_path / "shm"))


async def cli(socket: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCBOX_VM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "arcbox_vm.cli.main", *args, "--socket", socket,
                                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_snapshot_rpcs_through_the_client(daemon_factory) -> None:  # noqa: F811
    d = await daemon_factory().start()
    async with AsyncClient(d.socket) as client:
        await client.create(id="src", network="none", env={"A": "1"})
        await client.wait_ready("src", 15)
        ck = await client.checkpoint("src", "one")
        assert ck.sandbox_id == "src" and ck.name == "one" and ck.created_at > 0
        r = await client.restore(ck.snapshot_id, id="r1", labels={"x": "y"}, env={"B": "2"})
        info = await client.wait_ready(r.id, 15)
        assert info.labels == {"x": "y"}
        assert (await client.run("r1", ["sh", "-c", "echo $A$B"])).stdout == b"12\n"
        [listed] = await client.list_checkpoints()
        assert listed.snapshot_id == ck.snapshot_id and listed.in_use == 1
        assert await client.list_checkpoints("r1") == []
        with pytest.raises(SandboxAlreadyExists):
            await client.restore(ck.snapshot_id, id="r1")
        with pytest.raises(CheckpointNotFound):
            await client.restore("nope")

        clones = await client.fork("src", 2)
        assert len(clones) == 2
        for c in clones:
            assert (await client.run(c.id, ["true"])).exit_code == 0

        await client.pause("src")
        assert str((await client.inspect("src")).state) == "paused"
        with pytest.raises(InvalidState, match="resume it first"):
            await client.run("src", ["true"])
        await client.resume("src")
        assert (await client.run("src", ["true"])).exit_code == 0

        await client.delete_checkpoint(ck.snapshot_id)
        with pytest.raises(CheckpointNotFound):
            await client.delete_checkpoint(ck.snapshot_id)
        assert await client.list_checkpoints() == []
        for sid in ["src", "r1", *(c.id for c in clones)]:
            d.tree(sid)
    await d.stop()


async def test_snapshot_cli(daemon_factory) -> None:  # noqa: F811
    d = await daemon_factory().start()
    sock = str(d.socket)
    async with AsyncClient(d.socket) as client:
        await client.create(id="src", network="none")
        await client.wait_ready("src", 15)
        d.tree("src")
    code, out, err = await cli(sock, "checkpoint", "src", "first")
    assert code == 0, err
    snapshot_id = out.strip()
    code, out, err = await cli(sock, "snapshot", "ls", "--json")
    assert code == 0 and [c["snapshot_id"] for c in json.loads(out)] == [snapshot_id], err
    code, out, err = await cli(sock, "restore", snapshot_id, "--id", "r", "-l", "k=v", "--ttl", "600", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "ready"
    code, out, err = await cli(sock, "fork", "src", "-n", "2")
    assert code == 0 and len(out.split()) == 2, err
    code, out, err = await cli(sock, "pause", "src", "--to-disk")
    assert code == 0 and out.strip() == "src", err
    code, out, err = await cli(sock, "resume", "src")
    assert code == 0, err
    code, out, err = await cli(sock, "snapshot", "rm", snapshot_id, "no-such")
    assert code == 1 and out.split() == [snapshot_id] and "no-such" in err
    code, out, err = await cli(sock, "restore", "no-such")
    assert code == 1 and "no checkpoint with id 'no-such'" in err
    for s in d.manager.list_sandboxes():
        d.tree(s.id)
    await d.stop()
