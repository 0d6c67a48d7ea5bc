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

  // A new user's trial (HIGH): dot deleted eli's message for herself on her
  // phone; a markRead on her tablet sent a 'conversation' update whose `last`
  // was the message undeleted, with its text, and a page (listConversations)
  // wrote that copy into view() on top of the deleted one; after eli edited
  // it her list preview showed the new text.  The broker's `last` is now as
  // history returns it, and the client never takes a list entry's copy over
  // a held one that is further along (an entry read before the delete
  // committed can arrive after it): view() and the entries stay deleted.
  test('a message deleted for me stays deleted in view() and the list entries: reads, pages, edits, a stale entry', async () => {
    pimcore(broker, 'group', 'create', 'gone', 'dot', 'eli');
    const eli = client(broker, 'eli');
    const phone = client(broker, 'dot', { device: 'phone' }); const tablet = client(broker, 'dot', { device: 'tablet' });
    const amended = []; tablet.on('amended', (ev) => amended.push(ev));
    await eli.connect(); await phone.connect(); await tablet.connect();
    const sent = await eli.send('gone', 'dot wants this gone');
    await until(() => phone.received.length === 1 && tablet.received.length === 1, 5000, 'both devices get it');
    const original = { ...tablet.view('gone')[0], position: 0 };
    await phone.deleteForMe('gone', sent.seq);
    await until(() => amended.length === 1, 5000, 'the tablet learns the deletion');
    const shown = (dev) => dev.view('gone').map((m) => [Number(m.seq), text(m), !!m.deleted]);
    const lastOf = (e) => e.last.map((m) => [text(m), !!m.deleted]);
    const gone = [[Number(sent.seq), '', true]];
    assert.deepEqual(shown(phone), gone); assert.deepEqual(shown(tablet), gone);
    tablet.markRead('gone', sent.seq);
    await until(() => phone.updates.some((e) => e.conv === 'gone' && Number(e.read_seq) === Number(sent.seq)), 5000, 'the read reaches the phone');
    assert.deepEqual(lastOf(phone.updates.find((e) => Number(e.read_seq) === Number(sent.seq))), [['', true]]);
    for (const dev of [phone, tablet]) {
      const [e] = (await dev.listConversations()).entries;
      assert.deepEqual(lastOf(e), [['', true]]);
      assert.deepEqual(shown(dev), gone);
    }
    await eli.edit('gone', sent.seq, 'edited text');
    await until(() => amended.length === 2, 5000, 'the edit reaches the tablet');
    assert.deepEqual(lastOf((await tablet.listConversations()).entries[0]), [['', true]]);
    assert.deepEqual(shown(tablet), gone);
    assert.deepEqual(lastOf((await eli.listConversations()).entries[0]), [['edited text', false]], 'for her alone');
    // An entry read before the delete, arriving after it (a ConvUpdate, a page).
    const stale = { conv: 'gone', last: [original], read_seq: 0, last_seq: sent.seq, unread: 1, mention_count: 0, pinned: false, muted: false, hidden: false };
    tablet._handle(frame('ConvUpdate', { entries: [stale] }), tablet.opts.now());
    assert.deepEqual(lastOf(tablet.updates[tablet.updates.length - 1]), [['', true]]);
    const pending = tablet.listConversations();
    const reqId = [...tablet._requests.keys()].pop();
    tablet._handle(frame('ConvListResp', { req_id: reqId, code: 0, entries: [stale], cursor: new Uint8Array(0), more: false }), tablet.opts.now());
    assert.deepEqual(lastOf((await pending).entries[0]), [['', true]]);
    assert.deepEqual(shown(tablet), gone);
  });
});
