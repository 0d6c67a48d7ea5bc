// Retention and purge seen by a connected client (a new user's trial): the
// unread count stayed at 30 after retention kept 10, and at 31 after a
// purge and one more message, while the broker said 10 and 1.  The broker
// now sends the exact ReadState; the client takes one whose unread went
// down with the same marker (PROTOCOL.md, Retention and purge).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { PimcoreClient, directConv } from '../src/index.js';
import { Broker, until } from './broker.mjs';

describe('retention and purge, connected', () => {
  let broker; let key;
  before(async () => {
    // A reclaim pass (retention included) every 50 ms, and retention may take what was
    // just stored (no dedupe_window): this file's process only.
    process.env.PIMCORE_SERVER_RECLAIM_INTERVAL = '0.05';
    process.env.PIMCORE_SERVER_DEDUPE_WINDOW = '0';
    broker = await new Broker({ http: true }).start();
    key = readFileSync(join(broker.dataDir, 'api-key'), 'utf-8').trim();
  });
  after(async () => { await broker.dispose(); });

  async function api(method, path, body) {
    const res = await fetch(broker.httpUrl + path, {
      method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    assert.equal(res.status, 200, `${method} ${path}: ${res.status} ${await res.clone().text()}`);
    return res.json();
  }

  test('the unread count follows the broker after retention and a purge', { timeout: 30000 }, async () => {
    const conv = directConv('alice', 'bob');
    const a = new PimcoreClient({ url: broker.url, token: broker.token('alice'), device: 'node' });
    const b = new PimcoreClient({ url: broker.url, token: broker.token('bob'), device: 'node' });
    await a.connect(); await b.connect();
    try {
      for (let i = 0; i < 30; i++) await a.send(conv, `m${i}`);
      await until(() => b.unread(conv) === 30, 5000, 'bob counts 30');
      const unread = async () => (await api('GET', `/v1/users/bob/unread?conv=${encodeURIComponent(conv)}`)).unread;
      await api('PUT', `/v1/conversations/${encodeURIComponent(conv)}/retention`, { max_count: 10 });
      await until(async () => (await unread()) === 10, 5000, 'the broker trims to 10');
      await until(() => b.unread(conv) === 10, 5000, 'bob counts 10 (he counted 30)');
      assert.deepEqual(b.readState(conv), { conv, read_seq: 0, last_seq: 30, unread: 10 });
      const purged = [];
      b.on('purged', (p) => purged.push(p));
      await api('DELETE', `/v1/conversations/${encodeURIComponent(conv)}`);
      await until(() => b.unread(conv) === 0, 5000, 'bob counts 0 after the purge');
      // Told (ConvPurged): the purged messages left his view (retention's did not: a client may keep those).
      await until(() => purged.length === 1, 5000, 'the purged event');
      assert.deepEqual(purged, [{ conv, last_seq: 30, gone: false }]);
      assert.deepEqual(b.view(conv), []);
      assert.equal(await unread(), 0);
      await a.send(conv, 'after');
      await until(() => b.unread(conv) === 1, 5000, 'one new message');
      assert.equal(await unread(), 1);
      assert.deepEqual(b.readState(conv), { conv, read_seq: 0, last_seq: 31, unread: 1 });
      assert.deepEqual(b.view(conv).map((m) => m.seq), [31]);
    } finally {
      a.close(); b.close();
    }
  });
});
