"""VmmConfig: defaults, TOML loading, errors that name the key."""

from __future__ import annotations

import pytest

from arcbox_vm import ConfigError, VmmConfig


def test_every_section_has_defaults():
    cfg = VmmConfig()
    assert cfg.backend == "auto"
    assert cfg.network.cidr == "172.20.0.0/16" and cfg.network.gateway == "172.20.0.1"
    assert cfg.network.dns == [], "no guest may call a resolver nobody configured"
    assert cfg.defaults.kernel == "" and cfg.defaults.rootfs == ""
    assert "init=/sbin/vm-agent" in cfg.defaults.boot_args


def test_from_file_reads_partial_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('backend = "qemu"\n[network]\ncidr = "10.5.0.0/24"\ngateway = "10.5.0.1"\nnat = true\n'
                 '[firecracker]\nlog_level = "Error"\nsocket_timeout_secs = 15\n[defaults]\nmemory_mib = 256\n')
    cfg = VmmConfig.from_file(p)
    assert cfg.backend == "qemu"
    assert cfg.network.cidr == "10.5.0.0/24" and cfg.network.nat
    assert cfg.firecracker.log_level == "Error"
    assert cfg.defaults.memory_mib == 256 and cfg.defaults.vcpus == 1


@pytest.mark.parametrize("text, key", [
    ('[network]\nbridge = "x"\n', "network.bridge"),
    ('[network]\ncidr = "300.1.0.0/16"\n', "network.cidr"),
    ('[network]\ncidr = "10.0.0.0/31"\n', "network.cidr"),
    ('[network]\ncidr = "10.0.0.0/24"\ngateway = "10.1.0.1"\n', "network"),
    ('[network]\ndns = ["not-an-ip"]\n', "network.dns"),
    ('[defaults]\nvcpus = 0\n', "defaults.vcpus"),
    ('backend = "xen"\n', "backend"),
    ('[firecracker]\nlog_level = "Loud"\n', "firecracker.log_level"),
    ('[grpc]\nport = 1\n', "grpc.port"),
    ('unknown = 1\n', "unknown"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        VmmConfig.from_file(p)
    assert key in str(info.value)
    assert str(p) in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        VmmConfig.from_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[network\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        VmmConfig.from_file(bad)


def test_seed_config_shape_is_accepted():
    cfg = VmmConfig.from_dict({
        "firecracker": {"binary": "/usr/bin/firecracker", "jailer": None, "data_dir": "/tmp/x", "log_level": "Error",
                        "no_seccomp": True, "seccomp_filter": None, "http_api_max_payload_size": None,
                        "mmds_size_limit": None, "socket_timeout_secs": 15},
        "network": {"cidr": "172.99.0.0/24", "gateway": "172.99.0.1", "dns": []},
        "grpc": {"unix_socket": "/dev/null", "tcp_addr": ""},
        "defaults": {"vcpus": 1, "memory_mib": 256, "kernel": "/k", "rootfs": "/r",
                     "boot_args": "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/vm-agent"},
    })
    assert str(cfg.data_dir) == "/tmp/x"


def test_data_dir_is_top_level_and_firecracker_data_dir_is_its_alias(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCBOX_VM_DATA_DIR", str(tmp_path / "env"))
    assert VmmConfig().data_dir == tmp_path / "env", "default: $ARCBOX_VM_DATA_DIR"
    assert VmmConfig.from_dict({"data_dir": "/srv/a"}).data_dir.as_posix() == "/srv/a"
    assert VmmConfig.from_dict({"firecracker": {"data_dir": "/srv/b"}}).data_dir.as_posix() == "/srv/b"
    assert VmmConfig.from_dict({"backend": "qemu", "firecracker": {"data_dir": "/srv/c"}}).data_dir.as_posix() == \
        "/srv/c", "the alias counts under QEMU too"
    with pytest.raises(ConfigError, match="disagree"):
        VmmConfig.from_dict({"data_dir": "/srv/a", "firecracker": {"data_dir": "/srv/b"}})


def test_one_default_for_memory_and_vcpus():
    from arcbox_vm.config import DEFAULT_MEMORY_MIB, DEFAULT_VCPUS

    d = VmmConfig().defaults
    assert (d.memory_mib, d.vcpus) == (DEFAULT_MEMORY_MIB, DEFAULT_VCPUS)


def test_discover_prefers_the_argument_then_the_environment(tmp_path, monkeypatch):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('backend = "qemu"\n')
    b.write_text('backend = "firecracker"\n')
    monkeypatch.setenv("ARCBOX_VM_CONFIG", str(b))
    assert VmmConfig.discover(a).backend == "qemu"
    assert VmmConfig.discover().backend == "firecracker"
    monkeypatch.setenv("ARCBOX_VM_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        VmmConfig.discover()


def test_run_reports_a_bad_config_file_with_exit_125(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "bad.toml"
    bad.write_text("[defaults]\nmemory_mb = 300\n")
    cli = Path(sys.executable).with_name("arcbox-vm")
    proc = subprocess.run([str(cli), "run", "--config", str(bad), "--", "true"], capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 125
    assert b"defaults.memory_mb: unknown key" in proc.stderr
