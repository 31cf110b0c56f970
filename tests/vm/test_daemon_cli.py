"""The daemon CLI as a user runs it: real `arcbox-vm` processes against a real daemon
(`arcbox-vm serve` on a private socket, data dir and network namespace) booting real VMs.

One daemon and one sandbox serve the module (a boot takes seconds under emulation); the
tests run in file order and the last ones stop and remove the sandbox.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time

import pexpect
import pytest

from .daemon_helpers import ARCBOX as CLI
from .daemon_helpers import arcbox, module_daemon, ok

pytestmark = pytest.mark.vm

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, guest_image):
    """One `arcbox-vm serve` for the module; SIGTERM at the end must stop it cleanly and
    take its network namespace with it."""
    with module_daemon(tmp_path_factory.mktemp("cli-daemon"), guest_image, "10.242.0.0/24") as d:
        yield d



@pytest.fixture(scope="module")
def sid(daemon) -> str:
    """The module's sandbox, made by `create` (whose last stdout line is the id)."""
    out = ok(arcbox(daemon, "create", "--label", "suite=cli", "--label", "kind=shared", "-e", "GREETING=hi",
                    "-w", "/tmp", "--memory", "256"))
    sandbox_id = out.splitlines()[-1]
    assert ID_RE.match(sandbox_id), out
    return sandbox_id


def test_create_returns_a_ready_sandbox(daemon, sid):
    info = json.loads(ok(arcbox(daemon, "inspect", sid)))
    assert info["id"] == sid and info["state"] == "ready"
    assert info["labels"] == {"suite": "cli", "kind": "shared"}
    assert info["memory_mib"] == 256 and info["vmm"] == "qemu"
    assert info["network"]["ip_address"].startswith("10.242.0.")


def test_create_json_and_no_wait(daemon):
    out = json.loads(ok(arcbox(daemon, "create", "--no-wait", "--json", "--network", "none", "--id", "cli-nowait")))
    assert out == {"id": "cli-nowait", "state": "starting", "ip_address": ""}
    p = arcbox(daemon, "create", "--id", "cli-nowait")
    assert p.returncode == 1 and p.stderr.startswith(b"arcbox-vm: a sandbox with id 'cli-nowait' already exists")
    assert ok(arcbox(daemon, "rm", "-f", "cli-nowait")) == "cli-nowait\n"


def test_ls_table_json_and_filters(daemon, sid):
    table = ok(arcbox(daemon, "ls"))
    assert table.splitlines()[0].split() == ["ID", "STATE", "IP", "CREATED", "LABELS"]
    assert any(line.split()[:2] == [sid, "ready"] for line in table.splitlines()[1:])
    rows = json.loads(ok(arcbox(daemon, "ls", "--json")))
    assert [r["id"] for r in rows] == [sid] and rows[0]["labels"]["suite"] == "cli"
    assert ok(arcbox(daemon, "ls", "-q", "--label", "suite=cli", "--state", "ready")) == f"{sid}\n"
    assert ok(arcbox(daemon, "ls", "-q", "--label", "suite=other")) == ""
    p = arcbox(daemon, "ls", "--state", "sleepy")
    assert p.returncode == 1 and b"unknown state" in p.stderr


def test_exec_exit_codes_and_separate_streams(daemon, sid):
    p = arcbox(daemon, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (p.returncode, p.stdout, p.stderr) == (7, b"out\n", b"err\n")
    p = arcbox(daemon, "exec", sid, "--", "sh", "-c", 'echo "$GREETING $(pwd)"')  # the sandbox's -e / -w
    assert (p.returncode, p.stdout) == (0, b"hi /tmp\n")
    p = arcbox(daemon, "exec", "-e", "GREETING=yo", "-w", "/", "-u", "sandbox", sid, "--",
               "sh", "-c", 'echo "$GREETING $(pwd) $(id -un)"')
    assert p.stdout == b"yo / sandbox\n"
    p = arcbox(daemon, "exec", sid, "--", "no-such-command-xyz")
    assert p.returncode == 127 and p.stderr.startswith(b"arcbox-vm: no-such-command-xyz") and p.stdout == b""
    p = arcbox(daemon, "exec", "--timeout", "1", sid, "--", "sleep", "100")
    assert p.returncode == 124 and b"timed out" in p.stderr
    p = arcbox(daemon, "exec", "-i", sid, "--", "sh", "-c", "tr a-z A-Z; echo done >&2", input=b"piped\n")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"PIPED\n", b"done\n")
    p = arcbox(daemon, "exec", "-t", sid, "--", "sh", "-c", "tty; echo x >&2")  # tty: stderr joins stdout
    assert p.returncode == 0 and p.stdout.startswith(b"/dev/pts/") and b"x\r\n" in p.stdout


def test_exec_streams_output_as_it_comes(daemon, sid):
    env = dict(os.environ, ARCBOX_VM_SOCKET=str(daemon.socket))
    proc = subprocess.Popen([CLI, "exec", sid, "--", "sh", "-c", "echo first; sleep 3; echo second"],
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    t0 = time.monotonic()
    assert proc.stdout.readline() == b"first\n"
    first_after = time.monotonic() - t0
    assert proc.stdout.readline() == b"second\n"
    assert proc.wait(60) == 0
    assert time.monotonic() - t0 - first_after >= 1.5  # the first line did not wait for the end


def test_cp_64_mib_in_and_out(daemon, sid, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    ok(arcbox(daemon, "cp", str(src), f"{sid}:/tmp/big.bin"))
    assert ok(arcbox(daemon, "exec", sid, "--", "sha256sum", "/tmp/big.bin")).split()[0] == digest
    back = tmp_path / "back.bin"
    ok(arcbox(daemon, "cp", f"{sid}:/tmp/big.bin", str(back)))
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    # into a guest directory keeps the name; `-` is stdin / stdout
    ok(arcbox(daemon, "cp", str(src), f"{sid}:/root/"))
    assert ok(arcbox(daemon, "exec", sid, "--", "stat", "-c", "%s", "/root/big.bin")).strip() == str(64 << 20)
    ok(arcbox(daemon, "cp", "-", f"{sid}:/tmp/stdin.txt", input=b"from stdin\n"))
    assert arcbox(daemon, "cp", f"{sid}:/tmp/stdin.txt", "-").stdout == b"from stdin\n"
    p = arcbox(daemon, "cp", f"{sid}:/tmp/missing", str(tmp_path))
    assert p.returncode == 1 and p.stderr.count(b"\n") == 1 and b"/tmp/missing" in p.stderr


def test_exec_it_is_a_real_terminal(daemon, sid, tmp_path):
    """Through a pseudo-terminal, as a person types: raw mode, the size, resizing, and the
    local terminal restored afterwards (`stty -a` after the session shows icanon/echo)."""
    script = f'{CLI} exec -it {sid} -- sh; echo "exit=$?"; stty -a'
    child = pexpect.spawn("sh", ["-c", script], env=dict(os.environ, ARCBOX_VM_SOCKET=str(daemon.socket)),
                          dimensions=(30, 100), timeout=60)
    try:
        child.expect(r"# ")
        child.sendline("echo $((6*7))")
        child.expect(r"\r\n42\r\n")
        child.sendline("stty size")
        child.expect(r"30 100")
        child.setwinsize(40, 120)  # SIGWINCH → the CLI → the guest's terminal
        time.sleep(1)
        child.sendline("stty size")
        child.expect(r"40 120")
        child.sendline("exit 3")
        child.expect(r"exit=3")
        child.expect(pexpect.EOF)
        after = child.before.decode()
        assert re.search(r"(?<![-\w])icanon\b", after) and re.search(r"(?<![-\w])echo\b", after), after
    finally:
        child.close(force=True)


def test_logs_show_the_console(daemon, sid):
    out = arcbox(daemon, "logs", sid)
    assert out.returncode == 0 and b"arcbox-agent" in out.stdout


def test_events_stop_and_rm(daemon, sid):
    env = dict(os.environ, ARCBOX_VM_SOCKET=str(daemon.socket))
    follow = subprocess.Popen([CLI, "events", "-f", "--json", "--id", sid], stdout=subprocess.PIPE, env=env)
    logs = subprocess.Popen([CLI, "logs", "-f", sid], stdout=subprocess.DEVNULL, env=env)
    try:
        time.sleep(1)  # let the subscription reach the daemon
        ok(arcbox(daemon, "exec", sid, "--", "true"))
        assert ok(arcbox(daemon, "stop", "--timeout", "20", sid)) == f"{sid}\n"
        assert json.loads(ok(arcbox(daemon, "inspect", sid)))["state"] == "stopped"
        p = arcbox(daemon, "exec", sid, "--", "true")
        assert p.returncode == 1 and p.stderr.startswith(b"arcbox-vm: sandbox") and b"stopped" in p.stderr
        assert ok(arcbox(daemon, "rm", sid)) == f"{sid}\n"
        assert logs.wait(30) == 0  # `logs -f` ends with the sandbox
        seen: list[str] = []
        assert follow.stdout is not None
        while "removed" not in seen:
            line = follow.stdout.readline()
            assert line, f"events -f ended early after {seen}"
            ev = json.loads(line)
            assert ev["sandbox_id"] == sid and ev["id"] > 0
            seen.append(ev["action"])
        assert seen == ["running", "idle", "stopping", "stopped", "removed"], seen
        follow.send_signal(signal.SIGINT)
        assert follow.wait(30) == 0
    finally:
        for p in (follow, logs):
            if p.poll() is None:
                p.kill()
                p.wait()
    # without -f: the retained history, then it returns by itself
    p = arcbox(daemon, "events", "--since", "0", "--id", sid, "--idle", "1")
    assert p.returncode == 0
    actions = [line.split()[1] for line in p.stdout.decode().splitlines()]
    assert actions[0] == "created" and actions[-1] == "removed" and "ready" in actions


def test_errors_are_one_line_with_exit_code_1(daemon, tmp_path):
    for args in (("inspect", "no-such-sandbox"), ("rm", "no-such-sandbox"), ("logs", "no-such-sandbox"),
                 ("ls", "--socket", str(tmp_path / "no.sock")), ("cp", "a", "b")):
        p = arcbox(daemon, *args)
        assert p.returncode == 1, args
        assert p.stderr.startswith(b"arcbox-vm: ") and p.stderr.count(b"\n") == 1, (args, p.stderr)
        assert b"Traceback" not in p.stderr
