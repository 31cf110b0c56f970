"""Which sandbox a log line is about, carried in a context variable.

Set it where work for one sandbox starts (an RPC, a boot task); asyncio tasks inherit
it, so every line logged underneath names the sandbox without threading an argument
through every call.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

sandbox_id: contextvars.ContextVar[str] = contextvars.ContextVar("sandbox_id", default="-")


class SandboxIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.sandbox = sandbox_id.get()
        return True


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        if record.exc_info:
            msg += " " + self.formatException(record.exc_info).replace("\n", " | ")
        return (f"ts={ts} level={record.levelname.lower()} sandbox={getattr(record, 'sandbox', '-')} "
                f"logger={record.name} msg={json.dumps(msg)}")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": record.created, "level": record.levelname.lower(), "sandbox": getattr(record, "sandbox", "-"),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(SandboxIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
