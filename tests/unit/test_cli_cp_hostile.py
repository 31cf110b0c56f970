"""`arcbox-vm cp ID:/file DIR/` against a guest that lies: the host names and modes the file."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from arcbox_vm.cli.cp import download, local_mode, local_name
from arcbox_vm.cli.parsing import RemotePath
from arcbox_vm.errors import InvalidArgument


class LyingGuest:
    """A client whose sandbox answers stat with a hostile name and a setuid, world-writable mode."""

    def __init__(self, name: str, mode: int, data: bytes) -> None:
        self.name, self.mode, self.data = name, mode, data

    async def stat(self, sandbox_id: str, path: str):  # noqa: ANN201
        return SimpleNamespace(type="file", name=self.name, mode=self.mode, size=len(self.data))

    async def download(self, sandbox_id: str, path: str):  # noqa: ANN201
        yield self.data


@pytest.mark.parametrize("lie", ["../../escaped", "/etc/cron.d/evil", "../x", "a/../../b"])
async def test_download_into_a_directory_uses_the_requested_name_not_the_guests(tmp_path, lie):
    dest = tmp_path / "dest"
    dest.mkdir()
    guest = LyingGuest(lie, 0o4777, b"payload")
    old = os.umask(0o022)
    try:
        await download(guest, RemotePath("sb", "/tmp/report.txt"), str(dest) + "/")  # type: ignore[arg-type]
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["dest"], "nothing written outside the destination directory"
    assert os.listdir(dest) == ["report.txt"]
    st = (dest / "report.txt").stat()
    assert (dest / "report.txt").read_bytes() == b"payload"
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert stat.S_IMODE(st.st_mode) == 0o755, "rwx at most, group/other write masked by the umask"


def test_local_name_refuses_paths_without_a_file_name():
    for bad in ("/", "/tmp/..", ".", ".."):
        with pytest.raises(InvalidArgument):
            local_name(bad)
    assert local_name("/tmp/a/") == "a"


def test_local_mode_strips_special_bits_and_applies_the_umask():
    old = os.umask(0o022)
    try:
        assert local_mode(0o4777) == 0o755
        assert local_mode(0o7666) == 0o644
        assert local_mode(0) == 0o644
    finally:
        os.umask(old)
