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
    log_format: Optional[str] = typer.Option(
        None, "--log-format", help="logfmt or json: one line per record; lifecycle steps carry the sandbox id, "
                                   "event, state and durations [default: daemon.log_format]."),
) -> None:
    """Serve the sandbox.v1 gRPC API on the Unix socket (and TCP when configured)."""
    err = Console(stderr=True)
    try:
        if log_format not in (None, "logfmt", "json"):
            raise typer.BadParameter(f"expected logfmt or json, got {log_format!r}", param_hint="--log-format")
        cfg = VmmConfig.discover(config)
        setup_logging(log_level or cfg.daemon.log_level, log_format or cfg.daemon.log_format)
        from arcbox_vm.daemon.serve import serve

        asyncio.run(serve(cfg, insecure_tcp=insecure_tcp))
    except ArcboxError as exc:
        err.print(f"arcbox-vm serve: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
