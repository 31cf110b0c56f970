"""The seam for `E2b-Sandbox-Port` other than envd's: a TCP stream to a guest port.

Port forwarding through the agent channel is being built separately (a manager-level
way to open a TCP stream to a guest port). When it lands, `open_guest_port` returns
that stream and `app.py` proxies the HTTP request over it; until then such requests are
answered 502 "port is not open", which the SDK reports as SandboxUnreachableException.
"""

from __future__ import annotations

from typing import Any


class PortForwardingUnavailable(Exception):
    pass


async def open_guest_port(manager: Any, sandbox_id: str, port: int) -> Any:
    """A (reader, writer) byte stream to TCP `port` inside the sandbox.

    TODO(port-forward): call the manager's port-forwarding use case here.
    """
    raise PortForwardingUnavailable(f"port forwarding is not available yet: the sandbox {sandbox_id}'s "
                                    f"port {port} is not open to this server")
