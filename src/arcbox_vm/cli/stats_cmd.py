"""`arcbox-vm stats` (resource use, like `docker stats`) and `arcbox-vm health` (the
daemon's gRPC health service; the systemd unit's readiness check).

stats: CPU % is computed here, from two samples of each sandbox's CPU seconds over the
time between them (the daemon's Stats RPC only reports counters). Without IDs it shows
every sandbox whose VM runs; sandboxes that go away drop out of the stream.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any, Optional

import typer

from arcbox_vm.cli.common import EXIT_ERROR, ConnectOptions, daemon_command, one_line
from arcbox_vm.errors import ArcboxError

if TYPE_CHECKING:
    from arcbox_vm.models import SandboxStats

__all__ = ["register"]

HEALTH_POLL_S = 0.2


def cpu_percent(before: "SandboxStats | None", now: "SandboxStats") -> float | None:
    """CPU use between two samples in % of one CPU (200 = two CPUs busy); None without an earlier one."""
    if before is None or now.timestamp_ns <= before.timestamp_ns:
        return None
    return max(0.0, now.cpu_seconds - before.cpu_seconds) / ((now.timestamp_ns - before.timestamp_ns) / 1e9) * 100


def stats_row(before: "SandboxStats | None", now: "SandboxStats") -> dict[str, Any]:
    percent = cpu_percent(before, now)
    return {"id": now.id, "state": str(now.state), "cpu_percent": None if percent is None else round(percent, 2),
            "cpu_seconds": round(now.cpu_seconds, 6), "memory_bytes": now.memory_bytes,
            "io_read_bytes": now.io_read_bytes, "io_write_bytes": now.io_write_bytes, "processes": now.processes,
            "source": now.source, "timestamp_ns": now.timestamp_ns}


@daemon_command
def stats(
    ids: Optional[list[str]] = typer.Argument(None, metavar="[ID...]",
                                              help="Sandboxes (default: every one whose VM runs)."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print one sample (CPU % over --interval) and exit."),
    json_out: bool = typer.Option(False, "--json", help="JSON: an array with --no-stream, else one object a line."),
    interval: float = typer.Option(1.0, "--interval", min=0.05, help="Seconds between samples."),
    *, conn: ConnectOptions,
) -> None:
    """Resource use of sandboxes, live: CPU %, memory, block I/O, processes (Ctrl-C stops)."""
    from rich.console import Console
    from rich.live import Live

    from arcbox_vm.cli.output import print_json, print_json_line, stats_table

    wanted = list(ids or [])
    console = Console(highlight=False)
    live = Live(console=console, auto_refresh=False) if console.is_terminal and not no_stream and not json_out \
        else None

    def show(rows: list[dict[str, Any]]) -> None:
        if json_out:
            if no_stream:
                print_json(rows)
            else:
                for row in rows:
                    print_json_line(row)
        elif live is not None:
            live.update(stats_table(rows), refresh=True)
        else:
            console.print(stats_table(rows))
            if not no_stream:
                console.print()

    async def main() -> None:
        async with conn.client() as client:
            sample = await client.stats(wanted)  # unknown ids fail here
            while True:
                before = {s.id: s for s in sample}
                await asyncio.sleep(interval)
                sample = await client.stats()  # then: whatever still runs
                if wanted:
                    sample = [s for s in sample if s.id in set(wanted)]
                show([stats_row(before.get(s.id), s) for s in sample])
                if no_stream:
                    return

    try:
        if live is not None:
            with live:
                asyncio.run(main())
        else:
            asyncio.run(main())
    except KeyboardInterrupt:
        if no_stream:
            raise
        raise typer.Exit(0) from None


@daemon_command
def health(
    wait: bool = typer.Option(False, "--wait", help="Wait until the daemon is SERVING (start-up scripts, systemd)."),
    timeout: float = typer.Option(60.0, "--timeout", min=0, help="With --wait: give up after S seconds."),
    service: str = typer.Option("", "--service", help="Health service name (\"\" = the daemon as a whole)."),
    *, conn: ConnectOptions,
) -> None:
    """Print the daemon's health status (gRPC health checking): exit 0 if SERVING, else 1."""
    async def check() -> str:
        async with conn.client() as client:  # a new channel each time: no reconnect back-off while waiting
            return await client.health(service, timeout=5.0)

    async def main() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                status, why = await check(), ""
            except ArcboxError as exc:
                if not wait:
                    raise
                status, why = "UNAVAILABLE", one_line(exc)
            if status == "SERVING" or not wait or loop.time() >= deadline:
                return status, why
            await asyncio.sleep(HEALTH_POLL_S)

    status, why = asyncio.run(main())
    print(status, flush=True)
    if status != "SERVING":
        if why:
            sys.stderr.write(f"arcbox-vm: {why}\n")
        raise typer.Exit(EXIT_ERROR)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
    app.command("health")(health)
