"""Fixtures for the Firecracker contract tests (fake firecracker/jailer, VM inputs)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


_FAKE_VARS = (
    "FAKE_FC_ROOT",
    "FAKE_FC_RECORD",
    "FAKE_FC_FAIL",
    "FAKE_FC_EXIT_AT_START",
    "FAKE_FC_STARTUP_DELAY",
    "FAKE_FC_NO_GUEST",
    "FAKE_FC_DIE_ON",
    "FAKE_FC_ARGV_FILE",
    "FAKE_FC_HOME",
    "FAKE_JAILER_ARGV_FILE",
    "FAKE_JAILER_ALLOW_CGROUPS",
)


@dataclass
class FakeEnv:
    """Controls the fake `firecracker` processes the driver spawns (through the environment)."""

    monkeypatch: pytest.MonkeyPatch
    record: Path
    argv_file: Path
    jailer_argv_file: Path
    failures: list[dict[str, Any]] = field(default_factory=list)

    def requests(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def calls(self) -> list[str]:
        return [f"{r['method']} {r['path']}" for r in self.requests()]

    def fail(self, method: str, path: str, **kw: Any) -> None:
        self.failures.append({"method": method, "path": path, **kw})
        self.monkeypatch.setenv("FAKE_FC_FAIL", json.dumps(self.failures))

    def set(self, name: str, value: str) -> None:
        self.monkeypatch.setenv(name, value)

    def argv(self) -> list[str]:
        return json.loads(self.argv_file.read_text())

    def jailer_argv(self) -> list[str]:
        return json.loads(self.jailer_argv_file.read_text())


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeEnv:
    for var in _FAKE_VARS:
        monkeypatch.delenv(var, raising=False)
    # the fake executables run `/usr/bin/env python3`: make that the test interpreter
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env = FakeEnv(monkeypatch, tmp_path / "requests.jsonl", tmp_path / "fc-argv.json", tmp_path / "jailer-argv.json")
    monkeypatch.setenv("FAKE_FC_RECORD", str(env.record))
    monkeypatch.setenv("FAKE_FC_ARGV_FILE", str(env.argv_file))
    monkeypatch.setenv("FAKE_JAILER_ARGV_FILE", str(env.jailer_argv_file))
    return env


@pytest.fixture
def short_dir() -> Path:
    """A short directory path (Unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="fct", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class VmFiles:
    kernel: Path
    initrd: Path
    rootfs: Path
    workdir: Path


@pytest.fixture
def vm_files(short_dir: Path) -> VmFiles:
    images = short_dir / "img"
    images.mkdir()
    kernel = images / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake kernel")
    kernel.chmod(0o644)
    initrd = images / "initrd.img"
    initrd.write_bytes(b"070701 fake initrd")
    initrd.chmod(0o644)
    rootfs = short_dir / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    workdir = short_dir / "vm"
    workdir.mkdir()
    return VmFiles(kernel, initrd, rootfs, workdir)


class AgentSink:
    """The host side of the agent endpoint: a Unix listener that collects what the guest sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray()
        self.connected = asyncio.Event()
        self.got_data = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> AgentSink:
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connected.set()
        while chunk := await reader.read(65536):
            self.data += chunk
            self.got_data.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        if self.path.exists():
            self.path.unlink()


@pytest.fixture
async def agent_sink_factory():
    sinks: list[AgentSink] = []

    async def make(path: Path) -> AgentSink:
        sink = await AgentSink(path).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.close()
