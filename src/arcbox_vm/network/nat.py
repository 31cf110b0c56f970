"""Egress NAT with nftables: one table of ours, masquerading the sandbox CIDR.

The table is named after the manager's tag, so start-up clean-up can find and delete a
table left behind by a crashed manager without touching anyone else's rules.
"""

from __future__ import annotations

import asyncio
import shutil

from arcbox_vm.errors import ArcboxError, MissingToolError
from arcbox_vm.network.netns import exec_prefix


def table_name(tag: str) -> str:
    return f"arcbox_vm_{tag}"


def ruleset(tag: str, cidr: str, tap_prefix: str) -> str:
    t = table_name(tag)
    return f"""table ip {t} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {cidr} oifname != "{tap_prefix}*" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{tap_prefix}*" accept
    oifname "{tap_prefix}*" ct state established,related accept
  }}
}}
"""


async def _nft(netns: str, script: str, check: bool = True) -> tuple[int, str]:
    if shutil.which("nft") is None:
        raise MissingToolError("nft", "nftables", "needed for network.nat")
    proc = await asyncio.create_subprocess_exec(
        *exec_prefix(netns), "nft", "-f", "-",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(script.encode())
    if check and proc.returncode != 0:
        raise ArcboxError(f"nft failed: {err.decode(errors='replace').strip()}")
    return proc.returncode or 0, err.decode(errors="replace")


async def _sysctl_forward(netns: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *exec_prefix(netns), "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward",
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise ArcboxError(f"enabling IPv4 forwarding failed: {err.decode(errors='replace').strip()}")


async def install(netns: str, tag: str, cidr: str, tap_prefix: str) -> None:
    """(Re)install our table atomically and enable forwarding."""
    await remove(netns, tag)
    await _nft(netns, ruleset(tag, cidr, tap_prefix))
    await _sysctl_forward(netns)


async def remove(netns: str, tag: str) -> None:
    """Delete our table if present (idempotent)."""
    await _nft(netns, f"destroy table ip {table_name(tag)}\n", check=False)
    # `destroy` needs nftables >= 1.0.8; fall back to add+delete for older versions
    await _nft(netns, f"add table ip {table_name(tag)}\ndelete table ip {table_name(tag)}\n", check=False)
