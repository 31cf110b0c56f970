"""The daemon's side of fleet membership: run the member process (member.py) and keep it
running. Imports no Ray — the daemon never runs Ray code itself.

`[cluster] ray_address` set → `serve()` starts a ClusterMembership after the daemon's
socket serves, and closes it first on shutdown (the member process then takes the node
out of placement). The member process exits when this host's Ray node goes away; it is
started again, with a growing pause (1 s up to 15 s), until the node is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import arcbox_vm
from arcbox_vm.config import VmmConfig
from arcbox_vm.errors import ConfigError
from arcbox_vm.manager.limits import host_memory_mib

log = logging.getLogger("arcbox_vm.cluster")

__all__ = ["ClusterMembership", "member_params"]

BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 15.0
STABLE_S = 60.0  # a member process that ran this long was fine: start over with the short pause


def member_params(cfg: VmmConfig, daemon_pid: int) -> dict[str, Any]:
    """What the member process and the node service need to know about this daemon."""
    c, limits = cfg.cluster, cfg.limits
    return {
        "ray_address": c.ray_address, "node_ip": c.node_ip, "name": c.resolved_node_name(),
        "namespace": c.namespace, "refresh_s": c.refresh_s, "socket": str(Path(cfg.grpc.unix_socket).resolve()),
        "max_sandboxes": limits.max_sandboxes,
        "max_memory_mib": limits.max_total_memory_mib or host_memory_mib(),
        "default_memory_mib": cfg.defaults.memory_mib, "daemon_pid": daemon_pid,
    }


def _env() -> dict[str, str]:
    """Ours, with this arcbox_vm's source root first on the path (an installed package is
    found anyway; a source tree run from elsewhere is found too)."""
    env = dict(os.environ)
    root = str(Path(arcbox_vm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


class ClusterMembership:
    def __init__(self, cfg: VmmConfig) -> None:
        if importlib.util.find_spec("ray") is None:
            raise ConfigError("[cluster] ray_address is set but Ray is not installed; install it with "
                              "pip install 'arcbox-vm[cluster]'")
        self.params = member_params(cfg, os.getpid())
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        log.info("joining the Ray cluster at %s as node %s", self.params["ray_address"], self.params["name"])
        self._task = asyncio.ensure_future(self._supervise())

    async def _supervise(self) -> None:
        pause = BACKOFF_MIN_S
        while not self._closing:
            started = time.monotonic()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "arcbox_vm.cluster.member", json.dumps(self.params),
                    stdin=asyncio.subprocess.DEVNULL, env=_env())
                rc = await self._proc.wait()
            except OSError as exc:
                rc = -1
                log.error("cannot start the cluster member process: %s", exc)
            if self._closing:
                return
            if time.monotonic() - started > STABLE_S:
                pause = BACKOFF_MIN_S
            log.warning("the cluster member process exited (%s); starting it again in %.0f s", rc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX_S)

    async def close(self, timeout: float = 15.0) -> None:
        """Stop the member process (it takes the node out of placement first)."""
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
