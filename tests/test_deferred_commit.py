"""A broker on a ``log`` store defers LMDB's commit over several batches
(``LmdbStore.defer_commits``, issue 13): a batch is acked once its command log
record is flushed, and the broker's committer commits LMDB's open transaction
within ``defer_seconds``.  What a user of the broker must still see: every
acked message, from any thread, at once or within that bound; after a clean
stop, and after SIGKILL (tests/test_store_crash.py, ``log-deferred``;
tests/test_restart.py, ``log``).  The store-level failure cases are in
tests/test_command_log.py (its ``deferred-*`` runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pimcore.embed import open_pimcore
from pimcore.store import LmdbStore, direct_conversation

CONV = direct_conversation("al", "bo")


async def test_a_log_broker_defers_lmdb_commits_and_other_threads_still_read_every_acked_post(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "data", durability="log") as pim:
            store = pim._store
            assert isinstance(store, LmdbStore)
            for i in range(40):
                await pim.post(CONV, b"m%d" % i, sender="al", device="phone")
            # Another thread: it waits for the broker's committer, which
            # commits the open transaction when defer_seconds have passed.
            page = await trio.to_thread.run_sync(lambda: store.history(CONV, 0, 100), abandon_on_cancel=True)
            assert [m.payload for m in page] == [b"m%d" % i for i in range(40)]
            assert store.deferred_batches > store.deferred_commits >= 1  # several batches per commit
        # A clean stop committed what was open: nothing to replay.
    again = LmdbStore(tmp_path / "data" / "store", durability="log")
    try:
        assert [m.payload for m in again.history(CONV, 0, 100)] == [b"m%d" % i for i in range(40)]
    finally:
        again.close()


async def test_the_broker_commits_an_open_transaction_with_no_further_batch(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "data", durability="log") as pim:
            store = pim._store
            assert isinstance(store, LmdbStore)
            await pim.post(CONV, b"one", sender="al", device="phone")
            while store.commit_delay() is not None:  # the committer's timer, not a read, commits it
                await trio.sleep(0.01)
            assert store.deferred_commits >= 1


async def test_a_read_from_another_thread_makes_the_broker_commit_before_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An hour's deadline: only the waiting reader (commit_delay() turns 0)
    # gets the open transaction committed within the test's time.
    monkeypatch.setattr(LmdbStore, "defer_seconds", 3600.0)
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "data", durability="log") as pim:
            store = pim._store
            assert isinstance(store, LmdbStore)
            await pim.post(CONV, b"x", sender="al", device="phone")
            assert store.commit_delay() is not None
            page = await trio.to_thread.run_sync(lambda: store.history(CONV, 0, 10), abandon_on_cancel=True)
            assert [m.payload for m in page] == [b"x"]


async def test_the_committer_survives_its_deadline_passing_between_two_reads_of_the_clock(monkeypatch) -> None:
    # A new operator's trial (HIGH): _deferred read the clock for its loop
    # test, then again for its sleep; when the loop's thread lost the GIL in
    # between (to the log's flush worker, a checkpoint) past the deadline,
    # trio.sleep got a negative time and the ValueError ended `pimcore serve`.
    # Here every third read of the clock comes 20 ms late.
    from types import SimpleNamespace

    from pimcore.net import server as server_module

    real = trio.current_time
    reads = [0]

    def late_clock() -> float:
        reads[0] += 1
        return real() + (0.02 if reads[0] % 3 == 0 else 0.0)

    class Due(Exception):
        pass

    class Store:
        def commit_delay(self) -> float:
            return 0.005  # an open transaction due in 5 ms

        def commit_open(self) -> None:
            raise Due

    monkeypatch.setattr(server_module.trio, "current_time", late_clock)
    with trio.fail_after(5):
        with pytest.raises(Due):  # it reached the commit, not a ValueError
            await server_module.BrokerServer._deferred(SimpleNamespace(store=Store(), _defer_wake=trio.Event()))  # type: ignore[arg-type]
