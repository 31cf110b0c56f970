"""Template commands (through the daemon):

    template build NAME -f FILE [--context DIR] [--disk-size 2G] [--memory M] [--vcpus N]
                                    build (or rebuild) a template; progress on stderr
    template ls                     list templates
    template inspect NAME           one template as JSON (steps, defaults, machine)
    template rm NAME...             remove templates (sandboxes made from them run on)
    template prune                  remove cached layers no template is built from

`create --template NAME` makes a sandbox from one (daemon_cmds.py).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Optional

import typer

from arcbox_vm.cli.common import ConnectOptions, daemon_command, fail, for_each
from arcbox_vm.cli.parsing import parse_labels
from arcbox_vm.templates.models import BuildProgress

__all__ = ["register", "parse_size_mib"]

template_app = typer.Typer(no_args_is_help=True, help="Build sandbox images from a Dockerfile; list and remove them.")

_UNITS = {"": 1, "M": 1, "MB": 1, "MIB": 1, "G": 1024, "GB": 1024, "GIB": 1024, "T": 1 << 20, "TB": 1 << 20,
          "TIB": 1 << 20}


def parse_size_mib(text: str) -> int:
    """"2G", "512M", "1024" (MiB) → MiB."""
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    if not num.isdigit() or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 2G or 512M")
    return int(num) * _UNITS[unit]


class _Progress:
    """Step lines (rich, on stderr) and the commands' output as it comes (raw)."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.err = Console(stderr=True, highlight=False)
        self.quiet = quiet

    def __call__(self, ev: BuildProgress) -> None:
        if ev.kind == "step":
            self.err.print(f"[bold]Step {ev.step}/{ev.total}[/bold] : {_escape(ev.text)}")
        elif ev.kind == "cached":
            self.err.print(f"[bold]Step {ev.step}/{ev.total}[/bold] : {_escape(ev.text)} [green]CACHED[/green]")
        elif ev.kind == "output" and not self.quiet:
            stream = sys.stderr.buffer if ev.stream == "stderr" else sys.stdout.buffer
            stream.write(ev.data)
            stream.flush()
        elif ev.kind == "error":
            code = f" (exit code {ev.exit_code})" if ev.exit_code is not None else ""
            self.err.print(f"[bold red]Step {ev.step} failed{code}[/bold red]: {_escape(ev.text)}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


@daemon_command
def build(
    name: str = typer.Argument(..., metavar="NAME"),
    file: Path = typer.Option(..., "--file", "-f", help="The Dockerfile (FROM, RUN, COPY, ADD, ENV, WORKDIR, USER, "
                                                        "ARG, START, READY)."),
    context: Optional[Path] = typer.Option(None, "--context", "-c",
                                           help="Build context directory (sent as a tar; .dockerignore honoured) "
                                                "[default: the Dockerfile's directory]."),
    disk_size: str = typer.Option("", "--disk-size", help="Grow the root disk to this size (e.g. 2G)."),
    memory: int = typer.Option(0, "--memory", "-m", min=0, help="MiB of the build and its sandboxes."),
    vcpus: int = typer.Option(0, "--vcpus", min=0, max=32, help="vCPUs of the build and its sandboxes."),
    build_arg: list[str] = typer.Option([], "--build-arg", help="ARG value: KEY=VALUE (repeatable)."),
    egress: Optional[str] = typer.Option(None, "--egress", metavar="none|nat",
                                         help="The build's network (nat only if the daemon allows it)."),
    ready_timeout: float = typer.Option(120.0, "--ready-timeout", min=1, help="Seconds READY may take."),
    network: str = typer.Option("tap", "--network", help="tap, or none: its sandboxes have no network."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Rebuild every step."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Steps only, not the commands' output."),
    *, conn: ConnectOptions,
) -> None:
    """Build (or rebuild) a template in the daemon; prints its name when it is ready."""
    try:
        dockerfile = file.read_text()
    except OSError as exc:
        fail(f"{file}: {exc.strerror}")
    try:
        size = parse_size_mib(disk_size) if disk_size else 0
    except ValueError as exc:
        fail(f"--disk-size: {exc}")
    if network not in ("tap", "none"):
        fail(f"--network {network!r}: expected tap or none")
    if egress is not None and egress not in ("none", "nat"):
        fail(f"--egress {egress!r}: expected none or nat")
    ctx_dir = context if context is not None else file.resolve().parent
    progress = _Progress(quiet)

    async def main():  # noqa: ANN202
        async with conn.client() as client:
            return await client.build_template(
                name, dockerfile, ctx_dir, disk_size_mib=size, memory_mib=memory, vcpus=vcpus,
                build_args=parse_labels(build_arg), egress=egress, ready_timeout_s=ready_timeout,  # type: ignore[arg-type]
                no_cache=no_cache, network=network, on_progress=progress)  # type: ignore[arg-type]

    info = asyncio.run(main())
    progress.err.print(f"template [bold]{info.name}[/bold] ready ({info.build_seconds:.1f} s build)")
    print(info.name, flush=True)


@daemon_command
def ls(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only names."),
    json_out: bool = typer.Option(False, "--json", help="JSON array."),
    *, conn: ConnectOptions,
) -> None:
    """List templates (oldest first); IN USE counts running sandboxes made from each."""
    from arcbox_vm.cli.output import human_bytes, print_listing, relative_time

    async def main():  # noqa: ANN202
        async with conn.client() as client:
            return await client.list_templates()

    print_listing(asyncio.run(main()), json_out=json_out, quiet=quiet, ident=lambda t: t.name,
                  columns=("NAME", "BASE", "STEPS", "SIZE", "IN USE", "CREATED"),
                  row=lambda t: (t.name, t.base, str(len(t.steps)), human_bytes(t.size_bytes), str(t.in_use),
                                 relative_time(t.created_at)))


@daemon_command
def inspect(name: str = typer.Argument(..., metavar="NAME"), *, conn: ConnectOptions) -> None:
    """One template as JSON."""
    from arcbox_vm.cli.output import print_json

    async def main():  # noqa: ANN202
        async with conn.client() as client:
            return await client.inspect_template(name)

    print_json(asyncio.run(main()))


@daemon_command
def rm(names: list[str] = typer.Argument(..., metavar="NAME..."), *, conn: ConnectOptions) -> None:
    """Remove templates; prints each name removed. Sandboxes made from them run on."""
    raise typer.Exit(asyncio.run(for_each(names, "template rm", conn, lambda c, n: c.remove_template(n))))


@daemon_command
def prune(*, conn: ConnectOptions) -> None:
    """Remove cached build layers no template is built from."""
    from arcbox_vm.cli.output import human_bytes

    async def main():  # noqa: ANN202
        async with conn.client() as client:
            return await client.prune_templates()

    layers, freed = asyncio.run(main())
    print(f"removed {layers} layer(s), {human_bytes(freed)} freed", flush=True)


def register(app: typer.Typer) -> None:
    template_app.command("build")(build)
    template_app.command("ls")(ls)
    template_app.command("inspect")(inspect)
    template_app.command("rm")(rm)
    template_app.command("prune")(prune)
    app.add_typer(template_app, name="template")
