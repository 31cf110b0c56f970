"""Docker-style commands that talk to the arcbox-vm daemon through the client.

    create   register + boot a sandbox; prints its id as the last stdout line
    ls       list sandboxes (table, -q ids, --json)
    inspect  one sandbox as JSON
    update   change a sandbox's egress policy (--egress, --allow-out, --deny-out)
    exec     run a command in a sandbox (see exec_cmd.py for -i / -t / exit codes)
    cp       copy a file in or out (see cp.py)
    stop     halt sandboxes
    rm       remove sandboxes
    events   lifecycle events (see `events --help` for when it stops)
    logs     the VM's serial console
    port     forwarded ports (create -p)

`register(app)` adds them to the main typer app. Every command takes the connection
options (common.py). Exit codes: 0 ok, 1 error (one `arcbox-vm: ...` line on stderr),
130 interrupted; exec passes the command's code through (124/126/127 documented there).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Optional

import typer
from rich.console import Console

from arcbox_vm.cli.common import ConnectOptions, daemon_command, fail, for_each
from arcbox_vm.cli.parsing import parse_env, parse_labels, parse_ports

# The client (and with it grpc) is imported inside the commands that use it, so that
# `arcbox-vm run` and `--help` do not pay for it.

__all__ = ["register"]

DEFAULT_EVENTS_IDLE = 2.0
CLUSTER_HELP = "Through the arcbox-vm fleet on this Ray cluster (auto, HOST:PORT, ray://HOST:PORT); needs Ray."


def _status(message: str) -> contextlib.AbstractContextManager[object]:
    """A spinner on stderr when it is a terminal; silent otherwise (scripts, tests)."""
    err = Console(stderr=True)
    return err.status(message, spinner="dots") if err.is_terminal else contextlib.nullcontext()


@daemon_command
def create(
    id: Optional[str] = typer.Option(None, "--id", help="Sandbox id (1-63 of [A-Za-z0-9-]); default: a new UUID."),
    label: list[str] = typer.Option([], "--label", "-l", help="KEY=VALUE label (repeatable)."),
    vcpus: int = typer.Option(0, "--vcpus", min=0, max=32, help="vCPUs [default: the daemon's]."),
    memory: int = typer.Option(0, "--memory", "-m", min=0, help="Memory in MiB [default: the daemon's]."),
    kernel: str = typer.Option("", "--kernel", help="Kernel: a name in the daemon's images directory [default: built]."),
    rootfs: str = typer.Option("", "--rootfs", help="ext4 root filesystem: a name in the daemon's images directory."),
    initrd: str = typer.Option("", "--initrd", help="Initramfs: a name in the daemon's images directory."),
    boot_args: str = typer.Option("", "--boot-args", help="Kernel command line base."),
    network: str = typer.Option("tap", "--network", help="tap (own IP on a TAP device) or none (no network)."),
    egress: Optional[str] = typer.Option(None, "--egress", metavar="none|nat",
                                         help="none: reach only --allow-out; nat: anything, through NAT "
                                              "[default: the daemon's default_egress]."),
    allow_out: list[str] = typer.Option([], "--allow-out", metavar="CIDR",
                                        help="IPv4 CIDR the sandbox may reach, also with --egress none (repeatable)."),
    deny_out: list[str] = typer.Option([], "--deny-out", metavar="CIDR",
                                       help="IPv4 CIDR it may never reach; wins over the rest (repeatable)."),
    ttl: int = typer.Option(0, "--ttl", min=0, help="Remove the sandbox this many seconds after it is ready."),
    env: list[str] = typer.Option([], "--env", "-e", help="Default env of its commands: KEY=VALUE or KEY."),
    workdir: str = typer.Option("", "--workdir", "-w", help="Default working directory of its commands."),
    user: str = typer.Option("", "--user", "-u", help="Default user of its commands (name, uid or uid:gid)."),
    publish: list[str] = typer.Option(
        [], "--publish", "-p", metavar="[ADDR:]HOSTPORT:GUESTPORT",
        help="Forward a host port to the guest's 127.0.0.1:GUESTPORT (repeatable; Docker's -p). ADDR defaults "
             "to 127.0.0.1 (0.0.0.0 exposes the guest port to every network); HOSTPORT 0 or empty picks a free "
             "one (see `arcbox-vm port ID`). Works with --network none."),
    template: str = typer.Option("", "--template", "-t", help="Make it from this template (`template ls`): "
                                                             "ready with the template's service running."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until it is ready (else return at once)."),
    timeout: float = typer.Option(120.0, "--timeout", min=0, help="With --wait: give up after S seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print {id, state, ip_address} as JSON."),
    cluster: Optional[str] = typer.Option(None, "--cluster", metavar="ADDR", help=CLUSTER_HELP),
    node: Optional[str] = typer.Option(None, "--node", help="With --cluster: create it on this node."),
    *, conn: ConnectOptions,
) -> None:
    """Create a sandbox; prints its id (the last line of stdout).

    With --wait (default) returns once it is ready; if it fails to boot the error is shown
    and the failed sandbox kept for `arcbox-vm logs ID` (remove it with `rm -f`)."""
    if network not in ("tap", "none"):
        fail(f"--network {network!r}: expected tap or none")
    if egress is not None and egress not in ("none", "nat"):
        fail(f"--egress {egress!r}: expected none or nat")
    ports = parse_ports(publish)
    if cluster and template:
        fail("--template is not supported with --cluster yet")
    if cluster:
        from arcbox_vm.cli.cluster_cmds import fleet_create

        fields = {"id": id, "labels": parse_labels(label), "vcpus": vcpus, "memory_mib": memory, "kernel": kernel,
                  "rootfs": rootfs, "initrd": initrd, "boot_args": boot_args, "network": network, "egress": egress,
                  "allow_out": allow_out, "deny_out": deny_out, "ttl_seconds": ttl, "env": parse_env(env),
                  "working_dir": workdir, "user": user, "ports": ports}
        _print_created(fleet_create(cluster, node, fields, wait, timeout), json_out)
        return

    async def main() -> dict[str, str]:
        async with conn.client() as client:
            waiter = client.ready_waiter(id) if wait and id else None
            if waiter is not None:
                waiter.subscribe()
            try:
                created = await client.create(
                    id=id, labels=parse_labels(label), vcpus=vcpus, memory_mib=memory, kernel=kernel,
                    rootfs=rootfs, initrd=initrd, boot_args=boot_args,
                    network=network,  # type: ignore[arg-type]
                    egress=egress, allow_out=allow_out, deny_out=deny_out,  # type: ignore[arg-type]
                    ttl_seconds=ttl, env=parse_env(env), working_dir=workdir, user=user, ports=ports,
                    template=template)
            except BaseException:
                if waiter is not None:
                    waiter.close()
                raise
            out = {"id": created.id, "state": created.state, "ip_address": created.ip_address}
            if wait:
                with _status(f"booting sandbox {created.id}"):
                    info = await (waiter or client.ready_waiter(created.id)).wait(timeout or None)
                out["state"] = str(info.state)
            return out

    _print_created(asyncio.run(main()), json_out)


def _print_created(result: dict[str, str], json_out: bool) -> None:
    if json_out:
        from arcbox_vm.cli.output import print_json

        print_json(result)
    else:
        print(result["id"], flush=True)


@daemon_command
def ls(
    state: Optional[str] = typer.Option(None, "--state", help="Only sandboxes in this state (ready, failed, ...)."),
    label: list[str] = typer.Option([], "--label", "-l", help="Only sandboxes with this KEY=VALUE (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only ids, one a line."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON array."),
    *, conn: ConnectOptions,
) -> None:
    """List sandboxes."""
    from arcbox_vm.cli.output import print_json, sandbox_table

    labels = parse_labels(label)
    rows = conn.call(lambda client: client.list(state, labels))
    if json_out:
        print_json(rows)
    elif quiet:
        sys.stdout.write("".join(f"{s.id}\n" for s in rows))
    else:
        sandbox_table(rows)


@daemon_command
def inspect(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    *, conn: ConnectOptions,
) -> None:
    """Show one sandbox as JSON (state, limits, network, forwarded ports, timestamps, error)."""
    from arcbox_vm.cli.output import print_json

    print_json(conn.call(lambda client: client.inspect(sandbox_id)))


@daemon_command
def update(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    egress: Optional[str] = typer.Option(None, "--egress", metavar="none|nat",
                                         help="none: reach only the allow-out list; nat: anything, through NAT."),
    allow_out: list[str] = typer.Option([], "--allow-out", metavar="CIDR",
                                        help="Replace the allow-out list with these IPv4 CIDRs (repeatable)."),
    deny_out: list[str] = typer.Option([], "--deny-out", metavar="CIDR",
                                       help="Replace the deny-out list with these IPv4 CIDRs (repeatable)."),
    clear_allow_out: bool = typer.Option(False, "--clear-allow-out", help="Empty the allow-out list."),
    clear_deny_out: bool = typer.Option(False, "--clear-deny-out", help="Empty the deny-out list."),
    json_out: bool = typer.Option(False, "--json", help="Print the sandbox's network as JSON."),
    *, conn: ConnectOptions,
) -> None:
    """Change a sandbox's egress policy, effective at once (also for open connections);
    what is not given stays as it was. Prints the id (or the network with --json)."""
    if egress is not None and egress not in ("none", "nat"):
        fail(f"--egress {egress!r}: expected none or nat")
    if (allow_out and clear_allow_out) or (deny_out and clear_deny_out):
        fail("give either --allow-out/--deny-out or the matching --clear-..., not both")
    if egress is None and not (allow_out or deny_out or clear_allow_out or clear_deny_out):
        fail("nothing to update: give --egress, --allow-out, --deny-out or --clear-allow-out/--clear-deny-out")
    new_allow = [] if clear_allow_out else (allow_out or None)
    new_deny = [] if clear_deny_out else (deny_out or None)
    info = conn.call(lambda client: client.update_network(sandbox_id, egress=egress,  # type: ignore[arg-type]
                                                          allow_out=new_allow, deny_out=new_deny))
    if json_out:
        from arcbox_vm.cli.output import print_json

        print_json(info.network)
    else:
        print(sandbox_id, flush=True)


@daemon_command
def port(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    guest_port: Optional[str] = typer.Argument(None, metavar="[GUESTPORT[/tcp]]", help="Only this guest port."),
    *, conn: ConnectOptions,
) -> None:
    """List a sandbox's forwarded ports as `GUESTPORT/tcp -> ADDR:HOSTPORT` (like `docker port`);
    with GUESTPORT only its ADDR:HOSTPORT (exit 1 if it is not forwarded)."""
    wanted = None
    if guest_port is not None:
        num, _, proto = guest_port.partition("/")
        if not num.isdigit() or proto not in ("", "tcp"):
            fail(f"port {guest_port!r}: expected a guest port number, e.g. 80 or 80/tcp")
        wanted = int(num)
    info = conn.call(lambda client: client.inspect(sandbox_id))
    if wanted is None:
        sys.stdout.write("".join(f"{m}\n" for m in info.ports))
        return
    hits = [m.host_endpoint for m in info.ports if m.guest_port == wanted]
    if not hits:
        fail(f"no forwarded port {wanted}/tcp in sandbox {sandbox_id} (create it with -p HOSTPORT:{wanted})")
    sys.stdout.write("".join(f"{h}\n" for h in hits))


@daemon_command
def exec_(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    cmd: list[str] = typer.Argument(..., metavar="-- CMD [ARGS...]", help="Command to run in the sandbox."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE (repeatable); KEY alone copies it from here."),
    workdir: str = typer.Option("", "--workdir", "-w", help="Working directory in the guest."),
    user: str = typer.Option("", "--user", "-u", help="User in the guest: name, uid or uid:gid."),
    timeout: float = typer.Option(0.0, "--timeout", min=0, help="Kill the command after S seconds (exit 124)."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Forward stdin to the command."),
    tty: bool = typer.Option(False, "--tty", "-t", help="Run it on a pseudo-terminal (-it: interactive shell)."),
    detach: bool = typer.Option(False, "--detach", "-d",
                                help="Start it in the background and print its exec id (see attach, signal)."),
    cluster: Optional[str] = typer.Option(None, "--cluster", metavar="ADDR", help=CLUSTER_HELP),
    *, conn: ConnectOptions,
) -> None:
    """Run a command in a sandbox; exits with its code (124 timeout, 126 cannot execute, 127 not found).
    With -d it runs in the background: the exec id is printed, `attach` streams it later."""
    # Options stop at ID (so the command's own options pass through untouched), which
    # leaves the `--` of `exec ID -- CMD` in the command: drop it.
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        fail("exec: give the command after the sandbox id: arcbox-vm exec ID -- CMD [ARGS...]")
    if cluster and not detach:
        from arcbox_vm.cli.cluster_cmds import fleet_exec

        raise typer.Exit(fleet_exec(cluster, sandbox_id, cmd, parse_env(env), workdir, user, timeout, interactive,
                                    tty))
    if cluster:
        fail("exec: --detach with --cluster: use the Python API (FleetSandbox.start)")
    if detach:
        environ = parse_env(env)
        exec_id = conn.call(lambda client: client.start(sandbox_id, cmd, env=environ, working_dir=workdir, user=user,
                                                         tty=tty, timeout=timeout, stdin=interactive))
        sys.stdout.write(exec_id + "\n")
        return
    from arcbox_vm.cli.exec_cmd import exec_command

    code = exec_command(conn, sandbox_id, cmd, parse_env(env), workdir, user, timeout, interactive, tty)
    raise typer.Exit(code)


@daemon_command
def execs(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON array."),
    *, conn: ConnectOptions,
) -> None:
    """List the commands run in a sandbox with their exec ids; "detached" ones kept running
    while the daemon was away and can be taken over with `arcbox-vm attach`."""
    from arcbox_vm.cli.output import exec_table, print_json

    rows = conn.call(lambda client: client.list_execs(sandbox_id))
    if json_out:
        print_json(rows)
    else:
        exec_table(rows)


@daemon_command
def attach(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    exec_id: str = typer.Argument(..., metavar="EXEC_ID", help="From `arcbox-vm execs ID`."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Forward stdin to the command."),
    *, conn: ConnectOptions,
) -> None:
    """Attach to a background (exec -d) or detached command: print the output kept
    meanwhile, the rest, and exit with its code. Ctrl-C detaches; the command runs on."""
    from arcbox_vm.cli.exec_cmd import attach_command

    raise typer.Exit(attach_command(conn, sandbox_id, exec_id, interactive))


@daemon_command
def signal(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    exec_id: str = typer.Argument(..., metavar="EXEC_ID", help="From `arcbox-vm execs ID`."),
    sig: str = typer.Option("KILL", "--signal", "-s", help="Signal name (TERM, INT, KILL, ...) or number."),
    *, conn: ConnectOptions,
) -> None:
    """Send a signal to a running command's process group (default KILL)."""
    from arcbox_vm.cli.parsing import parse_signal

    signum = parse_signal(sig)
    conn.call(lambda client: client.signal(sandbox_id, exec_id, signum))


@daemon_command
def cp(
    src: str = typer.Argument(..., metavar="SRC", help="ID:/path, a local path, or - (stdin)."),
    dst: str = typer.Argument(..., metavar="DST", help="ID:/path, a local path, or - (stdout)."),
    *, conn: ConnectOptions,
) -> None:
    """Copy a file into or out of a sandbox (exactly one side is ID:/path)."""
    from arcbox_vm.cli.cp import copy

    async def main() -> None:
        async with conn.client() as client:
            await copy(client, src, dst)

    asyncio.run(main())


@daemon_command
def stop(
    ids: list[str] = typer.Argument(..., metavar="ID..."),
    timeout: Optional[float] = typer.Option(None, "--timeout", "-t", min=0,
                                            help="Seconds for the guest to halt before the VM is killed [30]."),
    *, conn: ConnectOptions,
) -> None:
    """Stop sandboxes: the guest halts, then the VM is killed; prints each id stopped."""
    raise typer.Exit(asyncio.run(for_each(ids, "stop", conn, lambda c, i: c.stop(i, timeout))))


@daemon_command
def rm(
    ids: list[str] = typer.Argument(..., metavar="ID..."),
    force: bool = typer.Option(False, "--force", "-f", help="Also remove sandboxes that are running a command."),
    cluster: Optional[str] = typer.Option(None, "--cluster", metavar="ADDR", help=CLUSTER_HELP),
    *, conn: ConnectOptions,
) -> None:
    """Remove sandboxes and everything made for them; prints each id removed."""
    if cluster:
        from arcbox_vm.cli.cluster_cmds import fleet_rm

        raise typer.Exit(fleet_rm(cluster, ids, force))
    raise typer.Exit(asyncio.run(for_each(ids, "rm", conn, lambda c, i: c.remove(i, force))))


@daemon_command
def events(
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until interrupted."),
    id: Optional[str] = typer.Option(None, "--id", help="Only this sandbox's events."),
    action: Optional[str] = typer.Option(None, "--action", help="Only this action (created, ready, failed, ...)."),
    since: Optional[int] = typer.Option(None, "--since", min=0, metavar="EVENT_ID",
                                        help="First replay the retained events after this id (0 = all)."),
    idle: float = typer.Option(DEFAULT_EVENTS_IDLE, "--idle", min=0.1,
                               help="Without -f: stop after S seconds without an event."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line (with its event id)."),
    *, conn: ConnectOptions,
) -> None:
    """Print lifecycle events: from now, or replayed from --since, then as they happen.

    With -f they stream until Ctrl-C (exit 0). Without -f they stop once --idle seconds
    pass without an event, so `arcbox-vm events --since 0` prints the retained history and
    returns, and a script never blocks forever. Resume later with --since <last id>."""
    from arcbox_vm.cli.output import event_json, event_line, print_json_line

    async def main() -> None:
        async with conn.client() as client:
            stream = client.events(id=id, action=action, since=since)
            while True:
                try:
                    ev = await (anext(stream) if follow else asyncio.wait_for(anext(stream), idle))
                except (StopAsyncIteration, TimeoutError):
                    return
                if json_out:
                    print_json_line(event_json(ev))
                else:
                    print(event_line(ev), flush=True)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        if not follow:
            raise
        raise typer.Exit(0) from None


@daemon_command
def logs(
    sandbox_id: str = typer.Argument(..., metavar="ID"),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new output until the sandbox is gone."),
    *, conn: ConnectOptions,
) -> None:
    """Print the VM's serial console (kernel and agent messages)."""
    from arcbox_vm.cli.exec_cmd import write_all

    async def main() -> None:
        async with conn.client() as client:
            async for chunk in client.logs(sandbox_id, follow=follow):
                write_all(1, chunk)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        if not follow:
            raise
        raise typer.Exit(0) from None


def register(app: typer.Typer) -> None:
    """Add the daemon commands to the main `arcbox-vm` app."""
    no_interspersed = {"allow_interspersed_args": False}
    app.command("create")(create)
    app.command("ls")(ls)
    app.command("inspect")(inspect)
    app.command("update")(update)
    app.command("port")(port)
    app.command("exec", context_settings=no_interspersed)(exec_)
    app.command("execs")(execs)
    app.command("attach")(attach)
    app.command("signal")(signal)
    app.command("cp")(cp)
    app.command("stop")(stop)
    app.command("rm")(rm)
    app.command("events")(events)
    app.command("logs")(logs)
