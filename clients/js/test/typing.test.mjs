// Typing and presence (PROTOCOL.md "Typing and presence") against a live
// broker, and the new frames through the codec.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  ErrorCode, FrameDecoder, PimcoreClient, PresenceState, SendError, decodeBody, directConv, encodeBody, encodeFrame, frame,
} from '../src/index.js';
import { Broker, pimcore, until } from './broker.mjs';

function client(broker, user, opts = {}) {
  const c = new PimcoreClient({ url: broker.url, token: broker.token(user), device: opts.device || 'node', ackTimeout: 2000, ...opts });
  c.events = [];
  for (const name of ['typing', 'presence', 'privacy']) c.on(name, (ev) => c.events.push([name, ev]));
  return c;
}

test('codec: the typing and presence frames round-trip', () => {
  const frames = [
    frame('Typing', { conv: 'g', active: true, user: 'alice', ttl_ms: 6000 }),
    frame('PresenceSub', { req_id: 3, users: [{ user: 'bob' }, { user: 'carol' }] }),
    frame('Presence', { req_id: 0, code: 0, entries: [{ user: 'bob', state: PresenceState.OFFLINE, last_seen: 1700000000000000 }] }),
    frame('PresencePrivacy', { mode: 2 }),
  ];
  for (const f of frames) {
    const [back] = new FrameDecoder().feed(encodeFrame(f));
    assert.deepEqual(back, f);
    assert.deepEqual(decodeBody(f.type, encodeBody(f)), f);
  }
  assert.deepEqual([...encodeFrame(frames[0])].slice(2), [0x1c, 1, 0x67, 1, 5, ...new TextEncoder().encode('alice'), 0xf0, 0x2e]);
  assert.equal(ErrorCode.PRESENCE_LIMIT, 48); assert.equal(ErrorCode.TYPING_NOT_RELAYED, 49);
});

describe('live broker: typing and presence', () => {
  let broker;
  before(async () => { broker = await new Broker().start(); });
  after(async () => { await broker.dispose(); });

  test('typing reaches the other members, is throttled, and expires or stops', async () => {
    pimcore(broker, 'group', 'create', 'crew', 'ann', 'ben');
    const a = client(broker, 'ann'); const b = client(broker, 'ben'); const x = client(broker, 'xena');
    await Promise.all([a.connect(), b.connect(), x.connect()]);
    assert.equal(a.typing('crew'), true);
    assert.equal(a.typing('crew'), false, 'throttled within typingInterval');
    await until(() => b.events.some(([n, e]) => n === 'typing' && e.active && e.user === 'ann'), 5000, 'ben sees ann typing');
    const ev = b.events.find(([n]) => n === 'typing')[1];
    assert.equal(ev.conv, 'crew'); assert.ok(ev.expires > Date.now() * 1000);
    assert.deepEqual(b.typingUsers('crew'), ['ann']);
    assert.equal(a.typing('crew', false), true);
    await until(() => b.events.some(([n, e]) => n === 'typing' && !e.active), 5000, 'the stop');
    assert.deepEqual(b.typingUsers('crew'), []);
    // A send ends the indicator at the others: the next keystroke types again at once.
    assert.equal(a.typing('crew'), true);
    await a.send('crew', 'done');
    assert.equal(a.typing('crew', false), false, 'the send ended it: nothing to stop');
    assert.equal(a.typing('crew'), true, 'not throttled after a send');
    const refused = [];
    x.on('brokerRefused', (e) => refused.push(e));
    x.typing('crew'); // not a member: refused, never relayed
    await until(() => refused.some((e) => e.code === ErrorCode.NOT_MEMBER && e.reason.includes("'crew'")), 5000, 'NOT_MEMBER');
    assert.ok(!a.events.some(([n]) => n === 'typing'), 'not to the sender');
    await Promise.all([a.close(), b.close(), x.close()]);
  });

  test('presence: subscribe, changes, hidden last seen, invisible strangers', async () => {
    const p = client(broker, 'pia'); const q = client(broker, 'quinn');
    await Promise.all([p.connect(), q.connect()]);
    await p.send(directConv('pia', 'quinn'), 'hi'); // a 1:1 chat is shared from its first message
    const got = await p.subscribePresence(['quinn', 'stranger']);
    assert.equal(got.quinn.state, PresenceState.ONLINE);
    assert.equal(got.stranger.state, PresenceState.UNKNOWN);
    assert.equal(await q.setPresencePrivacy(null), false);
    assert.equal(await q.setPresencePrivacy(true), true);
    assert.equal(q.hideLastSeen, true);
    await q.close();
    await until(() => p.presence.get('quinn').state === PresenceState.OFFLINE, 5000, 'quinn offline');
    assert.equal(p.presence.get('quinn').last_seen, 0, 'hidden');
    const q2 = client(broker, 'quinn');
    await q2.connect();
    await until(() => p.presence.get('quinn').state === PresenceState.ONLINE, 5000, 'quinn back');
    assert.equal(await q2.setPresencePrivacy(false), false);
    await q2.close();
    await until(() => p.presence.get('quinn').state === PresenceState.OFFLINE, 5000, 'quinn offline again');
    assert.ok(p.presence.get('quinn').last_seen > 0, 'shown');
    const many = Array.from({ length: 300 }, (_, i) => `u${i}`);
    await assert.rejects(p.subscribePresence(many), (e) => e instanceof SendError && e.code === ErrorCode.PRESENCE_LIMIT);
    // the refused subscription left the previous one in place, and it is renewed after a reconnect
    p.dropConnection('test');
    await until(() => p.state === 'ACTIVE', 5000, 'reconnected');
    const q3 = client(broker, 'quinn');
    await q3.connect();
    await until(() => p.presence.get('quinn').state === PresenceState.ONLINE, 5000, 'seen through the renewed subscription');
    await Promise.all([p.close(), q3.close()]);
  });

  test('presence: nothing claimed while disconnected, the current state after the reconnect', async () => {
    pimcore(broker, 'group', 'create', 'duo', 'rae', 'sam');
    let outage = null; // while set, the token fetch of the redial (hence the redial) waits on it
    const r = client(broker, 'rae', { token: async () => { await outage; return broker.token('rae'); } });
    const s = client(broker, 'sam');
    r.on('disconnected', (ev) => r.events.push(['disconnected', ev]));
    await Promise.all([r.connect(), s.connect()]);
    const got = await r.subscribePresence(['sam', 'stranger']);
    assert.equal(got.sam.state, PresenceState.ONLINE);
    assert.equal(got.stranger.state, PresenceState.UNKNOWN);
    r.events.length = 0;
    let endOutage;
    outage = new Promise((resolve) => { endOutage = resolve; });
    r.dropConnection('outage');
    // cut off, the client cannot know: sam turns UNKNOWN (last_seen kept), announced right after the disconnect;
    // the stranger was UNKNOWN already: no event
    const unknown = { user: 'sam', state: PresenceState.UNKNOWN, last_seen: 0 };
    assert.equal(r.state, 'DISCONNECTED');
    assert.deepEqual(r.presence.get('sam'), unknown);
    assert.deepEqual(r.presence.get('stranger'), { user: 'stranger', state: PresenceState.UNKNOWN, last_seen: 0 });
    assert.deepEqual(r.events, [['disconnected', { code: null, reason: 'outage' }], ['presence', unknown]]);
    await s.close(); // sam leaves during the outage: rae still cannot tell
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.notEqual(r.state, 'ACTIVE');
    assert.deepEqual(r.presence.get('sam'), unknown);
    endOutage(); outage = null;
    await until(() => r.state === 'ACTIVE', 5000, 'reconnected');
    await until(() => r.presence.get('sam').state === PresenceState.OFFLINE, 5000, 'the current state from the renewed subscription');
    assert.ok(r.presence.get('sam').last_seen > 0);
    assert.deepEqual(r.events.filter(([n, e]) => n === 'presence' && e.user === 'sam').at(-1)[1], r.presence.get('sam'));
    await r.close();
  });

  test('presence: nothing claimed after close() either', async () => {
    // close() kept the last ONLINE/OFFLINE entries; now as on a dropped connection.
    const u = client(broker, 'uma'); const v = client(broker, 'vic');
    await Promise.all([u.connect(), v.connect()]);
    await u.send(directConv('uma', 'vic'), 'hi');
    const got = await u.subscribePresence(['vic', 'stranger']);
    assert.equal(got.vic.state, PresenceState.ONLINE);
    u.events.length = 0;
    await u.close();
    const unknown = { user: 'vic', state: PresenceState.UNKNOWN, last_seen: 0 };
    assert.deepEqual(u.presence.get('vic'), unknown);
    assert.deepEqual(u.presence.get('stranger'), { user: 'stranger', state: PresenceState.UNKNOWN, last_seen: 0 });
    assert.deepEqual(u.events.filter(([n]) => n === 'presence'), [['presence', unknown]]);
    await v.close();
  });
});
