"""The SQLite state store: migrations, atomic writes, event ids, corruption handling."""

from __future__ import annotations

import os

import pytest

from arcbox_vm.storage.state import SCHEMA_VERSION, StateCorrupt, StateError, StateStore


def rec(sid: str, **kw):
    base = dict(id=sid, state="starting", spec="{}", workdir=f"/w/{sid}", vmm="qemu", pid=None, pid_start=None,
                lease=None, created_at=1.0, ready_at=None, last_exited_at=None, last_exit_code=None, error=None,
                removing=False)
    base.update(kw)
    return base


def test_schema_and_round_trip(tmp_path):
    st = StateStore(tmp_path)
    st.open()
    assert st.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    st.put_sandbox(rec("a"), lease_ip="10.0.0.2")
    st.put_sandbox(rec("a", state="ready", pid=42, pid_start=7), lease_ip="10.0.0.2")
    st.put_sandbox(rec("b"))
    assert [r["id"] for r in st.sandboxes()] == ["a", "b"]
    assert st.sandboxes()[0]["state"] == "ready" and st.sandboxes()[0]["pid_start"] == 7
    assert st.leases() == {"10.0.0.2": "a"}
    st.put_exec("a", 1, ["sleep", "9"])
    assert st.execs(status="running")[0]["channel"] == 1
    st.finish_exec("a", 1, 0, "exited")
    assert st.execs("a")[0]["exit_code"] == 0
    st.delete_sandbox("a")
    assert [r["id"] for r in st.sandboxes()] == ["b"] and st.leases() == {} and st.execs("a") == []
    st.close()
    st2 = StateStore(tmp_path)
    st2.open()  # reopening migrates nothing and keeps data
    assert [r["id"] for r in st2.sandboxes()] == ["b"]


def test_event_ids_are_monotonic_and_replayable(tmp_path):
    st = StateStore(tmp_path)
    st.open()
    ids = [st.append_event("a", f"e{i}", {"n": str(i)}).id for i in range(2500)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.id for e in st.events_since(ids[10], limit=5)] == ids[11:16]
    assert [e.attributes["n"] for e in st.iter_events_since(ids[-3])] == ["2498", "2499"]
    assert st.last_event_id() == ids[-1]


def test_garbage_file_refuses_to_start_with_recovery_hint(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not a database" * 1000)
    with pytest.raises(StateCorrupt) as info:
        StateStore(tmp_path).open()
    assert "mv " in str(info.value) and "state.db" in str(info.value)


def test_damaged_pages_are_detected(tmp_path):
    st = StateStore(tmp_path)
    st.open()
    for i in range(300):
        st.put_sandbox(rec(f"s{i}", spec="x" * 500))
    st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    st.close()
    path = tmp_path / "state.db"
    data = bytearray(path.read_bytes())
    for off in range(8192, len(data) - 4096, 4096):  # scribble over the middle of every page
        data[off + 100: off + 400] = os.urandom(300)
    path.write_bytes(bytes(data))
    with pytest.raises(StateCorrupt):
        st2 = StateStore(tmp_path)
        st2.open()
        st2.sandboxes()


def test_newer_schema_is_refused(tmp_path):
    st = StateStore(tmp_path)
    st.open()
    st.db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    st.close()
    with pytest.raises(StateError, match="newer"):
        StateStore(tmp_path).open()


def test_read_only_data_dir_is_a_clear_error_and_changes_nothing(tmp_path):
    st = StateStore(tmp_path)
    st.open()
    st.put_sandbox(rec("a"))
    st.db.execute("PRAGMA query_only=ON")  # stands in for a read-only / full disk
    with pytest.raises(StateError, match="nothing was changed"):
        st.put_sandbox(rec("b"))
    st.db.execute("PRAGMA query_only=OFF")
    assert [r["id"] for r in st.sandboxes()] == ["a"]
