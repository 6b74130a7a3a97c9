"""Structured logs: one line per meaningful event, key=value by default, JSON with --log-format json.

Role: a thin layer over the standard `logging` module. Code logs an *event name* and fields:

    log = get_logger("loop")
    log.info("sync.done", mode="full", seconds=0.012, frontends=40)

which prints `ts=... level=info component=loop event=sync.done mode=full seconds=0.012 frontends=40`.
Records from other modules (plain `logging.getLogger(__name__).info("text %s", x)`) print with
`event=log msg="text ..."`, so every line has the same shape.
May touch: the process's stderr and the root logger's handlers. Invariant: never one line per
connection or per map entry; an event is a change of state someone may want to grep for.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_BUILTIN_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


class EventLogger:
    """Logs named events with fields; the component names the part of the agent speaking."""

    def __init__(self, component: str):
        self.component = component
        self._logger = logging.getLogger(f"meshlet.{component}")

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"meshlet_event": event, "meshlet_fields": fields,
                                                  "meshlet_component": self.component})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(component: str) -> EventLogger:
    return EventLogger(component)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ordered fields of one line: time, level, component, event, then the event's own."""
    event = getattr(record, "meshlet_event", None)
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "component": getattr(record, "meshlet_component", record.name),
    }
    if event is None:
        out["event"] = "log"
        out["msg"] = record.getMessage()
        # `extra=` fields given by modules using plain logging are kept, not lost.
        for key, value in vars(record).items():
            if key not in _BUILTIN_ATTRS and not key.startswith("meshlet_"):
                out.setdefault(key, value)
    else:
        out["event"] = event
        out.update(record.meshlet_fields)
    if record.exc_info:
        out["error"] = logging.Formatter().formatException(record.exc_info)
    return out


def _kv_value(value: Any) -> str:
    if isinstance(value, float):
        value = round(value, 6)
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    if text == "" or any(c in text for c in ' "=\n\t\\'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_kv_value(value)}" for key, value in record_fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record), default=str, separators=(",", ":"))


def configure(log_format: str = "kv", level: int = logging.INFO, stream=None) -> None:
    """Send every log record to `stream` (stderr) in the chosen format; replaces earlier handlers."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # The HTTP client libraries log every request at INFO/DEBUG: per-request lines are noise here.
    for chatty in ("urllib3", "kubernetes.client.rest"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
