"""Folding an output stream into a RunResult — shared by the async and the sync API.

Kept free of I/O so both APIs feed it from their own loop: the async client from its
async iterator, the sync client from the same stream driven on its loop thread, so that
sync callbacks run in the caller's thread (a callback may then call the client again
without deadlocking the loop).
"""

from __future__ import annotations

from arcbox_vm.client.errors import CommandError
from arcbox_vm.client.types import Output, OutputCallback, RunResult

__all__ = ["OutputCollector"]


class OutputCollector:
    """Accumulates stdout/stderr (unless a callback takes a stream) and the final status."""

    def __init__(self, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None,
                 *, keep: bool = True) -> None:
        """keep=False drops output that no callback takes (a caller streaming huge output
        does not want it held in memory twice)."""
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._buffers = {"stdout": bytearray(), "stderr": bytearray()}
        self._keep = keep
        self._final: Output | None = None

    @property
    def finished(self) -> bool:
        return self._final is not None

    def feed(self, out: Output) -> object:
        """Take one message; returns what the stream's callback returned (an awaitable from
        an async callback, which the async caller awaits)."""
        if out.stream in ("stdout", "stderr"):
            callback = self._callbacks[out.stream]
            if self._keep:
                self._buffers[out.stream] += out.data
            if callback is not None and out.data:
                return callback(out.data)
            return None
        if out.stream in ("exit", "error"):
            self._final = out
        return None

    def result(self) -> RunResult:
        """The result; raises CommandError if the stream ended with "error" or without a
        final message (the daemon went away mid-command)."""
        stdout, stderr = bytes(self._buffers["stdout"]), bytes(self._buffers["stderr"])
        final = self._final
        if final is None:
            raise CommandError("the output stream ended without an exit status (the daemon or the VM went away)",
                               stdout, stderr)
        if final.stream == "error":
            reason = final.data.decode(errors="replace") or "the command ended without an exit status"
            raise CommandError(reason, stdout, stderr)
        return RunResult(stdout=stdout, stderr=stderr, exit_code=final.exit_code, timed_out=final.timed_out)
