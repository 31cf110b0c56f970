"""What every daemon command shares: connection options, error reporting, the event loop.

`daemon_command` adds --socket/--host/--token/--tls-ca/--insecure/--config to a command
(so they work after any subcommand, and `arcbox-vm run` — which needs no daemon — stays
untouched) and turns library errors into one `arcbox-vm: <message>` line on stderr with
exit code 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Optional, TypeVar

import typer

from arcbox_vm.errors import ArcboxError

if TYPE_CHECKING:
    from arcbox_vm.client.aio import AsyncClient

__all__ = ["ConnectOptions", "EXIT_ERROR", "EXIT_INTERRUPTED", "daemon_command", "fail", "for_each", "one_line",
           "run_async"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

T = TypeVar("T")

_PANEL = "Daemon connection"



@dataclass(frozen=True)
class ConnectOptions:
    """The connection options as given on the command line (None = not given)."""

    socket: Optional[str] = None
    host: Optional[str] = None
    token: Optional[str] = None
    tls_ca: Optional[str] = None
    insecure: bool = False
    config: Optional[str] = None

    def client(self) -> "AsyncClient":
        """A client for the daemon (resolution order: these options, environment, config)."""
        from arcbox_vm.client.aio import AsyncClient  # grpc is imported only by daemon commands

        return AsyncClient(self.socket, self.host, token=self.token, tls_ca=self.tls_ca, insecure=self.insecure,
                           config=self.config)

    def call(self, fn: "Callable[[AsyncClient], Coroutine[Any, Any, T]]") -> T:
        """Connect, await `fn(client)`, disconnect: one request from a CLI command."""
        async def main() -> T:
            async with self.client() as client:
                return await fn(client)

        return asyncio.run(main())


def _opt(default: Any, *names: str, help: str, **kw: Any) -> Any:
    return typer.Option(default, *names, help=help, rich_help_panel=_PANEL, **kw)


_CONNECTION_PARAMS = [
    inspect.Parameter("socket", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=_opt(
        None, "--socket", metavar="PATH", help="Daemon's Unix socket (env ARCBOX_VM_SOCKET; default: the config's)")),
    inspect.Parameter("host", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=_opt(
        None, "--host", metavar="HOST:PORT", help="Daemon's TCP address (env ARCBOX_VM_HOST)")),
    inspect.Parameter("token", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=_opt(
        None, "--token", help="Bearer token for TCP (env ARCBOX_VM_TOKEN)")),
    inspect.Parameter("tls_ca", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=_opt(
        None, "--tls-ca", metavar="PATH", help="CA certificate for TCP TLS (env ARCBOX_VM_TLS_CA)")),
    inspect.Parameter("insecure", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=_opt(
        False, "--insecure", help="Plaintext TCP (daemon started with --insecure-tcp)")),
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=_opt(
        None, "--config", metavar="PATH", help="Daemon config file, for its socket path (env ARCBOX_VM_CONFIG)")),
]
_CONNECTION_NAMES = [p.name for p in _CONNECTION_PARAMS]


def one_line(message: object) -> str:
    """Error text on a single line (multi-line server messages would break `2>&1 | grep`)."""
    return " ".join(str(message).split())


def fail(message: object, code: int = EXIT_ERROR) -> NoReturn:
    """Print `arcbox-vm: message` on stderr and exit with `code`."""
    sys.stderr.write(f"arcbox-vm: {one_line(message)}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def daemon_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command taking `conn: ConnectOptions`: typer sees the connection options
    instead of `conn`; errors become one stderr line and exit code 1 (130 on Ctrl-C)."""
    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.name != "conn"]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        conn = ConnectOptions(**{name: kwargs.pop(name) for name in _CONNECTION_NAMES})
        try:
            return func(*args, conn=conn, **kwargs)
        except typer.Exit:
            raise
        except ArcboxError as exc:
            fail(exc)
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # `arcbox-vm logs ID | head`: the reader left; not an error worth a message.
            _silence_stdout()
            raise typer.Exit(EXIT_ERROR) from None
        except OSError as exc:
            fail(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")

    wrapper.__signature__ = sig.replace(parameters=own + _CONNECTION_PARAMS)  # type: ignore[attr-defined]
    return wrapper


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


async def for_each(ids: list[str], action: str, conn: ConnectOptions,
                call: "Callable[[AsyncClient, str], Awaitable[None]]") -> int:
    """Apply `call(client, id)` to every id: print each id done, report each failure; 1 if any failed."""
    code = 0
    async with conn.client() as client:
        for sandbox_id in ids:
            try:
                await call(client, sandbox_id)
            except ArcboxError as exc:
                sys.stderr.write(f"arcbox-vm: {action} {sandbox_id}: {one_line(exc)}\n")
                code = EXIT_ERROR
            else:
                print(sandbox_id, flush=True)
    return code
