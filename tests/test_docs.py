"""The published JSON Schema and the README's commands stay true to the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec

from schemas.events import EVENT_TYPES, event_decoder, event_type
from schemas.jsonschema import public_schema
from schemas.messages import AllocateRequest, ReleaseRequest, request_decoder

ROOT = Path(__file__).resolve().parent.parent


def test_published_schema_matches_the_structs() -> None:
    published = json.loads((ROOT / "docs" / "schema.json").read_text())
    assert published == json.loads(json.dumps(public_schema())), "run: devsched schema --out docs/schema.json"


def test_every_public_type_is_defined_not_a_reference_to_itself() -> None:
    defs = public_schema()["$defs"]
    for name in ("Request", "Reply", "Event", "Notification"):
        assert defs[name] != {"$ref": f"#/$defs/{name}"}, name
    assert {"previous_device_id", "adb_host", "adb_port", "device_name"} <= set(
        defs["Notification"]["properties"])


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert "devsched demo" in blocks[0]
    assert blocks[1] in (ROOT / ".ci" / "run").read_text()


def test_wire_example_decodes_as_documented() -> None:
    raw = b'{"type":"allocate","request_id":"r1","user_id":"alice","reply_to":"ds:reply:cli"}'
    req = request_decoder.decode(raw)
    assert isinstance(req, AllocateRequest) and req.duration_minutes == 60
    rel = request_decoder.decode(
        b'{"type":"release","request_id":"r2","device_id":"d1","reply_to":"ds:reply:cli"}')
    assert isinstance(rel, ReleaseRequest)
    try:
        request_decoder.decode(raw.replace(b'"r1"', b'"r1","duration_minutes":0'))
    except msgspec.ValidationError as exc:
        assert "duration_minutes" in str(exc)
    else:
        raise AssertionError("a zero duration must be refused")


def test_wire_format_has_one_valid_example_per_event_type() -> None:
    text = (ROOT / "docs" / "wire-format.md").read_text()
    section = text.split("## Events from other systems", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
    assert block is not None
    examples = [event_decoder.decode(line.encode()) for line in block.group(1).splitlines()]
    assert sorted(event_type(e) for e in examples) == sorted(EVENT_TYPES)
    for kind in EVENT_TYPES:  # each type has its row in the table
        assert f"| `{kind}` |" in section, kind
