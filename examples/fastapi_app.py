"""A FastAPI backend that embeds pimcore (asyncio host, trio guest mode).

What it shows (docs/EMBEDDING.md, "An asyncio host"):

* the app's lifespan opens the broker with ``pimcore.asyncio.open_pimcore``
  in the app's own asyncio loop -- no thread, no second process -- and
  closes it (gracefully) on shutdown;
* ``POST /conversations/{conv}/messages`` posts through the handle, as a user
  (``sender``/``device`` in the body) or as the system (no sender), with an
  optional idempotency key;
* ``POST /tokens`` mints a login token for a pimcore SDK client, with the
  broker's URL to connect to;
* a background task consumes the durable host events (consumer ``push``)
  and forwards a push notification to every recipient of a message who had
  no device online, through a pluggable :class:`PushSender`; it acks each
  event after forwarding, so a crash or a failing push service loses
  nothing (at least once: a push may be sent twice after a crash).

Run it::

    pip install -e '.[test]'          # fastapi, uvicorn, httpx
    PIMCORE_DATA_DIR=chat-data PIMCORE_LISTEN=tcp://127.0.0.1:7400 \\
        uvicorn examples.fastapi_app:app --port 8000
    curl -s -X POST localhost:8000/groups -H 'content-type: application/json' \\
        -d '{"conv": "team", "members": ["alice", "bob"]}'
    curl -s -X POST localhost:8000/conversations/team/messages -H 'content-type: application/json' \\
        -d '{"text": "welcome!"}'

``PUSH_URL`` set: push notifications are POSTed there as JSON
(:class:`WebhookPushSender`); else they are logged (:class:`LogPushSender`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Optional, Protocol, Sequence

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import pimcore.asyncio as pim
from pimcore.errors import ErrorCode

log = logging.getLogger("fastapi_app")
if not log.handlers and not logging.getLogger().handlers:
    # `uvicorn examples.fastapi_app:app` configures its own loggers only: without
    # a handler here the pushes (INFO) would be dropped.  An app that configures
    # logging itself (a root handler) gets them through its own handlers instead.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

#: HTTP status for the broker's refusals (others: 400).
STATUS = {ErrorCode.UNKNOWN_CONVERSATION: 404, ErrorCode.NOT_MEMBER: 403, ErrorCode.ALREADY_EXISTS: 409,
          ErrorCode.DUPLICATE_CONFLICT: 409, ErrorCode.PAYLOAD_TOO_LARGE: 413}


# ---------------------------------------------------------------- push notifications


@dataclass(frozen=True, slots=True)
class PushNotification:
    """One notification for ``user``: a message in ``conv`` while no device
    of theirs was online.  ``event_id`` identifies it (a retry after a crash
    has the same one: a push service can dedupe on it)."""

    event_id: int
    user: str
    conv: str
    seq: int
    sender: str  # "" for the system
    preview: str  # the payload's first 100 characters, if it is text


class PushSender(Protocol):
    async def send(self, note: PushNotification) -> None:
        """Deliver ``note``; raise to have it tried again later."""


class LogPushSender:
    """Writes each notification to the log (the default)."""

    async def send(self, note: PushNotification) -> None:
        log.info("push to %s: %s in %s #%d", note.user, note.preview, note.conv, note.seq)


class WebhookPushSender:
    """POSTs each notification as JSON to ``url`` (your push service); a
    non-2xx answer or a network error raises, so the event is retried."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        import httpx

        self.url = url
        self._client = httpx.AsyncClient(timeout=timeout)

    async def send(self, note: PushNotification) -> None:
        r = await self._client.post(self.url, json=asdict(note))
        r.raise_for_status()

    async def aclose(self) -> None:
        await self._client.aclose()


def notifications(ev: pim.HostEvent) -> list[PushNotification]:
    """The pushes one host event asks for: a message (not a JOINED/LEFT
    entry) to each recipient with no device online, its sender excepted."""
    if ev.type != "message" or ev.kind != 0:
        return []
    try:
        preview = ev.payload.decode("utf-8")[:100]
    except UnicodeDecodeError:
        preview = "(a message)"
    return [PushNotification(ev.id, user, ev.conv, ev.seq, ev.sender, preview)
            for user in ev.offline_recipients if user != ev.sender]


async def forward_pushes(im: pim.AsyncPimcore, sender: PushSender, consumer: str = "push",
                         retry_delay: float = 1.0) -> None:
    """Forever: each host event from ``consumer``'s durable cursor -> its push
    notifications -> ack.  An event whose push failed is not acked; it is
    tried again after ``retry_delay`` seconds (and after a restart)."""
    while True:
        try:
            async for ev in im.events(consumer):
                for note in notifications(ev):
                    await sender.send(note)
                await im.ack_events(ev.id, consumer)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a push service down: retry from the cursor
            log.exception("push forwarding failed; retrying in %g s", retry_delay)
            await asyncio.sleep(retry_delay)


# ---------------------------------------------------------------- the app


class PostBody(BaseModel):
    text: str
    sender: Optional[str] = None  # None: the system
    device: str = "web"
    idempotency_key: Optional[str] = None


class GroupBody(BaseModel):
    conv: str
    members: list[str]


class TokenBody(BaseModel):
    user: str
    device: Optional[str] = None
    ttl: int = 3600


def create_app(*, data_dir: str, listen: Sequence[str], push_sender: Optional[PushSender] = None,
               consumer: str = "push", **pimcore_settings: Any) -> FastAPI:
    """The app, with its broker in ``data_dir`` listening on ``listen`` for
    SDK clients; ``pimcore_settings``: more ``open_pimcore`` settings."""
    sender: PushSender = push_sender if push_sender is not None else LogPushSender()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with pim.open_pimcore(data_dir=data_dir, listen=list(listen), events=True, **pimcore_settings) as im:
            app.state.im = im
            forwarder = asyncio.create_task(forward_pushes(im, sender, consumer))
            try:
                yield
            finally:
                forwarder.cancel()
                try:
                    await forwarder
                except asyncio.CancelledError:
                    pass
                if isinstance(sender, WebhookPushSender):
                    await sender.aclose()

    app = FastAPI(title="pimcore embedded in FastAPI", lifespan=lifespan)

    def handle() -> pim.AsyncPimcore:
        return app.state.im

    def refused(exc: pim.RequestRefused) -> HTTPException:
        return HTTPException(STATUS.get(exc.code, 400), exc.code.name)

    @app.post("/conversations/{conv}/messages", status_code=201)
    async def post_message(conv: str, body: PostBody) -> dict[str, Any]:
        kw: dict[str, Any] = {"idempotency_key": body.idempotency_key}
        if body.sender is not None:  # as a member's device; else as the system
            kw.update(sender=body.sender, device=body.device)
        try:
            payload = body.text.encode()
        except UnicodeEncodeError:  # (JSON may carry a lone surrogate, "\ud800": no UTF-8 for it)
            raise HTTPException(400, "text is not valid Unicode (a lone surrogate)") from None
        try:
            posted = await handle().post(conv, payload, **kw)
        except pim.RequestRefused as exc:
            raise refused(exc) from None
        return {"conv": posted.conv, "seq": posted.seq, "msg_id": posted.msg_id.hex(), "duplicate": posted.duplicate}

    @app.post("/groups", status_code=201)
    async def create_group(body: GroupBody) -> dict[str, Any]:
        try:
            changed = await handle().create_group(body.conv, body.members)
        except pim.RequestRefused as exc:
            raise refused(exc) from None
        return {"conv": changed.conv, "members": list(changed.members)}

    @app.post("/tokens", status_code=201)
    async def mint_token(body: TokenBody) -> dict[str, Any]:
        try:
            token = handle().issue_token(body.user, body.device, ttl=body.ttl)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"token": token, "url": handle().urls[0]}

    @app.get("/users/{user}/devices")
    async def devices(user: str) -> dict[str, Any]:
        try:
            return {"user": user, "online": handle().online_devices(user)}
        except pim.RequestRefused as exc:  # (an invalid user id: BAD_REQUEST)
            raise refused(exc) from None

    @app.get("/users/{user}/unread")
    async def unread(user: str) -> dict[str, Any]:
        try:
            return {"user": user, "unread": await handle().unread(user)}
        except pim.RequestRefused as exc:
            raise refused(exc) from None

    return app


def _sender_from_env() -> PushSender:
    url = os.environ.get("PUSH_URL")
    return WebhookPushSender(url) if url else LogPushSender()


# `uvicorn examples.fastapi_app:app`: nothing is opened until the lifespan starts.
app = create_app(
    data_dir=os.environ.get("PIMCORE_DATA_DIR", "chat-data"),
    listen=[os.environ.get("PIMCORE_LISTEN", "tcp://127.0.0.1:7400")],
    push_sender=_sender_from_env(),
)
