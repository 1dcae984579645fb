"""Structured logs: one JSON object per line on stderr. Never a token.

The level comes from ``logging.level`` in the config, or ``PATGATE_LOG_LEVEL`` when set.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

import orjson

LEVEL_ENV = "PATGATE_LOG_LEVEL"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]
    set_level(level)
    logging.getLogger("aiohttp.access").disabled = True


def set_level(level: str) -> None:
    """The configured level, unless ``PATGATE_LOG_LEVEL`` overrides it (at start and reload)."""
    root = logging.getLogger()
    wanted = os.environ.get(LEVEL_ENV) or level
    try:
        root.setLevel(wanted.upper())
    except ValueError:
        root.setLevel(level.upper())
        logging.getLogger("patgate").warning("ignoring %s=%r: not a log level", LEVEL_ENV, wanted)
