"""Observability without a VM: the daemon (`daemon.serve`) in-process over the local VMM
test double, its Prometheus endpoint scraped over HTTP on 127.0.0.1 and parsed with
prometheus_client's parser, `arcbox-vm stats` and `arcbox-vm health` as subprocesses
against its socket, the gRPC health service, the structured lifecycle log lines, and the
resource-usage reader on fake and real cgroups.

With the local driver the "VMM" is the guest agent's host process and cgroups are off
(`daemon.cgroup_parent = ""`), so per-sandbox usage comes from the process-tree fallback;
the cgroup path is tested on the reader directly (and with QEMU in tests/vm/test_metrics_vm.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import arcbox_vm
from arcbox_vm import SandboxManager, VmmConfig
from arcbox_vm.client import AsyncClient
from arcbox_vm.config import AgentConfig, DaemonConfig, DefaultVmConfig, GrpcConfig, MetricsConfig
from arcbox_vm.errors import BootFailed, ConfigError, ExecError, SandboxNotFound
from arcbox_vm.logctx import JsonFormatter, LogfmtFormatter, SandboxIdFilter
from arcbox_vm.vmm.cgroup import SandboxCgroups, find_cgroup2_mount
from arcbox_vm.vmm.usage import VmmUsageReader
from tests.support.local_daemon import Serving, free_port
from tests.support.local_vmm import LocalDriver, NoImageBuild, alive, descendants

SOURCE_ROOT = Path(arcbox_vm.__file__).resolve().parents[1]
STATES = ("starting", "ready", "running", "stopping", "stopped", "failed")
ACTIONS = ("created", "ready", "running", "idle", "stopping", "stopped", "failed", "removed")
BUSY = ["sh", "-c", "while :; do :; done"]



class ListHandler(logging.Handler):
    """Keeps the formatted lines of the lifecycle logger."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.addFilter(SandboxIdFilter())
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class MetricsDaemon:
    """`serve()` as a task of the test's loop, with [metrics] on a free loopback port."""

    def __init__(self, root: Path, runtime: Path, metrics: bool = True) -> None:
        (root / "vmlinuz").write_bytes(b"not a kernel")
        (root / "rootfs.img").write_bytes(b"not a filesystem")
        self.socket = runtime / "d.sock"
        self.port = free_port()
        self.config = VmmConfig(
            data_dir=root / "data",
            grpc=GrpcConfig(unix_socket=str(self.socket)),
            defaults=DefaultVmConfig(kernel=str(root / "vmlinuz"), rootfs=str(root / "rootfs.img")),
            daemon=DaemonConfig(cgroup_parent="", on_shutdown="remove"),
            agent=AgentConfig(hello_timeout_s=15, keepalive_interval_s=0.5, keepalive_timeout_s=5),
            metrics=MetricsConfig(addr=f"127.0.0.1:{self.port}" if metrics else ""),
        )
        self.manager = SandboxManager(self.config, driver=LocalDriver())
        self.images = NoImageBuild()
        self.manager.adapters.images = self.images
        self.serving = Serving()
        self.pids: set[int] = set()

    async def start(self) -> "MetricsDaemon":
        await self.serving.start(self.config, self.manager)
        return self

    async def stop(self) -> None:
        await self.serving.stop()

    def client(self) -> AsyncClient:
        return AsyncClient(socket=self.socket)

    def remember(self, sid: str) -> None:
        """Note the sandbox's processes: the teardown checks they are gone."""
        pid = self.manager.inspect_sandbox(sid).pid
        if pid:
            self.pids.update([pid, *descendants(pid)])

    async def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """GET /metrics over HTTP, parsed: sample name -> [(labels, value)]."""
        def get() -> tuple[str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as resp:
                return resp.headers.get("Content-Type", ""), resp.read().decode()

        content_type, text = await asyncio.to_thread(get)
        assert content_type.startswith("text/plain"), content_type
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), s.value))
        return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The one sample `name` with exactly these labels (AssertionError if none)."""
    found = [v for lbl, v in samples.get(name, []) if lbl == labels]
    assert len(found) == 1, f"{name}{labels}: {samples.get(name)}"
    return found[0]


def sandboxes_in(samples: dict) -> set[str]:
    return {lbl["sandbox"] for series in samples.values() for lbl, _ in series if "sandbox" in lbl}


@pytest_asyncio.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator:
    """A factory of started daemons; everything they made is gone afterwards."""
    runtime = Path(tempfile.mkdtemp(prefix="abm"))  # short: Unix socket paths are limited
    monkeypatch.setenv("ARCBOX_VM_RUNTIME_DIR", str(runtime))
    made: list[MetricsDaemon] = []

    async def make(metrics: bool = True) -> MetricsDaemon:
        d = MetricsDaemon(tmp_path, runtime, metrics)
        made.append(d)
        return await d.start()

    try:
        yield make
    finally:
        for d in made:
            with contextlib.suppress(Exception):
                await d.stop()
            await d.manager.close()
        pids = {p for d in made for p in d.pids}
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [p for p in pids if alive(p)]
        for p in left:
            os.kill(p, 9)
        shutil.rmtree(runtime, ignore_errors=True)
    assert not left, f"processes outlived the daemon's sandboxes: {left}"
    assert all(d.images.calls == 0 for d in made)


async def create_ready(d: MetricsDaemon, client: AsyncClient, *ids: str) -> None:
    for sid in ids:
        await client.create(id=sid, network="none")
    for sid in ids:
        await client.wait_ready(sid, timeout=15)
        d.remember(sid)


def cli(*args: str) -> list[str]:
    """`arcbox-vm ARGS` run by this interpreter on the tree under test."""
    return [sys.executable, "-m", "arcbox_vm.cli.main", *args]


async def run_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCBOX_VM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = await asyncio.create_subprocess_exec(*cli(*args), env=env, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


# -- the endpoint ------------------------------------------------------------------------------


async def test_two_sandboxes_and_three_commands_are_counted_exactly(daemon) -> None:
    d = await daemon()
    async with d.client() as client:
        await create_ready(d, client, "m-a", "m-b")
        for sid, cmd in (("m-a", ["true"]), ("m-a", ["sh", "-c", "exit 0"]), ("m-b", ["true"])):
            assert (await client.run(sid, cmd, timeout=10)).exit_code == 0
        m = await d.scrape()

    assert {s: value(m, "arcbox_sandboxes", state=s) for s in STATES} == {
        "starting": 0, "ready": 2, "running": 0, "stopping": 0, "stopped": 0, "failed": 0}
    assert {r: value(m, "arcbox_execs_total", result=r) for r in ("ok", "failed", "timeout", "error", "rejected")} \
        == {"ok": 3, "failed": 0, "timeout": 0, "error": 0, "rejected": 0}
    assert value(m, "arcbox_exec_seconds_count") == 3
    assert 0 < value(m, "arcbox_exec_seconds_sum") < 30
    assert value(m, "arcbox_exec_seconds_bucket", le="+Inf") == 3
    assert {a: value(m, "arcbox_events_total", action=a) for a in ACTIONS} == {
        "created": 2, "ready": 2, "running": 3, "idle": 3, "stopping": 0, "stopped": 0, "failed": 0, "removed": 0}
    assert value(m, "arcbox_sandbox_create_seconds_count", source="cold") == 2
    assert value(m, "arcbox_sandbox_ready_seconds_count", source="cold") == 2
    assert 0 < value(m, "arcbox_sandbox_ready_seconds_sum", source="cold") < 30
    assert value(m, "arcbox_sandbox_ready_seconds_bucket", source="cold", le="+Inf") == 2
    for kind in ("unresponsive", "disconnected", "no_hello", "reconnect"):
        assert value(m, "arcbox_agent_errors_total", kind=kind) == 0
    # per sandbox, read from the agent's process tree (cgroups are off here)
    assert sandboxes_in(m) == {"m-a", "m-b"}
    for sid in ("m-a", "m-b"):
        assert value(m, "arcbox_sandbox_cpu_seconds_total", sandbox=sid) > 0
        assert value(m, "arcbox_sandbox_memory_bytes", sandbox=sid) > 1 << 20  # a Python process
        assert value(m, "arcbox_sandbox_processes", sandbox=sid) >= 1
        for direction in ("read", "write"):
            assert value(m, "arcbox_sandbox_io_bytes_total", sandbox=sid, direction=direction) >= 0
    # the daemon's own process
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "process_cpu_seconds_total") > 0
    assert "python_info" in m


async def test_a_removed_sandbox_has_no_series_left(daemon) -> None:
    d = await daemon()
    async with d.client() as client:
        await create_ready(d, client, "r-keep", "r-gone")
        assert sandboxes_in(await d.scrape()) == {"r-keep", "r-gone"}
        await client.remove("r-gone")
        m = await d.scrape()
    assert sandboxes_in(m) == {"r-keep"}
    assert value(m, "arcbox_sandboxes", state="ready") == 1
    assert value(m, "arcbox_events_total", action="removed") == 1


async def test_exec_results_failed_timeout_rejected(daemon) -> None:
    d = await daemon()
    async with d.client() as client:
        await create_ready(d, client, "x")
        assert (await client.run("x", ["sh", "-c", "exit 3"], timeout=10)).exit_code == 3
        assert (await client.run("x", ["sleep", "30"], timeout=1)).timed_out
        with pytest.raises(ExecError):
            await client.run("x", ["/no/such/command"], timeout=10)
        m = await d.scrape()
    assert {r: value(m, "arcbox_execs_total", result=r) for r in ("ok", "failed", "timeout", "error", "rejected")} \
        == {"ok": 0, "failed": 1, "timeout": 1, "error": 0, "rejected": 1}
    assert value(m, "arcbox_exec_seconds_count") == 2  # a rejected command never ran


async def test_agent_errors_are_counted_by_kind(daemon) -> None:
    """A "VMM" that exits before its agent says HELLO (no_hello), and an agent frozen with
    SIGSTOP that stops answering the keepalive (unresponsive; 5 s here)."""
    d = await daemon()
    driver = d.manager.driver
    async with d.client() as client:
        driver.python = "/bin/false"  # exits at once: no agent, no HELLO
        try:
            await client.create(id="no-hello", network="none")
            with pytest.raises(BootFailed):
                await client.wait_ready("no-hello", timeout=15)
        finally:
            driver.python = sys.executable
        await create_ready(d, client, "frozen")
        events = await client.subscribe(id="frozen", action="failed")
        os.kill(d.manager.inspect_sandbox("frozen").pid, signal.SIGSTOP)
        failed = await asyncio.wait_for(anext(events), 20)
        await events.aclose()
        assert failed.attributes["reason"] == "agent_unresponsive"
        m = await d.scrape()
    assert {k: value(m, "arcbox_agent_errors_total", kind=k) for k in ("unresponsive", "disconnected", "no_hello",
                                                                     "reconnect")} == {
        "unresponsive": 1, "disconnected": 0, "no_hello": 1, "reconnect": 0}
    assert value(m, "arcbox_sandboxes", state="failed") == 2
    assert value(m, "arcbox_events_total", action="failed") == 2
    assert value(m, "arcbox_sandbox_ready_seconds_count", source="cold") == 1  # only the one that got ready


async def test_cpu_seconds_of_a_busy_sandbox_rise_through_the_process_tree_fallback(daemon) -> None:
    d = await daemon()
    async with d.client() as client:
        await create_ready(d, client, "busy")
        exec_id = await client.start("busy", BUSY)
        d.remember("busy")
        try:
            (stats,) = await client.stats(["busy"])
            assert stats.source == "processes"  # cgroups are off: the agent's process tree
            first = value(await d.scrape(), "arcbox_sandbox_cpu_seconds_total", sandbox="busy")
            second = first
            for _ in range(40):  # a busy loop gets 0.5 CPU-s within 2 s alone, later on a loaded 2-core machine
                await asyncio.sleep(0.25)
                second = value(await d.scrape(), "arcbox_sandbox_cpu_seconds_total", sandbox="busy")
                if second - first > 0.5:
                    break
        finally:
            await client.signal("busy", exec_id)
    assert second - first > 0.5, (first, second)


# -- stats, health, config, logs ------------------------------------------------------------------


async def test_stats_cli_no_stream_json_lists_both_sandboxes(daemon) -> None:
    d = await daemon(metrics=False)  # the Stats RPC needs no metrics endpoint
    assert not d.manager.observers.steps, "metrics off: nothing attached"
    async with d.client() as client:
        await create_ready(d, client, "s-a", "s-b")
        code, out, err = await run_cli("stats", "--no-stream", "--json", "--interval", "0.3", "--socket", str(d.socket))
        assert code == 0, err
        rows = json.loads(out)
        assert [r["id"] for r in rows] == ["s-a", "s-b"]
        for r in rows:
            assert r["memory_bytes"] > 0 and r["processes"] >= 1 and r["source"] == "processes"
            assert r["cpu_percent"] is not None and r["cpu_percent"] >= 0
            assert r["state"] == "ready"
        code, out, _ = await run_cli("stats", "s-b", "--no-stream", "--json", "--interval", "0.1",
                                     "--socket", str(d.socket))
        assert code == 0 and [r["id"] for r in json.loads(out)] == ["s-b"]
        code, out, _ = await run_cli("stats", "s-a", "--no-stream", "--interval", "0.1", "--socket", str(d.socket))
        assert code == 0 and "CPU %" in out and "s-a" in out and "MiB" in out
        code, _, err = await run_cli("stats", "nope", "--no-stream", "--socket", str(d.socket))
        assert code == 1 and "nope" in err
        with pytest.raises(SandboxNotFound):
            await client.stats(["nope"])


async def test_health_is_serving_then_not_serving_on_shutdown(daemon) -> None:
    d = await daemon(metrics=False)
    code, out, err = await run_cli("health", "--wait", "--timeout", "20", "--socket", str(d.socket))
    assert (code, out.strip()) == (0, "SERVING"), err
    async with grpc.aio.insecure_channel(f"unix:{d.socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sandbox.v1.SandboxService"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.SERVING
        d.serving.stop_event.set()  # SIGTERM
        assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    await d.stop()
    code, out, _ = await run_cli("health", "--socket", str(d.socket))
    assert code == 1  # gone: not SERVING


async def test_health_wait_gives_up_without_a_daemon(tmp_path: Path) -> None:
    code, out, err = await run_cli("health", "--wait", "--timeout", "0.5", "--socket", str(tmp_path / "none.sock"))
    assert code == 1 and out.strip() == "UNAVAILABLE" and "cannot reach" in err


async def test_lifecycle_steps_are_one_structured_line_each_with_durations(daemon) -> None:
    as_json, as_logfmt = ListHandler(JsonFormatter()), ListHandler(LogfmtFormatter())
    steps = logging.getLogger("arcbox_vm.lifecycle")
    steps.addHandler(as_json)
    steps.addHandler(as_logfmt)
    old_level = steps.level
    steps.setLevel(logging.INFO)
    try:
        d = await daemon(metrics=False)
        async with d.client() as client:
            await create_ready(d, client, "log-1")
            await client.stop("log-1")
            await client.remove("log-1")
    finally:
        steps.removeHandler(as_json)
        steps.removeHandler(as_logfmt)
        steps.setLevel(old_level)
    lines = [json.loads(line) for line in as_json.lines]
    assert [(ln["event"], ln["sandbox"]) for ln in lines] == [
        (e, "log-1") for e in ("created", "ready", "stopping", "stopped", "removed")]
    by_event = {ln["event"]: ln for ln in lines}
    assert 0 <= by_event["created"]["create_seconds"] < 5
    ready = by_event["ready"]
    assert ready["state"] == "ready" and ready["msg"] == "ready"
    assert 0 < ready["hello_seconds"] <= ready["boot_seconds"] <= ready["ready_seconds"] < 30
    assert 0 < ready["launch_seconds"] <= ready["hello_seconds"]
    assert by_event["stopped"]["stop_seconds"] >= 0 and by_event["stopped"]["graceful"] in ("true", "false")
    assert by_event["removed"]["remove_seconds"] >= 0 and by_event["removed"]["reason"] == "user"
    logfmt_ready = next(line for line in as_logfmt.lines if " event=ready " in line)
    assert "sandbox=log-1 " in logfmt_ready and " ready_seconds=" in logfmt_ready and 'msg="ready"' in logfmt_ready


def test_metrics_config_is_off_by_default_and_validated(tmp_path: Path) -> None:
    assert VmmConfig().metrics.addr == ""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metrics]\naddr = "127.0.0.1:9464"\n')
    assert VmmConfig.from_file(cfg).metrics.addr == "127.0.0.1:9464"
    assert MetricsConfig(addr="[::1]:9464").addr == "[::1]:9464"
    for bad in ("9464", "127.0.0.1", "127.0.0.1:0", "host:99999", ":9464"):
        cfg.write_text(f'[metrics]\naddr = "{bad}"\n')
        with pytest.raises(ConfigError, match="metrics.addr"):
            VmmConfig.from_file(cfg)


async def test_a_taken_metrics_port_fails_the_start_clearly(tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="abm"))
    d = MetricsDaemon(tmp_path, runtime)
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", d.port))
            taken.listen()
            with pytest.raises(ConfigError, match="metrics.addr: cannot listen"):
                await d.start()
        assert not d.manager.observers.steps, "a failed start leaves no metrics attached"
        assert not d.socket.exists(), "nothing was served"
    finally:
        await d.manager.close()
        shutil.rmtree(runtime, ignore_errors=True)


# -- the usage reader on cgroups ------------------------------------------------------------------


def test_usage_from_cgroup_files_and_the_rss_and_proc_io_fallbacks(tmp_path: Path) -> None:
    """A cgroup directory as the kernel shows it: with the memory and io controllers
    (memory.current, io.stat), then without them (hybrid mode here): memory is then the
    RSS of the cgroup's processes and I/O their /proc/<pid>/io."""
    cgroups = SandboxCgroups(tmp_path / "root", tmp_path)
    cg = tmp_path / "root" / "sb"
    cg.mkdir(parents=True)
    (cg / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (cg / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (cg / "memory.current").write_text("123456789\n")
    (cg / "io.stat").write_text("8:0 rbytes=1000 wbytes=20 rios=3 wios=1 dbytes=0 dios=0\n"
                                "253:1 rbytes=24 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n")
    reader = VmmUsageReader(cgroups)
    u = reader.read([("sb", None)])["sb"]
    assert (u.cpu_seconds, u.memory_bytes, u.io_read_bytes, u.io_write_bytes, u.processes, u.source) == (
        2.5, 123456789, 1024, 22, 1, "cgroup")
    (cg / "memory.current").unlink()
    (cg / "io.stat").unlink()
    own_rss = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
    u = reader.read([("sb", None)])["sb"]
    assert u.source == "cgroup" and u.cpu_seconds == 2.5
    assert own_rss // 2 < u.memory_bytes < own_rss * 2
    own_io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    assert u.io_read_bytes >= int(own_io["read_bytes"]) and u.io_write_bytes >= int(own_io["write_bytes"])
    # an empty cgroup (the VMM could not be moved in): the process tree of the given pid
    (cg / "cgroup.procs").write_text("")
    assert reader.read([("sb", None)]) == {}
    u = reader.read([("sb", os.getpid())])["sb"]
    assert u.source == "processes" and u.processes >= 1 and u.memory_bytes > 0 and u.cpu_seconds > 0


def test_usage_of_a_process_tree_counts_children_and_what_they_reaped() -> None:
    """cgroups off: the VMM and everything below it; a child's CPU time stays counted
    after it exits (its parent's cutime)."""
    reader = VmmUsageReader(SandboxCgroups.off())
    burn = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.6: pass')"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.run([sys.executable, '-c', {burn!r}])\n"
                               "print('done', flush=True)\ntime.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "done"
        u = reader.read([("t", parent.pid)])["t"]
        assert u.source == "processes" and u.processes == 1 and u.cpu_seconds >= 0.6
        assert reader.read([("gone", 2**22 + 12345)]) == {}  # no such process
    finally:
        parent.kill()
        parent.wait()


def _writable_cgroup2() -> Path | None:
    mount = find_cgroup2_mount()
    if mount is None or mount.read_only or os.geteuid() != 0:
        return None
    return mount.path


@pytest.mark.skipif(_writable_cgroup2() is None, reason="needs a writable cgroup2 hierarchy (root)")
async def test_usage_from_a_real_cgroup_rises_with_a_busy_process() -> None:
    """On this machine's cgroup2 hierarchy (hybrid mode may have no controllers: memory is
    then the RSS sum): CPU from cpu.stat rises, memory is non-zero, one process."""
    cgroups = SandboxCgroups.open("arcbox-vm-unit", secrets.token_hex(4))
    assert cgroups.enabled
    busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        assert cgroups.place("busy", busy.pid)
        reader = VmmUsageReader(cgroups)
        first = second = reader.read([("busy", busy.pid)])["busy"]
        for _ in range(40):  # 0.3 CPU-s within 1 s alone; later on a loaded machine
            await asyncio.sleep(0.25)
            second = reader.read([("busy", busy.pid)])["busy"]
            if second.cpu_seconds - first.cpu_seconds > 0.3:
                break
        assert first.source == second.source == "cgroup" and second.processes == 1
        assert second.cpu_seconds - first.cpu_seconds > 0.3
        assert second.memory_bytes > 0
    finally:
        assert await cgroups.kill("busy")
        busy.wait()
        with contextlib.suppress(OSError):
            (cgroups.root.parent).rmdir()  # arcbox-vm-unit, if nothing else uses it


def test_the_log_formatters_render_fields() -> None:
    record = logging.LogRecord("arcbox_vm.lifecycle", logging.INFO, __file__, 1, "%s", ("ready",), None)
    record.fields = {"event": "ready", "boot_seconds": 1.25, "error": "a b\nc"}
    record.sandbox = "sb-1"
    line = json.loads(JsonFormatter().format(record))
    assert (line["sandbox"], line["event"], line["boot_seconds"], line["error"]) == ("sb-1", "ready", 1.25, "a b\nc")
    text = LogfmtFormatter().format(record)
    assert text.endswith(' event=ready boot_seconds=1.25 error="a b\\nc"') and "sandbox=sb-1 " in text


def test_the_systemd_unit_waits_for_serving_before_it_counts_as_started() -> None:
    unit = Path(__file__).resolve().parents[2] / "packaging" / "arcbox-vm.service"
    lines = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    start, post = lines["ExecStart"].split(), lines["ExecStartPost"].split()
    assert start[1] == "serve" and post[:3] == [start[0], "health", "--wait"]
    config = start[start.index("--config") + 1]
    assert post[post.index("--config") + 1] == config, "the check asks the daemon the unit starts"
    assert float(lines["TimeoutStartSec"]) > float(post[post.index("--timeout") + 1])
