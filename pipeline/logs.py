"""Log lines that print their structured fields, as readable text or as JSON lines.

Code logs its ids as fields: ``log.error("entry failed", extra={"stage": ...,
"entry": ...})``. A field is every attribute of the ``LogRecord`` that the
standard attributes do not define, so whatever a caller passes in ``extra``
is printed, by name, without a list to keep in step. What each format promises:

- ``text`` (the default): ``time level logger message key=value key=value``,
  one line per record (the traceback, when there is one, on the lines after);
  a value is quoted, JSON style, when it is empty or holds a space, a quote, an
  equals sign or a control character, so every line splits back into its fields.
- ``json``: exactly one JSON object per line (orjson): ``ts`` (ISO 8601, UTC,
  milliseconds), ``level``, ``logger``, ``message``, then every field, and
  ``exception`` (the formatted traceback) when there is one. A field named like
  one of those keys does not replace it. A value JSON cannot hold is written as
  its ``str()``; bytes are decoded as UTF-8.

``configure_logging`` installs one handler on the root logger, replacing the
handlers there, so calling it again changes the format instead of doubling lines.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

LOG_FORMATS = ("text", "json")
"""The values DEVSCHED_LOG_FORMAT accepts."""

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}
"""Attributes every LogRecord has (or gets from a Formatter); everything else is a field."""
_FIXED_JSON_KEYS = ("ts", "level", "logger", "message", "exception", "stack")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of record: what ``extra=`` put on it, in the order given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _plain(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else value


def _text_value(value: Any) -> str:
    value = _plain(value)
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...``; the traceback on the next lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = fields_of(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per record and line: ts, level, logger, message, the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            if key not in _FIXED_JSON_KEYS:
                entry[key] = _plain(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:  # e.g. an int beyond 64 bits, which default= never sees
            return orjson.dumps({k: v if isinstance(v, str) else str(v)
                                 for k, v in entry.items()}).decode()


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of a format name; ValueError names the accepted ones."""
    if fmt == "text":
        return TextFormatter()
    if fmt == "json":
        return JsonFormatter()
    raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(LOG_FORMATS)}")


def configure_logging(*, level: int, fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Log at level and above to stream (stderr by default) in format fmt (text or json)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
