"""Bulk administration: import devices or quotas from a file, export devices to one.

A file is CSV (a header row naming the fields, one record a row; an empty cell takes
the field's default) or JSON lines (one object a line; blank lines skipped), told by
its extension (``.csv``; ``.jsonl``, ``.ndjson``, ``.json``) or else by its content (a
first character ``{`` is JSON lines). Fields are those of
:class:`~schemas.messages.DeviceSpec` / :class:`~schemas.messages.QuotaSpec`.

What it promises: the whole file is validated first, by the same msgspec types the
streams use, and a duplicate id is an error too; any bad record stops the import
before anything is written, and every bad one is named by its line number. A valid
file is applied in one round trip (one admin.lua call per record, pipelined, each
writing the state and its change record in one step, as `devices add` and `quota set`
do). An export writes the devices in id order in the format an import reads, so an
export imports back to the same devices.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

import msgspec
from redis.asyncio import Redis

from schemas.keys import Keys
from schemas.messages import DeviceSpec, QuotaSpec
from stages.tools.admin import list_devices

T = TypeVar("T", DeviceSpec, QuotaSpec)
FORMATS = ("csv", "jsonl")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
EXPORT_PAGE = 1_000
"""Devices read per page by an export."""


class BadRecords(ValueError):
    """Records of a file that do not validate: (line number, why) for each."""

    def __init__(self, source: str, errors: list[tuple[int, str]]) -> None:
        self.errors = errors
        super().__init__("\n".join(f"{source}:{line}: {why}" for line, why in errors))


def format_of_name(name: str, default: str = "jsonl") -> str:
    """The format a file name's extension says, else ``default``."""
    return EXTENSIONS.get(Path(name).suffix.lower(), default)


def detect_format(name: str, text: str) -> str:
    """``csv`` or ``jsonl``: by the file name's extension, else by its first character."""
    by_name = EXTENSIONS.get(Path(name).suffix.lower())
    if by_name:
        return by_name
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def _rows(text: str, fmt: str) -> Iterator[tuple[int, Any]]:
    """(line number, the record's raw fields) for each record of ``text``."""
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield number, line
        return
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        if row.get(None):  # more cells than the header names
            yield reader.line_num, ValueError(f"{len(row[None])} cell(s) more than the header")
            continue
        yield reader.line_num, {k: v for k, v in row.items() if k and v not in ("", None)}


def parse_records(text: str, kind: type[T], *, fmt: str, source: str = "<input>") -> list[T]:
    """Every record of ``text`` as ``kind``; :class:`BadRecords` naming every bad line."""
    decoder = msgspec.json.Decoder(kind)
    key = "id" if kind is DeviceSpec else "user_id"
    records: list[T] = []
    errors: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, raw in _rows(text, fmt):
        try:
            if isinstance(raw, ValueError):
                raise raw
            record = decoder.decode(raw) if fmt == "jsonl" else msgspec.convert(
                raw, kind, strict=False)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            errors.append((number, str(exc)))
            continue
        ident = getattr(record, key)
        if ident in seen:
            errors.append((number, f"duplicate {key} {ident!r} (first on line {seen[ident]})"))
            continue
        seen[ident] = number
        records.append(record)
    if errors:
        raise BadRecords(source, errors)
    return records


def read_file(path: str, kind: type[T]) -> tuple[list[T], str]:
    """The records of the file ``path`` (``-``: standard input) and its format."""
    import sys

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    fmt = detect_format(path, text)
    return parse_records(text, kind, fmt=fmt, source=path), fmt


def write_records(out: TextIO, records: list[DeviceSpec], fmt: str) -> None:
    """``records`` in ``fmt`` (every field written, so the file says what is in force)."""
    rows = [msgspec.to_builtins(r) for r in records]
    if fmt == "jsonl":
        encoder = msgspec.json.Encoder()
        out.writelines(encoder.encode(r).decode() + "\n" for r in records)
        return
    fields = list(DeviceSpec.__struct_fields__)
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({f: row.get(f) for f in fields})


async def device_specs(redis: Redis, keys: Keys) -> list[DeviceSpec]:
    """Every listed device (not deleted), in id order, as the spec that made it."""
    out: list[DeviceSpec] = []
    cursor: str | None = None
    while True:
        page = await list_devices(redis, keys, cursor=cursor, limit=EXPORT_PAGE)
        out += [DeviceSpec(id=d.id, name=d.name, pool=d.pool, model=d.model, host=d.host,
                           adb_host=d.adb_host, adb_port=d.adb_port, cpu_cores=d.cpu_cores,
                           memory_mb=d.memory_mb, storage_mb=d.storage_mb)
                for d in page.devices]
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor
