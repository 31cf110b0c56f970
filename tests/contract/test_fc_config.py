"""FirecrackerConfig / JailerConfig: defaults, validation messages, the original's usage."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from arcbox_vm.vmm.firecracker import FirecrackerConfig, JailerConfig


def test_defaults() -> None:
    cfg = FirecrackerConfig()
    assert cfg.binary == Path("/usr/bin/firecracker")
    assert cfg.jailer is None and cfg.log_level is None and cfg.no_seccomp is False
    assert cfg.seccomp_filter is None and cfg.http_api_max_payload_size is None and cfg.mmds_size_limit is None
    assert cfg.socket_timeout_secs is None and cfg.api_socket_timeout == 5.0
    j = JailerConfig(uid=100, gid=100)
    assert j.binary == Path("/usr/bin/jailer") and j.chroot_base_dir == Path("/srv/jailer")
    assert j.netns is None and j.new_pid_ns is False and j.cgroup_version is None
    assert j.parent_cgroup is None and j.resource_limits == [] and j.cgroups == []


def test_seed_e2e_usage() -> None:
    """The original's e2e test config (arcbox-vm 0.4.10) loads unchanged."""
    cfg = FirecrackerConfig.model_validate(
        {
            "binary": "/opt/fc/firecracker",
            "jailer": None,
            "data_dir": "/tmp/data",
            "log_level": "Error",
            "no_seccomp": True,
            "seccomp_filter": None,
            "http_api_max_payload_size": None,
            "mmds_size_limit": None,
            "socket_timeout_secs": 15,
        }
    )
    assert cfg.api_socket_timeout == 15 and cfg.resolved_data_dir() == Path("/tmp/data")


def test_data_dir_falls_back_to_project_default(monkeypatch) -> None:
    monkeypatch.setenv("ARCBOX_VM_DATA_DIR", "/x/y")
    assert FirecrackerConfig().resolved_data_dir() == Path("/x/y")


def test_full_jailer_table() -> None:
    cfg = FirecrackerConfig.model_validate(
        {
            "jailer": {
                "binary": "/usr/local/bin/jailer",
                "uid": 1000,
                "gid": 1000,
                "chroot_base_dir": "/srv/j",
                "netns": "/var/run/netns/fc",
                "new_pid_ns": True,
                "cgroup_version": 2,
                "parent_cgroup": "arcbox/vms",
                "resource_limits": ["fsize=2048", "no-file=1024"],
                "cgroups": ["cpuset.cpus=0-1"],
            },
        }
    )
    assert cfg.jailer.cgroup_version == "2"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("error", "Error"),
        ("WARN", "Warning"),
        ("warning", "Warning"),
        ("Info", "Info"),
        ("debug", "Debug"),
        ("TRACE", "Trace"),
        ("off", "Off"),
    ],
)
def test_log_level_is_case_insensitive(raw, expected) -> None:
    assert FirecrackerConfig(log_level=raw).log_level == expected


@pytest.mark.parametrize(
    "data,message",
    [
        ({"log_level": "verbose"}, "firecracker.log_level must be one of Error, Warning, Info, Debug, Trace, Off"),
        ({"no_seccomp": True, "seccomp_filter": "/f.bpf"}, "mutually exclusive"),
        ({"http_api_max_payload_size": 0}, "http_api_max_payload_size must be a positive"),
        ({"mmds_size_limit": -5}, "mmds_size_limit must be a positive"),
        ({"socket_timeout_secs": 0}, "socket_timeout_secs must be > 0"),
        ({"binary": ""}, "firecracker.binary must not be empty"),
        ({"bogus": 1}, "Extra inputs are not permitted"),
        ({"binary": "/usr/bin/fc", "jailer": {"uid": 1, "gid": 1}}, "must contain 'firecracker'"),
        ({"jailer": {"uid": -1, "gid": 1}}, "jailer.uid must be between"),
        ({"jailer": {"uid": 1}}, "gid"),
        ({"jailer": {"uid": 1, "gid": 1, "cgroup_version": "3"}}, 'cgroup_version must be "1" or "2"'),
        ({"jailer": {"uid": 1, "gid": 1, "parent_cgroup": "/abs"}}, "parent_cgroup must be a relative"),
        ({"jailer": {"uid": 1, "gid": 1, "parent_cgroup": "a/../b"}}, "parent_cgroup must be a relative"),
        ({"jailer": {"uid": 1, "gid": 1, "resource_limits": ["nofile=10"]}}, "'fsize=<bytes>' or 'no-file=<count>'"),
        ({"jailer": {"uid": 1, "gid": 1, "resource_limits": ["fsize=-1"]}}, "resource_limits"),
        ({"jailer": {"uid": 1, "gid": 1, "cgroups": ["cpu.shares"]}}, "cgroups entries must look like"),
        ({"jailer": {"uid": 1, "gid": 1, "cgroups": ["a.b=1=2"]}}, "exactly one '='"),
        ({"jailer": {"uid": 1, "gid": 1, "chroot_base_dir": "rel/dir"}}, "chroot_base_dir must be an absolute path"),
        ({"jailer": {"uid": 1, "gid": 1, "netns": "fc0"}}, "netns must be an absolute path"),
        ({"jailer": {"uid": 1, "gid": 1, "daemonize": True}}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_values_have_clear_errors(data, message) -> None:
    with pytest.raises(ValidationError) as info:
        FirecrackerConfig.model_validate(data)
    assert message in str(info.value)


def test_jailer_uid_gid_pair_and_use_jailer() -> None:
    from arcbox_vm import ConfigError, VmmConfig

    assert FirecrackerConfig().use_jailer == "auto" and FirecrackerConfig().jailer is None
    assert JailerConfig().uid is None and JailerConfig().uid_range == "2000000000-2000065535"
    with pytest.raises(ValidationError, match="uid and gid go together"):
        JailerConfig(uid=5)
    with pytest.raises(ConfigError, match="use_jailer"):
        VmmConfig.from_dict({"firecracker": {"use_jailer": "never", "jailer": {"uid": 1, "gid": 1}}})
    with pytest.raises(ConfigError, match="firecracker.jailer.uid_range"):
        VmmConfig.from_dict({"firecracker": {"jailer": {"uid_range": "9-1"}}})
