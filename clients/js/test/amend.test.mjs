// Recall, edit and delete-for-self with PimcoreClient against a live
// `pimcore serve`: the AmendReq frame, 'amended' events, the local view,
// unread counts, history in its current state, offline catch-up.
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import { ErrorCode, MessageKind, PimcoreClient, SendError, directConv, encodeFrame, frame, FrameDecoder } from '../src/index.js';
import { Broker, until } from './broker.mjs';

const text = (m) => new TextDecoder().decode(m.payload);

// Every client a test makes, closed after it whether it passed or not: a
// failed assertion used to leave its clients redialling the stopped broker,
// and node never exited.
const clients = new Set();

function client(broker, user, opts = {}) {
  const c = new PimcoreClient({ url: broker.url, token: broker.token(user), device: opts.device || 'node', ackTimeout: 2000, ...opts });
  clients.add(c);
  c.received = []; c.amended = [];
  c.on('message', (m) => c.received.push(m));
  c.on('amended', (ev) => c.amended.push(ev));
  return c;
}

test('AmendReq round-trips through the codec; Message carries target, edited, recalled, deleted', () => {
  const f = frame('AmendReq', { local_id: 7, conv: 'c', target: 3, action: MessageKind.EDIT, client_time: -1, payload: new Uint8Array([104, 105]) });
  const wire = encodeFrame(f);
  assert.equal(Buffer.from(wire).toString('hex'), '0b4014070163030401026869');
  const [back] = new FrameDecoder().feed(wire);
  assert.equal(back.name, 'AmendReq'); assert.equal(back.target, 3); assert.equal(back.action, 4); assert.equal(back.client_time, -1);
});

describe('recall, edit, delete (live broker)', () => {
  let broker;
  before(async () => { broker = await new Broker().start(); });
  afterEach(async () => { await Promise.all([...clients].map((c) => c.close())); clients.clear(); });
  after(async () => { await broker.dispose(); });

  test('edit and recall reach the peer and the view; delete reaches only my other device; errors are final', async () => {
    const a = client(broker, 'ann');
    const b = client(broker, 'ben');
    const b2 = client(broker, 'ben', { device: 'tablet' });
    await a.connect(); await b.connect(); await b2.connect();
    const conv = directConv('ann', 'ben');
    const m1 = await a.send(conv, 'helo');
    const m2 = await a.send(conv, 'oops');
    await until(() => b.received.length === 2 && b2.received.length === 2, 5000, 'ben gets both');
    assert.equal(b.unread(conv), 2);

    const e = await a.edit(conv, m1.seq, 'hello');
    assert.equal(e.seq, 3);
    await until(() => b.amended.length === 1, 5000, 'the edit arrives');
    assert.equal(b.amended[0].entry.kind, MessageKind.EDIT); assert.equal(b.amended[0].entry.target, m1.seq);
    assert.equal(text(b.amended[0].message), 'hello'); assert.equal(b.amended[0].message.edited, e.server_time);
    assert.deepEqual(a.view(conv).map(text), ['hello', 'oops']);

    await a.recall(conv, m2.seq);
    await until(() => b.amended.length === 2, 5000, 'the recall arrives');
    assert.equal(b.amended[1].message.recalled, true); assert.equal(b.amended[1].message.payload.length, 0);
    assert.equal(b.unread(conv), 1, 'a recalled message is not unread');

    const d = await b.deleteForMe(conv, m1.seq);
    assert.equal(d.seq, 0);
    await until(() => b2.amended.length === 3, 5000, 'my other device learns the deletion');
    assert.equal(b2.amended[2].entry.kind, MessageKind.DELETE); assert.equal(b2.amended[2].message.deleted, true);
    await assert.rejects(b.edit(conv, m2.seq, 'x'), (err) => err instanceof SendError && err.code === ErrorCode.NOT_SENDER);
    await assert.rejects(a.edit(conv, m2.seq, 'x'), (err) => err instanceof SendError && err.code === ErrorCode.RECALLED);
    await assert.rejects(a.recall(conv, 99), (err) => err instanceof SendError && err.code === ErrorCode.NO_SUCH_MESSAGE);

    // ben deleted seq 1 for himself: nothing of it comes back to him, not
    // even through the EDIT entry, which carries the message's payload as
    // ben may see it now -- none (PROTOCOL.md section 6, "Recall, edit,
    // delete"; broker 34e5c20).  ann, who did not delete it, sees no change.
    const { messages } = await b.history(conv);
    assert.deepEqual(messages.map((m) => [m.seq, m.kind, text(m), m.recalled, m.deleted]), [
      [1, 0, '', false, true], [2, 0, '', true, false], [3, MessageKind.EDIT, '', false, false], [4, MessageKind.RECALL, '', false, false],
    ]);
    const { messages: annSees } = await a.history(conv);
    assert.deepEqual(annSees.map((m) => [m.seq, m.kind, text(m), m.recalled, m.deleted]), [
      [1, 0, 'hello', false, false], [2, 0, '', true, false], [3, MessageKind.EDIT, 'hello', false, false], [4, MessageKind.RECALL, '', false, false],
    ]);
    await a.close(); await b.close(); await b2.close();
  });

  test('an offline device catches up on the current state', async () => {
    const a = client(broker, 'cara');
    await a.connect();
    const conv = directConv('cara', 'dan');
    const d0 = client(broker, 'dan'); await d0.connect(); await d0.close(); // dan's device exists, then is offline
    const s = await a.send(conv, 'first draft');
    const s2 = await a.send(conv, 'regret');
    await a.edit(conv, s.seq, 'final');
    await a.recall(conv, s2.seq);
    const d = client(broker, 'dan');
    await d.connect();
    await until(() => d.received.length === 2 && d.amended.length === 2, 5000, 'dan catches up');
    assert.deepEqual(d.received.map((m) => [m.seq, text(m), m.recalled]), [[1, 'final', false], [2, '', true]]);
    assert.deepEqual(d.amended.map((ev) => ev.entry.kind), [MessageKind.EDIT, MessageKind.RECALL]);
    assert.equal(d.unread(conv), 1);
    await a.close(); await d.close();
  });

  // Found by a reviewer: ben deleted an unread message for himself; the
  // broker said unread 2, his phone and tablet 3 until the next read.
  test('a delete for me of an unread message lowers the unread count on every device, once', async () => {
    const a = client(broker, 'amy');
    const phone = client(broker, 'bo');
    const tablet = client(broker, 'bo', { device: 'tablet' });
    await a.connect(); await phone.connect(); await tablet.connect();
    const conv = directConv('amy', 'bo');
    const sent = [];
    for (let i = 0; i < 3; i++) sent.push(await a.send(conv, `m${i}`));
    await until(() => phone.received.length === 3 && tablet.received.length === 3, 5000, 'bo gets all three');
    assert.equal(phone.unread(conv), 3); assert.equal(tablet.unread(conv), 3);
    await phone.deleteForMe(conv, sent[0].seq);
    await until(() => tablet.amended.length === 1, 5000, 'the tablet learns the deletion');
    assert.equal(tablet.amended[0].entry.kind, MessageKind.DELETE);
    assert.equal(phone.unread(conv), 2); assert.equal(tablet.unread(conv), 2);
    assert.equal(tablet.readState(conv).unread, 2);
    // again, then recalled by amy: counted once
    await phone.deleteForMe(conv, sent[0].seq);
    await a.recall(conv, sent[0].seq);
    await until(() => tablet.amended.some((ev) => ev.entry.kind === MessageKind.RECALL), 5000, 'the recall arrives');
    assert.equal(phone.unread(conv), 2); assert.equal(tablet.unread(conv), 2);
    // amy's own message, deleted by her: never unread for her
    await a.deleteForMe(conv, sent[1].seq);
    assert.equal(a.unread(conv), 0);
  });
  // The Python SDK's conversation list entry kept its own unread count, which
  // a delete for me or a recall left stale; here conversations() is built
  // from the read states themselves: it must say what unread() says, and
  // what the broker's next page says.
  test('a delete for me and a recall lower the conversations() entry on every device, as the broker\'s page', async () => {
    const a = client(broker, 'ava');
    const phone = client(broker, 'bea');
    const tablet = client(broker, 'bea', { device: 'tablet' });
    await a.connect(); await phone.connect(); await tablet.connect();
    const conv = directConv('ava', 'bea');
    const sent = [];
    for (let i = 0; i < 3; i++) sent.push(await a.send(conv, `m${i}`, { mentions: ['bea'] }));
    await until(() => phone.received.length === 3 && tablet.received.length === 3, 5000, 'bea gets all three');
    await phone.deleteForMe(conv, sent[0].seq);
    await a.recall(conv, sent[1].seq);
    await until(() => phone.amended.length === 1 && tablet.amended.length === 2, 5000, 'the deletion and the recall arrive');
    for (const dev of [phone, tablet]) {
      const entry = dev.conversations().find((e) => e.conv === conv);
      assert.equal(entry.unread, 1); assert.equal(dev.unread(conv), 1);
      const page = await dev.listConversations();
      assert.deepEqual(page.entries.map((e) => [e.conv, e.unread, e.read_seq]), [[conv, entry.unread, entry.read_seq]]);
    }
  });
  // After the unread fix the broker still counted a message deleted for
  // oneself as a mention: listConversations() said mention_count 2 after the
  // delete.  The JS client keeps no mention count of its own (the page and
  // 'conversation' updates are the broker's), so every device's page must
  // drop it, and only for the one who deleted it.
  test('a delete for me of an unread message mentioning me lowers mention_count on every device\'s page', async () => {
    const a = client(broker, 'eve');
    const phone = client(broker, 'fay');
    const tablet = client(broker, 'fay', { device: 'tablet' });
    await a.connect(); await phone.connect(); await tablet.connect();
    const conv = directConv('eve', 'fay');
    const sent = [];
    for (let i = 0; i < 2; i++) sent.push(await a.send(conv, `@fay ${i}`, { mentions: ['fay'] }));
    await until(() => phone.received.length === 2 && tablet.received.length === 2, 5000, 'fay gets both');
    for (const dev of [phone, tablet]) {
      assert.deepEqual((await dev.listConversations()).entries.map((e) => [e.conv, e.unread, e.mention_count]), [[conv, 2, 2]]);
    }
    await phone.deleteForMe(conv, sent[0].seq);
    await until(() => tablet.amended.length === 1, 5000, 'the deletion reaches the tablet');
    for (const dev of [phone, tablet]) {
      assert.equal(dev.unread(conv), 1);
      assert.deepEqual((await dev.listConversations()).entries.map((e) => [e.conv, e.unread, e.mention_count]), [[conv, 1, 1]]);
    }
    // eve's own page: her messages are no mention of her, nothing changes
    assert.deepEqual((await a.listConversations()).entries.map((e) => [e.conv, e.unread, e.mention_count]), [[conv, 0, 0]]);
  });
});
