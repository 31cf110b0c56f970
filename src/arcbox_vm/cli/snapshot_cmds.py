"""Snapshot commands (through the daemon):

    checkpoint ID NAME            save a sandbox's memory, device state and disk (it runs on)
    restore SNAPSHOT [-l K=V] [--ttl N]   a new sandbox from a checkpoint; prints its id
    snapshot ls [--sandbox ID]    list checkpoints
    snapshot rm SNAPSHOT...       delete checkpoints (their running restores keep going)
    fork ID -n N                  N running clones; prints their ids
    pause ID [--to-disk]          stop running the guest (to disk: free its memory too)
    resume ID                     run it again
"""

from __future__ import annotations

import asyncio
from typing import Optional

import typer

from arcbox_vm.cli.common import ConnectOptions, daemon_command, for_each
from arcbox_vm.cli.parsing import parse_env, parse_labels

__all__ = ["register"]

snapshot_app = typer.Typer(no_args_is_help=True, help="List and delete checkpoints (snapshots).")


def _print(result: object, json_out: bool, line: str) -> None:
    if json_out:
        from arcbox_vm.cli.output import print_json

        print_json(result)
    else:
        print(line, flush=True)


@daemon_command
def checkpoint(
    id: str = typer.Argument(..., metavar="ID"),
    name: str = typer.Argument("", metavar="NAME"),
    json_out: bool = typer.Option(False, "--json", help="Print the checkpoint as JSON."),
    *, conn: ConnectOptions,
) -> None:
    """Checkpoint a sandbox (memory, device state, disk); it keeps running. Prints the snapshot id."""

    async def main():  # noqa: ANN202
        async with conn.client() as client:
            return await client.checkpoint(id, name)

    info = asyncio.run(main())
    _print(info, json_out, info.snapshot_id)


@daemon_command
def restore(
    snapshot: str = typer.Argument(..., metavar="SNAPSHOT"),
    id: Optional[str] = typer.Option(None, "--id", help="Sandbox id (default: a new UUID)."),
    label: list[str] = typer.Option([], "--label", "-l", help="KEY=VALUE label (repeatable)."),
    ttl: int = typer.Option(0, "--ttl", min=0, help="Remove the sandbox this many seconds after it is ready."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE over the checkpointed sandbox's env."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until it is ready (else return at once)."),
    timeout: float = typer.Option(120.0, "--timeout", min=0, help="With --wait: give up after S seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print {id, state, ip_address} as JSON."),
    *, conn: ConnectOptions,
) -> None:
    """Restore a checkpoint as a new sandbox (own id, IP and disk); prints its id."""

    async def main() -> dict[str, str]:
        async with conn.client() as client:
            created = await client.restore(snapshot, id=id, labels=parse_labels(label), ttl_seconds=ttl,
                                           env=parse_env(env))
            out = {"id": created.id, "state": created.state, "ip_address": created.ip_address}
            if wait:
                info = await client.wait_ready(created.id, timeout or None)
                out["state"] = str(info.state)
            return out

    result = asyncio.run(main())
    _print(result, json_out, result["id"])


@daemon_command
def fork(
    id: str = typer.Argument(..., metavar="ID"),
    count: int = typer.Option(1, "--count", "-n", min=1, max=64, help="How many clones."),
    json_out: bool = typer.Option(False, "--json", help="Print [{id, ip_address}] as JSON."),
    *, conn: ConnectOptions,
) -> None:
    """Clone a running sandbox N times (files and processes included); prints the clones' ids."""

    async def main():  # noqa: ANN202
        async with conn.client() as client:
            return await client.fork(id, count)

    clones = asyncio.run(main())
    _print([{"id": c.id, "ip_address": c.ip_address} for c in clones], json_out, "\n".join(c.id for c in clones))


@daemon_command
def pause(
    id: str = typer.Argument(..., metavar="ID"),
    to_disk: bool = typer.Option(False, "--to-disk", help="Also save it and stop its VMM (frees its memory)."),
    *, conn: ConnectOptions,
) -> None:
    """Pause a sandbox: its guest stops (no CPU, no TTL); commands are refused until `resume`."""

    async def main() -> None:
        async with conn.client() as client:
            await client.pause(id, to_disk)

    asyncio.run(main())
    print(id, flush=True)


@daemon_command
def resume(id: str = typer.Argument(..., metavar="ID"), *, conn: ConnectOptions) -> None:
    """Resume a paused sandbox (restored from disk when it was paused to disk)."""

    async def main() -> None:
        async with conn.client() as client:
            await client.resume(id)

    asyncio.run(main())
    print(id, flush=True)


@daemon_command
def snapshot_ls(
    sandbox: Optional[str] = typer.Option(None, "--sandbox", help="Only checkpoints of this sandbox."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only ids."),
    json_out: bool = typer.Option(False, "--json", help="JSON array."),
    *, conn: ConnectOptions,
) -> None:
    """List checkpoints (oldest first); IN USE counts the running sandboxes restored from each."""
    from arcbox_vm.cli.output import human_bytes, print_listing, relative_time

    async def main():  # noqa: ANN202
        async with conn.client() as client:
            return await client.list_checkpoints(sandbox)

    print_listing(asyncio.run(main()), json_out=json_out, quiet=quiet, ident=lambda c: c.snapshot_id,
                  columns=("SNAPSHOT ID", "NAME", "SANDBOX", "SIZE", "IN USE", "CREATED"),
                  row=lambda c: (c.snapshot_id, c.name, c.sandbox_id, human_bytes(c.size_bytes), str(c.in_use),
                                 relative_time(c.created_at)))


@daemon_command
def snapshot_rm(ids: list[str] = typer.Argument(..., metavar="SNAPSHOT..."), *, conn: ConnectOptions) -> None:
    """Delete checkpoints and their files; prints each id deleted. Running restores keep going."""
    raise typer.Exit(asyncio.run(for_each(ids, "snapshot rm", conn, lambda c, i: c.delete_checkpoint(i))))


def register(app: typer.Typer) -> None:
    app.command("checkpoint")(checkpoint)
    app.command("restore")(restore)
    app.command("fork")(fork)
    app.command("pause")(pause)
    app.command("resume")(resume)
    snapshot_app.command("ls")(snapshot_ls)
    snapshot_app.command("rm")(snapshot_rm)
    app.add_typer(snapshot_app, name="snapshot")
