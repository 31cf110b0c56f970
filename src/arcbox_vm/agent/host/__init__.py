"""The host's side of the agent channel: handshake, multiplexing, flow control.

Modules, each importing only those listed before it:

- `limits`: what one guest may make the host do (deadlines, rates, log lines) and the
  checks of every value the guest sends (the guest is hostile: see docs/SECURITY.md)
- `channels`: the interface between the connection and its channel handlers
  (`ChannelHandler`, `ChannelHost`, the `ChannelTable` registry)
- `exec_channel`: `ExecChannel` (the host end of one command, on its own channel; the client's ExecSession is another thing) and `ExitStatus`
- `file_ops`: file transfers (`FileReader`, `DirListing`, `file_error`, ...)
- `port_channel`: forwarded TCP connections (`PortChannel`, `splice` with a client stream)
- `connection`: `AgentConnection` (read loop, dispatch, control frames, keepalive,
  channel numbers, the exec and file operations)
- `listener`: `handshake` and `AgentListener`
"""

from arcbox_vm.agent.host.channels import ChannelHandler, ChannelHost, ChannelTable
from arcbox_vm.agent.host.connection import AgentConnection, _detached_sessions
from arcbox_vm.agent.host.exec_channel import ExecChannel, ExitStatus
from arcbox_vm.agent.host.file_ops import READ_COALESCE, DirListing, FileReader, file_error
from arcbox_vm.agent.host.limits import AgentProtocolViolation, ProtocolViolation
from arcbox_vm.agent.host.listener import AgentListener, handshake
from arcbox_vm.agent.host.port_channel import PortChannel, PortClosed, splice

__all__ = [
    "READ_COALESCE",
    "AgentConnection",
    "AgentListener",
    "AgentProtocolViolation",
    "ChannelHandler",
    "ChannelHost",
    "ChannelTable",
    "DirListing",
    "ExecChannel",
    "ExitStatus",
    "FileReader",
    "PortChannel",
    "PortClosed",
    "ProtocolViolation",
    "_detached_sessions",
    "file_error",
    "handshake",
    "splice",
]
