// The codec against docs/PROTOCOL.md's test vectors (the same ones
// tests/test_codec.py checks), and its error rules.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import {
  ErrorCode, FrameDecoder, FrameType, ProtocolError, EncodeError, directConv, encodeFrame, frame,
} from '../src/codec.js';
import { createDeflater, createInflater } from '../src/deflate.js';
import { REPO } from './broker.mjs';

const hex = (s) => Uint8Array.from(s.replace(/\s+/g, '').match(/../g).map((x) => parseInt(x, 16)));
const toHex = (b) => Buffer.from(b).toString('hex');
const utf8 = (s) => new TextEncoder().encode(s);
const spec = readFileSync(`${REPO}/docs/PROTOCOL.md`, 'utf-8');

// The hex bytes of the block after `<!-- name -->` (hex pairs before the first double space of each line).
function vector(name) {
  const block = spec.split(`<!-- ${name} -->`)[1].split('```')[1];
  return hex(block.split('\n').map((l) => l.split(/ {2,}/)[0]).join(' ').replace(/[^0-9a-f ]/gi, ' ').trim().split(/\s+/).filter((t) => /^[0-9a-f]{2}$/i.test(t)).join(''));
}

function decodeAll(bytes, opts) {
  const d = new FrameDecoder(opts);
  return d.feed(bytes);
}

test('worked example: SendReq', () => {
  const f = frame('SendReq', { local_id: 300, conv: 'c1', client_time: -3, payload: utf8('hi'), after_seq: 7 });
  const wire = '0e4005ac0202633105026869' + '07' + '0000';
  assert.equal(toHex(encodeFrame(f)), wire);
  const [back] = decodeAll(hex(wire));
  assert.equal(back.local_id, 300); assert.equal(back.conv, 'c1'); assert.equal(back.client_time, -3);
  assert.deepEqual(back.payload, utf8('hi')); assert.equal(back.after_seq, 7);
  assert.ok(spec.includes('ac 02       local_id'), 'the vector is the one in PROTOCOL.md');
});

test('vectors: ReadStates, Ping, PushAck(2^64-1), Close', () => {
  const rs = frame('ReadStates', { entries: [{ conv: 'g', read_seq: 5, last_seq: 7, unread: 2 }] });
  assert.equal(toHex(encodeFrame(rs)), '08400a0101670507' + '02');
  assert.equal(toHex(encodeFrame(frame('Ping', { nonce: 0 }))), '03400e00');
  assert.equal(toHex(encodeFrame(frame('PushAck', { position: 2n ** 64n - 1n }))), '0c4008ffffffffffffffffff01');
  assert.equal(toHex(encodeFrame(frame('Close', { code: 1, reason: 'é' }))), '0640110102c3a9');
  const [pa] = decodeAll(hex('0c4008ffffffffffffffffff01'));
  assert.equal(pa.position, 2n ** 64n - 1n);
  const [c] = decodeAll(hex('0640110102c3a9'));
  assert.equal(c.reason, 'é');
  const [r] = decodeAll(hex('08400a01016705070' + '2'));
  assert.deepEqual(r.entries, [{ conv: 'g', read_seq: 5, last_seq: 7, unread: 2 }]);
});

test('varints: the spec examples and minimality', () => {
  for (const [n, h] of [[0, '00'], [127, '7f'], [128, '8001'], [300, 'ac02'], [16383, 'ff7f']]) {
    assert.equal(toHex(encodeFrame(frame('Ping', { nonce: n }))).slice(6), h);
  }
  const bad = (h, code) => assert.throws(() => decodeAll(hex(h)), (e) => e instanceof ProtocolError && e.code === code);
  bad('04400e8000', ErrorCode.MALFORMED_FRAME); // 80 00 is not minimal
  bad('0c4008ffffffffffffffffff02', ErrorCode.MALFORMED_FRAME); // 10th byte > 1
  bad('03500e00', ErrorCode.UNSUPPORTED_VERSION);
  bad('03420e00', ErrorCode.MALFORMED_FRAME); // reserved flag
  bad('03410e00', ErrorCode.MALFORMED_FRAME); // compressed, not active
  bad('03407f00', ErrorCode.UNKNOWN_FRAME_TYPE);
  bad('01', ErrorCode.MALFORMED_FRAME); // length < 2
  bad('04400e0000', ErrorCode.MALFORMED_FRAME); // a byte left over
  bad('02400e', ErrorCode.MALFORMED_FRAME); // field runs past the body
  bad('8080808080', ErrorCode.MALFORMED_FRAME); // a 5th prefix byte with the continuation bit
});

test('limits: FRAME_TOO_LARGE from the prefix alone; list counts checked before allocation', () => {
  assert.throws(() => decodeAll(hex('ffff7f'), { maxFrameSize: 1000 }), (e) => e.code === ErrorCode.FRAME_TOO_LARGE);
  assert.throws(() => decodeAll(hex('04400a0500')), (e) => e.code === ErrorCode.MALFORMED_FRAME); // 5 entries in 2 bytes
  assert.throws(() => decodeAll(hex('09401101' + '05c3a9c3a9c3')), (e) => e.code === ErrorCode.MALFORMED_FRAME); // bad UTF-8 tail
});

test('split at every byte boundary gives the same frames; a poisoned decoder stays poisoned', () => {
  const wire = hex('0e4005ac0202633105026869070000' + '03400e00' + '0640110102c3a9');
  for (let cut = 0; cut <= wire.length; cut++) {
    const d = new FrameDecoder();
    const out = [...d.feed(wire.slice(0, cut)), ...d.feed(wire.slice(cut))];
    assert.deepEqual(out.map((f) => f.name), ['SendReq', 'Ping', 'Close']);
  }
  const d = new FrameDecoder();
  assert.throws(() => d.feed(hex('03400e00' + '03500e00')), (e) => e.frames.length === 1 && e.code === ErrorCode.UNSUPPORTED_VERSION);
  assert.throws(() => d.feed(hex('03400e00')), (e) => e.code === ErrorCode.UNSUPPORTED_VERSION);
});

test('encoder refuses what it cannot encode exactly', () => {
  assert.throws(() => encodeFrame(frame('Ping', { nonce: -1 })), EncodeError);
  assert.throws(() => encodeFrame(frame('Ping', { nonce: 2n ** 64n })), EncodeError);
  assert.throws(() => encodeFrame(frame('Ping', { nonce: 1.5 })), EncodeError);
  assert.throws(() => encodeFrame(frame('Ping', { nonce: true })), EncodeError);
  assert.throws(() => encodeFrame(frame('Close', { code: 0, reason: '\ud800' })), EncodeError);
  assert.throws(() => encodeFrame(frame('SendReq', { local_id: 1, conv: 'c', client_time: 0, payload: 'str', after_seq: 0 })), EncodeError);
  assert.throws(() => encodeFrame({ type: 0x7f }), EncodeError);
});

test('deflate-vector (section 7.2): three upstream frames decode', () => {
  const wire = vector('deflate-vector');
  const d = new FrameDecoder();
  d.inflate = createInflater();
  const frames = d.feed(wire);
  assert.deepEqual(frames.map((f) => f.name), ['SendReq', 'SendReq', 'PushAck']);
  assert.equal(frames[0].local_id, 7);
  assert.equal(frames[0].client_time, 1717200000000000);
  assert.equal(new TextDecoder().decode(frames[0].payload), '{"type":"text","text":"see you at 7 🙂"}');
  assert.equal(frames[1].after_seq, 41);
  assert.equal(new TextDecoder().decode(frames[1].payload), '{"type":"text","text":"see you at 8 then"}');
  assert.equal(frames[2].position, 5);
  // The second frame refers back to the first: alone it does not inflate.
  const d2 = new FrameDecoder(); d2.inflate = createInflater();
  const second = wire[0] + 1; // after the first frame's 1-byte length prefix and its body
  assert.throws(() => d2.feed(wire.slice(second, second + wire[second] + 1)), (e) => e.code === ErrorCode.MALFORMED_FRAME);
});

test('deflate round trip through our own deflater (window 2^11) and a bomb is FRAME_TOO_LARGE', () => {
  const def = createDeflater(); const inf = createInflater();
  for (let i = 0; i < 50; i++) {
    const body = utf8(`{"type":"text","text":"message number ${i} ${'x'.repeat(i)}"}`);
    assert.deepEqual(inf(def(body), 1 << 20), body);
  }
  const bomb = createDeflater()(new Uint8Array(100000));
  assert.throws(() => createInflater()(bomb, 1000), (e) => e.code === ErrorCode.FRAME_TOO_LARGE);
});

test('zstd-vector exists but zstd is not implemented: a compressed frame without a grant is MALFORMED', () => {
  const wire = vector('zstd-vector');
  assert.equal(wire[0], wire.length - 1); assert.equal(wire[1], 0x41);
  assert.throws(() => decodeAll(wire), (e) => e.code === ErrorCode.MALFORMED_FRAME);
});

test('direct conversation ids (section 8 vectors)', () => {
  assert.equal(directConv('alice', 'bob'), 'd:alice:bob');
  assert.equal(directConv('bob', 'alice'), 'd:alice:bob');
  assert.equal(directConv('alice', 'Zed'), 'd:Zed:alice');
  assert.equal(directConv('a.b', 'a-b'), 'd:a-b:a.b');
  assert.equal(directConv('alice', 'al'), 'd:al:alice');
  assert.equal(directConv('a'.repeat(64), 'b'.repeat(64)).length, 131);
  assert.throws(() => directConv('a', 'a'));
  assert.equal(FrameType.READERS_RESP, 0x13);
});
