"""A small QMP client: QEMU's JSON monitor on a per-VM Unix socket.

QEMU is started with `-qmp unix:<sockdir>/qmp.sock,server=on,wait=off` (see cmdline.py)
and accepts one monitor client at a time. Each operation opens a connection, negotiates
capabilities (`qmp_capabilities`), runs its commands and closes it: operations on one VM
are serialised by the manager, and a connection per operation leaves nothing to re-sync
after a daemon restart (the socket path is derived from the sandbox's socket directory).

Replies are matched by an `id` we send; asynchronous events in between are collected
(`events`) and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from arcbox_vm.errors import VmmError

QMP_SOCKET = "qmp.sock"  # in the VM's socket directory
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 60.0


class QmpError(VmmError):
    """QEMU refused a monitor command (`cls` is QMP's error class)."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.cls = cls
        self.desc = desc


class Qmp:
    """One monitor connection. Use `async with Qmp.connect(path) as qmp:`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path, timeout: float = CONNECT_TIMEOUT_S):  # noqa: ANN206
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=1 << 20), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise VmmError(f"cannot reach QEMU's monitor at {path}: {exc or 'timed out'}") from None
        qmp = cls(reader, writer)
        try:
            greeting = await qmp._read(timeout)
            if "QMP" not in greeting:
                raise VmmError(f"QEMU's monitor at {path} did not greet with QMP: {str(greeting)[:200]}")
            await qmp.execute("qmp_capabilities")
            yield qmp
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, timeout: float) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except asyncio.TimeoutError:
            raise VmmError(f"QEMU's monitor did not answer within {timeout:.0f} s") from None
        if not line:
            raise VmmError("QEMU's monitor closed the connection (QEMU exited?)")
        try:
            msg = json.loads(line)
        except ValueError:
            raise VmmError(f"QEMU's monitor sent something that is not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise VmmError(f"QEMU's monitor sent an unexpected message: {line[:200]!r}")
        return msg

    async def execute(self, command: str, timeout: float = COMMAND_TIMEOUT_S, **arguments: Any) -> Any:
        """Run one command; returns its `return` value or raises QmpError."""
        ident, data = self._message(command, arguments)
        self._writer.write(data)
        await self._writer.drain()
        return await self._reply(command, ident, timeout)

    async def pass_fd(self, name: str, fd: int, timeout: float = COMMAND_TIMEOUT_S) -> None:
        """Hand QEMU a descriptor under `name` (`getfd`, the descriptor in the message's
        SCM_RIGHTS), e.g. for `migrate "fd:<name>"`: QEMU writes or reads it without
        opening any file itself."""
        ident, data = self._message("getfd", {"fdname": name})
        await self._writer.drain()  # nothing of ours may be queued ahead of this message
        transport_sock = self._writer.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(transport_sock.fileno()))  # the same connection
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                try:
                    sent = socket.send_fds(sock, [data], [fd])
                    break
                except BlockingIOError:
                    if loop.time() > deadline:
                        raise VmmError("QEMU's monitor does not take the descriptor") from None
                    await asyncio.sleep(0.01)
            if sent != len(data):  # a short write of a few dozen bytes: finish it without the fd
                self._writer.write(data[sent:])
                await self._writer.drain()
        finally:
            sock.close()
        await self._reply("getfd", ident, timeout)

    def _message(self, command: str, arguments: dict[str, Any]) -> tuple[int, bytes]:
        ident = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        return ident, json.dumps(msg).encode() + b"\n"

    async def _reply(self, command: str, ident: int, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reply = await self._read(max(0.01, deadline - loop.time()))
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != ident:
                continue  # e.g. the capabilities reply of a command we gave up on
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QmpError(command, str(err.get("class", "")), str(err.get("desc", reply["error"])))
            return reply.get("return")

    async def status(self) -> str:
        """The VM's run state: "running", "paused", "postmigrate", "inmigrate", ..."""
        return str((await self.execute("query-status")).get("status", ""))

    async def wait_migration(self, timeout: float = COMMAND_TIMEOUT_S, poll: float = 0.02) -> dict[str, Any]:
        """Poll `query-migrate` until the migration (either direction) completed; raises
        VmmError when it failed or did not finish within `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status", "")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise VmmError(f"QEMU's migration {status}: {info.get('error-desc', 'no reason given')}")
            if loop.time() > deadline:
                raise VmmError(f"QEMU's migration did not complete within {timeout:.0f} s (status {status!r})")
            await asyncio.sleep(poll)
