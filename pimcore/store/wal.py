"""The command log of the LMDB store's ``log`` durability: one flush per
durable commit.

Why it exists: LMDB's durable commit flushes the disk twice -- the data
pages, then the meta page that makes them current (a meta page on disk ahead
of its pages would point at garbage).  On the 2-core VM of BENCHMARKS.md the
two flushes are about 240 µs of a 1 x 1 round trip; one ``fdatasync`` of a
few hundred bytes appended to an already written file is about 75 µs.

How (the command log of Redis's AOF and VoltDB, the checkpoint of ARIES-style
recovery, applied to LMDB's copy-on-write pages):

* Every :class:`~pimcore.store.base.WriteBatch` is appended here and
  ``fdatasync``'d *before* LMDB commits it, and LMDB commits without flushing
  (``MDB_NOSYNC``).  A batch is durable when its log record is; the caller acks
  after :meth:`LmdbStore.commit` returns, as before.  A batch's record is
  written (:meth:`CommandLog.write`) and then flushed by a worker thread
  while LMDB applies the batch (``_LogState.overlap_ops``: every batch of two
  ops or more with the compiled fast path, whose worker needs no GIL); LMDB
  still commits only after the flush.  A
  record whose batch then does not commit (the apply or LMDB's commit failed)
  is taken back out (:meth:`CommandLog.rewind`) before the write lock is let
  go, so the log holds exactly LMDB's commits, in LMDB's order.
* A **checkpoint** makes LMDB itself durable up to a transaction S: right
  after S commits the writer reads LMDB's two meta pages (the page cache holds
  S's), starts a read transaction at S (the **pin**), and a thread then
  ``fdatasync``'s the data file and writes the checkpoint file (S's meta
  pages and the log position after S's record; written to a temporary file,
  flushed, renamed, directory flushed).  Only then is the previous pin let go.
* Why the pin: with ``MDB_NOSYNC`` a power cut can leave a later meta page on
  disk without its pages, and LMDB reuses freed pages once no reader needs
  them.  A reader at S keeps every page of S's tree (and of every later tree)
  from being reused, so after a crash S's tree is intact on disk whatever
  else reached it.
* Recovery (:func:`restore_meta` then the store's replay): if the data file's
  meta pages are not the checkpoint's, they are written back (LMDB then opens
  at S), and every log record after S is applied again, in order, through the
  same code that applied it first.  Replay is deterministic: a batch carries
  all its inputs (times, ids), the store reads nothing else.
* The log is two files used in turn (``log-0``, ``log-1``).  The writer moves
  to the other file once the current one passes ``switch_bytes`` and a
  durable checkpoint replays from the current one (so nothing in the other
  is needed); each file starts with the LSN of its first record and a fresh
  salt, so recovery continues from one into the other.

Record: ``magic u32 | length u32 | lsn u64 | crc32 u32`` (little endian, the
CRC over the file's salt, the lsn and the payload), then ``length`` bytes of
payload.  Recovery stops at the first record whose magic, length, LSN (must
be the next one) or CRC does not hold: a torn tail, never acked, or what an
earlier use of the file left.

Only one process writes a store in ``log`` durability (the owner: the broker
or a maintenance open that found no broker running); see
:class:`~pimcore.store.lmdb.LmdbStore`.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from dataclasses import dataclass, replace
from typing import Iterator, NamedTuple, Optional

from ..errors import StoreError

__all__ = [
    "CommandLog", "Written", "Checkpoint", "read_checkpoint", "write_checkpoint", "restore_meta", "meta_txnid", "LogFile",
    "LogSummary", "summarize",
]

_REC = struct.Struct("<IIQI")
_REC_MAGIC = 0x474C4350  # "PCLG"
_FILE_HEAD = struct.Struct("<8sQ8s")  # magic, first lsn, salt
_FILE_MAGIC = b"PCLOG002"
_CKPT_HEAD = struct.Struct("<8sIQIQ")  # magic, page size, next lsn, file, offset
_CKPT_MAGIC = b"PCCKPT01"
_U32 = struct.Struct("<I")
#: Largest record the log takes (a batch is far smaller: the core bounds
#: batches; this only stops a garbage length from being believed).
MAX_RECORD = 1 << 30
_GROW = 1 << 20  # the log file is extended with written zeros, 1 MiB at a time
#: Byte offset of ``mm_txnid`` in an LMDB meta page on 64-bit builds: the
#: 16-byte page header, then magic, version (u32 each), address, mapsize
#: (8 each), two 48-byte MDB_db records, last_pg (8).  (lmdb.h, MDB_meta.)
_TXNID_AT = 16 + 4 + 4 + 8 + 8 + 2 * 48 + 8
_META_MAGIC = 0xBEEFC0DE


def _crc(salt: bytes, lsn: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(salt + struct.pack("<Q", lsn)))


def meta_txnid(page: bytes) -> int:
    """The transaction id an LMDB meta page records (-1 if ``page`` is not a
    meta page)."""
    if len(page) < _TXNID_AT + 8 or _U32.unpack_from(page, 16)[0] != _META_MAGIC:
        return -1
    return int(struct.unpack_from("<Q", page, _TXNID_AT)[0])


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """LMDB durable up to the transaction whose meta pages these are; replay
    the log from ``next_lsn`` at (``file``, ``offset``)."""

    page_size: int
    next_lsn: int
    file: int  # 0 or 1: which log file
    offset: int  # bytes
    meta: bytes  # pages 0 and 1 of data.mdb, 2 * page_size bytes

    @property
    def txnid(self) -> int:
        return max(meta_txnid(self.meta[: self.page_size]), meta_txnid(self.meta[self.page_size :]))


def read_checkpoint(dirpath: str) -> Optional[Checkpoint]:
    """The checkpoint in ``dirpath`` or None if there is none.  Raises
    StoreError if it is there but damaged (it is written by rename, so it is
    whole or absent unless the disk lies)."""
    path = os.path.join(dirpath, "checkpoint")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read the command log checkpoint {path!r}: {exc}") from exc
    if len(raw) < _CKPT_HEAD.size + 4 or zlib.crc32(raw[:-4]) != _U32.unpack_from(raw, len(raw) - 4)[0]:
        raise StoreError(f"the command log checkpoint {path!r} is damaged")
    magic, psize, next_lsn, file, offset = _CKPT_HEAD.unpack_from(raw)
    meta = raw[_CKPT_HEAD.size : -4]
    if magic != _CKPT_MAGIC or file not in (0, 1) or len(meta) != 2 * psize:
        raise StoreError(f"the command log checkpoint {path!r} is not one this code reads")
    return Checkpoint(psize, next_lsn, file, offset, meta)


def write_checkpoint(dirpath: str, ckpt: Checkpoint, *, dir_fd: Optional[int] = None) -> None:
    """Write ``ckpt`` durably: a temporary file, flushed, renamed over the old
    one, the directory flushed (through ``dir_fd``, the caller's descriptor
    of ``dirpath``, if given).  Raises OSError if any step failed (out of
    file descriptors, the disk full): the old checkpoint is then still the
    one recovery reads."""
    body = _CKPT_HEAD.pack(_CKPT_MAGIC, ckpt.page_size, ckpt.next_lsn, ckpt.file, ckpt.offset) + ckpt.meta
    body += _U32.pack(zlib.crc32(body))
    tmp = os.path.join(dirpath, "checkpoint.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _pwrite_all(fd, body, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(dirpath, "checkpoint"))
    if dir_fd is None:
        _sync_dir(dirpath)
    else:
        os.fsync(dir_fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` or raise OSError.  ``pwrite``
    writes what fits and returns the count when the disk (or RLIMIT_FSIZE)
    runs out mid-way; only the next call fails -- a record or checkpoint
    silently cut short would pass its flush and be lost."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _sync_dir(dirpath: str) -> None:
    fd = os.open(dirpath, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta_pages(data_path: str, page_size: int) -> bytes:
    """Pages 0 and 1 of ``data_path`` as the page cache has them."""
    fd = os.open(data_path, os.O_RDONLY)
    try:
        return os.pread(fd, 2 * page_size, 0)
    finally:
        os.close(fd)


def read_meta_pages_at(fd: int, page_size: int) -> bytes:
    """Pages 0 and 1 of the data file open as ``fd`` (the log store keeps it
    open: a checkpoint opens no file to read them).  Raises OSError if they
    cannot be read whole."""
    meta = os.pread(fd, 2 * page_size, 0)
    if len(meta) != 2 * page_size:
        raise OSError(errno.EIO, f"short read of LMDB's meta pages ({len(meta)} of {2 * page_size} bytes)")
    return meta


def restore_meta(data_path: str, ckpt: Checkpoint) -> bool:
    """Put the checkpoint's meta pages back into ``data_path`` if they are not
    there (True if they were written).  Call only while no process has the
    LMDB environment open: LMDB keeps the current transaction id in its lock
    file while any process has it open."""
    if read_meta_pages(data_path, ckpt.page_size) == ckpt.meta:
        return False
    fd = os.open(data_path, os.O_RDWR)
    try:
        _pwrite_all(fd, ckpt.meta, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


class Written(NamedTuple):
    """A record :meth:`CommandLog.write` wrote, not yet flushed."""

    #: The file descriptor to ``fdatasync``.
    fd: int
    lsn: int
    #: The offset right after the record, in its file.
    end: int
    #: Its bytes, header included.
    size: int


class CommandLog:
    """The two log files of one store (module docstring).

    A file starts with a header: magic, the LSN of its first record and a
    random salt drawn when the file is (re)started.  The salt is part of
    every record's CRC, so bytes left from an earlier use of the file --
    including a payload a client chose, which could look like a record --
    never pass for a record of this one.

    Not thread-safe: the store calls :meth:`append` and :meth:`position`
    under its write lock; :meth:`covered` (from the checkpoint thread) only
    moves numbers under the log's own lock.
    """

    def __init__(self, dirpath: str, *, switch_bytes: int = 8 << 20) -> None:
        os.makedirs(dirpath, mode=0o700, exist_ok=True)  # (private, as the store: lmdb._DIR_MODE)
        self.dir = dirpath
        self.switch_bytes = switch_bytes
        self._fds: list[int] = []
        for i in (0, 1):
            path = os.path.join(dirpath, f"log-{i}")
            existed = os.path.exists(path)
            self._fds.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            if not existed:
                _sync_dir(dirpath)
        self._sizes = [os.fstat(fd).st_size for fd in self._fds]
        self._lock = threading.Lock()
        #: The file the newest durable checkpoint replays from (-1: none yet).
        self._covered_file = -1
        self.file = 0
        self.offset = _FILE_HEAD.size
        self.next_lsn = 1
        self._salts = [b"", b""]
        #: Bytes appended by this handle (checkpoint pacing).
        self.appended = 0
        #: (file, offset) of the last record appended (for :meth:`rewind`).
        self._last: Optional[tuple[int, int]] = None

    @classmethod
    def _reader(cls, dirpath: str, fds: list[int]) -> "CommandLog":
        """A log over ``fds`` (the two files, opened read-only by the
        caller, who closes them) for :meth:`records` only: unlike
        ``__init__`` it creates nothing."""
        log = cls.__new__(cls)
        log.dir, log._fds, log._salts = dirpath, fds, [b"", b""]
        log.file, log.offset, log.next_lsn, log._covered_file = 0, _FILE_HEAD.size, 1, -1
        return log

    # ---------------------------------------------------------------- read

    def records(self, ckpt: Checkpoint) -> Iterator[tuple[int, bytes]]:
        """(lsn, payload) of every record after ``ckpt``, in order: from the
        file and offset it names, then on into the other file whenever that
        one starts with the next LSN.  Afterwards the writer continues right
        after the last one; the caller checkpoints before writing."""
        file, offset, lsn = ckpt.file, ckpt.offset, ckpt.next_lsn
        moved_at = -1
        self._salts[file] = self._header(file)[1]
        while True:
            for rec_lsn, payload, end in self._scan(file, offset, lsn):
                # While the caller applies this record the position is the
                # record's own (a checkpoint taken meanwhile -- the map grew --
                # replays from it).
                self.file, self.offset, self.next_lsn = file, offset, lsn
                yield rec_lsn, payload
                lsn, offset = rec_lsn + 1, end
                # (Applied: a checkpoint from here on -- the close of a start
                # the rest of the log stopped -- must not replay it again.)
                self.offset, self.next_lsn = offset, lsn
            other = 1 - file
            if self._header(other)[0] != lsn or moved_at == lsn:  # (no record since the last move: stop)
                break
            file, offset, moved_at = other, _FILE_HEAD.size, lsn
        self.file, self.offset, self.next_lsn = file, offset, lsn
        self._salts[file] = self._header(file)[1]
        self._covered_file = -1

    def reset(self) -> None:
        """Start a new log (no checkpoint refers to the old one): both files
        emptied, LSNs from 1."""
        for fd in self._fds:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        self._sizes = [0, 0]
        self.file, self.offset, self.next_lsn = 0, _FILE_HEAD.size, 1
        self._last = None
        self._salts = [b"", b""]
        self._covered_file = -1

    def _header(self, file: int) -> tuple[int, bytes]:
        """(first lsn, salt) of ``file``, (0, b"") if it has no header."""
        raw = os.pread(self._fds[file], _FILE_HEAD.size, 0)
        if len(raw) < _FILE_HEAD.size:
            return 0, b""
        magic, first, salt = _FILE_HEAD.unpack(raw)
        return (int(first), salt) if magic == _FILE_MAGIC else (0, b"")

    def _scan(self, file: int, offset: int, lsn: int) -> Iterator[tuple[int, bytes, int]]:
        fd = self._fds[file]
        salt = self._header(file)[1]
        if not salt:
            return
        while True:
            head = os.pread(fd, _REC.size, offset)
            if len(head) < _REC.size:
                return
            magic, length, rec_lsn, crc = _REC.unpack(head)
            if magic != _REC_MAGIC or rec_lsn != lsn or length > MAX_RECORD:
                return
            payload = os.pread(fd, length, offset + _REC.size)
            if len(payload) != length or _crc(salt, rec_lsn, payload) != crc:
                # Only the last record can be torn (each is flushed before
                # the next is written): an intact next one means this one
                # was acked and damaged since -- stop, do not drop it.
                if len(payload) == length and self._intact(fd, salt, offset + _REC.size + length, lsn + 1):
                    raise StoreError(
                        f"record {lsn} of the command log {self.dir!r}/log-{file} is damaged (at byte {offset})"
                        " and records after it are intact: the log cannot be replayed; restore the store from"
                        " a backup"
                    )
                return
            yield rec_lsn, payload, offset + _REC.size + length
            offset += _REC.size + length
            lsn += 1

    @staticmethod
    def _intact(fd: int, salt: bytes, offset: int, lsn: int) -> bool:
        """Is there a whole record ``lsn`` of this file at ``offset``?"""
        head = os.pread(fd, _REC.size, offset)
        if len(head) < _REC.size:
            return False
        magic, length, rec_lsn, crc = _REC.unpack(head)
        if magic != _REC_MAGIC or rec_lsn != lsn or length > MAX_RECORD:
            return False
        payload = os.pread(fd, length, offset + _REC.size)
        return len(payload) == length and _crc(salt, rec_lsn, payload) == crc

    # --------------------------------------------------------------- write

    def start(self) -> None:
        """Begin writing at the current position; a file without a header
        (a new log) gets one first, flushed."""
        if not self._salts[self.file]:
            self._begin_file(self.file, self.next_lsn)
            os.fdatasync(self._fds[self.file])

    def _begin_file(self, file: int, lsn: int) -> None:
        salt = os.urandom(8)
        _pwrite_all(self._fds[file], _FILE_HEAD.pack(_FILE_MAGIC, lsn, salt), 0)
        # (The header is part of the file now: a zero extension starts after it.)
        self._sizes[file] = max(self._sizes[file], _FILE_HEAD.size)
        self._salts[file] = salt
        self.file, self.offset = file, _FILE_HEAD.size

    def append(self, payload: bytes) -> int:
        """Write one record and ``fdatasync`` it; returns its LSN.  Raises
        OSError if the disk refuses (the caller must then stop writing: after
        a failed flush the page cache's state is unknown); ValueError, before
        writing anything, for a payload over MAX_RECORD bytes (recovery would
        read it as a torn tail and stop there, dropping it and every later
        record)."""
        written = self.write(payload)
        os.fdatasync(written.fd)
        return self.flushed(written)

    def write(self, payload: bytes) -> "Written":
        """:meth:`append` without the flush, which the caller does next:
        ``os.fdatasync(written.fd)`` (in another thread if it likes), then
        :meth:`flushed` with what this returned -- nothing else may be
        appended in between.  Until then the log's position is still before
        the record (a failed flush leaves it there; the caller stops
        writing, as after a failed append).  Raises as :meth:`append`."""
        self._last = None  # (first: rewind() must never zero an earlier record)
        if len(payload) > MAX_RECORD:
            raise ValueError(f"a command log record holds at most {MAX_RECORD} bytes, not {len(payload)}:"
                             " commit smaller batches")
        lsn = self.next_lsn
        if self.offset >= self.switch_bytes and self._other_free():
            # (Its header reaches the disk with this record's flush.)
            self._begin_file(1 - self.file, lsn)
        fd = self._fds[self.file]
        head = _REC.pack(_REC_MAGIC, len(payload), lsn, _crc(self._salts[self.file], lsn, payload))
        end = self.offset + _REC.size + len(payload)
        size = self._sizes[self.file]
        if end > size:
            # Extend with written zeros (not a hole, not fallocate: an
            # overwrite of written blocks needs no journal commit on ext4,
            # so the per-record flush stays one device flush).
            new = (end // _GROW + 1) * _GROW
            _pwrite_all(fd, bytes(new - size), size)
            self._sizes[self.file] = new
        # (Before the write: whatever cuts this append short from here on,
        # rewind() knows where to zero.)
        self._last = (self.file, self.offset)
        _pwrite_all(fd, head + payload, self.offset)
        return Written(fd, lsn, end, len(head) + len(payload))

    def flushed(self, written: "Written") -> int:
        """The record :meth:`write` wrote is flushed: the log's position
        moves past it (once: called again, nothing changes).  Returns its
        LSN."""
        if self.next_lsn != written.lsn:
            return written.lsn  # (moved already)
        self.appended += written.size
        self.offset = written.end
        self.next_lsn = written.lsn + 1
        return written.lsn

    def rewind(self, position: tuple[int, int, int]) -> None:
        """Take back the last record, or what an append cut short wrote of
        it: ``position`` is :meth:`position` from right before that append.
        Its header is overwritten with zeros and flushed, so recovery ends
        the log before it, and the next record is written in its place.  Raises OSError if the disk refuses (the
        caller must then stop writing, as after a failed append).

        Why a record is taken back: the store flushes a big batch's record
        while LMDB applies the batch, so the record can be durable before
        the apply fails (a map at its ceiling, an interrupt); the log must
        then not hold it, or a restart would apply a batch that was refused.
        A crash before this flush completes leaves the record in the log: the
        restart applies it, and the client, told the batch failed, retries
        and is answered Duplicate -- as after a crash between any record's
        flush and its ack.
        """
        if self._last is not None:  # (None: the append wrote nothing)
            file, offset = self._last
            fd = self._fds[file]
            # Only a header of the record taken back (its LSN is the one
            # ``position`` names next) is zeroed: an append cut short before
            # it wrote anything leaves no such header, and an earlier record
            # (an older LSN) must never be touched.
            head = os.pread(fd, _REC.size, offset)
            if len(head) == _REC.size and _REC.unpack(head)[0] == _REC_MAGIC and _REC.unpack(head)[2] == position[0]:
                _pwrite_all(fd, bytes(_REC.size), offset)
                os.fdatasync(fd)
        # (If the record began the other file, that file's header stays: it
        # names an LSN recovery finds no record for, and the next switch
        # writes a new one.)
        self.next_lsn, self.file, self.offset = position
        self._last = None

    def _other_free(self) -> bool:
        """May the other file be overwritten?  Only once a durable checkpoint
        replays from this file: recovery then never reads the other one's
        old records (nor starts inside them)."""
        with self._lock:
            return self._covered_file == self.file

    def position(self) -> tuple[int, int, int]:
        """(next lsn, file, offset): where replay after the last appended
        record would start."""
        return self.next_lsn, self.file, self.offset

    def covered(self, ckpt: Checkpoint) -> None:
        """``ckpt`` is durable: records before it are needed no more."""
        with self._lock:
            self._covered_file = ckpt.file

    def close(self) -> None:
        """Close the log's files (again after a close cut short: the rest)."""
        fds = self._fds
        while fds:
            # Forgotten, then closed: a close cut short between the two
            # leaks that one fd rather than have a second close() close a
            # number the process may have reused meanwhile.
            os.close(fds.pop())

    def remove(self) -> None:
        """Close and delete the log and its checkpoint (the store leaves
        ``log`` durability, with everything already durable in LMDB)."""
        self.close()
        for name in ("checkpoint", "log-0", "log-1", "checkpoint.tmp"):
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
        _sync_dir(self.dir)



@dataclass(frozen=True, slots=True)
class LogFile:
    """One file of the command log as :func:`summarize` found it."""

    name: str  # "log-0" or "log-1"
    size: int  # bytes (the file is extended 1 MiB at a time, so mostly zeros at its end)
    first_lsn: int  # the LSN its header names; 0: no header yet (an unused file)


@dataclass(frozen=True, slots=True)
class LogSummary:
    """What a store's ``log/`` directory holds, read without writing,
    creating or locking anything (:func:`summarize`).  The ``checkpoint_*``
    fields are None when there is no checkpoint (or it cannot be read:
    ``problem`` says why).

    * ``checkpoint_next_lsn``: the first record a recovery would replay.
    * ``checkpoint_file``, ``checkpoint_offset``: where it starts (0 or 1;
      bytes into that file).
    * ``checkpoint_txnid``: the LMDB transaction the checkpoint made durable.
    * ``checkpoint_written_at``: when the checkpoint file was written (its
      mtime), microseconds since the Unix epoch.
    * ``records_after_checkpoint``: intact records after the checkpoint at
      the time of reading: batches a recovery would replay (while a broker
      runs, those it committed since its last checkpoint).
    """

    path: str
    files: tuple[LogFile, ...]
    checkpoint_next_lsn: Optional[int] = None
    checkpoint_file: Optional[int] = None
    checkpoint_offset: Optional[int] = None
    checkpoint_txnid: Optional[int] = None
    checkpoint_written_at: Optional[int] = None
    records_after_checkpoint: Optional[int] = None
    problem: Optional[str] = None


def summarize(dirpath: str) -> LogSummary:
    """The command log in ``dirpath`` (a store's ``log/``), read only: files
    opened read-only, nothing created, written or locked, no record
    replayed.  Safe while a broker writes the log (a record being appended
    is not counted yet)."""
    files = []
    fds = []
    try:
        for i in (0, 1):
            path = os.path.join(dirpath, f"log-{i}")
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = os.open(os.devnull, os.O_RDONLY)  # (reads as empty: no header, no record)
            else:
                files.append(LogFile(f"log-{i}", os.fstat(fd).st_size, 0))
            fds.append(fd)
        reader = CommandLog._reader(dirpath, fds)
        files = [replace(f, first_lsn=reader._header(int(f.name[-1]))[0]) for f in files]
        try:
            ckpt = read_checkpoint(dirpath)
        except StoreError as exc:
            return LogSummary(dirpath, tuple(files), problem=str(exc))
        if ckpt is None:
            return LogSummary(dirpath, tuple(files))
        try:
            written = os.stat(os.path.join(dirpath, "checkpoint")).st_mtime_ns // 1000
        except OSError:
            written = None
        problem = None
        count = 0
        try:
            for _ in reader.records(ckpt):
                count += 1
        except (StoreError, OSError) as exc:
            problem = str(exc)
        return LogSummary(dirpath, tuple(files), ckpt.next_lsn, ckpt.file, ckpt.offset, ckpt.txnid, written,
                          count, problem)
    finally:
        for fd in fds:
            os.close(fd)
