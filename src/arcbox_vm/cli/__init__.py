"""The `arcbox-vm` command line (typer)."""
