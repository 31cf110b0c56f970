"""arcbox-vm: a microVM sandbox manager (Firecracker or QEMU) with its own guest agent.

The public API, re-exported lazily (importing `arcbox_vm` stays cheap for the CLI):

    from arcbox_vm import SandboxManager, VmmConfig, SandboxSpec
    async with SandboxManager(VmmConfig()) as mgr:
        sid, ip = await mgr.create_sandbox(SandboxSpec())
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SandboxManager": "arcbox_vm.manager.sandbox_manager",
    "EventSubscription": "arcbox_vm.manager.events",
    "ExecStream": "arcbox_vm.manager.exec_stream",
    "ExecHandle": "arcbox_vm.manager.exec_stream",
    "ExecAttachment": "arcbox_vm.manager.background",
    "VmmConfig": "arcbox_vm.config",
    "FirecrackerConfig": "arcbox_vm.config",
    "JailerConfig": "arcbox_vm.config",
    "NetworkConfig": "arcbox_vm.config",
    "GrpcConfig": "arcbox_vm.config",
    "DefaultVmConfig": "arcbox_vm.config",
    "QemuConfig": "arcbox_vm.config",
    "SandboxSpec": "arcbox_vm.models",
    "SandboxNetworkSpec": "arcbox_vm.models",
    "PortMapping": "arcbox_vm.models",
    "SandboxInfo": "arcbox_vm.models",
    "SandboxNetworkInfo": "arcbox_vm.models",
    "SandboxSummary": "arcbox_vm.models",
    "SandboxEvent": "arcbox_vm.models",
    "SandboxState": "arcbox_vm.models",
    "OutputChunk": "arcbox_vm.models",
    "ExecInfo": "arcbox_vm.models",
    "RestoreSandboxSpec": "arcbox_vm.models",
    "CheckpointInfo": "arcbox_vm.models",
    "TemplateBuildSpec": "arcbox_vm.templates.models",
    "TemplateInfo": "arcbox_vm.templates.models",
    "BuildProgress": "arcbox_vm.templates.models",
    "TemplateNotFound": "arcbox_vm.errors",
    "TemplateBuildFailed": "arcbox_vm.errors",
    "ArcboxError": "arcbox_vm.errors",
    "ConfigError": "arcbox_vm.errors",
    "SandboxError": "arcbox_vm.errors",
    "SandboxNotFound": "arcbox_vm.errors",
    "SandboxAlreadyExists": "arcbox_vm.errors",
    "InvalidState": "arcbox_vm.errors",
    "InvalidArgument": "arcbox_vm.errors",
    "ResourceExhausted": "arcbox_vm.errors",
    "BootFailed": "arcbox_vm.errors",
    "AgentError": "arcbox_vm.errors",
    "ExecError": "arcbox_vm.errors",
    "CheckpointNotFound": "arcbox_vm.errors",
    "SnapshotsUnsupported": "arcbox_vm.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'arcbox_vm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
