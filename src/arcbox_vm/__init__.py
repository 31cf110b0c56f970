"""arcbox-vm: a microVM sandbox manager (Firecracker or QEMU) with its own guest agent."""

__version__ = "0.1.0"
