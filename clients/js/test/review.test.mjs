// Review findings (clients/js): each test failed before its fix.  A live
// `pimcore serve` (started here) unless the test needs no broker.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { ClientClosed, EncodeError, PimcoreClient, SendError, directConv } from '../src/index.js';
import { Broker, until } from './broker.mjs';

const text = (m) => new TextDecoder().decode(m.payload);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Every client a test makes, closed after it whether it passed or not: a
// failed assertion left its clients open (connected, or redialling), and
// node never exited -- the run hung until pytest's timeout.
const clients = new Set();

function track(c) { clients.add(c); return c; }

function client(broker, user, opts = {}) {
  const c = track(new PimcoreClient({ url: broker.url, token: broker.token(user), device: opts.device || 'node', ackTimeout: 2000, ...opts }));
  c.received = [];
  c.on('message', (m) => c.received.push(m));
  return c;
}

describe('review findings', () => {
  let broker;
  before(async () => { broker = await new Broker({ heartbeatMs: 30000 }).start(); });
  afterEach(async () => {
    // (A test that failed with the broker stopped must not leave it stopped: closing would wait on it.)
    try { process.kill(broker.proc.pid, 'SIGCONT'); } catch { /* gone */ }
    await Promise.all([...clients].map((c) => c.close()));
    clients.clear();
  });
  after(async () => { try { process.kill(broker.proc.pid, 'SIGCONT'); } catch { /* gone */ } await broker.dispose(); });

  test('a retry after SendTimeout (same localId) shows the stored message in the sender view, as elsewhere', async () => {
    const conv = directConv('rt-a', 'rt-b');
    const a = client(broker, 'rt-a', { ackTimeout: 5000 });
    const b = client(broker, 'rt-b', { ackTimeout: 5000 });
    await a.connect(); await b.connect();
    await b.send(conv, 'bob first');
    await until(() => a.view(conv).length === 1, 5000, 'alice sees seq 1');
    process.kill(broker.proc.pid, 'SIGSTOP');
    let err;
    try {
      const pa = a.send(conv, 'alice hello', { timeout: 300 }).catch((e) => e);
      await sleep(50);
      const pb = b.send(conv, 'bob second'); // bob has seen seq 1 only
      err = await pa;
      process.kill(broker.proc.pid, 'SIGCONT');
      await pb;
    } finally { process.kill(broker.proc.pid, 'SIGCONT'); }
    assert.equal(err.name, 'SendTimeout');
    await until(() => a.view(conv).length >= 2 && b.view(conv).length >= 3, 5000, 'both see everything but the retry');
    const s = await a.send(conv, 'alice hello', { localId: err.localId });
    const c = client(broker, 'rt-a', { device: 'other' });
    await c.connect();
    await c.history(conv);
    await until(() => b.view(conv).length === 3, 5000, 'bob holds all three');
    const show = (cl) => cl.view(conv).map((m) => `${m.seq}:${text(m)}:${m.after_seq}:${m.client_time}`);
    assert.deepEqual(show(a), show(c), 'the sender shows what the broker stored');
    assert.deepEqual(show(b), show(c));
    assert.equal(s.client_time, c.view(conv).find((m) => m.seq === s.seq).client_time);
    for (const x of [a, b, c]) await x.close();
  });

  test('requests with arguments no frame can carry reject, register nothing, and reconnects still work', async () => {
    const conv = directConv('rq-a', 'rq-b');
    const c = client(broker, 'rq-a', { ackTimeout: 500 });
    await c.connect();
    const uncaught = [];
    const onErr = (e) => uncaught.push(e);
    process.on('uncaughtException', onErr);
    try {
      // (a seq or limit out of range is refused by name, a RangeError, before any frame is made; a conversation
      // id that is no valid id, SendError(BAD_REQUEST), as markRead does; a cursor no frame can carry, EncodeError)
      const calls = [
        [() => c.history(conv, { fromSeq: -1 }), RangeError],
        [() => c.readers(42), SendError],
        [() => c.listConversations({ limit: -1 }), RangeError],
        [() => c.setConversation('g:\uD800lone', { pinned: true }), SendError],
        [() => c.listConversations({ cursor: 'abc' }), EncodeError],
      ];
      for (const [call, kind] of calls) {
        let p;
        assert.doesNotThrow(() => { p = call(); });
        await assert.rejects(p, kind);
      }
      assert.equal(c._requests.size, 0, 'no request was left registered');
      // A re-send of the requests (at reconnect) must not throw either.
      const again = new Promise((r) => c.on('connected', r));
      c.dropConnection();
      c.reconnectNow();
      await again;
      const pres = await c.subscribePresence(['rq-b']);
      assert.ok('rq-b' in pres);
      assert.equal((await c.send(conv, 'still works')).seq, 1);
      assert.deepEqual(uncaught, []);
    } finally { process.off('uncaughtException', onErr); }
    await c.close();
  });

  test('markRead beyond the last seq is clamped: unread stays right afterwards', async () => {
    const conv = directConv('mr-a', 'mr-b');
    const a = client(broker, 'mr-a'); const b = client(broker, 'mr-b');
    await a.connect(); await b.connect();
    await a.send(conv, 'x');
    await until(() => b.received.length === 1, 5000, 'bob gets x');
    b.markRead(conv, 999);
    assert.equal(b.readState(conv).read_seq, 1);
    await a.send(conv, 'y'); await a.send(conv, 'z');
    await until(() => b.received.length === 3, 5000, 'bob gets y, z');
    const b2 = client(broker, 'mr-b', { device: 'other' });
    await b2.connect();
    await until(() => b2.readState(conv) !== undefined, 5000, 'second device has the read state');
    assert.equal(b2.unread(conv), 2, 'broker truth');
    await until(() => b.unread(conv) === 2 && b._wanted.size === 0, 5000, `bob's unread follows the broker: ${JSON.stringify(b.readState(conv))}`);
    assert.equal(b.readState(conv).read_seq, 1);
    for (const x of [a, b, b2]) await x.close();
  });

  test('a message listener attached right after await connect() gets the catch-up', async () => {
    const conv = directConv('cu-a', 'cu-b');
    const a = client(broker, 'cu-a');
    await a.connect();
    for (let i = 0; i < 5; i++) await a.send(conv, `m${i}`);
    const b = track(new PimcoreClient({ url: broker.url, token: broker.token('cu-b'), device: 'phone' }));
    await b.connect();
    const got = [];
    b.on('message', (m) => got.push(m.seq));
    await until(() => got.length === 5, 5000, `catch-up delivered to the listener (got ${got})`);
    assert.deepEqual(got, [1, 2, 3, 4, 5]);
    await a.close(); await b.close();
  });

  test('bad arguments reject the promise; ArrayBuffer and views are payloads', async () => {
    const conv = directConv('ba-a', 'ba-b');
    const a = client(broker, 'ba-a'); const b = client(broker, 'ba-b');
    await a.connect(); await b.connect();
    const bad = [
      () => a.send(conv, 42),
      () => a.send('g:\uD800lone', 'p'),
      () => a.recall(conv, 'abc'),
      () => a.edit(conv, 1, 42),
    ];
    for (const call of bad) {
      let p;
      assert.doesNotThrow(() => { p = call(); });
      await assert.rejects(p, TypeError);
    }
    assert.deepEqual(a.pendingSends(), []);
    const ab = new TextEncoder().encode('ab').buffer;
    const dv = new DataView(new TextEncoder().encode('xcdx').buffer, 1, 2);
    const i16 = new Int16Array([0x6665]);
    await a.send(conv, ab); await a.send(conv, dv); await a.send(conv, i16);
    await until(() => b.received.length === 3, 5000, 'bob gets them');
    assert.deepEqual(b.received.map(text), ['ab', 'cd', 'ef']);
    await a.close(); await b.close();
  });

  test("a user's message ends their typing indicator, before the message event", async () => {
    const conv = directConv('ty-a', 'ty-b');
    const a = client(broker, 'ty-a'); const b = client(broker, 'ty-b');
    await a.connect(); await b.connect();
    const log = [];
    b.on('typing', (t) => log.push(`typing ${t.user} ${t.active}`));
    b.on('message', (m) => log.push(`message ${m.sender} ${JSON.stringify(b.typingUsers(conv))}`));
    assert.equal(a.typing(conv), true);
    await until(() => log.length === 1, 5000, 'typing arrives');
    await a.send(conv, 'done typing');
    await until(() => log.length >= 2 && log.at(-1).startsWith('message'), 5000, 'message arrives');
    assert.deepEqual(log, ['typing ty-a true', 'typing ty-a false', 'message ty-a []']);
    await a.close(); await b.close();
  });

  test('two quick subscribePresence calls each resolve with their own users', async () => {
    const a = client(broker, 'ps-a');
    await a.connect();
    const p1 = a.subscribePresence(['ps-b']);
    const p2 = a.subscribePresence(['ps-c', 'ps-d']);
    assert.deepEqual(Object.keys(await p1), ['ps-b']);
    assert.deepEqual(Object.keys(await p2).sort(), ['ps-c', 'ps-d']);
    assert.deepEqual([...a.presence.keys()].sort(), ['ps-c', 'ps-d']);
    await a.close();
  });

  test('close() with a send pending rejects it with ClientClosed carrying its localId', async () => {
    const c = track(new PimcoreClient({ url: 'ws://127.0.0.1:1/', token: 'x', reconnect: false }));
    c.connect().catch(() => {});
    const p = c.send(directConv('cc-a', 'cc-b'), 'hello', { localId: 77 });
    await c.close();
    const err = await p.catch((e) => e);
    assert.ok(err instanceof ClientClosed);
    assert.equal(err.localId, 77);
  });

  test('a fractional now() (performance.timeOrigin + performance.now()) still logs in', async () => {
    const now = () => (performance.timeOrigin + performance.now()) * 1000;
    const a = client(broker, 'fn-a', { now });
    await a.connect();
    const s = await a.send(directConv('fn-a', 'fn-b'), 'hi');
    assert.ok(Number.isInteger(s.client_time));
    await a.close();
  });
});
