"""`devsched dead`: list, show, replay and purge the dead letters.

The work is the runtime's (``pipeline.deadletters``: a replay puts the entry back on
its stream once, recorded in the same script); this module is the command: its
arguments, the table or JSON it prints, its exit codes (0 done, 1 nothing to do or an
unknown letter, 2 a bad argument).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from redis.asyncio import Redis

from pipeline.clock import SystemClock
from pipeline.deadletters import (
    StoredLetter,
    purge,
    read_letter,
    read_letters,
    replay,
)
from schemas.keys import Keys
from stages.settings import Settings

LIST_COLUMNS = ["id", "stage", "stream", "entry_id", "deliveries", "at_ms", "replayed_as",
                "error"]
UNITS_S = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


def parse_duration_s(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", value)
    if found is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {value!r} (a number with s, m, h, d or w)")
    return float(found.group(1)) * UNITS_S[found.group(2) or "s"]


def first_line(error: str | None, width: int = 80) -> str:
    """An error as a table cell: its first line, cut to ``width``."""
    return (error or "").partition("\n")[0][:width]


def row(stored: StoredLetter, *, payload: bool = False) -> dict[str, Any]:
    """A letter as `dead list --json` (and, with its payload, `dead show`) prints it."""
    letter = stored.letter
    out: dict[str, Any] = {
        "id": stored.id,
        "stage": letter.stage if letter else None,
        "stream": letter.stream if letter else None,
        "entry_id": letter.entry_id if letter else None,
        "error": letter.error if letter else "undecodable dead letter",
        "deliveries": letter.deliveries if letter else None,
        "at_ms": letter.at_ms if letter else None,
        "replayed_as": stored.replayed_as,
    }
    if payload:
        out["payload"] = letter.payload if letter else stored.raw
    return out


async def run(args: argparse.Namespace, redis: Redis, settings: Settings) -> int:
    """One `devsched dead ...` command."""
    dead = Keys(settings.prefix).dead
    if args.sub == "list":
        rows = [row(s) for s in await read_letters(redis, dead, stage=args.stage)]
        if args.json:
            print(json.dumps({"dead_letters": rows, "count": len(rows)}))
        else:
            from stages.tools.cli import print_table

            print_table([{**r, "error": first_line(r["error"])} for r in rows], LIST_COLUMNS)
        return 0
    if args.sub == "show":
        stored = await read_letter(redis, dead, args.id)
        if stored is None:
            print(f"error: no dead letter {args.id}", file=sys.stderr)
            return 1
        print(json.dumps(row(stored, payload=True), indent=None if args.json else 2))
        return 0
    if args.sub == "replay":
        if args.id:
            one = await read_letter(redis, dead, args.id)
            if one is None:
                print(f"error: no dead letter {args.id}", file=sys.stderr)
                return 1
            chosen = [one]
        else:
            chosen = [s for s in await read_letters(redis, dead, stage=args.stage)
                      if s.replayed_as is None]
        done = []
        for stored in chosen:
            if stored.letter is None:
                print(f"error: dead letter {stored.id} does not decode; not replayed",
                      file=sys.stderr)
                continue
            r = await replay(redis, dead, stored)
            done.append({"id": r.letter_id, "stream": r.stream, "replayed_as": r.entry_id,
                         "added": r.added})
        print(json.dumps({"replayed": done, "added": sum(1 for d in done if d["added"])}))
        return 0 if done else 1
    assert args.sub == "purge"
    cut = SystemClock().now_ms() - int(args.older_than * 1000)
    print(json.dumps({"purged": await purge(redis, dead, cut)}))
    return 0


def add_commands(sub: Any, fn: Any) -> None:
    """Register `dead list|show|replay|purge` on the devsched parser (``fn`` runs them)."""
    dead = sub.add_parser("dead", help="the dead letters: list, show, replay onto their "
                                       "stream (once), purge").add_subparsers(
        dest="sub", required=True)
    s = dead.add_parser("list", help="every dead letter, oldest first")
    s.add_argument("--stage", help="only this stage's (consumer group's) letters")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=fn)
    s = dead.add_parser("show", help="one dead letter with its payload (JSON)")
    s.add_argument("id", help="its id on the dead stream")
    s.add_argument("--json", action="store_true", help="on one line")
    s.set_defaults(fn=fn)
    s = dead.add_parser("replay", help="put a letter's entry back on its stream, once "
                                       "(a repeated replay adds nothing)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("id", nargs="?", help="its id on the dead stream")
    g.add_argument("--stage", help="every letter of this stage not replayed yet")
    s.set_defaults(fn=fn)
    s = dead.add_parser("purge", help="remove dead letters")
    s.add_argument("--older-than", type=parse_duration_s, default=0.0,
                   help="only those older than this (90s, 15m, 12h, 7d, 2w; default: all)")
    s.set_defaults(fn=fn)
