"""A store that goes back in time loses nothing silently (the epoch).

The issue's input: bob's phone has received 5 messages; the broker is killed,
its store replaced by an empty one (same secret), restarted; alice sends 3.
Before the epoch, the SDK acked position 5, was closed with PROTOCOL_ERROR
("PushAck(5) beyond what was pushed (3)") and reconnected about 11 times,
and each login stored its claimed position, so the 3 messages counted as
delivered and even a new SDK object for bob/phone got none of them.

Siblings tested here: a cursor from another epoch, a cursor beyond the head
in the same epoch, a restored cold copy of the data directory refilled with
new messages before the client comes back, a power cut under
``durability="os"`` (simulated by the boot id), a process crash under
``os`` (must NOT resynchronize), and the SDK's side (sans-IO and end to end
through the real ``pimcore serve``).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import trio

from pimcore import frames as F
from pimcore.auth import issue_token
from pimcore.client import ClientConfig, Connected, Disconnected, MessageReceived, Resynced, open_client
from pimcore.client_session import ClientSession
from pimcore.codec import Decoder, encode_frame
from pimcore.core import BrokerConfig
from pimcore.errors import CloseCode, StoreInUse
from pimcore.store import LmdbStore, MemoryStore, direct_conversation
from pimcore.store import lmdb as lmdb_store

from _harness import T0, Harness, store_driver  # noqa: F401
from _proc import ProcGroup, free_port, procs  # noqa: F401

AB = direct_conversation("alice", "bob")
OTHER_EPOCH = b"\x01" * 16


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else LmdbStore(str(tmp_path / "db"))
    yield s
    s.close()


def _ack(h: Harness, conn: int) -> F.LoginAck:
    [ack] = h.take(conn, F.LoginAck)
    return ack


# ---------------------------------------------------------------- the core


def test_login_ack_names_the_epoch(store, store_driver):
    h = Harness(store, driver=store_driver)
    ack = _ack(h, h.login("bob", "phone"))
    assert ack.epoch == store.epoch() and len(ack.epoch) == 16 and not ack.resync


def test_a_cursor_from_another_epoch_is_resynchronized_and_never_stored(store, store_driver):
    # The issue's input at the core: a device that had position 5 in some
    # other history logs in to a store that has nothing for it yet.
    h = Harness(store, driver=store_driver)
    bob = h.login("bob", "phone", position=5, epoch=OTHER_EPOCH)
    ack = _ack(h, bob)
    assert (ack.resync, ack.position, ack.head) == (True, 0, 0)
    h.lose(bob)
    alice = h.login("alice", "phone")
    for i in range(3):
        h.send(alice, AB, b"m%d" % i)
    # The claim was not stored: the device's position is still 0, so a fresh
    # SDK object (no cursor) gets all three...
    assert store.device("bob", "phone").position == 0
    fresh = h.login("bob", "phone")
    assert not _ack(h, fresh).resync
    assert [m.payload for m in h.pushed(fresh)] == [b"m0", b"m1", b"m2"]
    assert h.broker.statistics().resyncs == 1


def test_a_resynchronized_device_gets_its_own_sends_back(store, store_driver):
    """A resynchronized client drops everything it held, its own sent
    messages included, and is promised every message the store still has
    (a new user's trial: its own sends never came back -- a device is
    never pushed what it sent itself, it has them from their SendAcks).
    Up to the head at that login, its own sends are pushed too."""
    h = Harness(store, driver=store_driver)
    phone = h.login("alice", "phone")
    for i in range(2):
        h.send(phone, AB, b"mine%d" % i)
    bob = h.login("bob", "phone")
    h.send(bob, AB, b"his")
    h.lose(phone)
    again = h.login("alice", "phone", position=3, epoch=OTHER_EPOCH)
    assert _ack(h, again).resync
    assert [m.payload for m in h.drain_device(again)] == [b"mine0", b"mine1", b"his"]
    # After it, its own sends are its SendAcks' again.
    h.send(again, AB, b"later")
    assert h.pushed(again) == []


def test_a_client_at_position_0_from_another_epoch_is_resynchronized_too(store, store_driver):
    # A device that has only sent holds position 0, yet seqs, views and
    # receipts of the old history: it must be told too (found by a new user:
    # alice's view mixed both stores, and a receipt of 5 marked new messages
    # as read).
    h = Harness(store, driver=store_driver)
    alice = h.login("alice", "phone", position=0, epoch=OTHER_EPOCH)
    assert _ack(h, alice).resync
    fresh = h.login("alice", "laptop", position=0, epoch=b"")
    assert not _ack(h, fresh).resync


def test_a_cursor_without_an_epoch_is_resynchronized(store, store_driver):
    h = Harness(store, driver=store_driver)
    alice = h.login("alice", "phone")
    for i in range(4):
        h.send(alice, AB, b"m%d" % i)
    bob = h.login("bob", "phone", position=2, epoch=b"")
    ack = _ack(h, bob)
    assert ack.resync and ack.position == 0
    assert [m.payload for m in h.pushed(bob)] == [b"m0", b"m1", b"m2", b"m3"]


def test_a_cursor_beyond_the_head_in_the_same_epoch_is_resynchronized(store, store_driver):
    # Same epoch, but the store has less than the client saw (a store that
    # went back in time without anyone noticing): do not trust it.
    h = Harness(store, driver=store_driver)
    alice = h.login("alice", "phone")
    h.send(alice, AB, b"only one")
    bob = h.login("bob", "phone", position=5)
    ack = _ack(h, bob)
    assert (ack.resync, ack.position, ack.head) == (True, 0, 1)
    assert [m.payload for m in h.pushed(bob)] == [b"only one"]


def test_a_trusted_cursor_resumes_but_only_acks_move_the_stored_position(store, store_driver):
    h = Harness(store, driver=store_driver)
    alice = h.login("alice", "phone")
    for i in range(4):
        h.send(alice, AB, b"m%d" % i)
    bob = h.login("bob", "phone", position=3)
    ack = _ack(h, bob)
    assert (ack.resync, ack.position) == (False, 3)
    assert [m.payload for m in h.pushed(bob)] == [b"m3"]
    # The claim resumed delivery; what the store records is what was acked.
    assert store.device("bob", "phone").position == 0
    h.feed(bob, F.PushAck(4))
    h.lose(bob)  # flushes the lazily saved ack
    assert store.device("bob", "phone").position == 4


# ---------------------------------------------------------------- the LMDB store


def test_every_open_takes_a_new_epoch_and_trusts_the_earlier_ones(tmp_path):
    path = str(tmp_path / "db")
    seen = []
    for _ in range(3):
        s = LmdbStore(path)
        seen.append(s.epoch())
        assert s.epochs() == tuple(seen)
        s.close()
    assert len(set(seen)) == 3


def _bob_took_two(path: Path, driver: str) -> tuple[LmdbStore, Harness, int, int, bytes]:
    """A store at ``path`` where alice sent bob two messages his phone took:
    (store, harness, alice's conn, bob's conn, the epoch of bob's cursor)."""
    s = LmdbStore(str(path))
    h = Harness(s, driver=driver)
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    for i in range(2):
        h.send(alice, AB, b"old%d" % i)
    epoch = _ack(h, bob).epoch
    assert len(h.drain_device(bob)) == 2
    return s, h, alice, bob, epoch


def test_a_restored_cold_copy_does_not_trust_cursors_handed_out_after_it(tmp_path, store_driver):
    live, backup = tmp_path / "live", tmp_path / "backup"
    s, h, alice, bob, old_epoch = _bob_took_two(live, store_driver)
    s.close()
    shutil.copytree(live, backup)  # a cold backup: the broker is stopped

    s = LmdbStore(str(live))  # the broker runs on, hands out more positions
    h = Harness(s, driver=store_driver)
    alice = h.login("alice", "laptop")  # (the harness's local ids start at 1 again)
    bob = h.login("bob", "phone", position=2, epoch=old_epoch)
    later_epoch = _ack(h, bob).epoch
    for i in range(3):
        h.send(alice, AB, b"lost%d" % i)
    assert len(h.drain_device(bob)) == 3  # bob's cursor: 5, in later_epoch
    s.close()

    restored = LmdbStore(str(backup))  # disaster: the live store is gone
    assert old_epoch in restored.epochs() and later_epoch not in restored.epochs()
    h = Harness(restored, driver=store_driver)
    alice = h.login("alice", "tablet")
    for i in range(3):  # positions 3..5 are refilled before bob is back
        h.send(alice, AB, b"new%d" % i)
    bob = h.login("bob", "phone", position=5, epoch=later_epoch)
    ack = _ack(h, bob)
    assert ack.resync
    assert [m.payload for m in h.pushed(bob)] == [b"old0", b"old1", b"new0", b"new1", b"new2"]
    # A cursor from before the copy is still good there (of a device the
    # copy knows).
    before = h.login("bob", "phone", position=2, epoch=old_epoch)
    assert not _ack(h, before).resync
    restored.close()


def test_a_restored_hot_copy_does_not_trust_cursors_that_moved_past_it(tmp_path, store_driver):
    """A copy taken while the broker runs (``mdb_copy``, or the files between
    two commits) knows the running epoch: a device that took more entries
    in that epoch after the copy holds a cursor the restored store would
    trust once new messages refilled its positions -- they were skipped,
    acked and never delivered (a new user's trial).  The restored store
    knows where that epoch ended in its own history (the highest server
    time stored when the next open began it), and an entry at the cursor's
    position stored after that is from another history: resynchronized."""
    live, backup = tmp_path / "live", tmp_path / "backup"
    s, h, alice, bob, run_epoch = _bob_took_two(live, store_driver)
    _crash_copy(live, backup)  # a hot backup: the broker runs on in the same epoch
    for i in range(3):
        h.send(alice, AB, b"lost%d" % i)
    assert len(h.drain_device(bob)) == 3  # bob's cursor: 5, still run_epoch
    s.close()

    restored = LmdbStore(str(backup))  # disaster: the live store is gone
    assert run_epoch in restored.epochs()
    h = Harness(restored, driver=store_driver)
    alice = h.login("alice", "tablet")
    for i in range(3):  # positions 3..5 are refilled before bob is back
        h.send(alice, AB, b"new%d" % i)
    bob = h.login("bob", "phone", position=5, epoch=run_epoch)
    ack = _ack(h, bob)
    assert ack.resync
    assert [m.payload for m in h.pushed(bob)] == [b"old0", b"old1", b"new0", b"new1", b"new2"]
    # A cursor from before the copy is still good there, and so is one at
    # the restored store's own end of that epoch (bob's phone is known to
    # the copy: a device it never saw is resynchronized, test below).
    for position in (1, 2):
        other = h.login("bob", "phone", position=position, epoch=run_epoch)
        assert not _ack(h, other).resync, position
    restored.close()

    # The next open keeps what it knows of run_epoch's end: still refused.
    again = LmdbStore(str(backup))
    h = Harness(again, driver=store_driver)
    bob = h.login("bob", "phone", position=4, epoch=run_epoch)
    assert _ack(h, bob).resync
    again.close()


def test_a_restored_hot_copy_resynchronizes_a_device_that_only_sent_after_it(tmp_path, store_driver):
    """A device that took nothing after a hot copy but *sent* there (a new
    user's trial): its sends were acked and are gone from the restored
    store, its app shows them, and new messages take their seqs.  Its
    cursor must therefore cover its own sends -- each committed batch
    tells the sending device the inbox position of its own entries (a
    Push without messages; Telegram's ``pts`` in a sent message's answer
    is the same idea) -- so that the restored store finds the entry at
    that position stored after the epoch's end and resynchronizes it."""
    live, backup = tmp_path / "live", tmp_path / "backup"
    s, h, alice, bob, run_epoch = _bob_took_two(live, store_driver)
    assert h.last_upto(alice) == 2  # alice's own two messages
    h.take(alice)
    _crash_copy(live, backup)  # a hot backup: the broker runs on in the same epoch
    for i in range(3):
        h.send(alice, AB, b"lost%d" % i)
    acks = h.acks(alice)
    assert [a.seq for a in acks] == [3, 4, 5]
    cursor = h.last_upto(alice)
    assert cursor == 5  # her app took every Push: its own sends are covered
    s.close()

    restored = LmdbStore(str(backup))  # disaster: the live store is gone
    h = Harness(restored, driver=store_driver)
    bob = h.login("bob", "tablet")
    for i in range(3):  # alice's positions 3..5 (and seqs 3..5) are refilled
        h.send(bob, AB, b"new%d" % i)
    alice = h.login("alice", "phone", position=cursor, epoch=run_epoch)
    ack = _ack(h, alice)
    assert ack.resync
    # Everything the restored store has, her own sends (of the copy) too.
    assert [m.payload for m in h.pushed(alice)] == [b"old0", b"old1", b"new0", b"new1", b"new2"]
    restored.close()


def test_a_restored_hot_copy_resynchronizes_a_device_whose_app_took_less_than_it_sent(tmp_path, store_driver):
    """A send-only app with a message still queued when it saved its cursor
    (a new user's third trial): what it took stops below its own sends, so
    the cursor names an entry of the copy and was trusted -- the app kept
    showing sends the restored store lost, at seqs new messages took.  The
    Login also says the highest position of its own sends it was told
    (Login.sent), and the check reads the entry there too."""
    live, backup = tmp_path / "live", tmp_path / "backup"
    s, h, alice, bob, run_epoch = _bob_took_two(live, store_driver)
    h.take(alice)
    _crash_copy(live, backup)
    h.send(bob, AB, b"unread")  # position 3 of alice's inbox: her app has not taken it
    for i in range(3):
        h.send(alice, AB, b"lost%d" % i)  # positions 4..6
    assert [a.seq for a in h.acks(alice)] == [4, 5, 6]
    taken, sent = 2, h.last_upto(alice)
    assert sent == 6
    s.close()

    # Nothing went back in time: the same claim after a plain restart is trusted.
    plain = LmdbStore(str(live))
    h = Harness(plain, driver=store_driver)
    phone = h.login("alice", "phone", position=taken, epoch=run_epoch, sent=sent)
    ack = _ack(h, phone)
    assert not ack.resync and ack.position == 2  # (Login.sent moves nothing: "unread" comes again)
    assert [m.payload for m in h.pushed(phone)] == [b"unread"]
    plain.close()

    restored = LmdbStore(str(backup))
    h = Harness(restored, driver=store_driver)
    carol = h.login("bob", "tablet")
    for i in range(4):  # alice's positions 3..6 (and seqs 3..6) are refilled
        h.send(carol, AB, b"new%d" % i)
    # Without Login.sent (a client of the documented hole): trusted.
    ack = _ack(h, h.login("alice", "laptop", position=taken, epoch=run_epoch))
    assert not ack.resync
    alice = h.login("alice", "phone", position=taken, epoch=run_epoch, sent=sent)
    ack = _ack(h, alice)
    assert ack.resync
    assert [m.payload for m in h.pushed(alice)] == [b"old0", b"old1", b"new0", b"new1", b"new2", b"new3"]
    # Not yet refilled: a position of its sends beyond the head is as telling.
    alice2 = h.login("alice", "watch", position=taken, epoch=run_epoch, sent=40)
    assert _ack(h, alice2).resync
    restored.close()


@pytest.mark.parametrize("removal", ["purge", "retention"])
def test_a_refilled_cursor_is_found_out_even_when_its_own_entry_was_removed_since(tmp_path, store_driver, removal):
    """The check reads the entry at the cursor's position; a purge or
    retention may have removed it since the restore.  The entries below it
    tell as well (positions and server times grow together): the highest
    one still there decides.  A new user's trial: alice's cursor was her
    own send after a hot copy; after the restore carol's messages took her
    positions 3-4 and bob's one 5, then the chat with bob was purged (or
    kept to 1 message): trusted, carol's messages were never delivered."""
    live, backup = tmp_path / "live", tmp_path / "backup"
    s, h, alice, bob, run_epoch = _bob_took_two(live, store_driver)
    _crash_copy(live, backup)
    for i in range(3):
        h.send(alice, AB, b"lost%d" % i)
    cursor = h.last_upto(alice)
    assert cursor == 5
    s.close()

    restored = LmdbStore(str(backup))
    h = Harness(restored, driver=store_driver)
    carol = h.login("carol", "phone")
    AC = direct_conversation("alice", "carol")
    h.send(carol, AC, b"carol0")  # alice's position 3
    h.send(carol, AC, b"carol1")  # 4
    bob = h.login("bob", "tablet")
    h.send(bob, AB, b"bob0")  # 5: the cursor's position
    h.send(bob, AB, b"bob1")  # 6
    if removal == "purge":
        assert h.host_call(h.broker.purge_conversation, AB) is not None
    else:
        assert h.host_call(h.broker.set_retention, AB, -1, 1) is not None
        for _ in range(2):  # the first pass arms the reclaim timer, the next one runs it
            h.advance(BrokerConfig().reclaim_interval + 1)
    # (The entry at the cursor is gone; carol's below it are there.)
    assert [pos for pos, _ in restored.inbox_range("alice", 2, 10)] == [3, 4] + ([] if removal == "purge" else [6])
    alice = h.login("alice", "phone", position=cursor, epoch=run_epoch)
    assert _ack(h, alice).resync
    pushed = [m.payload for m in h.pushed(alice)]
    assert pushed[:2] == [b"carol0", b"carol1"], pushed
    restored.close()


def test_a_device_the_restored_store_never_saw_is_resynchronized(tmp_path, store_driver):
    """A second trial: alice's phone logged in for the first time after a
    hot copy and took entries there; after the restore her laptop took
    and acked the entries that refilled those positions, the reclaim
    removed them (the restored store knows no phone to wait for), and the
    phone came back with a cursor no entry below could contradict:
    trusted, its messages at those seqs silently not the broker's.  A
    device the store has no record of, claiming an earlier epoch, is from
    another history (at worst a device whose first login had not been
    committed yet: it is sent everything again)."""
    live, backup = tmp_path / "live", tmp_path / "backup"
    s = LmdbStore(str(live))
    h = Harness(s, driver=store_driver)
    bob = h.login("bob", "phone")
    laptop = h.login("alice", "laptop")
    for i in range(2):
        h.send(bob, AB, b"old%d" % i)
    assert len(h.drain_device(laptop)) == 2
    run_epoch = s.epoch()
    h.run(h.broker.flush(h.now))
    _crash_copy(live, backup)
    phone = h.login("alice", "phone")  # first seen after the copy
    h.send(bob, AB, b"lost0")
    assert len(h.drain_device(phone)) == 3
    s.close()

    restored = LmdbStore(str(backup))
    assert restored.device("alice", "phone") is None
    h = Harness(restored, driver=store_driver)
    laptop = h.login("alice", "laptop", position=2, epoch=run_epoch)
    assert not _ack(h, laptop).resync  # a device the copy knows: trusted
    bob = h.login("bob", "tablet")
    h.send(bob, AB, b"new0")  # alice's position 3
    assert [m.payload for m in h.drain_device(laptop)] == [b"new0"]
    h.run(h.broker.flush(h.now))
    for _ in range(2):  # the reclaim takes 1-3: acked by every device the store knows
        h.advance(BrokerConfig().reclaim_interval + 1)
    assert restored.inbox_range("alice", 0, 10) == []
    phone = h.login("alice", "phone", position=3, epoch=run_epoch)
    assert _ack(h, phone).resync
    restored.close()


def test_a_device_whose_record_was_not_committed_yet_is_trusted_by_its_entries(tmp_path, store_driver):
    """A third trial: a new device sent, was acked, and the broker was
    killed at once; a device's record is written lazily, so the store had
    none -- and resynchronized it, although its cursor named its own send,
    stored in this history.  The entries decide first."""
    path = tmp_path / "db"
    s = LmdbStore(str(path))
    # (ack_delay: the lazy ops -- the device's record among them -- wait
    # behind sends, as `pimcore serve` configures it.)
    h = Harness(s, BrokerConfig(ack_delay=50_000), driver=store_driver)
    epoch = s.epoch()
    phone = h.login("alice", "phone")
    h.send(phone, AB, b"mine")
    cursor = h.last_upto(phone)
    assert cursor == 1
    _crash_copy(path, tmp_path / "crashed")  # before the device's record was committed
    s.close()
    crashed = LmdbStore(str(tmp_path / "crashed"))
    if crashed.device("alice", "phone") is not None:
        pytest.skip("this driver committed the device's record with the send")
    h = Harness(crashed, driver=store_driver)
    phone = h.login("alice", "phone", position=cursor, epoch=epoch)
    assert not _ack(h, phone).resync
    crashed.close()


def _crash_copy(src: Path, dst: Path) -> None:
    """The files of an open environment as a crash would leave them (LMDB
    never tears a transaction; a copy taken between commits is what a
    SIGKILL leaves on disk)."""
    shutil.copytree(src, dst)


def test_a_power_cut_under_os_durability_distrusts_that_run(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-1")
    s = LmdbStore(str(tmp_path / "db"), durability="os")
    run_epoch = s.epoch()
    _crash_copy(tmp_path / "db", tmp_path / "after-power-cut")
    _crash_copy(tmp_path / "db", tmp_path / "after-process-crash")
    s.close()
    # The machine rebooted: unsynced commits of that run may be gone.
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-2")
    cut = LmdbStore(str(tmp_path / "after-power-cut"))
    assert run_epoch not in cut.epochs()
    cut.close()
    # Only the process died (same boot): the page cache kept every commit.
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-1")
    crash = LmdbStore(str(tmp_path / "after-process-crash"))
    assert run_epoch in crash.epochs()
    crash.close()


def test_a_clean_close_under_os_durability_survives_a_reboot(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-1")
    s = LmdbStore(str(tmp_path / "db"), durability="os")
    run_epoch = s.epoch()
    s.close()
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-2")
    again = LmdbStore(str(tmp_path / "db"), durability="os")
    assert run_epoch in again.epochs()
    again.close()


def test_a_maintenance_open_next_to_an_os_broker_keeps_its_power_cut_mark(tmp_path, monkeypatch):
    # Found by a new user: `pimcore group ...` or `pimcore inspect` next to a
    # broker running durability os deleted its mark, so a power cut after
    # that went unnoticed (and every CLI call added an epoch).
    from _proc import run_pimcore

    data = tmp_path / "data"
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-1")
    broker = LmdbStore(str(data / "store"), durability="os")
    run_epoch, trusted = broker.epoch(), broker.epochs()
    for args in (("group", "create", "g", "alice", "bob", "--data-dir", data), ("inspect", data)):
        r = run_pimcore(*args)
        assert r.returncode == 0, r.stderr
    _crash_copy(data / "store", tmp_path / "after-power-cut")
    broker.close()
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-2")
    cut = LmdbStore(str(tmp_path / "after-power-cut"))
    assert run_epoch not in cut.epochs() and set(cut.epochs()) == set(trusted) - {run_epoch} | {cut.epoch()}
    cut.close()


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_the_lock_holder_is_named_as_it_was_started(tmp_path, how):
    # A holder started with `python -c` was named "(-c)" and one started
    # with `python -m pkg` "(__main__.py ...)"; a command line past 200
    # characters was cut without a sign of it.
    import subprocess
    import sys

    store = tmp_path / "store"
    long_arg = "x" * 300
    code = ("import sys, time\n"
            "from pimcore.store import LmdbStore\n"
            "s = LmdbStore(sys.argv[1])\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n"
            "s.close()\n")
    if how == "-c":
        cmd = [sys.executable, "-c", code, str(store), long_arg]
        env = dict(os.environ)
        expected = f"python -c {store} x"
    else:
        pkg = tmp_path / "lib" / "holdit"
        pkg.mkdir(parents=True)
        (pkg / "__main__.py").write_text(code)
        cmd = [sys.executable, "-m", "holdit", str(store), long_arg]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "lib"), os.environ.get("PYTHONPATH", "")]))
        expected = f"python -m holdit {store} x"
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(StoreInUse) as err:
            LmdbStore(str(store))
        holder = err.value.holder
        assert holder.startswith(f"process {proc.pid} ({expected}"), holder
        words = holder[len(f"process {proc.pid} (") : -1]
        assert len(words) == 200 and words.endswith("\u2026"), words
    finally:
        proc.communicate("", timeout=30)
    assert proc.returncode == 0


def test_two_brokers_cannot_run_on_one_store(tmp_path):
    from _proc import run_pimcore

    data = tmp_path / "data"
    first = LmdbStore(str(data / "store"))
    (data / "secret").write_text("s" * 64)
    r = run_pimcore("serve", "--listen", "tcp://127.0.0.1:0", "--data-dir", data, timeout=30)
    # It said "another broker is running" whoever held the store: here it
    # is this test's process, through the library.
    assert r.returncode == 1 and f"is in use by process {os.getpid()} (" in r.stderr, (r.returncode, r.stderr)
    r = run_pimcore("inspect", data)  # maintenance opens are fine
    assert r.returncode == 0, r.stderr
    with pytest.raises(StoreInUse) as err:
        LmdbStore(str(data / "store"))
    assert err.value.holder.startswith(f"process {os.getpid()} (") and err.value.holder in str(err.value)
    first.close()
    again = LmdbStore(str(data / "store"))  # the lock went with the close
    again.close()


def test_sync_durability_never_distrusts_a_run(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-1")
    s = LmdbStore(str(tmp_path / "db"))
    run_epoch = s.epoch()
    _crash_copy(tmp_path / "db", tmp_path / "crashed")
    s.close()
    monkeypatch.setattr(lmdb_store, "_boot_id", lambda: b"boot-2")
    crashed = LmdbStore(str(tmp_path / "crashed"))
    assert run_epoch in crashed.epochs()
    crashed.close()


# ---------------------------------------------------------------- the SDK (sans-IO)


def _login_ack(epoch: bytes, position: int, head: int, resync: bool) -> bytes:
    return encode_frame(F.LoginAck("bob", "phone", T0, position, head, False, 1 << 20, 1 << 16, 8, 0, 0, epoch, resync))


def _frames(data: bytes) -> list:
    dec = Decoder()
    dec.feed(data)
    return list(dec)


def _calibrate(s: ClientSession, now: int, before: list = []) -> list:
    """Answer the session's CalibrateReq (it is ACTIVE after one sample; the
    request rides behind the Login, so it may be in ``before``, the frames
    already read); returns the other frames it had sent."""
    frames = before + _frames(s.data_to_send())
    [req] = [f for f in frames if isinstance(f, F.CalibrateReq)]
    s.receive_data(encode_frame(F.CalibrateResp(req.client_time, now)), now)
    return [f for f in frames if not isinstance(f, F.CalibrateReq)]


def test_the_sdk_resets_its_cursors_on_resync_and_acks_only_what_it_was_pushed():
    s = ClientSession("phone", ClientConfig(time_samples=1, ack_delay=0))
    s.connection_made(T0, b"tok")
    first = _frames(s.data_to_send())
    assert first[0].epoch == b""
    e1 = b"\x0a" * 16
    s.receive_data(_login_ack(e1, 0, 5, False), T0)
    _calibrate(s, T0, first)
    msgs = tuple(F.Message(i, bytes(16), AB, i, "alice", "p", T0, T0 + i, b"x", 0, i, i - 1) for i in range(1, 6))
    s.receive_data(encode_frame(F.Push(5, msgs)), T0)
    while s.next_event(T0 + 5) is not None:
        pass
    assert s.taken_upto == 5 and s.epoch == e1
    s.connection_lost(T0)

    s.connection_made(T0 + 1, b"tok")
    first = _frames(s.data_to_send())
    login = next(f for f in first if isinstance(f, F.Login))
    assert (login.position, login.epoch) == (5, e1)
    e2 = b"\x0b" * 16
    s.receive_data(_login_ack(e2, 0, 3, True), T0 + 2)
    sent = _calibrate(s, T0 + 2, first)
    events = []
    while (ev := s.next_event(T0 + 2)) is not None:
        events.append(ev)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Disconnected", "Resynced", "Connected"], kinds
    assert events[1] == Resynced(e1, e2, 0)
    assert s.taken_upto == 0 and s.epoch == e2 and s.view(AB) == []
    sent += _frames(s.data_to_send())
    assert not [f for f in sent if isinstance(f, F.PushAck)]
    new = tuple(F.Message(i, bytes([i]) * 16, AB, i, "alice", "p", T0, T0 + i, b"n", 0, i, i - 1) for i in range(1, 4))
    s.receive_data(encode_frame(F.Push(3, new)), T0 + 3)
    while s.next_event(T0 + 5) is not None:
        pass
    s.handle_timer(T0 + 4)
    acks = [f for f in _frames(s.data_to_send()) if isinstance(f, F.PushAck)]
    assert acks and acks[-1].position == 3


def test_a_reconnecting_sdk_claims_what_it_holds_not_only_what_the_app_took():
    """A new user's trial: the app took 5 of 34 pushed messages, then the
    broker was restored from a hot copy and the same SDK object logged in
    again.  Its Login claimed 5 (taken_upto), a position of the copy, so
    it was trusted -- and the SDK then dropped the refilled positions 6-34
    as duplicates of what it held: new messages lost, gone ones shown.  It
    now claims everything it holds (34), which the restored store finds
    refilled; and the positions it holds but the app has not taken stay
    untaken until the app takes them."""
    s = ClientSession("phone", ClientConfig(time_samples=1, ack_delay=0))
    s.connection_made(T0, b"tok")
    first = _frames(s.data_to_send())
    e1 = b"\x0a" * 16
    s.receive_data(_login_ack(e1, 0, 34, False), T0)
    _calibrate(s, T0, first)
    msgs = tuple(F.Message(i, bytes([i]) * 16, AB, i, "alice", "p", T0, T0 + i, b"x", 0, i, i - 1) for i in range(1, 35))
    s.receive_data(encode_frame(F.Push(34, msgs)), T0)
    taken = 0
    while taken < 5:
        ev = s.next_event(T0)
        taken += isinstance(ev, MessageReceived)
    assert s.taken_upto == 5
    s.connection_lost(T0)

    s.connection_made(T0 + 1, b"tok")
    first = _frames(s.data_to_send())
    login = next(f for f in first if isinstance(f, F.Login))
    assert (login.position, login.epoch) == (34, e1)
    # Trusted: delivery resumes after 34; the app still takes 6..34 in turn.
    s.receive_data(_login_ack(e1, 34, 34, False), T0 + 2)
    _calibrate(s, T0 + 2, first)
    assert s.taken_upto == 5
    got = []
    while (ev := s.next_event(T0 + 3)) is not None:
        if isinstance(ev, MessageReceived):
            got.append(ev.message.position)
    assert got == list(range(6, 35)) and s.taken_upto == 34


def test_an_sdk_takes_a_push_of_only_its_own_sends_at_once_when_nothing_is_queued():
    """A new user's trial: right after ``send()`` returned, ``taken_upto``
    did not cover the send (the Push telling its position waited in the
    event queue for the app to take it), so a cursor saved then was one a
    restored hot copy trusted.  With nothing queued before it, it is taken
    at once."""
    s = ClientSession("phone", ClientConfig(time_samples=1, ack_delay=0))
    s.connection_made(T0, b"tok")
    first = _frames(s.data_to_send())
    s.receive_data(_login_ack(b"\x0a" * 16, 0, 0, False), T0)
    _calibrate(s, T0, first)
    # (Connected stays queued: a send-only app need not read its events --
    # a second trial's bot never did, and its saved cursor stayed 0.)
    s.send(AB, b"hi", T0)
    [req] = [f for f in _frames(s.data_to_send()) if isinstance(f, F.SendReq)]
    s.receive_data(encode_frame(F.SendAck(req.local_id, 0, bytes(16), 1, T0)) + encode_frame(F.Push(1, ())), T0)
    assert s.taken_upto == 1
    s.handle_timer(T0 + 1)
    assert [f.position for f in _frames(s.data_to_send()) if isinstance(f, F.PushAck)] == [1]


def test_an_sdk_restarted_with_a_saved_cursor_resumes_in_the_same_epoch():
    e1 = b"\x0c" * 16
    s = ClientSession("phone", ClientConfig(time_samples=0), position=7, epoch=e1)
    s.connection_made(T0, b"tok")
    login = next(f for f in _frames(s.data_to_send()) if isinstance(f, F.Login))
    assert (login.position, login.epoch) == (7, e1)
    with pytest.raises(ValueError):
        ClientSession("phone", position=-1)


# ---------------------------------------------------------------- end to end


CONFIG = ClientConfig(ack_timeout=1.0, send_timeout=30.0, connect_timeout=5.0, backoff_initial=0.05, backoff_max=0.3)


async def _restore_hot_copy(server, start, data: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The broker's disk is lost: kill -9, the hot copy (``tmp_path /
    "hot-copy"``) restored as its store, started again; -> the new process."""
    server.send_signal(signal.SIGKILL)
    await trio.to_thread.run_sync(server.wait)
    shutil.rmtree(data / "store")
    shutil.copytree(tmp_path / "hot-copy", data / "store")
    return await trio.to_thread.run_sync(start)


async def _serve(tmp_path: Path, procs: ProcGroup) -> tuple:
    """``pimcore serve`` on a data directory under ``tmp_path``: (data dir,
    url, a function starting it again, the process, the token secret)."""
    data = tmp_path / "data"
    url = f"tcp://127.0.0.1:{free_port()}"

    def start():
        return procs.serve("--listen", url, "--data-dir", data)

    server = await trio.to_thread.run_sync(start)
    return data, url, start, server, (data / "secret").read_text().strip()


async def test_the_issue_input_through_the_sdk_and_pimcore_serve(tmp_path: Path, procs: ProcGroup) -> None:
    data, url, start, server, secret = await _serve(tmp_path, procs)
    events: list = []
    got = trio.Event()
    with trio.fail_after(60):
        async with open_client(url, issue_token(secret, "alice", ttl=600), "phone", config=CONFIG) as alice, open_client(
            url, issue_token(secret, "bob", ttl=600), "phone", config=CONFIG
        ) as bob:

            async def watch() -> None:
                async for ev in bob.events():
                    events.append(ev)
                    if sum(isinstance(e, MessageReceived) and e.message.payload.startswith(b"new") for e in events) == 3:
                        got.set()

            async with trio.open_nursery() as n:
                n.start_soon(watch)
                for i in range(5):
                    await alice.send(AB, b"old%d" % i)
                while bob.taken_upto < 5:
                    await trio.sleep(0.01)
                old_epoch = bob.epoch
                server.send_signal(signal.SIGKILL)
                await trio.to_thread.run_sync(server.wait)
                shutil.rmtree(data / "store")  # an empty store, the same secret
                server = await trio.to_thread.run_sync(start)
                for i in range(3):
                    await alice.send(AB, b"new%d" % i)
                await got.wait()
                n.cancel_scope.cancel()
            resynced = [e for e in events if isinstance(e, Resynced)]
            assert len(resynced) == 1 and resynced[0].old_epoch == old_epoch != resynced[0].epoch
            broken = [e for e in events if isinstance(e, Disconnected) and e.code is CloseCode.PROTOCOL_ERROR]
            assert not broken, broken
            assert [e.message.payload for e in events if isinstance(e, MessageReceived)] == [
                b"old0", b"old1", b"old2", b"old3", b"old4", b"new0", b"new1", b"new2"
            ]
            assert bob.statistics().connects == 2
            assert bob.taken_upto == 3 and bob.epoch == resynced[0].epoch
        # A brand-new SDK object for bob/phone (no saved cursor): the three
        # were delivered and acked by the device, so nothing is pending --
        # and a saved cursor from the old epoch is resynchronized again.
        async with open_client(url, issue_token(secret, "bob", ttl=600), "phone", config=CONFIG, position=5, epoch=old_epoch) as again:
            evs = []
            async for ev in again.events():
                evs.append(ev)
                if isinstance(ev, Connected):
                    break
            assert isinstance(evs[0], Resynced) and evs[0].position == 0
            # ...and it takes the whole new history again.
            assert again.taken_upto == 0


async def test_a_device_that_only_sent_after_a_hot_copy_is_resynchronized_through_pimcore_serve(
    tmp_path: Path, procs: ProcGroup
) -> None:
    """The new user's trial, end to end: a hot copy of the data directory,
    alice's phone then only *sends* (3 acked), the broker's disk is lost and
    the copy restored, bob's new messages refill alice's inbox positions.
    Her phone reconnects by itself: it must be told ``Resynced`` (before:
    trusted, its three sends gone while its app showed them) and get bob's
    new messages."""
    data, url, start, server, secret = await _serve(tmp_path, procs)
    events: list = []
    got = trio.Event()
    with trio.fail_after(60):
        async with open_client(url, issue_token(secret, "alice", ttl=600), "phone", config=CONFIG) as alice, open_client(
            url, issue_token(secret, "bob", ttl=600), "tablet", config=CONFIG
        ) as bob:

            async def watch() -> None:
                async for ev in alice.events():
                    events.append(ev)
                    if sum(isinstance(e, MessageReceived) for e in events) == 5:
                        got.set()

            async with trio.open_nursery() as n:
                n.start_soon(watch)
                for i in range(2):
                    await alice.send(AB, b"old%d" % i)
                while alice.taken_upto < 2:  # her own two, told by the broker
                    await trio.sleep(0.01)
                run_epoch = alice.epoch
                await trio.to_thread.run_sync(shutil.copytree, data / "store", tmp_path / "hot-copy")
                for i in range(3):
                    await alice.send(AB, b"lost%d" % i)
                while alice.taken_upto < 5:
                    await trio.sleep(0.01)
                server = await _restore_hot_copy(server, start, data, tmp_path)
                for i in range(3):
                    await bob.send(AB, b"new%d" % i)
                await got.wait()
                n.cancel_scope.cancel()
    resynced = [e for e in events if isinstance(e, Resynced)]
    assert len(resynced) == 1 and resynced[0].old_epoch == run_epoch != resynced[0].epoch
    # Every message the restored store has, her own sends of the copy too.
    assert [e.message.payload for e in events if isinstance(e, MessageReceived)] == [
        b"old0", b"old1", b"new0", b"new1", b"new2"
    ]


async def test_an_app_that_saved_its_cursor_with_a_message_queued_is_resynchronized_after_a_hot_copy(
    tmp_path: Path, procs: ProcGroup
) -> None:
    """A new user's third trial, end to end: alice's app does not read its
    events while it sends (bob's message waits in its queue), saves its
    cursor and exits; the broker's disk is lost and a hot copy taken before
    all that restored; bob's new messages refill her positions.  Her app
    comes back from what it saved -- ``taken_upto`` (0: it took nothing),
    ``epoch`` and ``sent_upto`` -- and must be told ``Resynced`` (before:
    trusted, its three sends gone while it showed them, at seqs bob's new
    messages took)."""
    data, url, start, server, secret = await _serve(tmp_path, procs)
    with trio.fail_after(60):
        async with open_client(url, issue_token(secret, "bob", ttl=600), "tablet", config=CONFIG) as bob:
            async with open_client(url, issue_token(secret, "alice", ttl=600), "phone", config=CONFIG) as alice:
                await trio.to_thread.run_sync(shutil.copytree, data / "store", tmp_path / "hot-copy")
                await bob.send(AB, b"unread")
                for i in range(3):
                    await alice.send(AB, b"lost%d" % i)
                while alice.sent_upto < 4:  # bob's message at 1, her sends at 2..4
                    await trio.sleep(0.01)
                saved = (alice.taken_upto, alice.epoch, alice.sent_upto)
            assert saved[0] == 0 and saved[2] == 4
            server = await _restore_hot_copy(server, start, data, tmp_path)
            for i in range(4):
                await bob.send(AB, b"new%d" % i)
        events: list = []
        async with open_client(url, issue_token(secret, "alice", ttl=600), "phone", config=CONFIG,
                               position=saved[0], epoch=saved[1], sent=saved[2]) as alice:
            async for ev in alice.events():
                events.append(ev)
                if sum(isinstance(e, MessageReceived) for e in events) == 4:
                    break
    assert isinstance(events[0], Resynced) and events[0].old_epoch == saved[1]
    assert [e.message.payload for e in events if isinstance(e, MessageReceived)] == [b"new0", b"new1", b"new2", b"new3"]
