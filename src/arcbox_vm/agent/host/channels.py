"""The interface between the connection and the handlers of its channels.

The connection (`connection.py`) owns the byte stream and a `ChannelTable`; each exec
session or file transfer is a `ChannelHandler` registered there under its channel number.
The connection delivers a channel's frames to `_on_frame` and, when the stream ends,
calls `_on_disconnect` on every handler still registered. A handler talks back only
through a `ChannelHost`: it sends frames and hands its channel back when it is done. So
the handler modules need neither the connection's class nor its internals.
"""

from __future__ import annotations

from typing import Protocol

from arcbox_vm.agent import protocol as p

READ_SIZE = 256 * 1024  # bytes asked of the stream per read


class ChannelHandler(Protocol):
    """What the connection delivers one channel's frames to."""

    channel: int

    def _on_frame(self, frame: p.Frame) -> None:
        """A frame from the guest on this channel. Raising ProtocolError (a malformed frame,
        a value out of range) or ProtocolViolation ends this channel: the connection
        unregisters the handler, calls `_on_disconnect` with a ProtocolViolation and tells
        the guest with an ERROR; other channels and the connection go on."""

    def _on_disconnect(self, exc: BaseException) -> None:
        """The stream ended (or was given up); `exc` says why."""


class ChannelHost(Protocol):
    """The thing handlers send frames through and give their channel back to (the connection)."""

    async def send_frame(self, data: bytes) -> None:
        """Send encoded frames, waiting for the stream to drain; AgentDisconnected when it is
        gone (or when the guest does not take them within the connection's send deadline)."""

    def send_frame_nowait(self, data: bytes) -> None:
        """Queue a small frame without waiting (cleanup); nothing happens once the stream is gone."""

    def release_channel(self, handler: ChannelHandler) -> None:
        """Unregister `handler` if it is still the one registered on its channel."""


class ChannelTable:
    """Channel number → its handler: the only state the connection and handlers share."""

    def __init__(self) -> None:
        self._handlers: dict[int, ChannelHandler] = {}

    def add(self, handler: ChannelHandler) -> None:
        self._handlers[handler.channel] = handler

    def get(self, channel: int) -> ChannelHandler | None:
        return self._handlers.get(channel)

    def remove(self, handler: ChannelHandler) -> None:
        """Unregister `handler`; a newer handler on the same channel number is left alone."""
        if self._handlers.get(handler.channel) is handler:
            del self._handlers[handler.channel]

    def handlers(self) -> list[ChannelHandler]:
        """A snapshot (handlers unregister themselves while being told of a disconnect)."""
        return list(self._handlers.values())

    def __contains__(self, channel: object) -> bool:
        return channel in self._handlers

    def __len__(self) -> int:
        return len(self._handlers)

    def __repr__(self) -> str:
        return f"ChannelTable({sorted(self._handlers)})"
