"""Multi-writer machinery of :class:`~pimcore.store.redis.RedisStore`:
server-side Lua scripts, one per step, each on ONE slot (so each step is
atomic on its master whatever other ``pimcore serve`` nodes do at the same
time), plus the flows that chain them, the cross-node hints and the outbox
sweep.  docs/OPERATIONS.md ("Redis Cluster") describes the deployment.

Why scripts: the generic request path of :mod:`pimcore.store.redis` computes
values from reads and writes them back, which is right only for one writer.
Here every read-modify-write runs inside Redis, next to the data.

A send (:class:`NewMessage`), in three rounds, each ending with ``WAIT 1``
on every master written (group commit: one replication wait per master per
round, however many sends the batch holds):

1. CLAIM on the sender's slot: the dedupe record ``d:DEVICE/LOCAL_ID`` is
   created as a *claim* (``P:`` msg id, server time, digest, conversation)
   unless one exists.  An existing final record -> :class:`Duplicate` (or
   DUPLICATE_CONFLICT); an existing claim with the same digest (a node died
   half-way, or the client retried through another node while the first
   was still at work) -> this node finishes THAT message (same msg id and
   server time), so a retry never makes a second message.
2. SEND on the conversation's slot: idempotent by msg id (``m:MSGID``);
   checks the group and the membership, takes the next seq, stores the log
   entry and an outbox entry (``NS:{c:CONV}:ob``: seq -> server time).
3. FANOUT per recipient on the recipient's slot: appends an inbox pointer
   unless that seq of that conversation was delivered already (``ld:CONV`` =
   last delivered seq and its position: fan-out is idempotent and inbox
   order per conversation is seq order); a gap (an earlier seq of the
   conversation not delivered yet, e.g. sent through another node that has
   not fanned out yet) is refused and the node backfills the missing seqs
   from the conversation log first.  Beside it, in the same round: the
   final dedupe record, the msg id lookup, the host event (idempotent by
   msg id).  Then the outbox entry is removed (no wait: a leftover entry
   only makes a sweep redo idempotent work).

The SendAck goes out after round 3: acked means the message, its seq and
every recipient's inbox entry are on a replica.

A recall or edit (:class:`AmendMessage`) takes the same three rounds: the
CLAIM (the key space of sends); AMEND on the conversation's slot, a
compare-and-set -- the checks of ``amend_problem`` run in Python on one
snapshot, and the script takes the seq and rewrites the target only if the
group, the sender's membership and the target's record are still what was
checked (else read and check again); the same fan-out.  A delete for oneself
takes no seq: DELETE appends it to the sender's own inbox on the sender's
slot, with the final dedupe record, atomically.

Crash net: a node that dies between rounds leaves a claim (finished by the
client's retry) and/or an outbox entry; every node sweeps the outboxes
(``SCAN`` per master, entries older than ``sweep_after`` seconds) and
completes round 3 for them.

Hints: the fan-out returns the node ids holding the recipient's devices
(``NS:{u:USER}:on`` device -> node, written at login unless a newer login
of the device is recorded in ``NS:{u:USER}:ont``); a hint ``I user head``
is pushed to each such node's list ``NS:{n:NODE}`` (``BLPOP``-ed by that
node) -- a wake-up only: delivery correctness comes from inbox positions,
and a lost hint only delays until the device's next read (each node also
re-checks the heads of its online users every ``recheck`` seconds).  A login
records the device's node; if another node held it, that node gets
``R user device`` and closes its session with REPLACED.  What is not an
inbox entry travels the same way, pushed after its write request committed
(:meth:`ClusterOps.after_commit`, either write path) to the nodes where the
user concerned has a device online (:func:`_parse_hint` gives the formats):
a read marker (``M``) to the reader's other nodes and its receipt (``C``) to
a 1:1 peer's; a revocation (``V``); a purge of the user (``K`` and ``V``);
conversation settings (``U``); a host's kick (``K``, recorded as
``kk:DEVICE`` by :meth:`ClusterOps.kick`).  Each of those changes, in the
script that makes it, moves the user's state version (``sv`` in the user's
hash) and lists the change under it (``NS:{u:USER}:sc``, a sorted set;
a receipt on the peer's slot, in the same round as the marker).  The
re-check reads ``sv`` beside ``head``; a version past what the node knows
makes it read what changed since and deliver it as the hints would have: a
lost hint delays by at most ``recheck`` seconds (a revoked or kicked
session ends within that; docs/OPERATIONS.md, Redis Cluster).

Epoch: one per namespace (``epoch`` in ``NS:{meta}``), shared by every
node.  A node remembers the seqs and inbox positions it handed out; a script
answer at or below one of them (a failover lost acknowledged writes) is
data loss: the namespace gets a new epoch (clients resynchronize) and every
node stops (the watcher sees the new epoch within a second) -- detected,
never silently skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import hiredis
import trio

from ..errors import ErrorCode, StoreError
from .base import (
    OPEN,
    SYSTEM,
    AckEvents,
    ConsumerDeleted,
    DeleteConsumer,
    AmendMessage,
    AckPosition,
    Acked,
    AddMembers,
    AppendEvent,
    Appended,
    ConversationSet,
    CreateGroup,
    Duplicate,
    EventAppended,
    EventsAcked,
    GroupChanged,
    MarkRead,
    MessageKind,
    NewMessage,
    ReadMarked,
    Reclaim,
    Reclaimed,
    Rejected,
    RemoveMembers,
    Result,
    RevokeTokens,
    Revoked,
    SetConversation,
    StoredMessage,
    TouchDevice,
    Touched,
    amend_entry,
    amend_problem,
    amended,
    direct_members,
    last_visible,
    malformed,
    member_ranges,
    mentioned_recipients,
    message_event,
    valid_conversation,
    hidden_amend,
    sees,
    visible_ranges,
)

if TYPE_CHECKING:  # pragma: no cover
    from .redis import RedisStore

__all__ = ["SCRIPTED", "ClusterOps", "DataLost"]

#: The ops this module runs (every op the core makes, and every op that
#: takes a seq or an inbox position or merges into a shared field); the
#: others (SetPresencePrivacy, SetRetention, Expire, PurgeConversation,
#: PurgeUser) take the generic request path: see the pimcore.store.redis
#: docstring for why that is safe beside other nodes.
SCRIPTED = frozenset({NewMessage, AmendMessage, AckPosition, TouchDevice, MarkRead, Reclaim, CreateGroup, AddMembers,
                      RemoveMembers, RevokeTokens, AppendEvent, AckEvents, DeleteConsumer, SetConversation})

_LIB = """
local function S(n) return string.format('%.0f', n) end
local function N(v) if v then return tonumber(v) end return 0 end
-- A change of a user's state that is not an inbox entry: the user's state
-- version moves and the change is listed under it (ClusterOps.change_key),
-- in the script that makes the change (a node's re-check finds it even if
-- its hint is lost).
local function B(u, sc, member)
  local v = redis.call('HINCRBY', u, 'sv', 1)
  redis.call('ZADD', sc, v, member)
  return v
end
"""

def _claim(op: Any) -> str:
    """A send's dedupe claim (the CLAIM script's value): "P:" msg id, server
    time, digest and conversation, until its final record replaces it."""
    return f"P:{op.msg_id.hex()}:{op.server_time}:{op.digest.hex()}:{op.conv}"


# KEYS: user. ARGV: field, claim value. -> nil (claimed) or the existing value.
CLAIM = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then return v end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return false
"""

# KEYS: conv, outbox. ARGV: msghex, sender, direct, blob, after_seq, server_time,
# system, direct members, event flag, replay (finishing a claim: the msg id may be stored).
# -> {seq, members, after_seq, server_time, replayed} or {code}: -1 unknown
# group, -2 not a member, -3 msg id taken, -4 after_seq at or below the
# group's purge point ('pp': base.NewMessage, PURGED)
SEND = _LIB + """
local c = KEYS[1]
local mem
if ARGV[3] == '1' then mem = ARGV[8] else
  if not redis.call('HGET', c, 'grp') then return {-1} end
  mem = redis.call('HGET', c, 'mem') or ''
end
local prior = redis.call('HGET', c, 'm:' .. ARGV[1])
if prior and ARGV[10] ~= '1' then
  -- This very send again finds its own entry: its round retried (the answer
  -- was lost after the write), or another node that found this node's claim
  -- stored it (one post through two nodes at once, each stamping its own
  -- client time) -- the same bytes but seq, client time and after_seq;
  -- anything else with this msg id is another message (a broken clock).
  local b, a = redis.call('HGET', c, 's:' .. prior), ARGV[4]
  if not b or string.sub(b, 1, 16) .. string.sub(b, 25, 32) .. string.sub(b, 41, 48) .. string.sub(b, 57)
      ~= string.sub(a, 1, 16) .. string.sub(a, 25, 32) .. string.sub(a, 41, 48) .. string.sub(a, 57) then return {-3} end
end
if prior then
  local b = redis.call('HGET', c, 's:' .. prior)
  return {tonumber(prior), mem, struct.unpack('>I8', b, 49), struct.unpack('>i8', b, 41), 1}
end
if ARGV[2] ~= ARGV[7] and not string.find('\\n' .. mem .. '\\n', '\\n' .. ARGV[2] .. '\\n', 1, true) then
  return {-2}
end
local a = tonumber(ARGV[5])
if ARGV[3] ~= '1' and a > 0 and a <= N(redis.call('HGET', c, 'pp')) then return {-4} end
local seq = N(redis.call('HGET', c, 'last')) + 1
local after = math.min(a, seq - 1)
local b = ARGV[4]
b = string.sub(b, 1, 16) .. struct.pack('>I8', seq) .. string.sub(b, 25, 48) .. struct.pack('>I8', after) .. string.sub(b, 57)
redis.call('HSET', c, 'last', S(seq), 's:' .. S(seq), b, 'm:' .. ARGV[1], S(seq))
redis.call('HSET', KEYS[2], S(seq), ARGV[6] .. ':' .. ARGV[9])
return {seq, mem, after, tonumber(ARGV[6]), 0}
"""

# KEYS: conv, outbox. ARGV: msghex, direct, check member ('1': the sender must
# be a member now), sender, target seq, the target's record as checked, the
# target's record after the amend, entry blob, server_time, event flag,
# replay (finishing a claim: the msg id may be stored), direct members.
# Compare-and-set: the checks (pimcore.store.base.amend_problem) ran in
# Python on what was read; what they depend on -- the group, the sender's
# membership, the target's record -- is compared here, next to the data, and
# anything changed since -> {-4} (read again, check again).
# -> {seq, members, replayed, entry blob} or {code}: -3 msg id taken, -4 changed
AMEND = _LIB + """
local c = KEYS[1]
local mem
if ARGV[2] == '1' then mem = ARGV[12] else
  if not redis.call('HGET', c, 'grp') then return {-4} end
  mem = redis.call('HGET', c, 'mem') or ''
end
local prior = redis.call('HGET', c, 'm:' .. ARGV[1])
if prior and ARGV[11] ~= '1' then return {-3} end
if prior then return {tonumber(prior), mem, 1, redis.call('HGET', c, 's:' .. prior)} end
if ARGV[3] == '1' and not string.find('\\n' .. mem .. '\\n', '\\n' .. ARGV[4] .. '\\n', 1, true) then
  return {-4}
end
if redis.call('HGET', c, 's:' .. ARGV[5]) ~= ARGV[6] then return {-4} end
local seq = N(redis.call('HGET', c, 'last')) + 1
local b = ARGV[8]
b = string.sub(b, 1, 16) .. struct.pack('>I8', seq) .. string.sub(b, 25, 48) .. struct.pack('>I8', seq - 1) .. string.sub(b, 57)
redis.call('HSET', c, 'last', S(seq), 's:' .. S(seq), b, 'm:' .. ARGV[1], S(seq), 's:' .. ARGV[5], ARGV[7])
redis.call('HSET', KEYS[2], S(seq), ARGV[9] .. ':' .. ARGV[10])
return {seq, mem, 0, b}
"""

# A DELETE (delete for oneself: no seq, only the sender's own inbox).
# KEYS: user, online. ARGV: dedupe field, final dedupe record, deletion field
# (del:CONV/SEQ), inbox ref (xMSGID:ST:CONV), msghex, conv.  Idempotent: the
# final dedupe record is written with the entry, so a retried round that
# finds it appends nothing (the position then comes from ``lx``, the user's
# last DELETE: msghex:position).
# -> {position (0: unknown), head, nodes, was_new}
DELETE = _LIB + """
local u = KEYS[1]
local head = N(redis.call('HGET', u, 'head'))
if redis.call('HGET', u, ARGV[1]) == ARGV[2] then
  local lx = redis.call('HGET', u, 'lx') or ''
  local m, p = string.match(lx, '^(%x+):(%d+)$')
  local pos = 0
  if m == ARGV[5] then pos = tonumber(p) end
  return {pos, head, redis.call('HVALS', KEYS[2]), 0}
end
local fresh = 0
if head == 0 then fresh = 1 end
head = head + 1
redis.call('HSET', u, ARGV[1], ARGV[2], ARGV[3], '1', 'i:' .. S(head), ARGV[4], 'head', S(head),
           'lx', ARGV[5] .. ':' .. S(head))
local f = N(redis.call('HGET', u, 'cv:' .. ARGV[6]))
if f % 4 < 2 then redis.call('HSET', u, 'cv:' .. ARGV[6], S(f + 2)) end
return {head, head, redis.call('HVALS', KEYS[2]), fresh}
"""

# SetConversation: the user's settings of a conversation (one field,
# PINNED:MUTED:HIDDEN_AT), merged here so that two devices changing
# different settings through two nodes at once both win.
# KEYS: user, the user's changes. ARGV: conv, pinned, muted, hidden (0 keep, 1 on, 2 off),
# hidden_at for hidden on.  -> {old, new} ('0:0:0' = none)
SETCONV = _LIB + """
local k = 'cs:' .. ARGV[1]
local old = redis.call('HGET', KEYS[1], k) or '0:0:0'
local p, m, h = string.match(old, '^(%d):(%d):(%d+)$')
if ARGV[2] == '1' then p = '1' elseif ARGV[2] == '2' then p = '0' end
if ARGV[3] == '1' then m = '1' elseif ARGV[3] == '2' then m = '0' end
if ARGV[4] == '1' then h = ARGV[5] elseif ARGV[4] == '2' then h = '0' end
local new = p .. ':' .. m .. ':' .. h
if new ~= old then
  if new == '0:0:0' then redis.call('HDEL', KEYS[1], k) else redis.call('HSET', KEYS[1], k, new) end
  B(KEYS[1], KEYS[2], k)
end
return {old, new}
"""

# KEYS: conv. ARGV: now, hv, members (\\n-joined), users...  -> 1 created, 0 exists
CREATE = _LIB + """
local c = KEYS[1]
if redis.call('HGET', c, 'grp') then return 0 end
redis.call('HSET', c, 'grp', ARGV[1], 'hv', ARGV[2], 'mem', ARGV[3])
for i = 4, #ARGV - 1 do redis.call('HSET', c, 'sp:' .. ARGV[i], '0-' .. ARGV[#ARGV]) end
return 1
"""
# (the last ARGV of CREATE is OPEN, not a user: see ClusterOps._create_group;
# the loop once ran to #ARGV and gave every group a member named OPEN's digits,
# to whom the outbox sweep then fanned out)

# KEYS: conv, outbox. ARGV: user, add, blob, msghex, server_time, OPEN, event
# flag, guard ('1': a removal may not leave the group with no member; '0': a
# purge of the user's data), then the users the same RemoveMembers removes
# after this one.
# -> {0} no change, {-1} unknown group, {-3} msg id taken, {-4} refused: no
# member would be left (every member is this user or one of the rest; decided
# here, atomically, so concurrent removals cannot empty a group), {seq,
# recipients}, {seq, '', 1} this change's entry was stored already
# (recipients: from the spans)
CHANGE = _LIB + """
local c = KEYS[1]
if not redis.call('HGET', c, 'grp') then return {-1} end
local mem = redis.call('HGET', c, 'mem') or ''
local user, add = ARGV[1], ARGV[2] == '1'
local set, list = {}, {}
for u in string.gmatch(mem, '[^\\n]+') do set[u] = true end
if (set[user] == true) == add then
  -- Already done: by this very change if its entry is stored (the round
  -- retried after its answer was lost) -> {seq, '', 1}; else a no-op.
  local own = redis.call('HGET', c, 'm:' .. ARGV[4])
  local b, a = own and redis.call('HGET', c, 's:' .. own), ARGV[3]
  if b and string.sub(b, 1, 16) .. string.sub(b, 25, 48) .. string.sub(b, 57)
      == string.sub(a, 1, 16) .. string.sub(a, 25, 48) .. string.sub(a, 57) then return {tonumber(own), '', 1} end
  return {0}
end
if not add and ARGV[8] == '1' then
  local rest = {}
  for i = 9, #ARGV do rest[ARGV[i]] = true end
  local kept = false
  for u in pairs(set) do
    if u ~= user and not rest[u] then kept = true break end
  end
  if not kept then return {-4} end
end
if redis.call('HEXISTS', c, 'm:' .. ARGV[4]) == 1 then return {-3} end
local seq = N(redis.call('HGET', c, 'last')) + 1
local spans = redis.call('HGET', c, 'sp:' .. user) or ''
local recipients
if add then
  if spans ~= '' then spans = spans .. ',' end
  spans = spans .. S(seq) .. '-' .. ARGV[6]
  set[user] = true
  for u in pairs(set) do list[#list + 1] = u end
  table.sort(list)
  recipients = table.concat(list, '\\n')
  mem = recipients
else
  recipients = mem
  spans = string.gsub(spans, '%-(%d+)$', '-' .. S(seq))
  set[user] = nil
  for u in pairs(set) do list[#list + 1] = u end
  table.sort(list)
  mem = table.concat(list, '\\n')
end
local b = ARGV[3]
b = string.sub(b, 1, 16) .. struct.pack('>I8', seq) .. string.sub(b, 25, 48) .. struct.pack('>I8', seq - 1) .. string.sub(b, 57)
redis.call('HSET', c, 'last', S(seq), 's:' .. S(seq), b, 'm:' .. ARGV[4], S(seq), 'mem', mem, 'sp:' .. user, spans)
redis.call('HSET', KEYS[2], S(seq), ARGV[5] .. ':' .. ARGV[7])
return {seq, recipients}
"""

# KEYS: user, online. ARGV: conv, complete, dedupe field ('' none), dedupe
# record, then (seq, ref) pairs ascending.  The dedupe record (the final one
# of the user's own send) rides along: one command less per message.
# -> {-1, last delivered seq} (a gap) or {head, {seq, pos, ...}, nodes, was_new}
FANOUT = _LIB + """
local u = KEYS[1]
if ARGV[3] ~= '' then redis.call('HSET', u, ARGV[3], ARGV[4]) end
local ldk = 'ld:' .. ARGV[1]
local ld = redis.call('HGET', u, ldk)
local lseq, lpos = 0, 0
if ld then
  local a, b = string.match(ld, '^(%d+):(%d+)$')
  lseq, lpos = tonumber(a), tonumber(b)
end
if tonumber(ARGV[5]) > lseq + 1 and ARGV[2] ~= '1' then return {-1, lseq} end
local head = N(redis.call('HGET', u, 'head'))
local fresh = 0
if head == 0 then fresh = 1 end
local out = {}
for i = 5, #ARGV, 2 do
  local s = tonumber(ARGV[i])
  if s > lseq then
    head = head + 1
    redis.call('HSET', u, 'i:' .. S(head), ARGV[i + 1])
    lseq, lpos = s, head
    out[#out + 1] = s
    out[#out + 1] = head
  elseif s == lseq then
    out[#out + 1] = s
    out[#out + 1] = lpos
  end
end
redis.call('HSET', u, 'head', S(head), ldk, S(lseq) .. ':' .. S(lpos))
local f = N(redis.call('HGET', u, 'cv:' .. ARGV[1]))
if f % 4 < 2 then redis.call('HSET', u, 'cv:' .. ARGV[1], S(f + 2)) end
return {head, out, redis.call('HVALS', KEYS[2]), fresh}
"""

# KEYS: user. ARGV: conv, bit, on  -> 1 if the user hash was new
FLAG = _LIB + """
local k = 'cv:' .. ARGV[1]
local bit = tonumber(ARGV[2])
local old = N(redis.call('HGET', KEYS[1], k))
local has = math.floor(old / bit) % 2 == 1
local new = old
if ARGV[3] == '1' and not has then new = old + bit elseif ARGV[3] ~= '1' and has then new = old - bit end
if new ~= old then
  if new == 0 then redis.call('HDEL', KEYS[1], k) else redis.call('HSET', KEYS[1], k, S(new)) end
end
return 1
"""

# KEYS: user. ARGV: device, position, now  -> {position, new}
REGISTER = _LIB + """
local u = KEYS[1]
local v = redis.call('HGET', u, 'dv:' .. ARGV[1])
local head = N(redis.call('HGET', u, 'head'))
local pos, seen, new
if v then
  local a, b = string.match(v, '^(%d+):(%d+)$')
  pos, seen, new = tonumber(a), tonumber(b), 0
else
  pos, seen, new = N(redis.call('HGET', u, 'floor')), tonumber(ARGV[3]), 1
end
pos = math.max(pos, math.min(tonumber(ARGV[2]), head))
seen = math.max(seen, tonumber(ARGV[3]))
redis.call('HSET', u, 'dv:' .. ARGV[1], S(pos) .. ':' .. S(seen))
return {pos, new}
"""

# KEYS: key[, the user's changes]. ARGV: field, value, cap  -> {old, new}:
# new = max(old, min(value, cap)); a change is listed (B) if KEYS[2] is given.
MAXSET = _LIB + """
local old = N(redis.call('HGET', KEYS[1], ARGV[1]))
local new = math.max(old, math.min(tonumber(ARGV[2]), tonumber(ARGV[3])))
if new ~= old then
  redis.call('HSET', KEYS[1], ARGV[1], S(new))
  if KEYS[2] then B(KEYS[1], KEYS[2], ARGV[1]) end
end
return {old, new}
"""

# KEYS: user, the user's changes. ARGV: member[, field, value (set first)]
# -> the new state version.  A receipt for a 1:1 peer (``rc:CONV``: the
# peer's read marker is on the peer's slot) and a host's kick (``kk:DEVICE``
# = "LOGIN_BEFORE_µs REASON").
BUMP = _LIB + """
if ARGV[2] then redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) end
return B(KEYS[1], KEYS[2], ARGV[1])
"""

# KEYS: ev. ARGV: consumer, upto
EVACK = _LIB + """
local cur = N(redis.call('HGET', KEYS[1], 'c:' .. ARGV[1]))
local last = N(redis.call('HGET', KEYS[1], 'last'))
local new = math.max(cur, math.min(tonumber(ARGV[2]), last))
redis.call('HSET', KEYS[1], 'c:' .. ARGV[1], S(new))
return new
"""

# KEYS: ev. ARGV: idempotency key ('' = none), now, data  -> event id
EVENT = _LIB + """
if ARGV[1] ~= '' then
  local prior = redis.call('HGET', KEYS[1], 'x:' .. ARGV[1])
  if prior then return tonumber(prior) end
end
local id = N(redis.call('HGET', KEYS[1], 'last')) + 1
redis.call('HSET', KEYS[1], 'last', S(id), 'e:' .. S(id), ARGV[2] .. ':' .. ARGV[3])
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'x:' .. ARGV[1], S(id)) end
return id
"""

# KEYS: user. ARGV: seen cutoff, age cutoff  -> {removed, forgotten}
RECLAIM = _LIB + """
local u = KEYS[1]
local all = redis.call('HGETALL', u)
local acked, forgotten = nil, 0
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, 1, 3) == 'dv:' then
    local p, seen = string.match(all[i + 1], '^(%d+):(%d+)$')
    if tonumber(seen) < tonumber(ARGV[1]) then
      redis.call('HDEL', u, f)
      forgotten = forgotten + 1
    elseif acked == nil or tonumber(p) < acked then
      acked = tonumber(p)
    end
  end
end
local head, floor = N(redis.call('HGET', u, 'head')), N(redis.call('HGET', u, 'floor'))
if acked == nil then acked = floor end
local pos, removed = floor, 0
while pos < head do
  -- a ref is 'SEQ:ST:CONV' or 'xMSGID:ST:CONV' (a DELETE entry); none: a
  -- hole (retention, purge), passed over and not counted
  local ref = redis.call('HGET', u, 'i:' .. S(pos + 1))
  local st = 0
  if ref then st = tonumber(string.match(ref, '^[^:]*:(%d+):')) end
  if not (ref == false or pos + 1 <= acked or st < tonumber(ARGV[2])) then break end
  pos = pos + 1
  if ref then
    redis.call('HDEL', u, 'i:' .. S(pos))
    removed = removed + 1
  end
end
if pos ~= floor then redis.call('HSET', u, 'floor', S(pos)) end
return {removed, forgotten}
"""

# KEYS: ev. ARGV: age cutoff -> removed
EVRECLAIM = _LIB + """
local e = KEYS[1]
local all = redis.call('HGETALL', e)
local acked = nil
local keys = {}
for i = 1, #all, 2 do
  local f = string.sub(all[i], 1, 2)
  if f == 'c:' then
    local v = tonumber(all[i + 1])
    if acked == nil or v < acked then acked = v end
  elseif f == 'x:' then
    keys[#keys + 1] = all[i]
    keys[#keys + 1] = tonumber(all[i + 1])
  end
end
if acked == nil then acked = 0 end
local floor = N(redis.call('HGET', e, 'floor'))
local last = N(redis.call('HGET', e, 'last'))
local pos = floor
while pos < last do
  local v = redis.call('HGET', e, 'e:' .. S(pos + 1))
  local t = tonumber(string.match(v, '^(%d+):'))
  if not (pos + 1 <= acked or t < tonumber(ARGV[1])) then break end
  pos = pos + 1
  redis.call('HDEL', e, 'e:' .. S(pos))
end
if pos ~= floor then redis.call('HSET', e, 'floor', S(pos)) end
-- the idempotency keys of reclaimed events go with them (EVENT: a retry
-- comes within seconds; a reclaim is max_age later)
for i = 1, #keys, 2 do
  if keys[i + 1] <= pos then redis.call('HDEL', e, keys[i]) end
end
return pos - floor
"""

# KEYS: online, login stamps. ARGV: device, node, stamp (µs: when the login
# happened on its node) -> the node that held the device before ('' none), or
# '-' when the device's recorded login is newer: this one arrived late (its
# node was cut off from the cluster meanwhile) and changes nothing -- else it
# would take the device from the node holding its live session and tell that
# node to close it (REPLACED).  Stamps stay after OFFLINE for that reason.
ONLINE = """
if tonumber(ARGV[3]) < tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') then return '-' end
local old = redis.call('HGET', KEYS[1], ARGV[1]) or ''
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return old
"""

# KEYS: online. ARGV: device, node: delete only if still ours (also a
# send's dedupe claim: KEYS user, ARGV field, the claim)
OFFLINE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) return 1 end
return 0
"""

# The online members of a group under read fan-out: KEYS: the group's
# online-member hash (field user -> the node ids where the user registered,
# space-separated).  ONSET ARGV: user, node...: add the nodes.  ONDEL ARGV:
# user, node: remove one (the field goes with its last node).
ONSET = """
local have = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local set = {}
for n in string.gmatch(have, '%S+') do set[n] = true end
local changed = false
for i = 2, #ARGV do
  if not set[ARGV[i]] then set[ARGV[i]] = true changed = true end
end
if not changed then return 0 end
local out = {}
for n in pairs(set) do out[#out + 1] = n end
table.sort(out)
redis.call('HSET', KEYS[1], ARGV[1], table.concat(out, ' '))
return 1
"""

ONDEL = """
local have = redis.call('HGET', KEYS[1], ARGV[1])
if not have then return 0 end
local out = {}
for n in string.gmatch(have, '%S+') do if n ~= ARGV[2] then out[#out + 1] = n end end
if #out == 0 then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], table.concat(out, ' ')) end
return 1
"""

_SCRIPTS = {name: globals()[name] for name in (
    "CLAIM", "SEND", "AMEND", "DELETE", "SETCONV", "CREATE", "CHANGE", "FANOUT", "FLAG", "REGISTER", "MAXSET", "BUMP", "EVACK", "EVENT", "RECLAIM",
    "EVRECLAIM", "ONLINE", "OFFLINE", "ONSET", "ONDEL")}

_MEMBER, _HAS_MESSAGES = 1, 2
log = logging.getLogger("pimcore.store.redis")
_HINT_CAP = 10_000  # a node's hint list is trimmed to this many (a dead node's stops growing)
_HINT_BULK = 1_000  # hints taken per LPOP after a BLPOP returned one
_PULL_CHUNK = 500  # log entries per FANOUT when a member pulls a large group
_PULL_TICKS = 10  # re-checks between two periodic pulls of the online users' groups
_GROUPS_CAP = 100_000  # users whose registered groups a node keeps


class DataLost(StoreError):
    """A script answered with a seq or an inbox position at or below one this
    node already handed out: a failover lost acknowledged writes.  The
    namespace has a new epoch; this node must stop."""


class _ReplyError(Exception):
    """An error reply of Redis, returned as a value in its place."""


def _arg(a: Any) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    return str(a).encode()


class _RawConn:
    """One connection to one master speaking RESP directly: a pipeline of
    commands (and its WAIT) is one write and one parse, without a client
    library's per-command machinery (which cost about 100 µs per command
    here -- most of the CPU per message)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lock = trio.Lock()
        #: A pipeline was interrupted (timeout, cancel, error) after it was
        #: sent: its replies may still arrive, and the next pipeline would
        #: take them for its own (answers of other commands: another user's
        #: head, another seq).  Such a connection is never used again.
        self.broken = False
        # RESP parsing is hiredis' C reader (a hand-written Python parser was
        # about an eighth of a node's CPU under load); error replies come
        # back as _ReplyError values in their command's place.
        self.reader = hiredis.Reader(replyError=_ReplyError)

    @classmethod
    async def open(cls, host: str, port: int) -> "_RawConn":
        return cls(await trio.open_tcp_stream(host, port))

    async def pipeline(self, cmds: list[Sequence[Any]], timeout: float) -> list[Any]:
        out = []
        for cmd in cmds:
            out.append(b"*%d\r\n" % len(cmd))
            for a in cmd:
                b = _arg(a)
                out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        async with self.lock:
            if self.broken:
                raise ConnectionError("connection dropped: an earlier pipeline on it was interrupted")
            whole = False
            try:
                with trio.fail_after(timeout):
                    await self.stream.send_all(b"".join(out))
                    replies: list[Any] = []
                    reader = self.reader
                    while len(replies) < len(cmds):
                        v = reader.gets()
                        if v is False:  # hiredis: not a whole reply yet
                            data = await self.stream.receive_some(1 << 16)
                            if not data:
                                raise ConnectionError("Redis closed the connection")
                            reader.feed(data)
                        else:
                            replies.append(v)
                whole = True
            finally:
                if not whole:
                    self.broken = True
        return replies

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


class _Round:
    """Commands of one round, grouped per master; :meth:`run` sends each
    group as one pipeline ending with ``WAIT`` (or without, ``wait=False``)
    and returns every command's answer in order of :meth:`add`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[str, ...], tuple[Any, ...]]] = []

    def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> int:
        self.calls.append(("evalsha", name, tuple(keys), tuple(args)))
        return len(self.calls) - 1

    def hset(self, key: str, field: str, value: Any) -> int:
        self.calls.append(("hset", "", (key,), (field, value)))
        return len(self.calls) - 1

    def hdel(self, key: str, field: str) -> int:
        self.calls.append(("hdel", "", (key,), (field,)))
        return len(self.calls) - 1

    def raw(self, key: str, *cmd: Any) -> int:
        """Any command whose first key is ``key`` (its answer as Redis gives it)."""
        self.calls.append(("raw", "", (key,), cmd))
        return len(self.calls) - 1

    def push(self, key: str, value: bytes) -> int:
        self.calls.append(("push", "", (key,), (value,)))
        return len(self.calls) - 1


def _parse_hint(raw: bytes) -> tuple[str, str, Any]:
    """A hint as pushed to a node's list -> (kind, user, value).  Text,
    fields separated by one space (user, device and conversation ids hold
    no whitespace; a kick reason, last, may):

    ``I user head``                        -> head: int (the inbox grew)
    ``R user device``                      -> device (logged in elsewhere)
    ``M user conv read_seq last_seq unread`` -> (conv, read_seq, last_seq, unread)
    ``C user conv reader read_seq``        -> (conv, reader, read_seq): a receipt for ``user``
    ``V user device|* before``             -> (device or None, before µs): tokens revoked
    ``K user device|* reason``             -> (device or None, reason): kicked by the host
    ``U user conv``                        -> conv: the user's settings of it changed
    ``T user conv 0|1 at r1 [r2 ...]``     -> (conv, active, (r1, ...), at µs): ``user``
                                              typing, for recipients with a device here
    ``P user node 0|1 at``                 -> (node, online, at µs): ``node`` got its
                                              first device of ``user`` / lost its last one
    ``H user 0|1``                         -> hide_last_seen: the user's privacy setting
    ``F user conv purged``                 -> (conv, purged): retention (purged -1) or a
                                              purge (its last seq) moved the conversation's
                                              history floor: the user's unread count

    ValueError for anything else."""
    kind, user, rest = raw.decode().split(" ", 2)
    if kind == "I":
        return kind, user, int(rest)
    if kind in ("R", "U"):
        if " " in rest:
            raise ValueError(rest)
        return kind, user, rest
    if kind == "M":
        conv, read_seq, last_seq, unread = rest.split(" ")
        return kind, user, (conv, int(read_seq), int(last_seq), int(unread))
    if kind == "C":
        conv, reader, read_seq = rest.split(" ")
        return kind, user, (conv, reader, int(read_seq))
    if kind == "V":
        device, before = rest.split(" ")
        return kind, user, (None if device == "*" else device, int(before))
    if kind == "K":
        device, reason = rest.split(" ", 1)
        return kind, user, (None if device == "*" else device, reason)
    if kind == "T":
        conv, active, at, *recipients = rest.split(" ")
        if active not in ("0", "1") or not recipients:
            raise ValueError(rest)
        return kind, user, (conv, active == "1", tuple(recipients), int(at))
    if kind == "H":
        if rest not in ("0", "1"):
            raise ValueError(rest)
        return kind, user, rest == "1"
    if kind == "P":
        node, online, at = rest.split(" ")
        if online not in ("0", "1"):
            raise ValueError(rest)
        return kind, user, (node, online == "1", int(at))
    if kind == "F":
        conv, purged = rest.split(" ")
        return kind, user, (conv, int(purged))
    raise ValueError(kind)


class ClusterOps:
    """The scripted write path and the cross-node services of one
    :class:`RedisStore` (one per ``pimcore serve`` node)."""

    def __init__(self, store: "RedisStore", *, sweep_after: float = 3.0, recheck: float = 1.0) -> None:
        self.s = store
        self.sha: dict[str, str] = {}
        self.sweep_after = sweep_after
        self.recheck = recheck
        #: What this node handed out (conv -> seq, user -> position): a
        #: script answering at or below it means lost writes.  Bounded: cleared
        #: when it reaches 100k entries (the check then restarts from there).
        self._seen_seq: dict[str, int] = {}
        self._seen_pos: dict[str, int] = {}
        #: Hints for this node's own core: (kind, user, value).
        self.local_hints: Optional[Callable[[str, str, Any], None]] = None
        self.online: dict[str, set[str]] = {}  # user -> devices online here
        #: user online here -> the state version (``sv``) whose changes
        #: this node's sessions have (from hints or the re-check).
        self._sv: dict[str, int] = {}
        #: user -> the state version its login's read (LoadSession) began at:
        #: what device_online starts the re-check from (a change between that
        #: read and the login's record is then caught up, not skipped).
        #: Bounded like ``groups``.
        self._login_sv: dict[str, int] = {}
        self._inflight = 0
        self._overlap = False
        self._raw: dict[tuple[str, int], _RawConn] = {}
        #: user -> the groups registered for this node's sessions of the user
        #: (what device_offline takes back, what the periodic pull walks).
        #: Bounded: a login that loaded its groups but never came online is
        #: forgotten first when it reaches _GROUPS_CAP users.
        self.groups: dict[str, tuple[str, ...]] = {}
        self._ticks = 0
        #: Presence across nodes.  A running node refreshes its liveness key
        #: (alive_key, expiring after node_ttl s) every node_ttl / 5 s;
        #: another node's device-to-node records count only while that key
        #: lives, so a node that died without cleanup shows its users online
        #: for at most node_ttl + presence_every s.  A node watching a user
        #: for a presence subscription registers in watch_key (node ->
        #: registered until, µs; watch_ttl s, renewed at half); BrokerServer
        #: checks the liveness of the nodes its watched users are on every
        #: presence_every s, and re-reads every watched user every
        #: presence_recheck s (repairing lost hints, renewing registrations).
        self.node_ttl = 10.0
        self.presence_every = 1.0
        self.presence_recheck = 10.0
        self.watch_ttl = 60.0
        self._watching: dict[str, int] = {}  # user -> registered here until (µs)

    # ------------------------------------------------------------- plumbing

    @property
    def node_hex(self) -> str:
        return self.s._node.hex()

    # Key names: the slot-tagged names are RedisStore._k_*; the keys of a
    # user's or conversation's slot beside its hash add a suffix.

    def hint_key(self, node_hex: str) -> str:
        return self.s._k_node(node_hex)

    def online_key(self, user: str) -> str:
        return self.s._k_user(user) + ":on"

    def login_key(self, user: str) -> str:
        return self.s._k_user(user) + ":ont"

    def change_key(self, user: str) -> str:
        """The user's changes (a sorted set: ``rd:CONV``, ``rc:CONV``,
        ``cs:CONV``, ``rv:DEVICE``, ``kk:DEVICE`` scored by the state
        version ``sv`` of the user's hash that their last change took)."""
        return self.s._k_user(user) + ":sc"

    def alive_key(self, node_hex: str) -> str:
        return self.s._k_node(node_hex) + ":up"

    def watch_key(self, user: str) -> str:
        return self.s._k_user(user) + ":pw"

    def outbox_key(self, conv: str) -> str:
        return self.s._k_conv(conv) + ":ob"

    def on_key(self, conv: str) -> str:
        """The group's online members: user -> node ids (ONSET/ONDEL)."""
        return self.s._k_conv(conv) + ":onm"

    def reads_log(self, conv: str, members: int) -> bool:
        """Read fan-out for an entry of ``conv`` with ``members`` recipients?
        Groups above the store's ``read_fanout_above`` (1:1 never)."""
        return members > self.s.read_fanout_above and direct_members(conv) is None

    async def load(self) -> None:
        """Load every script (SCRIPT LOAD on each master: EVALSHA needs it
        there; NOSCRIPT after a failover re-loads, see :meth:`_run_group`)."""
        import hashlib

        for name, src in _SCRIPTS.items():
            self.sha[name] = hashlib.sha1(src.encode()).hexdigest()

    async def run(self, rnd: _Round, wait: bool = True) -> list[Any]:
        """Run a round: per master one pipeline (+ WAIT), all masters at
        once; retried through a failover for up to ``settle`` seconds.
        Every command of a round is idempotent, so retrying the whole round
        is safe.  StoreError if a master never confirmed (outcome unknown)."""
        if not rnd.calls:
            return []
        s = self.s
        deadline = trio.current_time() + s.settle
        while True:
            s._check_open()
            try:
                return await self._run_once(rnd, wait)
            except StoreError:
                if trio.current_time() >= deadline or s._closed:
                    raise
            await trio.sleep(0.2)
            await s._refresh_layout()

    async def _run_once(self, rnd: _Round, wait: bool) -> list[Any]:
        from coredis._utils import hash_slot

        s = self.s
        layout = s._r.connection_pool.cluster_layout
        groups: dict[tuple[str, int], list[int]] = {}
        for i, call in enumerate(rnd.calls):
            node = layout.node_for_slot(hash_slot(call[2][0].encode()))
            groups.setdefault((node.host, node.port), []).append(i)
        answers: list[Any] = [None] * len(rnd.calls)
        failures: list[str] = []

        async def one(addr: tuple[str, int], idx: list[int]) -> None:
            try:
                await self._pipeline(addr, rnd, idx, answers, wait)
            except Exception as exc:
                failures.append(f"{addr[0]}:{addr[1]}: {exc!r}")
                conn = self._raw.pop(addr, None)
                if conn is not None:
                    await conn.aclose()

        async with trio.open_nursery() as nursery:
            for addr, idx in groups.items():
                nursery.start_soon(one, addr, idx)
        if failures:
            raise StoreError("not confirmed by a replica (outcome unknown): " + "; ".join(failures))
        return answers

    async def _pipeline(self, addr: tuple[str, int], rnd: _Round, idx: list[int], answers: list[Any],
                        wait: bool) -> None:
        s = self.s
        conn = self._raw.get(addr)
        if conn is None or conn.broken:
            if conn is not None:
                with trio.CancelScope(shield=True):
                    await conn.aclose()
            conn = self._raw[addr] = await _RawConn.open(*s.dial(addr))
        cmds: list[Sequence[Any]] = []
        for i in idx:
            kind, name, keys, args = rnd.calls[i]
            if kind == "evalsha":
                cmds.append(("EVALSHA", self.sha[name], len(keys), *keys, *args))
            elif kind == "hset":
                cmds.append(("HSET", keys[0], args[0], args[1]))
            elif kind == "hdel":
                cmds.append(("HDEL", keys[0], args[0]))
            elif kind == "raw":
                cmds.append(args)
            else:  # push: a hint, the list kept short
                cmds.append(("RPUSH", keys[0], args[0]))
        pushes: list[Sequence[Any]] = [("LTRIM", rnd.calls[i][2][0], -_HINT_CAP, -1) for i in idx if rnd.calls[i][0] == "push"]
        tail = pushes + ([("WAIT", s.replicas, s.wait_ms)] if wait else [])
        timeout = 10 + s.wait_ms / 1000
        replies = await conn.pipeline(cmds + tail, timeout)
        if any(isinstance(r, _ReplyError) and str(r).startswith("NOSCRIPT") for r in replies[:len(cmds)]):
            await conn.pipeline([("SCRIPT", "LOAD", src) for src in _SCRIPTS.values()], timeout)
            replies = await conn.pipeline(cmds + tail, timeout)
        for r in replies:
            if isinstance(r, _ReplyError):
                # MOVED / CLUSTERDOWN / NOREPLICAS / READONLY...: the round is
                # retried (every command of a round is idempotent).
                raise StoreError(f"Redis: {r}")
        for i, r in zip(idx, replies):
            answers[i] = r
        if wait:
            n = replies[-1]
            if n < s.replicas:
                raise StoreError(f"WAIT {s.replicas} {s.wait_ms}: {n} replica(s) confirmed")

    # ------------------------------------------------------------- loss check

    def _alone(self) -> bool:
        """Whether the running request is the only one this store ran since
        it started: only then are its answers ordered after every answer
        recorded before (the server runs one write request at a time)."""
        return self._inflight == 1 and not self._overlap

    def _check_seq(self, conv: str, seq: int, replayed: bool) -> None:
        seen = self._seen_seq
        if not self._alone():
            seen[conv] = max(seen.get(conv, 0), seq)
            return
        if not replayed and seq <= seen.get(conv, 0):
            raise DataLost(f"conversation {conv!r}: seq {seq} handed out again (last acked {seen[conv]})")
        if len(seen) > 100_000:
            seen.clear()
        if seq > seen.get(conv, 0):
            seen[conv] = seq

    def _check_pos(self, user: str, head: int) -> None:
        seen = self._seen_pos
        if not self._alone():
            seen[user] = max(seen.get(user, 0), head)
            return
        if head < seen.get(user, 0):
            raise DataLost(f"inbox of {user!r}: head {head} below {seen[user]} handed out before")
        if len(seen) > 100_000:
            seen.clear()
        seen[user] = head

    # ------------------------------------------------------------- requests

    async def execute(self, ops: Sequence[Any], *, last_may_leave: bool = False) -> list[Result]:
        """Run a write request's ops (every one in :data:`SCRIPTED`).  Sends
        and membership changes first (their rounds shared by the batch),
        then the others, in request order within each kind -- an op later
        in the batch sees what the sends stored.  ``last_may_leave``: a
        RemoveMembers may take out a group's last member (PurgeUser's)."""
        results: list[Optional[Result]] = [None] * len(ops)
        if self.s._epoch_lost:
            # Lost writes were detected: this node writes nothing more until
            # it stops (the epoch loop stops it).  A retry of the request
            # that found them would be a Duplicate of what that request
            # stored at a reused seq, acked as if nothing had happened.
            raise DataLost("lost writes were detected in this namespace: this node no longer writes")
        self._enter()
        try:
            return await self._execute(ops, results, last_may_leave)
        except DataLost:
            try:
                await self.s._lost()
            except StoreError:
                pass  # the epoch loop writes the new epoch once Redis takes it
            raise
        finally:
            self._leave()

    def _enter(self) -> None:
        self._inflight += 1
        if self._inflight > 1:
            self._overlap = True  # until no request runs: see _alone

    def _leave(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._overlap = False

    async def _execute(self, ops: Sequence[Any], results: list[Optional[Result]],
                       last_may_leave: bool = False) -> list[Result]:
        # In request order; a run of consecutive sends (or acks/touches)
        # shares its rounds (group commit), so a later op sees earlier ones.
        i = 0
        while i < len(ops):
            kind = type(ops[i])
            j = i + 1
            if kind in (NewMessage, AckPosition, TouchDevice):
                group = (NewMessage,) if kind is NewMessage else (AckPosition, TouchDevice)
                while j < len(ops) and type(ops[j]) in group:
                    j += 1
            run = [k for k in range(i, j) if not malformed(ops[k])]
            for k in range(i, j):
                if malformed(ops[k]):
                    results[k] = Rejected(ErrorCode.BAD_REQUEST)
            if run:
                await self._one_kind(ops, run, results, last_may_leave)
            i = j
        return results  # type: ignore[return-value]

    async def _one_kind(self, ops: Sequence[Any], idx: list[int], results: list[Optional[Result]],
                        last_may_leave: bool = False) -> None:
        op = ops[idx[0]]
        kind = type(op)
        if kind is NewMessage:
            await self._sends(ops, idx, results)
        elif kind is AmendMessage:
            results[idx[0]] = await self._amend(op)
        elif kind is CreateGroup:
            results[idx[0]] = await self._create_group(op)
        elif kind is AddMembers or kind is RemoveMembers:
            results[idx[0]] = await self._change_members(op, last_may_leave=last_may_leave)
        elif kind is MarkRead:
            results[idx[0]] = await self._mark_read(op)
        elif kind is SetConversation:
            results[idx[0]] = await self._set_conversation(op)
        elif kind is RevokeTokens:
            rnd = _Round()
            uk = self.s._k_user(op.user)
            rnd.script("MAXSET", (uk, self.change_key(op.user)), ("rv:" + op.device, op.before, 1 << 62))
            if op.device:  # in force for the device: the user-wide bound too (base.Revoked)
                rnd.raw(uk, "HGET", uk, "rv:")
            answers = await self.run(rnd)
            before = int(answers[0][1])
            if op.device and answers[1] is not None:
                before = max(before, int(answers[1]))
            results[idx[0]] = Revoked(op.user, op.device, before)
        elif kind is AppendEvent:
            # The op is the event's identity (two equal ops are two events,
            # as in the memory store): a key of this attempt makes the
            # round's retry after a lost answer find the event it appended.
            key = "op:" + os.urandom(12).hex()
            (eid,) = await self.run(self._one("EVENT", self.s._ev, (key, op.now, op.data)))
            results[idx[0]] = EventAppended(int(eid))
        elif kind is AckEvents:
            (cur,) = await self.run(self._one("EVACK", self.s._ev, (op.consumer, op.upto)))
            results[idx[0]] = EventsAcked(op.consumer, int(cur))
        elif kind is DeleteConsumer:
            # One HDEL: atomic beside other nodes' EVACKs (an ack after it
            # makes a new cursor, as the store contract says).  A round
            # retried after a lost answer finds nothing: deleted False.
            rnd = _Round()
            rnd.hdel(self.s._ev, "c:" + op.consumer)
            (n,) = await self.run(rnd)
            results[idx[0]] = ConsumerDeleted(op.consumer, int(n) > 0)
        elif kind is Reclaim:
            results[idx[0]] = await self._reclaim(op)
        else:  # AckPosition / TouchDevice: one round for the run
            rnd = _Round()
            for i in idx:
                op = ops[i]
                rnd.script("REGISTER", (self.s._k_user(op.user),), (op.device, op.position, op.now))
            answers = await self.run(rnd)
            new_users = _Round()
            for i, (pos, new) in zip(idx, answers):
                op = ops[i]
                results[i] = (Acked(op.user, op.device, int(pos)) if type(op) is AckPosition
                              else Touched(op.user, op.device, int(pos), bool(new)))
                if new:
                    new_users.hset(self.s._users, op.user, b"1")
            await self.run(new_users)

    @staticmethod
    def _one(name: str, key: str, args: Sequence[Any]) -> _Round:
        rnd = _Round()
        rnd.script(name, (key,), args)
        return rnd

    # -- sends ----------------------------------------------------------------

    async def _taken_code(self, op: NewMessage) -> ErrorCode:
        """The error of a send whose msg id is stored already: what the
        conversation checks say first, else INTERNAL."""
        from .redis import _Tx

        if not valid_conversation(op.conv):
            return ErrorCode.BAD_REQUEST
        members = await self.s._group_members(_Tx(self.s), op.conv)
        if members is None:
            return ErrorCode.UNKNOWN_CONVERSATION
        if op.sender not in members and op.sender != SYSTEM:
            return ErrorCode.NOT_MEMBER
        return ErrorCode.INTERNAL

    async def _sends(self, ops: Sequence[Any], idx: list[int], results: list[Optional[Result]]) -> None:
        """Store the sends ``ops[i] for i in idx``, in order.  Two sends of
        one batch with the same local id (a retry) or the same msg id (a
        clock that went back) go in separate runs: what the second gets
        depends on whether the first is stored, which only its run decides
        (the memory store stores one after the other)."""
        run: list[int] = []
        seen: set[object] = set()
        for i in idx:
            op = ops[i]
            key = (op.sender, op.device, op.local_id)
            if key in seen or op.msg_id in seen:
                await self._send_run(ops, run, results)
                run, seen = [], set()
            seen.update((key, op.msg_id))
            run.append(i)
        if run:
            await self._send_run(ops, run, results)

    async def _send_run(self, ops: Sequence[Any], idx: list[int], results: list[Optional[Result]]) -> None:
        from .redis import _enc_msg

        s = self.s
        # Round 1: claims (the dedupe records, sender's slot).
        rnd = _Round()
        for i in idx:
            op = ops[i]
            claim = _claim(op)
            rnd.script("CLAIM", (s._k_user(op.sender),), (f"d:{op.device}/{op.local_id}", claim))
            mkey = s._k_msg(op.msg_id)
            rnd.raw(mkey, "HGET", mkey, "r")  # a msg id stored before ("SEQ:CONV"): see below
        answers = await self.run(rnd)
        claims, stored_at = answers[0::2], answers[1::2]
        # What each send stores: (index, op, msg_id, server_time); a claim of
        # an earlier attempt is finished with ITS msg id and server time.
        todo: list[tuple[int, NewMessage, bytes, int]] = []
        claimed: dict[tuple[str, str, int], tuple[int, bytes]] = {}
        replays: set[int] = set()
        undo = _Round()
        batch_ids: set[bytes] = set()
        for i, prior, at in zip(idx, claims, stored_at):
            op = ops[i]
            key = (op.sender, op.device, op.local_id)
            # Claimed fresh, yet the msg id is stored in this conversation:
            # another node that found the claim in between may have stored
            # this very message under it (one post with one idempotency key
            # through two nodes at once: a new operator's trial saw it
            # refused, its dedupe record deleted and the retry stored again)
            # -- or a broken clock made it another's.  SEND tells them apart
            # (-3 below); stored in another conversation, it is the clock.
            elsewhere = at is not None and at.decode().split(":", 1)[1] != op.conv
            if prior is None and (elsewhere or op.msg_id in batch_ids) and key not in claimed:
                # A broken clock; the conversation checks come first (as in
                # the memory store): only a send that would be stored fails
                # with INTERNAL.
                results[i] = Rejected(await self._taken_code(op))
                undo.hdel(s._k_user(op.sender), f"d:{op.device}/{op.local_id}")
                continue
            if prior is None:
                batch_ids.add(op.msg_id)
                claimed[key] = (i, op.digest)
                todo.append((i, op, op.msg_id, op.server_time))
                continue
            parts = prior.decode().split(":")
            if parts[0] == "P":
                msg_hex, st, digest_hex = parts[1], int(parts[2]), parts[3]
                if bytes.fromhex(digest_hex) != op.digest:
                    results[i] = Rejected(ErrorCode.DUPLICATE_CONFLICT)
                    continue
                claimed[key] = (i, op.digest)
                todo.append((i, op, bytes.fromhex(msg_hex), st))
                replays.add(i)
                continue
            msg_hex, seq_s, st_s, digest_hex = parts
            if bytes.fromhex(digest_hex) == op.digest:
                results[i] = Duplicate(bytes.fromhex(msg_hex), int(seq_s), int(st_s))
            else:
                results[i] = Rejected(ErrorCode.DUPLICATE_CONFLICT)
        # Round 2: the log entries (conversation's slot).  An invalid
        # conversation id is refused before (as the memory store does).
        rnd = _Round()
        bad = _Round()
        good = []
        for i, op, msg_id, st in todo:
            if not valid_conversation(op.conv):
                results[i] = Rejected(ErrorCode.BAD_REQUEST)
                bad.hdel(s._k_user(op.sender), f"d:{op.device}/{op.local_id}")
                continue
            good.append((i, op, msg_id, st))
            pair = direct_members(op.conv)
            m = StoredMessage(msg_id, op.conv, 0, op.sender, op.device, op.local_id, op.client_time, st,
                              op.payload, 0, 0, mentions=op.mentions, mention_all=op.mention_all)
            rnd.script("SEND", (s._k_conv(op.conv), self.outbox_key(op.conv)), (
                msg_id.hex(), op.sender, "1" if pair else "0", _enc_msg(m), op.after_seq, st, SYSTEM,
                "\n".join(sorted(pair)) if pair else "", "1" if op.event else "0", "1" if i in replays else "0"))
        todo = good
        await self.run(bad)
        answers = await self.run(rnd)
        fan = _Fanout(self)
        for (i, op, msg_id, st), ans in zip(todo, answers):
            code = int(ans[0])
            if code < 0:
                results[i] = Rejected({-1: ErrorCode.UNKNOWN_CONVERSATION, -2: ErrorCode.NOT_MEMBER,
                                       -4: ErrorCode.PURGED}.get(code, ErrorCode.INTERNAL))
                # Its claim goes, only while it is still this node's (another
                # node may have finished it into its final record, or it is
                # another node's claim this one was finishing).
                undo.script("OFFLINE", (s._k_user(op.sender),), (f"d:{op.device}/{op.local_id}", _claim(op)))
                continue
            seq, mem, after, st, replayed = code, ans[1].decode(), int(ans[2]), int(ans[3]), bool(ans[4])
            self._check_seq(op.conv, seq, replayed)
            members = sorted(mem.split("\n")) if mem else []
            m = StoredMessage(msg_id, op.conv, seq, op.sender, op.device, op.local_id, op.client_time, st,
                              op.payload, 0, after, mentions=op.mentions, mention_all=op.mention_all)
            fan.message(m, members, op.event, (op.sender, f"d:{op.device}/{op.local_id}",
                                               f"{msg_id.hex()}:{seq}:{st}:{op.digest.hex()}".encode()))
            results[i] = ("appended", m, members)  # type: ignore[assignment,call-overload]
        await self.run(undo)
        positions = await fan.run()
        for i in idx:
            r = results[i]
            if isinstance(r, tuple) and r[0] == "appended":
                m = r[1]
                results[i] = Appended(m.msg_id, m.seq, m.server_time, positions.get((m.conv, m.seq), ()),
                                      m.after_seq)

    _st_written = 0

    # -- recall, edit, delete ---------------------------------------------------

    async def _amend(self, op: AmendMessage) -> Result:
        """An :class:`AmendMessage` across nodes, like a send: (1) CLAIM of
        the dedupe record on the sender's slot (the key space of sends: a
        retry, through any node, is a Duplicate or finishes the claimed
        amend); (2) the checks of :func:`amend_problem` on one snapshot of
        the conversation (HMGET), then AMEND on the conversation's slot,
        which re-compares what they read and only then takes the seq and
        rewrites the target (anything changed: read and check again);
        (3) the fan-out of sends, with the final dedupe record.  A DELETE
        takes no seq: its record goes to the conversation's slot, then
        DELETE appends it to the sender's own inbox atomically on the
        sender's slot."""
        from .redis import _dec_msg, _dec_spans, _enc_msg

        s = self.s
        uk, dfield = s._k_user(op.sender), f"d:{op.device}/{op.local_id}"
        rnd = _Round()
        rnd.script("CLAIM", (uk,), (dfield, f"P:{op.msg_id.hex()}:{op.server_time}:{op.digest.hex()}:{op.conv}"))
        mkey = s._k_msg(op.msg_id)
        rnd.raw(mkey, "HEXISTS", mkey, "r")
        prior, used = await self.run(rnd)
        replay = False
        if prior is not None:
            parts = prior.decode().split(":")
            if parts[0] != "P":
                if bytes.fromhex(parts[3]) == op.digest:
                    return Duplicate(bytes.fromhex(parts[0]), int(parts[1]), int(parts[2]))
                return Rejected(ErrorCode.DUPLICATE_CONFLICT)
            if bytes.fromhex(parts[3]) != op.digest:
                return Rejected(ErrorCode.DUPLICATE_CONFLICT)
            # A claim of an earlier attempt (a node died half-way, or it is
            # still at work): finish THAT amend (its msg id and server time).
            op = replace(op, msg_id=bytes.fromhex(parts[1]), server_time=int(parts[2]))
            replay = True

        async def refuse(code: ErrorCode) -> Result:
            undo = _Round()
            undo.hdel(uk, dfield)
            await self.run(undo)
            return Rejected(code)

        if not valid_conversation(op.conv):
            return await refuse(ErrorCode.BAD_REQUEST)
        ck = s._k_conv(op.conv)
        pair = direct_members(op.conv)
        msghex = op.msg_id.hex()
        final = f"{msghex}:{{seq}}:{op.server_time}:{op.digest.hex()}"
        for _ in range(1000):
            grp, mem, last_b, hv, stored, raw, sp = await s._call(lambda: s._r.hmget(ck, [
                "grp", "mem", "last", "hv", "m:" + msghex, f"s:{op.target}", "sp:" + op.sender]))
            if pair is not None:
                members: Optional[frozenset[str]] = frozenset(pair)
            elif grp is None:
                members = None
            else:
                members = frozenset(mem.decode().split("\n")) if mem else frozenset()
            if members is None:
                return await refuse(ErrorCode.UNKNOWN_CONVERSATION)
            if not (replay and stored is not None):
                # (A replay whose entry is stored already skips the checks:
                # they would see the amend itself, e.g. RECALLED.)
                target = _dec_msg(raw) if raw is not None and op.target <= int(last_b or 0) else None
                member, visible = True, True
                if pair is not None:
                    spans: tuple[tuple[int, int], ...] = ((0, OPEN),) if op.sender in pair else ()
                else:
                    spans = _dec_spans(sp)
                if op.kind == MessageKind.DELETE:
                    member = bool(spans)
                    visible = sees(spans, hv == b"1", op.target)
                elif op.sender != SYSTEM:
                    member = op.sender in members
                    visible = sees(spans, hv == b"1", op.target)
                code = amend_problem(op, member, target, visible)
                if code is not ErrorCode.OK:
                    return await refuse(code)
                assert target is not None and raw is not None
                if used and not replay:
                    return await refuse(ErrorCode.INTERNAL)
            else:
                target, raw = None, b""
            if op.kind == MessageKind.DELETE:
                return await self._delete(op, uk, dfield, final.format(seq=0))
            rnd = _Round()
            rnd.script("AMEND", (ck, self.outbox_key(op.conv)), (
                msghex, "1" if pair else "0", "1" if op.sender != SYSTEM else "0", op.sender, op.target, raw,
                _enc_msg(amended(target, op)) if target is not None else b"", _enc_msg(amend_entry(op, 0)),
                op.server_time, "1" if op.event else "0", "1" if replay else "0",
                "\n".join(sorted(pair)) if pair else ""))
            (ans,) = await self.run(rnd)
            code_or_seq = int(ans[0])
            if code_or_seq == -4:
                continue  # changed since it was read: read and check again
            if code_or_seq == -3:
                return await refuse(ErrorCode.INTERNAL)
            break
        else:
            raise StoreError(f"amend of {op.conv!r} seq {op.target}: the conversation kept changing")
        seq, mem_s, replayed = code_or_seq, ans[1].decode(), bool(int(ans[2]))
        self._check_seq(op.conv, seq, replayed)
        entry = _dec_msg(ans[3])
        recipients = sorted(mem_s.split("\n")) if mem_s else []
        if pair is None and recipients:
            # Only to the members who may see the target (base.hidden_amend),
            # by their spans as of now: one added since the AMEND has a span
            # starting after its seq, so he is left out as he would be then.
            grp_hv, *raw_spans = await s._call(lambda: s._r.hmget(ck, ["hv"] + ["sp:" + u for u in recipients]))
            recipients = [u for u, sp_u in zip(recipients, raw_spans) if sees(_dec_spans(sp_u), grp_hv == b"1", op.target)]
        fan = _Fanout(self)
        fan.message(entry, recipients, op.event, (op.sender, dfield, final.format(seq=seq).encode()),
                    replace(entry, payload=op.payload))
        positions = await fan.run()
        return Appended(op.msg_id, seq, op.server_time, positions.get((op.conv, seq), ()), seq - 1)

    async def _delete(self, op: AmendMessage, uk: str, dfield: str, final: str) -> Result:
        """Round 2 and 3 of a DELETE: its record (conversation's slot) and the
        msg id lookup, then the sender's inbox entry (sender's slot)."""
        from .redis import _enc_msg

        s = self.s
        entry = amend_entry(op, 0)
        msghex = op.msg_id.hex()
        rnd = _Round()
        # Not an entry of the conversation: kept under its msg id, and the
        # inbox names it by that ("x<msg_id hex>" where a seq goes).
        rnd.hset(s._k_conv(op.conv), f"x:{msghex}", _enc_msg(entry))
        rnd.hset(s._k_msg(op.msg_id), "r", f"0:{op.conv}".encode())
        await self.run(rnd)
        rnd = _Round()
        rnd.script("DELETE", (uk, self.online_key(op.sender)), (
            dfield, final, f"del:{op.conv}/{op.target}", f"x{msghex}:{op.server_time}:{op.conv}", msghex, op.conv))
        if op.event:
            rnd.script("EVENT", (s._ev,), (msghex, op.server_time,
                                           message_event(replace(entry, payload=op.payload), (op.sender,))))
        answers = await self.run(rnd)
        pos, head, nodes, fresh = int(answers[0][0]), int(answers[0][1]), answers[0][2], int(answers[0][3])
        self._check_pos(op.sender, head)
        done = _Round()
        if fresh:
            done.hset(s._users, op.sender, b"1")
        await self.run(done)
        hints = _Round()
        for node in {n.decode() if isinstance(n, bytes) else n for n in nodes}:
            if node != self.node_hex:
                hints.push(self.hint_key(node), f"I {op.sender} {head}".encode())
        if op.server_time > self._st_written:
            self._st_written = op.server_time
            hints.script("MAXSET", (s._meta,), ("st", op.server_time, 1 << 62))
        await self.run(hints, wait=False)
        return Appended(op.msg_id, 0, op.server_time, ((op.sender, pos),) if pos else (), 0)

    # -- groups ---------------------------------------------------------------

    async def _create_group(self, op: CreateGroup) -> Result:
        s = self.s
        members = sorted(set(op.members))
        (created,) = await self.run(self._one("CREATE", s._k_conv(op.conv), (
            op.now, 1 if op.history_visible else 0, "\n".join(members), *members, OPEN)))
        if not created:
            return Rejected(ErrorCode.ALREADY_EXISTS)
        rnd = _Round()
        for user in members:
            rnd.script("FLAG", (s._k_user(user),), (op.conv, _MEMBER, "1"))
            rnd.hset(s._users, user, b"1")
            rnd.raw(self.online_key(user), "HVALS", self.online_key(user))
        answers = await self.run(rnd)
        # Members online now logged in before the group existed: register
        # them (read fan-out writes entries only for registered members).
        reg = _Round()
        for user, nodes in zip(members, answers[2::3]):
            if nodes:
                self._registered(reg, op.conv, user, nodes)
        await self.run(reg, wait=False)
        return GroupChanged(op.conv, tuple(members))

    def _registered(self, rnd: _Round, conv: str, user: str, nodes: Any) -> None:
        """Add to ``rnd`` the registration of ``user`` (online on ``nodes``,
        an HVALS answer of its online record) in group ``conv``, and note it
        for this node's own sessions of the user."""
        rnd.script("ONSET", (self.on_key(conv),), (user, *sorted({n.decode() if isinstance(n, bytes) else n
                                                                    for n in nodes})))
        if user in self.online and conv not in self.groups.get(user, ()):
            self.groups[user] = self.groups.get(user, ()) + (conv,)

    async def _change_members(self, op: Any, *, last_may_leave: bool = False) -> Result:
        """AddMembers / RemoveMembers, one CHANGE script per user.  A
        removal that would leave the group with no member is refused by the
        script (-4: it knows the membership atomically), before anything is
        stored: each call carries the users the op removes after this one,
        so the first call refuses when every member is among them.
        ``last_may_leave``: no such check (a purge of the user's data).  Only
        if another node removed the members this op would keep between two
        of its calls is a later user refused after earlier ones were
        removed: what was removed is fanned out and returned (its
        GroupChanged lists who is still a member); the group is never left
        empty."""
        from .redis import _enc_msg

        s = self.s
        add = type(op) is AddMembers
        ck = s._k_conv(op.conv)
        if await s._call(lambda: s._r.hget(ck, "grp")) is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        clock = max(op.now, int(await s._call(lambda: s._r.hget(s._meta, "st")) or 0) + 1)
        entries: list[StoredMessage] = []
        fan = _Fanout(self)
        flags = _Round()
        order: list[tuple[str, int]] = []
        for i, user in enumerate(op.users):
            before = clock
            if op.stamps:
                msg_id, server_time = op.stamps[i]
            else:
                # Made here (no broker clock), as the memory store makes them:
                # ids no broker makes, times above every stored one.
                while True:
                    msg_id, server_time = clock.to_bytes(8, "big") + bytes(8), clock
                    clock += 1
                    if await s._call(lambda: s._r.hget(s._k_msg(msg_id), "r")) is None:
                        break
            m = StoredMessage(msg_id, op.conv, 0, user, "", 0, server_time, server_time, op.by.encode("utf-8"),
                              int(MessageKind.JOINED if add else MessageKind.LEFT), 0)
            (ans,) = await self.run(self._change_round(ck, op.conv, (
                user, "1" if add else "0", _enc_msg(m), msg_id.hex(), server_time, OPEN,
                "1" if op.event else "0", "0" if add or last_may_leave else "1", *op.users[i + 1:])))
            code = int(ans[0])
            if code == -1:
                return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
            if code == -4:
                if not entries:
                    return Rejected(ErrorCode.BAD_REQUEST)
                break  # a concurrent removal elsewhere: finish what was stored
            if code == -3:
                return Rejected(ErrorCode.INTERNAL)
            if code == 0:
                # No change, no entry: the id made for it is not used (the
                # memory store makes none), so the next one gets its time.
                clock = before
                continue
            seq = code
            replayed = len(ans) > 2
            if replayed:
                from .redis import _Tx

                recipients = await self._recipients(_Tx(s), op.conv, seq)
            else:
                recipients = sorted(ans[1].decode().split("\n")) if ans[1] else []
            m = StoredMessage(msg_id, op.conv, seq, user, "", 0, server_time, server_time, op.by.encode("utf-8"),
                              int(MessageKind.JOINED if add else MessageKind.LEFT), seq - 1)
            self._check_seq(op.conv, seq, replayed)
            flags.script("FLAG", (s._k_user(user),), (op.conv, _MEMBER, "1" if add else "0"))
            flags.hset(s._users, user, b"1")
            fan.message(m, recipients, op.event)
            entries.append(m)
            order.append((op.conv, seq))
        await self.run(flags)
        positions = await fan.run()
        members = await s._call(lambda: s._r.hget(ck, "mem"))
        current = tuple(sorted(members.decode().split("\n"))) if members else ()
        return GroupChanged(op.conv, current, tuple(entries), tuple(positions.get(k, ()) for k in order))

    def _change_round(self, ck: str, conv: str, args: tuple) -> _Round:
        rnd = _Round()
        rnd.script("CHANGE", (ck, self.outbox_key(conv)), args)
        return rnd

    # -- the rest ---------------------------------------------------------------

    async def _mark_read(self, op: MarkRead) -> Result:
        from .redis import _Tx

        s = self.s
        tx = _Tx(s)
        if await s._group_members(tx, op.conv) is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        spans = await s._spans_of(tx, op.conv, op.user)
        if not spans:
            return Rejected(ErrorCode.NOT_MEMBER)
        last = last_visible(spans, int(await tx.get(s._k_conv(op.conv), "last") or 0))
        rnd = _Round()
        rnd.script("MAXSET", (s._k_user(op.user), self.change_key(op.user)), ("rd:" + op.conv, op.seq, last))
        pair = direct_members(op.conv)
        if pair is not None and op.user in pair:
            # The receipt is the 1:1 peer's state: listed on the peer's slot
            # in the same round (harmless when the marker did not move: the
            # peer's nodes re-read a receipt they sent already).
            peer = pair[1] if pair[0] == op.user else pair[0]
            rnd.script("BUMP", (s._k_user(peer), self.change_key(peer)), ("rc:" + op.conv,))
        ans = (await self.run(rnd))[0]
        old, new = int(ans[0]), int(ans[1])
        tx = _Tx(s)
        return ReadMarked(op.user, op.conv, new, last, await s._unread(tx, op.user, op.conv), new != old)

    async def _set_conversation(self, op: SetConversation) -> Result:
        from .redis import _Tx

        s = self.s
        tx = _Tx(s)
        code = await s._list_access(tx, op.user, op.conv)
        if code is not ErrorCode.OK:
            return Rejected(code)
        last_seq = last_visible(await s._spans_of(tx, op.conv, op.user),
                                int(await tx.get(s._k_conv(op.conv), "last") or 0))
        rnd = _Round()
        rnd.script("SETCONV", (s._k_user(op.user), self.change_key(op.user)), (
            op.conv, op.pinned, op.muted, op.hidden, last_seq + 1))
        (ans,) = await self.run(rnd)
        return ConversationSet(op.user, op.conv, await s._entry(_Tx(s), op.user, op.conv), ans[0] != ans[1])

    async def _reclaim(self, op: Reclaim) -> Result:
        s = self.s
        users = [u.decode() if isinstance(u, bytes) else u
                 for u in await s._call(lambda: s._r.hkeys(s._users))]
        rnd = _Round()
        for user in sorted(users):
            rnd.script("RECLAIM", (s._k_user(user),), (op.now - op.device_retention, op.now - op.max_age))
        removed = forgotten = 0
        for r, f in await self.run(rnd):
            removed += int(r)
            forgotten += int(f)
        (events,) = await self.run(self._one("EVRECLAIM", s._ev, (op.now - op.max_age,)))
        return Reclaimed(removed, forgotten, int(events))

    # -- presence, hints, sweeping ------------------------------------------------

    async def device_online(self, user: str, device: str, at: Optional[int] = None, *, tell: bool = True) -> None:
        """Record that ``device`` of ``user`` is on this node (logged in at
        ``at``, µs of this node's clock; default now); tell the node that held
        it before (if another) to close its session (REPLACED).  A login older
        than the device's recorded one (it reached the cluster late: this
        node was cut off) records nothing and closes nothing.  The user's
        first device here is told to the nodes watching the user (``P``)
        unless not ``tell``."""
        first = user not in self.online
        self.online.setdefault(user, set()).add(device)
        if first and user in self.groups:
            # LoadSession registered and pulled; a logout of the user's
            # previous session here may have taken the registration back
            # since (ONDEL after ONSET): register again.
            await self.join_groups(user, self.groups[user])
        if at is None:
            import time as _time

            at = _time.time_ns() // 1000
        rnd = _Round()
        rnd.script("ONLINE", (self.online_key(user), self.login_key(user)), (device, self.node_hex, at))
        uk = self.s._k_user(user)
        rnd.raw(uk, "HGET", uk, "sv")
        old, sv = await self.run(rnd, wait=False)
        # What the re-check compares with (see _recheck_loop): changes after
        # the login are caught up with, the login read those before.
        start = self._login_sv.pop(user, None)
        self._sv.setdefault(user, int(sv or 0) if start is None else min(start, int(sv or 0)))
        old = old.decode() if isinstance(old, bytes) else (old or "")
        if old and old != "-" and old != self.node_hex:
            rnd = _Round()
            rnd.push(self.hint_key(old), f"R {user} {device}".encode())
            await self.run(rnd, wait=False)
        if first and tell:
            await self.tell_presence(user, True, at)

    async def after_commit(self, ops: Sequence[Any], results: Sequence[Result]) -> None:
        """A write request committed (either path): tell the other nodes
        where a user concerned has a device online what is not an inbox
        entry (read markers, receipts, revocations, purges, conversation
        settings; formats in :func:`_parse_hint`).  Nothing to tell (sends,
        acks...): no round trip."""
        from .base import ConversationSet, Expired, PurgeConversation, Purged, PurgeUser
        from .redis import _Tx

        hints: list[tuple[str, str]] = []
        for op, res in zip(ops, results):
            if isinstance(res, ReadMarked) and res.changed:
                hints.append((res.user, f"M {res.user} {res.conv} {res.read_seq} {res.last_seq} {res.unread}"))
                pair = direct_members(res.conv)
                if pair is not None:
                    peer = pair[1] if pair[0] == res.user else pair[0]
                    hints.append((peer, f"C {peer} {res.conv} {res.user} {res.read_seq}"))
            elif isinstance(res, Revoked):
                hints.append((res.user, f"V {res.user} {res.device or '*'} {res.before}"))
            elif isinstance(res, ConversationSet) and res.changed:
                hints.append((res.user, f"U {res.user} {res.conv}"))
            elif isinstance(res, Purged) and isinstance(op, PurgeUser):
                # As purge_user on its node: sessions end (KICKED), and every
                # token issued before the purge is refused.
                hints.append((op.user, f"K {op.user} * this user's data was deleted"))
                hints.append((op.user, f"V {op.user} * {op.now}"))
            elif isinstance(res, Purged) and isinstance(op, PurgeConversation) and res.users:
                # A purged group: its users' nodes tell their devices nothing
                # of it is unread (the members are gone from the store: the
                # result names them).
                hints.extend((user, f"F {user} {op.conv} {res.last_seq}") for user in res.users)
            elif isinstance(res, Expired) or (isinstance(res, Purged) and isinstance(op, PurgeConversation)
                                              and direct_members(op.conv) is not None):
                # The history floor moved: the unread counts the devices of
                # the members hold may count messages that are gone, and
                # only this node's core refreshed its own (another node's
                # pass finds nothing left to trim).  The members' nodes
                # refresh theirs as this node's core does (_refresh_floor;
                # a purged group is gone with its markers: nothing to say).
                floors = [(c, -1) for c in res.convs] if isinstance(res, Expired) else [(op.conv, res.last_seq)]
                try:
                    for conv, purged in floors:
                        for user in sorted(await self.s._group_members(_Tx(self.s), conv) or ()):
                            hints.append((user, f"F {user} {conv} {purged}"))
                except StoreError:
                    pass  # (best effort, as every hint: their next read or login is exact)
        await self.tell(hints)
        from .base import PresencePrivacySet

        privacy = [(res.user, res.hide_last_seen) for res in results if isinstance(res, PresencePrivacySet)]
        if privacy:
            await self.tell_privacy(privacy)

    def _others(self, nodes: Any) -> set[str]:
        """The node ids of an HVALS answer on a user's online record, less
        this node (whose core heard the change itself)."""
        me = self.node_hex
        return {n.decode() if isinstance(n, bytes) else n for n in nodes or ()} - {me}

    async def tell(self, hints: Sequence[tuple[str, str]]) -> None:
        """Push each hint ``(user, text)``, in order, to every other node
        where ``user`` has a device online (read from the device-to-node
        records): two rounds without a replication wait.  Best effort, after
        a commit: a hint that cannot be pushed is dropped (a hint is a
        wake-up; see :meth:`hints`)."""
        users = sorted({user for user, _ in hints})
        if not users:
            return
        rnd = _Round()
        for user in users:
            rnd.raw(self.online_key(user), "HVALS", self.online_key(user))
        try:
            answers = await self.run(rnd, wait=False)
            nodes = {user: self._others(ans) for user, ans in zip(users, answers)}
            rnd = _Round()
            for user, text in hints:
                for node in sorted(nodes[user]):
                    rnd.push(self.hint_key(node), text.encode())
            await self.run(rnd, wait=False)
        except StoreError:
            pass

    async def device_offline(self, user: str, device: str, at: Optional[int] = None, *, tell: bool = True) -> None:
        """Remove the record of ``device`` (if still this node's).  The
        user's last device here going (at ``at`` µs; default now) is told to
        the nodes watching the user (``P``) unless not ``tell``."""
        devs = self.online.get(user)
        last = False
        if devs is not None:
            devs.discard(device)
            if not devs:
                del self.online[user]
                self._sv.pop(user, None)
                last = True
        await self.run(self._one("OFFLINE", self.online_key(user), (device, self.node_hex)), wait=False)
        if last and user in self.groups:
            # The user's last session here ended: read fan-out stops writing
            # to the user for this node (a stale registration would only
            # cost writes, never lose a message).
            rnd = _Round()
            for conv in self.groups.pop(user):
                rnd.script("ONDEL", (self.on_key(conv),), (user, self.node_hex))
            await self.run(rnd, wait=False)
        if last and tell:
            await self.tell_presence(user, False, at)

    # -- read fan-out (large groups) ------------------------------------------
    #
    # A group above ``read_fanout_above`` members gets read fan-out: a send
    # writes the conversation log (SEND) and inbox entries only for the
    # sender and the members registered online in the group's online-member
    # hash (on_key); everyone else takes the entries from the log when they
    # next log in (LoadSession pulls before it reads the inbox head).  Why
    # nothing is lost: a session registers (ONSET) BEFORE it pulls, and a
    # fan-out reads the registrations AFTER its SEND committed the seq; so a
    # fan-out that did not see the registration ran its SEND before the pull
    # read ``last``, and the pull delivers that seq.  FANOUT is idempotent per
    # (user, conversation, seq) (the ``ld:`` record), so a pull racing a
    # fan-out gives each entry one position.  The periodic pull (every
    # _PULL_TICKS re-checks) bounds what a lost registration (a failover,
    # a logout racing a login on this node) can delay.

    def login_read(self, user: str, sv: int) -> None:
        """A login's read of ``user`` begins at state version ``sv`` (read
        first: see ``_login_sv``)."""
        if user not in self._login_sv and len(self._login_sv) >= _GROUPS_CAP:
            self._login_sv.clear()  # logins that never came online
        self._login_sv[user] = min(sv, self._login_sv.get(user, sv))

    async def join_groups(self, user: str, convs: Sequence[str]) -> None:
        """Register ``user`` online on this node in each group of ``convs``
        (ONSET), then :meth:`pull`.  Two rounds; no-op without groups."""
        if not convs:
            self.groups.pop(user, None)
            return
        if user not in self.groups and len(self.groups) >= _GROUPS_CAP:
            for stale in [u for u in self.groups if u not in self.online][:_GROUPS_CAP // 10 or 1]:
                del self.groups[stale]
        self.groups[user] = tuple(convs)
        rnd = _Round()
        for conv in convs:
            rnd.script("ONSET", (self.on_key(conv),), (user, self.node_hex))
        await self.run(rnd, wait=False)
        await self.pull(user, convs)

    async def pull(self, user: str, convs: Sequence[str]) -> int:
        """Give ``user`` the inbox entries of ``convs`` it lacks: every seq
        above its last delivered one (``ld:``) up to the last it may see
        (membership spans), from the conversation log, at most _PULL_CHUNK
        per FANOUT.  Returns how many entries were added.  Cost: one
        pipelined read round, then one FANOUT per chunk (+ its WAIT)."""
        # Counted as a request (as the sweep is): its FANOUT answers may be
        # processed out of order with a write request's, so the lost-writes
        # check must not compare them (see _alone).
        self._enter()
        try:
            return await self._pull(user, convs)
        finally:
            self._leave()

    async def _pull(self, user: str, convs: Sequence[str]) -> int:
        from .redis import _Tx, _dec_spans, _int

        s = self.s
        tx = _Tx(s)
        uk = s._k_user(user)
        needs: dict[str, set[str]] = {uk: {"ld:" + c for c in convs}}
        for c in convs:
            needs.setdefault(s._k_conv(c), set()).update(("last", "hf", "sp:" + user))
        await tx.prefetch(needs)
        todo: list[list[Any]] = []
        for c in convs:
            ck = s._k_conv(c)
            top = last_visible(_dec_spans(await tx.get(ck, "sp:" + user)), _int(await tx.get(ck, "last")))
            ld = await tx.get(uk, "ld:" + c)
            lseq = int(ld.split(b":")[0]) if ld else 0
            # Below the history floor retention or a purge removed them all.
            start = max(lseq, _int(await tx.get(ck, "hf")))
            if top > start:
                todo.append([c, start, top])
        added = 0
        while todo:
            fan = _Fanout(self)
            positions: dict[tuple[str, int], list[tuple[str, int]]] = {}
            hints, new_users = _Round(), _Round()
            gaps: list[tuple[str, str, int, list, int]] = []
            for item in todo:
                c, start, top = item
                end = min(top, start + _PULL_CHUNK)
                gaps.append((user, c, start, [], end + 1))
                item[1] = end
            await fan._backfill(gaps, positions, hints, new_users)
            added += sum(len(v) for v in positions.values())
            await self.run(new_users)
            await self.run(hints, wait=False)
            todo = [item for item in todo if item[1] < item[2]]
        return added

    # -- typing and presence across nodes -------------------------------------

    @staticmethod
    def _now_us() -> int:
        import time as _time

        return _time.time_ns() // 1000

    async def tell_presence(self, user: str, online: bool, at: Optional[int] = None) -> None:
        """Push ``P user NODE 1|0 AT`` to every other node registered as
        watching ``user`` (watch_key, registration not expired); expired
        registrations (nodes gone, subscriptions ended) are deleted on the
        way.  One round when nobody watches, two otherwise; best effort (a
        lost hint is repaired by the watchers' re-check)."""
        now = self._now_us()
        wk = self.watch_key(user)
        try:
            (pairs,) = await self.run(self._one_raw(wk, "HGETALL", wk), wait=False)
            pairs = [p.decode() if isinstance(p, bytes) else str(p) for p in pairs or ()]
            rnd = _Round()
            text = f"P {user} {self.node_hex} {1 if online else 0} {now if at is None else at}".encode()
            for node, until in zip(pairs[0::2], pairs[1::2]):
                if int(until) <= now:
                    rnd.hdel(wk, node)
                elif node != self.node_hex:
                    rnd.push(self.hint_key(node), text)
            await self.run(rnd, wait=False)
        except (StoreError, ValueError, TypeError):
            pass  # TypeError: an error reply (e.g. WRONGTYPE) in place of the hash

    async def tell_privacy(self, changes: Sequence[tuple[str, bool]]) -> None:
        """Push ``H user 0|1`` (a last-seen privacy setting committed here)
        once to every other node where the user has a device online or that
        watches the user (registration not expired).  Two rounds; best
        effort (a lost one: the watchers show the old setting until the
        next subscription)."""
        now = self._now_us()
        users = sorted({u for u, _ in changes})
        rnd = _Round()
        for u in users:
            rnd.raw(self.online_key(u), "HVALS", self.online_key(u))
            rnd.raw(self.watch_key(u), "HGETALL", self.watch_key(u))
        try:
            answers = await self.run(rnd, wait=False)
            nodes: dict[str, set[str]] = {}
            for k, u in enumerate(users):
                on, pairs = answers[2 * k], answers[2 * k + 1]
                pairs = [p.decode() if isinstance(p, bytes) else str(p) for p in pairs or ()]
                nodes[u] = self._others(on) | {n for n, t in zip(pairs[0::2], pairs[1::2]) if int(t) > now and n != self.node_hex}
            rnd = _Round()
            for u, hide in changes:
                for node in sorted(nodes[u]):
                    rnd.push(self.hint_key(node), f"H {u} {1 if hide else 0}".encode())
            await self.run(rnd, wait=False)
        except (StoreError, ValueError, TypeError):
            pass

    def _one_raw(self, key: str, *cmd: Any) -> _Round:
        rnd = _Round()
        rnd.raw(key, *cmd)
        return rnd

    async def tell_typing(self, user: str, conv: str, active: bool, recipients: Sequence[str], at: int) -> None:
        """Push ``T user conv 0|1 at r...`` to every other node where one of
        ``recipients`` has a device online (one hint per node, naming that
        node's recipients): two rounds without a replication wait.  Best
        effort: a typing indicator that cannot be pushed is dropped."""
        users = sorted(set(recipients))
        if not users:
            return
        rnd = _Round()
        for r in users:
            rnd.raw(self.online_key(r), "HVALS", self.online_key(r))
        try:
            answers = await self.run(rnd, wait=False)
            per_node: dict[str, list[str]] = {}
            for r, ans in zip(users, answers):
                for node in self._others(ans):
                    per_node.setdefault(node, []).append(r)
            rnd = _Round()
            for node, rs in sorted(per_node.items()):
                rnd.push(self.hint_key(node), f"T {user} {conv} {1 if active else 0} {at} {' '.join(rs)}".encode())
            await self.run(rnd, wait=False)
        except (StoreError, TypeError):
            pass  # TypeError: an error reply in place of a record

    async def _beat(self) -> None:
        rnd = _Round()
        rnd.raw(self.alive_key(self.node_hex), "SET", self.alive_key(self.node_hex), "1", "PX", int(self.node_ttl * 1000))
        await self.run(rnd, wait=False)

    async def _alive_loop(self) -> None:
        while not self.s._closed:
            try:
                await self._beat()
            except Exception:
                pass  # the key lives node_ttl: four more tries before it lapses
            await trio.sleep(self.node_ttl / 5)

    async def online_elsewhere(self, users: Sequence[str]) -> dict[str, frozenset[str]]:
        """user -> the other nodes, alive now (their liveness key exists),
        where the user has a device online (device-to-node records).  Two
        rounds without a replication wait.  StoreError if unreachable."""
        users = list(dict.fromkeys(users))
        if not users:
            return {}
        rnd = _Round()
        for u in users:
            rnd.raw(self.online_key(u), "HVALS", self.online_key(u))
        answers = await self.run(rnd, wait=False)
        if any(isinstance(a, _ReplyError) for a in answers):
            raise StoreError("device-to-node records unreadable")
        nodes = {u: self._others(ans) for u, ans in zip(users, answers)}
        alive = await self.live_nodes(set().union(*nodes.values()))
        return {u: frozenset(ns & alive) for u, ns in nodes.items()}

    async def live_nodes(self, nodes: "set[str] | Sequence[str]") -> set[str]:
        """Those of ``nodes`` whose liveness key exists: one round of
        ``EXISTS`` (none for no nodes).  StoreError if unreachable."""
        every = sorted(nodes)
        if not every:
            return set()
        rnd = _Round()
        for n in every:
            rnd.raw(self.alive_key(n), "EXISTS", self.alive_key(n))
        return {n for n, ans in zip(every, await self.run(rnd, wait=False)) if ans == 1}

    async def watch(self, users: Sequence[str], *, more: bool = False) -> None:
        """Register this node as watching ``users`` (watch_key, for
        watch_ttl s; renewed only past half of it), so their presence
        changes on other nodes are pushed here.  Forgets the registrations
        of users not named (they lapse in Redis by themselves) unless
        ``more`` (a new subscription's users, added).  One round, none when
        nothing is due."""
        now = self._now_us()
        ttl = int(self.watch_ttl * 1_000_000)
        old = self._watching
        if not more:
            self._watching = {}
        rnd = _Round()
        for u in users:
            until = old.get(u, 0)
            if until - now < ttl // 2:
                until = now + ttl
                wk = self.watch_key(u)
                rnd.hset(wk, self.node_hex, until)
                # A record nobody renews goes away whole (dead nodes' fields
                # are also deleted by tell_presence as it meets them).
                rnd.raw(wk, "PEXPIRE", wk, ttl // 1000)
            self._watching[u] = until
        try:
            await self.run(rnd, wait=False)
        except StoreError:
            for u in users:
                self._watching.pop(u, None)  # due again next time
            raise

    async def presence_refresh(self, users: Sequence[str]) -> dict[str, frozenset[str]]:
        """The periodic re-check of the users watched here: register the
        watches (:meth:`watch`), then :meth:`online_elsewhere`."""
        await self.watch(users)
        return await self.online_elsewhere(users)

    async def hints(self, deliver: Callable[[str, str, Any], None], *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run forever: take this node's hints (BLPOP on its list) and hand
        them to ``deliver(kind, user, value)``, value as :func:`_parse_hint`
        gives it.  Also re-checks the heads of this node's online
        users every ``recheck`` seconds (hints are wake-ups: one lost only
        delays), sweeps outboxes and watches the epoch."""
        self.local_hints = deliver
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._recheck_loop, deliver)
            nursery.start_soon(self._sweep_loop)
            nursery.start_soon(self._epoch_loop)
            try:
                await self._beat()  # alive before the first login here
            except Exception:
                pass  # _alive_loop tries again
            nursery.start_soon(self._alive_loop)
            task_status.started()
            await self._hint_loop(deliver)

    async def _hint_loop(self, deliver: Callable[[str, str, Any], None]) -> None:
        s = self.s
        key = self.hint_key(self.node_hex)
        while not s._closed:
            try:
                client = await s._master(key)
                got = await client.blpop([key], 1)
            except Exception:
                await trio.sleep(0.2)
                await s._refresh_layout()
                continue
            if not got:
                continue
            # Under load hints arrive faster than one command per hint can
            # take them (a cross-node push then waited for the 1 s re-check):
            # after the blocking pop, take what else is queued in one LPOP.
            raws = [got[1]]
            try:
                raws.extend(await client.lpop(key, _HINT_BULK) or ())
            except Exception:
                pass  # the rest waits for the next round
            hints = []
            for raw in raws:
                try:
                    hints.append(_parse_hint(raw))
                except ValueError:
                    continue  # not one of ours (a newer node's kind?): a hint only wakes up
            # "The inbox grew to HEAD": only each user's highest matters.
            top: dict[str, int] = {}
            for kind, user, value in hints:
                if kind == "I" and value > top.get(user, -1):
                    top[user] = value
            for kind, user, value in hints:
                if kind == "I":
                    if user not in top:
                        continue  # delivered already, with the highest head
                    value = top.pop(user)
                elif kind == "R":
                    # Only if the device is still recorded elsewhere (it may
                    # have come back here since).
                    try:
                        holder = await s._r.hget(self.online_key(user), value)
                    except Exception:
                        holder = None
                    if holder is not None and holder.decode() == self.node_hex:
                        continue
                deliver(kind, user, value)

    async def _recheck_loop(self, deliver: Callable[[str, str, Any], None]) -> None:
        s = self.s
        while not s._closed:
            await trio.sleep(self.recheck)
            users = list(self.online)
            if not users:
                continue
            try:
                async def read() -> list[Any]:
                    async with s._r.pipeline(transaction=False) as pipe:
                        pending = [pipe.hmget(s._k_user(u), ["head", "sv"]) for u in users]
                    return [await p for p in pending]

                rows = await read()
            except Exception:
                continue
            self._ticks += 1
            if self._ticks % _PULL_TICKS == 0:
                # Read fan-out's safety net (see join_groups): the entries a
                # lost registration kept from this node's online users.
                for user in users:
                    if user in self.groups and user in self.online:
                        try:
                            await self.pull(user, self.groups[user])
                        except Exception:
                            pass  # the next round tries again
                try:
                    rows = await read()
                except Exception:
                    continue
            changed: list[tuple[str, int, int]] = []
            for user, (head, sv) in zip(users, rows):
                if head is not None:
                    deliver("I", user, int(head))
                known = self._sv.get(user)
                if known is None:
                    self._sv[user] = int(sv or 0)  # its login's read failed: from now on
                elif int(sv or 0) > known:
                    changed.append((user, known, int(sv)))
            if changed:
                try:
                    await self._catch_up(changed, deliver)
                except Exception:
                    continue  # not advanced: the next re-check tries again

    async def _catch_up(self, changed: list[tuple[str, int, int]], deliver: Callable[[str, str, Any], None]) -> None:
        """The state versions of users online here moved past what this
        node knew (``changed``: (user, known, now)): deliver what changed
        since, as the hints would have (M, C, U, V, K; a hint that did
        arrive makes this a repeat, which the core ignores -- markers and
        receipts never move back, a revocation closes only older sessions,
        a kick only sessions logged in before it -- but for U: one more
        ConvUpdate)."""
        s = self.s
        async with s._r.pipeline(transaction=False) as pipe:
            pending = [pipe.zrangebyscore(self.change_key(u), known + 1, "+inf") for u, known, _ in changed]
        listed = [await p for p in pending]
        for (user, _, now), members in zip(changed, listed):
            for raw in members:
                member = raw.decode() if isinstance(raw, bytes) else raw
                try:
                    await self._catch_up_one(user, member, deliver)
                except StoreError:
                    raise  # Redis unavailable: not advanced, the next re-check tries again
                except Exception:
                    # Not one this node understands (a newer node's kind?) or
                    # a record it cannot read: skipped, not retried forever.
                    log.warning("re-check of %s: change %r skipped", user, member, exc_info=True)
            if user in self._sv:
                self._sv[user] = max(self._sv[user], now)

    async def _catch_up_one(self, user: str, member: str, deliver: Callable[[str, str, Any], None]) -> None:
        """Deliver the change ``member`` (see :meth:`change_key`) of ``user``."""
        from .redis import _Tx

        s = self.s
        uk = s._k_user(user)
        what, _, key = member.partition(":")
        if what == "rd":
            # The hint a MarkRead sends (ReadMarked): a ReadState's last_seq
            # is the last seq the user may see, RECALL/EDIT entries included
            # -- not the list entry's (the seq of its last message).
            tx = _Tx(s)
            e = await s._entry(tx, user, key)
            last = last_visible(await s._spans_of(tx, key, user), int(await tx.get(s._k_conv(key), "last") or 0))
            deliver("M", user, (key, e.read_seq, last, e.unread))
        elif what == "rc":
            pair = direct_members(key)
            if pair is not None and user in pair:
                reader = pair[1] if pair[0] == user else pair[0]
                seq = await s._call(lambda: s._r.hget(s._k_user(reader), "rd:" + key))
                if seq is not None:
                    deliver("C", user, (key, reader, int(seq)))
        elif what == "cs":
            deliver("U", user, key)
        elif what == "rv":
            before = await s._call(lambda: s._r.hget(uk, member))
            if before is not None:
                deliver("V", user, (key or None, int(before)))
        elif what == "kk":
            rec = await s._call(lambda: s._r.hget(uk, member))
            if rec is None:
                return
            stamp_s, _, reason = rec.decode().partition(" ")
            stamp = int(stamp_s)
            # Only sessions logged in before the kick (a device that
            # logged in again since keeps its new session).
            logins = await s._call(lambda: s._r.hgetall(self.login_key(user)))
            for dev in sorted(self.online.get(user, ()) if not key else (key,)):
                at = logins.get(dev.encode())
                if at is not None and int(at) < stamp:
                    deliver("K", user, (dev, reason))

    async def kick(self, user: str, device: Optional[str], reason: str) -> None:
        """The host kicked ``user``'s sessions (``device``'s only if given)
        on this node: recorded (``kk:DEVICE``, this node's clock) and told
        to the other nodes where the user is online; their re-check ends
        the sessions logged in before it even if the hint is lost.  Best
        effort (a kick stores nothing else): a store error is dropped."""
        import time as _time

        at = _time.time_ns() // 1000
        rnd = _Round()
        field = "kk:" + (device or "")
        rnd.script("BUMP", (self.s._k_user(user), self.change_key(user)), (field, field, f"{at} {reason}"))
        try:
            await self.run(rnd, wait=False)
        except StoreError:
            pass
        await self.tell([(user, f"K {user} {device or '*'} {reason}")])

    async def _epoch_loop(self) -> None:
        s = self.s
        while not s._closed:
            await trio.sleep(1.0)
            if s._epoch_lost:
                # This node detected lost writes: it stops once the new
                # epoch is in Redis (so every node and client learns of
                # them), and writes nothing meanwhile (execute refuses).
                try:
                    await s._write_lost_epoch()
                except StoreError:
                    continue
                raise DataLost("this node detected lost writes and gave the namespace a new epoch: stopping")
            try:
                epoch = await s._r.hget(s._meta, "epoch")
            except Exception:
                continue
            if epoch is not None and bytes.fromhex(epoch.decode()) != s._epoch:
                raise DataLost("the namespace has a new epoch (another node detected lost writes): stopping")

    async def _sweep_loop(self) -> None:
        sweeps = 0
        while not self.s._closed:
            await trio.sleep(self.sweep_after)
            try:
                await self.sweep()
                sweeps += 1
                if sweeps % 20 == 0:  # about once a minute
                    await self.drop_dead_hint_lists()
            except DataLost:
                raise
            except Exception:
                pass  # the next sweep tries again

    async def drop_dead_hint_lists(self) -> int:
        """Delete the hint lists of nodes that are not live (their liveness
        key is gone: a node that died or stopped; node ids are new per
        process, so nothing else ever takes them); returns how many.  A
        live node cut off longer than ``node_ttl`` may lose its queued
        hints: wake-ups, which its re-checks make up for."""
        s = self.s
        prefix = f"{s.ns}:{{n:"
        lists: list[str] = []
        for node in s._r.connection_pool.cluster_layout.primaries:
            client = await s._master_at((node.host, node.port))
            cursor = 0
            while True:
                cursor, batch = await client.scan(cursor, match=prefix + "*}", count=500)
                lists.extend(k.decode() if isinstance(k, bytes) else k for k in batch)
                if not cursor:
                    break
        nodes = {k[len(prefix):-1] for k in lists if k.endswith("}")} - {self.node_hex}
        dead = sorted(nodes - await self.live_nodes(nodes))
        if dead:
            rnd = _Round()
            for n in dead:
                rnd.raw(self.hint_key(n), "DEL", self.hint_key(n))
            await self.run(rnd, wait=False)
        return len(dead)

    async def sweep(self, older_than: Optional[float] = None) -> int:
        """Finish the fan-outs of outbox entries older than ``older_than``
        seconds (default ``sweep_after``) on every master; returns how many
        messages were finished."""
        self._enter()
        try:
            return await self._sweep(older_than)
        finally:
            self._leave()

    async def _sweep(self, older_than: Optional[float]) -> int:
        from .redis import _Tx, _dec_msg

        s = self.s
        age_us = int((self.sweep_after if older_than is None else older_than) * 1_000_000)
        import time as _time

        now_us = int(_time.time() * 1_000_000)
        pattern = self.outbox_key("*")
        ob_head, ob_tail = self.outbox_key("\0").split("\0")
        keys: list[str] = []
        for node in s._r.connection_pool.cluster_layout.primaries:
            client = await s._master_at((node.host, node.port))
            cursor = 0
            while True:
                cursor, batch = await client.scan(cursor, match=pattern, count=500)
                keys.extend(k.decode() if isinstance(k, bytes) else k for k in batch)
                if not cursor:
                    break
        done = 0
        for ob in keys:
            conv = ob[len(ob_head):-len(ob_tail)]
            entries = await s._call(lambda: s._r.hgetall(ob))
            fan = _Fanout(self)
            finished: list[str] = []
            for f, v in entries.items():
                seq = int(f)
                st, _, ev = v.decode().partition(":")
                if now_us - int(st) < age_us:
                    continue
                tx = _Tx(s)
                blob = await tx.get(s._k_conv(conv), f"s:{seq}")
                if blob is None:
                    # Removed (retention, a purge) after its fan-out: nothing
                    # left to deliver, and the entry must not linger.
                    gone = _Round()
                    gone.hdel(ob, f.decode() if isinstance(f, bytes) else f)
                    await self.run(gone, wait=False)
                    continue
                m = _dec_msg(blob)
                recipients = await self._recipients(tx, conv, seq)
                dedupe = None
                event_msg = None
                if m.kind == MessageKind.EDIT:
                    target = await tx.get(s._k_conv(conv), f"s:{m.target}")
                    event_msg = replace(m, payload=_dec_msg(target).payload if target is not None else b"")
                if m.kind in (MessageKind.MESSAGE, MessageKind.RECALL, MessageKind.EDIT):
                    dkey, dfield = s._k_user(m.sender), f"d:{m.device}/{m.local_id}"
                    prior = await tx.get(dkey, dfield)
                    if prior is not None and prior.startswith(b"P:"):
                        digest_hex = prior.decode().split(":")[3]
                        dedupe = (m.sender, dfield, f"{m.msg_id.hex()}:{seq}:{m.server_time}:{digest_hex}".encode())
                fan.message(m, recipients, ev == "1", dedupe, event_msg)
                finished.append(f.decode() if isinstance(f, bytes) else f)
            if finished:
                await fan.run()
                done += len(finished)
        return done

    async def _recipients(self, tx: Any, conv: str, seq: int) -> list[str]:
        """Who received seq ``seq`` of ``conv``: the members at that seq
        (membership intervals; a JOINED/LEFT entry reaches its user too)."""
        s = self.s
        pair = direct_members(conv)
        if pair is not None:
            return sorted(pair)
        out = []
        fields = await s._call(lambda: s._r.hscan(s._k_conv(conv), 0, match="sp:*", count=10_000))
        cursor, found = fields
        while True:
            for f, v in found.items():
                f = f.decode() if isinstance(f, bytes) else f
                from .redis import _dec_spans

                if any(lo <= seq <= hi for lo, hi in member_ranges(_dec_spans(v))):
                    out.append(f[3:])
            if not cursor:
                break
            cursor, found = await s._call(lambda: s._r.hscan(s._k_conv(conv), cursor, match="sp:*", count=10_000))
        return sorted(out)


class _Fanout:
    """Round 3 of sends and membership changes: inbox pointers for every
    recipient (FANOUT, backfilling gaps), the extra records, host events,
    hints, then the outbox entries removed."""

    def __init__(self, ops: ClusterOps) -> None:
        self.ops = ops
        self.msgs: list[tuple[StoredMessage, list[str], bool, Optional[tuple[str, str, bytes]]]] = []
        self.extra = _Round()
        self.event_msgs: dict[bytes, StoredMessage] = {}
        #: (conv, user) of this round's JOINED entries (see run()).
        self.joined: set[tuple[str, str]] = set()

    def message(self, m: StoredMessage, recipients: list[str], event: bool,
                dedupe: Optional[tuple[str, str, bytes]] = None,
                event_msg: Optional[StoredMessage] = None) -> None:
        """Fan ``m`` out to ``recipients``; ``dedupe`` = (user, field, record):
        the final dedupe record, written with the user's own entry (or alone
        if the user is not a recipient).  ``event_msg``: what the host event
        of a RECALL/EDIT entry tells (the entry with the amend's payload; its
        event names no muted or mentioned users, as in the memory store)."""
        if dedupe is not None and dedupe[0] not in recipients:
            self.extra.hset(self.ops.s._k_user(dedupe[0]), dedupe[1], dedupe[2])
            dedupe = None
        if event_msg is not None:
            self.event_msgs[m.msg_id] = event_msg
        self.msgs.append((m, recipients, event, dedupe))

    async def run(self) -> dict[tuple[str, int], tuple[tuple[str, int], ...]]:
        """-> (conv, seq) -> ((user, position), ...) for the positions this
        round gave (a user whose entry another node already gave is left
        out: that node's hint covers it)."""
        from .redis import _Tx

        ops, s = self.ops, self.ops.s
        if not self.msgs:
            return {}
        rnd = self.extra
        calls: list[tuple[int, str, str, list[tuple[int, str]]]] = []
        # Read fan-out (large groups, see ClusterOps.join_groups): entries
        # only for the members registered online, read AFTER the SEND that
        # took the seq (the ordering the no-loss argument needs).
        big = sorted({m.conv for m, recipients, _, _ in self.msgs if ops.reads_log(m.conv, len(recipients))})
        online: dict[str, set[str]] = {}
        if big:
            rnd0 = _Round()
            for c in big:
                rnd0.raw(ops.on_key(c), "HKEYS", ops.on_key(c))
            for c, ans in zip(big, await ops.run(rnd0, wait=False)):
                online[c] = {k.decode() if isinstance(k, bytes) else k for k in ans or ()}
        # JOINED entries: (conv, user).  A member added while online is
        # registered where its sessions are, whatever the group's size now
        # (it may grow past the threshold later; else the member would see
        # the group's messages only at its next login).
        self.joined = joined = {(m.conv, m.sender) for m, _, _, _ in self.msgs if m.kind == MessageKind.JOINED}
        # One FANOUT per (recipient, message), in the batch's order (one
        # pipeline per master runs them in that order: positions follow it).
        for m, recipients, event, dedupe in self.msgs:
            ref = f"{m.seq}:{m.server_time}:{m.conv}"
            targets = recipients
            if m.conv in online:
                # The sender (its own entry, the dedupe record; the subject of
                # a JOINED/LEFT entry) always; the online members.
                here = online[m.conv]
                targets = [u for u in recipients if u in here or u == m.sender]
            for user in targets:
                df, dv = (dedupe[1], dedupe[2]) if dedupe is not None and dedupe[0] == user else ("", b"")
                idx = rnd.script("FANOUT", (s._k_user(user), ops.online_key(user)), (m.conv, "0", df, dv, m.seq, ref))
                calls.append((idx, user, m.conv, [(m.seq, ref)]))
            rnd.hset(s._k_msg(m.msg_id), "r", f"{m.seq}:{m.conv}".encode())
            if m.seq == 1:
                rnd.hset(s._convs, m.conv, b"1")  # what Expire walks (one write per conversation)
            if event and m.kind in (MessageKind.RECALL, MessageKind.EDIT):
                rnd.script("EVENT", (s._ev,), (m.msg_id.hex(), m.server_time, message_event(
                    self.event_msgs.get(m.msg_id, m), recipients)))
            elif event:
                tx = _Tx(s)
                muted = [u for u in recipients if (await s._settings(tx, u, m.conv))[1]]
                rnd.script("EVENT", (s._ev,), (m.msg_id.hex(), m.server_time, message_event(
                    m, recipients, muted, mentioned_recipients(m, recipients))))
        answers = await ops.run(rnd)
        positions: dict[tuple[str, int], list[tuple[str, int]]] = {}
        hints = _Round()
        new_users = _Round()
        gapped: dict[tuple[str, str], list] = {}
        for idx, user, conv, items in calls:
            ans = answers[idx]
            if int(ans[0]) == -1:
                g = gapped.setdefault((user, conv), [user, conv, int(ans[1]), []])
                g[2] = min(g[2], int(ans[1]))
                g[3].extend(items)
                continue
            self._took(ans, user, conv, positions, hints, new_users)
            if (conv, user) in joined and ans[2]:
                ops._registered(hints, conv, user, ans[2])
        gaps = [(u, c, lseq, sorted(items), min(items)[0]) for u, c, lseq, items in gapped.values()]
        if gaps:
            await self._backfill(gaps, positions, hints, new_users)
        await ops.run(new_users)
        # Done, in one round without a wait: the hints, the outbox entries
        # removed (a leftover one is only redone by a sweep), the highest
        # server time (what a node starting later floors its clock with).
        for m, _, _, _ in self.msgs:
            hints.hdel(ops.outbox_key(m.conv), str(m.seq))
        top = max(m.server_time for m, _, _, _ in self.msgs)
        if top > ops._st_written:
            ops._st_written = top
            hints.script("MAXSET", (s._meta,), ("st", top, 1 << 62))
        await ops.run(hints, wait=False)
        return {k: tuple(sorted(v)) for k, v in positions.items()}

    def _took(self, ans: Any, user: str, conv: str, positions: dict, hints: _Round, new_users: _Round) -> None:
        ops = self.ops
        head, out, nodes, fresh = int(ans[0]), ans[1], ans[2], int(ans[3])
        ops._check_pos(user, head)
        for j in range(0, len(out), 2):
            positions.setdefault((conv, int(out[j])), []).append((user, int(out[j + 1])))
        if fresh:
            new_users.hset(ops.s._users, user, b"1")
        me = ops.node_hex
        for node in {n.decode() if isinstance(n, bytes) else n for n in nodes}:
            if node != me:
                hints.push(ops.hint_key(node), f"I {user} {head}".encode())

    async def _backfill(self, gaps: list, positions: dict, hints: _Round, new_users: _Round) -> None:
        """A recipient's last delivered seq of the conversation is below the
        first seq this round brings: deliver the missing ones (those the
        recipient was a member for) from the conversation log, in order."""
        from .redis import _Tx, _dec_msg, _dec_spans

        ops, s = self.ops, self.ops.s
        rnd = _Round()
        calls = []
        for user, conv, lseq, items, first in gaps:
            tx = _Tx(s)
            pair = direct_members(conv)
            spans = ((0, OPEN),) if pair is not None else _dec_spans(await tx.get(s._k_conv(conv), "sp:" + user))
            ranges = member_ranges(spans)
            # Every seq up to the LAST this round brings, not only those before
            # its first: FANOUT's backfill mode checks no gap between the
            # pairs it is given, and another node's message may sit between
            # two of this batch's (a new operator's trial: the recipient's
            # last delivered seq passed it, and that node's own fan-out then
            # found it delivered -- lost for good).
            # (``first``: the seq below which all is to fill, with no items.)
            have = {q for q, _ in items}
            missing = [q for q in range(lseq + 1, max(have) if have else first)
                       if q not in have and any(lo <= q <= hi for lo, hi in ranges)]
            blobs = await tx.mget(s._k_conv(conv), [f"s:{q}" for q in missing] + ["hf", "hv"]) if missing else [None, None]
            hv = blobs.pop() == b"1"
            floor = int(blobs.pop() or 0)  # (the history floor, read with them)
            visible = visible_ranges(spans, hv)
            full = []
            for q, b in zip(missing, blobs):
                if b is None:
                    if q <= floor:
                        # Removed by retention (Expire) or a purge: nothing
                        # left to deliver.
                        continue
                    # Seqs are taken with their entry (SEND, CHANGE), and
                    # only retention and purges remove one, up to the floor:
                    # the read reached a node without the write (e.g. a
                    # master restarted under traffic, answering until it
                    # learns it was failed over).  Skipping it would deliver
                    # past it for good; this fan-out fails instead, and a
                    # retry or the outbox sweep delivers in order.
                    raise StoreError(f"Redis: {conv!r} seq {q} (to {user!r}) is missing above its history floor"
                                     f" {floor}: a node answered without a write it had acknowledged; fan-out not done")
                m = _dec_msg(b)
                if hidden_amend(m, visible):
                    continue  # (an amend of what the recipient may not see: never theirs, as _amend fans it out)
                full.append((q, f"{q}:{m.server_time}:{conv}"))
            full.extend(items)
            full.sort()  # (ascending, as FANOUT takes them)
            if not full:
                continue  # all removed: nothing to deliver
            calls.append((rnd.script("FANOUT", (s._k_user(user), ops.online_key(user)),
                                     (conv, "1", "", "", *[x for it in full for x in it])), user, conv))
        answers = await ops.run(rnd)
        for idx, user, conv in calls:
            self._took(answers[idx], user, conv, positions, hints, new_users)
            if (conv, user) in self.joined and answers[idx][2]:
                # A JOINED entry after a gap (the user was not a member for
                # the seqs before it): registered as in run().
                self.ops._registered(hints, conv, user, answers[idx][2])
