// The conversation list, per-user settings and mentions (PROTOCOL.md
// section 6) with PimcoreClient against a live `pimcore serve`.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { PimcoreClient, SendError, directConv, ErrorCode, encodeFrame, frame, decodeBody, FrameType } from '../src/index.js';
import { Broker, pimcore, until } from './broker.mjs';

const text = (m) => new TextDecoder().decode(m.payload);

// Every client a test makes, closed after it whether it passed or not (a
// failed assertion must not leave clients redialling the stopped broker).
const clients = new Set();

function client(broker, user, opts = {}) {
  const c = new PimcoreClient({ url: broker.url, token: broker.token(user), device: opts.device || 'node', ackTimeout: 2000, ...opts });
  clients.add(c);
  c.received = []; c.updates = [];
  c.on('message', (m) => c.received.push(m));
  c.on('conversation', (e) => c.updates.push(e));
  return c;
}

test('codec: ConvEntry inside ConvUpdate round-trips; SendReq mentions default to none', () => {
  const m = { position: 0, msg_id: new Uint8Array(16), conv: 'g', seq: 3, sender: 'al', device: 'd', client_time: -1,
    server_time: 9, payload: new Uint8Array([104, 105]), kind: 0, local_id: 1, after_seq: 2, target: 0, edited: 0, recalled: false, deleted: false, mentions: [{ user: 'bo' }], mention_all: true };
  const entry = { conv: 'g', last: [m], read_seq: 1, last_seq: 3, unread: 2, mention_count: 1, pinned: true, muted: false, hidden: false };
  const bytes = encodeFrame(frame('ConvUpdate', { entries: [entry] }));
  const back = decodeBody(FrameType.CONV_UPDATE, bytes.subarray(3));
  assert.deepEqual(back.entries, [entry]);
  const plain = encodeFrame(frame('SendReq', { local_id: 1, conv: 'g', client_time: 0, payload: new Uint8Array(0), after_seq: 0 }));
  assert.deepEqual([...plain.subarray(-2)], [0, 0], 'no mentions, not everyone');
});

describe('live broker', () => {
  let broker;
  before(async () => { broker = await new Broker().start(); });
  afterEach(async () => { await Promise.all([...clients].map((c) => c.close())); clients.clear(); });
  after(async () => { await broker.dispose(); });

  test('list pages, mentions, settings synced to the other device, hidden until the next message', async () => {
    pimcore(broker, 'group', 'create', 'crew', 'amy', 'ben');
    const ben = client(broker, 'ben'); await ben.connect();
    await ben.send('crew', 'hello @amy', { mentions: ['amy'] });
    await ben.send(directConv('amy', 'ben'), 'direct');
    await assert.rejects(ben.send('crew', 'x', { mentions: ['not valid!'] }), (e) => e instanceof SendError && e.code === ErrorCode.BAD_MENTION);
    const phone = client(broker, 'amy', { device: 'phone' }); const laptop = client(broker, 'amy', { device: 'laptop' });
    await phone.connect(); await laptop.connect();
    const p1 = await phone.listConversations({ limit: 1 });
    assert.equal(p1.entries.length, 1); assert.equal(p1.more, true);
    assert.equal(p1.entries[0].conv, directConv('amy', 'ben'));
    const p2 = await phone.listConversations({ limit: 1, cursor: p1.cursor });
    assert.equal(p2.more, false);
    const [crew] = p2.entries;
    assert.equal(crew.conv, 'crew'); assert.equal(crew.unread, 1); assert.equal(crew.mention_count, 1);
    assert.equal(text(crew.last[0]), 'hello @amy'); assert.deepEqual(crew.last[0].mentions, [{ user: 'amy' }]);
    await assert.rejects(phone.listConversations({ cursor: new Uint8Array([9, 9]) }), (e) => e instanceof SendError && e.code === ErrorCode.BAD_CURSOR);
    // settings: the other device hears of it
    await phone.setConversation('crew', { pinned: true, muted: true });
    await until(() => laptop.updates.some((e) => e.conv === 'crew' && e.pinned && e.muted), 5000, 'update on the laptop');
    assert.equal((await laptop.listConversations()).entries[0].conv, 'crew', 'pinned first');
    // read marker moved by the phone: the mention count drops on the laptop
    phone.markRead('crew', 1);
    await until(() => laptop.updates.some((e) => e.conv === 'crew' && e.mention_count === 0 && e.read_seq === 1), 5000, 'read sync');
    // hidden until the next message
    await laptop.setConversation(directConv('amy', 'ben'), { hidden: true });
    assert.deepEqual((await phone.listConversations()).entries.map((e) => e.conv), ['crew']);
    await ben.send(directConv('amy', 'ben'), 'back');
    await until(() => phone.received.some((m) => text(m) === 'back'), 5000, 'push');
    assert.deepEqual((await phone.listConversations()).entries.map((e) => e.conv), ['crew', directConv('amy', 'ben')]);
    await ben.close(); await phone.close(); await laptop.close();
  });
});
