"""Logging: one JSON object per line on stderr (for journald and scripts), or readable text.

`setup_logging` is called by the CLI, never at import time. Everything logs through
`log(event, **fields)`, whose fields become keys of the JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = logging.getLogger("selfdistill")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        obj.update(getattr(record, "fields", {}))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        t = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{k}={_short(v)}" for k, v in fields.items()]
        lvl = "" if record.levelno == logging.INFO else f"{record.levelname} "
        return f"{t} {lvl}{record.getMessage()}" + (("  " + " ".join(parts)) if parts else "")


def _short(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
    return s if len(s) <= 120 else s[:117] + "..."


def setup_logging(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def log(event: str, level: int = logging.INFO, **fields: object) -> None:
    LOGGER.log(level, event, extra={"fields": fields})
