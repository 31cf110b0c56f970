"""The composition root: one place builds the adapters, with one set of choices."""

from __future__ import annotations

from arcbox_vm.composition import build_adapters
from arcbox_vm.config import VmmConfig


def test_one_shot_vmms_die_with_their_parent_and_get_no_cgroup(tmp_path):
    cfg = VmmConfig(backend="qemu", data_dir=tmp_path)
    adapters = build_adapters(cfg, one_shot=True)
    assert adapters.driver.name == "qemu"
    assert adapters.driver.die_with_parent is True  # type: ignore[attr-defined]
    assert not adapters.cgroups.enabled, "a daemon on the same data dir would remove a one-shot VM's cgroup"


def test_manager_vmms_outlive_the_daemon_and_share_the_managers_cgroups(tmp_path):
    cfg = VmmConfig(backend="qemu", data_dir=tmp_path)
    adapters = build_adapters(cfg)
    assert adapters.driver.die_with_parent is False  # type: ignore[attr-defined]
    assert adapters.driver.cgroups is adapters.cgroups  # type: ignore[attr-defined]


def test_the_driver_is_chosen_on_first_use_only(tmp_path, monkeypatch):
    calls = []
    import arcbox_vm.composition as composition

    real = composition.select_driver
    monkeypatch.setattr(composition, "select_driver", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    adapters = build_adapters(VmmConfig(backend="qemu", data_dir=tmp_path))
    assert calls == []
    assert adapters.driver is adapters.driver
    assert calls == [1]


def test_the_manager_and_its_adapters_share_one_config(tmp_path):
    from arcbox_vm import SandboxManager

    cfg = VmmConfig(backend="qemu", data_dir=tmp_path)
    mgr = SandboxManager(cfg)
    assert mgr.data_dir == tmp_path
    assert mgr.adapters.store.path.parent == tmp_path  # type: ignore[attr-defined]
