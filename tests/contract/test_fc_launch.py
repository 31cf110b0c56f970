"""The driver's full launch path against the fake `firecracker` executable.

The fake validates every body against both vendored specs, enforces the phase rules,
binds the vsock `uds_path`, and dials `<uds_path>_52` with an agent HELLO after
InstanceStart, so these tests exercise process.py + api.py + driver.py end to end.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest
from fake_firecracker import FAKE_FIRECRACKER, PHASES
from fc_spec import load_spec, validate_all

from arcbox_vm.agent.protocol import FrameDecoder, MsgType
from arcbox_vm.errors import BootFailed, FirecrackerApiError, VmmError
from arcbox_vm.ports import AgentEndpoint, MachineSpec, VmmDriver, VmmProcess
from arcbox_vm.vmm.firecracker import FirecrackerConfig, FirecrackerDriver
from arcbox_vm.vmm.firecracker import cmdline as fc_cmdline
from arcbox_vm.vmm.firecracker.driver import check_cmdline_length, compose_boot_args
from arcbox_vm.vmm.procfs import pid_alive

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
EXPECTED = [
    "PUT /logger",
    "PUT /metrics",
    "PUT /machine-config",
    "PUT /boot-source",
    "PUT /drives/rootfs",
    "PUT /vsock",
    "PUT /entropy",
    "PUT /actions",
]


def make_spec(files, **kw) -> MachineSpec:
    args = dict(
        sandbox_id="sb-1",
        workdir=files.workdir,
        kernel=files.kernel,
        rootfs=files.rootfs,
        boot_args=BOOT_ARGS,
        vcpus=2,
        memory_mib=256,
    )
    args.update(kw)
    return MachineSpec(**args)


def driver(**cfg) -> FirecrackerDriver:
    cfg.setdefault("binary", FAKE_FIRECRACKER)
    cfg.setdefault("socket_timeout_secs", 10)
    return FirecrackerDriver(FirecrackerConfig(**cfg))


def leftovers(workdir: Path, endpoint: AgentEndpoint) -> list[str]:
    return sorted(p.name for p in workdir.iterdir() if p != endpoint.listen_path)


def alive(pid: int) -> bool:
    return pid_alive(pid)


def test_driver_implements_the_port() -> None:
    d = driver()
    assert isinstance(d, VmmDriver)
    assert d.name == "firecracker"
    assert d.kernel_for(Path("/img/bzImage"), Path("/img/vmlinux")) == Path("/img/vmlinux")
    ep = d.agent_endpoint(Path("/var/lib/arcbox-vm/sandboxes/abc"))
    assert ep.listen_path == Path("/var/lib/arcbox-vm/sandboxes/abc/v.sock_52")
    assert ep.boot_arg == "arcbox.channel=vsock:52"


async def test_full_launch_sequence(fake_env, vm_files, agent_sink_factory) -> None:
    d = driver(log_level="Info")
    spec = make_spec(
        vm_files, initrd=vm_files.initrd, extra_boot_args=("ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off",)
    )
    ep = d.agent_endpoint(vm_files.workdir)
    sink = await agent_sink_factory(ep.listen_path)
    proc = await d.launch(spec, ep)
    try:
        assert isinstance(proc, VmmProcess)
        assert proc.returncode is None and alive(proc.pid)
        reqs = fake_env.requests()
        assert [f"{r['method']} {r['path']}" for r in reqs] == EXPECTED
        # every body valid for both spec versions (checked by the fake and again here), all 204
        for r in reqs:
            assert r["status"] == 204, r
            assert r["spec_errors"] == {}
            assert validate_all(r["method"], r["path"], r["body"]) == {}
        bodies = {r["path"]: r["body"] for r in reqs}
        assert reqs[-1]["body"] == {"action_type": "InstanceStart"}
        assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 256}
        boot = bodies["/boot-source"]
        assert boot["kernel_image_path"] == str(vm_files.kernel)
        assert boot["initrd_path"] == str(vm_files.initrd)
        assert boot["boot_args"] == (
            f"{BOOT_ARGS} ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off arcbox.channel=vsock:52"
        )
        assert "root=" not in boot["boot_args"]
        assert bodies["/drives/rootfs"] == {
            "drive_id": "rootfs",
            "path_on_host": str(vm_files.rootfs),
            "is_root_device": True,
            "is_read_only": False,
        }
        vsock = bodies["/vsock"]
        assert vsock["guest_cid"] == 3
        assert f"{vsock['uds_path']}_52" == str(ep.listen_path)
        assert stat.S_ISSOCK(os.stat(vsock["uds_path"]).st_mode)  # bound by "Firecracker"
        # the log file comes from --log-path; PUT /logger must not re-open it (no O_APPEND)
        assert bodies["/logger"] == {"level": "Info", "show_level": True, "show_log_origin": False}
        assert bodies["/metrics"] == {"metrics_path": str(vm_files.workdir / "firecracker.metrics")}
        # the "guest agent" dialled <uds_path>_52 and said HELLO
        await asyncio.wait_for(sink.got_data.wait(), 5)
        frames = FrameDecoder().feed(bytes(sink.data))
        assert frames and frames[0].type == MsgType.HELLO
        # serial console (Firecracker's stdout) went to the per-VM console log
        for _ in range(50):
            if "Linux version" in proc.console_log.read_text():
                break
            await asyncio.sleep(0.02)
        assert "Linux version" in proc.console_log.read_text()
        assert proc.console_log.parent == vm_files.workdir
        assert "Running Firecracker" in (vm_files.workdir / "firecracker.log").read_text()
    finally:
        await proc.kill()
        await proc.cleanup()
    assert proc.returncode == -9
    assert not alive(proc.pid)
    assert leftovers(vm_files.workdir, ep) == []


def test_request_order_is_allowed_by_the_phase_rules(vm_files) -> None:
    """Everything before InstanceStart is a pre-boot call, InstanceStart is last, ids are valid."""
    d = driver()
    spec = make_spec(vm_files, tap_name="tap0", guest_mac="06:00:0a:00:00:02", initrd=vm_files.initrd)
    reqs = d.plan_requests(spec, d.agent_endpoint(vm_files.workdir))
    head = load_spec("HEAD")
    for r in reqs[:-1]:
        template = head.route(r.method, r.path).template
        assert PHASES.get((r.method, template)) != "post", r
    assert (reqs[-1].method, reqs[-1].path, reqs[-1].body) == ("PUT", "/actions", {"action_type": "InstanceStart"})
    assert [str(r) for r in reqs][:2] == ["PUT /logger", "PUT /metrics"]
    assert "PUT /network-interfaces/eth0" in [str(r) for r in reqs]
    for r in reqs:
        assert validate_all(r.method, r.path, r.body) == {}


async def test_launch_with_tap(fake_env, vm_files, agent_sink_factory) -> None:
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files, tap_name="tap-sb1", guest_mac="06:00:AC:10:00:02"), ep)
    try:
        calls = fake_env.calls()
        assert calls == EXPECTED[:5] + ["PUT /network-interfaces/eth0"] + EXPECTED[5:]
        net = next(r["body"] for r in fake_env.requests() if r["path"] == "/network-interfaces/eth0")
        assert net == {"iface_id": "eth0", "host_dev_name": "tap-sb1", "guest_mac": "06:00:AC:10:00:02"}
    finally:
        await proc.kill()
        await proc.cleanup()


@pytest.mark.parametrize(
    "shape,failing,message",
    [
        ("fault_message", "/vsock", "Cannot create backend for vsock device: injected"),
        ("error", "/boot-source", "Request payload with size 9999 is larger than the limit"),
        ("text", "/actions", "Internal Server Error: not json at all"),
        ("fault_message", "/drives/{drive_id}", "Unable to create the block device: injected"),
    ],
)
async def test_api_errors_raise_and_leave_nothing(
    fake_env, vm_files, agent_sink_factory, shape, failing, message
) -> None:
    fake_env.fail("PUT", failing, shape=shape, message=message, status=400)
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    with pytest.raises(FirecrackerApiError) as info:
        await d.launch(make_spec(vm_files), ep)
    err = info.value
    assert err.fault_message == message
    assert err.status == 400 and err.method == "PUT"
    assert message in str(err)
    assert fake_env.requests()[-1]["status"] == 400
    # process killed, sockets/log files removed; only the caller's agent socket stays
    assert not alive(fake_env.requests()[-1]["pid"])
    assert leftovers(vm_files.workdir, ep) == []
    assert ep.listen_path.exists()


async def test_empty_error_body(fake_env, vm_files) -> None:
    fake_env.fail("PUT", "/machine-config", shape="empty", status=400)
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    with pytest.raises(FirecrackerApiError, match="empty response body"):
        await d.launch(make_spec(vm_files), ep)


async def test_payload_limit_gives_http_layer_error(fake_env, vm_files) -> None:
    """A real `{"error": ...}` body from the HTTP layer: the boot-source body exceeds the limit."""
    d = driver(http_api_max_payload_size=120)
    ep = d.agent_endpoint(vm_files.workdir)
    spec = make_spec(vm_files, boot_args=BOOT_ARGS + " " + "x" * 200)
    with pytest.raises(FirecrackerApiError) as info:
        await d.launch(spec, ep)
    assert info.value.path == "/boot-source"
    assert "larger than the limit of 120" in info.value.fault_message
    assert "--http-api-max-payload-size" in fake_env.argv()
    assert leftovers(vm_files.workdir, ep) == []


async def test_early_exit_is_reported_with_exit_code(fake_env, vm_files) -> None:
    fake_env.set("FAKE_FC_EXIT_AT_START", "7")
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    with pytest.raises(BootFailed) as info:
        await d.launch(make_spec(vm_files), ep)
    text = str(info.value)
    assert "exited with code 7" in text
    assert "simulated start-up failure" in text  # last log/console lines are included
    assert leftovers(vm_files.workdir, ep) == []


async def test_rejected_flag_fails_fast_with_exit_code(fake_env, vm_files, monkeypatch) -> None:
    real = fc_cmdline.firecracker_options
    monkeypatch.setattr(fc_cmdline, "firecracker_options", lambda *a, **k: real(*a, **k) + ["--no-such-flag"])
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    with pytest.raises(BootFailed, match="exited with code 153"):
        await d.launch(make_spec(vm_files), ep)
    assert leftovers(vm_files.workdir, ep) == []


async def test_vmm_dying_mid_configuration(fake_env, vm_files) -> None:
    fake_env.set("FAKE_FC_DIE_ON", "PUT /vsock")
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    with pytest.raises(BootFailed, match=r"exited with code 9 during PUT /vsock") as info:
        await d.launch(make_spec(vm_files), ep)
    assert "simulated crash" in str(info.value)
    assert leftovers(vm_files.workdir, ep) == []


async def test_cancelled_launch_leaves_nothing(fake_env, vm_files) -> None:
    fake_env.set("FAKE_FC_STARTUP_DELAY", "5")
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    task = asyncio.ensure_future(d.launch(make_spec(vm_files), ep))
    for _ in range(100):  # wait until the process is running
        await asyncio.sleep(0.02)
        if fake_env.argv_file.exists():
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid_dirs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    for p in pid_dirs:
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        assert str(vm_files.workdir / "fc.sock").encode() not in cmd
    assert leftovers(vm_files.workdir, ep) == []


async def test_api_socket_timeout(fake_env, vm_files) -> None:
    fake_env.set("FAKE_FC_STARTUP_DELAY", "3")
    d = driver(socket_timeout_secs=0.3)
    ep = d.agent_endpoint(vm_files.workdir)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(BootFailed, match=r"did not open its API socket .* within 0.3s"):
        await d.launch(make_spec(vm_files), ep)
    assert loop.time() - t0 < 2.5
    assert leftovers(vm_files.workdir, ep) == []


async def test_stale_sockets_are_unlinked(fake_env, vm_files, agent_sink_factory) -> None:
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    for name in ("fc.sock", "v.sock"):  # sockets left behind by a crashed run
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(vm_files.workdir / name))
        s.close()
        assert (vm_files.workdir / name).exists()
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    try:
        assert fake_env.calls() == EXPECTED
    finally:
        await proc.kill()
        await proc.cleanup()


async def test_request_stop_sends_ctrl_alt_del(fake_env, vm_files, agent_sink_factory) -> None:
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    exited = proc.exited
    await proc.request_stop()
    assert await asyncio.wait_for(proc.wait(), 5) == 0  # reboot=k: Firecracker exits 0
    assert await exited == 0
    assert fake_env.requests()[-1]["body"] == {"action_type": "SendCtrlAltDel"}
    assert fake_env.requests()[-1]["status"] == 204
    await proc.request_stop()  # no-op once it has exited
    assert "exited with code 0" in proc.describe_exit()
    await proc.cleanup()
    assert leftovers(vm_files.workdir, ep) == []


async def test_kill_and_cleanup(fake_env, vm_files, agent_sink_factory) -> None:
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    assert sorted(leftovers(vm_files.workdir, ep)) == [
        "console.log",
        "fc.sock",
        "firecracker.log",
        "firecracker.metrics",
        "v.sock",
    ]
    await proc.kill()
    assert proc.returncode == -9
    await proc.cleanup()
    await proc.cleanup()  # idempotent
    assert leftovers(vm_files.workdir, ep) == []
    assert ep.listen_path.exists()  # the caller's socket is the caller's


async def test_post_boot_api_through_the_process(fake_env, vm_files, agent_sink_factory) -> None:
    from arcbox_vm.vmm.firecracker import bodies

    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    try:
        await proc.send(bodies.pause_vm())
        assert (await proc.api.get("/"))["state"] == "Paused"
        await proc.send(bodies.resume_vm())
        await proc.send(bodies.flush_metrics())
        with pytest.raises(FirecrackerApiError, match="not supported after starting"):
            await proc.send(bodies.put_vsock(3, str(vm_files.workdir / "other.sock")))
    finally:
        await proc.kill()
        await proc.cleanup()


@pytest.mark.parametrize(
    "cfg,expected",
    [
        ({}, []),
        ({"log_level": "debug"}, ["--level", "Debug"]),
        ({"no_seccomp": True}, ["--no-seccomp"]),
        ({"http_api_max_payload_size": 1048576}, ["--http-api-max-payload-size", "1048576"]),
        ({"mmds_size_limit": 65536}, ["--mmds-size-limit", "65536"]),
        (
            {"log_level": "Warning", "no_seccomp": True, "http_api_max_payload_size": 200000, "mmds_size_limit": 4096},
            [
                "--level",
                "Warning",
                "--no-seccomp",
                "--http-api-max-payload-size",
                "200000",
                "--mmds-size-limit",
                "4096",
            ],
        ),
    ],
)
async def test_config_options_become_cli_flags(fake_env, vm_files, agent_sink_factory, cfg, expected) -> None:
    d = driver(**cfg)
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files, sandbox_id="sb_1.x"), ep)
    try:
        argv = fake_env.argv()
        assert argv[1:7] == [
            "--api-sock",
            str(vm_files.workdir / "fc.sock"),
            "--id",
            "sb-1-x",
            "--log-path",
            str(vm_files.workdir / "firecracker.log"),
        ]
        assert argv[7:] == expected
    finally:
        await proc.kill()
        await proc.cleanup()


async def test_seccomp_filter_flag(fake_env, vm_files, agent_sink_factory, short_dir) -> None:
    bpf = short_dir / "filter.bpf"
    bpf.write_bytes(b"\0" * 8)
    d = driver(seccomp_filter=bpf)
    ep = d.agent_endpoint(vm_files.workdir)
    await agent_sink_factory(ep.listen_path)
    proc = await d.launch(make_spec(vm_files), ep)
    try:
        assert fake_env.argv()[7:] == ["--seccomp-filter", str(bpf)]
    finally:
        await proc.kill()
        await proc.cleanup()


async def test_missing_seccomp_filter_fails_with_exit_code(fake_env, vm_files, short_dir) -> None:
    d = driver(seccomp_filter=short_dir / "missing.bpf")
    ep = d.agent_endpoint(vm_files.workdir)
    with pytest.raises(BootFailed, match=r"exited with code 1\b"):
        await d.launch(make_spec(vm_files), ep)


async def test_inputs_are_checked_before_spawning(fake_env, vm_files) -> None:
    d = driver()
    ep = d.agent_endpoint(vm_files.workdir)
    with pytest.raises(VmmError, match="kernel .* does not exist"):
        await d.launch(make_spec(vm_files, kernel=vm_files.kernel.with_name("nope")), ep)
    with pytest.raises(VmmError, match="vcpu_count must be an integer between 1 and 32"):
        await d.launch(make_spec(vm_files, vcpus=64), ep)
    with pytest.raises(VmmError, match="guest_mac"):
        await d.launch(make_spec(vm_files, tap_name="tap0", guest_mac="not-a-mac"), ep)
    with pytest.raises(VmmError, match="does not end in '_52'"):
        await d.launch(make_spec(vm_files), AgentEndpoint(vm_files.workdir / "agent.sock", "arcbox.channel=vsock:52"))
    with pytest.raises(VmmError, match="binary .* does not exist"):
        await FirecrackerDriver(FirecrackerConfig(binary=vm_files.workdir / "firecracker")).launch(
            make_spec(vm_files), ep
        )
    assert fake_env.requests() == []
    assert leftovers(vm_files.workdir, ep) == []


def test_boot_args_composition_and_limit(vm_files) -> None:
    ep = AgentEndpoint(Path("/x/v.sock_52"), "arcbox.channel=vsock:52")
    spec = make_spec(vm_files, boot_args="  console=ttyS0  ", extra_boot_args=("", "arcbox.hostname=a"))
    assert compose_boot_args(spec, ep) == "console=ttyS0 arcbox.hostname=a arcbox.channel=vsock:52"
    check_cmdline_length("x" * 1800, devices=4)
    with pytest.raises(VmmError, match=r"2048-byte x86 limit"):
        check_cmdline_length("x" * 1900, devices=4)
    d = driver()
    with pytest.raises(VmmError, match="exceed the 2048-byte"):
        d.plan_requests(make_spec(vm_files, boot_args="a" * 2040), d.agent_endpoint(vm_files.workdir))


def test_socket_path_length_is_checked(tmp_path) -> None:
    deep = tmp_path / ("d" * 100)
    with pytest.raises(VmmError, match="too long for a Unix socket"):
        driver().agent_endpoint(deep)
