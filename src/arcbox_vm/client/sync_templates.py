"""The template calls of the blocking `Client` (see AsyncClient / aio_templates.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from arcbox_vm.templates.models import BuildProgress, TemplateInfo


class SyncTemplateCalls:
    """Mixed into Client (which provides `_loop` and `aio`)."""

    _loop: Any
    aio: Any

    def build_template(self, name: str, dockerfile: str, context: str | os.PathLike[str] | bytes | None = None,
                       *, disk_size_mib: int = 0, memory_mib: int = 0, vcpus: int = 0,
                       build_args: Mapping[str, str] | None = None, egress: Literal["none", "nat"] | None = None,
                       ready_timeout_s: float = 0, no_cache: bool = False,
                       network: Literal["tap", "none"] = "tap",
                       on_progress: Callable[[BuildProgress], None] | None = None) -> TemplateInfo:
        """See AsyncClient.build_template."""
        return self._loop.run(self.aio.build_template(
            name, dockerfile, context, disk_size_mib=disk_size_mib, memory_mib=memory_mib, vcpus=vcpus,
            build_args=build_args, egress=egress, ready_timeout_s=ready_timeout_s, no_cache=no_cache,
            network=network, on_progress=on_progress))

    def list_templates(self) -> list[TemplateInfo]:
        return self._loop.run(self.aio.list_templates())

    def inspect_template(self, name: str) -> TemplateInfo:
        return self._loop.run(self.aio.inspect_template(name))

    def remove_template(self, name: str) -> int:
        return self._loop.run(self.aio.remove_template(name))

    def prune_templates(self) -> tuple[int, int]:
        return self._loop.run(self.aio.prune_templates())
