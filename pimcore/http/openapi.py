"""The OpenAPI 3.1 description of pimcore's HTTP server API (``/v1``).

Served at ``GET /v1/openapi.json`` (no API key: it holds no data) when the
listener has the server API.  One table below per route; a test checks that
the table and the router list exactly the same (method, path) pairs, so
neither can drift from the other.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPS_ROUTES", "ROUTES", "openapi_document"]

_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
#: A seq or an event id (from_seq, after, upto): 0..2^64-1, as the wire protocol's.
_U64 = {"type": "integer", "minimum": 0, "maximum": (1 << 64) - 1}
_STRINGS = {"type": "array", "items": _STR}
_BOOL = {"type": "boolean"}
_SOME_USERS = {**_STRINGS, "minItems": 1}
#: An error's code: upper case, the broker's ErrorCode name where the concept
#: is the protocol's (BAD_REQUEST for a malformed body as for an id the broker
#: refused), the HTTP layer's own otherwise (docs/HTTP.md, Errors).
_CODE = {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$",
         "description": "upper case: the broker's ErrorCode name (BAD_REQUEST, NOT_MEMBER, UNKNOWN_CONVERSATION, ...)"
                        " or the HTTP layer's own (AUTH_FAILED, NOT_FOUND, UNAVAILABLE, ...); docs/HTTP.md, Errors",
         "examples": ["BAD_REQUEST", "AUTH_FAILED", "UNKNOWN_CONVERSATION"]}


def _obj(required: tuple[str, ...] = (), **props: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        doc["required"] = list(required)
    return doc


_MESSAGE = _obj(
    msg_id=_STR, conv=_STR, seq=_INT, sender=_STR, device=_STR, kind=_INT,
    client_time={"type": "integer"}, server_time=_INT, payload_b64=_STR,
    target=_INT, edited=_INT, recalled={"type": "boolean"}, deleted={"type": "boolean"},
)
_MEMBERS = _obj(("conv", "members"), conv=_STR, members=_STRINGS)
_CONV_ENTRY = _obj(
    conv=_STR, last={"oneOf": [{"type": "null"}, _obj(
        msg_id=_STR, conv=_STR, seq=_INT, sender=_STR, device=_STR, kind=_INT, local_id=_INT, server_time=_INT,
        payload_b64=_STR, target=_INT, edited=_INT, recalled={"type": "boolean"}, deleted={"type": "boolean"},
        mentions=_STRINGS, mention_all={"type": "boolean"})]},
    read_seq=_INT, last_seq=_INT, unread=_INT, mention_count=_INT, pinned={"type": "boolean"},
    muted={"type": "boolean"}, hidden={"type": "boolean"},
)
_INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_RETENTION = _obj(("conv", "max_age", "max_count", "floor"), conv=_STR, max_age=_INT_OR_NULL,
                  max_count=_INT_OR_NULL, floor=_INT)

#: (method, path, summary, request body schema or None, query parameters,
#: success status, success body schema).
ROUTES: tuple[tuple[str, str, str, Any, tuple[tuple[str, dict[str, Any]], ...], int, dict[str, Any]], ...] = (
    ("POST", "/v1/conversations/{conv}/messages",
     "Store a message and deliver it like a client's (header Idempotency-Key makes retries safe)",
     _obj(payload=_STR, payload_b64=_STR, sender=_STR, device=_STR, mentions=_STRINGS, mention_all=_BOOL), (),
     201, _obj(conv=_STR, msg_id=_STR, seq=_INT, server_time=_INT)),
    ("POST", "/v1/messages",
     "Store many messages (to any conversations) in one request; per-message idempotency keys and results in order",
     _obj(("messages",), messages={"type": "array", "minItems": 1, "maxItems": 1000, "items": _obj(
         ("conv",), conv=_STR, payload=_STR, payload_b64=_STR, sender=_STR, device=_STR, idempotency_key=_STR,
         mentions=_STRINGS, mention_all=_BOOL)}), (),
     200, _obj(results={"type": "array", "items": _obj(
         ("status",), status={"enum": ["stored", "duplicate", "error"]}, conv=_STR, msg_id=_STR, seq=_INT,
         server_time=_INT, code=_CODE, message=_STR)})),
    ("POST", "/v1/conversations/{conv}/messages/{seq}/recall",
     "Recall a message for everyone: a RECALL entry, no payload left (as the system, or as 'sender': their own only)",
     _obj(sender=_STR, device=_STR), (), 201, _obj(conv=_STR, msg_id=_STR, seq=_INT, server_time=_INT)),
    ("POST", "/v1/conversations/{conv}/messages/{seq}/edit",
     "Replace a message's payload: an EDIT entry (as the system, or as 'sender': their own only)",
     _obj(payload=_STR, payload_b64=_STR, sender=_STR, device=_STR), (),
     201, _obj(conv=_STR, msg_id=_STR, seq=_INT, server_time=_INT)),
    ("POST", "/v1/conversations/{conv}/messages/{seq}/delete",
     "Delete a message for one user only (a DELETE entry to their devices; seq 0)",
     _obj(("user",), user=_STR, device=_STR), (), 201, _obj(conv=_STR, msg_id=_STR, seq=_INT, server_time=_INT)),
    ("GET", "/v1/conversations/{conv}/history", "A page of history as a user may see it (at most 4 MiB of JSON: more says it stopped early)", None,
     (("user", _STR), ("from_seq", _U64), ("limit", _INT), ("backward", {"type": "boolean"})),
     200, _obj(messages={"type": "array", "items": _MESSAGE}, more=_BOOL)),
    ("POST", "/v1/groups", "Create a group",
     _obj(("conv", "members"), conv=_STR, members=_STRINGS, history_visible=_BOOL), (), 201, _MEMBERS),
    ("GET", "/v1/groups/{conv}/members",
     "A group's members, and whether members added later may read what was said before they joined", None, (), 200,
     _obj(("conv", "members", "history_visible"), conv=_STR, members=_STRINGS, history_visible=_BOOL)),
    ("POST", "/v1/groups/{conv}/members", "Add members (JOINED entries)", _obj(("users",), users=_SOME_USERS), (),
     200, _MEMBERS),
    ("POST", "/v1/groups/{conv}/members/remove",
     "Remove several members in one store op (a LEFT entry each); refused as a whole if no member would stay",
     _obj(("users",), users=_SOME_USERS), (), 200,
     _obj(("conv", "members", "removed", "not_members"), conv=_STR, members=_STRINGS, removed=_STRINGS,
          not_members=_STRINGS)),
    ("DELETE", "/v1/groups/{conv}/members/{user}", "Remove a member (a LEFT entry)", None, (), 200, _MEMBERS),
    ("POST", "/v1/users/{user}/kick", "End a user's sessions now (Close KICKED)", _obj(device=_STR, reason=_STR), (),
     200, _obj(user=_STR, devices=_STRINGS)),
    ("POST", "/v1/users/{user}/revoke", "Refuse tokens issued before a time (µs), durably", _obj(device=_STR, before=_INT),
     (), 200, _obj(user=_STR, device=_STR, before=_INT)),
    ("GET", "/v1/users/{user}/conversations", "A user's conversations with read markers and unread counts", None, (),
     200, _obj(conversations={"type": "array", "items": _obj(
         conv=_STR, read_seq=_INT, last_seq=_INT, unread=_INT, peer=_STR, peer_read_seq=_INT)})),
    ("GET", "/v1/users/{user}/conversation-list",
     "A page of the user's conversation list: pinned first, then newest activity first, with last message, unread"
     " and mention counts and the user's settings", None,
     (("cursor", _STR), ("limit", _INT), ("include_hidden", _BOOL)),
     200, _obj(entries={"type": "array", "items": _CONV_ENTRY}, cursor=_STR, more=_BOOL)),
    ("POST", "/v1/users/{user}/conversations/{conv}/settings",
     "Change the user's own settings of a conversation (pinned, muted, hidden until the next message); the user's"
     " devices get a ConvUpdate", _obj(pinned=_BOOL, muted=_BOOL, hidden=_BOOL), (), 200, _CONV_ENTRY),
    ("GET", "/v1/users/{user}/devices", "The user's devices online now", None, (), 200, _obj(user=_STR, devices=_STRINGS)),
    ("GET", "/v1/users/{user}/presence",
     "A user's presence on this broker: online, last seen (µs, 0 while online or unknown), last-seen privacy setting",
     None, (), 200, _obj(user=_STR, online={"type": "boolean"}, last_seen=_INT, hide_last_seen={"type": "boolean"})),
    ("GET", "/v1/users/{user}/unread", "Unread messages of a user in one conversation, or in all of them",
     None, (("conv", _STR),), 200, _obj(user=_STR, conv={"type": ["string", "null"]}, unread=_INT)),
    ("GET", "/v1/users/{user}/read-positions",
     "A user's read marker per conversation, inbox head and floor, and each device's inbox position", None, (),
     200, _obj(user=_STR, head=_INT, floor=_INT,
               markers={"type": "array", "items": _obj(conv=_STR, read_seq=_INT)},
               devices={"type": "array", "items": _obj(device=_STR, position=_INT, last_seen=_INT,
                                                       online={"type": "boolean"})})),
    ("GET", "/v1/conversations/{conv}/retention",
     "A conversation's history retention (null: the broker default; max_age in µs) and history floor", None, (),
     200, _RETENTION),
    ("PUT", "/v1/conversations/{conv}/retention",
     "Set a conversation's history retention (per field: null or omitted = the broker default, 0 = no limit)",
     _obj(max_age=_INT_OR_NULL, max_count=_INT_OR_NULL), (), 200, _RETENTION),
    ("DELETE", "/v1/conversations/{conv}",
     "Purge a conversation: its entries, inbox entries, dedupe records, read markers and (a group) the group; idempotent",
     None, (), 200, _obj(conv=_STR, messages=_INT, entries=_INT)),
    ("DELETE", "/v1/users/{user}",
     "Purge a user: sessions closed (KICKED), groups left, messages made tombstones, inbox, devices, read markers"
     " and dedupe records deleted, tokens issued until now revoked; idempotent",
     None, (), 200, _obj(user=_STR, messages=_INT, entries=_INT, devices=_INT, left=_STRINGS)),
    ("POST", "/v1/tokens", "Issue a login token", _obj(("user",), user=_STR, device=_STR, ttl=_INT), (),
     201, _obj(token=_STR)),
    ("GET", "/v1/events", "Host events from a durable cursor (long-poll with wait, in seconds; at most 4 MiB of JSON a page)", None,
     (("consumer", _STR), ("after", _U64), ("limit", _INT), ("wait", {"type": "number", "minimum": 0})),
     200, _obj(consumer=_STR, after=_INT, events={"type": "array", "items": {"type": "object"}}, next=_INT, more=_BOOL)),
    ("GET", "/v1/events/stream",
     "Host events as server-sent events (text/event-stream) from the durable cursor or Last-Event-ID; ack with /v1/events/ack",
     None, (("consumer", _STR), ("after", _U64), ("limit", _INT), ("keepalive", {"type": "number", "minimum": 0.05})),
     200, {"type": "string", "description": "text/event-stream: `id: <event id>` and `data: <event JSON>` per event"}),
    ("POST", "/v1/events/ack", "Move a consumer's durable cursor", _obj(("upto",), consumer=_STR, upto=_U64), (),
     200, _obj(consumer=_STR, cursor=_INT)),
    ("GET", "/v1/events/consumers",
     "Every event consumer with a durable cursor, sorted by name (the first 1000: `more` says there are others),"
     " to find a stray one",
     None, (), 200, _obj(("consumers", "more"), consumers={"type": "array", "items": _obj(
         ("consumer", "cursor"), consumer=_STR, cursor=_INT)}, more=_BOOL)),
    ("DELETE", "/v1/events/consumers/{consumer}",
     "Delete a consumer's durable cursor: the reclaim stops waiting for it; reading the name again starts a new"
     " cursor at 0 (404 NO_SUCH_CONSUMER: none; 409 CONSUMER_IN_USE: a stream, long-poll or handler reads it, or it was read or acked within [server] consumer_idle, or the broker started within it; Retry-After)",
     None, (), 200, _obj(("consumer", "deleted"), consumer=_STR, deleted=_BOOL)),
)

#: The listener's own endpoints (pimcore.http.app.BrokerHttp), in the same
#: shape: with ROUTES, every endpoint the listener serves.
OPS_ROUTES: tuple[tuple[str, str, str, Any, tuple[tuple[str, dict[str, Any]], ...], int, dict[str, Any]], ...] = (
    ("GET", "/v1/info", "The broker: version, backend, uptime, epoch, listeners", None, (), 200,
     _obj(version=_STR, backend=_STR, uptime_seconds={"type": "number"}, started={"type": "number"},
          epoch={"type": ["string", "null"]}, listeners=_STRINGS)),
    ("GET", "/healthz", "Liveness: 200 while the process serves HTTP; 503 UNAVAILABLE with the reason when the"
     " store writes no more until the broker is restarted", None, (), 200, _obj(status=_STR)),
    ("GET", "/readyz", "Readiness: 200 when the store is open and the broker accepts; else 503 UNAVAILABLE with the"
     " reason", None, (), 200, _obj(status=_STR)),
    ("GET", "/metrics", "Prometheus metrics (text exposition format)", None, (), 200,
     {"type": "string", "description": "Prometheus text format 0.0.4"}),
    ("GET", "/v1/openapi.json", "This document", None, (), 200, {"type": "object"}),
    ("GET", "/", "This listener's endpoints as \"METHOD /path\" lines (\" (no key)\" after those that need no"
     " API key), for a human at its root: where the docs and this document are", None, (), 200,
     _obj(service=_STR, docs=_STR, openapi={"type": ["string", "null"]}, auth=_STR, endpoints=_STRINGS)),
)

#: Endpoints served without an API key (no data in them).
_PUBLIC = {"/", "/healthz", "/readyz", "/metrics", "/v1/openapi.json"}

#: Success bodies that are not JSON.
_CONTENT_TYPE = {("GET", "/v1/events/stream"): "text/event-stream",
                 ("GET", "/metrics"): "text/plain"}

_ERROR = _obj(("error",), error=_obj(("code", "message"), code=_CODE, message=_STR))


def _closed(schema: Any) -> Any:
    """A request body's schema with ``additionalProperties: false`` on each
    object in it: the API refuses a field it does not take (400
    ``unknown field``), a batch post's items too."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema:
            out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def openapi_document(version: str) -> dict[str, Any]:
    """The document (a JSON-ready dict) for pimcore ``version``."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, body, query, status, result in ROUTES + OPS_ROUTES:
        params = [
            {"name": name[1:-1], "in": "path", "required": True, "schema": _STR}
            for name in path.split("/") if name.startswith("{")
        ] + [{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in query]
        op: dict[str, Any] = {
            "summary": summary,
            "security": [] if path in _PUBLIC else [{"apiKey": []}],
            "responses": {
                str(status): {"description": "done",
                              "content": {_CONTENT_TYPE.get((method, path), "application/json"): {"schema": result}}},
                "default": {"description": "refused: see docs/HTTP.md for the codes",
                            "content": {"application/json": {"schema": _ERROR}}},
            },
        }
        if params:
            op["parameters"] = params
        if body is not None:
            op["requestBody"] = {"required": method == "POST" and bool(body.get("required")),
                                 "content": {"application/json": {"schema": _closed(body)}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "pimcore server API", "version": version},
        "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
