"""Logs: the service's own loggers (plain text or JSON lines), the access log FrontDoor writes, and
request ids."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from typing import Any

# Request ids: unique per process by a counter behind a random per-process prefix (32 hex characters, as
# uuid4().hex was). uuid4 reads os.urandom per call: 5 % of the event loop's samples at 64 connections.
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


access_log = logging.getLogger("embed_rerank.access")
_EXTRA_FIELDS = ("request_id", "method", "path", "status", "duration_ms")


class JSONLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: getattr(record, k) for k in _EXTRA_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


# What a request can put into a logged field (a path with %0a in it, a header) and a terminal or a log
# reader would take for the end of a line or a control sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with every control character written as its escape (`\\n`, `\\x1b`, `\\u2028`)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextLogFormatter(logging.Formatter):
    """Plain text, one line a record: the message's control characters escaped, so no request can forge a
    line; a traceback follows on lines that are indented (its own line breaks kept, its text escaped)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        lines = super().formatException(ei).split("\n")
        return "\n".join("  " + escape_controls(line) for line in lines)

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return "\n".join("  " + escape_controls(line) for line in stack_info.split("\n"))


def configure_logging(log_format: str) -> None:
    """The service's own loggers: JSON lines or plain text on stderr, INFO and up."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONLogFormatter() if log_format == "json" else TextLogFormatter())
    root = logging.getLogger("embed_rerank")
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
