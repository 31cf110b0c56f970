"""One error hierarchy for everything arcbox-vm raises on purpose.

Every message says what went wrong *and* what to do about it; callers (CLI, gRPC) map the
classes to exit codes / status codes without parsing text.
"""

from __future__ import annotations


class ArcboxError(Exception):
    """Base class of every error arcbox-vm raises deliberately."""


class ConfigError(ArcboxError):
    """Configuration is invalid (names the key and the accepted values)."""


class ImageError(ArcboxError):
    """A guest image could not be built, found or modified."""


class MissingToolError(ImageError):
    """A host tool or Debian package needed for the job is not installed."""

    def __init__(self, tool: str, package: str, why: str = "") -> None:
        self.tool = tool
        self.package = package
        hint = f" ({why})" if why else ""
        super().__init__(
            f"'{tool}' is not installed{hint}; install it with: apt-get install -y {package}"
        )


class VmmError(ArcboxError):
    """The VMM (QEMU or Firecracker) failed or refused a request."""


class FirecrackerApiError(VmmError):
    """Firecracker's API answered with an error (`fault_message` or `error` body)."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = message
        super().__init__(f"Firecracker {method} {path} failed with HTTP {status}: {message}")


class BootFailed(VmmError):
    """The VM did not come up: the VMM exited, or the agent never said HELLO in time."""


class AgentError(ArcboxError):
    """The guest agent reported an error or the channel to it broke."""

    def __init__(self, message: str, code: str = "internal") -> None:
        self.code = code
        super().__init__(message)


class AgentDisconnected(AgentError):
    """The channel to the guest agent closed (VM stopped or crashed)."""

    def __init__(self, message: str = "the guest agent's channel closed (the VM stopped or crashed)") -> None:
        super().__init__(message, code="disconnected")



class AgentUnresponsive(AgentDisconnected):
    """The guest agent stopped answering its keepalive: the VM is frozen or overloaded
    (a frozen VM never exits by itself, so nobody waits for it to)."""

class ExecError(AgentError):
    """A command could not be started in the guest (not found, bad user, ...)."""


class SandboxError(ArcboxError):
    """Base of the errors about a sandbox's identity or state."""


class SandboxNotFound(SandboxError):
    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        super().__init__(f"no sandbox with id {sandbox_id!r}; list them with list_sandboxes() / `arcbox-vm ls`")


class SandboxAlreadyExists(SandboxError):
    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        super().__init__(f"a sandbox with id {sandbox_id!r} already exists; choose another id or remove it first")


class InvalidState(SandboxError):
    def __init__(self, sandbox_id: str, state: str, wanted: str) -> None:
        self.sandbox_id = sandbox_id
        self.state = state
        super().__init__(f"sandbox {sandbox_id!r} is {state}; {wanted}")


class CheckpointNotFound(SandboxError):
    def __init__(self, snapshot_id: str) -> None:
        self.snapshot_id = snapshot_id
        super().__init__(f"no checkpoint with id {snapshot_id!r}; list them with list_checkpoints() / "
                         "`arcbox-vm snapshot ls`")


class TemplateNotFound(ArcboxError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no template named {name!r}; list them with list_templates() / `arcbox-vm template ls`, "
                         "build one with `arcbox-vm template build`")


class TemplateBuildFailed(ArcboxError):
    """A template build failed at one step: `step` (1-based) of the Dockerfile, the
    instruction `instruction`, the failing command's `exit_code` (None when it was not a
    command) and the end of its `output`. Nothing of the template was kept."""

    def __init__(self, step: int, instruction: str, reason: str, exit_code: int | None = None,
                 output: str = "") -> None:
        self.step = step
        self.instruction = instruction
        self.exit_code = exit_code
        self.output = output
        code = f" (exit code {exit_code})" if exit_code is not None else ""
        super().__init__(f"step {step} `{instruction}` failed{code}: {reason}")


class SnapshotsUnsupported(VmmError):
    """The VMM (or this VM) cannot pause, checkpoint or restore (message says why)."""


class ExecNotFound(SandboxError):
    def __init__(self, sandbox_id: str, exec_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.exec_id = exec_id
        super().__init__(f"sandbox {sandbox_id!r} has no command with exec id {exec_id!r}; "
                         "list them with list_execs() / `arcbox-vm execs`")


class ExecNotAttachable(SandboxError):
    """The command exists but cannot be taken over (a client holds it, or it is over)."""

    def __init__(self, sandbox_id: str, exec_id: str, status: str) -> None:
        self.sandbox_id = sandbox_id
        self.exec_id = exec_id
        self.status = status
        super().__init__(f"command {exec_id!r} in sandbox {sandbox_id!r} is {status}; only a detached command "
                         "(one that kept running while the daemon was away) can be attached")


class InvalidArgument(ArcboxError):
    """A request's value is malformed (names the field)."""


class ResourceExhausted(ArcboxError):
    """No more of a limited resource (IP addresses, sandboxes, ...)."""


class HostPortUnavailable(ResourceExhausted):
    """A host port a sandbox's port mapping asks for cannot be listened on (in use)."""


class GuestFileError(ArcboxError):
    """A file operation inside the guest failed (message names the path and why)."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class GuestFileNotFound(GuestFileError):
    """The guest path (or a parent directory) does not exist."""


class GuestPermissionDenied(GuestFileError):
    """The guest refused the operation on that path (permissions, read-only fs, ...)."""


class FileTooLarge(ResourceExhausted):
    """A transfer is larger than the configured limit."""


class GuestNoSpace(GuestFileError, ResourceExhausted):
    """The guest's filesystem is full."""


class StateError(ArcboxError):
    """The state database cannot be read or written (disk full, read-only, ...)."""


class StateCorrupt(StateError):
    """The state database is damaged; the message says how to recover."""
