"""TCP access control: TLS server credentials and a bearer-token interceptor.

The Unix socket relies on file permissions (0660, the daemon's group); TCP needs TLS and
`authorization: Bearer <token>` unless the operator explicitly chose --insecure-tcp
(then TLS is off, and the token is still required when one is configured).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from arcbox_vm.errors import ConfigError


def read_token(token: str, token_file: str) -> str:
    if token_file:
        try:
            value = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"grpc.token_file: cannot read {token_file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"grpc.token_file: {token_file} is empty")
        return value
    return token


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    try:
        return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    except OSError as exc:
        raise ConfigError(f"grpc.tls_cert/tls_key: cannot read {exc.filename}: {exc.strerror}") from None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call without the right `authorization: Bearer <token>` metadata,
    except to methods under `open_prefixes` (e.g. the health service's)."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = ()) -> None:
        self._expected = f"Bearer {token}".encode()
        self._open = open_prefixes

        async def deny(request_or_iterator, context: grpc.aio.ServicerContext):  # noqa: ANN001
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if self._open and (handler_call_details.method or "").startswith(self._open):
            return await continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(got, self._expected):
                    return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._deny_stream.unary_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._deny_unary.unary_unary)
        if handler.response_streaming:
            return self._deny_stream
        return self._deny_unary
