"""The production `arcbox_vm.ports.ImageStore`: the image `arcbox-vm image build` makes,
found in (or built into) the data dir on first use, then kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

from arcbox_vm.images.builder import build_image, find_image
from arcbox_vm.images.cache import GuestImage


class BuiltImageStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._image: GuestImage | None = None
        self._lock: asyncio.Lock | None = None

    async def default_image(self) -> GuestImage:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._image is None:
                image = await asyncio.to_thread(find_image, self.data_dir)
                if image is None:
                    image = await asyncio.to_thread(build_image, self.data_dir)
                self._image = image
            return self._image
