"""The envd protocol's messages and Connect service classes.

They are generated from E2B's envd .proto files and ship inside the `e2b` SDK wheel
(`e2b.envd.*.*_pb` / `*_connect`, on `connectrpc` + `protobuf-py`); we serve them with
connectrpc's ASGI server rather than keeping a second copy of the protocol. They come
with the `e2b` extra (`pip install arcbox-vm[e2b]`).
"""

from __future__ import annotations

from arcbox_vm.errors import ConfigError

try:
    from e2b.envd.filesystem import filesystem_connect, filesystem_pb
    from e2b.envd.process import process_connect, process_pb
    from protobuf import Oneof
    from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigError(f"[e2b] needs the e2b extra: pip install 'arcbox-vm[e2b]' ({exc})") from None

__all__ = ["Oneof", "Timestamp", "filesystem_connect", "filesystem_pb", "process_connect", "process_pb"]
