from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResourceLimits(_message.Message):
    __slots__ = ("vcpus", "memory_mib")
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    vcpus: int
    memory_mib: int
    def __init__(self, vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class Mount(_message.Message):
    __slots__ = ("source", "target", "readonly")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    readonly: bool
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., readonly: _Optional[bool] = ...) -> None: ...

class NetworkSpec(_message.Message):
    __slots__ = ("mode", "egress", "allow_out", "deny_out")
    MODE_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_OUT_FIELD_NUMBER: _ClassVar[int]
    DENY_OUT_FIELD_NUMBER: _ClassVar[int]
    mode: str
    egress: str
    allow_out: _containers.RepeatedScalarFieldContainer[str]
    deny_out: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[str] = ..., egress: _Optional[str] = ..., allow_out: _Optional[_Iterable[str]] = ..., deny_out: _Optional[_Iterable[str]] = ...) -> None: ...

class CidrList(_message.Message):
    __slots__ = ("cidrs",)
    CIDRS_FIELD_NUMBER: _ClassVar[int]
    cidrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cidrs: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateNetworkRequest(_message.Message):
    __slots__ = ("id", "egress", "allow_out", "deny_out")
    ID_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_OUT_FIELD_NUMBER: _ClassVar[int]
    DENY_OUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    egress: str
    allow_out: CidrList
    deny_out: CidrList
    def __init__(self, id: _Optional[str] = ..., egress: _Optional[str] = ..., allow_out: _Optional[_Union[CidrList, _Mapping]] = ..., deny_out: _Optional[_Union[CidrList, _Mapping]] = ...) -> None: ...

class PortMapping(_message.Message):
    __slots__ = ("host_addr", "host_port", "guest_port", "protocol")
    HOST_ADDR_FIELD_NUMBER: _ClassVar[int]
    HOST_PORT_FIELD_NUMBER: _ClassVar[int]
    GUEST_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    host_addr: str
    host_port: int
    guest_port: int
    protocol: str
    def __init__(self, host_addr: _Optional[str] = ..., host_port: _Optional[int] = ..., guest_port: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ("id", "labels", "kernel", "rootfs", "boot_args", "limits", "image", "cmd", "env", "working_dir", "user", "mounts", "network", "ttl_seconds", "ssh_public_key", "initrd", "ports", "template")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ARGS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MOUNTS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SSH_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    INITRD_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    labels: _containers.ScalarMap[str, str]
    kernel: str
    rootfs: str
    boot_args: str
    limits: ResourceLimits
    image: str
    cmd: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    user: str
    mounts: _containers.RepeatedCompositeFieldContainer[Mount]
    network: NetworkSpec
    ttl_seconds: int
    ssh_public_key: str
    initrd: str
    ports: _containers.RepeatedCompositeFieldContainer[PortMapping]
    template: str
    def __init__(self, id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., kernel: _Optional[str] = ..., rootfs: _Optional[str] = ..., boot_args: _Optional[str] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., image: _Optional[str] = ..., cmd: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ..., mounts: _Optional[_Iterable[_Union[Mount, _Mapping]]] = ..., network: _Optional[_Union[NetworkSpec, _Mapping]] = ..., ttl_seconds: _Optional[int] = ..., ssh_public_key: _Optional[str] = ..., initrd: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[PortMapping, _Mapping]]] = ..., template: _Optional[str] = ...) -> None: ...

class CreateSandboxResponse(_message.Message):
    __slots__ = ("id", "ip_address", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    ip_address: str
    state: str
    def __init__(self, id: _Optional[str] = ..., ip_address: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class TerminalSize(_message.Message):
    __slots__ = ("width", "height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("id", "cmd", "env", "working_dir", "user", "tty", "timeout_seconds", "tty_size")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    cmd: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    user: str
    tty: bool
    timeout_seconds: int
    tty_size: TerminalSize
    def __init__(self, id: _Optional[str] = ..., cmd: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ..., tty: _Optional[bool] = ..., timeout_seconds: _Optional[int] = ..., tty_size: _Optional[_Union[TerminalSize, _Mapping]] = ...) -> None: ...

class RunOutput(_message.Message):
    __slots__ = ("stream", "data", "exit_code", "done", "timed_out")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    stream: str
    data: bytes
    exit_code: int
    done: bool
    timed_out: bool
    def __init__(self, stream: _Optional[str] = ..., data: _Optional[bytes] = ..., exit_code: _Optional[int] = ..., done: _Optional[bool] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("id", "cmd", "env", "working_dir", "user", "tty", "tty_size", "timeout_seconds")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    TTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    cmd: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    user: str
    tty: bool
    tty_size: TerminalSize
    timeout_seconds: int
    def __init__(self, id: _Optional[str] = ..., cmd: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ..., tty: _Optional[bool] = ..., tty_size: _Optional[_Union[TerminalSize, _Mapping]] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class ExecInput(_message.Message):
    __slots__ = ("init", "stdin", "resize", "eof", "attach")
    INIT_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    init: ExecRequest
    stdin: bytes
    resize: TerminalSize
    eof: bool
    attach: AttachRequest
    def __init__(self, init: _Optional[_Union[ExecRequest, _Mapping]] = ..., stdin: _Optional[bytes] = ..., resize: _Optional[_Union[TerminalSize, _Mapping]] = ..., eof: _Optional[bool] = ..., attach: _Optional[_Union[AttachRequest, _Mapping]] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("id", "cmd", "env", "working_dir", "user", "tty", "timeout_seconds", "tty_size", "stdin")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TTY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    cmd: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    working_dir: str
    user: str
    tty: bool
    timeout_seconds: int
    tty_size: TerminalSize
    stdin: bool
    def __init__(self, id: _Optional[str] = ..., cmd: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ..., tty: _Optional[bool] = ..., timeout_seconds: _Optional[int] = ..., tty_size: _Optional[_Union[TerminalSize, _Mapping]] = ..., stdin: _Optional[bool] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("exec_id",)
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    def __init__(self, exec_id: _Optional[str] = ...) -> None: ...

class SignalRequest(_message.Message):
    __slots__ = ("id", "exec_id", "signal")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    exec_id: str
    signal: int
    def __init__(self, id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("id", "exec_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    exec_id: str
    def __init__(self, id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ExecInfo(_message.Message):
    __slots__ = ("exec_id", "cmd", "status", "started_at", "finished_at", "exit_code")
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    exec_id: str
    cmd: _containers.RepeatedScalarFieldContainer[str]
    status: str
    started_at: int
    finished_at: int
    exit_code: int
    def __init__(self, exec_id: _Optional[str] = ..., cmd: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., started_at: _Optional[int] = ..., finished_at: _Optional[int] = ..., exit_code: _Optional[int] = ...) -> None: ...

class ListExecsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListExecsResponse(_message.Message):
    __slots__ = ("execs",)
    EXECS_FIELD_NUMBER: _ClassVar[int]
    execs: _containers.RepeatedCompositeFieldContainer[ExecInfo]
    def __init__(self, execs: _Optional[_Iterable[_Union[ExecInfo, _Mapping]]] = ...) -> None: ...

class ExecOutput(_message.Message):
    __slots__ = ("stream", "data", "exit_code", "done", "timed_out")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    stream: str
    data: bytes
    exit_code: int
    done: bool
    timed_out: bool
    def __init__(self, stream: _Optional[str] = ..., data: _Optional[bytes] = ..., exit_code: _Optional[int] = ..., done: _Optional[bool] = ..., timed_out: _Optional[bool] = ...) -> None: ...

class StopSandboxRequest(_message.Message):
    __slots__ = ("id", "timeout_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    timeout_seconds: int
    def __init__(self, id: _Optional[str] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class RemoveSandboxRequest(_message.Message):
    __slots__ = ("id", "force")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    force: bool
    def __init__(self, id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class InspectSandboxRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SandboxNetwork(_message.Message):
    __slots__ = ("ip_address", "gateway", "tap_name", "egress", "allow_out", "deny_out")
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    TAP_NAME_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_OUT_FIELD_NUMBER: _ClassVar[int]
    DENY_OUT_FIELD_NUMBER: _ClassVar[int]
    ip_address: str
    gateway: str
    tap_name: str
    egress: str
    allow_out: _containers.RepeatedScalarFieldContainer[str]
    deny_out: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ip_address: _Optional[str] = ..., gateway: _Optional[str] = ..., tap_name: _Optional[str] = ..., egress: _Optional[str] = ..., allow_out: _Optional[_Iterable[str]] = ..., deny_out: _Optional[_Iterable[str]] = ...) -> None: ...

class SandboxInfo(_message.Message):
    __slots__ = ("id", "state", "labels", "limits", "network", "created_at", "ready_at", "last_exited_at", "last_exit_code", "error", "vmm", "ports")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VMM_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    labels: _containers.ScalarMap[str, str]
    limits: ResourceLimits
    network: SandboxNetwork
    created_at: int
    ready_at: int
    last_exited_at: int
    last_exit_code: int
    error: str
    vmm: str
    ports: _containers.RepeatedCompositeFieldContainer[PortMapping]
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., network: _Optional[_Union[SandboxNetwork, _Mapping]] = ..., created_at: _Optional[int] = ..., ready_at: _Optional[int] = ..., last_exited_at: _Optional[int] = ..., last_exit_code: _Optional[int] = ..., error: _Optional[str] = ..., vmm: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[PortMapping, _Mapping]]] = ...) -> None: ...

class ListSandboxesRequest(_message.Message):
    __slots__ = ("state", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    state: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, state: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SandboxSummary(_message.Message):
    __slots__ = ("id", "state", "labels", "ip_address", "created_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    labels: _containers.ScalarMap[str, str]
    ip_address: str
    created_at: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., ip_address: _Optional[str] = ..., created_at: _Optional[int] = ...) -> None: ...

class ListSandboxesResponse(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[SandboxSummary]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[SandboxSummary, _Mapping]]] = ...) -> None: ...

class SandboxEventsRequest(_message.Message):
    __slots__ = ("id", "action", "since")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    action: str
    since: int
    def __init__(self, id: _Optional[str] = ..., action: _Optional[str] = ..., since: _Optional[int] = ...) -> None: ...

class SandboxEvent(_message.Message):
    __slots__ = ("sandbox_id", "action", "timestamp", "attributes", "id")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    action: str
    timestamp: int
    attributes: _containers.ScalarMap[str, str]
    id: int
    def __init__(self, sandbox_id: _Optional[str] = ..., action: _Optional[str] = ..., timestamp: _Optional[int] = ..., attributes: _Optional[_Mapping[str, str]] = ..., id: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("id", "path", "mode", "uid", "gid", "make_parents", "size")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    MAKE_PARENTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    mode: int
    uid: int
    gid: int
    make_parents: bool
    size: int
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., make_parents: _Optional[bool] = ..., size: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "data", "done")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    done: bool
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("path", "size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("data", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class FileStat(_message.Message):
    __slots__ = ("path", "name", "type", "size", "mode", "uid", "gid", "mtime", "link_target")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    MTIME_FIELD_NUMBER: _ClassVar[int]
    LINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    link_target: str
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., mtime: _Optional[float] = ..., link_target: _Optional[str] = ...) -> None: ...

class ListDirRequest(_message.Message):
    __slots__ = ("id", "path")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ListDirResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[FileStat]
    def __init__(self, entries: _Optional[_Iterable[_Union[FileStat, _Mapping]]] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("id", "follow")
    ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    id: str
    follow: bool
    def __init__(self, id: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SandboxStats(_message.Message):
    __slots__ = ("id", "state", "cpu_seconds", "memory_bytes", "io_read_bytes", "io_write_bytes", "processes", "timestamp", "source")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    IO_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    IO_WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    cpu_seconds: float
    memory_bytes: int
    io_read_bytes: int
    io_write_bytes: int
    processes: int
    timestamp: int
    source: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., cpu_seconds: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., io_read_bytes: _Optional[int] = ..., io_write_bytes: _Optional[int] = ..., processes: _Optional[int] = ..., timestamp: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[SandboxStats]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[SandboxStats, _Mapping]]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("sandbox_id", "name", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    name: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, sandbox_id: _Optional[str] = ..., name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("snapshot_id", "snapshot_dir", "created_at", "size_bytes", "name", "sandbox_id")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DIR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    snapshot_dir: str
    created_at: str
    size_bytes: int
    name: str
    sandbox_id: str
    def __init__(self, snapshot_id: _Optional[str] = ..., snapshot_dir: _Optional[str] = ..., created_at: _Optional[str] = ..., size_bytes: _Optional[int] = ..., name: _Optional[str] = ..., sandbox_id: _Optional[str] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("id", "snapshot_id", "labels", "network_override", "ttl_seconds", "env", "network")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    id: str
    snapshot_id: str
    labels: _containers.ScalarMap[str, str]
    network_override: bool
    ttl_seconds: int
    env: _containers.ScalarMap[str, str]
    network: NetworkSpec
    def __init__(self, id: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., network_override: _Optional[bool] = ..., ttl_seconds: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., network: _Optional[_Union[NetworkSpec, _Mapping]] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("id", "ip_address")
    ID_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    id: str
    ip_address: str
    def __init__(self, id: _Optional[str] = ..., ip_address: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("sandbox_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, sandbox_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SnapshotSummary(_message.Message):
    __slots__ = ("id", "sandbox_id", "name", "labels", "snapshot_dir", "created_at", "size_bytes", "in_use")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DIR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    id: str
    sandbox_id: str
    name: str
    labels: _containers.ScalarMap[str, str]
    snapshot_dir: str
    created_at: str
    size_bytes: int
    in_use: int
    def __init__(self, id: _Optional[str] = ..., sandbox_id: _Optional[str] = ..., name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., snapshot_dir: _Optional[str] = ..., created_at: _Optional[str] = ..., size_bytes: _Optional[int] = ..., in_use: _Optional[int] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotSummary]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotSummary, _Mapping]]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class ForkRequest(_message.Message):
    __slots__ = ("id", "count")
    ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    count: int
    def __init__(self, id: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ForkResponse(_message.Message):
    __slots__ = ("clones",)
    CLONES_FIELD_NUMBER: _ClassVar[int]
    clones: _containers.RepeatedCompositeFieldContainer[RestoreResponse]
    def __init__(self, clones: _Optional[_Iterable[_Union[RestoreResponse, _Mapping]]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("id", "to_disk")
    ID_FIELD_NUMBER: _ClassVar[int]
    TO_DISK_FIELD_NUMBER: _ClassVar[int]
    id: str
    to_disk: bool
    def __init__(self, id: _Optional[str] = ..., to_disk: _Optional[bool] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TemplateBuildHeader(_message.Message):
    __slots__ = ("name", "dockerfile", "disk_size_mib", "memory_mib", "vcpus", "build_args", "egress", "ready_timeout_seconds", "no_cache", "has_context", "network")
    class BuildArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCKERFILE_FIELD_NUMBER: _ClassVar[int]
    DISK_SIZE_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    BUILD_ARGS_FIELD_NUMBER: _ClassVar[int]
    EGRESS_FIELD_NUMBER: _ClassVar[int]
    READY_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NO_CACHE_FIELD_NUMBER: _ClassVar[int]
    HAS_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    name: str
    dockerfile: str
    disk_size_mib: int
    memory_mib: int
    vcpus: int
    build_args: _containers.ScalarMap[str, str]
    egress: str
    ready_timeout_seconds: float
    no_cache: bool
    has_context: bool
    network: str
    def __init__(self, name: _Optional[str] = ..., dockerfile: _Optional[str] = ..., disk_size_mib: _Optional[int] = ..., memory_mib: _Optional[int] = ..., vcpus: _Optional[int] = ..., build_args: _Optional[_Mapping[str, str]] = ..., egress: _Optional[str] = ..., ready_timeout_seconds: _Optional[float] = ..., no_cache: _Optional[bool] = ..., has_context: _Optional[bool] = ..., network: _Optional[str] = ...) -> None: ...

class BuildTemplateRequest(_message.Message):
    __slots__ = ("header", "context_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TemplateBuildHeader
    context_chunk: bytes
    def __init__(self, header: _Optional[_Union[TemplateBuildHeader, _Mapping]] = ..., context_chunk: _Optional[bytes] = ...) -> None: ...

class TemplateInfo(_message.Message):
    __slots__ = ("name", "key", "created_at", "base", "size_bytes", "memory_mib", "vcpus", "env", "working_dir", "user", "start", "ready", "steps", "build_seconds", "in_use")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKING_DIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BUILD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    created_at: str
    base: str
    size_bytes: int
    memory_mib: int
    vcpus: int
    env: _containers.ScalarMap[str, str]
    working_dir: str
    user: str
    start: str
    ready: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    build_seconds: float
    in_use: int
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., created_at: _Optional[str] = ..., base: _Optional[str] = ..., size_bytes: _Optional[int] = ..., memory_mib: _Optional[int] = ..., vcpus: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., working_dir: _Optional[str] = ..., user: _Optional[str] = ..., start: _Optional[str] = ..., ready: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ..., build_seconds: _Optional[float] = ..., in_use: _Optional[int] = ...) -> None: ...

class BuildTemplateEvent(_message.Message):
    __slots__ = ("kind", "step", "total", "text", "data", "stream", "exit_code", "cached", "template")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    step: int
    total: int
    text: str
    data: bytes
    stream: str
    exit_code: int
    cached: bool
    template: TemplateInfo
    def __init__(self, kind: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., text: _Optional[str] = ..., data: _Optional[bytes] = ..., stream: _Optional[str] = ..., exit_code: _Optional[int] = ..., cached: _Optional[bool] = ..., template: _Optional[_Union[TemplateInfo, _Mapping]] = ...) -> None: ...

class ListTemplatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTemplatesResponse(_message.Message):
    __slots__ = ("templates",)
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    templates: _containers.RepeatedCompositeFieldContainer[TemplateInfo]
    def __init__(self, templates: _Optional[_Iterable[_Union[TemplateInfo, _Mapping]]] = ...) -> None: ...

class InspectTemplateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveTemplateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveTemplateResponse(_message.Message):
    __slots__ = ("in_use",)
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    in_use: int
    def __init__(self, in_use: _Optional[int] = ...) -> None: ...

class PruneTemplatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PruneTemplatesResponse(_message.Message):
    __slots__ = ("layers", "bytes_freed")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    layers: int
    bytes_freed: int
    def __init__(self, layers: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...
