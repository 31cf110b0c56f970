"""`arcbox-vm serve`: run the daemon in the foreground (systemd runs it the same way)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import ArcboxError
from arcbox_vm.logctx import setup_logging

def serve_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="TOML config (default: $ARCBOX_VM_CONFIG, else /etc/arcbox-vm/config.toml if present)."),
    insecure_tcp: bool = typer.Option(False, "--insecure-tcp", help="Serve grpc.tcp_addr without TLS (trusted networks only)."),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve the sandbox.v1 gRPC API on the Unix socket (and TCP when configured)."""
    err = Console(stderr=True)
    try:
        cfg = VmmConfig.discover(config)
        setup_logging(log_level or cfg.daemon.log_level, cfg.daemon.log_format)
        from arcbox_vm.daemon.serve import serve

        asyncio.run(serve(cfg, insecure_tcp=insecure_tcp))
    except ArcboxError as exc:
        err.print(f"arcbox-vm serve: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
