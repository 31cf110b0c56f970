"""Every request body the driver can build validates against both vendored Firecracker specs."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
from fc_spec import SPEC_FILES, load_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arcbox_vm.vmm.firecracker import bodies
from arcbox_vm.vmm.firecracker.bodies import ApiRequest, BodyError

TB = bodies.token_bucket(10485760, 1000, one_time_burst=52428800)
TB0 = bodies.token_bucket(0, 0)
RL = bodies.rate_limiter(bandwidth=TB, ops=bodies.token_bucket(1000, 100))

# (builder name, case id, thunk) -- every public builder needs at least one case (checked below)
CASES: list[tuple[str, str, Callable[[], ApiRequest]]] = [
    ("put_logger", "empty", lambda: bodies.put_logger()),
    ("put_logger", "path", lambda: bodies.put_logger(log_path="/run/fc.log")),
    ("put_logger", "all", lambda: bodies.put_logger("/fc.log", "Trace", True, True, "api_server::request")),
    *[
        ("put_logger", f"level-{lvl}", (lambda lvl=lvl: bodies.put_logger(level=lvl)))
        for lvl in ("Error", "Warning", "Info", "Debug", "Trace", "Off")
    ],
    ("put_metrics", "path", lambda: bodies.put_metrics("/fc.metrics")),
    ("put_machine_config", "minimal", lambda: bodies.put_machine_config(1, 128)),
    (
        "put_machine_config",
        "all",
        lambda: bodies.put_machine_config(
            2, 1024, smt=True, track_dirty_pages=True, huge_pages="2M", cpu_template="T2"
        ),
    ),
    (
        "put_machine_config",
        "none-hp",
        lambda: bodies.put_machine_config(32, 4096, huge_pages="None", cpu_template="None"),
    ),
    *[
        ("put_machine_config", f"tpl-{t}", (lambda t=t: bodies.put_machine_config(1, 256, cpu_template=t)))
        for t in ("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None")
    ],
    ("put_boot_source", "kernel", lambda: bodies.put_boot_source("/vmlinux")),
    (
        "put_boot_source",
        "all",
        lambda: bodies.put_boot_source(
            "/img/vmlinux", boot_args="console=ttyS0 reboot=k panic=1 pci=off", initrd_path="/img/initrd"
        ),
    ),
    ("put_boot_source", "empty-args", lambda: bodies.put_boot_source("/vmlinux", boot_args="")),
    (
        "put_drive",
        "root-rw",
        lambda: bodies.put_drive("rootfs", "/rootfs.ext4", is_root_device=True, is_read_only=False),
    ),
    (
        "put_drive",
        "all",
        lambda: bodies.put_drive(
            "data_1",
            "/d.img",
            is_root_device=False,
            is_read_only=True,
            partuuid="0eaa91a0-01",
            cache_type="Writeback",
            io_engine="Async",
            rate_limiter=RL,
        ),
    ),
    (
        "put_drive",
        "sync-unsafe",
        lambda: bodies.put_drive(
            "scratch",
            "/s.img",
            is_root_device=False,
            is_read_only=False,
            cache_type="Unsafe",
            io_engine="Sync",
            rate_limiter=bodies.rate_limiter(ops=TB0),
        ),
    ),
    ("put_vhost_user_drive", "root", lambda: bodies.put_vhost_user_drive("vu", "/vu.sock", is_root_device=True)),
    (
        "put_vhost_user_drive",
        "all",
        lambda: bodies.put_vhost_user_drive(
            "vu2", "/vu.sock", is_root_device=False, partuuid="abc", cache_type="Writeback"
        ),
    ),
    ("patch_drive", "path", lambda: bodies.patch_drive("rootfs", path_on_host="/new.img")),
    ("patch_drive", "limiter", lambda: bodies.patch_drive("rootfs", rate_limiter=RL)),
    ("patch_drive", "id-only", lambda: bodies.patch_drive("rootfs")),
    ("put_network_interface", "minimal", lambda: bodies.put_network_interface("eth0", "tap0")),
    (
        "put_network_interface",
        "all",
        lambda: bodies.put_network_interface(
            "eth0", "tap-sb-1", guest_mac="06:00:AC:10:00:02", mtu=1500, rx_rate_limiter=RL, tx_rate_limiter=RL
        ),
    ),
    ("put_network_interface", "mtu-bounds", lambda: bodies.put_network_interface("eth1", "tap1", mtu=68)),
    ("patch_network_interface", "rx", lambda: bodies.patch_network_interface("eth0", rx_rate_limiter=RL)),
    (
        "patch_network_interface",
        "both",
        lambda: bodies.patch_network_interface(
            "eth0", rx_rate_limiter=bodies.rate_limiter(), tx_rate_limiter=bodies.rate_limiter(bandwidth=TB0)
        ),
    ),
    ("put_vsock", "default", lambda: bodies.put_vsock(3, "/v.sock")),
    ("put_vsock", "max", lambda: bodies.put_vsock(2**32 - 2, "/run/v.sock")),
    ("put_entropy", "plain", lambda: bodies.put_entropy()),
    (
        "put_entropy",
        "limited",
        lambda: bodies.put_entropy(bodies.rate_limiter(bandwidth=bodies.token_bucket(1000, 100, 0))),
    ),
    ("instance_action", "start", lambda: bodies.instance_action("InstanceStart")),
    ("instance_start", "start", lambda: bodies.instance_start()),
    ("send_ctrl_alt_del", "cad", lambda: bodies.send_ctrl_alt_del()),
    ("flush_metrics", "flush", lambda: bodies.flush_metrics()),
    ("patch_vm_state", "paused", lambda: bodies.patch_vm_state("Paused")),
    ("pause_vm", "pause", lambda: bodies.pause_vm()),
    ("resume_vm", "resume", lambda: bodies.resume_vm()),
    ("create_snapshot", "full-default", lambda: bodies.create_snapshot("/snap/vmstate", "/snap/mem")),
    ("create_snapshot", "diff", lambda: bodies.create_snapshot("/s", "/m", snapshot_type="Diff")),
    ("create_snapshot", "full", lambda: bodies.create_snapshot("/s", "/m", snapshot_type="Full")),
    ("load_snapshot", "minimal", lambda: bodies.load_snapshot("/snap/vmstate", "/snap/mem")),
    (
        "load_snapshot",
        "all",
        lambda: bodies.load_snapshot(
            "/snap/vmstate",
            "/uffd.sock",
            mem_backend_type="Uffd",
            resume_vm=True,
            track_dirty_pages=True,
            network_overrides={"eth0": "tap-new"},
            vsock_override="/run/new.vsock",
            clock_realtime=True,
        ),
    ),
    (
        "load_snapshot",
        "overrides-list",
        lambda: bodies.load_snapshot(
            "/s", "/m", resume_vm=False, network_overrides=[("eth0", "tap1"), ("eth1", "tap2")]
        ),
    ),
]


@pytest.mark.parametrize("version", list(SPEC_FILES))
@pytest.mark.parametrize("name,case,build", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_builder_output_matches_spec(version: str, name: str, case: str, build: Callable[[], ApiRequest]) -> None:
    request = build()
    assert isinstance(request, ApiRequest)
    spec = load_spec(version)
    assert spec.validate(request.method, request.path, request.body) == []
    # ids in the path equal the ids in the body (Firecracker rejects a mismatch)
    route = spec.route(request.method, request.path)
    for param, value in route.params.items():
        assert request.body[param] == value


def test_every_builder_has_a_contract_case() -> None:
    covered = {name for name, _, _ in CASES}
    builders = {
        name
        for name, fn in inspect.getmembers(bodies, inspect.isfunction)
        if fn.__module__ == bodies.__name__
        and not name.startswith("_")
        and inspect.signature(fn).return_annotation in ("ApiRequest", ApiRequest)
    }
    assert builders, "no builders found"
    assert builders <= covered, f"builders without a contract case: {sorted(builders - covered)}"


def test_the_validator_rejects_unknown_fields_and_bad_values() -> None:
    """Sanity of the harness: it is strict the way Firecracker is."""
    for version in SPEC_FILES:
        spec = load_spec(version)
        assert spec.validate("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v", "extra": 1})
        assert spec.validate("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"})
        assert spec.validate("PUT", "/drives/x", {"drive_id": "x"})  # is_root_device missing
        assert spec.validate("PUT", "/actions", {"action_type": "Reboot"})
        assert spec.validate("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 1})
        assert spec.validate(
            "PUT", "/drives/x", {"drive_id": "x", "is_root_device": True, "rate_limiter": {"bandwidth": {"size": 1}}}
        )
        assert spec.validate("DELETE", "/vsock", None)
    # HEAD-only fields are rejected by the release spec, which is why the builders never emit them
    assert load_spec("HEAD").validate("PUT", "/metrics", {"metrics_path": "/m", "emit_id": True}) == []
    assert load_spec("v1.16.1").validate("PUT", "/metrics", {"metrics_path": "/m", "emit_id": True})
    assert load_spec("v1.16.1").validate(
        "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 2, "huge_pages": "Transparent"}
    )


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: bodies.put_machine_config(0, 128), "vcpu_count"),
        (lambda: bodies.put_machine_config(33, 128), "vcpu_count"),
        (lambda: bodies.put_machine_config(3, 128, smt=True), "1 or even"),
        (lambda: bodies.put_machine_config(1, 129, huge_pages="2M"), "multiple of 2"),
        (lambda: bodies.put_machine_config(1, 128, huge_pages="Transparent"), "huge_pages"),
        (lambda: bodies.put_machine_config(1, 0), "mem_size_mib"),
        (lambda: bodies.put_machine_config(True, 128), "vcpu_count"),
        (lambda: bodies.put_drive("root-fs", "/r", is_root_device=True, is_read_only=False), "only letters"),
        (lambda: bodies.put_drive("", "/r", is_root_device=True, is_read_only=False), "non-empty"),
        (lambda: bodies.put_drive("r", "", is_root_device=True, is_read_only=False), "path_on_host"),
        (lambda: bodies.put_drive("r", "/r", is_root_device=1, is_read_only=False), "is_root_device"),
        (lambda: bodies.put_drive("r", "/r", is_root_device=True, is_read_only=False, io_engine="Fast"), "io_engine"),
        (lambda: bodies.put_network_interface("eth0", "tap0", guest_mac="06:00:AC:10:00"), "guest_mac"),
        (lambda: bodies.put_network_interface("eth0", "tap0", guest_mac="01:00:5e:00:00:01"), "unicast"),
        (lambda: bodies.put_network_interface("eth0", "tap0", mtu=67), "mtu"),
        (lambda: bodies.put_network_interface("eth0", "a-very-long-tap-name"), "15 bytes"),
        (lambda: bodies.put_vsock(2, "/v"), "guest_cid"),
        (lambda: bodies.put_vsock(3, ""), "uds_path"),
        (lambda: bodies.put_logger(level="Verbose"), "logger.level"),
        (lambda: bodies.token_bucket(-1, 10), "size"),
        (lambda: bodies.token_bucket(1, 2**64), "refill_time"),
        (lambda: bodies.instance_action("Reboot"), "action_type"),
        (lambda: bodies.patch_vm_state("Stopped"), "vm.state"),
        (lambda: bodies.create_snapshot("/s", "/m", snapshot_type="Incremental"), "snapshot_type"),
        (lambda: bodies.load_snapshot("/s", "/m", mem_backend_type="Tmpfs"), "backend_type"),
        (lambda: bodies.load_snapshot("/s", "/m", network_overrides={"eth-0": "tap"}), "iface_id"),
        (lambda: bodies.put_boot_source("/k", boot_args="a\x00b"), "NUL"),
    ],
)
def test_builders_reject_values_firecracker_would_refuse(build, match) -> None:
    with pytest.raises(BodyError, match=match):
        build()


# ----------------------------------------------------------------------------- property-based

ids = st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True)
paths = st.from_regex(r"/[A-Za-z0-9_./-]{1,60}", fullmatch=True)
u64 = st.integers(0, 2**64 - 1)
buckets = st.builds(bodies.token_bucket, u64, u64, st.none() | u64)
limiters = st.builds(bodies.rate_limiter, st.none() | buckets, st.none() | buckets)
macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02X}" for x in [b[0] & 0xFE, *b[1:]])
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_everywhere(request: ApiRequest) -> None:
    for version in SPEC_FILES:
        assert load_spec(version).validate(request.method, request.path, request.body) == [], version


@SETTINGS
@given(
    vcpus=st.integers(1, 32),
    mem=st.integers(1, 2**20),
    smt=st.none() | st.booleans(),
    dirty=st.none() | st.booleans(),
    hp=st.none() | st.sampled_from(["None", "2M"]),
    tpl=st.none() | st.sampled_from(["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]),
)
def test_machine_config_ranges(vcpus, mem, smt, dirty, hp, tpl) -> None:
    try:
        request = bodies.put_machine_config(
            vcpus, mem, smt=smt, track_dirty_pages=dirty, huge_pages=hp, cpu_template=tpl
        )
    except BodyError as exc:  # only the documented combined constraints may refuse
        assert (smt and vcpus > 1 and vcpus % 2) or (hp == "2M" and mem % 2), exc
        return
    _valid_everywhere(request)


@SETTINGS
@given(
    drive_id=ids,
    path=paths,
    root=st.booleans(),
    ro=st.booleans(),
    part=st.none() | st.text(min_size=1, max_size=36).filter(lambda s: "\x00" not in s),
    cache=st.none() | st.sampled_from(["Unsafe", "Writeback"]),
    engine=st.none() | st.sampled_from(["Sync", "Async"]),
    limiter=st.none() | limiters,
)
def test_drive_options(drive_id, path, root, ro, part, cache, engine, limiter) -> None:
    _valid_everywhere(
        bodies.put_drive(
            drive_id,
            path,
            is_root_device=root,
            is_read_only=ro,
            partuuid=part,
            cache_type=cache,
            io_engine=engine,
            rate_limiter=limiter,
        )
    )
    _valid_everywhere(bodies.patch_drive(drive_id, path_on_host=path, rate_limiter=limiter))


@SETTINGS
@given(
    iface=ids,
    tap=st.from_regex(r"[a-z][a-z0-9-]{0,14}", fullmatch=True),
    mac=st.none() | macs,
    mtu=st.none() | st.integers(68, 65535),
    rx=st.none() | limiters,
    tx=st.none() | limiters,
)
def test_network_interface_options(iface, tap, mac, mtu, rx, tx) -> None:
    _valid_everywhere(
        bodies.put_network_interface(iface, tap, guest_mac=mac, mtu=mtu, rx_rate_limiter=rx, tx_rate_limiter=tx)
    )
    _valid_everywhere(bodies.patch_network_interface(iface, rx_rate_limiter=rx, tx_rate_limiter=tx))


@SETTINGS
@given(cid=st.integers(3, 2**32 - 2), path=paths, limiter=st.none() | limiters)
def test_vsock_and_entropy(cid, path, limiter) -> None:
    _valid_everywhere(bodies.put_vsock(cid, path))
    _valid_everywhere(bodies.put_entropy(limiter))


@SETTINGS
@given(cid=st.one_of(st.integers(max_value=2), st.integers(min_value=2**32 - 1)))
def test_vsock_cid_out_of_range(cid) -> None:
    with pytest.raises(BodyError):
        bodies.put_vsock(cid, "/v.sock")


@SETTINGS
@given(
    snap=paths,
    mem=paths,
    backend=st.sampled_from(["File", "Uffd"]),
    resume=st.none() | st.booleans(),
    dirty=st.none() | st.booleans(),
    clock=st.none() | st.booleans(),
    overrides=st.none() | st.dictionaries(ids, st.from_regex(r"[a-z0-9-]{1,15}", fullmatch=True), max_size=3),
    vsock=st.none() | paths,
    snap_type=st.none() | st.sampled_from(["Full", "Diff"]),
)
def test_snapshot_options(snap, mem, backend, resume, dirty, clock, overrides, vsock, snap_type) -> None:
    _valid_everywhere(bodies.create_snapshot(snap, mem, snapshot_type=snap_type))
    _valid_everywhere(
        bodies.load_snapshot(
            snap,
            mem,
            mem_backend_type=backend,
            resume_vm=resume,
            track_dirty_pages=dirty,
            network_overrides=overrides,
            vsock_override=vsock,
            clock_realtime=clock,
        )
    )


@SETTINGS
@given(
    path=st.none() | paths,
    level=st.none() | st.sampled_from(["Error", "Warning", "Info", "Debug", "Trace", "Off"]),
    show_level=st.none() | st.booleans(),
    origin=st.none() | st.booleans(),
    module=st.none() | st.from_regex(r"[a-z_:]{1,30}", fullmatch=True),
)
def test_logger_options(path, level, show_level, origin, module) -> None:
    _valid_everywhere(bodies.put_logger(path, level, show_level, origin, module))
