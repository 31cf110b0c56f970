"""The fleet from the command line (arcbox_vm.cluster; needs `arcbox-vm[cluster]`).

    arcbox-vm cluster nodes [--address ADDR] [--json]        the member nodes, their capacity, alive
    arcbox-vm cluster ls    [--address ADDR] [-l K=V] [--state S] [-q] [--json]
                                                             sandboxes of every node ("lost": node down)
    arcbox-vm create --cluster ADDR [--node NAME] ...        placed by Ray (or on NAME)
    arcbox-vm exec   --cluster ADDR ID -- CMD...             routed to the sandbox's node
    arcbox-vm rm     --cluster ADDR ID...

ADDR is what `ray.init` takes: "auto" (the Ray cluster of this host), HOST:PORT or
ray://HOST:PORT; `--address` defaults to $ARCBOX_VM_CLUSTER, else "auto". Ray is
imported only by these commands. The create/exec/rm variants live here (the daemon
commands hand over when --cluster is given) and print and exit as their daemon forms do.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import typer

from arcbox_vm.cli.common import EXIT_ERROR, fail, one_line
from arcbox_vm.cli.parsing import parse_labels
from arcbox_vm.errors import ArcboxError, ExecError

if TYPE_CHECKING:
    from arcbox_vm.cluster.fleet import Fleet

__all__ = ["cluster_app", "fleet_create", "fleet_exec", "fleet_rm"]

ENV_CLUSTER = "ARCBOX_VM_CLUSTER"

cluster_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                          help="A fleet of arcbox-vm nodes on Ray: its nodes and sandboxes.")


def _fleet(address: str | None) -> "Fleet":
    try:
        from arcbox_vm.cluster.fleet import Fleet
    except ImportError:
        fail("the cluster commands need Ray: pip install 'arcbox-vm[cluster]'")
    try:
        return Fleet(address or os.environ.get(ENV_CLUSTER) or "auto")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        fail(f"cannot connect to the Ray cluster at {address or 'auto'}: {exc}")


def _guard(fn: Any) -> Any:
    try:
        return fn()
    except typer.Exit:
        raise
    except ArcboxError as exc:
        fail(exc)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


_ADDRESS = typer.Option(None, "--address", "-a", metavar="ADDR",
                        help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT [env ARCBOX_VM_CLUSTER; default auto].")


@cluster_app.command("nodes")
def nodes(address: Optional[str] = _ADDRESS,
          json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """The member nodes: address, alive, free/total sandbox slots and memory, sandboxes."""
    from arcbox_vm.cli.output import print_json

    rows = _guard(lambda: _fleet(address).nodes())
    if json_out:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("NAME", "ADDRESS", "ALIVE", "SLOTS FREE", "MEMORY FREE (MiB)", "SANDBOXES"):
        table.add_column(name, no_wrap=True)
    for n in rows:
        state = "yes" if n.alive else ("no (daemon down)" if n.ray_alive else "no (Ray node down)")
        c = n.capacity
        table.add_row(n.name, n.address, state, f"{c.free_slots}/{c.max_sandboxes}",
                      f"{c.free_memory_mib}/{c.max_memory_mib}", str(n.sandboxes))
    Console(highlight=False, width=None if Console().is_terminal else 1000).print(table)


@cluster_app.command("ls")
def ls(address: Optional[str] = _ADDRESS,
       state: Optional[str] = typer.Option(None, "--state", help="Only this state (ready, ..., lost)."),
       label: list[str] = typer.Option([], "--label", "-l", help="Only sandboxes with this KEY=VALUE (repeatable)."),
       quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only ids, one a line."),
       json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """Sandboxes of every node, with their node; those of an unreachable node are "lost"."""
    from arcbox_vm.cli.output import print_json, relative_time

    rows = _guard(lambda: _fleet(address).list(labels=parse_labels(label), state=state))
    if json_out:
        print_json(rows)
        return
    if quiet:
        sys.stdout.write("".join(f"{e.id}\n" for e in rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("ID", "NODE", "STATE", "IP", "CREATED"):
        table.add_column(name, no_wrap=True)
    table.add_column("LABELS", overflow="fold")
    for e in rows:
        shown = f"lost (was {e.last_state})" if e.lost and e.last_state else e.state
        table.add_row(e.id, e.node, shown, e.ip_address or "-", relative_time(e.created_at),
                      ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())))
    Console(highlight=False, width=None if Console().is_terminal else 1000).print(table)


# -- the --cluster forms of create, exec, rm ----------------------------------------------------


def fleet_create(address: str, node: str | None, fields: Mapping[str, Any], wait: bool,
                 timeout: float) -> dict[str, str]:
    def create() -> dict[str, str]:
        sb = _fleet(address).create(node=node, wait=wait, timeout=timeout or None,
                                    remove_on_exit=False, **fields)
        info = sb.info()
        ip = info.network.ip_address if info.network else ""
        return {"id": sb.id, "node": sb.node, "state": str(info.state), "ip_address": ip}

    return _guard(create)


def fleet_rm(address: str, ids: list[str], force: bool) -> int:
    fleet = _guard(lambda: _fleet(address))
    code = 0
    for sid in ids:
        try:
            fleet.get(sid).remove(force)
            print(sid, flush=True)
        except ArcboxError as exc:
            sys.stderr.write(f"arcbox-vm: rm {sid}: {one_line(exc)}\n")
            code = EXIT_ERROR
    return code


def _write(fd: int, data: bytes) -> None:
    from arcbox_vm.cli.exec_cmd import write_all

    write_all(fd, data)


def _pump_stdin(session: Any) -> None:
    try:
        while chunk := os.read(0, 65536):
            session.write(chunk)
        session.close_stdin()
    except (OSError, ArcboxError):
        pass


def fleet_exec(address: str, sandbox_id: str, argv: list[str], env: Mapping[str, str], workdir: str, user: str,
               timeout: float, interactive: bool, tty: bool) -> int:
    """Run it on the sandbox's node; returns the exit code (as `arcbox-vm exec`)."""
    from arcbox_vm.cli.exec_cmd import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_TIMED_OUT
    from arcbox_vm.cli.tty import raw_mode, terminal_size

    def run() -> Any:
        sb = _fleet(address).get(sandbox_id)
        size = terminal_size() if tty else None
        if not interactive:
            return sb.run(argv, env=env, working_dir=workdir, user=user, tty=tty, tty_size=size, timeout=timeout,
                          on_stdout=lambda d: _write(1, d), on_stderr=lambda d: _write(2, d))
        with sb.exec(argv, env=env, working_dir=workdir, user=user, tty=tty, tty_size=size,
                     timeout=timeout) as session, raw_mode(0) if tty else contextlib.nullcontext():
            threading.Thread(target=_pump_stdin, args=(session,), daemon=True).start()
            return session.wait(on_stdout=lambda d: _write(1, d), on_stderr=lambda d: _write(2, d))

    try:
        result = run()
    except ExecError as exc:
        if exc.code in ("not_found", "permission"):
            fail(exc, EXIT_NOT_FOUND if exc.code == "not_found" else EXIT_CANNOT_EXECUTE)
        fail(exc)
    except ArcboxError as exc:
        fail(exc)
    if result.timed_out:
        sys.stderr.write(f"arcbox-vm: the command timed out after {timeout:g} s and was killed\n")
        return EXIT_TIMED_OUT
    return result.exit_code if result.exit_code >= 0 else EXIT_ERROR
