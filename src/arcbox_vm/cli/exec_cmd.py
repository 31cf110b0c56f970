"""`arcbox-vm exec [OPTIONS] ID -- CMD...`: a command in a running sandbox, docker-style.

Without -i the command gets no stdin (Run RPC); with -i this process's stdin is forwarded
(Exec RPC) and closed at EOF; -t runs it on a pseudo-terminal (size = this terminal's),
and -it also puts this terminal in raw mode and follows its size (SIGWINCH).

Output goes to this process's stdout/stderr as it arrives. Exit code: the command's;
124 if --timeout killed it; 126 if it cannot be executed; 127 if not found; 1 for other
errors (unknown sandbox, daemon unreachable, the VM died mid-command); 130 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
from collections.abc import Mapping

from arcbox_vm.cli.common import EXIT_ERROR, ConnectOptions, fail
from arcbox_vm.cli.tty import on_resize, raw_mode, stdin_chunks, terminal_size
from arcbox_vm.client.aio_exec import AsyncExecSession
from arcbox_vm.client.types import RunResult
from arcbox_vm.errors import AgentError, ArcboxError, ExecError

__all__ = ["EXIT_CANNOT_EXECUTE", "EXIT_NOT_FOUND", "EXIT_TIMED_OUT", "exec_command"]

EXIT_TIMED_OUT = 124
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


def write_all(fd: int, data: bytes) -> None:
    """Write everything (os.write may write less; a non-blocking fd may say EAGAIN)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def _to_stdout(data: bytes) -> None:
    write_all(1, data)


def _to_stderr(data: bytes) -> None:
    write_all(2, data)


async def _forward_stdin(session: AsyncExecSession) -> None:
    """Local stdin → the command, then EOF. Stops quietly once the command has ended."""
    with contextlib.suppress(AgentError):
        async for chunk in stdin_chunks(0):
            await session.write(chunk)
        await session.close_stdin()


async def _drive(session: AsyncExecSession, *, forward_stdin: bool, tty: bool) -> RunResult:
    """Print the session's output as it comes, optionally feeding it this process's stdin
    (and, with a terminal, raw mode and size changes); leaving early (error, Ctrl-C) cancels
    the stream — the daemon kills a command started here, and only detaches an attached one."""
    def resized() -> None:
        new = terminal_size()
        if new is not None and not session.finished:
            task = asyncio.ensure_future(session.resize(*new))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors: session ending

    async with session:
        resize_ctx = on_resize(resized) if tty and terminal_size() is not None else contextlib.nullcontext()
        with raw_mode(0) if tty else contextlib.nullcontext(), resize_ctx:
            pump = asyncio.create_task(_forward_stdin(session)) if forward_stdin else None
            try:
                return await session.wait(on_stdout=_to_stdout, on_stderr=_to_stderr)
            finally:
                if pump is not None:
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ArcboxError):
                        await pump


async def _exec(conn: ConnectOptions, sandbox_id: str, argv: list[str], env: Mapping[str, str], workdir: str,
                user: str, timeout: float, interactive: bool, tty: bool) -> RunResult:
    async with conn.client() as client:
        if interactive:
            session = await client.exec(sandbox_id, argv, env=env, working_dir=workdir, user=user, tty=tty,
                                        tty_size=terminal_size() if tty else None, timeout=timeout)
            return await _drive(session, forward_stdin=True, tty=tty)
        return await client.run(sandbox_id, argv, env=env, working_dir=workdir, user=user, tty=tty,
                                tty_size=terminal_size() if tty else None, timeout=timeout,
                                on_stdout=_to_stdout, on_stderr=_to_stderr)


async def _attach(conn: ConnectOptions, sandbox_id: str, exec_id: str, interactive: bool) -> RunResult:
    async with conn.client() as client:
        return await _drive(await client.attach(sandbox_id, exec_id), forward_stdin=interactive, tty=False)


def _exit_code(result: RunResult, timed_out_msg: str) -> int:
    """The CLI's exit code for a finished command (see the module docstring)."""
    if result.timed_out:
        sys.stderr.write(f"arcbox-vm: the command timed out{timed_out_msg} and was killed\n")
        return EXIT_TIMED_OUT
    return result.exit_code if result.exit_code >= 0 else EXIT_ERROR


def attach_command(conn: ConnectOptions, sandbox_id: str, exec_id: str, interactive: bool) -> int:
    """Attach to a background or detached command; returns its exit code for the CLI."""
    return _exit_code(asyncio.run(_attach(conn, sandbox_id, exec_id, interactive)), "")


def exec_command(conn: ConnectOptions, sandbox_id: str, argv: list[str], env: Mapping[str, str], workdir: str,
                 user: str, timeout: float, interactive: bool, tty: bool) -> int:
    """Run it; returns the exit code for the CLI (see the module docstring)."""
    try:
        result = asyncio.run(_exec(conn, sandbox_id, argv, env, workdir, user, timeout, interactive, tty))
    except ExecError as exc:
        if exc.code in ("not_found", "permission"):
            fail(exc, EXIT_NOT_FOUND if exc.code == "not_found" else EXIT_CANNOT_EXECUTE)
        raise
    return _exit_code(result, f" after {timeout:g} s")
