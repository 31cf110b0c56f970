"""The storage ports: the state database, and per-sandbox disk copies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class StoredEvent:
    id: int
    sandbox_id: str
    action: str
    timestamp_ns: int
    attributes: dict[str, str]


class StateStore(Protocol):
    """Durable state: sandbox records, IP leases, exec sessions, checkpoints, templates and
    their layer cache, the event log.

    Every write either commits or raises `StateError` (nothing half-written)."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def put_sandbox(self, rec: dict[str, Any], lease_ip: str | None = None) -> None: ...

    def delete_sandbox(self, sandbox_id: str) -> None: ...

    def rename_sandbox(self, old_id: str, rec: dict[str, Any], lease_ip: str | None = None) -> None:
        """Replace the record `old_id` (its lease and commands too) by `rec`, atomically."""

    def put_checkpoint(self, row: dict[str, Any]) -> None: ...

    def delete_checkpoint(self, checkpoint_id: str) -> None: ...

    def checkpoints(self) -> list[dict[str, Any]]: ...

    def sandboxes(self) -> list[dict[str, Any]]: ...

    def put_template(self, row: dict[str, Any]) -> None: ...

    def delete_template(self, name: str) -> None: ...

    def templates(self) -> list[dict[str, Any]]: ...

    def put_layer(self, row: dict[str, Any]) -> None: ...

    def touch_layer(self, key: str) -> None: ...

    def delete_layer(self, key: str) -> None: ...

    def layers(self) -> list[dict[str, Any]]: ...

    def layer(self, key: str) -> dict[str, Any] | None: ...

    def append_event(self, sandbox_id: str, action: str, attributes: dict[str, str],
                     keep: int | None = None) -> StoredEvent: ...

    def events_since(self, after_id: int, limit: int = 1000) -> list[StoredEvent]: ...

    def iter_events_since(self, after_id: int) -> Iterator[StoredEvent]: ...

    def last_event_id(self) -> int: ...

    def first_event_id(self) -> int: ...

    def put_exec(self, sandbox_id: str, channel: int, argv: list[str]) -> None: ...

    def finish_exec(self, sandbox_id: str, channel: int, exit_code: int | None, status: str) -> None: ...

    def set_exec_status(self, sandbox_id: str, channel: int, status: str) -> None: ...

    def max_exec_channel(self, sandbox_id: str) -> int: ...

    def execs(self, sandbox_id: str | None = None, status: str | tuple[str, ...] | None = None,
              channel: int | None = None) -> list[dict[str, Any]]: ...


# Makes `dst` a private, writable copy of the base image `src` (never writes `src`).
DiskCloner = Callable[[Path, Path], Awaitable[None]]

# Grows an ext4 image (not in use) and its file system to a size in MiB (never shrinks).
DiskGrower = Callable[[Path, int], Awaitable[None]]
