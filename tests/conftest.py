"""Shared test configuration."""

from __future__ import annotations

import os

# The test process uses gRPC (clients, in-process daemons) and also forks (pexpect's pty, for
# the CLI's `exec -it`). With gRPC's fork support on, its event engine restarts its poller in
# the forked child, whose descriptors are then closed before exec: the child can die on
# "epoll_wait error: Bad file descriptor" before it runs the CLI (a known gRPC bug). Nothing
# here uses gRPC in a forked child, so it is off (read when grpc is first imported).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def pytest_report_header(config):  # noqa: ANN001
    missing = [v for v in ("FC_BINARY", "FC_KERNEL", "FC_ROOTFS") if not os.environ.get(v)]
    if missing:
        return [f"real-VM tests: QEMU only (Firecracker variants not generated: {', '.join(missing)} unset)"]
    return ["real-VM tests: QEMU and Firecracker"]
