"""Structured logs: both formats print the fields passed in extra=, and the traceback."""

from __future__ import annotations

import io
import logging
import shlex
from collections.abc import Iterator

import orjson
import pytest

from pipeline.logs import JsonFormatter, TextFormatter, configure_logging

IDS = {"stage": "select", "request_id": "r-1", "user_id": "alice", "device_id": "d-7",
       "allocation_id": "a-3"}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream to log into; the handlers configure_logging installed go afterwards (pytest
    adds its own capture handlers anew for each phase of a test) and the level is restored."""
    root = logging.getLogger()
    level = root.level
    yield io.StringIO()
    for handler in list(root.handlers):
        if isinstance(handler.formatter, TextFormatter | JsonFormatter):
            root.removeHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_text_lines_end_with_every_extra_field_as_key_value(stream: io.StringIO) -> None:
    configure_logging(level=logging.INFO, fmt="text", stream=stream)
    logging.getLogger("devsched.test").info("allocated %s", "d-7", extra=IDS)
    (line,) = _lines(stream)
    assert " INFO devsched.test allocated d-7 " in line
    assert line.endswith(" ".join(f"{k}={v}" for k, v in IDS.items()))


def test_text_quotes_values_with_spaces_so_the_line_splits_back(stream: io.StringIO) -> None:
    configure_logging(level=logging.INFO, fmt="text", stream=stream)
    logging.getLogger("devsched.test").warning(
        "odd values", extra={"error": 'no "device" fits', "empty": "", "count": 3,
                             "entry": b"1-0"})
    (line,) = _lines(stream)
    fields = dict(part.split("=", 1) for part in shlex.split(line) if "=" in part)
    assert fields == {"error": 'no "device" fits', "empty": "", "count": "3", "entry": "1-0"}


def test_text_is_the_plain_line_when_there_are_no_fields(stream: io.StringIO) -> None:
    configure_logging(level=logging.INFO, fmt="text", stream=stream)
    logging.getLogger("devsched.test").info("just a message")
    (line,) = _lines(stream)
    assert line.endswith(" INFO devsched.test just a message")


def test_json_lines_parse_and_carry_every_extra_field(stream: io.StringIO) -> None:
    configure_logging(level=logging.INFO, fmt="json", stream=stream)
    log = logging.getLogger("devsched.test")
    log.info("allocated %s", "d-7", extra={**IDS, "size": 2, "entry": b"1-0"})
    log.debug("below the level")
    (line,) = _lines(stream)
    entry = orjson.loads(line)
    assert entry.pop("ts").endswith("+00:00")
    assert entry == {"level": "INFO", "logger": "devsched.test", "message": "allocated d-7",
                     **IDS, "size": 2, "entry": "1-0"}


def test_a_field_named_like_a_json_key_does_not_replace_it(stream: io.StringIO) -> None:
    configure_logging(level=logging.INFO, fmt="json", stream=stream)
    logging.getLogger("devsched.test").info("hello", extra={"level": "mine", "logger": "x"})
    entry = orjson.loads(_lines(stream)[0])
    assert (entry["level"], entry["logger"]) == ("INFO", "devsched.test")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_exception_is_included_with_its_traceback(stream: io.StringIO, fmt: str) -> None:
    configure_logging(level=logging.INFO, fmt=fmt, stream=stream)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        logging.getLogger("devsched.test").exception("write failed", extra={"stage": "persist"})
    if fmt == "json":
        (line,) = _lines(stream)  # the traceback stays inside the one JSON line
        entry = orjson.loads(line)
        assert entry["stage"] == "persist"
        assert "Traceback" in entry["exception"]
        assert "RuntimeError: disk on fire" in entry["exception"]
    else:
        first, *rest = _lines(stream)
        assert first.endswith("write failed stage=persist")
        assert rest[0].startswith("Traceback") and rest[-1] == "RuntimeError: disk on fire"


def test_configuring_again_replaces_the_handler_instead_of_doubling_lines(
    stream: io.StringIO,
) -> None:
    configure_logging(level=logging.INFO, fmt="text", stream=io.StringIO())
    configure_logging(level=logging.INFO, fmt="json", stream=stream)
    logging.getLogger("devsched.test").info("once")
    assert [orjson.loads(line)["message"] for line in _lines(stream)] == ["once"]


def test_an_unknown_format_is_refused_by_name(stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml': use one of text, json"):
        configure_logging(level=logging.INFO, fmt="xml", stream=stream)
