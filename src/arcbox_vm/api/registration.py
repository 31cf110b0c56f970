"""Register the servicer with request deserializers that never crash the call.

grpc answers a request it cannot deserialize (e.g. invalid UTF-8 in a string field) with
INTERNAL. We deserialize ourselves and hand the handler a `BadRequest` instead, which it
turns into INVALID_ARGUMENT — a user's malformed input is not an internal error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from arcbox_vm.api.sandbox.v1 import sandbox_pb2 as pb

SERVICE = "sandbox.v1.SandboxService"


@dataclass(frozen=True)
class BadRequest:
    reason: str


def _safe(message_cls: type) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as exc:
            return BadRequest(f"the request could not be decoded ({exc}); strings must be valid UTF-8")

    return deserialize


def generic_handler(servicer: Any, service_name: str = "SandboxService") -> grpc.GenericRpcHandler:
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        req_cls = getattr(pb, method.input_type.name)
        resp_cls = getattr(pb, method.output_type.name)
        impl = getattr(servicer, method.name)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(impl, request_deserializer=_safe(req_cls),
                                     response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(f"sandbox.v1.{service_name}", handlers)
