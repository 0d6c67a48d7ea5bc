// Refusals the client cannot tie to a call, and the ones it judges itself
// (the Python SDK's BrokerRefused event and its checks at the call), against
// a live `pimcore serve`.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { PimcoreClient, directConv, ErrorCode } from '../src/index.js';
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
});
