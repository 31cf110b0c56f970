"""The manager's durable state: one SQLite file (WAL) under the data dir.

Holds sandbox records, IP leases, exec sessions and an append-only event log with
monotonic ids. Every state change is committed before it is announced, so a daemon that
dies at any point restarts from a state that really happened. A database that fails its
integrity check is never silently replaced: opening it raises `StateCorrupt` with the
way to recover.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from arcbox_vm.errors import StateCorrupt, StateError
from arcbox_vm.ports.storage import StoredEvent

__all__ = ["StateCorrupt", "StateError", "StateStore", "StoredEvent"]

SCHEMA_VERSION = 3

# Each entry upgrades the schema from version i to i+1 (index i). Append only.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,              -- JSON: resolved resources, labels, env, ...
        workdir TEXT NOT NULL,
        vmm TEXT NOT NULL DEFAULT '',
        pid INTEGER,                     -- VMM process; with pid_start it cannot be confused
        pid_start INTEGER,               -- with a recycled pid (start time in clock ticks)
        lease TEXT,                      -- JSON NetworkLease or NULL
        created_at REAL NOT NULL,
        ready_at REAL,
        last_exited_at REAL,
        last_exit_code INTEGER,
        error TEXT,
        removing INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE leases (
        ip TEXT PRIMARY KEY,
        sandbox_id TEXT NOT NULL
    );
    CREATE TABLE execs (
        sandbox_id TEXT NOT NULL,
        channel INTEGER NOT NULL,
        argv TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        exit_code INTEGER,
        status TEXT NOT NULL,            -- running, detached, exited, ended, lost
        PRIMARY KEY (sandbox_id, channel)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox_id TEXT NOT NULL,
        action TEXT NOT NULL,
        ts_ns INTEGER NOT NULL,
        attributes TEXT NOT NULL
    );
    """,
    # 2: checkpoints (snapshots of sandboxes) and per-sandbox snapshot facts (restored from,
    # paused, suspended to disk, warm pool) as JSON in `extra`
    """
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        sandbox_id TEXT NOT NULL,        -- the sandbox it was taken of
        created_at REAL NOT NULL,
        size_bytes INTEGER NOT NULL,
        dir TEXT NOT NULL,               -- its files (<data dir>/checkpoints/<id>)
        meta TEXT NOT NULL,              -- JSON: the machine, the VMM's snapshot facts, defaults
        hidden INTEGER NOT NULL DEFAULT 0  -- made for a fork or the warm pool: not listed
    );
    ALTER TABLE sandboxes ADD COLUMN extra TEXT;
    """,
    # 3: templates (a checkpoint of a sandbox booted from a built root disk) and the layer
    # cache they are built from (one root disk image per Dockerfile step, keyed by content)
    """
    CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        key TEXT NOT NULL,               -- content key: the last layer's + START + READY + defaults
        checkpoint_id TEXT NOT NULL,     -- a hidden checkpoint owned by the template
        created_at REAL NOT NULL,
        meta TEXT NOT NULL               -- JSON: base, steps, layers, defaults, machine, build time
    );
    CREATE TABLE template_layers (
        key TEXT PRIMARY KEY,            -- sha256 of the parent's key, the step and its inputs
        parent TEXT NOT NULL,
        step TEXT NOT NULL,
        path TEXT NOT NULL,              -- <data dir>/templates/layers/<key>.ext4
        size_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        used_at REAL NOT NULL
    );
    """,
]


SANDBOX_COLUMNS = ("id", "state", "spec", "workdir", "vmm", "pid", "pid_start", "lease", "created_at", "ready_at",
                   "last_exited_at", "last_exit_code", "error", "removing", "extra")


def _insert(table: str, cols: tuple[str, ...], replace: bool = False) -> str:
    """`INSERT [OR REPLACE] INTO table (cols) VALUES (?, ...)` (names are ours, never input)."""
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    return f"{verb} INTO {table} ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})"


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A query's rows as column-name → value dicts."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


class StateStore:
    """Thin, synchronous (fast, local) access to the state database."""

    FILENAME = "state.db"

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / self.FILENAME
        self._db: sqlite3.Connection | None = None

    # -- opening ---------------------------------------------------------------------

    def open(self) -> None:
        recover = (f"move it aside (mv {self.path} {self.path}.corrupt) to start with an empty state "
                   "— VMs it knew are then cleaned up as orphans — or restore it from a backup")
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.OperationalError as exc:
            # not damage: the data dir cannot be written (read-only, full, permissions)
            raise StateError(f"the state database {self.path} cannot be opened for writing ({exc}): check that "
                             f"{self.path.parent} is writable and not full") from None
        except sqlite3.DatabaseError as exc:
            raise StateCorrupt(f"the state database {self.path} cannot be opened ({exc}); {recover}") from None
        if check != "ok":
            db.close()
            raise StateCorrupt(f"the state database {self.path} failed its integrity check ({check}); {recover}")
        self._db = db
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:
            db.close()
            self._db = None
            raise StateCorrupt(f"the state database {self.path} has an unexpected schema ({exc}); {recover}") from None

    def _migrate(self) -> None:
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(f"the state database {self.path} has schema version {version}, newer than this "
                             f"arcbox-vm ({SCHEMA_VERSION}); upgrade arcbox-vm")
        for target in range(version, SCHEMA_VERSION):
            # one transaction per step: a crash mid-migration leaves the previous version
            try:
                db.executescript(f"BEGIN IMMEDIATE;{MIGRATIONS[target]};PRAGMA user_version={target + 1};COMMIT;")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError("the state database is not open")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- writing ---------------------------------------------------------------------

    class _Tx:
        def __init__(self, store: "StateStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store.db.execute("BEGIN IMMEDIATE")
            return self.store.db

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if exc_type is None:
                try:
                    self.store.db.execute("COMMIT")
                    return
                except sqlite3.Error:
                    self.store.db.execute("ROLLBACK")
                    raise
            self.store.db.execute("ROLLBACK")

    def transaction(self) -> "StateStore._Tx":
        return StateStore._Tx(self)

    def _write(self, fn: Any) -> Any:
        """Run `fn(db)` in a transaction; storage failures become StateError."""
        try:
            with self.transaction() as db:
                return fn(db)
        except sqlite3.OperationalError as exc:
            msg = str(exc)
            hint = ("the data dir is full" if "full" in msg else
                    "the data dir is read-only" if "readonly" in msg or "read-only" in msg else msg)
            raise StateError(f"cannot record the change in {self.path}: {hint}; nothing was changed") from None

    def put_sandbox(self, rec: dict[str, Any], lease_ip: str | None = None) -> None:
        """Insert or replace a sandbox record (and its lease, if given) atomically."""
        cols = SANDBOX_COLUMNS

        def fn(db: sqlite3.Connection) -> None:
            db.execute(_insert("sandboxes", cols, replace=True),
                       [rec.get(c) if c != "removing" else int(bool(rec.get(c))) for c in cols])
            db.execute("DELETE FROM leases WHERE sandbox_id = ?", (rec["id"],))
            if lease_ip:
                db.execute("INSERT INTO leases (ip, sandbox_id) VALUES (?, ?)", (lease_ip, rec["id"]))

        self._write(fn)

    def delete_sandbox(self, sandbox_id: str) -> None:
        def fn(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
            db.execute("DELETE FROM leases WHERE sandbox_id = ?", (sandbox_id,))
            db.execute("DELETE FROM execs WHERE sandbox_id = ?", (sandbox_id,))

        self._write(fn)

    def rename_sandbox(self, old_id: str, rec: dict[str, Any], lease_ip: str | None = None) -> None:
        """Replace the record `old_id` by `rec` (another id) in one transaction."""
        cols = SANDBOX_COLUMNS

        def fn(db: sqlite3.Connection) -> None:
            for table, key in (("sandboxes", "id"), ("leases", "sandbox_id"), ("execs", "sandbox_id")):
                db.execute(f"DELETE FROM {table} WHERE {key} = ?", (old_id,))
            db.execute(_insert("sandboxes", cols),
                       [rec.get(c) if c != "removing" else int(bool(rec.get(c))) for c in cols])
            if lease_ip:
                db.execute("INSERT OR REPLACE INTO leases (ip, sandbox_id) VALUES (?, ?)", (lease_ip, rec["id"]))

        self._write(fn)

    # -- checkpoints -------------------------------------------------------------------

    def put_checkpoint(self, row: dict[str, Any]) -> None:
        cols = ("id", "name", "sandbox_id", "created_at", "size_bytes", "dir", "meta", "hidden")
        self._write(lambda db: db.execute(
            _insert("checkpoints", cols),
            [int(bool(row.get(c))) if c == "hidden" else row.get(c) for c in cols]))

    def delete_checkpoint(self, checkpoint_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint_id,)))

    def checkpoints(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM checkpoints ORDER BY created_at")
        return _dicts(cur)

    # -- templates and their layer cache ------------------------------------------------

    def put_template(self, row: dict[str, Any]) -> None:
        """Insert or replace (a rebuild) the template `row["name"]`."""
        cols = ("name", "key", "checkpoint_id", "created_at", "meta")
        self._write(lambda db: db.execute(
            _insert("templates", cols, replace=True),
            [row[c] for c in cols]))

    def delete_template(self, name: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM templates WHERE name = ?", (name,)))

    def templates(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM templates ORDER BY created_at")
        return _dicts(cur)

    def put_layer(self, row: dict[str, Any]) -> None:
        cols = ("key", "parent", "step", "path", "size_bytes", "created_at", "used_at")
        self._write(lambda db: db.execute(
            _insert("template_layers", cols, replace=True),
            [row[c] for c in cols]))

    def touch_layer(self, key: str) -> None:
        self._write(lambda db: db.execute("UPDATE template_layers SET used_at = ? WHERE key = ?", (time.time(), key)))

    def delete_layer(self, key: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM template_layers WHERE key = ?", (key,)))

    def layers(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM template_layers ORDER BY created_at")
        return _dicts(cur)

    def layer(self, key: str) -> dict[str, Any] | None:
        """One layer's row by its key (the primary key: no scan)."""
        cur = self.db.execute("SELECT * FROM template_layers WHERE key = ?", (key,))
        rows = _dicts(cur)
        return rows[0] if rows else None

    def append_event(self, sandbox_id: str, action: str, attributes: dict[str, str],
                     ts_ns: int | None = None) -> StoredEvent:
        ts = ts_ns if ts_ns is not None else time.time_ns()

        def fn(db: sqlite3.Connection) -> int:
            cur = db.execute("INSERT INTO events (sandbox_id, action, ts_ns, attributes) VALUES (?, ?, ?, ?)",
                             (sandbox_id, action, ts, json.dumps(attributes, sort_keys=True)))
            return int(cur.lastrowid)

        return StoredEvent(self._write(fn), sandbox_id, action, ts, dict(attributes))

    def put_exec(self, sandbox_id: str, channel: int, argv: list[str]) -> None:
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO execs (sandbox_id, channel, argv, started_at, status) VALUES (?, ?, ?, ?, 'running')",
            (sandbox_id, channel, json.dumps(argv), time.time())))

    def finish_exec(self, sandbox_id: str, channel: int, exit_code: int | None, status: str) -> None:
        self._write(lambda db: db.execute(
            "UPDATE execs SET finished_at = ?, exit_code = ?, status = ? WHERE sandbox_id = ? AND channel = ?",
            (time.time(), exit_code, status, sandbox_id, channel)))

    def set_exec_status(self, sandbox_id: str, channel: int, status: str) -> None:
        self._write(lambda db: db.execute(
            "UPDATE execs SET status = ? WHERE sandbox_id = ? AND channel = ?", (status, sandbox_id, channel)))

    # -- reading ---------------------------------------------------------------------

    def max_exec_channel(self, sandbox_id: str) -> int:
        row = self.db.execute("SELECT MAX(channel) FROM execs WHERE sandbox_id = ?", (sandbox_id,)).fetchone()
        return int(row[0] or 0)

    def sandboxes(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM sandboxes ORDER BY created_at")
        return _dicts(cur)

    def leases(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT ip, sandbox_id FROM leases").fetchall())

    def execs(self, sandbox_id: str | None = None, status: str | tuple[str, ...] | None = None,
              channel: int | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM execs WHERE 1=1", []
        if sandbox_id is not None:
            q, args = q + " AND sandbox_id = ?", args + [sandbox_id]
        if channel is not None:
            q, args = q + " AND channel = ?", args + [channel]
        if status is not None:
            wanted = (status,) if isinstance(status, str) else tuple(status)
            q, args = q + f" AND status IN ({','.join('?' * len(wanted))})", args + list(wanted)
        cur = self.db.execute(q + " ORDER BY started_at", args)
        return _dicts(cur)

    def events_since(self, after_id: int, limit: int = 1000) -> list[StoredEvent]:
        rows = self.db.execute(
            "SELECT id, sandbox_id, action, ts_ns, attributes FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit)).fetchall()
        return [StoredEvent(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def iter_events_since(self, after_id: int) -> Iterator[StoredEvent]:
        while True:
            batch = self.events_since(after_id)
            if not batch:
                return
            yield from batch
            after_id = batch[-1].id

    def last_event_id(self) -> int:
        row = self.db.execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def first_event_id(self) -> int:
        row = self.db.execute("SELECT MIN(id) FROM events").fetchone()
        return int(row[0] or 0)

    def trim_events(self, up_to_id: int) -> None:
        """Delete events with id <= `up_to_id` (the log keeps only the newest)."""
        self._write(lambda db: db.execute("DELETE FROM events WHERE id <= ?", (up_to_id,)))
