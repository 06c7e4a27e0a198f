"""Structured logging: one line per event, JSON in production, readable in development.

Request and tenant ids travel in context variables so every line written while handling a
request carries them without threading a logger through every call.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
tenant_id_var: ContextVar[str | None] = ContextVar("tenant_id", default=None)
actor_var: ContextVar[str | None] = ContextVar("actor", default=None)

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, var in (
        ("request_id", request_id_var),
        ("tenant_id", tenant_id_var),
        ("actor", actor_var),
    ):
        value = var.get()
        if value is not None:
            fields[name] = value
    for key, value in record.__dict__.items():
        if key not in _RESERVED and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(_context(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _context(record).items())
        text = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extra:
            text += f"  [{extra}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(level: str, fmt: str, debug: bool = False) -> None:
    """Install one stderr handler; `auto` means text on a terminal or in debug, else JSON."""
    if fmt == "auto":
        fmt = "text" if debug or sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log repeats what our own request line says
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
