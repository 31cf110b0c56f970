"""The sync `e2b` SDK end to end, in its own process (test_e2b_local.py runs it: the sync
SDK blocks in native code, so it cannot share a process with the in-process daemon).
Prints the results as one JSON line. E2B_API_KEY / E2B_API_URL / E2B_SANDBOX_URL come
from the environment; argv[1] is the test's work directory."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from e2b import CommandExitException, Sandbox, SandboxQuery
from e2b.exceptions import TimeoutException
from e2b.sandbox.commands.command_handle import PtySize


def sync_session(work: Path) -> dict:
    """The sync SDK end to end; returns what the test checks."""
    out: dict = {}
    home = work.parent / "home"  # the "guest" is this host: its login shells must not read our profile
    home.mkdir(exist_ok=True)
    sbx = Sandbox.create(timeout=120, metadata={"suite": "e2b-local", "flavour": "sync"},
                         envs={"FROM_CREATE": "c", "HOME": str(home)})
    try:
        r = sbx.commands.run("echo hi; echo oops >&2")
        out["run"] = (r.stdout, r.stderr, r.exit_code)
        try:
            sbx.commands.run("echo before; exit 3")
            out["exit"] = None
        except CommandExitException as exc:
            out["exit"] = (exc.exit_code, exc.stdout)
        out["env"] = sbx.commands.run("echo $FROM_CREATE-$MINE", envs={"MINE": "m"}).stdout
        out["cwd"] = sbx.commands.run("pwd", cwd=str(work)).stdout
        out["root"] = sbx.commands.run("id -u", user="root").stdout if os.geteuid() == 0 else "0\n"
        seen: list[str] = []
        sbx.commands.run("for i in 1 2 3; do echo line$i; sleep 0.05; done", on_stdout=seen.append)
        out["streamed"] = "".join(seen)
        t0 = time.monotonic()
        try:
            sbx.commands.run("sleep 30", timeout=1)
        except TimeoutException:
            pass
        out["timeout_s"] = time.monotonic() - t0

        bg = sbx.commands.run("sleep 60", background=True)
        out["listed"] = bg.pid in [p.pid for p in sbx.commands.list()]
        out["killed"] = bg.kill()
        try:
            bg.wait()
        except CommandExitException:
            out["killed_exit"] = True
        out["kill_unknown"] = sbx.commands.kill(999999)

        cat = sbx.commands.run("cat", background=True, stdin=True)
        sbx.commands.send_stdin(cat.pid, "piped\n")
        sbx.commands.close_stdin(cat.pid)
        out["stdin"] = cat.wait().stdout

        # files
        f = str(work / "dir" / "hello.txt")
        info = sbx.files.write(f, "hello file")
        out["write_info"] = (info.name, info.path)
        out["read_text"] = sbx.files.read(f)
        blob = os.urandom(10 << 20)
        sbx.files.write(str(work / "big.bin"), blob)
        out["big_ok"] = bytes(sbx.files.read(str(work / "big.bin"), format="bytes")) == blob
        out["exists"] = (sbx.files.exists(f), sbx.files.exists(str(work / "nope")))
        out["make_dir"] = (sbx.files.make_dir(str(work / "made" / "deep")), sbx.files.make_dir(str(work / "made")))
        out["list"] = sorted(e.name for e in sbx.files.list(str(work)))
        out["list_deep"] = sorted(e.path for e in sbx.files.list(str(work / "made"), depth=2))
        renamed = sbx.files.rename(f, str(work / "moved.txt"))
        out["rename"] = (renamed.name, sbx.files.exists(f))
        gi = sbx.files.get_info(str(work / "moved.txt"))
        out["get_info"] = (gi.name, str(gi.type), gi.size)
        sbx.files.remove(str(work / "made"))
        out["removed"] = sbx.files.exists(str(work / "made"))

        # watch_dir (sync: CreateWatcher / GetWatcherEvents)
        wd = work / "watched"
        wd.mkdir()
        handle = sbx.files.watch_dir(str(wd))
        sbx.files.write(str(wd / "new.txt"), "x")
        events = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.name == "new.txt" for e in events):
            time.sleep(0.2)
            events += handle.get_new_events()
        handle.stop()
        out["watch"] = sorted({(e.name, e.type.name) for e in events})

        # pty
        chunks: list[bytes] = []
        pty = sbx.pty.create(PtySize(rows=24, cols=80), cwd=str(work))
        sbx.pty.resize(pty.pid, PtySize(rows=30, cols=100))
        sbx.pty.send_stdin(pty.pid, b"stty size; exit\n")
        pty.wait(on_pty=chunks.append)
        out["pty"] = b"".join(chunks).decode(errors="replace")

        # the control plane
        listed = Sandbox.list(query=SandboxQuery(metadata={"flavour": "sync"})).next_items()
        out["list_ids"] = [s.sandbox_id for s in listed]
        out["list_none"] = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"flavour": "nope"})).next_items()]
        gi2 = sbx.get_info()
        out["info"] = (gi2.sandbox_id, gi2.metadata, gi2.template_id, str(getattr(gi2.state, "value", gi2.state)))
        out["metrics"] = min(m.cpu_count for m in sbx.get_metrics())
        out["paused"] = sbx.pause() if hasattr(sbx, "pause") else False
        out["running"] = sbx.is_running()
        again = Sandbox.connect(sbx.sandbox_id)
        out["connect"] = again.commands.run("echo again").stdout
        out["id"] = sbx.sandbox_id
    finally:
        out["kill"] = sbx.kill()
    out["kill_again"] = Sandbox.kill(out["id"])
    return out




if __name__ == "__main__":
    print(json.dumps(sync_session(Path(sys.argv[1]))))
