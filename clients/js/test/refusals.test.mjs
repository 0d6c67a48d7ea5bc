// Refusals the client cannot tie to a call, and the ones it judges itself
// (the Python SDK's BrokerRefused event and its checks at the call), against
// a live `pimcore serve`.
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { PimcoreClient, SendError, directConv, ErrorCode } from '../src/index.js';
import { Broker, pimcore, until } from './broker.mjs';

// Every client a test makes, closed after it whether it passed or not.
const clients = new Set();

function client(broker, user, opts = {}) {
  const c = new PimcoreClient({ url: broker.url, token: broker.token(user), device: opts.device || 'node', ackTimeout: 2000, ...opts });
  clients.add(c);
  c.refused = [];
  c.on('brokerRefused', (e) => c.refused.push(e));
  return c;
}

describe('live broker', () => {
  let broker;
  before(async () => { broker = await new Broker().start(); pimcore(broker, 'group', 'create', 'team', 'alice', 'carol'); });
  afterEach(async () => { await Promise.all([...clients].map((c) => c.close())); clients.clear(); });
  after(async () => { await broker.dispose(); });

  test("a refused Read (it has no request id) comes as a 'brokerRefused' event: code, its name, ref 0, the broker's words", async () => {
    const bob = client(broker, 'bob'); await bob.connect();
    for (const [conv, code] of [['team', ErrorCode.NOT_MEMBER], ['nosuch', ErrorCode.UNKNOWN_CONVERSATION]]) {
      bob.refused.length = 0;
      bob.markRead(conv, 1);
      await until(() => bob.refused.length, 5000, `the refusal of ${conv}`);
      const [ev] = bob.refused;
      assert.equal(ev.code, code, JSON.stringify(ev));
      assert.equal(ev.codeName, code === ErrorCode.NOT_MEMBER ? 'NOT_MEMBER' : 'UNKNOWN_CONVERSATION');
      assert.equal(ev.ref, 0);
      assert.ok(ev.reason.includes(`'${conv}'`), ev.reason);
    }
    // where bob belongs: no refusal (the readers round trip comes after any Error for the Read)
    bob.refused.length = 0;
    const ab = directConv('alice', 'bob');
    await bob.send(ab, 'hi');
    bob.markRead(ab, 1);
    await bob.readers(ab);
    assert.deepEqual(bob.refused, []);
  });

  test('markRead throws SendError at the call for what the client can judge itself, and sends nothing', async () => {
    const bob = client(broker, 'bob'); await bob.connect();
    const dm = directConv('alice', 'carol');
    const cases = [
      [dm, ErrorCode.NOT_MEMBER, `bob is not one of the two users of the 1:1 conversation '${dm}' (alice and carol)`],
      ['not a conv', ErrorCode.BAD_REQUEST, "invalid conversation id: group id 'not a conv' is not 1-128 printable ASCII characters without spaces"],
      ['d:zed:amy', ErrorCode.BAD_REQUEST, "invalid conversation id: direct conversation id 'd:zed:amy' is not d:<a>:<b>"],
    ];
    for (const [conv, code, reason] of cases) {
      assert.throws(() => bob.markRead(conv, 1), (e) => e instanceof SendError && e.code === code && e.reason.startsWith(reason), conv);
      assert.equal(bob.readState(conv), undefined);
    }
    // nothing went out: no refusal from the broker before the answer to a later request
    await bob.readers(directConv('alice', 'bob'));
    assert.deepEqual(bob.refused, []);
  });

  test('seq and limit arguments: RangeError naming the argument out of range, TypeError when not a number', async () => {
    const bob = client(broker, 'bob'); await bob.connect();
    const ab = directConv('alice', 'bob');
    const range = (name) => (e) => e instanceof RangeError && e.message.includes(name);
    const type = (name) => (e) => e instanceof TypeError && !(e instanceof RangeError) && e.message.includes(name);
    assert.throws(() => bob.markRead(ab, -1), range('markRead: seq'));
    assert.throws(() => bob.markRead(ab, 1.5), range('markRead: seq'));
    assert.throws(() => bob.markRead(ab, 2 ** 64), range('markRead: seq'));
    assert.throws(() => bob.markRead(ab, 1n << 64n), range('markRead: seq'));
    assert.throws(() => bob.markRead(ab, '3'), type('markRead: seq'));
    assert.throws(() => bob.markRead(ab), type('markRead: seq'));
    await assert.rejects(bob.history(ab, { limit: 0 }), range('history: limit'));
    await assert.rejects(bob.history(ab, { fromSeq: -1 }), range('history: fromSeq'));
    await assert.rejects(bob.history(ab, { limit: '10' }), type('history: limit'));
    await assert.rejects(bob.listConversations({ limit: 0 }), range('listConversations: limit'));
    await assert.rejects(bob.recall(ab, 0), range('recall: seq'));
    await assert.rejects(bob.edit(ab, -2, 'x'), range('edit: seq'));
    await assert.rejects(bob.deleteForMe(ab, 0.5), range('deleteForMe: seq'));
    await assert.rejects(bob.amend(ab, 0, 3), range('amend: target'));
    // in range: fine (a big seq as a bigint too)
    bob.markRead(ab, 0); bob.markRead(ab, (1n << 64n) - 1n);
    assert.deepEqual((await bob.history(ab, { limit: 1 })).messages.length <= 1, true);
    assert.equal(bob.refused.length, 0);
  });

  test('an empty token is a TypeError naming token at the call; a token function returning one rejects connect()', async () => {
    for (const token of ['', new Uint8Array(0)]) {
      assert.throws(() => new PimcoreClient({ url: broker.url, token }), (e) => e instanceof TypeError && /token cannot be empty/.test(e.message));
    }
    assert.throws(() => new PimcoreClient({ url: broker.url, token: 42 }), (e) => e instanceof TypeError && /token must be/.test(e.message));
    for (const token of [() => '', async () => new Uint8Array(0), () => null]) {
      const c = client(broker, 'bob', { token });
      await assert.rejects(c.connect(), (e) => e instanceof TypeError && /token function returned/.test(e.message));
      assert.equal(c.state, 'CLOSED');
    }
  });
});

describe('a broker with a small send bucket (limits.send_rate 500/s, send_burst 50, window 8)', () => {
  let broker;
  before(async () => {
    broker = new Broker();
    const cfg = join(broker.dataDir, 'limits.toml');
    writeFileSync(cfg, '[limits]\nsend_rate = 500.0\nsend_burst = 50\nwindow = 8\n');
    broker.extra = ['--config', cfg];
    await broker.start();
  });
  afterEach(async () => { await Promise.all([...clients].map((c) => c.close())); clients.clear(); });
  after(async () => { await broker.dispose(); });

  test("a burst into the bucket: every RATE_LIMITED hold is the bucket's refill time for the next window, far under backoffInitial (the Python SDK's rule); one congestion event per window; every send stored once, in order", async () => {
    // backoffInitial 100 ms (the default; at most the bucket's 50 / 500/s, or a hold would waste its refill).  A blind
    // backoff holds 50-150 ms at a first refusal; the bucket refills a window of 4-8 in 8-16 ms.
    const alice = client(broker, 'alice', { backoffInitial: 100, sendTimeout: 120000 });
    await alice.connect();
    // The hold the client chooses at each congestion event (µs), the window it sends next and the hold's exponent
    // (events with no send answered since the one before: windows refused whole).
    const holds = [];
    const onSendAck = alice._onSendAck.bind(alice);
    alice._onSendAck = (f, now) => {
      const events = alice.stats.congestionEvents;
      onSendAck(f, now);
      if (alice.stats.congestionEvents > events) holds.push({ hold: alice._holdUntil - now, window: alice.sendWindow, k: alice._refusals });
    };
    const ab = directConv('alice', 'bob');
    const N = 300;
    const sends = Array.from({ length: N }, (_, i) => alice.send(ab, `m${i}`));
    const sent = await Promise.all(sends);
    // Nothing lost or reordered: stored once each, seq in send order.
    assert.deepEqual(sent.map((m) => m.seq), Array.from({ length: N }, (_, i) => i + 1));
    assert.ok(holds.length > 0, 'the bucket (50) refused part of the burst');
    const shown = JSON.stringify(holds.map((h) => [h.hold / 1000, h.window, h.k])); // [ms, window, exponent]
    // The rule: min(backoffInitial, window / measured rate), doubled per window refused whole (capped by backoffMax).
    for (const { hold, k } of holds) assert.ok(hold <= 100_000 * 2 ** (k - 1), `a hold over backoffInitial x 2^${k - 1}: ${shown}`);
    // ... and the bucket's rate is learned: most holds are a window's refill time, not backoffInitial (nor half of it).
    const median = holds.map((h) => h.hold).sort((a, b) => a - b)[Math.floor(holds.length / 2)];
    assert.ok(median <= 25_000, `the median hold is ${median / 1000} ms: ${shown}`);
    // One congestion event per window of refusals, not one per refusal (as the Python SDK's end-to-end test).
    assert.ok(alice.stats.congestionEvents * 3 < alice.stats.retransmits, JSON.stringify(alice.stats));
  });
});
