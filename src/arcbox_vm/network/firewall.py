"""Running the nftables scripts of rules.py, inside the manager's namespace.

`nft` is a subprocess (fork+exec in C, safe next to gRPC threads); each script is one
transaction: it applies whole or not at all.
"""

from __future__ import annotations

import asyncio
import shutil

from arcbox_vm.errors import ArcboxError, MissingToolError
from arcbox_vm.network import netns as _netns
from arcbox_vm.network.netns import exec_prefix


async def nft(netns: str, script: str, check: bool = True) -> tuple[int, str]:
    """Run `script` with `nft -f -`; ArcboxError (with nft's message) if it fails and `check`."""
    if shutil.which("nft") is None:
        raise MissingToolError("nft", "nftables", "needed to isolate sandbox networks")
    proc = await asyncio.create_subprocess_exec(
        *exec_prefix(netns), "nft", "-f", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(script.encode())
    message = err.decode(errors="replace").strip()
    if check and proc.returncode != 0:
        raise ArcboxError(f"nft failed: {message}")
    return proc.returncode or 0, message


async def enable_forwarding(netns: str) -> None:
    """IPv4 forwarding on, in `netns` (a sandbox may leave through NAT)."""
    try:
        await asyncio.to_thread(_netns.write_sysctl, netns, "net/ipv4/ip_forward", "1")
    except OSError as exc:
        raise ArcboxError(f"enabling IPv4 forwarding failed: {exc}") from exc
