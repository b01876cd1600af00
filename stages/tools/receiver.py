"""A billing service and webhook receiver on loopback, for tests and the demo.

Built on aiohttp.web (no HTTP parsing of our own). It plays both services the
scheduler talks to:

* ``POST /usage`` (the billing export): needs ``Authorization: Bearer <token>``
  (else 401); records each entry of ``{"entries": [...]}`` by ``entry_id`` (the
  dedupe view: an entry sent twice is kept once and counted in ``duplicates``) and the
  batch's ``Idempotency-Key``.
* ``GET /accounts/<user_id>``: the bearer token too; answers the standing set for the
  user (default ``{"status": "ok", "balance": 100.0}``).
* ``POST /webhook``: needs ``X-Devsched-Signature: sha256=<hex>`` to be the HMAC-SHA256
  of the exact body with the secret (else 401); records each notification by its ``id``.

It can be told to misbehave: ``mode`` ``fail`` answers 500 to everything but the
control endpoints, ``hang`` answers nothing until the mode changes (the client's
timeout ends it), and :meth:`Receiver.down` closes the listening socket (connections
refused) until :meth:`Receiver.up` opens it again on the same port. The same controls
over HTTP: ``POST /control/mode`` with ``{"mode": "ok"|"fail"|"hang"}``, ``POST
/control/down`` with ``{"seconds": N}`` (down, and up again after N seconds), ``POST
/control/accounts/<user_id>`` with a standing, ``GET /control/counts``. Every request
to the service endpoints is counted in ``attempts`` (whatever it was answered), so a
test can tell a storm from a probe. `devsched receiver` serves one until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODES = ("ok", "fail", "hang")


@dataclass
class Received:
    """What the receiver got, deduped by key."""

    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    """entry_id (the allocation id of a final entry) -> its entry (the first copy)."""
    notifications: dict[str, dict[str, Any]] = field(default_factory=dict)
    """notification id -> the notification."""
    duplicates: Counter[str] = field(default_factory=Counter)
    """``usage`` / ``webhook``: entries received again after their first copy."""
    attempts: Counter[str] = field(default_factory=Counter)
    """``usage`` / ``accounts`` / ``webhook``: requests received, whatever the answer."""
    rejected: Counter[str] = field(default_factory=Counter)
    """``token`` / ``signature``: requests refused 401."""
    idempotency_keys: list[str] = field(default_factory=list)
    lookups: Counter[str] = field(default_factory=Counter)
    """user_id -> standings answered."""
    webhook_bodies: list[tuple[bytes, str]] = field(default_factory=list)
    """Each webhook request's exact body and its X-Devsched-Signature header, as received."""


class Receiver:
    def __init__(self, *, token: str, secret: str, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.token = token
        self.secret = secret
        self.host = host
        self.port = port
        self.mode = "ok"
        self.received = Received()
        self.accounts: dict[str, dict[str, Any]] = {}
        self._unhang = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._later: asyncio.Task[None] | None = None
        app = web.Application()
        app.add_routes([
            web.post("/usage", self._usage),
            web.get("/accounts/{user_id}", self._account),
            web.post("/webhook", self._webhook),
            web.post("/control/mode", self._control_mode),
            web.post("/control/down", self._control_down),
            web.post("/control/accounts/{user_id}", self._control_account),
            web.get("/control/counts", self._control_counts),
        ])
        self._app = app

    @property
    def url(self) -> str:
        """The billing base URL (DEVSCHED_BILLING_URL)."""
        return f"http://{self.host}:{self.port}"

    @property
    def webhook_url(self) -> str:
        """DEVSCHED_WEBHOOK_URL."""
        return f"{self.url}/webhook"

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await self.up()

    async def up(self) -> None:
        """Listen (again, on the same port)."""
        assert self._runner is not None
        if self._site is not None:
            return
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        if not self.port:  # asked for any port: keep the one bound, for up() after down()
            self.port = int(self._runner.addresses[0][1])

    async def down(self) -> None:
        """Stop listening: new connections are refused until :meth:`up`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def stop(self) -> None:
        if self._later is not None:
            self._later.cancel()
        self.set_mode("ok")
        await self.down()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.mode = mode
        if mode == "hang":
            self._unhang.clear()
        else:
            self._unhang.set()

    def set_account(self, user_id: str, status: str, balance: float | None = None) -> None:
        self.accounts[user_id] = {"status": status, "balance": balance}

    def counts(self) -> dict[str, Any]:
        r = self.received
        return {"usage_entries": len(r.usage), "notifications": len(r.notifications),
                "duplicates": dict(r.duplicates), "attempts": dict(r.attempts),
                "rejected": dict(r.rejected), "batches": len(r.idempotency_keys),
                "mode": self.mode, "up": self._site is not None}

    # --- the services ------------------------------------------------------------------

    async def _misbehave(self, kind: str) -> web.Response | None:
        self.received.attempts[kind] += 1
        if self.mode == "hang":
            await self._unhang.wait()
        if self.mode == "fail":
            return web.Response(status=500, text="told to fail")
        return None

    def _token_ok(self, request: web.Request) -> bool:
        ok = hmac.compare_digest(request.headers.get("Authorization", ""),
                                 f"Bearer {self.token}")
        if not ok:
            self.received.rejected["token"] += 1
        return ok

    async def _usage(self, request: web.Request) -> web.Response:
        bad = await self._misbehave("usage")
        if bad is not None:
            return bad
        if not self._token_ok(request):
            return web.Response(status=401, text="bad token")
        try:
            entries = json.loads(await request.read())["entries"]
            ids = [str(e.get("entry_id") or e["allocation_id"]) for e in entries]
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, text=f"bad body: {exc}")
        for aid, entry in zip(ids, entries, strict=True):
            if aid in self.received.usage:
                self.received.duplicates["usage"] += 1
            else:
                self.received.usage[aid] = entry
        self.received.idempotency_keys.append(request.headers.get("Idempotency-Key", ""))
        return web.json_response({"accepted": len(entries)})

    async def _account(self, request: web.Request) -> web.Response:
        bad = await self._misbehave("accounts")
        if bad is not None:
            return bad
        if not self._token_ok(request):
            return web.Response(status=401, text="bad token")
        uid = request.match_info["user_id"]
        self.received.lookups[uid] += 1
        return web.json_response(self.accounts.get(uid, {"status": "ok", "balance": 100.0}))

    async def _webhook(self, request: web.Request) -> web.Response:
        bad = await self._misbehave("webhook")
        if bad is not None:
            return bad
        body = await request.read()
        self.received.webhook_bodies.append((body, request.headers.get("X-Devsched-Signature", "")))
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Devsched-Signature", ""), expected):
            self.received.rejected["signature"] += 1
            return web.Response(status=401, text="bad signature")
        try:
            notes = json.loads(body)["notifications"]
            ids = [str(n["id"]) for n in notes]
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, text=f"bad body: {exc}")
        for nid, note in zip(ids, notes, strict=True):
            if nid in self.received.notifications:
                self.received.duplicates["webhook"] += 1
            else:
                self.received.notifications[nid] = note
        return web.json_response({"accepted": len(notes)})

    # --- control -----------------------------------------------------------------------

    async def _control_mode(self, request: web.Request) -> web.Response:
        try:
            self.set_mode(str((await request.json())["mode"]))
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, text=str(exc))
        return web.json_response(self.counts())

    async def _control_down(self, request: web.Request) -> web.Response:
        seconds = float((await request.json()).get("seconds", 30))

        async def later() -> None:
            await asyncio.sleep(0.05)  # let this answer go out first
            await self.down()
            await asyncio.sleep(seconds)
            await self.up()

        self._later = asyncio.create_task(later())
        return web.json_response({"down_for_s": seconds})

    async def _control_account(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.set_account(request.match_info["user_id"], str(body["status"]),
                         body.get("balance"))
        return web.json_response(self.accounts[request.match_info["user_id"]])

    async def _control_counts(self, request: web.Request) -> web.Response:
        return web.json_response(self.counts())


def add_parser(sub: Any) -> None:
    """`devsched receiver`: registered by stages.tools.cli."""
    s = sub.add_parser("receiver", help="serve a billing service and webhook receiver on "
                       "loopback (for tests and the demo) until interrupted")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--token", default="devsched-token", help="the bearer token it accepts")
    s.add_argument("--secret", default="devsched-secret", help="the webhook HMAC secret")
    s.set_defaults(fn=cmd_receiver)


def cmd_receiver(args: argparse.Namespace) -> int:
    async def go() -> None:
        receiver = Receiver(token=args.token, secret=args.secret, port=args.port)
        await receiver.start()
        print(json.dumps({"billing_url": receiver.url, "webhook_url": receiver.webhook_url}),
              flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            print(json.dumps(receiver.counts()), flush=True)
            await receiver.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0
