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


class RetryItem(Struct, kw_only=True, forbid_unknown_fields=True):
    """One item of an HTTP sink's retry queue (a sorted set scored by when it is due)."""

    key: str
    """The item's dedupe key (unique per item of a sink)."""
    payload: str
    """What is sent (one JSON object of the batch body)."""
    stream: str
    entry_id: str
    """Where it came from (kept in its dead letter)."""
    first_ms: int
    """When its first send failed: past the retry budget it is dead-lettered."""
    attempts: int
    error: str = ""


retry_encoder = msgspec.json.Encoder()
retry_decoder = msgspec.json.Decoder(RetryItem)
