"""The start of an agent channel: the Unix socket the VMM connects to, and the handshake.

The agent dials the host (the host listens first, so there is no connect race). On a
fresh stream the agent says HELLO with its protocol version; the host checks it (and
every field of it, see `limits.check_hello`), answers HELLO_ACK and hands the stream to
an `AgentConnection`.

One VM has one agent connection: while the one `accept` returned is alive, further
connections are closed at once; while none is (booting, re-adopting, or after the live
one dropped) at most `MAX_WAITING` wait to be accepted and the rest are closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from arcbox_vm.agent import protocol as p
from arcbox_vm.agent.host import limits
from arcbox_vm.agent.host.channels import READ_SIZE
from arcbox_vm.agent.host.connection import AgentConnection, _hello_ack
from arcbox_vm.errors import AgentDisconnected, AgentError, BootFailed

log = logging.getLogger(__name__)

MAX_WAITING = 2  # connections that may wait for `accept` (a QEMU chardev reconnect, a re-dial); more are closed


HELLO_AGAIN_EVERY_S = 0.5


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    hello_again: bool = False) -> AgentConnection:
    """Wait for the agent's HELLO on a fresh stream, check its version and fields, acknowledge it.

    `hello_again`: the agent may not know this stream is new (a VM restored from a
    snapshot keeps its old one open): ask for HELLO (HELLO_AGAIN) until it comes."""
    decoder = p.FrameDecoder()
    while True:
        if hello_again:
            writer.write(p.encode_frame(p.MsgType.HELLO_AGAIN, 0))
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), HELLO_AGAIN_EVERY_S)
            except asyncio.TimeoutError:
                continue
        else:
            data = await reader.read(READ_SIZE)
        if not data:
            raise AgentDisconnected("the channel closed before the guest agent said HELLO")
        items = decoder.feed(data)
        for i, item in enumerate(items):
            if isinstance(item, p.DecodeError) or item.type != p.MsgType.HELLO:
                continue  # noise before HELLO (e.g. a stale partial frame) is skipped
            try:
                hello = item.json()
            except p.ProtocolError:
                continue
            proto = hello.get("proto")
            if not isinstance(proto, int) or isinstance(proto, bool) or proto not in p.SUPPORTED_VERSIONS:
                shown = limits.clean_text(repr(proto), 40)
                writer.write(p.encode_error(0, p.ErrorCode.VERSION,
                                            f"host supports protocol {sorted(p.SUPPORTED_VERSIONS)}, agent sent {shown}"))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.drain(), limits.SEND_TIMEOUT)
                raise AgentError(
                    f"the guest agent speaks protocol {shown}, this host supports {sorted(p.SUPPORTED_VERSIONS)}: "
                    "rebuild the image (`arcbox-vm image build`) or re-inject the agent", code="version")
            try:
                hello = limits.check_hello(hello)
            except p.ProtocolError as exc:
                writer.write(p.encode_error(0, p.ErrorCode.BAD_REQUEST, f"HELLO refused: {exc.message}"))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.drain(), limits.SEND_TIMEOUT)
                raise AgentError(f"the guest agent's HELLO is malformed ({exc.message}); refused",
                                 code=limits.VIOLATION) from None
            writer.write(_hello_ack())
            await asyncio.wait_for(writer.drain(), limits.SEND_TIMEOUT)
            # frames that arrived in the same read as HELLO are the connection's first ones
            return AgentConnection(reader, writer, hello, decoder, pending=items[i + 1:])


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


class AgentListener:
    """Listens on the endpoint's Unix socket and yields the agent's connection.

    Bind it *before* starting the VMM: the VMM connects to it (QEMU as a chardev client,
    Firecracker when the guest dials its vsock port).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self._live: AgentConnection | None = None  # the connection `accept` returned last
        self.refused = 0  # connections closed at once (one agent connection per VM)
        self._log = limits.LogLimiter(log)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._on_connect, path=str(self.path),
                                                       limit=READ_SIZE * 2)
        # The socket takes its directory's group: a directory given to a VMM's group (a
        # confined QEMU's, a jailed Firecracker's) lets that VMM, and only it, connect —
        # also to a listener bound again after a daemon restart.
        group = os.stat(self.path.parent).st_gid
        if group != os.getegid():
            os.chown(self.path, -1, group)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        live = self._live
        if live is not None and not live.closed.done():
            why = "the agent is connected already"
        elif self._conns.qsize() >= MAX_WAITING:
            why = f"{MAX_WAITING} connections wait already"
        else:
            self._conns.put_nowait((reader, writer))
            return
        self.refused += 1
        _abort(writer)
        self._log(logging.WARNING, "closed an extra connection to the agent socket %s: %s (%d so far)",
                  self.path.name, why, self.refused)

    async def accept(self, timeout: float, vmm_exit: asyncio.Future[Any] | None = None,
                     describe_exit: Any = None, hello_again: bool = False) -> AgentConnection:
        """Wait for a connection whose agent says HELLO; fail fast if the VMM exits.
        `hello_again`: ask for it (see `handshake`), for a VM restored from a snapshot."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BootFailed(f"the guest agent did not say HELLO within {timeout:.0f} s; "
                                 "see the VM console log for why")
            get = asyncio.ensure_future(self._conns.get())
            waiters: set[asyncio.Future[Any]] = {get}
            if vmm_exit is not None:
                waiters.add(vmm_exit)
            try:
                done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                get.cancel()  # else a pending task is destroyed with the loop
                raise
            if get not in done:
                get.cancel()
                if vmm_exit is not None and vmm_exit in done:
                    raise BootFailed(describe_exit() if callable(describe_exit) else "the VMM exited during boot")
                continue
            reader, writer = get.result()
            hs = asyncio.ensure_future(handshake(reader, writer, hello_again))
            waiters = {hs} | ({vmm_exit} if vmm_exit is not None else set())
            done, _ = await asyncio.wait(waiters, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if hs in done:
                try:
                    conn = hs.result()
                except (TimeoutError, AgentDisconnected):
                    _abort(writer)
                    continue  # e.g. QEMU reconnecting; wait for the next connection
                except BaseException:
                    _abort(writer)
                    raise
                self._live = conn
                return conn
            hs.cancel()
            with contextlib.suppress(BaseException):
                await hs
            _abort(writer)
            if vmm_exit is not None and vmm_exit in done:
                raise BootFailed(describe_exit() if callable(describe_exit) else "the VMM exited during boot")

    async def close(self, unlink: bool = True) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        while not self._conns.empty():
            _, w = self._conns.get_nowait()
            _abort(w)
        self._log.flush()
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
