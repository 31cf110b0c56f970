"""Guest accounts, read from the guest's /etc/passwd and /etc/group (cached briefly).

Commands switch users in the guest agent by name; file transfers need the uid/gid
(the agent performs them with those credentials) and the home directory (relative
paths), and file listings show owner and group names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from arcbox_vm.errors import ArcboxError, InvalidArgument

CACHE_S = 10.0
MAX_BYTES = 1 << 20  # of /etc/passwd or /etc/group read
MAX_CACHED = 1024  # sandboxes


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


ROOT = Account("root", 0, 0, "/root")


def _parse(text: str, id_field: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) > id_field and fields[id_field].isdigit():
            out.setdefault(fields[0], fields)
    return out


class GuestUsers:
    def __init__(self, manager: Any) -> None:
        self._mgr = manager
        self._cache: dict[str, tuple[float, dict[str, list[str]], dict[str, list[str]]]] = {}

    async def _read(self, sandbox_id: str, path: str) -> str:
        try:
            reader = await self._mgr.read_file(sandbox_id, path)
        except ArcboxError:
            return ""
        data = bytearray()
        try:
            async for chunk in reader:
                data += chunk
                if len(data) > MAX_BYTES:
                    break
        finally:
            await reader.aclose()
        return bytes(data[:MAX_BYTES]).decode(errors="replace")

    async def _tables(self, sandbox_id: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        hit = self._cache.get(sandbox_id)
        if hit is not None and time.monotonic() - hit[0] < CACHE_S:
            return hit[1], hit[2]
        passwd = _parse(await self._read(sandbox_id, "/etc/passwd"), 2)
        groups = _parse(await self._read(sandbox_id, "/etc/group"), 2)
        if len(self._cache) >= MAX_CACHED:
            self._cache.pop(next(iter(self._cache)))
        self._cache[sandbox_id] = (time.monotonic(), passwd, groups)
        return passwd, groups

    async def account(self, sandbox_id: str, name: str) -> Account:
        """The guest account `name` ("" and "root" = root); InvalidArgument if unknown."""
        if name in ("", "root"):
            passwd, _ = await self._tables(sandbox_id)
            f = passwd.get("root")
            return Account("root", 0, 0, f[5] if f and len(f) > 5 and f[5] else "/root")
        passwd, _ = await self._tables(sandbox_id)
        f = passwd.get(name)
        if f is None or len(f) < 6 or not f[3].isdigit():
            raise InvalidArgument(f"no user {name!r} in the sandbox")
        return Account(name, int(f[2]), int(f[3]), f[5] or "/")

    async def names(self, sandbox_id: str) -> tuple[dict[int, str], dict[int, str]]:
        """uid → user name, gid → group name."""
        passwd, groups = await self._tables(sandbox_id)
        return ({int(f[2]): n for n, f in passwd.items()}, {int(f[2]): n for n, f in groups.items()})

    def forget(self, sandbox_id: str) -> None:
        self._cache.pop(sandbox_id, None)
