"""Commands in a real booted microVM, through our agent and protocol."""

from __future__ import annotations

import asyncio
import hashlib
import platform

import pytest

from arcbox_vm.agent.protocol import exec_request
from arcbox_vm.errors import ExecError

pytestmark = pytest.mark.vm


async def run(vm, argv, **kw):
    session = await vm.agent.exec(exec_request(argv, **kw))
    return await asyncio.wait_for(session.collect(), 120)


async def test_echo_output_and_exit_zero(shared_vm):
    out, err, status = await run(shared_vm, ["echo", "hello from vm"])
    assert out == b"hello from vm\n"
    assert err == b""
    assert status.exit_code == 0 and not status.timed_out


async def test_guest_kernel_is_not_the_hosts(shared_vm):
    out, _, status = await run(shared_vm, ["uname", "-r"])
    assert status.exit_code == 0
    assert out.decode().strip() == shared_vm.agent.kernel_release
    assert out.decode().strip() != platform.release()


async def test_nonzero_exit_code(shared_vm):
    _, _, status = await run(shared_vm, ["sh", "-c", "exit 7"])
    assert status.exit_code == 7


async def test_stderr_kept_apart_from_stdout(shared_vm):
    out, err, status = await run(shared_vm, ["sh", "-c", "echo to-out; echo to-err >&2; echo more-out"])
    assert out == b"to-out\nmore-out\n"
    assert err == b"to-err\n"
    assert status.exit_code == 0


async def test_env_workdir_and_user_applied(shared_vm):
    out, err, status = await run(
        shared_vm, ["sh", "-c", 'echo "$GREETING"; pwd; id -u; id -g'],
        env={"GREETING": "hi there"}, cwd="/tmp", user="sandbox",
    )
    assert status.exit_code == 0, err
    assert out.decode().splitlines() == ["hi there", "/tmp", "1000", "1000"]
    out, _, _ = await run(shared_vm, ["id", "-u"], user="nobody")
    assert out.strip() == b"65534"
    out, _, _ = await run(shared_vm, ["id", "-u"])
    assert out.strip() == b"0"


async def test_timeout_kills_command_and_its_children(shared_vm):
    loop = asyncio.get_running_loop()
    start = loop.time()
    _, _, status = await run(shared_vm, ["sh", "-c", "sleep 1000 & sleep 1001 & sleep 1002"], timeout=2)
    assert status.timed_out
    assert status.exit_code == 128 + 9
    assert loop.time() - start < 60
    out, _, _ = await run(shared_vm, ["sh", "-c", "ps -eo args | grep '^sleep 100' || true"])
    assert out == b"", f"children survived the timeout: {out!r}"


async def test_one_mib_of_output_is_byte_exact(shared_vm):
    script = "import sys,hashlib; d=bytes(range(256))*4096; sys.stdout.buffer.write(d); sys.stderr.write(hashlib.sha256(d).hexdigest())"
    out, err, status = await run(shared_vm, ["python3", "-c", script])
    assert status.exit_code == 0
    assert len(out) == 1 << 20
    assert out == bytes(range(256)) * 4096
    assert hashlib.sha256(out).hexdigest() == err.decode()


async def test_large_outputs_of_two_commands_at_once_are_byte_exact(shared_vm):
    """Two producers at once, stdout and stderr each, every byte in order (big reads into
    pooled frame buffers, several frames per write)."""
    script = ("import sys,hashlib,os; d=os.urandom(12<<20); e=os.urandom(3<<20); "
              "sys.stdout.buffer.write(d[:5<<20]); sys.stderr.buffer.write(e); sys.stdout.buffer.write(d[5<<20:]); "
              "sys.stderr.flush(); os.write(2, (hashlib.sha256(d).hexdigest() + hashlib.sha256(e).hexdigest()).encode())")
    results = await asyncio.gather(run(shared_vm, ["python3", "-c", script]), run(shared_vm, ["python3", "-c", script]))
    for out, err, status in results:
        assert status.exit_code == 0
        assert len(out) == 12 << 20 and len(err) == (3 << 20) + 128
        digests = err[3 << 20:].decode()
        assert hashlib.sha256(out).hexdigest() == digests[:64]
        assert hashlib.sha256(err[: 3 << 20]).hexdigest() == digests[64:]


async def test_missing_command_gives_clear_error(shared_vm):
    with pytest.raises(ExecError) as info:
        await asyncio.wait_for(shared_vm.agent.exec(exec_request(["no-such-command-xyz"])), 30)
    assert info.value.code == "not_found"
    assert "no-such-command-xyz" in str(info.value)
    # the agent keeps serving
    out, _, _ = await run(shared_vm, ["echo", "still here"])
    assert out == b"still here\n"


async def test_two_execs_at_once(shared_vm):
    slow = await shared_vm.agent.exec(exec_request(["sh", "-c", "sleep 2; echo slow"]))
    fast = await shared_vm.agent.exec(exec_request(["sh", "-c", "echo fast"]))
    fast_out, _, fast_status = await asyncio.wait_for(fast.collect(), 60)
    assert not slow.done, "the fast command should finish while the slow one still runs"
    slow_out, _, slow_status = await asyncio.wait_for(slow.collect(), 60)
    assert (fast_out, fast_status.exit_code) == (b"fast\n", 0)
    assert (slow_out, slow_status.exit_code) == (b"slow\n", 0)


async def test_stdin_is_delivered(shared_vm):
    session = await shared_vm.agent.exec(exec_request(["sha256sum"], stdin=True))
    data = bytes(range(256)) * 1024
    await session.write_stdin(data)
    await session.close_stdin()
    out, _, status = await asyncio.wait_for(session.collect(), 60)
    assert status.exit_code == 0
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_ping(shared_vm):
    rtt = await shared_vm.agent.ping()
    assert 0 < rtt < 10
