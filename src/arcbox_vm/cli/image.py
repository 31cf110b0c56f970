"""`arcbox-vm image build`, `image inject-agent ROOTFS` and `image import-oci ARCHIVE NAME`."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from arcbox_vm.agent.bundle import agent_digest, agent_files
from arcbox_vm.errors import ArcboxError
from arcbox_vm.images import build_image, inject_agent
from arcbox_vm.images.oci_rootfs import build_rootfs_from_oci
from arcbox_vm.paths import data_dir as default_data_dir

image_app = typer.Typer(
    name="image",
    help="Build guest images and put the agent into existing ones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`1G`, `512M`, `1.5GiB`, `1073741824` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise typer.BadParameter(f"{text!r} is not a size (examples: 512M, 1G, 2.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@contextlib.contextmanager
def _reported(err: Console) -> Iterator[None]:
    """A failure becomes one `error:` line and exit 1; Ctrl-C prints `interrupted`, exit 130."""
    try:
        yield
    except (ArcboxError, OSError, subprocess.SubprocessError) as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


class _StageReporter:
    """Shows the current stage (spinner on a terminal, plain lines otherwise) and how long each took."""

    def __init__(self, err: Console) -> None:
        self.err = err
        self.status = None
        self.current: str | None = None
        self.started = time.monotonic()
        self.t0 = self.started

    def __call__(self, msg: str) -> None:
        self._finish()
        self.current, self.started = msg, time.monotonic()
        if self.status is not None:
            self.status.update(escape(msg))
        else:
            self.err.print(f"[bold]==>[/] {escape(msg)}", highlight=False)

    def _finish(self) -> None:
        if self.current is not None and self.status is not None:
            took = time.monotonic() - self.started
            self.err.print(f"[green]✓[/] {escape(self.current)} [dim]({took:.1f} s)[/]", highlight=False)
        self.current = None

    def __enter__(self) -> _StageReporter:
        if self.err.is_terminal:
            self.status = self.err.status("checking the image cache")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._finish()
        if self.status is not None:
            self.status.__exit__(*exc)


@image_app.command("build")
def build(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Data directory "
                                            "(default: $ARCBOX_VM_DATA_DIR or /var/lib/arcbox-vm)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the image is cached "
                               "(reuses the downloaded kernel and the rootfs base)."),
    refresh_base: bool = typer.Option(False, "--refresh-base", help="Also rebuild the Debian base "
                                      "with mmdebstrap (newer packages); implies --force."),
    free_space: str = typer.Option("1G", "--free-space", help="Free space inside rootfs.ext4 (e.g. 512M, 2G)."),
) -> None:
    """Build the guest image (Debian cloud kernel, initramfs, ext4 rootfs with the agent), or reuse it."""
    err = Console(stderr=True, soft_wrap=True)
    ddir = data_dir or default_data_dir()
    size = parse_size(free_space)
    t0 = time.monotonic()
    with _reported(err), _StageReporter(err) as progress:
        image = build_image(ddir, progress, force=force, refresh_base=refresh_base, free_space=size)
    err.print(f"[dim]image {image.key} ({time.monotonic() - t0:.1f} s)[/]", highlight=False)
    for label, value in (("key", image.key), ("kernel_release", image.kernel_release), ("dir", image.dir),
                         ("kernel", image.kernel), ("vmlinux", image.vmlinux), ("initrd", image.initrd),
                         ("rootfs", image.rootfs)):
        typer.echo(f"{label + ':':16}{value}")


@image_app.command("inject-agent")
def inject(rootfs: Path = typer.Argument(..., help="An ext4 filesystem image (e.g. rootfs.ext4).")) -> None:
    """Write the guest agent into an existing ext4 image, without mounting it."""
    err = Console(stderr=True, soft_wrap=True)
    with _reported(err):
        warnings = inject_agent(rootfs)
    for w in warnings:
        err.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False)
    typer.echo(f"agent injected into {rootfs} ({len(agent_files())} files, digest {agent_digest()[:12]})")


@image_app.command("import-oci")
def import_oci(
    archive: Path = typer.Argument(..., help="A `docker save` archive or an OCI image layout tarball."),
    name: str = typer.Argument(..., help="Name of the rootfs in the images directory (\\[images] dir)."),
    disk_size: Optional[str] = typer.Option(None, "--disk-size", help="Size of the ext4 image (e.g. 1G) "
                                            "\\[default: the files + 1 GiB]."),
    config: Optional[Path] = typer.Option(None, "--config", help="Daemon config file, for \\[images] dir and "
                                          "\\[limits] image_unpack_max_bytes (env ARCBOX_VM_CONFIG)."),
) -> None:
    """Turn an OCI image archive into a rootfs that `create --rootfs NAME` boots.

    The image needs no python3 of its own: the agent brings its runtime. Its env, working
    directory and user become the defaults of sandboxes booting it. Run it where the daemon
    runs (it writes into the daemon's images directory).
    """
    from arcbox_vm.config import VmmConfig
    from arcbox_vm.manager.images import named_image_path

    err = Console(stderr=True, soft_wrap=True)
    t0 = time.monotonic()
    with _reported(err):
        cfg = VmmConfig.discover(config)
        out = named_image_path(cfg.named_images_dir, name)
        size = parse_size(disk_size) if disk_size else None
        image_config = build_rootfs_from_oci(archive, out, size, cfg.limits.image_unpack_max_bytes)
    err.print(f"[dim]imported in {time.monotonic() - t0:.1f} s[/]", highlight=False)
    typer.echo(f"{'rootfs:':16}{out}")
    typer.echo(f"{'name:':16}{name}")
    for label, value in (("env", " ".join(image_config.env_list)), ("working_dir", image_config.working_dir),
                         ("user", image_config.user)):
        typer.echo(f"{label + ':':16}{value}")
