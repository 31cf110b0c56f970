"""`arcbox-vm` entry point: mounts the command groups."""

from __future__ import annotations

import typer

from arcbox_vm.cli.cluster_cmds import cluster_app
from arcbox_vm.cli.daemon_cmds import register as register_daemon_commands
from arcbox_vm.cli.image import image_app
from arcbox_vm.cli.run import run_command
from arcbox_vm.cli.serve import serve_command
from arcbox_vm.cli.snapshot_cmds import register as register_snapshot_commands
from arcbox_vm.cli.stats_cmd import register as register_stats_commands
from arcbox_vm.cli.template_cmds import register as register_template_commands

app = typer.Typer(
    name="arcbox-vm",
    help="Run commands in throwaway microVMs (Firecracker or QEMU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run", context_settings={"allow_interspersed_args": False})(run_command)
app.command("serve")(serve_command)
app.add_typer(image_app, name="image", help="Build guest images and put the agent into existing ones.")
register_daemon_commands(app)
app.add_typer(cluster_app, name="cluster", help="A fleet of arcbox-vm nodes on Ray: its nodes and sandboxes.")
register_stats_commands(app)
register_snapshot_commands(app)
register_template_commands(app)


if __name__ == "__main__":  # pragma: no cover
    app()
