"""Which sandbox a log line is about, carried in a context variable.

Set it where work for one sandbox starts (an RPC, a boot task); asyncio tasks inherit
it, so every line logged underneath names the sandbox without threading an argument
through every call. A line may also name its sandbox and carry structured fields
explicitly: `log.info("ready", extra=logctx.fields("ID", boot_seconds=1.2))`.

Formats (`arcbox-vm serve --log-format`, or `[daemon] log_format`):
- logfmt: `ts=... level=info sandbox=ID logger=... msg="ready" event=ready ready_seconds=1.234`
- json: one object per line: {"ts", "level", "sandbox", "logger", "msg", ...the fields}
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

sandbox_id: contextvars.ContextVar[str] = contextvars.ContextVar("sandbox_id", default="-")


def fields(sandbox: str | None = None, /, **values: object) -> dict[str, object]:
    """`extra=` for a log call: the sandbox the line is about (else the context's) and
    structured key/value fields, rendered by both formatters."""
    extra: dict[str, object] = {"fields": values}
    if sandbox is not None:
        extra["sandbox"] = sandbox
    return extra


class SandboxIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "sandbox", None) is None:
            record.sandbox = sandbox_id.get()
        return True


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_.:/+@" for c in text):
        return text
    return json.dumps(text)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        if record.exc_info:
            msg += " " + self.formatException(record.exc_info).replace("\n", " | ")
        extra = "".join(f" {k}={_logfmt_value(v)}" for k, v in getattr(record, "fields", {}).items())
        return (f"ts={ts} level={record.levelname.lower()} sandbox={getattr(record, 'sandbox', '-')} "
                f"logger={record.name} msg={json.dumps(msg)}{extra}")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": record.created, "level": record.levelname.lower(), "sandbox": getattr(record, "sandbox", "-"),
               "logger": record.name, "msg": record.getMessage()}
        for key, value in getattr(record, "fields", {}).items():
            out.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None else str(value))
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
