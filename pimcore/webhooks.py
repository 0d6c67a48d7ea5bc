"""Webhooks: host events POSTed to a URL, and a pre-send moderation call.

**Event webhooks** (``[webhooks]``).  The durable outbox is the host event
log (store/base.py, "Host events"): the sender is one more named consumer
of it (``webhook``).  It reads after its durable cursor, POSTs a batch
(events in id order, at most ``batch_size`` events and ``max_batch_bytes``
of JSON), and acks the cursor only after a 2xx answer.  Anything else -- a
non-2xx status, a timeout, a refused connection -- retries the same batch
after ``uniform(0, min(retry_cap, retry_base * 2**n))`` seconds (n = the
failures in a row before this one: capped exponential backoff with full
jitter), forever: nothing is dropped.  One request is in flight at a time,
so batches arrive in id order.  Delivery is at least once: a batch whose
2xx answer was lost, or that was in flight when the broker stopped, comes
again -- receivers dedupe by (store id, event id): the body names the store.

**Signatures** (both kinds of call).  Header ``Pimcore-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``, made anew
for each attempt.  A receiver checks it with :func:`verify_signature`,
which also refuses a timestamp outside ``tolerance`` (a replayed old body).

**Moderation** (``[moderation]``).  Before a user's message is stored the
broker POSTs ``{"conv", "sender", "device", "local_id", "payload_b64",
"time", "source"}`` (signed the same way) and waits at most ``timeout_ms``
for ``{"allow": true}`` or ``{"allow": false, "reason": "..."}``.  No usable
answer (timeout, non-2xx, not that JSON -- a key given twice included --,
connection refused) follows
``policy``: "open" lets the message through (a warning is logged),
"closed" refuses it with INTERNAL, which the SDK retries with the same
local id.  See docs/EMBEDDING.md, Webhooks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import time
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import trio

from ._util import DuplicateKey, NotJson, read_json, shown_url
from .errors import ErrorCode, PimError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from .embed import Pimcore

__all__ = [
    "SIGNATURE_HEADER", "DELIVERY_HEADER", "WEBHOOK_SECRET_FILE", "WEBHOOK_CONSUMER", "EVENT_TYPES",
    "SignatureError", "sign", "signature_header", "verify_signature", "backoff_delay",
    "WebhookConfig", "ModerationConfig", "WebhookSender", "Moderator", "Verdict",
]

log = logging.getLogger("pimcore.webhooks")

SIGNATURE_HEADER = "Pimcore-Signature"
#: ``<first id>-<last id>`` of the events in the body: the same on every retry of a batch.
DELIVERY_HEADER = "Pimcore-Delivery"
#: The generated shared secret of webhooks and moderation, in the data directory (mode 0600).
WEBHOOK_SECRET_FILE = "webhook-secret"
#: The event log consumer the sender reads and acks as.
WEBHOOK_CONSUMER = "webhook"
#: Host event types (pimcore.embed.HostEvent.type), for ``[webhooks] events``.
EVENT_TYPES = ("message", "read", "online", "offline", "kicked")


# ---------------------------------------------------------------- signatures


class SignatureError(PimError):
    """A webhook signature that does not prove the body came from the broker
    now.  ``reason``: "missing" (no header), "malformed", "stale" (timestamp
    outside the tolerance) or "mismatch" (wrong secret or modified body)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _key(secret: Union[str, bytes]) -> bytes:
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def sign(secret: Union[str, bytes], body: bytes, t: int) -> str:
    """The hex HMAC-SHA256 of ``"<t>." + body`` under ``secret``."""
    return hmac.new(_key(secret), b"%d." % t + body, hashlib.sha256).hexdigest()


def signature_header(secret: Union[str, bytes], body: bytes, *, now: Optional[float] = None) -> str:
    """The ``Pimcore-Signature`` value for ``body`` at ``now`` (unix seconds;
    default: now): ``t=<seconds>,v1=<hex>``."""
    t = int(time.time() if now is None else now)
    return f"t={t},v1={sign(secret, body, t)}"


def verify_signature(
    secret: Union[str, bytes],
    header: Optional[str],
    body: bytes,
    *,
    now: Optional[float] = None,
    tolerance: float = 300,
) -> int:
    """Check a ``Pimcore-Signature`` header against the raw request ``body``
    (bytes exactly as received, before any JSON parsing).  ``now``: unix
    seconds (default: the clock); ``tolerance``: seconds the timestamp may
    be off either way.  Returns the signed timestamp.  Several ``v1=`` (a
    secret being rotated) pass if one matches.  Raises
    :class:`SignatureError` (reason "missing", "malformed", "stale",
    "mismatch"); compares in constant time."""
    if not header:
        raise SignatureError("missing", f"no {SIGNATURE_HEADER} header")
    t: Optional[int] = None
    sigs: list[str] = []
    for part in header.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq:
            raise SignatureError("malformed", f"{SIGNATURE_HEADER}: {part.strip()!r} is not key=value")
        if name == "t":
            if not value.isdigit() or t is not None:
                raise SignatureError("malformed", f"{SIGNATURE_HEADER}: t must be one number of seconds")
            t = int(value)
        elif name == "v1":
            sigs.append(value)
    if t is None or not sigs:
        raise SignatureError("malformed", f"{SIGNATURE_HEADER}: needs t=<seconds> and v1=<hex>")
    clock = time.time() if now is None else now
    if abs(clock - t) > tolerance:
        raise SignatureError("stale", f"{SIGNATURE_HEADER}: timestamp {t} is {clock - t:+.0f} s from now")
    expected = sign(secret, body, t)
    # Every candidate is compared (no early exit on the first mismatch).
    ok = False
    for sig in sigs:
        ok |= hmac.compare_digest(expected, sig)
    if not ok:
        raise SignatureError("mismatch", f"{SIGNATURE_HEADER}: no v1 signature matches the body")
    return t


def backoff_delay(failures: int, base: float, cap: float, rng: Optional[random.Random] = None) -> float:
    """Seconds to wait after ``failures`` failed attempts in a row (>= 1):
    ``uniform(0, min(cap, base * 2**(failures-1)))`` -- "full jitter", so
    brokers restarted together do not retry in step."""
    ceiling = min(cap, base * 2.0 ** min(max(failures - 1, 0), 62))
    return (rng or random).uniform(0.0, ceiling)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Event webhooks (``[webhooks]``).  Times in seconds, sizes in bytes."""

    url: str
    secret: bytes
    timeout: float = 10.0  # one request, connect to last byte of the answer
    retry_base: float = 1.0
    retry_cap: float = 60.0
    batch_size: int = 100  # events per request (a single event may exceed max_batch_bytes)
    max_batch_bytes: int = 1 << 20
    events: tuple[str, ...] = ()  # types to send; empty: all (the others are skipped and acked)

    def __post_init__(self) -> None:
        _check_url("webhooks.url", self.url)
        if not self.secret:
            raise ValueError("webhooks.secret: cannot be empty")
        if not self.timeout > 0:
            raise ValueError(f"webhooks.timeout: must be > 0 seconds, got {self.timeout}")
        if not (self.retry_base > 0 and self.retry_cap >= self.retry_base):
            raise ValueError(f"webhooks.retry_base / retry_cap: need 0 < retry_base <= retry_cap, got"
                             f" {self.retry_base} and {self.retry_cap}")
        if not 1 <= self.batch_size <= 10_000:
            raise ValueError(f"webhooks.batch_size: must be 1..10000, got {self.batch_size}")
        if self.max_batch_bytes < 1024:
            raise ValueError(f"webhooks.max_batch_bytes: must be >= 1024, got {self.max_batch_bytes}")
        bad = sorted(set(self.events) - set(EVENT_TYPES))
        if bad:
            raise ValueError(f"webhooks.events: unknown event types {bad} (known: {', '.join(EVENT_TYPES)})")


@dataclass(frozen=True, slots=True)
class ModerationConfig:
    """The pre-send moderation call (``[moderation]``)."""

    url: str
    secret: bytes
    policy: str  # "open" | "closed": what no usable answer means
    timeout_ms: int = 2000

    def __post_init__(self) -> None:
        _check_url("moderation.url", self.url)
        if not self.secret:
            raise ValueError("moderation.secret: cannot be empty")
        if self.policy not in ("open", "closed"):
            raise ValueError(f"moderation.policy: expected \"open\" or \"closed\", got {self.policy!r}")
        if not 1 <= self.timeout_ms <= 60_000:
            raise ValueError(f"moderation.timeout_ms: must be 1..60000, got {self.timeout_ms}")


def _check_url(name: str, url: str) -> None:
    """ValueError naming ``name`` for a URL no request could go to.  The host
    and port are checked here, not left to the first call: a bad port
    (``https://host:99999/x``, ``:abc``) or no host was taken at start and
    failed only at run time, each event retried forever (a new user's
    trial); so were URLs that httpx, which sends the requests, refuses (an
    IPv6 literal it cannot read, a control character): its InvalidURL at
    the first event ended the broker, at every restart again (a later
    trial).  The URL is quoted as logs show it (credentials redacted), and
    nothing of its userinfo is echoed."""
    low = url.lower()
    if not (low.startswith("http://") or low.startswith("https://")) or len(url.split("://", 1)[1]) == 0:
        raise ValueError(f"{name}: expected an http:// or https:// URL, got {shown_url(url)!r}")
    wanted = "expected an http:// or https:// URL with a host, and a port 1..65535 if one is given"
    for i, c in enumerate(url):
        if ord(c) < 0x20 or ord(c) == 0x7F or unicodedata.category(c) == "Cc":
            raise ValueError(f"{name}: the URL holds a control character ({ascii(c)} at {i}): {wanted}")
    rest = url.partition("://")[2]
    if "@" in rest and "@" not in rest.partition("/")[0].partition("?")[0].partition("#")[0]:
        # An "@" after a "/", "?" or "#": valid in a path or a query
        # (https://host/a@b), or a password holding an unencoded "/", "?" or
        # "#" that ended the host early -- which every error below would
        # then quote a piece of, as a port or a host (a trial).  Only a URL
        # that is bad as read gets this error instead, quoting nothing.
        encode = (f"{name}: {shown_url(url)!r} is not a URL as read (its host ends at the first '/', '?' or '#',"
                  " before the '@'): percent-encode '/', '?', '#' and '@' in a user name or password (%2F, %3F, %23,"
                  f" %40): {wanted}")
        try:
            _check_parts(name, url, wanted)
        except ValueError:
            raise ValueError(encode) from None
    else:
        _check_parts(name, url, wanted)


def _check_parts(name: str, url: str, wanted: str) -> None:
    """The host and port checks of :func:`_check_url`."""
    from urllib.parse import urlsplit

    import httpx

    try:
        parts = urlsplit(url)
    except ValueError as exc:  # (an unclosed IPv6 bracket: "Invalid IPv6 URL")
        raise ValueError(f"{name}: not a URL ({exc}): {wanted}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"{name}: no host in {shown_url(url)!r}: {wanted}")
    # (RFC 3986 reg-name: unreserved, pct-encoded, sub-delims; ":" only in
    # an IPv6 literal.  "h\\x" was taken, and failed at every request.)
    allowed = "-._~!$&'()*+,;=%" + (":" if parts.netloc.rpartition("@")[2].startswith("[") else "")
    if any(c.isspace() or not c.isprintable() or (c.isascii() and not c.isalnum() and c not in allowed) for c in host):
        raise ValueError(f"{name}: the host {host!r} is not a host name, in {shown_url(url)!r}: {wanted}")
    if "%" in host:
        # (A link-local address's zone, [fe80::1%25eth0]: taken, then every
        # request failed "Name or service not known", retried forever -- a
        # trial.  The HTTP client does not send to one.)
        raise ValueError(f"{name}: an IPv6 zone id ({host!r}) is not supported by the HTTP client, in"
                         f" {shown_url(url)!r}: use a global address or a host name")
    try:
        port = parts.port  # (ValueError: out of 0..65535, or not digits)
    except ValueError:
        # What follows the host: "80:90" of host:80:90 (not its last piece).
        hostport = parts.netloc.rpartition("@")[2]
        given = hostport.partition("]")[2][1:] if hostport.startswith("[") else hostport.partition(":")[2]
        number = given.isascii() and given.isdigit()  # ("٨٠" is digits to str.isdigit, not to a URL)
        raise ValueError(f"{name}: port {given} is not 1..65535, in {shown_url(url)!r}: {wanted}" if number else
                         f"{name}: port {given!r} is not a number, in {shown_url(url)!r}: {wanted}") from None
    if port == 0:  # (urllib takes it; no connection can go to port 0)
        raise ValueError(f"{name}: port 0 is not 1..65535, in {shown_url(url)!r}: {wanted}")
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{name}: not a URL the HTTP client can send to ({exc}), in {shown_url(url)!r}:"
                         f" {wanted}") from None


def _client(timeout: float) -> "httpx.AsyncClient":
    import httpx

    from . import __version__

    # No redirects (a 3xx is a failed delivery, not a place to send events),
    # certificates verified, one pool per sender.
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, headers={"User-Agent": f"pimcore/{__version__}"})


class _Throttle:
    """At most one log line per ``every`` seconds for a repeated condition;
    the lines in between are counted and the next line says how many."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last = -1e18
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


#: The most bytes of a moderation answer read (``{"allow": ..., "reason":
#: ...}`` needs a few hundred; a reason is cut to 1 KiB anyway): a longer
#: answer is no usable answer, and the rest is not read (a trial's 200 MB
#: answer was read whole, the broker from 58 to 700 MB).  A webhook
#: receiver's answer is read up to as much and dropped.
MODERATION_MAX_ANSWER = 64 * 1024


# ---------------------------------------------------------------- event webhooks


class WebhookSender:
    """Delivers host events to ``config.url`` (see the module docstring).
    Run it with ``await nursery.start(sender.run)`` beside the broker whose
    :class:`~pimcore.embed.Pimcore` handle it reads through; cancel it to stop
    (a batch in flight is sent again next time).  Counters for ``/metrics``
    are attributes."""

    def __init__(self, handle: "Pimcore", config: WebhookConfig, *, consumer: str = WEBHOOK_CONSUMER,
                 rng: Optional[random.Random] = None) -> None:
        self.handle = handle
        self.config = config
        self.consumer = consumer
        self._rng = rng or random.Random()
        self.requests_ok = 0
        self.requests_failed = 0
        self.events_delivered = 0
        self.last_success: float = 0.0  # unix seconds, 0 = never
        self.last_failure: float = 0.0
        self.failing_since: Optional[float] = None  # unix seconds of the first failure of the current run of them
        self._throttle = _Throttle()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver forever.  Before anything else the consumer's cursor is
        created (an ack of 0), so the periodic reclaim keeps every event
        this sender has not delivered (it drops only what every consumer
        acked, or what is older than the inbox max age)."""
        cfg = self.config
        started = False
        failures = 0
        # A live reader of its consumer: delete_consumer refuses it.
        with self.handle._reading(self.consumer):
            async with _client(cfg.timeout) as client:
                while True:
                    try:
                        if not started:
                            cursor = await self.handle.ack_events(0, self.consumer)
                            started = True
                            log.info("webhook: delivering events after id %d to %s", cursor, shown_url(cfg.url),
                                     extra={"event": "webhook_started", "url": shown_url(cfg.url), "cursor": cursor})
                            task_status.started()
                        _, page = await self.handle.next_events(self.consumer, limit=cfg.batch_size)
                        from .embed import fresh_page

                        body, first, upto, count = self._batch(await fresh_page(self.handle, page))
                        if body is not None:
                            failures = await self._deliver(client, body, first, upto, count, failures)
                        await self.handle.ack_events(upto, self.consumer)
                        failures = 0
                    except StoreError as exc:
                        if not started:
                            # No cursor, no delivery: the host learns it now, from
                            # open_pimcore / serve start-up, rather than waiting
                            # behind retries that may never succeed.
                            raise
                        # The event log cannot be read or the cursor not moved:
                        # whatever was not acked is read (and sent) again.
                        failures += 1
                        delay = backoff_delay(failures, cfg.retry_base, cfg.retry_cap, self._rng)
                        log.warning("webhook: the event log failed (%s); again in %.1f s", exc, delay,
                                    extra={"event": "webhook_failed", "error": str(exc), "delay": delay})
                        await trio.sleep(delay)

    def _batch(self, page: list[Any]) -> tuple[Optional[bytes], int, int, int]:
        """(body or None if every event was filtered out, first id sent,
        the id to ack, events in the body) for the longest prefix of
        ``page`` (offline_recipients fresh: embed.fresh_page) within the
        limits."""
        from .http.api import _event  # one JSON shape for an event: GET /v1/events and webhooks

        cfg = self.config
        docs: list[bytes] = []
        size = 0
        first = upto = 0
        for ev in page:
            if cfg.events and ev.type not in cfg.events:
                upto = ev.id
                continue
            doc = json.dumps(_event(ev), separators=(",", ":")).encode()
            if docs and size + len(doc) + 1 > cfg.max_batch_bytes:
                break
            docs.append(doc)
            size += len(doc) + 1
            first = first or ev.id
            upto = ev.id
        if not docs:
            return None, 0, upto, 0
        head = b'{"store":"' + self.handle.store_id.encode() + b'","events":['
        return head + b",".join(docs) + b"]}", first, upto, len(docs)

    async def _deliver(self, client: "httpx.AsyncClient", body: bytes, first: int, upto: int, count: int,
                       failures: int) -> int:
        """POST ``body`` until a 2xx answers; returns the failures in a row
        left (0).  Never gives up: events are never dropped."""
        cfg = self.config
        delivery = f"{first}-{upto}"
        while True:
            error = await self._post(client, body, delivery)
            now = time.time()
            if error is None:
                self.requests_ok += 1
                self.events_delivered += count
                self.last_success = now
                if failures:
                    log.info("webhook: delivered again to %s after %d failed attempts (%.0f s)", shown_url(cfg.url), failures,
                             now - (self.failing_since or now),
                             extra={"event": "webhook_recovered", "failures": failures, "url": shown_url(cfg.url)})
                self.failing_since = None
                return 0
            failures += 1
            self.requests_failed += 1
            self.last_failure = now
            if self.failing_since is None:
                self.failing_since = now
            delay = backoff_delay(failures, cfg.retry_base, cfg.retry_cap, self._rng)
            if self._throttle.ready() or failures == 1:  # (ready() first: it starts the 10 s)
                more = self._throttle.take_suppressed()
                log.warning("webhook: POST %s (events %s) failed: %s; attempt %d, again in %.2f s%s", shown_url(cfg.url),
                            delivery, error, failures, delay, f" ({more} more failures not logged)" if more else "",
                            extra={"event": "webhook_failed", "url": shown_url(cfg.url), "error": error, "attempt": failures,
                                   "delay": delay, "delivery": delivery})
            await trio.sleep(delay)

    async def _post(self, client: "httpx.AsyncClient", body: bytes, delivery: str) -> Optional[str]:
        """None for a 2xx answer, else what went wrong (for the log)."""
        import httpx

        cfg = self.config
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(cfg.secret, body),
            DELIVERY_HEADER: delivery,
        }
        status = 0
        try:
            with trio.move_on_after(cfg.timeout) as scope:
                # The status is the answer: of the body at most
                # MODERATION_MAX_ANSWER bytes are read, and dropped (read
                # whole, one without end held each batch for the timeout, and
                # a large one took the broker's memory -- a trial).  A body
                # read to its end keeps the connection for the next batch;
                # leaving the block before closes it.
                async with client.stream("POST", cfg.url, content=body, headers=headers) as resp:
                    status = resp.status_code
                    seen = 0
                    async for chunk in resp.aiter_raw():
                        seen += len(chunk)
                        if seen > MODERATION_MAX_ANSWER:
                            break
            if scope.cancelled_caught:
                return f"no answer within {cfg.timeout:g} s"
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            # (InvalidURL is no HTTPError: one the start-up check let by ended
            # the broker with a traceback -- a trial.)
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"


# ---------------------------------------------------------------- moderation



@dataclass(frozen=True, slots=True)
class Verdict:
    """A moderation outcome: ``reason`` None lets the message through;
    otherwise it is refused with ``code`` (REJECTED: the service said no;
    INTERNAL: no usable answer under the closed policy -- the client retries)."""

    reason: Optional[str]
    code: ErrorCode = ErrorCode.REJECTED


ALLOW = Verdict(None)


class Moderator:
    """Asks the moderation service about one message at a time per caller;
    many callers may ask at once (a pool of keep-alive connections).
    ``aclose()`` when done.  Counters for ``/metrics`` are attributes."""

    def __init__(self, config: ModerationConfig, *, clock: Any = None) -> None:
        self.config = config
        self._client: Optional["httpx.AsyncClient"] = None
        self.allowed = 0
        self.rejected = 0
        self.unavailable = 0  # no usable answer (then the policy decided)
        self._throttle = _Throttle()

    async def check(self, *, conv: str, sender: str, device: str, local_id: Optional[int], payload: bytes, now: int,
                    source: str = "client") -> Verdict:
        """The verdict on a message about to be stored (``now``: µs, the
        broker's clock; ``source``: "client" or "host"; ``local_id`` None: a
        host post without an idempotency key, sent as null -- it was "0", a
        local id no post has, which a service keying on it took for one)."""
        import httpx

        cfg = self.config
        body = json.dumps({
            "conv": conv, "sender": sender, "device": device, "local_id": None if local_id is None else str(local_id),
            "payload_b64": base64.b64encode(payload).decode("ascii"), "time": now, "source": source,
        }, separators=(",", ":")).encode()
        if self._client is None:
            self._client = _client(cfg.timeout_ms / 1000)
        # (identity: the answer is read raw, to bound it before any inflating.)
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                   SIGNATURE_HEADER: signature_header(cfg.secret, body)}
        problem: Optional[str] = None
        answer: Any = None
        status = 0
        raw = bytearray()
        try:
            with trio.move_on_after(cfg.timeout_ms / 1000) as scope:
                # Streamed, and at most MODERATION_MAX_ANSWER bytes read:
                # the rest of a longer answer never is (nor held).
                async with self._client.stream("POST", cfg.url, content=body, headers=headers) as resp:
                    status = resp.status_code
                    if 200 <= status < 300:
                        async for chunk in resp.aiter_raw():
                            raw += chunk
                            if len(raw) > MODERATION_MAX_ANSWER:
                                problem = f"the answer is over {MODERATION_MAX_ANSWER} bytes"
                                break
            if scope.cancelled_caught:
                problem = f"no answer within {cfg.timeout_ms} ms"
            elif not 200 <= status < 300:
                problem = f"HTTP {status}"
            elif problem is None:
                problem, answer = _moderation_answer(resp, bytes(raw))
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if problem is None:
            if answer["allow"]:
                self.allowed += 1
                return ALLOW
            self.rejected += 1
            return Verdict(str(answer.get("reason") or "rejected by moderation"))
        self.unavailable += 1
        if self._throttle.ready():
            more = self._throttle.take_suppressed()
            log.warning("moderation: POST %s failed: %s; %s (policy %s)%s", shown_url(cfg.url), problem,
                        "message let through" if cfg.policy == "open" else "message refused with INTERNAL, the client retries",
                        cfg.policy, f" ({more} more not logged)" if more else "",
                        extra={"event": "moderation_failed", "url": shown_url(cfg.url), "error": problem, "policy": cfg.policy})
        if cfg.policy == "open":
            return ALLOW
        return Verdict(f"the moderation service gave no usable answer ({problem}); send again later", ErrorCode.INTERNAL)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _moderation_answer(resp: "httpx.Response", raw: bytes) -> tuple[Optional[str], Any]:
    """(None, the answer) for a usable moderation answer ``raw`` (the body
    as sent, before any content coding), else (what is wrong with it, None)."""
    if resp.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        # (Read raw to bound it: a compressed answer would be inflated past
        # the bound.  The client asks for none; a service that sends one
        # anyway gives no usable answer.)
        return f"the answer is {resp.headers['content-encoding']}-encoded (send it plain)", None
    # (read_json: an object giving a key twice, {"allow": true, "allow":
    # false}, was taken as its last value, where another reader of the
    # answer -- a proxy, the service's own log -- may take the first:
    # ambiguous, so no usable answer; so are NaN and Infinity, which are not
    # JSON.)
    try:
        answer = read_json(raw)
    except DuplicateKey as exc:
        return f"the answer gives {exc}", None  # (the key quoted as _show does: cut, escaped)
    except RecursionError:  # (100,000 "[": the decoder's nesting limit -- it was "the content filter failed")
        return "the answer is JSON nested too deeply", None
    except (ValueError, UnicodeDecodeError) as exc:
        return f"the answer is not JSON ({exc})" if isinstance(exc, NotJson) else "the answer is not JSON", None
    if not (isinstance(answer, dict) and isinstance(answer.get("allow"), bool)
            and isinstance(answer.get("reason", ""), (str, type(None)))):
        return 'the answer is not {"allow": true|false, "reason": "..."}', None
    return None, answer
