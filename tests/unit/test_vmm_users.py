"""One uid per running VMM, claimed host-wide (vmm/users.py): distinct, stable for one
owner, released, never two at once (also across processes), stale claims taken over only
when nothing of their owner is left, a uid some process runs as never handed out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arcbox_vm import ConfigError, VmmConfig
from arcbox_vm.config.qemu import DEFAULT_UID_RANGE, parse_uid_range
from arcbox_vm.errors import ResourceExhausted, VmmError
from arcbox_vm.vmm.users import VmmUsers, running_uids


def fake_proc(root: Path, uids: dict[int, int]) -> Path:
    """A /proc with `pid: uid` processes (only their status files)."""
    for pid, uid in uids.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (root / "self").mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def users(tmp_path) -> VmmUsers:
    return VmmUsers(5000, 5003, tmp_path / "claims", proc=fake_proc(tmp_path / "proc", {1: 0}))


def owner(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "run" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_each_owner_gets_its_own_uid_and_keeps_it(users, tmp_path):
    a, b = owner(tmp_path, "a"), owner(tmp_path, "b")
    assert users.claim(a) == 5000 and users.claim(b) == 5001
    assert users.claim(a) == 5000, "claiming again (a relaunch) gives the same uid"
    assert users.uid_of(b) == 5001 and users.uid_of(tmp_path / "nobody") is None
    assert (users.claims_dir / "5000").read_text() == f"{a}\n"
    assert (users.claims_dir.stat().st_mode & 0o777) == 0o700


def test_release_gives_the_uid_back(users, tmp_path):
    a, b = owner(tmp_path, "a"), owner(tmp_path, "b")
    users.claim(a)
    users.claim(b)
    users.release(a)
    users.release(a)  # twice is harmless
    assert not (users.claims_dir / "5000").exists()
    assert users.claim(owner(tmp_path, "c")) == 5000


def test_the_range_runs_out(users, tmp_path):
    for i in range(4):
        users.claim(owner(tmp_path, str(i)))
    with pytest.raises(ResourceExhausted, match="uid_range"):
        users.claim(owner(tmp_path, "one-too-many"))


def test_a_claim_whose_owner_is_gone_is_taken_over(users, tmp_path):
    gone = owner(tmp_path, "crashed")
    users.claim(gone)
    gone.rmdir()  # a crashed daemon's VM: its socket directory was removed since
    assert users.claim(owner(tmp_path, "new")) == 5000


def test_a_claim_whose_owner_still_exists_is_kept(users, tmp_path):
    users.claim(owner(tmp_path, "left-running"))  # e.g. a VM that outlived its daemon
    assert users.claim(owner(tmp_path, "new")) == 5001


def test_a_uid_some_process_runs_as_is_never_handed_out(tmp_path):
    users = VmmUsers(5000, 5003, tmp_path / "claims", proc=fake_proc(tmp_path / "proc", {1: 0, 77: 5000, 78: 5002}))
    gone = owner(tmp_path, "gone")
    (users.claims_dir).mkdir()
    (users.claims_dir / "5001").write_text(f"{gone}\n")
    gone.rmdir()
    # 5000 runs (no claim: another tool?), 5001's owner is gone and nothing runs as it
    assert users.claim(owner(tmp_path, "x")) == 5001
    assert users.claim(owner(tmp_path, "y")) == 5003
    assert running_uids(tmp_path / "proc") == {0, 5000, 5002}


def test_running_uids_of_this_machine():
    assert os.getuid() in running_uids()


CLAIMER = r"""
import json, sys
from pathlib import Path
from arcbox_vm.vmm.users import VmmUsers
claims, base, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
users = VmmUsers(7000, 7999, Path(claims))
got = []
for i in range(n):
    o = base / f"{sys.argv[4]}-{i}"
    o.mkdir(parents=True)
    got.append(users.claim(o))
print(json.dumps(got))
"""


def test_concurrent_claimers_never_share_a_uid(tmp_path):
    """Daemons and one-shot runs claim from the same directory at the same time."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path / "claims"), str(tmp_path / "o"), "25",
                               f"p{i}"], stdout=subprocess.PIPE, text=True, env=env) for i in range(4)]
    got = [uid for p in procs for uid in json.loads(p.communicate(timeout=60)[0])]
    assert len(got) == 100 and len(set(got)) == 100


def test_uid_range_config():
    assert parse_uid_range(DEFAULT_UID_RANGE) == (2_000_000_000, 2_000_065_535)
    assert VmmConfig.from_dict({"qemu": {"uid_range": " 100000-100099 "}}).qemu.uids == (100000, 100099)
    for bad in ("", "5", "10-5", "0-100", "abc-def", "100000-4294967295"):
        with pytest.raises(ConfigError, match="qemu.uid_range"):
            VmmConfig.from_dict({"qemu": {"uid_range": bad}})
    assert VmmConfig().qemu.sandbox is True, "confined unless turned off"


def test_claims_that_cannot_be_written_fail_clearly(tmp_path):
    (tmp_path / "claims").write_text("a file where the directory should be")
    users = VmmUsers(5000, 5003, tmp_path / "claims")
    with pytest.raises(VmmError, match="cannot claim a uid for a VMM in"):
        users.claim(owner(tmp_path, "a"))
