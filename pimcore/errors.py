"""Error codes, close reasons and exception types shared by every layer.

The numeric values are part of the wire protocol (docs/PROTOCOL.md): they travel
in SendAck.code, HistoryResp.code, Error.code and Close.code.  Never renumber.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Optional

__all__ = [
    "ErrorCode",
    "CloseCode",
    "PimError",
    "ProtocolError",
    "FrameTooLarge",
    "EncodeError",
    "StoreError",
    "StoreInUse",
    "AuthError",
    "BackendChoiceError",
    "BrokerStopped",
]


class ErrorCode(IntEnum):
    """Why a request failed.  0 means success (used in SendAck.code)."""

    OK = 0
    # -- framing / protocol (the connection cannot continue) --
    MALFORMED_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    UNKNOWN_FRAME_TYPE = 4
    UNEXPECTED_FRAME = 5
    # -- authentication --
    AUTH_FAILED = 10
    # -- per-request (the connection stays open) --
    BAD_REQUEST = 20
    UNKNOWN_CONVERSATION = 21
    NOT_MEMBER = 22
    PAYLOAD_TOO_LARGE = 23
    DUPLICATE_CONFLICT = 24
    TOO_MANY_IN_FLIGHT = 25
    RATE_LIMITED = 26
    REJECTED = 27
    ALREADY_EXISTS = 28  # group admin: the group id is taken
    # -- mentions and the conversation list (issue 14b) --
    TOO_MANY_MENTIONS = 45  # SendReq.mentions longer than Limits.max_mentions
    BAD_MENTION = 46  # a SendReq.mentions entry is not a valid user id
    BAD_CURSOR = 47  # ConvListReq.cursor is not one the broker gave
    # -- typing and presence (issue 14 part 3) --
    PRESENCE_LIMIT = 48  # a PresenceSub names more users than the broker allows
    TYPING_NOT_RELAYED = 49  # typing is not relayed in this conversation (too many members)
    # -- purges --
    #: A group send whose SendReq.after_seq is at or below the group's purge
    #: point: it answers history that was purged (the group was deleted,
    #: perhaps created again with the id since, with other members).  Not
    #: stored.  Sent only to clients that ask Login.caps CAP_CONV_PURGED;
    #: others get REJECTED.
    PURGED = 50
    # -- server side; the client should retry later with the same local id --
    STORE_UNAVAILABLE = 30
    INTERNAL = 31
    # Recall, edit, delete (AmendReq; issue 14 part 1).
    NO_SUCH_MESSAGE = 40  # the target seq is not a message the user may see in the conversation
    NOT_SENDER = 41  # only the message's sender (or the host) may recall or edit it
    TOO_LATE = 42  # the time window for this action has passed
    RECALLED = 43  # the message was recalled: nothing left to edit or recall
    BAD_ACTION = 44  # AmendReq.action is not RECALL, EDIT or DELETE


class CloseCode(IntEnum):
    """Why a connection was closed (sent in the Close frame before hanging up)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    AUTH_FAILED = 2
    LOGIN_TIMEOUT = 3
    IDLE_TIMEOUT = 4
    REPLACED = 5
    SLOW_CONSUMER = 6
    RATE_LIMITED = 7
    SHUTDOWN = 8
    INTERNAL = 9
    OVERLOADED = 10  # the broker refuses more connections
    TOKEN_EXPIRED = 11  # the session outlived its token: log in again with a fresh one
    KICKED = 12  # the host ended this session (Pimcore.kick): do not log in again on your own
    TOKEN_REVOKED = 13  # the token was revoked by the host (Pimcore.revoke): get a new one


class PimError(Exception):
    """Base class of every error pimcore raises on purpose."""


class ProtocolError(PimError):
    """Bytes that are not a valid frame.

    Raised by the decoder of both backends with the same ``code`` for the same
    input.  After it, the decoder is poisoned: the stream has lost framing and
    the connection must be closed with ``CloseCode.PROTOCOL_ERROR``.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)

    def __reduce__(self):  # keep pickling (multiprocessing, hypothesis) working
        return (type(self), (self.code, str(self)))


class FrameTooLarge(ProtocolError):
    """A frame's declared length exceeds the decoder's ``max_frame_size``."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.FRAME_TOO_LARGE) -> None:
        super().__init__(code, message)

    def __reduce__(self):
        return (type(self), (str(self),))


class EncodeError(PimError, ValueError):
    """A frame field cannot be encoded (wrong type or out of range)."""


class StoreError(PimError):
    """The store could not complete an operation (disk full, corrupt, closed).

    ``cause``: why, in words without file system paths, when the store
    knows ("no space left on the data directory's file system: free space
    there ..."): what the HTTP API's 503 says, where the message (logged
    for the operator) names the data directory.  ``transient``: the same
    operation may succeed later without a change of settings or files (a
    full disk once space is freed): ``pimcore serve`` then exits 1, not 2."""

    def __init__(self, *args: object, cause: Optional[str] = None, transient: bool = False) -> None:
        super().__init__(*args)
        self.cause = cause
        self.transient = transient


class StoreInUse(StoreError):
    """Another owner (a broker, or a program with the store open as owner)
    holds the store's ``broker.lock``: one owner per store.  ``path`` is the
    store's directory; ``holder`` says who in words ("process 123 (pimcore
    serve)", or "another process" if it did not say)."""

    def __init__(self, message: str, path: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


class AuthError(PimError):
    """A token was rejected (forged, expired, malformed)."""


class BrokerStopped(PimError, RuntimeError):
    """The embedded broker has stopped (the ``open_pimcore`` block exited,
    or the threaded handle was closed or its thread ended, the error chained
    as ``__cause__``): a call made after that, or in flight when it happened,
    fails with this at once.  A write in flight may or may not have been
    stored: retry it with the same idempotency key once a broker runs
    again."""


class BackendChoiceError(ImportError):
    """``PIMCORE_BACKEND`` names no fast-path backend: raised importing
    :mod:`pimcore._backend` (the ``pimcore`` command says so in one line)."""
