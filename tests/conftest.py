"""Shared test configuration."""

from __future__ import annotations

import os


def pytest_report_header(config):  # noqa: ANN001
    missing = [v for v in ("FC_BINARY", "FC_KERNEL", "FC_ROOTFS") if not os.environ.get(v)]
    if missing:
        return [f"real-VM tests: QEMU only (Firecracker variants not generated: {', '.join(missing)} unset)"]
    return ["real-VM tests: QEMU and Firecracker"]
