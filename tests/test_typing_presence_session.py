"""Typing and presence in the sans-IO client session (issue 14 part 3),
with explicit time: the typing throttle, indicator expiry as a timer,
presence subscriptions re-sent after a reconnect, refusals, privacy."""

from __future__ import annotations

from pimcore import frames as F
from pimcore.client_session import Disconnected, PresenceChanged, PresenceCompleted, PrivacyChanged, PrivacyCompleted, SendError, TypingChanged
from pimcore.errors import ErrorCode

from test_client_session import MS, S, T0, connect, events, session

ONLINE, OFFLINE, UNKNOWN = F.PresenceState.ONLINE, F.PresenceState.OFFLINE, F.PresenceState.UNKNOWN


def test_typing_is_throttled_and_a_stop_follows_only_a_start():
    s = session(typing_interval=2.0)
    assert s.typing("g", T0) is False  # not connected: dropped, nothing queued
    b = connect(s, T0)
    assert s.typing("g", T0, active=False) is False  # nothing to stop
    assert s.typing("g", T0) is True
    assert s.typing("g", T0 + 1 * S) is False
    assert s.typing("h", T0 + 1 * S) is True  # per conversation
    assert s.typing("g", T0 + 2 * S) is True
    assert s.typing("g", T0 + 2 * S + 1, active=False) is True
    assert s.typing("g", T0 + 2 * S + 2, active=False) is False
    assert s.typing("g", T0 + 2 * S + 3) is True  # a stop resets the throttle
    assert b.read() == [F.Typing("g", True), F.Typing("h", True), F.Typing("g", True), F.Typing("g", False), F.Typing("g", True)]


def test_a_send_ends_the_indicator_so_the_next_keystroke_types_again_at_once():
    """A message ends its sender's indicator at the other members, so the
    throttle starts over: typing right after a send goes out at once (it
    did not, and the others saw no indicator for the rest of the interval);
    a stop after the send has nothing to stop."""
    s = session(typing_interval=2.0)
    b = connect(s, T0)
    assert s.typing("g", T0) is True
    s.send("g", b"hi", T0 + 1 * S)
    assert s.typing("g", T0 + 1 * S, active=False) is False
    assert s.typing("g", T0 + 1 * S + 1) is True
    assert s.typing("g", T0 + 1 * S + 2) is False  # throttled again
    assert s.typing("h", T0 + 1 * S + 3) is True  # another conversation's send reset nothing there
    frames = [f for f in b.read() if isinstance(f, F.Typing)]
    assert frames == [F.Typing("g", True), F.Typing("g", True), F.Typing("h", True)]


def test_indicators_expire_by_themselves_and_stop_early():
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Typing("g", True, "bob", 3000), F.Typing("g", True, "carol", 5000))
    assert [(e.user, e.active, e.expires) for e in events(s, T0) if isinstance(e, TypingChanged)] == [
        ("bob", True, T0 + 3 * S), ("carol", True, T0 + 5 * S)]
    assert s.typing_users("g") == ["bob", "carol"]
    assert s.next_deadline() == T0 + 3 * S
    s.handle_timer(T0 + 3 * S)
    assert [(e.user, e.active) for e in events(s, T0 + 3 * S)] == [("bob", False)]
    assert s.typing_users("g") == ["carol"]
    b.feed(T0 + 4 * S, F.Typing("g", False, "carol", 0))
    assert [(e.user, e.active) for e in events(s, T0 + 4 * S)] == [("carol", False)]
    assert s.typing_users("g") == [] and s.next_deadline() is None
    b.feed(T0 + 4 * S, F.Typing("g", False, "dave", 0))  # a stop of nothing shown: no event
    assert events(s, T0 + 4 * S) == []


def test_presence_subscription_answers_changes_and_is_renewed_after_a_reconnect():
    s = session()
    req = s.subscribe_presence(["bob", "eve", "bob"], T0)  # before connecting: sent at login
    b = connect(s, T0)
    [sub] = [f for f in b.read() if isinstance(f, F.PresenceSub)]
    assert sub == F.PresenceSub(req, (F.PresenceUser("bob"), F.PresenceUser("eve")))
    entries = (F.PresenceEntry("bob", ONLINE, 0), F.PresenceEntry("eve", UNKNOWN, 0))
    b.feed(T0, F.Presence(req, ErrorCode.OK, entries))
    assert s.completions() == [PresenceCompleted(req, entries, None)]
    assert [e for e in events(s, T0) if isinstance(e, PresenceChanged)] == [
        PresenceChanged("bob", ONLINE, 0), PresenceChanged("eve", UNKNOWN, 0)]
    b.feed(T0, F.Presence(0, ErrorCode.OK, (F.PresenceEntry("bob", OFFLINE, T0 - S), F.PresenceEntry("zed", ONLINE, 0))))
    assert [e for e in events(s, T0) if isinstance(e, PresenceChanged)] == [PresenceChanged("bob", OFFLINE, T0 - S)]
    assert s.presence["bob"].state == OFFLINE and "zed" not in s.presence
    # a refused subscription keeps the previous one, which is what goes after a reconnect
    req2 = s.subscribe_presence([f"u{i}" for i in range(5)], T0)
    b.read()
    b.feed(T0, F.Presence(req2, ErrorCode.PRESENCE_LIMIT, ()))
    [done] = s.completions()
    assert isinstance(done.error, SendError) and done.error.code is ErrorCode.PRESENCE_LIMIT
    assert str(done.error) == ("presence subscription: PRESENCE_LIMIT: 5 users are more than the broker takes in one"
                               " subscription (its [server] presence_max_users, 256 by default): subscribe to fewer")
    s.connection_lost(T0 + S)
    b = connect(s, T0 + 2 * S)
    [sub] = [f for f in b.read() if isinstance(f, F.PresenceSub)]
    assert [u.user for u in sub.users] == ["bob", "eve"]
    b.feed(T0 + 2 * S, F.Presence(sub.req_id, ErrorCode.OK, (F.PresenceEntry("bob", ONLINE, 0), F.PresenceEntry("eve", UNKNOWN, 0))))
    assert s.completions() == []  # nobody waits: the renewal only refreshes
    assert PresenceChanged("bob", ONLINE, 0) in events(s, T0 + 2 * S)
    # the answer to a replaced subscription is ignored
    old = s.subscribe_presence(["bob"], T0 + 3 * S)
    new = s.subscribe_presence([], T0 + 3 * S)
    b.feed(T0 + 3 * S, F.Presence(old, ErrorCode.OK, (F.PresenceEntry("bob", OFFLINE, 5),)))
    assert s.completions() == [] and s.presence["bob"].state == ONLINE
    b.feed(T0 + 3 * S, F.Presence(new, ErrorCode.OK, ()))
    assert s.completions() == [PresenceCompleted(old, (), None), PresenceCompleted(new, (), None)]
    assert s.presence == {}


def test_presence_turns_unknown_while_disconnected_until_the_renewal_answers():
    """Cut off, the session cannot know: every entry not already UNKNOWN
    becomes UNKNOWN with its last_seen kept, each with a PresenceChanged
    right after the Disconnected (the broker's own UNKNOWN entries change
    nothing); the renewed subscription's answer brings the current state."""
    s = session()
    req = s.subscribe_presence(["bob", "carol", "eve"], T0)
    b = connect(s, T0)
    entries = (F.PresenceEntry("bob", ONLINE, 0), F.PresenceEntry("carol", OFFLINE, T0 - S), F.PresenceEntry("eve", UNKNOWN, 0))
    b.feed(T0, F.Presence(req, ErrorCode.OK, entries))
    events(s, T0)
    s.connection_lost(T0 + S, "reset")
    assert events(s, T0 + S) == [Disconnected(None, "reset"), PresenceChanged("bob", UNKNOWN, 0), PresenceChanged("carol", UNKNOWN, T0 - S)]
    assert s.presence == {"bob": F.PresenceEntry("bob", UNKNOWN, 0), "carol": F.PresenceEntry("carol", UNKNOWN, T0 - S),
                          "eve": F.PresenceEntry("eve", UNKNOWN, 0)}
    s.connection_lost(T0 + S)  # no connection: a no-op, no second round of events
    assert events(s, T0 + S) == []
    b = connect(s, T0 + 2 * S)
    [sub] = [f for f in b.read() if isinstance(f, F.PresenceSub)]
    b.feed(T0 + 2 * S, F.Presence(sub.req_id, ErrorCode.OK, (
        F.PresenceEntry("bob", OFFLINE, T0 + S), F.PresenceEntry("carol", ONLINE, 0), F.PresenceEntry("eve", UNKNOWN, 0))))
    assert [e for e in events(s, T0 + 2 * S) if isinstance(e, PresenceChanged)] == [
        PresenceChanged("bob", OFFLINE, T0 + S), PresenceChanged("carol", ONLINE, 0), PresenceChanged("eve", UNKNOWN, 0)]
    assert {u: e.state for u, e in s.presence.items()} == {"bob": OFFLINE, "carol": ONLINE, "eve": UNKNOWN}


def test_presence_states_are_presence_state_members_as_decoded_from_the_wire():
    """The codec decodes a state as a plain int: the subscription's answer
    and ``presence`` held ints (``state.name`` raised AttributeError) while
    the events held PresenceState members; a state this version does not
    know is UNKNOWN everywhere."""
    s = session()
    req = s.subscribe_presence(["bob", "carol"], T0)
    b = connect(s, T0)
    b.feed(T0, F.Presence(req, ErrorCode.OK, (F.PresenceEntry("bob", int(ONLINE), 0), F.PresenceEntry("carol", 9, 0))))
    [done] = s.completions()
    assert done.entries == (F.PresenceEntry("bob", ONLINE, 0), F.PresenceEntry("carol", UNKNOWN, 0))
    assert [type(e.state) for e in done.entries] == [F.PresenceState, F.PresenceState]
    assert [e.state.name for e in s.presence.values()] == ["ONLINE", "UNKNOWN"]
    b.feed(T0 + S, F.Presence(0, ErrorCode.OK, (F.PresenceEntry("bob", int(OFFLINE), T0),)))
    assert type(s.presence["bob"].state) is F.PresenceState and s.presence["bob"].state is OFFLINE


def test_privacy_requests_are_answered_and_sent_again_after_a_reconnect():
    s = session()
    b = connect(s, T0)
    ask = s.set_presence_privacy(True, T0)
    assert b.read() == [F.PresencePrivacy(2)]
    s.connection_lost(T0 + 10 * MS)
    b = connect(s, T0 + 20 * MS)
    assert F.PresencePrivacy(2) in b.read()
    b.feed(T0 + 30 * MS, F.PresencePrivacy(2))
    assert s.completions() == [PrivacyCompleted(ask, True)]
    assert s.hide_last_seen is True and PrivacyChanged(True) in events(s, T0 + 30 * MS)
    b.feed(T0 + 40 * MS, F.PresencePrivacy(1))  # changed on another device
    assert s.hide_last_seen is False and events(s, T0 + 40 * MS) == [PrivacyChanged(False)]


def test_a_message_from_a_typing_user_ends_their_indicator_in_that_conversation_only():
    from pimcore.client_session import MessageReceived
    from test_client_session import msg

    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Typing("g", True, "bob", 5000), F.Typing("h", True, "bob", 5000), F.Typing("g", True, "carol", 5000))
    events(s, T0)
    b.feed(T0 + S, F.Push(1, (msg(1, 1, sender="bob", conv="g"),)))
    got = events(s, T0 + S)
    assert [(type(e).__name__, getattr(e, "user", None), getattr(e, "active", None)) for e in got] == [
        ("TypingChanged", "bob", False), ("MessageReceived", None, None)]
    assert isinstance(got[1], MessageReceived) and got[0].conv == "g"  # type: ignore[attr-defined]
    assert s.typing_users("g") == ["carol"] and s.typing_users("h") == ["bob"]
    b.feed(T0 + 2 * S, F.Push(2, (msg(2, 2, sender="dave", conv="g"),)))  # someone else's message: no change
    assert [type(e).__name__ for e in events(s, T0 + 2 * S)] == ["MessageReceived"]
    assert s.typing_users("g") == ["carol"]
    s.handle_timer(T0 + 5 * S)
    assert sorted((e.conv, e.user) for e in events(s, T0 + 5 * S)) == [("g", "carol"), ("h", "bob")]  # no second stop for bob in g


def test_presence_turns_unknown_when_the_session_ends_for_good():
    """close() kept the last ONLINE/OFFLINE entries: a closed client went on
    claiming states it can no longer know.  Now as on a dropped connection:
    every entry UNKNOWN, last_seen kept, with a PresenceChanged each; a
    terminal Close (KICKED here) does the same."""
    from pimcore.errors import CloseCode

    for end in ("close", "kicked"):
        s = session()
        req = s.subscribe_presence(["bob", "carol"], T0)
        b = connect(s, T0)
        b.feed(T0, F.Presence(req, ErrorCode.OK, (F.PresenceEntry("bob", ONLINE, 0), F.PresenceEntry("carol", OFFLINE, T0 - S))))
        events(s, T0)
        if end == "close":
            s.close(T0 + S)
        else:
            b.feed(T0 + S, F.Close(CloseCode.KICKED, "bye"))
        changed = [e for e in events(s, T0 + S) if isinstance(e, PresenceChanged)]
        assert changed == [PresenceChanged("bob", UNKNOWN, 0), PresenceChanged("carol", UNKNOWN, T0 - S)], end
        assert s.presence == {"bob": F.PresenceEntry("bob", UNKNOWN, 0),
                              "carol": F.PresenceEntry("carol", UNKNOWN, T0 - S)}, end
