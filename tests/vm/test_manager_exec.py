"""Commands through SandboxManager on a real VM: interactive stdin, TTY and resize,
concurrent execs with RUNNING/READY bookkeeping, spec defaults for env/cwd/user."""

from __future__ import annotations

import asyncio

import pytest

from arcbox_vm import ExecError, SandboxManager, SandboxNetworkSpec, SandboxSpec, SandboxState

from .manager_helpers import make_config

pytestmark = pytest.mark.vm


async def test_interactive_tty_concurrency_and_defaults(backend, guest_image, tmp_path):
    mgr = SandboxManager(make_config(backend, guest_image, tmp_path))
    try:
        events = mgr.subscribe_events()
        sid, _ = await mgr.create_sandbox(SandboxSpec(
            network=SandboxNetworkSpec(mode="none"), env={"WHO": "spec"}, working_dir="/tmp", user="sandbox"))
        await mgr.wait_ready(sid)

        # spec defaults apply, per-call values override them
        out, _, code = await (await mgr.run_in_sandbox(sid, ["sh", "-c", 'echo $WHO $(pwd) $(id -un)'])).collect()
        assert (out, code) == (b"spec /tmp sandbox\n", 0)
        out, _, _ = await (await mgr.run_in_sandbox(sid, ["sh", "-c", "echo $WHO $(pwd) $(id -un)"],
                                                    env={"WHO": "call"}, working_dir="/", user="root")).collect()
        assert out == b"call / root\n"

        # interactive stdin, then EOF
        cat = await mgr.exec_in_sandbox(sid, ["cat"])
        await cat.send_stdin(b"line one\n")
        await cat.send_stdin(b"line two\n")
        await cat.close_stdin()
        out, _, code = await asyncio.wait_for(cat.collect(), 60)
        assert (out, code) == (b"line one\nline two\n", 0)

        # a TTY: sized at start, resized later, stdin typed into a shell
        sh = await mgr.exec_in_sandbox(sid, ["sh"], tty=True, tty_size=(100, 30), user="root")
        await sh.send_stdin(b"stty size; tty\n")
        seen = b""
        while b"/dev/pts/" not in seen:  # the shell answered: only now resize
            seen += (await asyncio.wait_for(sh.__anext__(), 60)).data
        assert b"30 100" in seen
        await sh.resize(120, 40)
        await sh.send_stdin(b"stty size; echo $((6*7)); exit 3\n")
        out, _, code = await asyncio.wait_for(sh.collect(), 60)
        text = out.decode(errors="replace")
        assert "40 120" in text and "42" in text
        assert code == 3

        # two at once: RUNNING while any runs, READY (and "idle") after the last
        a = await mgr.run_in_sandbox(sid, ["sleep", "1"])
        b = await mgr.run_in_sandbox(sid, ["sleep", "2"])
        assert mgr.inspect_sandbox(sid).state == SandboxState.RUNNING
        await a.collect()
        assert mgr.inspect_sandbox(sid).state == SandboxState.RUNNING
        await b.collect()
        info = mgr.inspect_sandbox(sid)
        assert info.state == SandboxState.READY and info.last_exit_code == 0 and info.last_exited_at
        actions = []
        while True:
            ev = await events.recv(timeout=10)
            actions.append(ev.action)
            if actions[-2:] == ["running", "idle"] and actions.count("running") >= 3:
                break

        # a command that cannot start raises before any stream exists; state stays READY
        with pytest.raises(ExecError) as info_:
            await mgr.run_in_sandbox(sid, ["/no/such/binary"])
        assert info_.value.code == "not_found"
        with pytest.raises(ExecError) as info_:
            await mgr.run_in_sandbox(sid, ["true"], user="no-such-user")
        assert info_.value.code == "no_such_user"
        assert mgr.inspect_sandbox(sid).state == SandboxState.READY
    finally:
        await mgr.close()
