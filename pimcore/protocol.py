"""The server side of one PIM connection, sans-IO: bytes in, frames out; frames in, bytes out.

A :class:`ServerSession` is the broker's half of one connection's *wire
protocol*, in the manner of h11 and wsproto: it owns everything about a
connection that depends on bytes and frame types, and nothing that depends on
users, inboxes or the store.  It does no I/O and reads no clock; it is not
thread-safe (one thread drives a session, like the broker core).

What it owns
------------
* **Framing.**  A :class:`pimcore.codec.Decoder` limited to ``max_frame_size``
  bytes per frame (docs/PROTOCOL.md sections 1 and 3) -- before the Login is
  granted to :data:`PRE_LOGIN_MAX_FRAME` (64 KiB) if that is lower, so a
  connection that never logs in cannot make the broker hold a frame of
  max_frame bytes -- and the encoder.
* **Compression (PROTOCOL.md section 7)**, both directions, as an extension
  inside the session: the owner never sees a compressed byte.  Per
  direction, the connection's own deflate stream (CAP_DEFLATE_DOWN /
  CAP_DEFLATE_UP, made lazily at the first frame that needs it; see
  :meth:`ServerSession.compression_state_size`) or the thread's shared zstd
  contexts (CAP_ZSTD).
* **The login gate.**  Before a Login only Login, Ping and Close are
  acceptable; anything else is a protocol error *found by the session*.
* **Closing.**  The Close frame goes out through the session, which then
  refuses to send more and ignores what still arrives.

Who calls what
--------------
The broker core owns one session per connection (made at
``connection_made``); the network glue only moves bytes::

    # reader task -> core.receive_data(conn, data, now):
    session.receive_data(data)                    # buffered; nothing is decoded here
    try:
        while frames := session.next_frames():   # hot path: one call per batch
            for frame in frames:
                dispatch(frame)                   # may call login_accepted()/close()
                if closed: break (both loops)
    except ProtocolError as exc:                  # malformed bytes, frame before Login
        wire = session.close(CloseCode.PROTOCOL_ERROR, reason)

    # everything the core sends to this connection:
    wire = session.send(frame)          # or send_many(frames): one bytes object
    wire = session.close(code, reason)  # the Close frame; the session is then CLOSED

    # a connection refused before it got a session (the broker is full):
    wire = refuse_connection()          # Close(OVERLOADED, "too many connections")

``next_frames()`` returns every frame that can be decoded now (a list, empty
when more bytes are needed) and is the fast path: it costs one Python call per
batch instead of one per frame (the loop over the decoder runs inside it).
Measured by bench/bench_protocol.py on a chunk of 64 SendReqs with the
compiled backend: ``next_frames`` ~1.1x the time of a bare ``Decoder`` loop,
``next_frame`` ~2x.  (It cannot be ``list(decoder)``: an error must not lose
the frames decoded before it.)
``next_frame()`` is the h11-style one-at-a-time variant, for tests and simple
drivers; the two may be mixed.  Both stop early where the next frame could not
be decoded correctly yet -- after a Login, until its outcome is known -- so the
owner must keep calling until it gets nothing, as in the loop above.

State machine
-------------
::

    AWAITING_LOGIN --Login--> LOGGING_IN --login_accepted(caps)--> ACTIVE
      (Ping: stays)

    AWAITING_LOGIN, ACTIVE --Close received---------------------> PEER_CLOSED
    AWAITING_LOGIN, ACTIVE --bad bytes / frame before Login-----> ERRORED
    any state              --close() or send(Close)-------------> CLOSED

    state           decodes?   accepts bytes?   may send?
    AWAITING_LOGIN  yes, gated yes              yes (Pong, LoginAck, Close...)
    LOGGING_IN      no         yes (buffered)   yes
    ACTIVE          yes        yes              yes
    PEER_CLOSED     no         no (ignored)     yes
    ERRORED         raises     no (ignored)     yes
    CLOSED          no         no (ignored)     no: SessionClosed

* AWAITING_LOGIN -- frames are decoded and checked: Login moves on to
  LOGGING_IN, Ping is handed over (the core answers Pong), Close moves to
  PEER_CLOSED, anything else raises :class:`UnexpectedFrame` (a
  ProtocolError, code UNEXPECTED_FRAME, ``str(exc)`` = ``"SendReq before
  Login"``).  No compressed frame is acceptable: the decoder has no
  decompressor yet, so a flagged frame is MALFORMED_FRAME.
* LOGGING_IN -- the owner is checking the Login.  Bytes are buffered but
  **nothing is decoded**: whether the next frame may be compressed depends on
  the outcome (PROTOCOL.md section 7: the broker accepts compressed frames
  from the first frame after a Login it grants), so deciding it now could
  reject a valid frame or accept an invalid one.  ``next_frame(s)`` returns
  nothing until :meth:`ServerSession.login_accepted` or ``close()``.  With a
  synchronous authenticator this state lasts only between the Login leaving
  ``next_frames`` and ``login_accepted``; with an asynchronous one (a hook, a
  store read) the session itself is the backlog: the owner pulls the waiting
  frames, in order, right after ``login_accepted``.  The bytes are held as
  they came, so the owner bounds them (``buffered``, bytes) and closes a
  client that keeps sending while its login is pending -- the session has no
  such policy of its own.
* ACTIVE -- every decodable frame is handed over; types are not checked any
  more (a second Login, or a broker->client frame, is the core's to refuse).
  Compressed frames are accepted iff the granted caps had CAP_ZSTD.
* PEER_CLOSED -- the client sent Close: it sends nothing more (section 6), so
  later bytes are ignored; the session can still send (the answering Close).
* ERRORED -- the stream lost framing (PROTOCOL.md section 3) or broke the
  login gate.  Later bytes are ignored and ``next_frame(s)`` raise the same
  error again (like a poisoned Decoder); sending still works, because the
  frames the core produced *before* the error (a Pong...) and then the
  Close(PROTOCOL_ERROR) must still go out, in that order.  Frames fully
  received before the bad bytes stay valid: ``next_frames()`` returns them
  first and raises on the following call.
* CLOSED -- the session sent its Close (``close()`` or ``send(Close)``).
  ``send`` raises :class:`SessionClosed`; a second ``close()`` returns
  ``b""`` (one Close per connection, as the glue always did); incoming bytes
  are ignored and ``next_frame(s)`` return nothing.

What bytes go out when
----------------------
These are exactly the bytes pimcore/net/server.py produced before the session
existed (``_enqueue``, ``_close_peer``, the OVERLOADED refusal):

* every frame is ``encode_frame(frame)``, the uncompressed frame;
* from the frame **after** a LoginAck whose ``caps`` include CAP_ZSTD, each
  frame is ``compressor(encode_frame(frame))`` -- FrameCompressor decides per
  frame (bodies under 48 bytes, or that do not shrink, go out unchanged).
  That LoginAck itself is never compressed.  The switch depends only on the
  LoginAck *sent*, not on the Login received;
* Close frames -- ``close()``, ``send(Close)`` and :func:`refuse_connection`
  -- are **never compressed**, even on a zstd connection (the glue always
  encoded them with plain ``encode_frame``; a compressed Close is valid too,
  but a client that is tearing down may have dropped its decompressor);
* incoming compressed frames are accepted from the first frame decoded after
  :meth:`ServerSession.login_accepted` with CAP_ZSTD in ``caps`` (the core
  enabled the decoder's decompression at that same point), never earlier,
  and never when the grant lacked CAP_ZSTD.

The zstd contexts are expensive (~100 KiB each, plus the prepared dictionary)
and hold no per-connection state, so sessions share them through a
:class:`Compression` (one per thread; the default is the calling thread's
shared one) which builds each lazily, the first time a session needs it: a
broker whose clients never ask for zstd never builds either.

Errors
------
* :class:`pimcore.errors.ProtocolError` (``code`` = MALFORMED_FRAME,
  FRAME_TOO_LARGE, UNSUPPORTED_VERSION, UNKNOWN_FRAME_TYPE, or
  UNEXPECTED_FRAME via :class:`UnexpectedFrame`) -- the peer's fault, from
  ``next_frame(s)`` only; close with ``CloseCode.PROTOCOL_ERROR``.
* :class:`SessionClosed` -- ``send`` after the session's Close: the owner's
  fault.  :class:`SessionStateError` -- other misuse (``login_accepted``
  without a pending login).
* :class:`pimcore.errors.EncodeError` -- ``send`` of something that is not a
  valid frame (the session's state is unchanged).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import Any, Callable, Iterable, Optional, Union

from . import codec as _active_codec
from . import frames as F
from .errors import CloseCode, ErrorCode, FrameTooLarge, PimError, ProtocolError

__all__ = [
    "SessionState",
    "SessionStatistics",
    "SessionStateError",
    "SessionClosed",
    "UnexpectedFrame",
    "Compression",
    "ServerSession",
    "PRE_LOGIN_MAX_FRAME",
    "encode_close",
    "refuse_connection",
]

#: ``compress(encoded_frame) -> bytes``: FrameCompressor.compress or alike.
Compress = Callable[[bytes], bytes]
#: ``decompress(body, max_size) -> bytes``: a FrameDecompressor or alike.
Decompress = Callable[[bytes, int], bytes]

#: The largest frame a connection may send before its Login is granted
#: (bytes after the length prefix, as max_frame counts them), when the
#: session's ``max_frame_size`` is larger: the Login itself (a token, a
#: device id, a few integers) and Pings.  Without it, a client that never
#: logs in made the broker hold a partial frame of up to max_frame (1 MiB)
#: until login_timeout -- max_connections of them.  64 KiB is 8 times an
#: 8 KiB token (a JWT with many claims, a custom authenticator's signed
#: blob), and a sixteenth of the default max_frame.  Over it, the frame is
#: refused from its length prefix alone (FRAME_TOO_LARGE, naming this
#: limit); from the Login's grant on, max_frame applies.
PRE_LOGIN_MAX_FRAME = 64 * 1024

_Login = F.Login
_LoginAck = F.LoginAck
_Ping = F.Ping
_Close = F.Close
_Push = F.Push
_CAP_ZSTD = F.CAP_ZSTD
_CAP_DEFLATE_DOWN = F.CAP_DEFLATE_DOWN
_CAP_DEFLATE_UP = F.CAP_DEFLATE_UP
_CAPS_COMPRESS = F.CAP_ZSTD | F.CAP_DEFLATE_DOWN


def _compress_mod() -> ModuleType:
    from . import compress  # zstandard/zlib: only when someone negotiates compression

    return compress


class SessionState(Enum):
    """Where a :class:`ServerSession` is (see the module docstring)."""

    AWAITING_LOGIN = 1
    LOGGING_IN = 2
    ACTIVE = 3
    PEER_CLOSED = 4
    ERRORED = 5
    CLOSED = 6


_S = SessionState


class SessionStateError(PimError, RuntimeError):
    """The owner asked for something the session's state forbids.  Never
    caused by the peer: a bug in the caller."""


class SessionClosed(SessionStateError):
    """``send`` after the session sent its Close (``close()`` or a Close frame)."""


class UnexpectedFrame(ProtocolError):
    """A frame other than Login, Ping or Close before Login.

    ``code`` is UNEXPECTED_FRAME; ``str(exc)`` is ``"<FrameClass> before
    Login"`` (the Close reason the core has always sent); ``frame`` is the
    refused frame."""

    def __init__(self, frame: object) -> None:
        super().__init__(ErrorCode.UNEXPECTED_FRAME, f"{type(frame).__name__} before Login")
        self.frame = frame

    def __reduce__(self):  # type: ignore[no-untyped-def]  # (pickling, like ProtocolError)
        return (type(self), (self.frame,))


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A snapshot of one session's counters (:meth:`ServerSession.statistics`)."""

    state: SessionState
    frames_in: int  #: frames handed to the owner by next_frame(s)
    frames_out: int  #: frames encoded by send/send_many/close (Close included)
    bytes_in: int  #: bytes passed to receive_data (ignored ones included)
    bytes_out: int  #: bytes returned by send/send_many/close
    frames_compressed: int  #: of frames_out, those that went out zstd-compressed
    compressing: bool  #: outgoing frames may be compressed (a LoginAck with CAP_ZSTD was sent)
    decompressing: bool  #: incoming compressed frames are accepted (login_accepted with CAP_ZSTD)
    buffered: int  #: bytes received and not yet decoded
    #: Pushes of one message over max_frame, sent as they are (the peer
    #: refuses them: see ServerSession.pushes_over_max_frame).
    pushes_over_max_frame: int


class Compression:
    """The zstd contexts that sessions share: a compressor for what they send,
    a decompressor for what they receive.

    ``compressor`` is ``compress(encoded_frame) -> bytes`` (e.g.
    ``FrameCompressor(level=...).compress``; a FrameCompressor itself is
    accepted too), ``decompressor`` is ``decompress(body, max_size) -> bytes``
    raising ProtocolError (e.g. a FrameDecompressor).  Each that is None is
    built with the defaults (the shipped dictionary, level 3) the first time a
    session needs it.  Neither context is thread-safe: one Compression per
    thread, shared by every session of that thread (:meth:`for_thread`).
    """

    __slots__ = ("_compressor", "_decompressor")

    _local = threading.local()

    def __init__(self, compressor: Optional[object] = None, decompressor: Optional[Decompress] = None) -> None:
        if compressor is not None and not callable(compressor):
            compressor = getattr(compressor, "compress", None)
            if not callable(compressor):
                raise TypeError("compressor must be callable (e.g. FrameCompressor().compress)")
        if decompressor is not None and not callable(decompressor):
            raise TypeError("decompressor must be callable (e.g. FrameDecompressor())")
        self._compressor: Optional[Compress] = compressor  # type: ignore[assignment]
        self._decompressor: Optional[Decompress] = decompressor

    @classmethod
    def for_thread(cls) -> "Compression":
        """The calling thread's shared instance (made on first use)."""
        inst = getattr(cls._local, "inst", None)
        if inst is None:
            inst = cls._local.inst = cls()
        return inst

    def compressor(self) -> Compress:
        """The compress callable (built now if it was not given)."""
        if self._compressor is None:
            from .compress import FrameCompressor  # zstandard: only when someone negotiates zstd

            self._compressor = FrameCompressor().compress
        return self._compressor

    def decompressor(self) -> Decompress:
        """The decompress callable (built now if it was not given)."""
        if self._decompressor is None:
            from .compress import FrameDecompressor

            self._decompressor = FrameDecompressor()
        return self._decompressor


def encode_close(code: Union[CloseCode, int], reason: str, *, backend: Optional[ModuleType] = None) -> bytes:
    """The wire bytes of ``Close(code, reason)``, uncompressed, for a
    connection without a session.  Raises EncodeError for a code out of range
    or a reason that is not valid text."""
    return (backend or _active_codec).encode_frame(_Close(code, reason))


def refuse_connection(reason: str = "too many connections", *, backend: Optional[ModuleType] = None) -> bytes:
    """``Close(OVERLOADED, reason)``: what a broker at its connection limit
    writes to a new connection before hanging up (no session is made)."""
    return encode_close(CloseCode.OVERLOADED, reason, backend=backend)


class ServerSession:
    """The broker's side of one connection's wire protocol (module docstring).

    ``max_frame_size`` (bytes, >= 2) bounds one incoming frame as it is on the
    wire, and the decompressed body of a compressed one (minus its 2-byte
    head); the broker passes ``Limits.max_frame``.  Until the Login is
    granted (:meth:`login_accepted`) an incoming frame is held to
    ``min(max_frame_size, PRE_LOGIN_MAX_FRAME)`` instead, and one over it is
    FRAME_TOO_LARGE naming the pre-login limit.  ``compression`` supplies
    the shared zstd contexts (default: :meth:`Compression.for_thread`).
    ``backend`` is the codec module (``Decoder``, ``encode_frame``,
    ``encode_frames``): the active :mod:`pimcore.codec` by default, a
    ``pimcore._backend.load(...)`` module in tests.  Raises ValueError for an
    invalid ``max_frame_size``.
    """

    __slots__ = (
        "_state", "_decoder", "_feed", "_next", "_accepting", "_error", "_encode", "_encode_many", "_compression",
        "_compress", "_deflate", "_can_send", "_frames_in", "_frames_out", "_bytes_in", "_bytes_out", "_frames_compressed",
        "pushes_over_max_frame", "last_over_max_frame", "_max_frame",
    )

    def __init__(
        self,
        max_frame_size: int = _active_codec.DEFAULT_MAX_FRAME_SIZE,
        *,
        compression: Optional[Compression] = None,
        backend: Optional[ModuleType] = None,
    ) -> None:
        impl = backend or _active_codec
        self._decoder = impl.Decoder(max_frame_size)  # (validates it)
        self._max_frame: int = self._decoder.max_frame_size
        if self._max_frame > PRE_LOGIN_MAX_FRAME:
            # Until login_accepted: PRE_LOGIN_MAX_FRAME (the decoder's limit
            # can only be raised, which login_accepted does).
            self._decoder = impl.Decoder(PRE_LOGIN_MAX_FRAME)
        # Bound methods, looked up once: these run per chunk and per frame.
        self._feed = self._decoder.feed
        self._next = self._decoder.next_frame
        self._encode: Callable[[object], bytes] = impl.encode_frame
        self._encode_many: Callable[[Iterable[object]], bytes] = impl.encode_frames
        self._compression = compression if compression is not None else Compression.for_thread()
        self._state = _S.AWAITING_LOGIN
        # Derived from _state, kept as plain attributes for the hot paths:
        self._accepting = True  # receive_data buffers (else ignores)
        self._can_send = True  # send() allowed (False only once CLOSED)
        self._compress: Optional[Compress] = None  # set by the LoginAck granting CAP_ZSTD or CAP_DEFLATE_DOWN
        self._deflate: Optional[Any] = None  # this connection's DeflateCompressor (CAP_DEFLATE_DOWN)
        self._error: Optional[ProtocolError] = None  # ERRORED: raised again by next_frame(s)
        self._frames_in = self._frames_out = self._bytes_in = self._bytes_out = self._frames_compressed = 0
        #: Pushes of one message whose encoding is over max_frame, sent as
        #: they are (one message cannot be split): the peer refuses each
        #: (FRAME_TOO_LARGE) and its inbox is stuck behind it.  Only a
        #: message stored under larger limits gets here (Limits holds
        #: max_payload plus message_overhead within max_frame): the owner
        #: reads this to say so (Broker: PushOverMaxFrame).
        self.pushes_over_max_frame = 0
        #: Bytes of the last such Push, encoded (before compression).
        self.last_over_max_frame = 0

    # ------------------------------------------------------------ introspection

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def closed(self) -> bool:
        """True once the session sent its Close: ``send`` would raise."""
        return not self._can_send

    @property
    def compressing(self) -> bool:
        """Outgoing frames go through the compressor (a LoginAck with CAP_ZSTD was sent)."""
        return self._compress is not None

    @property
    def decompressing(self) -> bool:
        """Incoming compressed frames are accepted (login granted CAP_ZSTD)."""
        return self._decoder.decompress is not None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as frames (about one frame plus
        one read at most while frames are being pulled; unbounded while
        LOGGING_IN holds them: see the module docstring)."""
        return self._decoder.buffered  # type: ignore[no-any-return]

    @property
    def max_frame_size(self) -> int:
        """The limit of a frame each way once the Login is granted (before
        that, incoming frames are held to ``min(max_frame_size,
        PRE_LOGIN_MAX_FRAME)``)."""
        return self._max_frame

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            state=self._state,
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            frames_compressed=self._frames_compressed,
            pushes_over_max_frame=self.pushes_over_max_frame,
            compressing=self._compress is not None,
            decompressing=self._decoder.decompress is not None,
            buffered=self._decoder.buffered,
        )

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Bytes read from the connection, split anywhere (copied; cheap: no
        decoding happens here).  Ignored once the peer closed, the stream
        broke or the session closed.  ``b""`` is a no-op: end of stream is the
        owner's business (the core's ``connection_lost``).  Raises TypeError
        for anything but bytes, bytearray or a C-contiguous memoryview."""
        self._bytes_in += len(data)
        if self._accepting:
            self._feed(data)

    def next_frames(self) -> list[F.Frame]:
        """Every frame decodable now, in order; ``[]`` when more bytes are
        needed (or none are wanted: LOGGING_IN, PEER_CLOSED, CLOSED).

        The hot path: call it until it returns ``[]``.  A batch ends early
        after a Login (nothing more is decoded until the login's outcome is
        known) and after a Close (nothing more is read).  Raises ProtocolError
        (:class:`UnexpectedFrame` for a frame before Login) when the bytes
        are bad; frames that came complete before the bad bytes are returned
        first, and the error is raised by the next call (and every later one).
        """
        if self._state is not _S.ACTIVE:
            return self._next_frames_slow()
        out: list[F.Frame] = []
        append = out.append
        nxt = self._next
        try:
            # Why the loop is here and not list(decoder): an error must not
            # lose the frames decoded before it (PROTOCOL.md section 3).
            while (frame := nxt()) is not None:
                append(frame)
                if type(frame) is _Close:
                    self._peer_closed()
                    break
        except ProtocolError as exc:
            self._fail(exc)
            if not out:
                raise
        self._frames_in += len(out)
        return out

    def _next_frames_slow(self) -> list[F.Frame]:
        # AWAITING_LOGIN: frame by frame through the login gate, until a Login
        # (LOGGING_IN) or a Close (PEER_CLOSED) ends the batch.  Every other
        # state yields nothing or raises its error at once.
        out: list[F.Frame] = []
        try:
            while (frame := self.next_frame()) is not None:
                out.append(frame)
                if self._state is not _S.AWAITING_LOGIN:
                    break
        except ProtocolError:
            if not out:
                raise
            # now ERRORED: the next call raises it
        return out

    def next_frame(self) -> Optional[F.Frame]:
        """The next decodable frame, or None (as :meth:`next_frames`, one at
        a time).  Raises ProtocolError (the same one again once ERRORED)."""
        state = self._state
        if state is _S.ACTIVE:
            frame = self._decode()
            if frame is None:
                return None
            if type(frame) is _Close:
                self._peer_closed()
            self._frames_in += 1
            return frame  # type: ignore[no-any-return]
        if state is _S.AWAITING_LOGIN:
            frame = self._decode()
            if frame is None:
                return None
            # The login gate (PROTOCOL.md section 6): nothing a client sends
            # may reach the core's request handlers before its token is checked.
            t = type(frame)
            if t is _Login:
                # Stop decoding: whether the next frame may be compressed is
                # decided by login_accepted() (see LOGGING_IN).
                self._state = _S.LOGGING_IN
            elif t is _Close:
                self._peer_closed()
            elif t is not _Ping:
                refused = UnexpectedFrame(frame)
                self._fail(refused)
                raise refused
            self._frames_in += 1
            return frame  # type: ignore[no-any-return]
        if state is _S.ERRORED:
            assert self._error is not None
            raise self._error.with_traceback(None)
        return None  # LOGGING_IN, PEER_CLOSED, CLOSED

    def _decode(self) -> Optional[F.Frame]:
        """The decoder's next frame; a ProtocolError poisons the session."""
        try:
            return self._next()  # type: ignore[no-any-return]
        except FrameTooLarge as exc:
            limit = self._decoder.max_frame_size
            if limit < self._max_frame:
                # The pre-login limit, not max_frame: say which.
                m = re.match(r"frame length (\d+) exceeds", str(exc))
                exc = FrameTooLarge(
                    f"frame length {m[1] if m else 'over it'} exceeds the pre-login limit {limit} (a frame before"
                    f" the Login is granted; max_frame {self._max_frame} applies after)")
            self._fail(exc)
            raise exc from None
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def login_accepted(self, caps: int) -> None:
        """The owner granted the Login, with ``caps`` (the capabilities the
        LoginAck will carry: the client's asked-for caps & the broker's).

        With CAP_ZSTD, compressed incoming frames are accepted from the very
        next frame decoded, including bytes already buffered.  Outgoing
        compression starts independently, after the LoginAck is *sent*
        (:meth:`send`).  Valid in LOGGING_IN, and in AWAITING_LOGIN for an
        owner that took the Login from elsewhere (``Broker.receive_frame``);
        raises :class:`SessionStateError` otherwise."""
        if self._state is not _S.LOGGING_IN and self._state is not _S.AWAITING_LOGIN:
            raise SessionStateError(f"login_accepted() in state {self._state.name}: no login is pending")
        self._decoder.raise_max_frame_size(self._max_frame)  # (from PRE_LOGIN_MAX_FRAME)
        if caps & _CAP_DEFLATE_UP:
            # Per connection: the stream carries state from frame to frame.
            self._decoder.enable_decompression(_compress_mod().DeflateDecompressor(_compress_mod().DEFLATE_WINDOW_BITS_UP))
        elif caps & _CAP_ZSTD:
            self._decoder.enable_decompression(self._compression.decompressor())
        self._state = _S.ACTIVE

    def _peer_closed(self) -> None:
        # The client's Close is its last frame (section 6): stop reading, keep
        # sending (the answering Close).
        self._state = _S.PEER_CLOSED
        self._accepting = False

    def _fail(self, exc: ProtocolError) -> None:
        # Framing is lost: nothing later in the stream can be trusted, but
        # what the owner already produced, then the Close, must still go out.
        self._state = _S.ERRORED
        self._error = exc
        self._accepting = False

    # ------------------------------------------------------------ sending

    def send(self, frame: F.Frame) -> bytes:
        """The wire bytes of ``frame`` (compressed when negotiated).

        A LoginAck with CAP_ZSTD in ``caps`` turns compression on for the
        frames after it; a Close frame is sent as :meth:`close` sends it
        (uncompressed) and closes the session.  Raises :class:`SessionClosed`
        after the session's Close, EncodeError (state unchanged) for anything
        that is not a valid frame."""
        if not self._can_send:
            raise SessionClosed(f"cannot send {type(frame).__name__}: the session was closed")
        t = type(frame)
        if t is _Close:
            return self._send_close(frame)  # type: ignore[arg-type]
        data = self._encode(frame)
        if len(data) > self._max_frame and t is _Push:
            return self.send_many(self._pushes_within(frame))  # type: ignore[arg-type]
        compress = self._compress
        if compress is not None:
            out = compress(data)
            if out is not data:
                self._frames_compressed += 1
            data = out
        elif t is _LoginAck and frame.caps & _CAPS_COMPRESS:  # type: ignore[union-attr]
            # Granted: the client decompresses from the frame after this one
            # (section 7), so this LoginAck itself goes out as it is.
            self._compress = self._compressor_for(frame.caps)  # type: ignore[union-attr]
        self._frames_out += 1
        self._bytes_out += len(data)
        return data

    def send_many(self, frames: Iterable[F.Frame]) -> bytes:
        """The concatenated wire bytes of ``frames``, exactly as ``send`` of
        each in turn would give them (one write for several frames).  Without
        compression and without a LoginAck or Close among them, it is a single
        ``encode_frames`` call.  All or nothing: if a frame cannot be encoded
        (EncodeError), or the batch goes on after a Close
        (:class:`SessionClosed`), nothing is sent and the state is unchanged."""
        if not self._can_send:
            raise SessionClosed("cannot send: the session was closed")
        frames = frames if isinstance(frames, (list, tuple)) else list(frames)
        kinds = set(map(type, frames))  # one C-level pass (a batch's SendAcks: one kind)
        if _LoginAck in kinds or _Close in kinds:
            return self._send_many_slow(frames)
        compress = self._compress
        limit = self._max_frame
        if compress is None:
            data = self._encode_many(frames)
            if len(data) > limit and _Push in kinds:
                # (The batch is over max_frame: a Push in it may be.  Only
                # then encoded again, and without the first encoding alive.)
                within = self._within(frames)
                if within is not frames:
                    del data
                    frames = within
                    data = self._encode_many(frames)
        else:
            encode = self._encode
            parts = [encode(f) for f in frames]  # all encoded before anything is counted
            if _Push in kinds and any(len(raw) > limit for raw in parts):
                frames = self._within(frames)  # (rare: a Push over max_frame)
                parts = [encode(f) for f in frames]
            n = 0
            for i, raw in enumerate(parts):
                out = compress(raw)
                if out is not raw:
                    parts[i] = out
                    n += 1
            self._frames_compressed += n
            data = b"".join(parts)
        self._frames_out += len(frames)
        self._bytes_out += len(data)
        return data

    def _send_many_slow(self, frames: "list[F.Frame] | tuple[F.Frame, ...]") -> bytes:
        # A LoginAck or Close changes the state mid-batch: encode everything
        # first (so an EncodeError changes nothing), then apply each frame's
        # effect in order, exactly as send() would.
        encode = self._encode
        frames = self._within(frames)
        raws = [encode(f) for f in frames]
        for i, f in enumerate(frames):
            if type(f) is _Close and i != len(frames) - 1:
                raise SessionClosed(f"send_many(): {type(frames[i + 1]).__name__} after a Close")
        compress = self._compress
        parts: list[bytes] = []
        n = 0
        for f, raw in zip(frames, raws):
            t = type(f)
            if t is _Close:
                parts.append(raw)  # never compressed (see close())
                self._closed_now()
            elif compress is not None:
                out = compress(raw)
                n += out is not raw
                parts.append(out)
            else:
                parts.append(raw)
                if t is _LoginAck and f.caps & _CAPS_COMPRESS:  # type: ignore[union-attr]
                    compress = self._compress = self._compressor_for(f.caps)  # type: ignore[union-attr]
        data = b"".join(parts)
        self._frames_compressed += n
        self._frames_out += len(frames)
        self._bytes_out += len(data)
        return data

    def _within(self, frames: "list[F.Frame] | tuple[F.Frame, ...]") -> "list[F.Frame] | tuple[F.Frame, ...]":
        """``frames`` with every Push whose encoding is over max_frame split
        into Pushes within it (:meth:`_pushes_within`); the same sequence
        when none is."""
        out: list[F.Frame] = []
        for f in frames:
            if type(f) is _Push:
                out.extend(self._pushes_within(f))  # type: ignore[arg-type]
            else:
                out.append(f)
        return frames if len(out) == len(frames) else out

    def _pushes_within(self, push: F.Push) -> list[F.Push]:
        """``push`` as consecutive Pushes each within max_frame (bytes on the
        wire, before compression: see DeflateCompressor's ``max_frame`` for
        after).  Why: the core sizes a Push by its payloads plus a fixed
        estimate per message, and a peer refuses a frame over max_frame
        (FRAME_TOO_LARGE) -- then every reconnect got the same Push and the
        device never received again.  Split in halves: the first covers up
        to its last message's position, the last up to ``push.position``,
        so a cumulative PushAck of either is true.  A Push of one message
        over the limit stays as it is, counted in
        :attr:`pushes_over_max_frame` (a message stored under larger
        limits: Limits keeps a new one within max_frame)."""
        msgs = push.messages
        size = len(self._encode(push))
        if size <= self._max_frame:
            return [push]
        if len(msgs) < 2:
            self.pushes_over_max_frame += 1
            self.last_over_max_frame = size
            return [push]
        k = len(msgs) // 2
        return (self._pushes_within(_Push(msgs[k - 1].position, msgs[:k]))
                + self._pushes_within(_Push(push.position, msgs[k:])))

    def _compressor_for(self, caps: int) -> Compress:
        # CAP_DEFLATE_DOWN wins over CAP_ZSTD (section 7): a deflate stream is
        # this connection's own, the zstd compressor the thread's shared one.
        if caps & _CAP_DEFLATE_DOWN:
            mod = _compress_mod()
            self._deflate = mod.DeflateCompressor(mod.DEFLATE_BROKER_WINDOW_BITS, max_frame=self.max_frame_size)
            return self._deflate.compress  # type: ignore[no-any-return]
        return self._compression.compressor()

    @property
    def compression_activity(self) -> int:
        """Frames that went through this connection's deflate streams so far,
        both directions: unchanged between two looks means the streams were
        idle in between (Pings and acks, below the threshold, do not count)."""
        n = 0 if self._deflate is None else self._deflate.statistics().compressed
        d = self._decoder.decompress
        return n + getattr(d, "frames", 0)  # type: ignore[no-any-return]

    def hibernate(self) -> int:
        """Release the zlib state of this connection's deflate streams while
        it is idle, keeping only each stream's last window of bytes (≤ 2 KiB
        each at the broker's windows); they come back by themselves at the
        next compressed frame, with nothing on the wire (PROTOCOL.md 7.2,
        "Memory").  Returns the bytes held afterwards.  Harmless to call at
        any time; a no-op for zstd or plain connections."""
        if self._deflate is not None:
            self._deflate.release()
        d = self._decoder.decompress
        if d is not None and hasattr(d, "release"):
            d.release()
        return self.compression_state_size()

    def compression_state_size(self) -> int:
        """Bytes of compression state this connection holds on its own (its
        deflate streams; 0 for zstd, whose contexts the thread shares)."""
        n = 0 if self._deflate is None else self._deflate.state_size()
        d = self._decoder.decompress
        if d is not None and hasattr(d, "state_size") and d is not self._compression._decompressor:
            n += d.state_size()
        return n  # type: ignore[no-any-return]

    def close(self, code: Union[CloseCode, int], reason: str) -> bytes:
        """The bytes of ``Close(code, reason)``, to write before hanging up;
        the session is then CLOSED.  The Close is never compressed.  Valid in
        every state (after a protocol error too); once CLOSED it returns
        ``b""``: a connection gets one Close.  Raises EncodeError (state
        unchanged) for a code out of range or a reason that is not valid text."""
        if not self._can_send:
            return b""
        return self._send_close(_Close(code, reason))

    def _send_close(self, frame: F.Close) -> bytes:
        # Uncompressed even on a zstd connection: the glue always wrote
        # encode_frame(Close(...)), and those are the bytes clients expect.
        data = self._encode(frame)
        self._closed_now()
        self._frames_out += 1
        self._bytes_out += len(data)
        return data

    def _closed_now(self) -> None:
        self._state = _S.CLOSED
        self._can_send = False
        self._accepting = False

    def __repr__(self) -> str:
        z = "plain" if self._compress is None else "deflate" if self._deflate is not None else "zstd"
        return f"<ServerSession {self._state.name} {z} in={self._frames_in} out={self._frames_out}>"
