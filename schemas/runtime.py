"""Messages of the stream runtime itself, whatever the application: dead letters.

A dead letter is what a stage gave up on (undecodable, refused without a reply
stream, or delivered more than the limit), with why; it carries the entry's
stream and payload so that it can be replayed onto the stream it came from.
"""

from __future__ import annotations

import msgspec
from msgspec import Struct


class DeadLetter(Struct, kw_only=True, forbid_unknown_fields=True):
    """An entry a stage gave up on, with why; replayable onto ``stream``."""

    stage: str
    """The consumer group that gave up."""
    stream: str
    """The stream the entry came from."""
    entry_id: str
    error: str
    deliveries: int
    payload: str
    """The entry's ``d`` field (UTF-8, invalid bytes replaced)."""
    at_ms: int


dead_encoder = msgspec.json.Encoder()
dead_decoder = msgspec.json.Decoder(DeadLetter)
