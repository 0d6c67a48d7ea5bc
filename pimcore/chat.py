"""``pimcore chat``: a small interactive terminal chat on the client SDK.

Two terminals, two users::

    pimcore chat --token "$(pimcore token --user alice)" --to bob
    pimcore chat --token "$(pimcore token --user bob)" --to alice

Each line typed is sent to the peer.  Under your own messages the chat shows
their state as it advances:

* ``… sending``   -- on its way, not yet acknowledged (retried if needed);
* ``✓ sent``      -- the broker made it durable in the peer's inbox, so
  every device of the peer will get it, online now or later;
* ``✓✓ read``     -- the peer's read receipt covers it.

A line typed is echoed at once (``… sending``); its ``✓ sent (#N)`` is its
place in the conversation.  The conversation (the peer's messages, notices,
edits, your ``✓ sent (#N)``; a ``✓✓ read`` right after the #N it reaches) is
said in seq order, the broker's: a terminal
cannot move a printed line, and entries arrive out of that order (an ack
before the Push of the entry before it, a peer's later message before the
ack), so one is held until those before it are said -- at most
SEQ_GAP_WAIT (1 s), then a missing one is said where it arrives, if ever.
Seq order never puts a reply above what it answers and is the same on every
device; it is the display order (``/history``) unless a sender's devices'
clocks disagree, which only ``/history`` can show, by reprinting.  The
outcome of each line (``✓ sent (#N)``, ``✗ not sent``...) is said in the
order the lines were typed, which is their seq order.

While the first connection is retried (a broker at max_connections, a
load balancer with no broker behind it yet), the chat says why an attempt
failed, once per reason, and that it retries until the connect timeout
(on stderr, under ``pimcore chat: connecting to ...``).

Incoming messages are marked read as they are shown; posts by the host or
the HTTP API (no sender) show as ``[system]``; your own messages show as
``me``, those sent from another of your devices as ``me (phone)`` (at
start, as they come and by /history alike).  ``/history`` prints
the conversation again in display order (with times), ``/quit`` (or end of input) leaves.
``/edit N text`` replaces your message #N, ``/recall N`` recalls it for
everyone, ``/delete N`` deletes #N for you only; edits and recalls (yours
from other devices, and the peer's) are shown as they come, and history
marks messages ``(edited)``, ``(recalled)`` or ``(deleted)``.  ``/help``
lists the commands.  Any other line that starts with ``/`` is refused as an
unknown command (a typo must not reach the peer): to send a line that
starts with ``/``, type ``//`` (``//shrug`` sends ``/shrug``).  A line that
is not UTF-8 text (the terminal's encoding is another) is refused, not
sent mangled; a very long line is shown cut, with its length.  A terminal
keeps at most TTY_LINE_LIMIT (4,095) bytes of a typed line and drops the
rest unseen: a line typed at a terminal that reaches the limit is refused
as cut, not sent; longer text is piped in (``pimcore chat ... < FILE``,
each line one message).

Typing and presence: ``… bob is typing`` shows when another member starts
typing (the indicator is ephemeral: it expires by itself).  A terminal
reads whole lines, so the chat cannot see keystrokes: ``/typing`` tells
the others you are typing (a line you then send ends it for them).  In a
1:1 chat the peer's presence is shown as it changes (``— bob is online``,
``— bob is offline (last seen 14:02:11)``, no time if bob hides it).

``--group NAME`` chats in a group instead (``pimcore group create NAME
alice bob ...`` makes one; a group that does not exist is refused, exit 2);
groups have no read receipts.  A refused token, or a broker certificate
not trusted, or a URL at the wrong kind of port (another service's, the
HTTP API's, TLS or not, a WebSocket path not served) also exits 2 (refused
as given), as does a chat ended by its token expiring or being revoked (a
new token is needed); a broker that cannot be reached exits 1 (docs/OPERATIONS.md, Exit codes).  A user who is not a member of the group now
is told so at the start, under the ``connected as`` line, with the ``pimcore
group add`` that lets them in: what they type is refused until then, and
once added the chat shows the group's messages.

Text from others is shown, never obeyed: every line the chat prints has its
control characters and bidi controls replaced by visible escapes, so that a
peer cannot forge a line (a newline followed by ``[17:30:00] me: ...``),
retitle or clear the terminal, colour it, or reverse text.  ``\\n``, ``\\r``
and ``\\t`` stand for a newline, carriage return and tab; ``\\xHH`` for any other
C0 control, DEL and the C1 controls U+0080..U+009F (``\\x1b`` is ESC);
``\\uHHHH`` for the bidi controls U+061C, U+200E, U+200F, U+202A..U+202E,
U+2066..U+2069, the line/paragraph separators U+2028, U+2029, and
every other invisible format character (Unicode category Cf: zero-width
spaces, the soft hyphen, U+FEFF, tags...) but U+200D, the zero-width joiner
of emoji sequences (``\\UXXXXXXXX`` above U+FFFF).  A user whose id is
``me`` shows as ``user:me``, not as you.  A multi-line message thus shows on
one line, its line breaks as ``\\n``.  A backslash typed as such is shown as is.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
import sys
import unicodedata
from datetime import datetime
from typing import Callable, Optional, TextIO

import trio

from . import frames as F
from .client import (
    AuthFailed,
    ClientClosed,
    ClientConfig,
    ClientError,
    Connected,
    ConnectFailed,
    Disconnected,
    MessageAmended,
    MessageReceived,
    PresenceChanged,
    ReceiptReceived,
    BrokerRefused,
    TypingChanged,
    SendError,
    SendTimeout,
    open_client,
)
from .errors import CloseCode
from .ids import _show, direct_conversation, group_problem, id_problem, id_rule, valid_group, valid_id
from .net.streams import parse_url

__all__ = ["run_chat", "chat", "ChatRefused", "ChatEnded"]


#: The device of a chat given no --device and a token bound to none.
DEFAULT_DEVICE = "terminal"

#: Seconds an "offline" of the peer is held after a reconnect when the chat
#: showed them online: a restarted broker cannot know who was online before
#: it, so the first of two chats back is told the other offline until that
#: one logs in again too -- within its reconnect delay (at most the SDK's
#: backoff_max, 10 s).  Back within it: no change is said; not back: said
#: offline then.
PRESENCE_GRACE = 12.0

#: Seconds at most the chat holds an entry (a message, a notice, a line's
#: "✓ sent (#N)") while an entry before it in seq order is not known yet:
#: the transcript is said in seq order (see ``place`` in chat()).  The
#: missing one is nearly always on its way: a SendAck leaves the broker
#: before the Push of the batch that stored it (so #N-1 comes after our
#: #N's ack), and our own #N's ack may come after, or in the same read as,
#: the Push of another member's #N+1.  An entry this user never gets (a
#: send that timed out unanswered, one stored before an unseen join) would
#: hold the rest for ever: the wait is bounded, then the gap is skipped and
#: the entry, if it comes after all, is said where it arrives.
SEQ_GAP_WAIT = 1.0

#: Closes after which the client does not reconnect (docs/CLIENT.md): the
#: chat ends instead of saying "reconnecting…".
#: An expired token too: the SDK reconnects after it (a host hands it a
#: fresh token), but the chat has only the one it was given, which the
#: broker then refuses ("token has expired").
_FINAL_CLOSES = frozenset((CloseCode.AUTH_FAILED, CloseCode.TOKEN_REVOKED, CloseCode.TOKEN_EXPIRED, CloseCode.KICKED,
                           CloseCode.REPLACED))

#: Final closes that need a new token: the same one is refused on the next
#: run too, so they exit 2 (refused as given), as a refused first login does.
_TOKEN_CLOSES = frozenset((CloseCode.AUTH_FAILED, CloseCode.TOKEN_REVOKED, CloseCode.TOKEN_EXPIRED))


class ChatEnded(RuntimeError):
    """The broker closed the chat's connection for good (the same device
    logged in elsewhere, a kick, a revoked or expired token): the reason;
    ``code``, the close's CloseCode."""

    def __init__(self, reason: str, code: Optional[CloseCode] = None) -> None:
        super().__init__(reason)
        self.code = code


class ChatRefused(ValueError):
    """The chat cannot work as asked, found once connected (e.g. the peer is
    the user the broker logged us in as): a usage error, said in one line."""


#: Characters a terminal acts on rather than shows -- C0 controls (newline,
#: ESC...), DEL, the C1 controls, bidi controls and the Unicode line and
#: paragraph separators -- mapped to their visible escape (module docstring).
_UNSAFE = {c: ("\\x%02x" % c if c < 0x100 else "\\u%04x" % c)
           for c in (*range(0x20), *range(0x7F, 0xA0), 0x61C, 0x200E, 0x200F,
                     *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)}
_UNSAFE.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
#: The categories shown escaped beyond _UNSAFE (see safe_text); a lone
#: surrogate (Cs) too: a terminal cannot show it.
_INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def _escape(c: str) -> str:
    n = ord(c)
    return "\\x%02x" % n if n < 0x100 else "\\u%04x" % n if n < 0x10000 else "\\U%08x" % n


def safe_text(text: str) -> str:
    """``text`` as one line a terminal only shows: its control characters,
    bidi controls and other invisible format characters replaced by visible
    escapes (``\\n``, ``\\x1b``, ``\\u202e``, ``\\u200b``...).  Format
    characters are Unicode's category Cf (zero-width spaces, the soft
    hyphen, U+FEFF, tags...) except U+200D, the zero-width joiner of emoji
    sequences."""
    text = text.translate(_UNSAFE)
    if text.isprintable():
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _INVISIBLE and c != "\u200d" else c for c in text)


def _safe_lines(out: Callable[[str], None]) -> Callable[[str], None]:
    """``out`` with every line passed through safe_text first."""
    return lambda line: out(safe_text(line))


def _notice(m: "F.Message") -> Optional[str]:
    """A membership entry as a notice line, None for a message."""
    if m.kind == F.MessageKind.JOINED:
        return f"— {m.sender} joined  (#{m.seq})"
    if m.kind == F.MessageKind.LEFT:
        return f"— {m.sender} left  (#{m.seq})"
    return None


def _text(m: "F.Message") -> str:
    """A message's text with its state: a tombstone for a recalled one."""
    if m.recalled:
        return "(recalled)"
    if m.deleted:
        return "(deleted)"
    return m.payload.decode("utf-8", "replace") + ("  (edited)" if m.edited else "")


def _amended(ev: MessageAmended, me: str) -> str:
    """A RECALL / EDIT / DELETE entry as a notice line."""
    e = ev.entry
    who = "you" if e.sender == me else (e.sender or "the system")
    if e.kind == F.MessageKind.RECALL:
        return f"— {who} recalled #{e.target}"
    if e.kind == F.MessageKind.EDIT:
        return f"— {who} edited #{e.target}: {e.payload.decode('utf-8', 'replace')}"
    return f"— you deleted #{e.target} (for you)"


def _who(m: "F.Message", me: str, device: str) -> str:
    """How a message's sender is shown: "me" for this device's (``device``),
    "me (phone)" for one sent from another of my devices (the same at start,
    live and by /history), "[system]" for a post by the host or the HTTP API
    (the empty sender), else the user id."""
    if m.sender == me:
        return "me" if m.device == device else f"me ({m.device})"
    if m.sender == "me":
        # Another user whose id is "me" must not look like you (ids cannot
        # hold ":", so "user:me" is no one else either).
        return "user:me"
    return m.sender or "[system]"


def _clock(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6).strftime("%H:%M:%S")


def _line(m: "F.Message", me: str, device: str) -> str:
    """How ``m`` shows in the conversation (at start, as it comes, by
    /history): its server time, sender, text and #seq, or its notice
    (JOINED...).  ``me`` and ``device``: who this chat is (see _who)."""
    return _notice(m) or f"[{_clock(m.server_time)}] {_who(m, me, device)}: {_text(m)}  (#{m.seq})"


async def chat(
    url: str,
    token: str,
    peer: Optional[str] = None,
    *,
    group: Optional[str] = None,
    device: str = DEFAULT_DEVICE,
    ssl_context: Optional[ssl.SSLContext] = None,
    lines: Optional[trio.abc.ReceiveChannel[str]] = None,
    out: Callable[[str], None] = print,
    progress: Optional[Callable[[str], None]] = None,
    tty: Optional[bool] = None,
) -> int:
    """Run the chat with ``peer`` or in ``group``; ``lines`` are the user's
    input lines (stdin if None).  ``progress`` takes the lines said while
    the first connection is retried (``out`` if None).  ``tty``: whether
    the lines are typed at a terminal, which cuts a line at TTY_LINE_LIMIT
    bytes (None: whether stdin is a terminal, when ``lines`` is None)."""
    if tty is None:
        tty = lines is None and sys.stdin.isatty()
    if (peer is None) == (group is None):
        raise ValueError("chat with a peer or in a group, not both")
    # Every line goes out through safe_text: message texts, edits, the
    # broker's reasons are others' text (module docstring).
    out = _safe_lines(out)
    note = out if progress is None else _safe_lines(progress)
    config = ClientConfig()
    failures: set[str] = set()

    def retrying(reason: str) -> None:
        # An attempt before the first login failed: open_client retries it
        # until connect_timeout.  Said once per reason, not per attempt.
        if reason not in failures:
            failures.add(reason)
            note(f"connect failed: {reason}; retrying until the connect timeout ({config.connect_timeout:g} s)…")

    async with open_client(url, token, device, config=config, ssl_context=ssl_context,
                           on_connect_retry=retrying) as client:
        if peer is not None and peer == client.user:
            # Only a JWT is read before connecting (run_chat): under another
            # authenticator the broker is the one who says who we are.
            raise ChatRefused(f"cannot chat with yourself: the broker logged this token in as {peer}"
                              " (--to names another user)")
        conv = direct_conversation(client.user, peer) if peer is not None else str(group)
        not_member = False

        def no_such_group() -> str:
            # The broker answers only a logged-in device, and a login
            # replaces the device's running session (PROTOCOL.md): learning
            # that the group does not exist ended a chat of the same device.
            return (f"group {group} does not exist: create it with pimcore group create {group} {client.user} [USER...]"
                    f" (finding out took a login as device {device}, which ended another chat of {client.user}"
                    f" on that device, if one was running: give each chat its own --device)")
        if group is not None:
            # Whether the group exists and we are a member now, said before
            # anything is typed (a refused send said it at the first line):
            # the readers of a group are asked of its current members only
            # (history is not: a former member still reads what they were
            # shown).  Not a member is a warning, not the end: added while
            # the chat runs, the user gets the group's messages from then on.
            try:
                await client.readers(conv)
            except SendError as exc:
                not_member = exc.code.name == "NOT_MEMBER"
                if exc.code.name == "UNKNOWN_CONVERSATION":
                    raise ChatRefused(no_such_group()) from None
            except (ClientError, trio.TooSlowError):
                pass  # (a send says it, as before)
        # The recent history (shown below, oldest first).
        try:
            await client.fetch_history(conv, 0, 20, backward=True)
        except SendError as exc:
            if group is not None and exc.code.name == "UNKNOWN_CONVERSATION":
                raise ChatRefused(no_such_group()) from None
        except ClientError:
            pass
        out(
            f"connected as {client.user} ({device}); chatting {'with ' + peer if peer else 'in ' + str(group)}."
            f" Clock offset {client.clock_offset / 1000:.1f} ms. /quit to leave, /history to reprint, /help for more"
        )
        if not_member:
            out(f"⚠ you ({client.user}) are not a member of group {group}: what you type is refused until a member"
                f" or the operator adds you (pimcore group add {group} {client.user}); this chat then shows the group")
        shown: set[bytes] = set()
        for m in client.view(conv):
            out(_line(m, client.user, device))
            shown.add(m.msg_id)
        last_shown = max((m.seq for m in client.view(conv)), default=0)
        if last_shown:
            await client.mark_read(conv, last_shown)
        if peer is not None:
            try:
                await client.subscribe_presence([peer])  # shown as PresenceChanged events below
            except (ClientError, trio.TooSlowError):
                pass
        typing_now: set[str] = set()  # users shown as typing (a refresh is not shown again)

        # The outcome of each line typed is said in the order the lines were
        # typed (= their seq order: one device's sends are stored in send
        # order): the acks of one read wake their send tasks at once, and
        # trio runs woken tasks in either order.  A line's outcome waits for
        # those of the lines typed before it.
        typed = 0  # lines sent so far: the next one's turn
        said = 0  # the turn whose outcome is said next
        outcomes: dict[int, tuple[int, list[str]]] = {}

        def say_in_turn(turn: int, lines: list[str], seq: int = 0) -> None:
            nonlocal said
            outcomes[turn] = (seq, lines)
            while said in outcomes:
                seq, lines = outcomes.pop(said)
                if seq:
                    place(seq, lines)
                else:
                    for line in lines:  # (a line not stored has no place: said now)
                        out(line)
                said += 1

        # The transcript.  A terminal cannot move a line once printed, and
        # entries reach the chat out of seq order: our "✓ sent (#N)" comes
        # with the SendAck, which may come before the Push of #N-1 (stored
        # in the same batch) or after that of another member's #N+1 (both
        # in one read; trio wakes the send and the event reader in either
        # order).  So every entry of conv -- others' messages, notices,
        # edits, our "✓ sent (#N)" -- is said in seq order: one whose
        # predecessor is not said yet is held until it is, at most
        # SEQ_GAP_WAIT.  Seq order never shows a reply above what it
        # answers (after_seq < seq), is the same on every device, and is
        # the SDK's display order whenever each sender's devices' clocks
        # agree with the broker's order; where they do not, later entries
        # could belong above printed lines: /history reprints the display
        # order.  What is typed is echoed at once ("… sending"), so holding
        # the "✓ sent" line costs the user nothing.
        next_seq = last_shown + 1  # the seq the transcript says next
        unsaid: dict[int, list[str]] = {}  # seq -> its lines, waiting for the ones before
        # "✓✓ read by peer (up to #N)" lines, said once #N is: a receipt can
        # come before the "✓ sent (#N)" it covers is said (the SendAck and
        # the receipt woken by one read, in either order -- seen in CI).
        receipts: list[tuple[int, str]] = []
        gap_timer = False  # a give_up_gap task runs

        def place(seq: int, lines: list[str]) -> None:
            if seq < next_seq:  # its gap was given up: said where it arrives
                for line in lines:
                    out(line)
                return
            unsaid[seq] = lines
            release()

        def release() -> None:
            nonlocal next_seq, gap_timer
            while next_seq in unsaid:
                for line in unsaid.pop(next_seq):
                    out(line)
                next_seq += 1
            if receipts and receipts[0][0] < next_seq:
                receipts.sort()
                while receipts and receipts[0][0] < next_seq:
                    out(receipts.pop(0)[1])
            if (unsaid or receipts) and not gap_timer:
                gap_timer = True
                nursery.start_soon(give_up_gap, next_seq)

        def skip_to(seq: int) -> None:
            # Entries before seq are not coming: say those held below it.
            nonlocal next_seq
            for s in sorted(s for s in unsaid if s < seq):
                for line in unsaid.pop(s):
                    out(line)
            next_seq = max(next_seq, seq)
            release()

        async def give_up_gap(gap: int) -> None:
            nonlocal gap_timer
            await trio.sleep(SEQ_GAP_WAIT)
            gap_timer = False
            if next_seq == gap and unsaid:
                skip_to(min(unsaid))
            elif next_seq == gap and receipts:
                skip_to(min(receipts)[0] + 1)  # (what it covers never came: said now)
            else:
                release()  # (filled meanwhile; a later gap gets its own wait)

        async def send(turn: int, text: str) -> None:
            lines: list[str] = []
            seq = 0  # (the place of its line in the transcript, once stored)
            try:
                sent = await client.send(conv, text.encode())
            except SendError as exc:
                # (The broker's reason, e.g. a content filter's, is what the user can act on.)
                lines.append(f"✗ not sent ({exc.code.name}{': ' + exc.reason if exc.reason else ''}): {_shown(text)}")
                if exc.code.name == "UNKNOWN_CONVERSATION" and group is not None:
                    lines.append(f"  (the group does not exist: pimcore group create {group} {client.user} [USER...])")
                elif exc.code.name == "NOT_MEMBER" and group is not None:
                    lines.append(f"  (you are not a member: pimcore group add {group} {client.user})")
            except SendTimeout:
                lines.append(f"✗ not confirmed in time (it may still arrive): {_shown(text)}")
            else:
                lines.append(f"✓ sent (#{sent.seq}): {_shown(text)}")
                seq = sent.seq
            finally:
                say_in_turn(turn, lines, seq)  # (cancelled: nothing to say, but the later lines' turn comes)

        async def amend(command: str, seq: int, text: str) -> None:
            try:
                # An edit's and a recall's entries have their seq: said in
                # the transcript's order like the others' (a delete's is 0).
                if command == "/edit":
                    done = await client.edit(conv, seq, text.encode())
                    place(done.seq, [f"✓ edited #{seq}: {_shown(text)}"])
                elif command == "/recall":
                    done = await client.recall(conv, seq)
                    place(done.seq, [f"✓ recalled #{seq}"])
                else:
                    await client.delete_for_me(conv, seq)
                    out(f"✓ deleted #{seq} (for you)")
            except SendError as exc:
                out(f"✗ {command[1:]} #{seq} refused ({exc.code.name}{': ' + exc.reason if exc.reason else ''})")
            except SendTimeout:
                out(f"✗ {command[1:]} #{seq} not confirmed in time (it may still happen)")

        reconnects: list[Connected] = []
        # The peer's presence as last said, and an "offline" held after a
        # reconnect (PRESENCE_GRACE): a state said again is not said twice.
        shown_presence: Optional[F.PresenceState] = None
        held: Optional[trio.CancelScope] = None
        renewed = False

        def say_presence(ev: PresenceChanged) -> None:
            nonlocal shown_presence
            if ev.state is shown_presence:
                return
            shown_presence = ev.state
            if ev.state is F.PresenceState.ONLINE:
                out(f"— {peer} is online")
            else:
                out(f"— {peer} is offline" + (f" (last seen {_clock(ev.last_seen)})" if ev.last_seen else ""))

        async def say_presence_later(scope: trio.CancelScope, ev: PresenceChanged) -> None:
            nonlocal held
            with scope:
                await trio.sleep(PRESENCE_GRACE)
                held = None
                say_presence(ev)

        async def events() -> None:
            nonlocal held, renewed
            async for ev in client.events():
                if isinstance(ev, MessageReceived) and ev.message.conv == conv:
                    m = ev.message
                    if m.msg_id in shown:  # already printed from the history
                        continue
                    shown.add(m.msg_id)
                    notice = _notice(m)
                    if notice is not None:
                        if m.kind == F.MessageKind.JOINED and m.sender == client.user:
                            skip_to(m.seq)  # (what the group said before we joined is not coming)
                        place(m.seq, [notice])
                        continue
                    if m.sender == client.user:  # sent from another of my devices ("me (phone)", as in history)
                        place(m.seq, [_line(m, client.user, device)])
                        continue
                    typing_now.discard(m.sender)  # their message ends their typing
                    place(m.seq, [_line(m, client.user, device)])
                    await client.mark_read(conv, m.seq)
                elif isinstance(ev, MessageAmended) and ev.entry.conv == conv:
                    place(ev.entry.seq, [_amended(ev, client.user)])
                elif isinstance(ev, TypingChanged) and ev.conv == conv:
                    if ev.active and ev.user not in typing_now:
                        typing_now.add(ev.user)
                        out(f"… {ev.user} is typing")
                    elif not ev.active:
                        typing_now.discard(ev.user)
                elif isinstance(ev, PresenceChanged) and ev.user == peer:
                    if ev.state is F.PresenceState.UNKNOWN:
                        continue  # (while disconnected: the state after the reconnect is what counts)
                    if held is not None:
                        held.cancel()  # the newer state decides
                        held = None
                    if ev.state is F.PresenceState.OFFLINE and renewed and shown_presence is F.PresenceState.ONLINE:
                        # The first answer after a reconnect: the peer may be
                        # reconnecting too (a broker restart): said if they
                        # are not back within the grace.
                        held = trio.CancelScope()
                        nursery.start_soon(say_presence_later, held, ev)
                    else:
                        say_presence(ev)
                    renewed = False
                elif isinstance(ev, ReceiptReceived) and ev.conv == conv and ev.reader == peer:
                    receipts.append((ev.seq, f"✓✓ read by {peer} (up to #{ev.seq})"))
                    release()  # (said once the transcript has said #seq)
                elif isinstance(ev, BrokerRefused):  # e.g. a read marker (it has no request id)
                    out(f"⚠ the broker refused a request ({ev.code.name}): {ev.reason}")
                elif isinstance(ev, Disconnected):
                    if not reconnects and ev.code not in _FINAL_CLOSES:
                        # An attempt of open_client's before the first login
                        # (refused OVERLOADED, say): it retried until it got
                        # in, and "connected as" is printed already.
                        continue
                    if ev.code in _FINAL_CLOSES:
                        why = ev.reason or ev.code.name
                        if ev.code is CloseCode.REPLACED:
                            # Two chats as one user both default to device
                            # "terminal": the second ends the first for good.
                            why += f" (another client logged in as device {_show(device)}: give each chat its own --device)"
                        out(f"(connection closed by the broker: {why}; not reconnecting)")
                        raise ChatEnded(why, ev.code)
                    out(f"(connection lost: {ev.reason or ev.code}; reconnecting…)")
                elif isinstance(ev, Connected):
                    if reconnects:  # the first connection was announced above
                        out(f"(reconnected; clock offset {ev.clock_offset / 1000:.1f} ms, rtt {ev.rtt / 1000:.1f} ms)")
                        renewed = True  # the next presence is the renewed subscription's answer
                    reconnects.append(ev)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(events)
                if lines is None:
                    lines = _stdin_lines(nursery)
                async for line in lines:
                    text = line.rstrip("\n")
                    if tty and len(_typed_bytes(text)) >= TTY_LINE_LIMIT:
                        # The terminal kept the first TTY_LINE_LIMIT bytes and
                        # dropped the rest (the chat never sees them): sent, it
                        # would be a cut message the sender believes whole.
                        # (Checked first: a cut inside a character is no
                        # encoding problem.)
                        out(f"✗ not sent: the terminal cut this line at {TTY_LINE_LIMIT} bytes, its line limit (what"
                            " was typed past it was dropped): to send longer text, pipe it in (pimcore chat ... < FILE:"
                            " each line of it is one message)")
                        continue
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        # A byte stdin could not decode arrives as a lone
                        # surrogate (surrogateescape): not text, and sent as "?"
                        # it would reach the peer mangled.  Refused, showing
                        # the bytes (the chat goes on).
                        typed_bytes = _typed_bytes(text)
                        out(f"✗ not sent: the line is not UTF-8 text ({_show(typed_bytes)}):"
                            " is the terminal's encoding UTF-8?")
                        continue
                    command, _, rest = text.partition(" ")
                    if command in _NO_ARGUMENTS:
                        if rest.strip():
                            # A known command, not a typo of one: say what is wrong with it.
                            out(f"✗ {command} takes no arguments (not sent): type {command} alone, or // to send the"
                                f" line (/{_shown(text)} sends {_shown(text)})")
                            continue
                        text = command  # (a trailing space is no argument)
                    if text in ("/quit", "/exit"):
                        break
                    if text == "/help":
                        for help_line in _HELP:
                            out(help_line)
                        continue
                    if text == "/typing":
                        await client.typing(conv)
                        continue
                    if text == "/history":
                        in_view = client.view(conv)
                        for m in in_view:
                            out(_line(m, client.user, device))
                        if not in_view:
                            out("(no messages yet)")
                        continue
                    if command in ("/edit", "/recall", "/delete"):
                        number, _, new_text = rest.strip().partition(" ")
                        # N is a seq: 1..2**64-1 (ASCII digits only: int() takes others too).
                        if number.isascii() and number.isdigit() and 1 <= int(number) < 1 << 64 and (command != "/edit" or new_text):
                            nursery.start_soon(amend, command, int(number), new_text)
                        else:
                            out("usage: /edit N text, /recall N, /delete N  (N: the #number of a message)")
                        continue
                    if text.startswith("//"):
                        text = text[1:]  # the escape of a line that starts with /: sent as "/..."
                    elif text.startswith("/"):
                        # A typo of a command must not reach the peer as a message.
                        out(f"✗ unknown command {_shown(command)} (not sent): the commands are {', '.join(COMMANDS)};"
                            f" to send a line that starts with /, type // (/{_shown(text)} sends {_shown(text)})")
                        continue
                    if text.strip():
                        out(f"… sending: {_shown(text)}")
                        nursery.start_soon(send, typed, text)
                        typed += 1
                # Let sends in flight finish (each has its own deadline: up to
                # send_timeout when the broker cannot store them), saying so.
                pending = client.statistics().pending_sends
                if pending:
                    out(f"waiting for {pending} unconfirmed message{'s' if pending > 1 else ''} (Ctrl-C to leave now)…")
                while client.statistics().pending_sends:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        finally:
            skip_to(1 << 64)  # (leaving: what is still held is said, in seq order)
    out("bye")
    return 0


#: The commands, as /help and the refusal of an unknown one list them.
COMMANDS = ("/help", "/history", "/typing", "/edit N text", "/recall N", "/delete N", "/quit")

#: The commands that take no arguments.
_NO_ARGUMENTS = frozenset(("/help", "/history", "/typing", "/quit", "/exit"))

#: The help /help prints, a line each.
_HELP = (
    "commands: /help (this), /history (the conversation again), /typing (tell the others you are typing),",
    "  /edit N text (replace your message #N), /recall N (recall it for everyone), /delete N (for you only),",
    "  /quit (or /exit, or end of input: leave).  Any other line is sent; to send one that starts with /,",
    "  type // (//shrug sends /shrug).",
)

#: Bytes of a line a terminal keeps (Linux's N_TTY in canonical mode: a
#: 4,096-byte buffer, one kept for the newline): what is typed past them is
#: dropped before the chat can read it.  A line typed at a terminal that
#: reaches it is refused, not sent cut (docs/CLIENT.md, pimcore chat).
TTY_LINE_LIMIT = 4095


def _typed_bytes(text: str) -> bytes:
    """A line read from stdin as the bytes it was (undecodable bytes come
    as lone surrogates, surrogateescape)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # (a surrogate no decoding made)
        return text.encode("utf-8", "surrogatepass")


#: Characters of a typed line shown as they are: a longer one is shown cut (ids._show).
_SHOWN_CHARS = 200


def _shown(text: str) -> str:
    """A typed line as the chat echoes it: as is, or cut with its length if long."""
    return text if len(text) <= _SHOWN_CHARS else _show(text)


def _stdin_lines(nursery: trio.Nursery, stream: TextIO = sys.stdin) -> trio.abc.ReceiveChannel[str]:
    send, recv = trio.open_memory_channel[str](16)

    async def pump() -> None:
        async with send:
            while True:
                # abandon_on_cancel: /quit must not wait for one more line.
                line = await trio.to_thread.run_sync(stream.readline, abandon_on_cancel=True)
                if not line:
                    return
                await send.send(line)

    nursery.start_soon(pump)
    return recv


def _token_claims(token: str) -> dict[str, object]:
    """The token's claims (``sub``: its user, ``dev``: the device it is
    bound to), read without verifying it: only to refuse a chat that cannot
    work, or pick the device, before connecting (the broker checks the
    token).  Empty if it is no JWT.  A number of more digits than Python
    reads (a dev claim of 10**5000) is a LongNumber: refused like any dev
    claim that is no device id, not taken as the whole token unreadable."""
    from ._jwt import read_claims

    return read_claims(token)


def _token_claim(token: str, claim: str) -> Optional[str]:
    """A string claim of the token (see _token_claims), None if it has none."""
    value = _token_claims(token).get(claim)
    return value if isinstance(value, str) else None


def _bound_hint(reason: str) -> str:
    """The hint under a refusal "token is bound to device 'X', not 'Y'":
    the --device to give if X is a device id (one needs no quoting), else
    that no device can log in with the token."""
    bound = re.search(r"token is bound to device (.*), not '", reason)
    if bound is None:
        return ""
    shown = bound.group(1)  # (the broker's repr of X, cut short if long)
    if len(shown) > 2 and shown[0] == shown[-1] == "'" and valid_id(shown[1:-1]):
        return f" (pimcore chat --device {shown[1:-1]})"
    return f" (not a valid device id: {id_rule('device')}; no device can log in with this token)"


def run_chat(args: argparse.Namespace) -> int:
    if not args.token.strip():
        # (A "$(pimcore token ...)" that printed nothing, say: the broker's
        # refusal was PyJWT's "Not enough segments".)
        print(f"pimcore chat: the token is empty{' (only whitespace)' if args.token else ''}:"
              " get one with pimcore token --user ME", file=sys.stderr)
        return 2
    bad = next((c for c in args.token if not c.isascii()), None)
    if bad is not None:
        # (Read for its claims, it was a UnicodeEncodeError traceback.)
        print(f"pimcore chat: the token is no JWT: it has the character {_show(bad)} (a JWT is ASCII):"
              " get one with pimcore token --user ME", file=sys.stderr)
        return 2
    if args.device is None:
        # A token bound to a device logs in only as that one: take it.
        dev = _token_claims(args.token).get("dev")
        if dev is not None and not (isinstance(dev, str) and valid_id(dev)):
            # Not a device id typed: the token's (hand-signed, say), and
            # the broker refuses it whatever the device.
            user = _token_claim(args.token, "sub")
            print(f"pimcore chat: the token's dev claim {safe_text(_show(dev))} is not a valid device id"
                  f" ({id_rule('device')}): no device can log in with this token; get another:"
                  f" pimcore token --user {user if user is not None and valid_id(user) else 'ME'} --device DEVICE",
                  file=sys.stderr)
            return 2
        args.device = DEFAULT_DEVICE if dev is None else dev
    for value, what in ((args.to, "peer"), (args.device, "device")):
        if value is not None and not valid_id(value):
            print(f"pimcore chat: invalid {what} id: {id_problem(value, what)}", file=sys.stderr)
            return 2
    if args.group is not None and not valid_group(args.group):
        print(f"pimcore chat: invalid group id: {group_problem(args.group)}", file=sys.stderr)
        return 2
    try:
        parse_url(args.url)
    except ValueError as exc:
        print(f"pimcore chat: --url {exc}", file=sys.stderr)
        return 2
    if args.to is not None and args.to == _token_claim(args.token, "sub"):
        print(f"pimcore chat: cannot chat with yourself: the token is {args.to}'s (--to names another user)", file=sys.stderr)
        return 2
    ctx = None
    if args.cafile:
        # Said in one line naming the file (ssl names none), before anything
        # connects.
        if not os.path.exists(args.cafile):
            print(f"pimcore chat: --cafile {args.cafile}: no such file", file=sys.stderr)
            return 2
        try:
            ctx = ssl.create_default_context(cafile=args.cafile)
        except (ssl.SSLError, OSError) as exc:
            print(f"pimcore chat: --cafile {args.cafile} does not load: {exc}", file=sys.stderr)
            return 2

    def out(line: str) -> None:
        print(line, flush=True)

    def progress(line: str) -> None:
        print(f"pimcore chat: {line}", file=sys.stderr, flush=True)

    # Said at once on stderr (stdout's first line stays "connected as ..."):
    # a broker that does not answer is otherwise connect_timeout of silence.
    print(f"pimcore chat: connecting to {args.url} (up to {ClientConfig().connect_timeout:g} s)…", file=sys.stderr, flush=True)

    try:
        return trio.run(
            lambda: chat(args.url, args.token, args.to, group=args.group, device=args.device, ssl_context=ctx, out=out,
                         progress=progress)
        )
    except ChatRefused as exc:
        print(f"pimcore chat: {safe_text(str(exc))}", file=sys.stderr)
        return 2
    except ChatEnded as exc:
        print(f"pimcore chat: the broker ended this chat: {safe_text(str(exc))}", file=sys.stderr)
        if exc.code in _TOKEN_CLOSES:
            # Refused as given: the same token is refused on the next run
            # too (it exited 1, "may work later", and that run then 2).
            user = _token_claim(args.token, "sub")
            print(f"pimcore chat: the token is no longer accepted: get a new one (pimcore token --user"
                  f" {user if user is not None and valid_id(user) else 'ME'})", file=sys.stderr)
            return 2
    except ClientClosed as exc:
        print(f"pimcore chat: the broker ended this chat: {safe_text(str(exc))}", file=sys.stderr)
    except AuthFailed as exc:
        # Refused as given: the same token is refused again (OPERATIONS.md, Exit codes).
        print(f"pimcore chat: token refused: {safe_text(str(exc))}{_bound_hint(str(exc))}", file=sys.stderr)
        return 2
    except ConnectFailed as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            # Refused as given too: the broker's certificate is not trusted
            # until --cafile (or the system's CAs) change.
            hint = " (give --cafile PATH: the CA certificate that signed the broker's)" if args.cafile is None else ""
            print(f"pimcore chat: {safe_text(str(exc))}{hint}", file=sys.stderr)
            return 2
        print(f"pimcore chat: {safe_text(str(exc))}", file=sys.stderr)
        if exc.wrong_port:
            # The URL names the wrong kind of port or path (another service,
            # the HTTP API, TLS or not, a path not served): refused as given.
            return 2
    except KeyboardInterrupt:
        return 130
    return 1
