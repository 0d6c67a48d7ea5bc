// The client's protocol rules against a scripted fake broker (a fake
// WebSocket): one SendReq per connection, resent with the same bytes after a reconnect,
// transient refusals, PushAck only after the handlers ran, malformed bytes.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { FrameDecoder, encodeFrame, frame, CloseCode, ErrorCode } from '../src/codec.js';
import { PimcoreClient, SendError, SendTimeout } from '../src/client.js';

class FakeWS {
  static all = [];
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; this.dec = new FrameDecoder(); FakeWS.all.push(this); setTimeout(() => { this.readyState = 1; this.onopen?.(); }); }
  send(bytes) { this.sent.push(Uint8Array.from(bytes)); this.frames = (this.frames || []).concat(this.dec.feed(bytes)); }
  close() { this.readyState = 3; }
  deliver(...frames) { for (const f of frames) this.onmessage?.({ data: encodeFrame(f).buffer }); }
  drop() { this.readyState = 3; this.onclose?.({}); }
  of(name) { return (this.frames || []).filter((f) => f.name === name); }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const EPOCH = new Uint8Array(16).fill(7);
function loginAck(extra = {}) {
  return frame('LoginAck', { user: 'u', device: 'd', server_time: 1, position: 0, head: 0, gap: false, max_frame: 1 << 20,
    max_payload: 65536, window: 4, heartbeat_ms: 0, caps: 0, epoch: EPOCH, resync: false, states: 0, ...extra });
}
async function opened(before) {
  // The client's socket once it has sent its Login and CalibrateReq: a token
  // function answers on a later turn, and on a loaded machine (a CI run) 5 ms
  // was not always enough ("Cannot read properties of undefined").
  for (let i = 0; i < 400; i++) {
    const ws = FakeWS.all.length > before ? FakeWS.all.at(-1) : null;
    if (ws && ws.of('Login')[0] && ws.of('CalibrateReq')[0]) return ws;
    await sleep(5);
  }
  throw new Error('the client sent no Login and CalibrateReq within 2 s');
}
async function connected(c) {
  const before = FakeWS.all.length;
  const p = c.connect();
  const ws = await opened(before);
  const login = ws.of('Login')[0];
  const cal = ws.of('CalibrateReq')[0];
  ws.deliver(loginAck(), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time + 1000 }));
  await p;
  await sleep(0); // frames that come with the login are handled after connect() resolved, on a later turn
  return { ws, login };
}
async function connectedWithHeartbeat(c, heartbeatMs) {
  // Logged in with a heartbeat of heartbeatMs, the device clock calibrated at offset 0.
  const before = FakeWS.all.length;
  const p = c.connect();
  const ws = await opened(before);
  const cal = ws.of('CalibrateReq')[0];
  ws.deliver(loginAck({ heartbeat_ms: heartbeatMs }), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  await p;
  return ws;
}
function pushOf(pos, serverTime) {
  // A Push of one message at inbox position pos, stored at serverTime (µs).
  return frame('Push', { position: pos, messages: [{ position: pos, msg_id: Uint8Array.of(pos % 256), conv: 'd:u:v', seq: pos, sender: 'v', device: 'x', client_time: 1, server_time: serverTime, payload: new Uint8Array(0), kind: 0, local_id: pos, after_seq: 0, target: 0, edited: 0, recalled: false, deleted: false }] });
}
function make(opts = {}) {
  return new PimcoreClient({ url: 'ws://fake/', token: 't', device: 'd', WebSocket: FakeWS, ackTimeout: 100, timeSamples: 1, ackDelay: 5, ...opts });
}
const H = 1_000_000; // the heartbeat interval of handTicked's login (heartbeat_ms 1000), in µs
async function handTicked(opts = {}) {
  // A client (make's, ackTimeout 400, with opts) on an injected device clock
  // (µs) moved by hand -- t.clock -- connectedWithHeartbeat (1 s); the
  // ticker's work is run by hand (t.c._tick()).  Returns t: { c, ws, clock,
  // start (the clock at login), disc (the disconnected events from then on) }.
  const t = { clock: 1_700_000_000_000_000, disc: [] };
  t.c = make({ ackTimeout: 400, backoffInitial: 10000, now: () => t.clock, ...opts });
  t.ws = await connectedWithHeartbeat(t.c, 1000);
  t.start = t.clock;
  t.c.on('disconnected', (d) => t.disc.push(d));
  return t;
}

test('a SendReq is written once per connection (none again after ackTimeout), and resent with the same bytes after a reconnect', async () => {
  const c = make({ backoffInitial: 1 });
  const { ws } = await connected(c);
  assert.ok(Math.abs(c.clockOffset - (1000 - c.rtt / 2)) <= 1, 'offset = server_time - (t0 + t1) / 2');
  const p = c.send('d:u:v', 'x');
  await sleep(5);
  const first = ws.sent.at(-1);
  await sleep(250);
  const reqs = ws.of('SendReq');
  assert.equal(reqs.length, 1, 'no copy on the same connection (well past ackTimeout)');
  assert.equal(c.stats.retransmits, 0);
  ws.drop();
  await sleep(30);
  const ws2 = FakeWS.all.at(-1);
  assert.notEqual(ws2, ws);
  const login2 = ws2.of('Login')[0];
  assert.deepEqual(login2.epoch, EPOCH, 'the epoch of the cursor goes back');
  const cal = ws2.of('CalibrateReq')[0];
  ws2.deliver(loginAck(), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  await sleep(5);
  const again = ws2.of('SendReq');
  assert.equal(again.length, 1);
  assert.equal(again[0].local_id, reqs[0].local_id);
  assert.ok(ws2.sent.some((x) => x.length === first.length && x.every((v, i) => v === first[i])), 'the very same bytes');
  assert.equal(c.stats.retransmits, 1);
  ws2.deliver(frame('SendAck', { local_id: again[0].local_id, code: 0, msg_id: new Uint8Array(16), seq: 1, server_time: 5 }));
  assert.equal((await p).seq, 1);
  await c.close();
});

test('a silent broker is found dead by an unanswered Ping even while the client sends', async () => {
  const c = make({ ackTimeout: 50, backoffInitial: 10000 });
  const ws = await connectedWithHeartbeat(c, 300);
  const disc = []; c.on('disconnected', (d) => disc.push(d));
  c.send('d:u:v', 'x').catch(() => {});
  for (let i = 0; i < 40 && !disc.length; i++) await sleep(50);
  assert.equal(disc.length, 1);
  assert.ok(ws.of('Ping').length >= 1, 'a Ping went out although the client was sending');
  assert.match(disc[0].reason, /no Pong/, 'the Ping rule (two intervals), not the deadAfter fallback');
  await c.close();
});

test('a backward step of the device clock does not stall the timers: a silent link is still found dead', async () => {
  // The ticker's work is run right after each move of the clock.
  const t = await handTicked({ ackTimeout: 5000 });
  const { c, ws, disc } = t;
  t.clock += H; c._tick();
  await null; // (the frames of one tick go out together, in a microtask: _queueOut)
  assert.equal(ws.of('Ping').length, 1, 'a Ping after one interval of silence');
  t.clock -= 3600_000_000; // NTP or the user steps the clock back an hour; the broker stays silent
  let session = 0; // session time since the step
  while (!disc.length && session < 2 * H) { t.clock += 100_000; session += 100_000; c._tick(); }
  assert.equal(disc.length, 1, 'the dead link is found within two heartbeat intervals after the step');
  assert.match(disc[0].reason, /dead link/);
  // Local ids (and stamps) keep the device clock as given, not the session time.
  c.send('d:u:v', 'x').catch(() => {});
  assert.deepEqual(c.pendingSends(), [t.clock]);
  await c.close();
});

test('local ids are consecutive within a run, from the clock at its first send (one dedupe record per burst)', async () => {
  // (From the clock at each send they were increasing but never consecutive,
  // so the broker's store wrote one dedupe record per send.)
  const t = await handTicked();
  const { c } = t;
  const base = t.clock;
  for (let i = 0; i < 4; i++) { c.send('d:u:v', 'x').catch(() => {}); t.clock += 50; c._tick(); }
  assert.deepEqual(c.pendingSends(), [base, base + 1, base + 2, base + 3]);
  c.send('d:u:v', 'y', { localId: base + 100 }).catch(() => {});
  c.send('d:u:v', 'z').catch(() => {});
  assert.deepEqual(c.pendingSends().slice(-2), [base + 100, base + 101]);
  await c.close();
});

test('a history request is written once per connection and asked again after a reconnect', async () => {
  const c = make({ backoffInitial: 1 });
  const { ws } = await connected(c);
  const p = c.history('d:u:v', { fromSeq: 0, limit: 10 });
  await sleep(350); // more than 2 x ackTimeout
  assert.equal(ws.of('HistoryReq').length, 1, 'not asked again on the same connection');
  ws.drop();
  await sleep(30);
  const ws2 = FakeWS.all.at(-1);
  const cal = ws2.of('CalibrateReq')[0];
  ws2.deliver(loginAck(), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  await sleep(5);
  const [req] = ws2.of('HistoryReq');
  assert.ok(req, 'asked again on the new connection');
  ws2.deliver(frame('HistoryResp', { req_id: req.req_id, conv: 'd:u:v', code: 0, messages: [], more: false }));
  assert.deepEqual((await p).messages, []);
  await c.close();
});

test('a connection cut right after each login is redialled at the initial backoff every time', { timeout: 10000 }, async () => {
  const c = make({ backoffInitial: 10, backoffMax: 10000 });
  await connected(c);
  for (let i = 0; i < 8; i++) {
    const ws = FakeWS.all.at(-1);
    ws.drop();
    let next = null;
    for (let j = 0; j < 20 && !next; j++) { await sleep(10); if (FakeWS.all.at(-1) !== ws) next = FakeWS.all.at(-1); }
    assert.ok(next, `cut ${i + 1}: not redialled within 200 ms (backoffInitial is 10 ms)`);
    await sleep(5);
    const cal = next.of('CalibrateReq')[0];
    next.deliver(loginAck(), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
    await sleep(5);
    assert.equal(c.state, 'ACTIVE');
  }
  await c.close();
});

test('right after markRead the unread count is at most what lies past the new marker', async () => {
  const c = make();
  const { ws } = await connected(c);
  ws.deliver(frame('ReadStates', { entries: [{ conv: 'g', read_seq: 0, last_seq: 10, unread: 10 }, { conv: 'h', read_seq: 0, last_seq: 10, unread: 3 }] }));
  await sleep(5);
  c.markRead('g', 4);
  assert.deepEqual(c.readState('g'), { conv: 'g', read_seq: 4, last_seq: 10, unread: 6 });
  c.markRead('h', 4);
  assert.equal(c.unread('h'), 3, 'never raised (own and recalled messages do not count)');
  c.markRead('g', 10);
  assert.equal(c.unread('g'), 0);
  await c.close();
});

test("a send moves its conversation's last_seq as the broker counts it, a first one included (never unread, the marker stays)", async () => {
  const c = make();
  const { ws } = await connected(c);
  ws.deliver(frame('ReadStates', { entries: [{ conv: 'g', read_seq: 0, last_seq: 2, unread: 2 }] }));
  await sleep(5);
  const p = c.send('g', 'mine');
  const q = c.send('h', 'first');
  await sleep(5);
  const [a, b] = ws.of('SendReq');
  ws.deliver(frame('SendAck', { local_id: a.local_id, code: 0, msg_id: new Uint8Array(16), seq: 3, server_time: 9 }),
    frame('SendAck', { local_id: b.local_id, code: 0, msg_id: new Uint8Array(16).fill(1), seq: 1, server_time: 10 }));
  await p; await q;
  assert.deepEqual(c.readState('g'), { conv: 'g', read_seq: 0, last_seq: 3, unread: 2 });
  assert.deepEqual(c.readState('h'), { conv: 'h', read_seq: 0, last_seq: 1, unread: 0 }, 'a conversation it held no state of');
  await c.close();
});

test("others' messages pushed after an own send, with lower seqs, still count as unread (the count is kept apart from the last seq shown)", async () => {
  const c = make();
  const { ws } = await connected(c);
  ws.deliver(frame('ReadStates', { entries: [{ conv: 'd:u:v', read_seq: 0, last_seq: 2, unread: 2 }] }));
  await sleep(5);
  const p = c.send('d:u:v', 'mine');
  await sleep(5);
  const [a] = ws.of('SendReq');
  ws.deliver(frame('SendAck', { local_id: a.local_id, code: 0, msg_id: new Uint8Array(16), seq: 5, server_time: 9 }));
  await p;
  const m = (pos, seq) => ({ position: pos, msg_id: Uint8Array.of(seq), conv: 'd:u:v', seq, sender: 'v', device: 'x', client_time: 1,
    server_time: 1, payload: new Uint8Array(0), kind: 0, local_id: seq, after_seq: 0, target: 0, edited: 0, recalled: false, deleted: false,
    mentions: [], mention_all: false });
  ws.deliver(frame('Push', { position: 4, messages: [m(3, 3), m(4, 4)] }));
  await sleep(5);
  assert.deepEqual(c.readState('d:u:v'), { conv: 'd:u:v', read_seq: 0, last_seq: 5, unread: 4 });
  c.markRead('d:u:v', 4);
  assert.equal(c.unread('d:u:v'), 0, 'nothing of theirs past the marker (its own send is never unread)');
  await c.close();
});

test("the sending client holds its message with its mentions (as the broker stores them); mentions that are no array reject", async () => {
  const c = make();
  const { ws } = await connected(c);
  const p = c.send('g', 'hi', { mentions: ['w', 'v', 'w', 'u'], mentionAll: true });
  await assert.rejects(c.send('g', 'hi', { mentions: 'carol' }), (e) => e instanceof TypeError && /mentions/.test(e.message));
  await sleep(5);
  const [a] = ws.of('SendReq');
  assert.equal(ws.of('SendReq').length, 1);
  ws.deliver(frame('SendAck', { local_id: a.local_id, code: 0, msg_id: new Uint8Array(16), seq: 1, server_time: 9 }));
  await p;
  const [m] = c.view('g');
  assert.deepEqual([m.mentions, m.mention_all], [[{ user: 'v' }, { user: 'w' }], true]);
  await c.close();
});

test('a bad saved cursor (position, epoch) is refused by the constructor, naming it', () => {
  for (const position of [-1, '5', 1.5, 1e30, 2n ** 64n]) {
    assert.throws(() => make({ position }), (e) => e instanceof RangeError && /^position must be an integer/.test(e.message), String(position));
  }
  for (const epoch of [5, 'xyz', [1, 2]]) {
    assert.throws(() => make({ epoch }), (e) => e instanceof TypeError && /^epoch must be/.test(e.message), String(epoch));
  }
  // 16 bytes or none: the broker knows no other (the login would resync the device, every message again).
  for (const epoch of ['ab'.repeat(17), new Uint8Array(15)]) {
    assert.throws(() => make({ epoch }), (e) => e instanceof RangeError && /^epoch must be 16 bytes/.test(e.message), String(epoch));
  }
  make({ epoch: '' }); make({ epoch: new Uint8Array(0) });
  make({ position: 5, epoch: 'ab'.repeat(16) });
  assert.equal(make({ position: 5n, epoch: new Uint8Array(16) }).takenUpto, 5);
});

test("flags that are not booleans, and a timeout that is no number, are refused at the call ('no' is truthy)", async () => {
  const c = make();
  const { ws } = await connected(c);
  await assert.rejects(c.setConversation('g', { pinned: 'no' }), (e) => e instanceof TypeError && /pinned must be true, false or undefined/.test(e.message));
  await assert.rejects(c.send('g', 'x', { mentionAll: 'false' }), (e) => e instanceof TypeError && /mentionAll must be true or false/.test(e.message));
  await assert.rejects(c.send('g', 'x', { timeout: 'soon' }), (e) => e instanceof TypeError && /timeout must be a number/.test(e.message));
  await sleep(5);
  assert.equal(ws.of('SendReq').length + ws.of('ConvSetReq').length, 0);
  await c.close();
});

test("a conversation left out of a login's read states (LoginAck.states) is dropped: purged while this device was away", async () => {
  const c = make({ backoffInitial: 1 });
  const { ws } = await connected(c);
  ws.deliver(frame('ReadStates', { entries: [{ conv: 'club', read_seq: 0, last_seq: 3, unread: 3 }, { conv: 'team', read_seq: 0, last_seq: 3, unread: 3 }] }));
  ws.deliver(frame('Push', { position: 1, messages: [{ position: 1, msg_id: Uint8Array.of(1), conv: 'team', seq: 3, sender: 'v', device: 'x',
    client_time: 1, server_time: 1, payload: new Uint8Array(0), kind: 0, local_id: 1, after_seq: 0, target: 0, edited: 0, recalled: false,
    deleted: false, mentions: [], mention_all: false }] }));
  await sleep(5);
  assert.equal(c.unread('team'), 3);
  assert.equal(c.view('team').length, 1);
  const purged = [];
  c.on('purged', (p) => purged.push(p));
  ws.drop();
  c.markRead('team', 3); // (offline: sent at the next login, unconfirmed)
  await sleep(100);
  const ws2 = FakeWS.all.at(-1);
  assert.notEqual(ws2, ws);
  const cal = ws2.of('CalibrateReq')[0];
  ws2.deliver(loginAck({ states: 2 }), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  ws2.deliver(frame('ReadStates', { entries: [{ conv: 'club', read_seq: 3, last_seq: 3, unread: 0 }] }));
  await sleep(5);
  assert.ok(c.readState('team'), 'one of two so far');
  ws2.deliver(frame('ReadStates', { entries: [{ conv: 'd:u:v', read_seq: 0, last_seq: 1, unread: 1 }] }));
  await sleep(5);
  assert.equal(c.readState('team'), undefined);
  assert.equal(c.unread('team'), 0);
  assert.deepEqual(c.view('team'), [], 'its messages were purged with it');
  assert.deepEqual(c.conversations().map((r) => r.conv).sort(), ['club', 'd:u:v']);
  // Said (a trial: an app that stores messages had no word of it), and its unconfirmed marker is forgotten (it
  // was sent again at every reconnect, and landed in a group created again with the id).
  assert.deepEqual(purged, [{ conv: 'team', last_seq: 3, gone: true }]);
  ws2.drop();
  await sleep(100);
  const ws3 = FakeWS.all.at(-1);
  assert.notEqual(ws3, ws2);
  const cal3 = ws3.of('CalibrateReq')[0];
  ws3.deliver(loginAck({ states: 0 }), frame('CalibrateResp', { client_time: cal3.client_time, server_time: cal3.client_time }));
  await sleep(5);
  assert.deepEqual(ws3.of('Read').map((r) => r.conv), []);
  await c.close();
});

test('a purge told (ConvPurged, online or at a login) drops what the client holds of it; every Login asks for it', async () => {
  // A new user's trial: a device online while its group was purged kept the purged messages in its view
  // until its next login (a group re-created with the same id showed them beside its new ones).
  const c = make({ backoffInitial: 1 });
  const { ws, login } = await connected(c);
  assert.ok(login.caps & 8, 'Login.caps asks for CAP_CONV_PURGED');
  const purged = [];
  c.on('purged', (p) => purged.push(p));
  const m = (pos, conv, seq) => ({ position: pos, msg_id: Uint8Array.of(pos), conv, seq, sender: 'v', device: 'x', client_time: 1,
    server_time: pos, payload: new Uint8Array(0), kind: 0, local_id: pos, after_seq: 0, target: 0, edited: 0, recalled: false,
    deleted: false, mentions: [], mention_all: false });
  ws.deliver(frame('Push', { position: 4, messages: [m(1, 'team', 1), m(2, 'team', 2), m(3, 'd:u:v', 1), m(4, 'd:u:v', 2)] }));
  await sleep(5);
  assert.equal(c.unread('team'), 2);
  ws.deliver(frame('ReadStates', { entries: [{ conv: 'team', read_seq: 2, last_seq: 2, unread: 0 }] }),
    frame('ConvPurged', { conv: 'team', last_seq: 2, gone: true }));
  await sleep(5);
  assert.deepEqual(c.view('team'), []);
  assert.equal(c.readState('team'), undefined);
  assert.deepEqual(purged, [{ conv: 'team', last_seq: 2, gone: true }]);
  // A 1:1 chat stays: only what the purge removed leaves the view.
  ws.deliver(frame('ConvPurged', { conv: 'd:u:v', last_seq: 1, gone: false }));
  await sleep(5);
  assert.deepEqual(c.view('d:u:v').map((x) => x.seq), [2]);
  assert.ok(c.readState('d:u:v'));
  // The group created again: its seqs continue after the purged ones.
  ws.deliver(frame('Push', { position: 5, messages: [m(5, 'team', 3)] }));
  await sleep(5);
  assert.deepEqual(c.view('team').map((x) => x.seq), [3]);
  assert.equal(c.unread('team'), 1);
  // Told at a login (a trial: offline while the group was purged and created again, the client kept the purged
  // messages and its old marker, unread 3 where the broker counted 1): before the login's ReadStates.
  c.markRead('team', 3);
  ws.deliver(frame('ReadStates', { entries: [{ conv: 'team', read_seq: 3, last_seq: 3, unread: 0 }] }));
  await sleep(5);
  ws.deliver(frame('ConvPurged', { conv: 'team', last_seq: 3, gone: false }), frame('ReadStates', { entries: [{ conv: 'team', read_seq: 0, last_seq: 4, unread: 1 }] }));
  await sleep(5);
  assert.deepEqual(c.view('team'), []);
  assert.deepEqual(c.readState('team'), { conv: 'team', read_seq: 0, last_seq: 4, unread: 1 });
  // The next login repeats the purge point: emitted once per running client.
  const before = purged.length;
  ws.deliver(frame('ConvPurged', { conv: 'team', last_seq: 3, gone: false }));
  await sleep(5);
  assert.equal(purged.length, before);
  await c.close();
  const d = make({ compression: null });
  const { login: plain } = await connected(d);
  assert.equal(plain.caps, 8, 'without compression too');
  await d.close();
});

test("a group purge forgets the seqs seen: the next send answers nothing purged; one written before is refused (PURGED)", async () => {
  // A send whose after_seq is at or below a group's purge point is refused (written while the client showed the
  // old group, it would go to the members of a group created again with the id: a new user's trial).
  const c = make({ backoffInitial: 1 });
  const { ws } = await connected(c);
  const m = (pos, conv, seq) => ({ position: pos, msg_id: Uint8Array.of(pos), conv, seq, sender: 'v', device: 'x', client_time: 1,
    server_time: pos, payload: new Uint8Array(0), kind: 0, local_id: pos, after_seq: 0, target: 0, edited: 0, recalled: false,
    deleted: false, mentions: [], mention_all: false });
  ws.deliver(frame('Push', { position: 3, messages: [m(1, 'team', 1), m(2, 'team', 2), m(3, 'd:u:v', 1)] }));
  await sleep(5);
  const early = c.send('team', 'written before');
  await sleep(5);
  ws.deliver(frame('ConvPurged', { conv: 'team', last_seq: 2, gone: true }), frame('ConvPurged', { conv: 'd:u:v', last_seq: 1, gone: false }));
  await sleep(5);
  c.send('team', 'after').catch(() => {});
  c.send('d:u:v', '1:1 goes on').catch(() => {});
  await sleep(5);
  assert.deepEqual(ws.of('SendReq').map((r) => [r.conv, Number(r.after_seq)]), [['team', 2], ['team', 0], ['d:u:v', 1]]);
  const req = ws.of('SendReq')[0];
  ws.deliver(frame('SendAck', { local_id: req.local_id, code: ErrorCode.PURGED, msg_id: new Uint8Array(0), seq: 0, server_time: 0 }));
  await assert.rejects(early, (e) => e instanceof SendError && e.code === ErrorCode.PURGED && /group 'team' was purged after this message was written/.test(e.message));
  await c.close();
});

test('a refusal the broker gave no reason for is said in words (TOO_MANY_MENTIONS, BAD_MENTION, TOO_LATE)', async () => {
  // A new user's trial (LOW): these came back as the bare code name, where NOT_MEMBER says what is wrong.
  const c = make({ backoffInitial: 1 });
  const { ws } = await connected(c);
  const cases = [[ErrorCode.TOO_MANY_MENTIONS, /mentions more users than the broker takes/],
    [ErrorCode.BAD_MENTION, /a mentioned user id is not a valid user id/], [ErrorCode.TOO_LATE, /recall_window or edit_window/]];
  for (const [code, words] of cases) {
    const sent = c.send('team', 'x');
    await sleep(5);
    const req = ws.of('SendReq').at(-1);
    ws.deliver(frame('SendAck', { local_id: req.local_id, code, msg_id: new Uint8Array(0), seq: 0, server_time: 0 }));
    await assert.rejects(sent, (e) => e instanceof SendError && e.code === code && words.test(e.message) && words.test(e.reason));
  }
  await c.close();
});

test('local ids above 2**53-1 travel as BigInt: a SendAck matches its send, and the next id is the next one', async () => {
  // A new user's trial (HIGH): localId 2**60 (a number) was stored but the send ended in SendTimeout -- the codec
  // decodes the SendAck's local id as a BigInt, which matched no pending send -- and every later send reused one
  // local id (a number cannot count past 2**53) and was never stored.
  const c = make({ backoffInitial: 1 });
  const { ws } = await connected(c);
  await assert.rejects(c.send('d:u:v', 'x', { localId: 2 ** 60 }), (e) => e instanceof RangeError && /give it as a BigInt/.test(e.message));
  await assert.rejects(c.send('d:u:v', 'x', { localId: 1.5 }), TypeError);
  await assert.rejects(c.send('d:u:v', 'x', { localId: 2n ** 64n }), RangeError);
  await assert.rejects(c.recall('d:u:v', 1, { localId: 2 ** 60 }), RangeError);
  await sleep(5);
  assert.equal(ws.of('SendReq').length + ws.of('AmendReq').length, 0, 'nothing sent');
  const acked = async (n) => {
    await sleep(5);
    const reqs = ws.of('SendReq').slice(n);
    for (const r of reqs) ws.deliver(frame('SendAck', { local_id: r.local_id, code: 0, msg_id: new Uint8Array(16).fill(1), seq: 1, server_time: 1 }));
    return reqs.map((r) => r.local_id);
  };
  const big = c.send('d:u:v', 'snowflake', { localId: 2n ** 60n });
  assert.deepEqual(await acked(0), [2n ** 60n]);
  assert.equal((await big).local_id, 2n ** 60n);
  const next = c.send('d:u:v', 'next');
  assert.deepEqual(await acked(1), [2n ** 60n + 1n]);
  assert.equal((await next).local_id, 2n ** 60n + 1n);
  await c.close();
  // The largest safe number, then the client's next id past it: a BigInt (it was 2**53 as a number, again and again).
  const d = make({ backoffInitial: 1 });
  const { ws: ws2 } = await connected(d);
  const ack2 = async (n) => {
    await sleep(5);
    const reqs = ws2.of('SendReq').slice(n);
    for (const r of reqs) ws2.deliver(frame('SendAck', { local_id: r.local_id, code: 0, msg_id: new Uint8Array(16).fill(2), seq: 1, server_time: 1 }));
    return reqs.map((r) => r.local_id);
  };
  const edge = d.send('d:u:v', 'edge', { localId: Number.MAX_SAFE_INTEGER });
  assert.deepEqual(await ack2(0), [Number.MAX_SAFE_INTEGER]);
  assert.equal((await edge).local_id, Number.MAX_SAFE_INTEGER);
  const past = [d.send('d:u:v', 'past 1'), d.send('d:u:v', 'past 2')];
  assert.deepEqual(await ack2(1), [2n ** 53n, 2n ** 53n + 1n]);
  assert.deepEqual((await Promise.all(past)).map((x) => x.local_id), [2n ** 53n, 2n ** 53n + 1n]);
  await d.close();
});

test('an unknown option is refused by the constructor, naming it (a typo was ignored)', () => {
  // A new user's trial: { connectTimout: 500 } was taken silently, and connect() waited the default 10 s.
  assert.throws(() => make({ connectTimout: 500 }), (e) => e instanceof TypeError && /unknown option connectTimout/.test(e.message) && /connectTimeout/.test(e.message));
  assert.throws(() => make({ ackdelay: 5, foo: 1 }), (e) => e instanceof TypeError && /unknown options ackdelay, foo/.test(e.message));
  make({ connectTimeout: 500, viewLimit: 10, reconnect: false, compression: null }).close();
});

test('a request the broker would close the connection for is refused at the call, nothing sent', async () => {
  // A new user's trial (HIGH): history('g'.repeat(2e6)) was sent, the broker closed the connection
  // (FRAME_TOO_LARGE), and the client asked again on every new connection: 130 reconnects in 20 s.
  const c = make();
  const { ws } = await connected(c);
  const huge = 'g'.repeat(2_000_000);
  for (const p of [c.history(huge), c.readers(huge), c.setConversation(huge, { pinned: true }), c.history(5)]) {
    await assert.rejects(p, (e) => e instanceof SendError && e.code === ErrorCode.BAD_REQUEST && /invalid conversation id/.test(e.message));
  }
  await assert.rejects(c.listConversations({ cursor: new Uint8Array(2_000_000) }),
    (e) => e instanceof SendError && e.code === ErrorCode.PAYLOAD_TOO_LARGE && /max_frame/.test(e.message));
  await sleep(5);
  assert.equal(ws.of('HistoryReq').length + ws.of('ReadersReq').length + ws.of('ConvSetReq').length + ws.of('ConvListReq').length, 0);
  // A refusal by the broker names the request.
  const p = c.history('team');
  await sleep(5);
  const [req] = ws.of('HistoryReq');
  ws.deliver(frame('HistoryResp', { req_id: req.req_id, conv: 'team', code: ErrorCode.UNKNOWN_CONVERSATION, messages: [], more: false }));
  await assert.rejects(p, (e) => e instanceof SendError && e.message === "UNKNOWN_CONVERSATION: history of 'team': group 'team' does not exist");
  // So does a send's (it said only BAD_REQUEST), and typing in a malformed id is refused at the call.
  const sp = c.send('d:alice', 'x');
  await sleep(5);
  const [req2] = ws.of('SendReq');
  ws.deliver(frame('SendAck', { local_id: req2.local_id, code: ErrorCode.BAD_REQUEST, msg_id: new Uint8Array(0), seq: 0, server_time: 0 }));
  await assert.rejects(sp, (e) => e instanceof SendError && /^BAD_REQUEST: invalid conversation id: direct conversation id 'd:alice' is not/.test(e.message));
  assert.throws(() => c.typing('a b'), (e) => e instanceof SendError && e.code === ErrorCode.BAD_REQUEST && /invalid conversation id/.test(e.message));
  assert.equal(ws.of('Typing').length, 0);
  await c.close();
});

test('option values are checked by the constructor, naming the option', () => {
  // A new user's trial: viewLimit: -1 made every push throw (uncaught) and sends hang; device: 5 crashed Node
  // at connect(); connectTimeout: '100', reconnect: 'no' and compression: true were taken as they were.
  const bad = [
    [{ viewLimit: -1 }, RangeError, /viewLimit must be an integer >= 0/], [{ viewLimit: 1.5 }, RangeError, /viewLimit/],
    [{ device: 5 }, TypeError, /device must be a string/], [{ device: '' }, RangeError, /device '' is no device id/],
    // (Quoted with control and bidi characters escaped: a trial's error showed them raw.)
    [{ device: 'a\u0000b\u202e' }, RangeError, /device 'a\\u0000b\\u202e' is no device id/],
    // (A malformed id came back as AuthFailed after a round trip: a new user's trial.)
    [{ device: 'a b' }, RangeError, /device 'a b' is no device id: 1-64 ASCII/], [{ device: 'x'.repeat(65) }, RangeError, /no device id/],
    [{ connectTimeout: '100' }, TypeError, /connectTimeout must be a number of ms/], [{ connectTimeout: -5 }, RangeError, /connectTimeout must be a number of ms >= 0/],
    [{ sendTimeout: -1 }, RangeError, /sendTimeout/], [{ ackTimeout: 'abc' }, TypeError, /ackTimeout/], [{ backoffMax: 'x' }, TypeError, /backoffMax/],
    [{ deadAfter: 0 }, RangeError, /deadAfter must be a number > 0/], [{ timeSamples: -1 }, RangeError, /timeSamples/],
    [{ reconnect: 'no' }, TypeError, /reconnect must be true or false/], [{ compression: true }, TypeError, /compression must be null or/],
  ];
  for (const [opts, kind, re] of bad) {
    assert.throws(() => make(opts), (e) => e instanceof kind && re.test(e.message), JSON.stringify(opts));
  }
  make({ viewLimit: 0, timeSamples: 0, connectTimeout: 0, reconnect: false, device: 'phone', compression: null }).close();
});

test('on() takes a known event and a function; connect() on a connected client resolves at once', async () => {
  // A new user's trial: on('purge', fn) (misspelt) never fired; a listener that is no function threw later from a
  // timer, which exits Node; a second connect() on a connected client never settled.
  const c = make();
  assert.throws(() => c.on('purge', () => {}), (e) => e instanceof TypeError && /unknown event 'purge'/.test(e.message) && /purged/.test(e.message));
  assert.throws(() => c.on('connected', { handleEvent() {} }), (e) => e instanceof TypeError && /listener must be a function/.test(e.message));
  for (const call of [() => c.view(123), () => c.unread({}), () => c.readState(undefined)]) {
    assert.throws(call, (e) => e instanceof TypeError && /conv must be a string/.test(e.message));
  }
  await connected(c);
  const again = await Promise.race([c.connect(), sleep(500).then(() => 'pending')]);
  assert.notEqual(again, 'pending');
  assert.equal(again.user, 'u');
  await c.close();
});

test('a clock that returns no number fails connect() (never Node), and per-call options are checked like the constructor\'s', async () => {
  // A new user's trial (HIGH): now: () => NaN threw an EncodeError outside connect()'s promise and Node exited;
  // subscribePresence('bob') subscribed 'b' and 'o'; send(conv, p, { mention: ['bob'] }) (a typo) was stored
  // without the mention, history(conv, { limt: 5 }) gave 50.
  for (const bad of [NaN, Infinity, undefined]) {
    const c = make({ now: () => bad });
    await assert.rejects(c.connect(), (e) => e instanceof TypeError && /now\(\) must return µs/.test(e.message), String(bad));
    assert.equal(c.state, 'CLOSED');
  }
  // (A clock at 0 or below hung sends, or restarted local ids at 1 on every run: a new user's trial.)
  for (const bad of [0, -5]) {
    const c = make({ now: () => bad });
    await assert.rejects(c.connect(), (e) => e instanceof RangeError && /now\(\) must return µs since 1970/.test(e.message), String(bad));
    assert.equal(c.state, 'CLOSED');
  }
  // (A clock in ns was taken: deadlines ran 1000x fast and stamps were years ahead -- a trial.)
  {
    const c = make({ now: () => Date.now() * 1e6 });
    await assert.rejects(c.connect(), (e) => e instanceof RangeError && /now\(\) must return µs since 1970, not ns: \d+ is after the year 9999/.test(e.message));
    assert.equal(c.state, 'CLOSED');
  }
  const c = make();
  const { ws } = await connected(c);
  await assert.rejects(c.subscribePresence('bob'), (e) => e instanceof TypeError && /users must be an array of user ids/.test(e.message));
  await assert.rejects(c.subscribePresence(['bob', 'a b']), (e) => e instanceof RangeError && /subscribePresence: 'a b' is no user id/.test(e.message));
  await assert.rejects(c.subscribePresence(['bob', 5]), (e) => e instanceof TypeError && /a user id must be a string, not number 5/.test(e.message));
  for (const bad of [[undefined], ['ok', undefined], [, 'bob']]) { // eslint-disable-line no-sparse-arrays
    await assert.rejects(c.subscribePresence(bad), (e) => e instanceof TypeError && /a user id must be a string, not undefined$/.test(e.message), String(bad));
  }
  await assert.rejects(c.send('d:u:v', 'x', { mention: ['bob'] }), (e) => e instanceof TypeError && /send: unknown option mention/.test(e.message));
  await assert.rejects(c.send('d:u:v', 'x', 'opts'), (e) => e instanceof TypeError && /send: options must be an object/.test(e.message));
  await assert.rejects(c.history('d:u:v', { limt: 5 }), (e) => e instanceof TypeError && /history: unknown option limt/.test(e.message));
  await assert.rejects(c.setConversation('d:u:v', { pined: true }), (e) => e instanceof TypeError && /setConversation: unknown option pined/.test(e.message));
  await assert.rejects(c.recall('d:u:v', 1, { localid: 5 }), (e) => e instanceof TypeError && /recall: unknown option localid/.test(e.message));
  await assert.rejects(c.history('d:u:v', { timeout: -5 }), (e) => e instanceof TypeError && /timeout must be a number of ms >= 0/.test(e.message));
  await sleep(5);
  assert.equal(ws.of('SendReq').length + ws.of('HistoryReq').length + ws.of('ConvSetReq').length + ws.of('PresenceSub').length + ws.of('AmendReq').length, 0);
  await c.close();
});

test('a 1:1 chat dropped at login (purged while away) keeps its read marker: its next message counts after it', async () => {
  // A new user's trial (MEDIUM): the next message showed read_seq 0 where the broker kept 1.
  const c = make({ backoffInitial: 1 });
  const { ws } = await connected(c);
  ws.deliver(pushOf(1, 1), pushOf(2, 2), frame('ReadStates', { entries: [{ conv: 'd:u:v', read_seq: 1, last_seq: 2, unread: 1 }] }));
  await sleep(5);
  ws.drop();
  await sleep(100);
  const ws2 = FakeWS.all.at(-1);
  const cal = ws2.of('CalibrateReq')[0];
  ws2.deliver(loginAck({ states: 0 }), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  await sleep(5);
  assert.deepEqual(c.view('d:u:v'), []);
  assert.deepEqual(c.readState('d:u:v'), { conv: 'd:u:v', read_seq: 1, last_seq: 2, unread: 0 });
  ws2.deliver(pushOf(3, 3));
  await sleep(5);
  assert.deepEqual(c.readState('d:u:v'), { conv: 'd:u:v', read_seq: 1, last_seq: 3, unread: 1 });
  await c.close();
});

test('transient refusals are retried with the same local id after a hold; final ones reject', async () => {
  const c = make();
  const { ws } = await connected(c);
  const p = c.send('d:u:v', 'x');
  const q = c.send('d:u:v', 'y');
  await sleep(5);
  const [a, b] = ws.of('SendReq');
  ws.deliver(frame('SendAck', { local_id: a.local_id, code: ErrorCode.RATE_LIMITED, msg_id: new Uint8Array(0), seq: 0, server_time: 0 }));
  ws.deliver(frame('Error', { code: ErrorCode.REJECTED, ref: b.local_id, reason: 'no swearing' }),
    frame('SendAck', { local_id: b.local_id, code: ErrorCode.REJECTED, msg_id: new Uint8Array(0), seq: 0, server_time: 0 }));
  await assert.rejects(q, (e) => e instanceof SendError && e.code === ErrorCode.REJECTED && e.reason === 'no swearing');
  assert.equal(c.stats.congestionEvents, 1);
  await sleep(300);
  const retry = ws.of('SendReq').filter((f) => f.local_id === a.local_id);
  assert.ok(retry.length >= 2, 'sent again after the hold');
  ws.deliver(frame('SendAck', { local_id: a.local_id, code: 0, msg_id: new Uint8Array(16), seq: 3, server_time: 9 }));
  assert.equal((await p).seq, 3);
  await c.close();
});

test("a RATE_LIMITED hold is the time the bucket needs to refill the next window (sendWindow / the measured rate), at most backoffInitial, doubled only per window refused whole (the Python SDK's rule)", async () => {
  // The device clock moved by hand (µs); the ticker's work run by hand.
  const MS = 1000;
  let clock = 1_700_000_000_000_000;
  const c = make({ now: () => clock, backoffInitial: 1000, backoffMax: 60000 }); // a blind backoff would hold 0.5-1.5 s
  const p = c.connect();
  await sleep(5);
  const ws = FakeWS.all.at(-1);
  const cal = ws.of('CalibrateReq')[0];
  ws.deliver(loginAck({ window: 8 }), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  await p;
  await sleep(0);
  try {
  let seen = 0;
  // (async: the frames of one tick go out together, in a microtask: _queueOut)
  const fresh = async () => { await null; const all = ws.of('SendReq'); const out = all.slice(seen).map((f) => f.local_id); seen = all.length; return out; };
  const answer = (lid, code, seq = 0) => ws.deliver(frame('SendAck', { local_id: lid, code, msg_id: new Uint8Array(code ? 0 : 16), seq, server_time: 0 }));
  const t0 = clock;
  const sends = Array.from({ length: 40 }, (_, i) => c.send('d:u:v', `m${i}`));
  const lids = await fresh();
  assert.equal(lids.length, 8);
  // The bucket takes 8 in 20 ms (400/s), then refuses the next window whole.
  clock = t0 + 10 * MS;
  lids.forEach((lid, i) => answer(lid, 0, i + 1));
  const second = await fresh();
  assert.equal(second.length, 8);
  clock = t0 + 20 * MS;
  for (const lid of second) answer(lid, ErrorCode.RATE_LIMITED);
  assert.equal(c.stats.congestionEvents, 1, 'one window, one event');
  assert.equal(c.sendWindow, 4, 'halved once');
  // Held until the bucket holds the next window: 4 / (400/s) = 10 ms, not backoffInitial (jittered).
  const holdFor = async (ms, n, what) => {
    const at = clock;
    clock = at + ms * MS - 1; c._tick();
    assert.deepEqual(await fresh(), [], `${what}: still held just before ${ms} ms`);
    clock = at + ms * MS; c._tick();
    const out = await fresh();
    assert.equal(out.length, n, `${what}: ${n} sent at ${ms} ms`);
    return out;
  };
  let out = await holdFor(10, 4, 'the first event');
  assert.deepEqual(out, second.slice(0, 4), 'the refused ones first, in order');
  // Windows refused whole: the rate was too high, the hold doubles -- while the window halves (same 10 ms here).
  for (const lid of out) answer(lid, ErrorCode.RATE_LIMITED);
  assert.equal(c.stats.congestionEvents, 2);
  out = await holdFor(10, 2, 'a window refused whole (2 / 400/s x 2)');
  for (const lid of out) answer(lid, ErrorCode.RATE_LIMITED);
  out = await holdFor(10, 1, 'again (1 / 400/s x 4)');
  assert.equal(c.sendWindow, 1);
  // One answered: no more doubling; the rate is measured again since the last event (1 answer in 15 ms: 1/15 per ms).
  clock += 5 * MS;
  answer(out[0], 0, 9);
  out = await fresh();
  assert.equal(out.length, 2, '+1 per answer');
  for (const lid of out) answer(lid, ErrorCode.RATE_LIMITED);
  assert.equal(c.stats.congestionEvents, 4);
  await holdFor(15, 1, 'after an answer: 1 / (1/15 ms), not doubled');
  assert.equal(sends.length, 40);
  } finally { await c.close(); }
});

test("a link lost with sends in flight restarts the window small (TCP after a timeout, RFC 5681 3.1), then slow start; a clean cut keeps it (the Python SDK's rule)", async () => {
  // A trial on a link reset every few KiB: each reconnect wrote the whole
  // window (256) again and the sender barely progressed.
  const c = make({ backoffInitial: 1 });
  const ack = loginAck({ window: 256 });
  let ws;
  // The socket of the newest dial gets its LoginAck and calibration.
  const login = async () => {
    await sleep(5);
    ws = FakeWS.all.at(-1);
    const cal = ws.of('CalibrateReq')[0];
    ws.deliver(ack, frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  };
  const p = c.connect();
  await login();
  await p;
  await sleep(0);
  const sends = Array.from({ length: 600 }, (_, i) => c.send('d:u:v', `m${i}`));
  sends.forEach((s) => s.catch(() => {}));
  await sleep(0);
  const lids = ws.of('SendReq').map((f) => f.local_id);
  assert.equal(lids.length, 256);
  assert.equal(c.sendWindow, 256);
  ws.drop();
  await sleep(25);
  await login();
  await sleep(5);
  let seen = 0;
  const fresh = async () => { await null; const all = ws.of('SendReq'); const out = all.slice(seen).map((f) => f.local_id); seen = all.length; return out; };
  let out = await fresh();
  assert.deepEqual(out, lids.slice(0, 4), 'the loss window, oldest first (PROTOCOL.md section 6)');
  assert.equal(c.sendWindow, 4);
  let seq = 0;
  const answer = (lid) => ws.deliver(frame('SendAck', { local_id: lid, code: 0, msg_id: new Uint8Array(16), seq: ++seq, server_time: 9 }));
  for (const expect of [8, 16, 32, 64, 128]) { // slow start: doubled per round trip, up to ssthresh = 256 / 2
    out.forEach(answer);
    out = await fresh();
    assert.equal(c.sendWindow, expect);
    assert.equal(out.length, expect);
    assert.ok(out.every((lid, i) => i === 0 || lid > out[i - 1]), 'in local-id order');
  }
  out.forEach(answer); // at ssthresh: +1/cwnd per answer, about one per window
  out = await fresh();
  assert.equal(c.sendWindow, 128);
  out.forEach(answer);
  assert.equal(c.sendWindow, 129);
  // Everything answered, then a cut: nothing was lost on the wire, the window stays.
  while ((out = await fresh()).length) out.forEach(answer);
  assert.equal(c.pendingSends().length, 0);
  const w = c.sendWindow;
  ws.drop();
  await sleep(25);
  await login();
  await sleep(5);
  assert.equal(c.sendWindow, w, 'a clean cut keeps the window');
  await c.close();
});

test('the frames of one tick go out as one WebSocket message of up to 8 KiB, a larger frame alone', async () => {
  // The broker pays for a logged-in peer's WebSocket messages from a bucket
  // (512 a second past a burst of 1,024; a KiB of payload pays for one, as
  // each costs it a parse and a hop whatever its size): 8,000 sends at once,
  // a message each, were held to ~530 a second; the frames of a tick
  // together, 153 messages in 4 s (the broker's send_rate).
  const c = make();
  const p = c.connect();
  await sleep(5);
  const ws = FakeWS.all.at(-1);
  assert.equal(ws.sent.length, 1, 'the Login and the CalibrateReq in one message');
  assert.deepEqual(ws.frames.map((f) => f.name), ['Login', 'CalibrateReq']);
  const cal = ws.of('CalibrateReq')[0];
  ws.deliver(loginAck({ window: 16 }), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  await p;
  await sleep(5);
  const sent = ws.sent.length;
  for (let i = 0; i < 3; i++) c.send('d:u:v', `m${i}`).catch(() => {});
  c.send('d:u:v', new Uint8Array(9000)).catch(() => {}); // a frame over 8 KiB: a message of its own
  c.send('d:u:v', 'after').catch(() => {});
  await sleep(0);
  assert.equal(ws.of('SendReq').length, 5);
  assert.deepEqual(ws.sent.slice(sent).map((m) => m.length > 8192), [false, true, false], 'three small, one big, the next');
  await c.close();
  assert.equal(ws.of('Close').length, 1, 'the Close of close() goes out before the socket is closed');
});

test('send timeout', async () => {
  const c = make({ reconnect: false });
  await connected(c);
  await assert.rejects(c.send('d:u:v', 'x', { timeout: 150 }), (e) => e instanceof SendTimeout);
  await c.close();
});

test('PushAck: cumulative, after the handlers ran; a re-push is dropped', async () => {
  const c = make();
  const { ws } = await connected(c);
  const seen = [];
  c.on('message', (m) => { seen.push(m.seq); assert.equal(ws.of('PushAck').length, 0, 'not acked before the handler'); });
  const msg = (position, seq) => ({ position, msg_id: Uint8Array.of(seq), conv: 'd:u:v', seq, sender: 'v', device: 'x', client_time: 1, server_time: seq, payload: new Uint8Array(0), kind: 0, local_id: seq, after_seq: 0, target: 0, edited: 0, recalled: false, deleted: false });
  ws.deliver(frame('Push', { position: 2, messages: [msg(1, 1), msg(2, 2)] }), frame('Push', { position: 4, messages: [msg(4, 3)] }));
  await sleep(30);
  assert.deepEqual(ws.of('PushAck').map((f) => f.position), [4]);
  ws.deliver(frame('Push', { position: 4, messages: [msg(4, 3)] }));
  assert.deepEqual(seen, [1, 2, 3]);
  assert.equal(c.stats.duplicatesDropped, 1);
  assert.equal(c.unread('d:u:v'), 3);
  await c.close();
  assert.equal(ws.of('Close')[0].code, CloseCode.NORMAL);
});

test('malformed bytes: Close(PROTOCOL_ERROR), the connection is dropped, frames before it count', async () => {
  const c = make({ backoffInitial: 10000 });
  const { ws } = await connected(c);
  const disc = []; c.on('disconnected', (d) => disc.push(d));
  const good = encodeFrame(frame('ReadReceipt', { conv: 'd:u:v', reader: 'v', seq: 2 }));
  const bad = Uint8Array.of(0x03, 0x50, 0x0e, 0x00); // version 5
  const both = new Uint8Array(good.length + bad.length); both.set(good); both.set(bad, good.length);
  ws.onmessage({ data: both.buffer });
  assert.equal(c.receipt('d:u:v', 'v'), 2);
  assert.equal(ws.of('Close')[0].code, CloseCode.PROTOCOL_ERROR);
  assert.match(disc[0].reason, /UNSUPPORTED_VERSION/);
  assert.equal(c.state, 'DISCONNECTED');
  await c.close();
});

test('a send above LoginAck.max_payload / max_frame fails at once, is never sent, and does not block the queue', async () => {
  const c = make({ backoffInitial: 1 });
  // queued before the limits are known: checked when it would go out
  const early = c.send('d:u:v', 'z'.repeat(70000));
  const p = c.connect();
  await sleep(5);
  const ws = FakeWS.all.at(-1);
  const cal = ws.of('CalibrateReq')[0];
  ws.deliver(loginAck({ max_payload: 65536, max_frame: 1000 }), frame('CalibrateResp', { client_time: cal.client_time, server_time: cal.client_time }));
  await p;
  await assert.rejects(early, (e) => e instanceof SendError && e.code === ErrorCode.PAYLOAD_TOO_LARGE && /max_payload 65536/.test(e.reason));
  // known limits: refused in send() itself
  const t0 = Date.now();
  await assert.rejects(c.send('d:u:v', 'z'.repeat(2_000_000)), (e) => e instanceof SendError && e.code === ErrorCode.PAYLOAD_TOO_LARGE);
  // under max_payload but the frame is above max_frame
  await assert.rejects(c.send('d:u:v', 'y'.repeat(1200)), (e) => e instanceof SendError && e.code === ErrorCode.PAYLOAD_TOO_LARGE && /max_frame 1000/.test(e.reason));
  assert.ok(Date.now() - t0 < 100, 'at once');
  const ok = c.send('d:u:v', 'small');
  await sleep(5);
  const reqs = ws.of('SendReq');
  assert.equal(reqs.length, 1, 'only the small one went out');
  assert.equal(new TextDecoder().decode(reqs[0].payload), 'small');
  ws.deliver(frame('SendAck', { local_id: reqs[0].local_id, code: 0, msg_id: new Uint8Array(16), seq: 1, server_time: 5 }));
  assert.equal((await ok).seq, 1);
  assert.deepEqual(c.pendingSends(), []);
  assert.equal(c.state, 'ACTIVE');
  await c.close();
});

test('a token function that fails before the first login rejects connect() with its error and ends the client', { timeout: 5000 }, async () => {
  const before = FakeWS.all.length;
  const bad = new Error('invalid user id: ali ce');
  let calls = 0;
  const c = make({ token: async () => { calls++; throw bad; } });
  await assert.rejects(c.connect(), (e) => e === bad);
  assert.equal(c.state, 'CLOSED');
  assert.equal(calls, 1);
  assert.equal(FakeWS.all.length, before, 'no socket was opened');
  await sleep(300);
  assert.equal(calls, 1, 'not asked again');
});

test('token failures during an outage back off (a completed login resets the backoff, then it grows again)', { timeout: 10000 }, async () => {
  let clock = Date.now() * 1000;
  const now = () => clock + (Date.now() * 1000 - start);
  const start = Date.now() * 1000;
  let calls = 0; let fail = false;
  const c = make({ now, backoffInitial: 100, backoffMax: 10000, token: async () => { calls++; if (fail) throw new Error('HTTP 502'); return 't'; } });
  const { ws } = await connected(c);
  clock += 10e6; // the connection lived 10 s
  fail = true; calls = 0;
  ws.drop();
  await sleep(1500);
  // 100, 200, 400, 800 ms (each x 0.5..1.5) after the first at once-ish: at most 5 asks in 1.5 s, not one every 100 ms
  assert.ok(calls >= 2 && calls <= 5, `asked ${calls} times in 1.5 s`);
  assert.equal(c.state, 'DISCONNECTED');
  await c.close();
});

test('a wall clock stepped forward while the client runs fires no deadline early (the default clock)', async () => {
  // The default device clock is the wall clock read once plus monotonic time:
  // Date.now() jumping an hour ahead (NTP, the user) is not seen.  Read from
  // Date.now() itself, it expired the pending send and the heartbeat at once.
  const realNow = Date.now;
  const c = make({ ackTimeout: 5000, backoffInitial: 10000, sendTimeout: 60000 });
  try {
    const ws = await connectedWithHeartbeat(c, 15000);
    const disc = []; c.on('disconnected', (d) => disc.push(d));
    const p = c.send('d:u:v', 'x');
    let outcome = null;
    p.then((s) => { outcome = s; }, (e) => { outcome = e; });
    await sleep(5);
    const [req] = ws.of('SendReq');
    Date.now = () => realNow() + 3600_000;
    c._tick(); // what the ticker does next
    await sleep(0);
    assert.equal(outcome, null, 'the send is still pending, not timed out');
    assert.equal(disc.length, 0, 'the live link is not declared dead');
    ws.deliver(frame('SendAck', { local_id: req.local_id, code: 0, msg_id: new Uint8Array(16), seq: 1, server_time: 5 }));
    assert.equal((await p).seq, 1);
    c._tick();
    assert.equal(disc.length, 0);
    assert.ok(Math.abs(c.opts.now() - realNow() * 1000) < 5_000_000, 'the device clock kept the wall time of the start');
  } finally {
    Date.now = realNow;
    await c.close();
  }
});

test('a push frame longer than an interval on the wire keeps the link', async () => {
  // One Push (up to 64 messages) can take longer than an interval to arrive
  // on a slow way down: bytes of a frame still arriving give the queued
  // Pong more time (a new-user recheck: 64 x 8 KiB at 20 KB/s reconnected).
  const t = await handTicked();
  const { c, ws, disc } = t;
  const got = []; c.on('message', (m) => got.push(m.seq));
  t.clock += H; c._tick();
  await null; // (the frames of one tick go out together, in a microtask: _queueOut)
  const [ping] = ws.of('Ping');
  assert.ok(ping, 'a Ping after an interval');
  const big = encodeFrame(frame('Push', { position: 1, messages: [{ position: 1, msg_id: Uint8Array.of(1), conv: 'd:u:v', seq: 1, sender: 'v', device: 'x', client_time: 1, server_time: t.clock - 60_000_000, payload: new Uint8Array(50_000), kind: 0, local_id: 1, after_seq: 0, target: 0, edited: 0, recalled: false, deleted: false }] }));
  for (let i = 0; i < big.length; i += 1000) { // 1 KB every 200 ms: ten intervals
    t.clock += 200_000;
    c._tick();
    assert.equal(disc.length, 0, disc.length ? disc[0].reason : '');
    ws.onmessage?.({ data: big.slice(i, i + 1000).buffer });
  }
  ws.deliver(frame('Pong', { nonce: ping.nonce }));
  await sleep(10);
  assert.deepEqual(got, [1]);
  t.clock += 500_000; c._tick();
  assert.equal(disc.length, 0);
  await c.close();
});

test('a slow way down draining a backlog keeps the link until the late Pong comes', async () => {
  // The Pong is queued behind a backlog stored before the Ping (12 KB/s
  // behind a full push window): each push of it gives the Pong another
  // interval.  The client said NO_HEARTBEAT_ANSWER one interval after the
  // Ping and reconnected over and over (new-user finding).
  const t = await handTicked();
  const { c, ws, start, disc } = t;
  let answered = 0;
  for (let pos = 1; t.clock - start < 8 * H; pos++) {
    t.clock += 300_000;
    const pings = ws.of('Ping');
    const ping = pings.at(-1);
    if (ping && !ping.answered && t.clock - ping.sentAt >= 5 * H) {
      ping.answered = true; answered++;
      ws.deliver(pushOf(pos, start - 60_000_000 + pos), frame('Pong', { nonce: ping.nonce })); // five intervals late
    } else {
      ws.deliver(pushOf(pos, start - 60_000_000 + pos)); // stored a minute before the login
    }
    await sleep(10);
    c._tick();
    for (const p of ws.of('Ping')) if (p.sentAt === undefined) p.sentAt = t.clock;
    assert.equal(disc.length, 0, disc.length ? disc[0].reason : '');
  }
  assert.ok(answered >= 1, 'a late Pong came and kept the link');
  await c.close();
});

test('a dead way up is found though the broker keeps pushing: a Ping needs its Pong', async () => {
  // The client's acks vanish (the way up is dead); pushes keep arriving every
  // 100 ms.  Pushes are no answer to the Ping: the link is declared dead
  // within two intervals of the last answer (the calibration), not left to
  // the broker's idle timeout.
  const t = await handTicked();
  const { c, ws, start, disc } = t;
  const got = []; c.on('message', (m) => got.push(m.seq));
  for (let pos = 1; !disc.length && t.clock - start < 10 * H; pos++) {
    t.clock += 100_000;
    ws.deliver(pushOf(pos, t.clock - 50_000)); // new messages, stored just now
    await sleep(10); // the handlers run, the PushAck (ackDelay 5 ms) goes out -- into the void
    c._tick();
  }
  assert.ok(got.length >= 5, 'the pushes were taken');
  assert.ok(ws.of('PushAck').length >= 5, 'and acked, which did not put the Ping off');
  assert.equal(disc.length, 1, 'the dead way up is found');
  // Two intervals of the last answer, plus ackTimeout: messages stored up to
  // then after the Ping may be ahead of its Pong (+ the push step).
  assert.ok(t.clock - start <= 2 * H + 400_000 + 100_000, 'within two intervals of the last answer');
  assert.equal(ws.of('Ping').length, 1, 'one Ping, not put off by the acks, not repeated');
  assert.match(disc[0].reason, /no answer to the heartbeat/);
  await c.close();
});

test("an Error no send waits for is a 'brokerRefused' event; a send's own goes to its SendError, TYPING_NOT_RELAYED nowhere", async () => {
  const c = make();
  const { ws } = await connected(c);
  const refused = []; const raw = [];
  c.on('brokerRefused', (e) => refused.push(e));
  c.on('error', (e) => raw.push(e));
  const p = c.send('d:u:v', 'spam');
  await sleep(5);
  const [req] = ws.of('SendReq');
  ws.deliver(frame('Error', { code: ErrorCode.REJECTED, ref: req.local_id, reason: 'no links, please' }),
    frame('SendAck', { local_id: req.local_id, code: ErrorCode.REJECTED, msg_id: new Uint8Array(0), seq: 0, server_time: 0 }));
  await assert.rejects(p, (e) => e instanceof SendError && e.code === ErrorCode.REJECTED && e.reason === 'no links, please');
  ws.deliver(frame('Error', { code: ErrorCode.TYPING_NOT_RELAYED, ref: 0, reason: 'big group' }),
    frame('Error', { code: ErrorCode.BAD_REQUEST, ref: 0, reason: 'something else' }),
    frame('Error', { code: 999, ref: 77, reason: 'a code this client does not know' }));
  assert.deepEqual(refused, [
    { code: ErrorCode.BAD_REQUEST, codeName: 'BAD_REQUEST', ref: 0, reason: 'something else' },
    { code: 999, codeName: '999', ref: 77, reason: 'a code this client does not know' },
  ]);
  assert.equal(raw.length, 4, "'error' still has every Error frame, as it came");
  await c.close();
});

test('a send or amend reusing a pending localId with another message rejects, nothing sent; the same message again is a retry', async () => {
  // (Was: the second call got the first send's promise, its own message never sent.)
  const c = make();
  const { ws } = await connected(c);
  const first = c.send('d:u:v', 'x', { localId: 5, mentions: ['a', 'b'] });
  await sleep(5);
  assert.equal(ws.of('SendReq').length, 1);
  const different = [
    ['d:u:w', 'x', { mentions: ['a', 'b'] }, 'conv'], ['d:u:v', 'y', { mentions: ['a', 'b'] }, 'payload'],
    ['d:u:v', 'x', { mentions: ['a'] }, 'mentions'], ['d:u:v', 'x', { mentions: ['a', 'b'], mentionAll: true }, 'mentionAll'],
    ['d:u:v', 'y', {}, 'payload and mentions'],
  ];
  for (const [conv, payload, opts, differ] of different) {
    await assert.rejects(c.send(conv, payload, { localId: 5, ...opts }),
      { message: new RegExp(`^send: local id 5 is still pending with a different message \\(not the same ${differ}\\)`) });
  }
  await assert.rejects(c.edit('d:u:v', 3, 'x', { localId: 5 }), {
    message: /^amend: local id 5 is still pending with a different message \(the pending one is a send, this an amend\)/ });
  assert.equal(c.send('d:u:v', new TextEncoder().encode('x'), { localId: 5, mentions: ['b', 'a'] }), first, 'a retry');
  const edit = c.edit('d:u:v', 3, 'new', { localId: 6 });
  for (const [target, action, payload] of [[4, 'edit', 'new'], [3, 'edit', 'other'], [3, 'recall', null]]) {
    const p = action === 'edit' ? c.edit('d:u:v', target, payload, { localId: 6 }) : c.recall('d:u:v', target, { localId: 6 });
    await assert.rejects(p, /local id 6 is still pending with a different message/);
  }
  await assert.rejects(c.send('d:u:v', 'new', { localId: 6 }), /local id 6 is still pending with a different message/);
  assert.equal(c.edit('d:u:v', 3, 'new', { localId: 6 }), edit, 'a retry');
  await sleep(5);
  assert.deepEqual([ws.of('SendReq').length, ws.of('AmendReq').length], [1, 1], 'nothing else sent');
  assert.deepEqual(c.pendingSends(), [5, 6]);
  ws.deliver(frame('SendAck', { local_id: 5, code: 0, msg_id: new Uint8Array(16), seq: 1, server_time: 2 }));
  assert.equal((await first).conv, 'd:u:v');
  await c.close();
});

test('the view keeps the newest viewLimit messages by seq, whatever order they come in', async () => {
  // Seqs in any order, the same message again, an older one once the view
  // is full: view() is always the newest viewLimit distinct messages.  (The
  // lowest seq is found through a heap, not a sort of the view per message:
  // a catch-up of thousands of messages crawled.)
  let seed = 7;
  const rand = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
  for (const limit of [1, 3, 8]) {
    const c = make({ viewLimit: limit });
    const { ws } = await connected(c);
    const msg = (position, seq) => ({ position, msg_id: Uint8Array.of(seq), conv: 'd:u:v', seq, sender: 'v', device: 'x', client_time: 1, server_time: seq, payload: new Uint8Array(0), kind: 0, local_id: seq, after_seq: 0, target: 0, edited: 0, recalled: false, deleted: false });
    const seen = new Set();
    let position = 0;
    for (let round = 0; round < 40; round++) {
      const seqs = Array.from({ length: 1 + rand(5) }, () => 1 + rand(60));
      const messages = seqs.map((q) => msg(++position, q));
      ws.deliver(frame('Push', { position, messages }));
      for (const q of seqs) seen.add(q);
      const want = [...seen].sort((a, b) => a - b).slice(-limit);
      assert.deepEqual(c.view('d:u:v').map((m) => m.seq).sort((a, b) => a - b), want, `limit ${limit}, round ${round}`);
    }
    await c.close();
  }
});
