"""The server API: JSON endpoints over :class:`~pimcore.embed.Pimcore`.

Each endpoint is one handle method (docs/HTTP.md, Server API).  Errors:

* a malformed body or query (not JSON, a field missing or of the wrong
  type) -> 400 ``BAD_REQUEST`` with a message naming the field (the same
  code as the broker's own BAD_REQUEST: every code is upper case);
* :class:`~pimcore.embed.RequestRefused` -> 4xx with the ErrorCode name as
  the code (:data:`REFUSED_STATUS`), e.g. 404 ``UNKNOWN_CONVERSATION``, and
  its message without the code (:func:`refusal_message`);
* :class:`~pimcore.errors.StoreError` -> 503 ``STORE_UNAVAILABLE`` (retry;
  a post retried with the same Idempotency-Key is stored once);
* :class:`~pimcore.errors.BrokerStopped` -> 503 ``UNAVAILABLE`` (the
  broker is shutting down).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Union

import trio

from ..errors import BrokerStopped, ErrorCode, StoreError
from ..ids import _show
from .server import HttpConfig, HttpError, RawBody, Request, Router, StreamBody, _json_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import HostEvent, Pimcore

__all__ = ["register_api", "REFUSED_STATUS", "MAX_BATCH", "MAX_STREAM_PAGE", "MAX_PAGE_BYTES", "smallest_page_bytes",
           "MAX_LISTED_CONSUMERS"]

#: Most consumers ``GET /v1/events/consumers`` lists (the first by name;
#: ``more`` says there are others).
MAX_LISTED_CONSUMERS = 1000

#: HTTP status of each ErrorCode a handle refusal carries (others: 400).
REFUSED_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_CONVERSATION: 404,
    ErrorCode.NOT_MEMBER: 403,
    ErrorCode.BAD_CURSOR: 400,
    ErrorCode.BAD_MENTION: 400,
    ErrorCode.TOO_MANY_MENTIONS: 400,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.DUPLICATE_CONFLICT: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_IN_FLIGHT: 429,
    ErrorCode.REJECTED: 403,
    ErrorCode.INTERNAL: 503,  # a content check could not answer (moderation down, policy closed): retry
    ErrorCode.NO_SUCH_MESSAGE: 404,
    ErrorCode.NOT_SENDER: 403,
    ErrorCode.TOO_LATE: 409,
    ErrorCode.RECALLED: 409,
    ErrorCode.BAD_ACTION: 400,
}

#: What each refusal's code means, in words: the error's message says it
#: there instead of repeating the code (which is a field of its own).
_SAID: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: "a malformed request",
    ErrorCode.UNKNOWN_CONVERSATION: "no such conversation",
    ErrorCode.NOT_MEMBER: "not a member of the conversation",
    ErrorCode.BAD_CURSOR: "not a cursor the broker gave",
    ErrorCode.BAD_MENTION: "a mention is not a valid user id",
    ErrorCode.TOO_MANY_MENTIONS: "too many mentions",
    ErrorCode.ALREADY_EXISTS: "it exists already",
    ErrorCode.DUPLICATE_CONFLICT: "the idempotency key was used for a different message",
    ErrorCode.PAYLOAD_TOO_LARGE: "the payload is too large",
    ErrorCode.RATE_LIMITED: "rate limited: retry later",
    ErrorCode.TOO_MANY_IN_FLIGHT: "too many requests in flight: retry later",
    ErrorCode.REJECTED: "rejected by the content policy",
    ErrorCode.INTERNAL: "the broker could not answer: retry",
    ErrorCode.NO_SUCH_MESSAGE: "no such message",
    ErrorCode.NOT_SENDER: "only its sender may change the message",
    ErrorCode.TOO_LATE: "the time to do this has passed",
    ErrorCode.RECALLED: "the message was recalled",
    ErrorCode.BAD_ACTION: "not an action (recall, edit or delete)",
    ErrorCode.STORE_UNAVAILABLE: "the store failed: retry",
}


def refusal_message(code: ErrorCode, message: str) -> str:
    """A handle refusal's message without its code: the handle's messages
    say ``group 'g' not changed: BAD_REQUEST: <why>``, or end with the code
    (``members of 'x': UNKNOWN_CONVERSATION``), where the code is the HTTP
    error's ``code`` already; the message says why in words."""
    name = code.name
    if f": {name}: " in message:
        return message.replace(f": {name}: ", ": ", 1)
    if message.endswith(f": {name}"):
        return message[: -len(name)] + _SAID.get(code, name.lower().replace("_", " "))
    if message.startswith(f"{name}: "):
        return message[len(name) + 2:]
    return message


#: Longest ``wait`` (seconds) a ``GET /v1/events`` long-poll may ask for.
MAX_EVENT_WAIT = 60.0

#: Most messages in one ``POST /v1/messages`` (the body limit, ``[http]
#: max_body_bytes``, applies too).
MAX_BATCH = 1000

#: Most events per server-sent-events write (``limit`` of ``/v1/events/stream``).
MAX_STREAM_PAGE = 500

#: Most bytes of one page's JSON body by default (``[http] max_page_bytes``,
#: :attr:`~pimcore.http.HttpConfig.max_page_bytes`): a history page, a
#: conversation-list page, an event poll (and one server-sent-events write).  A page stops
#: before the item that would pass it, ``more`` set, and its continuation
#: (``from_seq``, ``cursor``, ``next``) goes on from there; it always holds
#: one item, however large.  History and events are read from the store a
#: few at a time (as many as could fit if each were as large as
#: ``max_payload`` allows), the conversation list once per page (the store
#: builds the whole list for any read), so no body holds much more than
#: this.  (The wire
#: protocol's HistoryResp is bounded by max_frame the same way.)  Unbounded,
#: ``history?limit=1000`` over 64 KiB messages was one 87 MB body, built in
#: one go on the broker's event loop (stalling every client) and held for a
#: slow reader: a new user's trial.
MAX_PAGE_BYTES: int = HttpConfig().max_page_bytes  # 4 MiB

#: What a page's body may add around its items (the object's other fields:
#: a cursor, a consumer name, ids).
_PAGE_ENVELOPE = 1024


def smallest_page_bytes(max_payload: int, max_mentions: int) -> int:
    """The smallest page budget (``[http] max_page_bytes``) that holds one
    message of ``max_payload`` bytes with ``max_mentions`` mentions: its
    JSON (the payload as base64, its fields, the mentions) and the page's
    other fields.  (A page holds one item whatever its size, so a smaller
    budget would be passed by every page of large messages.)"""
    return _PAGE_ENVELOPE + 4 * ((max_payload + 2) // 3) + 1024 + 70 * max_mentions


_MISSING = object()

#: Integers in bodies and queries (µs, seconds, counts) are 0..2^63-1 ...
_MAX_INT = (1 << 63) - 1
#: ... but a seq (``from_seq``, the seq in a path) and an event id
#: (``after``, ``Last-Event-ID``, ``upto``): 0..2^64-1, as the wire
#: protocol's (a ``u`` field, frames.py) and the handle's.
_U64 = (1 << 64) - 1


def _not_the_senders(consumer: str) -> str:
    """``consumer``, or HttpError 400 when it is the webhook sender's own
    (pimcore.webhooks.WEBHOOK_CONSUMER): its cursor is what the sender
    delivered, and an ack through the API moved it past events never sent
    -- made before webhooks were configured, it skipped those recorded
    before (a trial).  Listing and deleting it stay open."""
    from ..webhooks import WEBHOOK_CONSUMER

    if consumer == WEBHOOK_CONSUMER:
        raise _bad(f"consumer {WEBHOOK_CONSUMER!r} is the webhook sender's own (its cursor is what it delivered):"
                   " read and ack events as another consumer")
    return consumer


def _bad(message: str) -> HttpError:
    return HttpError(400, "BAD_REQUEST", message)


def _object(request: Request, takes: tuple[str, ...], *, optional: bool = False) -> dict[str, Any]:
    """The JSON object body ({} for an empty body when ``optional``), whose
    fields are all among ``takes`` (:func:`_only`)."""
    if optional and not request.body.strip():
        return {}
    body = request.json()
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return _only(body, takes, "this endpoint takes")


def _only(body: dict[str, Any], takes: tuple[str, ...], who: str) -> dict[str, Any]:
    """``body`` if it has no field outside ``takes``; else 400 naming the
    first unknown field and the fields taken.  (Ignored, a typo changed
    what was stored: "Sender" posted as the system, a batch item's
    "idempotencykey" stored without a key: a new-user pass.)"""
    for name in body:
        if name not in takes:
            raise _bad(f"unknown field {_show(name)}: {who} {', '.join(repr(t) for t in takes)}")
    return body


#: The fields of a post's body (``POST /v1/conversations/{conv}/messages``),
#: of a batch post's item, and of an edit's body.
_POST_FIELDS = ("payload", "payload_b64", "sender", "device", "mentions", "mention_all")
_ITEM_FIELDS = ("conv", "payload", "payload_b64", "sender", "device", "idempotency_key", "mentions", "mention_all")
_EDIT_FIELDS = ("payload", "payload_b64", "sender", "device")


def _field(body: dict[str, Any], name: str, kind: type, default: Any = _MISSING, hi: int = _MAX_INT) -> Any:
    """``body[name]`` checked to be a ``kind`` (bool is not an int here; an
    int 0..``hi``)."""
    value: Any = body.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise _bad(f"field {name!r} is required")
        return default
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(f"field {name!r} must be an integer")
        if not 0 <= value <= hi:
            raise _bad(f"field {name!r} must be 0..{_top(hi)}")
    elif not isinstance(value, kind):
        raise _bad(f"field {name!r} must be {_KIND_NAME.get(kind, kind.__name__)}")
    return value


_KIND_NAME = {str: "a string", int: "an integer", list: "an array", bool: "a boolean"}


def _not_null(body: dict[str, Any], name: str, left_out: str) -> None:
    """400 for ``{name: null}`` where leaving ``name`` out means
    ``left_out``: null taken for "left out" made {"sender": null} post,
    edit and recall as the system, unmoderated (a trial), and {"device":
    null} would kick or revoke every device -- a client whose variable was
    unset is not asking for that."""
    if name in body and body[name] is None:
        raise _bad(f"field {name!r} is null: give a string, or leave it out {left_out}")


def _json_kind(value: Any) -> str:
    """What a JSON value is, in a refusal's words ("null", "a number")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    kinds: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _strings(body: dict[str, Any], name: str) -> list[str]:
    value = _field(body, name, list)
    if not all(isinstance(v, str) for v in value):
        raise _bad(f"field {name!r} must be an array of strings")
    return value


def _refused(what: str, rule: str, given: str) -> HttpError:
    """The one wording of a refused query parameter (``what``: "query
    parameter 'limit'"; a header or a path segment the same way): 400
    ``<what> must be <rule>, not <given>``, the value cut when long."""
    return _bad(f"{what} must be {rule}, not {_show(given)}")


def _top(hi: int) -> str:
    return {_MAX_INT: "2^63-1", _U64: "2^64-1"}.get(hi, str(hi))


def _int_rule(lo: int, hi: int) -> str:
    return f"an integer from {lo} to {_top(hi)}"


def _whole(what: str, text: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    """``text`` as an integer ``lo..hi`` (ASCII digits only), else
    :func:`_refused` naming ``what``."""
    if not _UINT.fullmatch(text) or not lo <= int(text) <= hi:
        raise _refused(what, _int_rule(lo, hi), text)
    return int(text)


def _query(request: Request, name: str, kind: type, default: Any, lo: Any = 0, hi: Any = None) -> Any:
    """The value of query parameter ``name`` as ``kind`` (str, bool, int
    ``lo..hi``, default 0..2^63-1, or float seconds ``lo..hi``), ``default``
    if absent.  HttpError 400 (:func:`_refused`: the parameter, its rule and
    the value given) for anything else.  (A parameter given twice, one the
    endpoint does not take or one given blank never gets here: the server
    refuses it, :func:`~pimcore.http.server.check_query`, from the route's
    parameters in :data:`~pimcore.http.openapi.ROUTES`.)"""
    values = request.query.get(name)
    if not values:
        return default
    text = values[-1]
    what = f"query parameter {name!r}"
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise _refused(what, "true or false (1 or 0, yes or no)", text)
    # ASCII digits only: int() and float() also take "1_0", " 1", "+5",
    # "nan" and digits of other scripts ("²" is one to str.isdigit).
    if kind is int:
        return _whole(what, text, lo, _MAX_INT if hi is None else hi)
    if kind is float:
        assert hi is not None
        if not _UFLOAT.fullmatch(text) or not lo <= float(text) <= hi:
            raise _refused(what, f"a number of seconds from {lo:g} to {hi:g}", text)
        return float(text)
    raise TypeError(f"no query parameter of type {kind.__name__}")  # pragma: no cover - a bug


#: A query parameter's whole number, or its number of seconds: ASCII
#: digits only (leading zeros and "5." / ".5" allowed), at most 40
#: characters (int() of thousands of digits is slow, then refused).
_UINT = re.compile(r"[0-9]{1,40}")
_UFLOAT = re.compile(r"(?=.{1,40}$)([0-9]+\.?[0-9]*|\.[0-9]+)")


def _post_fields(body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(payload, the handle's sender/device arguments) of a post body."""
    text = _field(body, "payload", str, None)
    b64 = _field(body, "payload_b64", str, None)
    if (text is None) == (b64 is None):
        raise _bad("give exactly one of the fields 'payload' (text) and 'payload_b64'")
    if b64 is not None:
        try:
            payload = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("field 'payload_b64' is not base64") from None
    else:
        try:
            payload = text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON allows "\ud800") has no UTF-8 form:
            # storing its surrogatepass bytes would hand readers invalid text.
            raise _bad("field 'payload' holds a lone surrogate, which is not text: send bytes as 'payload_b64'") from None
    kw: dict[str, Any] = {}
    _not_null(body, "sender", "to post as the system")
    _not_null(body, "device", "for the device 'http'")
    sender = _field(body, "sender", str, None)
    device = _field(body, "device", str, None)
    if device is not None and sender is None:
        raise _bad("field 'device' needs the field 'sender'")
    if sender == "":
        raise _bad("field 'sender' cannot be empty: omit it to post as the system")
    if sender is not None:
        kw["sender"] = sender
        kw["device"] = device if device is not None else "http"
    return payload, kw


def _posted(p: Any) -> dict[str, Any]:
    return {"conv": p.conv, "msg_id": p.msg_id.hex(), "seq": p.seq, "server_time": p.server_time}


def _message(m: Any) -> dict[str, Any]:
    return {
        "msg_id": m.msg_id.hex(), "conv": m.conv, "seq": m.seq, "sender": m.sender, "device": m.device,
        "kind": m.kind, "local_id": m.local_id, "server_time": m.server_time,
        "payload_b64": base64.b64encode(m.payload).decode("ascii"),
        "target": m.target, "edited": m.edited, "recalled": m.recalled, "deleted": m.deleted,
    }


def _conv_entry(e: Any) -> dict[str, Any]:
    last = None
    if e.last is not None:
        last = _message(e.last)
        last["mentions"] = list(e.last.mentions)
        last["mention_all"] = e.last.mention_all
    return {
        "conv": e.conv, "last": last, "read_seq": e.read_seq, "last_seq": e.last_seq, "unread": e.unread,
        "mention_count": e.mention_count, "pinned": e.pinned, "muted": e.muted, "hidden": e.hidden,
    }


def _event(ev: "HostEvent") -> dict[str, Any]:
    d = asdict(ev)
    d["msg_id"] = ev.msg_id.hex()
    d["payload_b64"] = base64.b64encode(d.pop("payload")).decode("ascii")
    d["recipients"] = list(ev.recipients)
    d["offline_recipients"] = list(ev.offline_recipients)
    return d


class _PageItems:
    """A JSON array built item by item within a page of ``page_bytes``
    (less the page's other fields, _PAGE_ENVELOPE): :meth:`add`
    is False (nothing added) for an item that would pass it, unless the
    array is still empty (a page holds at least one item)."""

    __slots__ = ("parts", "left")

    def __init__(self, page_bytes: int = MAX_PAGE_BYTES) -> None:
        self.parts: list[bytes] = []
        self.left = page_bytes - _PAGE_ENVELOPE

    def add(self, item: Any) -> bool:
        data = _json_bytes(item)
        if self.parts and len(data) + 1 > self.left:
            return False
        self.parts.append(data)
        self.left -= len(data) + 1
        return True

    def __len__(self) -> int:
        return len(self.parts)

    def pieces(self) -> list[bytes]:
        """The array's bytes in pieces, for one join with what is around it."""
        out = [b"["]
        for i, part in enumerate(self.parts):
            if i:
                out.append(b",")
            out.append(part)
        out.append(b"]")
        return out

    def count(self, largest: int, most: int) -> int:
        """How many items to read next: as many as fit what is left if each
        is ``largest`` bytes, at least one, at most ``most``."""
        return max(1, min(most, self.left // largest + 1))


def _page_body(head: dict[str, Any], name: str, items: _PageItems, tail: dict[str, Any]) -> RawBody:
    """The JSON object ``head``'s fields, ``name``: the items, then ``tail``'s."""
    rest = _json_bytes(tail)
    # One join (the items are copied once, not into an array and again into the body).
    return RawBody("application/json", b"".join([_json_bytes(head)[:-1], b"," if head else b"", _json_bytes(name), b":",
                                                 *items.pieces(), b"," + rest[1:] if tail else b"}"]))


def _no_idempotency_key(handler: Callable[[Request], Awaitable[tuple[int, Any]]],
                        route: str) -> Callable[[Request], Awaitable[tuple[int, Any]]]:
    """``handler`` refusing an Idempotency-Key header with 400: only a post,
    a recall, an edit and a delete take it.  Ignored, a batch post retried
    with one was stored twice (a new operator's trial), where an unknown
    field or query parameter is refused because a typo would change what is
    stored."""
    hint = ' (give each item its own "idempotency_key")' if route == "POST /v1/messages" else ""

    async def run(request: Request) -> tuple[int, Any]:
        if "idempotency-key" in request.headers:
            raise HttpError(400, "BAD_REQUEST", f"{route} takes no Idempotency-Key header{hint}: it would not make a"
                            " retry safe")
        return await handler(request)

    return run


def _guarded(handler: Callable[[Request], Awaitable[tuple[int, Any]]],
             store_cause: Callable[[], Optional[str]] = lambda: None) -> Callable[[Request], Awaitable[tuple[int, Any]]]:
    """Map the handle's errors to HTTP errors (the module docstring).
    ``store_cause``: why the store refuses writes, if it said (the server's
    store_failure_cause), for a 503's message."""
    from ..embed import RequestRefused

    async def run(request: Request) -> tuple[int, Any]:
        try:
            return await handler(request)
        except RequestRefused as exc:
            status = REFUSED_STATUS.get(exc.code, 400)
            raise HttpError(status, exc.code.name, refusal_message(exc.code, str(exc))) from None
        except StoreError as exc:
            raise HttpError(503, "STORE_UNAVAILABLE", _store_failed(exc, store_cause())) from None
        except BrokerStopped as exc:
            raise HttpError(503, "UNAVAILABLE", str(exc)) from None

    return run


def _store_failed(exc: StoreError, cause: Optional[str]) -> str:
    """A 503's message for the store's failure ``exc``: the handle's words
    ("post to 'team' not stored: the store failed") and the cause, in words
    without file system paths ("no space left on the data directory's file
    system: free space there ..."; StoreError.cause).  An API client is no
    operator: the data directory's path stays in the log, which names it."""
    text = str(exc) or "the store failed"
    if exc.cause is not None:
        if text.endswith(": " + exc.cause):  # the handle's words and the cause (embed._store_failed)
            return text
        return f"the store failed: {exc.cause}"  # the store's own error: its text names the data directory
    return f"{text}: {cause}" if cause is not None and cause not in text else text


def register_api(router: Router, handle: "Pimcore", page_bytes: int = MAX_PAGE_BYTES) -> None:
    """Route the server API's endpoints (all behind the API key) to ``handle``;
    ``page_bytes``: the most bytes of a page's JSON (:data:`MAX_PAGE_BYTES`)."""
    from ..embed import fresh_page
    from ..store.base import conversation_cursor
    from .openapi import ROUTES

    #: The query parameters of each endpoint: the OpenAPI document's (one
    #: table, so what is documented is what is taken); any other is refused.
    takes = {(method, pattern): tuple(name for name, _ in query) for method, pattern, _s, _b, query, *_ in ROUTES}

    def store_cause() -> Optional[str]:
        """Why the store refuses writes, if it said (for a 503's message)."""
        return handle.server.store_failure_cause()

    def limits() -> Any:
        return handle.server.broker.config.limits

    def _largest_message() -> int:
        """Bytes of a message's JSON at most, ids aside: its payload as
        base64 at max_payload, and the fields (how many to read at a time)."""
        return 4 * ((limits().max_payload + 2) // 3) + 1024

    async def post(request: Request) -> tuple[int, Any]:
        body = _object(request, _POST_FIELDS)
        payload, kw = _post_fields(body)
        key = request.headers.get("idempotency-key")
        if key is not None:
            kw["idempotency_key"] = key.encode("latin-1")
        if "mentions" in body:
            kw["mentions"] = _strings(body, "mentions")
        if "mention_all" in body:
            kw["mention_all"] = _field(body, "mention_all", bool)
        posted = await handle.post(request.params["conv"], payload, **kw)
        return 201, _posted(posted)

    def _seq(request: Request) -> int:
        return _whole("the seq in the path", request.params["seq"], 1, _U64)

    def _as(body: dict[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        _not_null(body, "sender", "to act as the system")
        _not_null(body, "device", "for the device 'http'")
        sender = _field(body, "sender", str, None)
        device = _field(body, "device", str, None)
        if device is not None and sender is None:
            raise _bad("field 'device' needs the field 'sender'")
        if sender == "":  # (it recalled as the system, where a post says why not)
            raise _bad("field 'sender' cannot be empty: omit it to act as the system")
        if sender:
            kw["sender"], kw["device"] = sender, device if device is not None else "http"
        return kw

    def _key(request: Request, kw: dict[str, Any]) -> dict[str, Any]:
        key = request.headers.get("idempotency-key")
        if key is not None:
            kw["idempotency_key"] = key.encode("latin-1")
        return kw

    async def recall(request: Request) -> tuple[int, Any]:
        body = _object(request, ("sender", "device"), optional=True)
        posted = await handle.recall(request.params["conv"], _seq(request), **_key(request, _as(body)))
        return 201, _posted(posted)

    async def edit(request: Request) -> tuple[int, Any]:
        body = _object(request, _EDIT_FIELDS)
        payload, kw = _post_fields(body)
        posted = await handle.edit(request.params["conv"], _seq(request), payload, **_key(request, kw))
        return 201, _posted(posted)

    async def delete_for(request: Request) -> tuple[int, Any]:
        body = _object(request, ("user", "device"))
        user = _field(body, "user", str)
        _not_null(body, "device", "for the device 'http'")
        kw = _key(request, {"device": _field(body, "device", str, "http")})
        posted = await handle.delete_for(user, request.params["conv"], _seq(request), **kw)
        return 201, _posted(posted)

    async def post_batch(request: Request) -> tuple[int, Any]:
        body = _object(request, ("messages",))
        items = _field(body, "messages", list)
        if not 1 <= len(items) <= MAX_BATCH:
            raise _bad(f"field 'messages' must hold 1..{MAX_BATCH} messages")
        # Items that do not parse get their own error; the others are posted.
        results: list[Any] = [None] * len(items)
        posts: list[dict[str, Any]] = []
        where: list[int] = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise _bad("expected a JSON object")
                _only(item, _ITEM_FIELDS, "each message takes")
                conv = _field(item, "conv", str)
                payload, kw = _post_fields(item)
                _not_null(item, "idempotency_key", "to post without a key (its retry is then a second message)")
                key = _field(item, "idempotency_key", str, None)
                if key is not None:
                    kw["idempotency_key"] = key.encode("utf-8", "surrogatepass")
                # As the single post: checked here, an error for this item only.
                if "mentions" in item:
                    kw["mentions"] = _strings(item, "mentions")
                if "mention_all" in item:
                    kw["mention_all"] = _field(item, "mention_all", bool)
            except HttpError as exc:
                results[i] = {"status": "error", "code": exc.code, "message": f"messages[{i}]: {exc.message}"}
                continue
            posts.append({"conv": conv, "payload": payload, **kw})
            where.append(i)
        from ..embed import Posted

        for i, res in zip(where, await handle.post_many(posts) if posts else []):
            if isinstance(res, Posted):
                results[i] = {"status": "duplicate" if res.duplicate else "stored", **_posted(res)}
            else:
                code = getattr(res, "code", None)
                results[i] = {"status": "error", "code": code.name if code is not None else "STORE_UNAVAILABLE",
                              "message": refusal_message(code, str(res)) if code is not None
                              else _store_failed(res, store_cause())
                              if isinstance(res, StoreError) else str(res)}
        return 200, {"results": results}

    async def create_group(request: Request) -> tuple[int, Any]:
        body = _object(request, ("conv", "members", "history_visible"))
        changed = await handle.create_group(_field(body, "conv", str), _strings(body, "members"),
                                            history_visible=_field(body, "history_visible", bool, False))
        return 201, {"conv": changed.conv, "members": list(changed.members)}

    async def members(request: Request) -> tuple[int, Any]:
        conv = request.params["conv"]
        members = list(await handle.members(conv))
        return 200, {"conv": conv, "members": members, "history_visible": await handle.history_visible(conv)}

    def _users(request: Request) -> list[str]:
        """The ``users`` of a body adding or removing several members (at
        least one: a change of no one is refused, as the handle refuses it)."""
        users = _strings(_object(request, ("users",)), "users")
        if not users:
            raise _bad("field 'users' must hold at least one user id")
        return users

    async def add_members(request: Request) -> tuple[int, Any]:
        changed = await handle.add_members(request.params["conv"], _users(request))
        return 200, {"conv": changed.conv, "members": list(changed.members)}

    async def remove_members(request: Request) -> tuple[int, Any]:
        # Several users in one RemoveMembers op (one commit), where a DELETE
        # per user is a commit each.
        users = _users(request)
        changed = await handle.remove_members(request.params["conv"], users)
        removed = sorted(m.sender for m in changed.entries)  # a LEFT entry per user removed
        return 200, {"conv": changed.conv, "members": list(changed.members), "removed": removed,
                     "not_members": sorted(set(users) - set(removed))}

    async def remove_member(request: Request) -> tuple[int, Any]:
        changed = await handle.remove_members(request.params["conv"], [request.params["user"]])
        return 200, {"conv": changed.conv, "members": list(changed.members)}

    async def kick(request: Request) -> tuple[int, Any]:
        body = _object(request, ("device", "reason"), optional=True)
        user = request.params["user"]
        _not_null(body, "device", "to kick every device of the user")
        device = _field(body, "device", str, None)
        reason = _field(body, "reason", str, "")
        from ..embed import RequestRefused
        from ..ids import id_problem

        problem = id_problem(user, "user")
        if problem is not None:
            # Refused in the kick's words (the listing below said "online
            # devices: ...": a new-user pass).
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"kick: {problem}")
        online = handle.online_devices(user)
        handle.kick(user, device, reason)
        kicked = [d for d in online if device is None or d == device]
        return 200, {"user": user, "devices": kicked}

    async def revoke(request: Request) -> tuple[int, Any]:
        body = _object(request, ("device", "before"), optional=True)
        user = request.params["user"]
        _not_null(body, "device", "to revoke the tokens of every device of the user")
        device = _field(body, "device", str, None)
        before = await handle.revoke(user, device, before=_field(body, "before", int, None))
        return 200, {"user": user, "device": device, "before": before}

    async def tokens(request: Request) -> tuple[int, Any]:
        body = _object(request, ("user", "device", "ttl"))
        user = _field(body, "user", str)
        # (Any integer here: its range, 1..MAX_TOKEN_TTL, is said by
        # issue_token, in one wording for every value.)
        ttl = body.get("ttl")
        if ttl is None:
            ttl = 3600
        elif not isinstance(ttl, int) or isinstance(ttl, bool):
            raise _bad("field 'ttl' must be an integer")
        _not_null(body, "device", "for a token bound to no device")
        try:
            token = handle.issue_token(user, _field(body, "device", str, None), ttl=ttl)
        except ValueError as exc:
            raise HttpError(400, "BAD_REQUEST", str(exc)) from None
        except RuntimeError as exc:
            raise HttpError(501, "NOT_IMPLEMENTED", str(exc)) from None
        return 201, {"token": token}

    async def unread(request: Request) -> tuple[int, Any]:
        user = request.params["user"]
        conv = _query(request, "conv", str, None)
        return 200, {"user": user, "conv": conv, "unread": await handle.unread(user, conv)}

    async def read_positions(request: Request) -> tuple[int, Any]:
        pos = await handle.read_positions(request.params["user"])
        return 200, {
            "user": pos.user, "head": pos.head, "floor": pos.floor,
            "markers": [{"conv": conv, "read_seq": seq} for conv, seq in pos.markers],
            "devices": [asdict(d) for d in pos.devices],
        }

    async def conversations(request: Request) -> tuple[int, Any]:
        convs = await handle.conversations(request.params["user"])
        return 200, {"conversations": [asdict(c) for c in convs]}

    async def conversation_list(request: Request) -> tuple[int, Any]:
        text = _query(request, "cursor", str, "")
        try:
            cursor = bytes.fromhex(text)
        except ValueError:
            bad = _refused("query parameter 'cursor'", "a cursor this API gave (a page's \"cursor\")", text)
            raise HttpError(400, "BAD_CURSOR", bad.message) from None
        limit = _query(request, "limit", int, 50, 1, 1000)
        include_hidden = _query(request, "include_hidden", bool, False)
        # One read (the store builds the user's whole list to cut a page
        # from it, so reading in pieces cost a whole list each: a review),
        # then the page stops within page_bytes of JSON, before the entry
        # whose last message would pass it, `more` set and the cursor at
        # the last entry given.  (The entries' own bytes are the store's,
        # read already; what the budget bounds is the body built from them.)
        items = _PageItems(page_bytes)
        page = await handle.conversation_list(request.params["user"], cursor=cursor, limit=limit,
                                              include_hidden=include_hidden)
        more = page.more
        for e in page.entries:
            if not items.add(_conv_entry(e)):
                more = True
                break
            cursor = conversation_cursor(e)
        return 200, _page_body({}, "entries", items, {"cursor": cursor.hex(), "more": more})

    async def conversation_settings(request: Request) -> tuple[int, Any]:
        body = _object(request, ("pinned", "muted", "hidden"))
        kw = {name: _field(body, name, bool, None) for name in ("pinned", "muted", "hidden")}
        entry = await handle.set_conversation(request.params["user"], request.params["conv"], **kw)
        return 200, _conv_entry(entry)

    async def history(request: Request) -> tuple[int, Any]:
        user = _query(request, "user", str, None)
        if user is None:
            raise _bad("query parameter 'user' is required")
        from_seq = _query(request, "from_seq", int, 0, 0, _U64)
        limit = _query(request, "limit", int, 50, 1, 1000)
        backward = _query(request, "backward", bool, True)
        # Read a few messages at a time (one more than the page: whether
        # there is more is then known), within page_bytes: the page
        # stops before the message that would pass it, `more` set.
        items, more = _PageItems(page_bytes), False
        while True:
            want = items.count(_largest_message(), limit + 1 - len(items))
            msgs = await handle.history(request.params["conv"], user, from_seq=from_seq, limit=want, backward=backward)
            for m in msgs:
                if len(items) == limit or not items.add(_message(m)):
                    more = True
                    break
                from_seq = m.seq
            else:
                if len(msgs) == want:
                    continue
            break
        return 200, _page_body({}, "messages", items, {"more": more})

    async def presence(request: Request) -> tuple[int, Any]:
        p = await handle.presence(request.params["user"])
        return 200, {"user": p.user, "online": p.online, "last_seen": p.last_seen, "hide_last_seen": p.hide_last_seen}

    async def devices(request: Request) -> tuple[int, Any]:
        user = request.params["user"]
        return 200, {"user": user, "devices": handle.online_devices(user)}

    def need_events() -> None:
        # Without recorded events these would answer "nothing yet" for ever.
        if not handle.events_enabled:
            from ..embed import EVENTS_DISABLED

            raise HttpError(409, "EVENTS_DISABLED", EVENTS_DISABLED)

    def past_last(what: str, last: int, nothing: str) -> HttpError:
        """409 PAST_LAST_EVENT: ``what`` ("upto 7", "after 7") names an id
        no event has.  A client holding one is confused (another broker's
        id, a store that was replaced); read from it, events recorded later
        would be skipped until their ids passed it.  (Races are none: an id
        a client saw was the last one or below when read.)"""
        return HttpError(409, "PAST_LAST_EVENT", f"{what} is past the last event id, {last}"
                                                 f"{' (no event yet)' if last == 0 else ''}: {nothing}")

    async def events(request: Request) -> tuple[int, Any]:
        need_events()
        consumer = _not_the_senders(_query(request, "consumer", str, "default"))
        # A live reader while it reads (a long-poll waits): DELETE
        # /v1/events/consumers/{consumer} answers 409 meanwhile.
        with handle._reading(consumer):
            return await _events(request, consumer)

    async def _events(request: Request, consumer: str) -> tuple[int, Any]:
        after: Optional[int] = _query(request, "after", int, None, 0, _U64)
        limit = _query(request, "limit", int, 256, 1, 10000)  # (pimcore.embed.MAX_EVENTS_PAGE)
        wait = _query(request, "wait", float, 0.0, 0, MAX_EVENT_WAIT)
        cursor, last = await handle.event_cursor(consumer)
        if after is None:
            # Reading from its cursor: the reclaim keeps what it has not acked.
            # Not for HEAD, which is safe (RFC 9110): a link checker made
            # durable consumers that held the event log for 90 days (a trial).
            if request.method != "HEAD":
                await handle._hold_events(consumer)
            after = cursor
        elif after > last:
            raise past_last(f"after {after}", last, "nothing read")
        page: list[Any] = []
        # Read a few events at a time, within page_bytes: the page stops
        # before the event that would pass it, `more` set (`next` goes on).
        items, more = _PageItems(page_bytes), False
        want = items.count(_largest_message(), limit)
        # next_events waits for at least one: it is called only when there
        # is one (wait=0) or for at most `wait` seconds.  A long-poll that
        # times out returns an empty page; nothing moved, nothing is lost.
        if last > after or wait > 0:
            with trio.move_on_after(wait):
                after, page = await handle.next_events(consumer, after=after, limit=want)
        pos = after
        while page:
            for ev in await fresh_page(handle, page):
                if not items.add(_event(ev)):
                    more = True
                    break
                pos = ev.id
            else:
                if len(page) == want:  # maybe more: read on (without waiting) while there is
                    _, last = await handle.event_cursor(consumer)
                    if last > pos:
                        if len(items) == limit:
                            more = True
                        else:
                            want = items.count(_largest_message(), limit - len(items))
                            page = []
                            # (Bounded: the events after pos may have been
                            # reclaimed meanwhile, and next_events would
                            # wait for a new one -- a review.)
                            with trio.move_on_after(max(wait, 1.0)):
                                _, page = await handle.next_events(consumer, after=pos, limit=want)
                            continue
            break
        return 200, _page_body({"consumer": consumer, "after": after}, "events", items, {"next": pos, "more": more})

    async def event_stream(request: Request) -> tuple[int, Any]:
        need_events()
        consumer = _not_the_senders(_query(request, "consumer", str, "default"))
        after: Optional[int] = _query(request, "after", int, None, 0, _U64)
        limit = _query(request, "limit", int, 50, 1, MAX_STREAM_PAGE)
        keepalive = _query(request, "keepalive", float, 15.0, 0.05, 300)
        what = f"after {after}"
        last_id = request.headers.get("last-event-id")
        if last_id is not None:  # a reconnecting EventSource: resume after it
            after = _whole("header 'Last-Event-ID'", last_id.strip(), 0, _U64)
            what = f"Last-Event-ID {after}"
        cursor, last = await handle.event_cursor(consumer)  # refuses a bad consumer before the stream starts
        if after is not None and after > last:
            raise past_last(what, last, "nothing read")
        if after is None and request.method != "HEAD":  # (HEAD is safe: no durable consumer, as in events)
            await handle._hold_events(consumer)  # reading from its cursor: the reclaim keeps what it has not acked
        start = cursor if after is None else after

        async def produce(send: Callable[[Union[bytes, bytearray]], Awaitable[None]]) -> None:
            # A live reader while the stream is open: DELETE
            # /v1/events/consumers/{consumer} answers 409 meanwhile.
            with handle._reading(consumer):
                await _produce(send)

        async def _produce(send: Callable[[Union[bytes, bytearray]], Awaitable[None]]) -> None:
            # One page at a time, written before the next is read: what a
            # client that stops reading holds is one page (and the socket
            # buffers), then the write timeout closes the stream.
            pos = start
            await send(b"retry: 1000\n: pimcore events consumer=%s after=%d\n\n" % (consumer.encode(), pos))
            while True:
                page: list[Any] = []
                with trio.move_on_after(keepalive):
                    # (As many as could fit page_bytes at max_payload each.)
                    _, page = await handle.next_events(consumer, after=pos,
                                                       limit=max(1, min(limit, page_bytes // _largest_message())))
                if not page:
                    await send(b": keep-alive\n\n")
                    continue
                # One write within page_bytes (at least one event): the
                # rest of the page is read again for the next.  Written as
                # it is -- no copy -- and the events it was made from are
                # let go first: a client that stops reading holds the page
                # once until the write timeout.
                out = bytearray()
                for ev in await fresh_page(handle, page):
                    data = _json_bytes(_event(ev))
                    event = b"id: %d\ndata: %s\n\n" % (ev.id, data)
                    if out and len(out) + len(event) > page_bytes:
                        break
                    out += event
                    pos = ev.id
                del page, ev, data, event
                await send(out)

        return 200, StreamBody("text/event-stream; charset=utf-8", produce,
                               (("cache-control", "no-cache"), ("x-accel-buffering", "no")))

    async def ack(request: Request) -> tuple[int, Any]:
        need_events()
        body = _object(request, ("consumer", "upto"))
        # (Not _field's null-is-the-default: {"consumer": null} acked as
        # "default", so a client whose consumer variable was unset moved
        # another consumer's cursor -- a new user's trial.  Absent is "default".)
        consumer = body.get("consumer", "default")
        if not isinstance(consumer, str):
            raise _bad(f"field 'consumer' must be a string (a consumer id), not {_json_kind(consumer)};"
                       ' leave it out for "default"')
        _not_the_senders(consumer)
        upto = _field(body, "upto", int, hi=_U64)
        # The handle clamps an ack past the last event to it: refused here
        # (past_last), nothing acked.
        _, last = await handle.event_cursor(consumer)
        if upto > last:
            raise past_last(f"upto {upto}", last, "nothing acked")
        return 200, {"consumer": consumer, "cursor": await handle.ack_events(upto, consumer)}

    async def event_consumers(request: Request) -> tuple[int, Any]:
        need_events()
        # One more than shown says whether there are more (a broker has a
        # few; the answer stays bounded whatever a store holds).
        listed = await handle.event_consumers(MAX_LISTED_CONSUMERS + 1)
        shown = [{"consumer": name, "cursor": cursor} for name, cursor in listed[:MAX_LISTED_CONSUMERS]]
        return 200, {"consumers": shown, "more": len(listed) > MAX_LISTED_CONSUMERS}

    async def delete_consumer(request: Request) -> tuple[int, Any]:
        need_events()
        from ..embed import ConsumerInUse

        consumer = request.params["consumer"]
        try:
            deleted = await handle.delete_consumer(consumer)
        except ConsumerInUse as exc:
            # (Retry-After: when the consumer_idle rule would let it, in
            # whole seconds rounded up; none for a live reader.)
            after = [] if exc.retry_after is None else [("retry-after", str(max(1, -int(-exc.retry_after // 1))))]
            raise HttpError(409, "CONSUMER_IN_USE", str(exc).removeprefix("delete_consumer: "), after) from None
        if not deleted:
            raise HttpError(404, "NO_SUCH_CONSUMER", f"no event consumer {_show(consumer)}: it has no durable cursor"
                            " (never read from its cursor, or deleted); nothing deleted")
        return 200, {"consumer": consumer, "deleted": True}

    async def get_retention(request: Request) -> tuple[int, Any]:
        return 200, asdict(await handle.retention(request.params["conv"]))

    async def put_retention(request: Request) -> tuple[int, Any]:
        body = _object(request, ("max_age", "max_count"), optional=True)
        # (Not the handle's MIN_RETENTION_AGE floor: an operator's call; docs/HTTP.md warns.)
        ret = await handle._set_retention(request.params["conv"], max_age=_field(body, "max_age", int, None),
                                         max_count=_field(body, "max_count", int, None))
        return 200, asdict(ret)

    async def purge_conversation(request: Request) -> tuple[int, Any]:
        conv = request.params["conv"]
        done = await handle.purge_conversation(conv)
        return 200, {"conv": conv, "messages": done.messages, "entries": done.entries}

    async def purge_user(request: Request) -> tuple[int, Any]:
        user = request.params["user"]
        done = await handle.purge_user(user)
        return 200, {"user": user, "messages": done.messages, "entries": done.entries, "devices": done.devices,
                     "left": [c.conv for c in done.changes]}

    for method, pattern, handler in (
        ("GET", "/v1/conversations/{conv}/retention", get_retention),
        ("PUT", "/v1/conversations/{conv}/retention", put_retention),
        ("DELETE", "/v1/conversations/{conv}", purge_conversation),
        ("DELETE", "/v1/users/{user}", purge_user),
        ("POST", "/v1/conversations/{conv}/messages", post),
        ("POST", "/v1/messages", post_batch),
        ("POST", "/v1/conversations/{conv}/messages/{seq}/recall", recall),
        ("POST", "/v1/conversations/{conv}/messages/{seq}/edit", edit),
        ("POST", "/v1/conversations/{conv}/messages/{seq}/delete", delete_for),
        ("GET", "/v1/conversations/{conv}/history", history),
        ("POST", "/v1/groups", create_group),
        ("GET", "/v1/groups/{conv}/members", members),
        ("POST", "/v1/groups/{conv}/members", add_members),
        ("POST", "/v1/groups/{conv}/members/remove", remove_members),
        ("DELETE", "/v1/groups/{conv}/members/{user}", remove_member),
        ("POST", "/v1/users/{user}/kick", kick),
        ("POST", "/v1/users/{user}/revoke", revoke),
        ("GET", "/v1/users/{user}/conversations", conversations),
        ("GET", "/v1/users/{user}/conversation-list", conversation_list),
        ("POST", "/v1/users/{user}/conversations/{conv}/settings", conversation_settings),
        ("GET", "/v1/users/{user}/devices", devices),
        ("GET", "/v1/users/{user}/presence", presence),
        ("GET", "/v1/users/{user}/unread", unread),
        ("GET", "/v1/users/{user}/read-positions", read_positions),
        ("POST", "/v1/tokens", tokens),
        ("GET", "/v1/events", events),
        ("GET", "/v1/events/stream", event_stream),
        ("POST", "/v1/events/ack", ack),
        ("GET", "/v1/events/consumers", event_consumers),
        ("DELETE", "/v1/events/consumers/{consumer}", delete_consumer),
    ):
        keyed = handler in (post, recall, edit, delete_for)
        run = handler if keyed else _no_idempotency_key(handler, f"{method} {pattern}")
        # (cursor=: the first page's cursor, what a page with no entries gives back)
        router.add(method, pattern, _guarded(run, store_cause), query=takes[method, pattern],
                   blank=("cursor",))
