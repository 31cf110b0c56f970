"""A hostile guest against the real daemon: root in sandbox A takes the agent's channel
away from PID 1, freezes the agent and floods the host with 1 MiB PING frames, never
reading a byte (see hostile_guest_attack.py). The daemon must not pay for it:

- its memory (VmRSS) grows by less than RSS_GROWTH_LIMIT over FLOOD_S seconds of flooding;
- `rm -f A` returns within RM_LIMIT_S and leaves no process using A's directory;
- sandbox B runs commands during the attack and after it; the daemon keeps serving.

The attack cannot report back through the channel it took, so it writes to the serial
console and the test reads A's console.log on the host: no "flooding" line, no test.
A daemon that keeps growing is not left to take the machine with it: the flood is cut
short (by removing A) once the daemon grew BAIL_OUT.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb
from arcbox_vm.images import GuestImage

from .daemon_helpers import Daemon, memory_kib, processes_mentioning, wait_state, write_config
from .manager_helpers import netns_list

pytestmark = pytest.mark.vm

CLI = str(Path(sys.executable).with_name("arcbox-vm"))
ATTACK = (Path(__file__).with_name("hostile_guest_attack.py")).read_text()

MIB = 1 << 20
FLOOD_S = 20.0  # seconds of flooding the daemon's memory is watched for
RSS_GROWTH_LIMIT = 64 * MIB
RM_LIMIT_S = 15.0
BAIL_OUT = 1024 * MIB  # growth at which the flood is cut short (the test has failed by then)
ATTACK_START_S = 90.0  # for the "flooding" line (python3 starts slowly under emulation)


class Env:
    """One `arcbox-vm serve` on a private data dir, socket and network namespace."""

    def __init__(self, tmp: Path, image: GuestImage) -> None:
        self.data_dir = tmp / "data"
        self.netns = f"arcbox-t-{secrets.token_hex(3)}"
        cfg = write_config(tmp / "c.toml", image, self.data_dir, tmp / "d.sock", netns=self.netns,
                           cidr="10.246.0.0/24", on_shutdown="remove")
        self.daemon = Daemon(cfg, tmp / "d.sock", tmp / "daemon.log")
        self._consoles: dict[str, list] = {}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, ARCBOX_VM_SOCKET=str(self.daemon.socket))
        return subprocess.run([CLI, *args], check=False, capture_output=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def ok(self, *args: str, timeout: float = 120) -> str:
        p = self.cli(*args, timeout=timeout)
        assert p.returncode == 0, f"arcbox-vm {' '.join(args[:3])}: {p.stderr.decode()}"
        return p.stdout.decode()

    def workdir(self, sid: str) -> Path:
        return self.data_dir / "sandboxes" / sid

    def rss(self) -> int:
        return memory_kib(self.daemon.pid, "VmRSS") * 1024

    def console(self, sid: str) -> str:
        """Everything A's serial console said so far. The log is followed through a file
        descriptor opened once, so it stays readable after the sandbox's directory is gone
        (a daemon may well fail and remove a sandbox that floods it)."""
        follower = self._consoles.get(sid)
        if follower is None:
            follower = self._consoles[sid] = [open(self.workdir(sid) / "console.log", "rb"), bytearray()]  # noqa: SIM115
        f, seen = follower
        if os.fstat(f.fileno()).st_size < f.tell():  # capped (truncated) meanwhile
            f.seek(0)
        seen += f.read()
        return seen.decode(errors="replace")

    def clean_up(self) -> None:
        """Stop the daemon; if it will not stop, kill it and what it ran, and let a new daemon
        on the same data dir remove the rest (sandboxes, cgroups, the network namespace)."""
        for f, _ in self._consoles.values():
            f.close()
        d = self.daemon
        if d.proc is not None and d.proc.poll() is None:
            try:
                if d.stop(60) == 0:
                    return
            except subprocess.TimeoutExpired:
                d.kill9()
        for pid in processes_mentioning(self.data_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        d.start()
        for s in d.stub().List(pb.ListSandboxesRequest()).sandboxes:
            d.stub().Remove(pb.RemoveSandboxRequest(id=s.id, force=True), timeout=60)
        d.stop(60)


@pytest.fixture
def env(tmp_path, guest_image):
    e = Env(tmp_path, guest_image)
    e.daemon.start()
    try:
        yield e
    finally:
        e.clean_up()
    assert e.netns not in netns_list()
    assert processes_mentioning(e.data_dir) == []


class Prober(threading.Thread):
    """Runs `exec B -- echo` over and over while the attack goes on; records each result."""

    def __init__(self, env: Env, sid: str) -> None:
        super().__init__(daemon=True)
        self.env, self.sid = env, sid
        self.stop = threading.Event()
        self.results: list[tuple[bool, float, str]] = []  # (ok, seconds, what went wrong)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            t0 = time.monotonic()
            try:
                p = self.env.cli("exec", self.sid, "--", "echo", f"alive-{n}", timeout=60)
                good = p.returncode == 0 and p.stdout == f"alive-{n}\n".encode()
                why = "" if good else f"exit {p.returncode}: {p.stdout!r} {p.stderr.decode()[-300:]}"
            except subprocess.TimeoutExpired:
                good, why = False, "no answer within 60 s"
            self.results.append((good, time.monotonic() - t0, why))
            self.stop.wait(1.0)


def wait_for_console(env: Env, sid: str, pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        text = env.console(sid)
        failed = re.search(r"ATTACK: FAILED: .*", text)
        assert failed is None, f"the attack did not work: {failed.group(0)}"
        found = re.search(pattern, text)
        if found:
            return found
        assert time.monotonic() < deadline, f"no {pattern!r} on the console within {timeout:.0f} s: {text[-2000:]}"
        time.sleep(0.5)


def test_a_hostile_guest_cannot_hurt_the_daemon(env):
    a, b = "hostile-a", "hostile-b"
    for sid in (a, b):
        env.ok("create", "--no-wait", "--network", "none", "--memory", "256", "--id", sid)
    for sid in (a, b):
        wait_state(env.daemon.stub(), sid, ("ready",), timeout=240)
    assert env.ok("exec", b, "--", "echo", "before") == "before\n"

    env.console(a)  # follow A's console from now on
    baseline = env.rss()
    exec_id = env.ok("exec", "-d", a, "--", "python3", "-c", ATTACK).strip()
    started = wait_for_console(env, a, r"ATTACK: stole fd \d+ .*flooding", ATTACK_START_S)
    print(f"\nexec {exec_id} in {a}: {started.group(0).strip()}")

    prober = Prober(env, b)
    prober.start()
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = []
    while time.monotonic() - t0 < FLOOD_S:
        samples.append((time.monotonic() - t0, env.rss()))
        if samples[-1][1] - baseline > BAIL_OUT:
            break
        time.sleep(0.5)
    peak = max(rss for _, rss in samples)
    flooded_for = samples[-1][0]
    progress = re.findall(r"ATTACK: sent (\d+) frames", env.console(a))
    serving = env.cli("ls", "-q", timeout=60)

    rm_t0 = time.monotonic()
    rm = subprocess.Popen([CLI, "rm", "-f", a], env=dict(os.environ, ARCBOX_VM_SOCKET=str(env.daemon.socket)),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rm_out, rm_err = rm.communicate(timeout=120)  # waits past the limit only to report how long it took
    except subprocess.TimeoutExpired:
        rm.kill()
        rm_out, rm_err = rm.communicate()
    rm_took = time.monotonic() - rm_t0
    time.sleep(1)
    left = processes_mentioning(env.workdir(a))

    prober.stop.set()
    prober.join(90)
    after = env.cli("exec", b, "--", "echo", "after", timeout=60)
    ls_after = env.cli("ls", "-q", timeout=60)

    print(f"daemon VmRSS: {baseline / MIB:.0f} MiB before, peak {peak / MIB:.0f} MiB "
          f"(+{(peak - baseline) / MIB:.0f} MiB) over {flooded_for:.1f} s of flooding")
    print("  samples (s, MiB): " + " ".join(f"{t:.0f}:{r / MIB:.0f}" for t, r in samples[::4]))
    print(f"guest frames sent (console): {progress[-1] if progress else 'no report yet'}")
    print(f"rm -f {a}: exit {rm.returncode} after {rm_took:.1f} s; processes left: {left}")
    print(f"exec in {b} during the attack: " + ", ".join(
        f"{'ok' if good else 'FAILED'} {secs:.1f}s" for good, secs, _ in prober.results))

    assert peak - baseline < RSS_GROWTH_LIMIT, \
        f"the daemon grew by {(peak - baseline) / MIB:.0f} MiB in {flooded_for:.1f} s of flooding"
    assert rm.returncode == 0 and rm_out.decode() == f"{a}\n", rm_err.decode()
    assert rm_took < RM_LIMIT_S, f"rm -f took {rm_took:.1f} s"
    assert left == [], f"processes still use {a}'s directory: {left}"
    assert prober.results and all(good for good, _, _ in prober.results), \
        f"exec in {b} failed during the attack: {[why for good, _, why in prober.results if not good]}"
    assert serving.returncode == 0 and a in serving.stdout.decode().split(), serving.stderr.decode()
    assert env.daemon.proc is not None and env.daemon.proc.poll() is None, "the daemon died"
    assert (after.returncode, after.stdout) == (0, b"after\n"), after.stderr.decode()
    assert ls_after.returncode == 0 and ls_after.stdout.decode().split() == [b], ls_after.stderr.decode()
