"""The JSON Schema of the public streams, generated from the Structs.

`devsched schema` prints it; docs/schema.json is the published copy (a test
checks it is current), for producers written in other languages.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.messages import Reply, Request


def public_schema() -> dict[str, Any]:
    (request, reply), components = msgspec.json.schema_components((Request, Reply))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "devsched public streams",
        "description": (
            "Each stream entry has one field, `d`, holding one JSON object. "
            "Producers add a Request to the requests stream; the reply (a Reply) is added "
            "to the stream named by the request's reply_to."
        ),
        "$defs": {**components, "Request": request, "Reply": reply},
        "oneOf": [{"$ref": "#/$defs/Request"}, {"$ref": "#/$defs/Reply"}],
    }
