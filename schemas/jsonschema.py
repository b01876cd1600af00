"""The JSON Schema of the public streams, generated from the Structs.

`devsched schema` prints it; docs/schema.json is the published copy (a test
checks it is current), for producers written in other languages: the requests
and replies, the events other systems send (``<prefix>:events``) and the
notifications the scheduler sends them (``<prefix>:notifications``), and the manual
job runs (``<prefix>:job_requests``) with their answers; and the HTTP bodies of the
billing export, the standings and the webhook.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.events import Event
from schemas.messages import (
    AccountStanding,
    JobRunRequest,
    JobRunResult,
    Notification,
    Reply,
    Request,
    UsageBatch,
    WebhookBatch,
)

PUBLIC_TYPES: dict[str, Any] = {
    "Request": Request, "Reply": Reply, "Event": Event, "Notification": Notification,
    "JobRunRequest": JobRunRequest, "JobRunResult": JobRunResult,
    "UsageBatch": UsageBatch, "AccountStanding": AccountStanding, "WebhookBatch": WebhookBatch,
}
"""Each public message by name: what producers send and what they read back."""


def public_schema() -> dict[str, Any]:
    names = list(PUBLIC_TYPES)
    roots, components = msgspec.json.schema_components(tuple(PUBLIC_TYPES.values()))
    defs = dict(components)
    for name, root in zip(names, roots, strict=True):
        # a Struct's root is a reference to its own component: keep the component
        if root != {"$ref": f"#/$defs/{name}"}:
            defs[name] = root
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "devsched public streams",
        "description": (
            "Each stream entry has one field, `d`, holding one JSON object. "
            "Producers add a Request to the requests stream; the reply (a Reply) is added "
            "to the stream named by the request's reply_to. Other systems add an Event to "
            "the events stream and read Notifications from the notifications stream. An "
            "operator adds a JobRunRequest to the job_requests stream; its JobRunResult "
            "goes to the request's reply_to. Over HTTP: a UsageBatch is POSTed to the billing "
            "service, which answers an AccountStanding; a WebhookBatch is POSTed to the webhook."
        ),
        "$defs": defs,
        "oneOf": [{"$ref": f"#/$defs/{name}"} for name in names],
    }
