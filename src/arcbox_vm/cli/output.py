"""How daemon commands print: JSON for scripts, rich tables and event lines for people.

JSON goes to stdout with plain `print` (never through rich, which would wrap or colour
it); tables use rich only when stdout is a terminal-like console and otherwise fall back
to rich's plain rendering, so `ls | grep` keeps working.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table

from arcbox_vm.models import ExecInfo, SandboxEvent, SandboxSummary

__all__ = ["event_line", "jsonable", "print_json", "print_json_line", "relative_time", "sandbox_table"]


def jsonable(value: Any) -> Any:
    """Dataclasses, enums and containers → JSON-ready values (enums as their string)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """Indented JSON document on stdout."""
    sys.stdout.write(json.dumps(jsonable(value), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_listing(items: Sequence[Any], *, json_out: bool, quiet: bool, ident: Callable[[Any], str],
                  columns: Sequence[str], row: Callable[[Any], Sequence[str]]) -> None:
    """What an `ls` prints: a JSON array (--json), one identifier a line (--quiet), else a
    table of `columns`, one `row(item)` per item."""
    if json_out:
        print_json(list(items))
    elif quiet:
        sys.stdout.write("".join(f"{ident(item)}\n" for item in items))
        sys.stdout.flush()
    else:
        table = Table(box=None, pad_edge=False)
        for col in columns:
            table.add_column(col)
        for item in items:
            table.add_row(*row(item))
        Console(highlight=False).print(table)


def print_json_line(value: Any) -> None:
    """One compact JSON object per line (JSON Lines), flushed: for streams."""
    sys.stdout.write(json.dumps(jsonable(value), separators=(",", ":")) + "\n")
    sys.stdout.flush()


def relative_time(ts: float, now: float | None = None) -> str:
    """"12s ago", "5m ago", "3h ago", "2d ago" (Unix seconds; "-" when unset)."""
    if not ts:
        return "-"
    delta = max(0, int((now if now is not None else time.time()) - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta // size}{unit} ago"
    return f"{delta}s ago"


def sandbox_table(rows: Iterable[SandboxSummary], console: Console | None = None) -> None:
    """ID, STATE, IP, CREATED, LABELS. Ids are never shortened: on a narrow terminal the
    labels wrap instead, and piped output is not squeezed into 80 columns at all."""
    rows = list(rows)
    if console is None:
        probe = Console()
        console = Console(highlight=False, width=None if probe.is_terminal else 1000)
    table = Table(box=None, pad_edge=False, header_style="bold")
    id_width = max([len("ID")] + [len(s.id) for s in rows])
    table.add_column("ID", no_wrap=True, min_width=id_width)
    for name in ("STATE", "IP", "CREATED"):
        table.add_column(name, no_wrap=True)
    table.add_column("LABELS", overflow="fold")
    for s in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        table.add_row(s.id, str(s.state), s.ip_address or "-", relative_time(s.created_at), labels)
    console.print(table)


def exec_table(rows: Iterable[ExecInfo], console: Console | None = None) -> None:
    """EXEC ID, STATUS, EXIT, STARTED, COMMAND."""
    if console is None:
        probe = Console()
        console = Console(highlight=False, width=None if probe.is_terminal else 1000)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("EXEC ID", "STATUS", "EXIT", "STARTED"):
        table.add_column(name, no_wrap=True)
    table.add_column("COMMAND", overflow="fold")
    for e in rows:
        code = "-" if e.exit_code is None else str(e.exit_code)
        table.add_row(e.exec_id, e.status, code, relative_time(e.started_at), shlex.join(e.cmd))
    console.print(table)


def _iso(timestamp_ns: int) -> str:
    dt = datetime.fromtimestamp(timestamp_ns / 1e9, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def event_line(ev: SandboxEvent) -> str:
    """`2024-05-01T12:00:00.123Z  ready  ID  key=value ...` (docker events-like, greppable)."""
    attrs = " ".join(f"{k}={v}" for k, v in sorted(ev.attributes.items()))
    return f"{_iso(ev.timestamp_ns)}  {ev.action:<8} {ev.sandbox_id}" + (f"  {attrs}" if attrs else "")


def event_json(ev: SandboxEvent) -> dict[str, Any]:
    """The event plus a readable `time`, for JSON Lines output."""
    return {"id": ev.id, "sandbox_id": ev.sandbox_id, "action": ev.action, "timestamp_ns": ev.timestamp_ns,
            "time": _iso(ev.timestamp_ns), "attributes": dict(ev.attributes)}


__all__ += ["event_json"]


def human_bytes(n: float) -> str:
    """1536 → "1.5KiB" (binary units, as `docker stats` shows them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"  # pragma: no cover


def stats_table(rows: Iterable[dict[str, Any]]) -> Table:
    """ID, STATE, CPU %, MEM, BLOCK I/O (read / written), PIDS (rows as `arcbox-vm stats --json` has them)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("ID", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    for name in ("CPU %", "MEM", "BLOCK I/O", "PIDS"):
        table.add_column(name, no_wrap=True, justify="right")
    for r in rows:
        cpu = "--" if r["cpu_percent"] is None else f"{r['cpu_percent']:.2f}%"
        io = f"{human_bytes(r['io_read_bytes'])} / {human_bytes(r['io_write_bytes'])}"
        table.add_row(r["id"], r["state"], cpu, human_bytes(r["memory_bytes"]), io, str(r["processes"]))
    return table


__all__ += ["human_bytes", "stats_table"]
