// PimcoreClient: one device of one user over a WebSocket, following the
// reference session (pimcore/client_session.py, docs/CLIENT.md "The client
// session") for everything the protocol promises: sends with local ids that
// are retried until acked, cumulative PushAcks only after the application
// was handed the messages, resume from the stored position and epoch,
// calibration, read markers sent again until confirmed, reconnects.
//
// Runs in browsers and in Node >= 20 (`node --experimental-websocket`, or
// pass a WebSocket class such as the `ws` package's as `WebSocket`).
import {
  CAP_CONV_PURGED, CloseCode, EncodeError, ErrorCode, FrameDecoder, FrameType, MessageKind, PresenceState, ProtocolError, Setting, codeName,
  conversationProblem, directMembers, encodeBody, frame, frameBytes, showValue, validId,
} from './codec.js';
import { displayOrder } from './order.js';

/** Whether two byte arrays hold the same bytes. */
function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
/** Whether two lists of user ids name the same users (in any order). */
function sameUsers(a, b) {
  const x = new Set(a), y = new Set(b);
  return x.size === y.size && [...x].every((u) => y.has(u));
}
/**
 * A send or amend with the local id of a pending one `e` that carries another message (a local id names one
 * message): `differ`, the names of what differs, or null if one is a send and the other an amend.
 */
// A local id as this client keys it: a number when it is a safe integer, else a BigInt -- as the codec decodes a
// SendAck's (a JavaScript number holds no integer above 2**53 - 1 exactly: such ids travel as BigInt).  An option's
// localId: a safe integer (number) or a BigInt, 0..2**64 - 1; else TypeError / RangeError at the call, nothing sent.
function localIdKey(call, v) {
  if (typeof v === 'bigint') {
    if (v < 0n || v > U64_MAX) throw new RangeError(`${call}: localId must be 0..2**64-1, not ${v}`);
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }
  if (typeof v !== 'number' || !Number.isInteger(v)) {
    throw new TypeError(`${call}: localId must be an integer (a number, or a BigInt above 2**53-1), not ${showValue(v)}`);
  }
  if (v < 0) throw new RangeError(`${call}: localId must be 0..2**64-1, not ${v}`);
  if (!Number.isSafeInteger(v)) {
    throw new RangeError(`${call}: localId ${v} is above 2**53-1, where a number holds no exact integer: give it as a BigInt`
      + ' (e.g. 2n ** 60n, or BigInt of the id as text)');
  }
  return v;
}

function pendingWithAnother(call, localId, e, differ) {
  const kind = (name) => (name === 'AmendReq' ? 'an amend' : 'a send');
  const what = !differ ? `the pending one is ${kind(e.frame.name)}, this ${call === 'amend' ? 'an amend' : 'a send'}`
    : `not the same ${differ.length > 1 ? `${differ.slice(0, -1).join(', ')} and ${differ.at(-1)}` : differ[0]}`;
  return new Error(`${call}: local id ${localId} is still pending with a different message (${what}): a local id names`
    + ' one message -- repeat that one to wait for its outcome, or give this message another localId');
}

export const State = Object.freeze({
  DISCONNECTED: 'DISCONNECTED', AWAITING_LOGIN_ACK: 'AWAITING_LOGIN_ACK', CALIBRATING: 'CALIBRATING',
  ACTIVE: 'ACTIVE', CLOSED: 'CLOSED',
});

/** A send or request the broker refused for good (`code`: ErrorCode). */

/** Bytes a body of `n` bytes may grow by deflated: zlib's deflateBound
 * (any level and memory setting), the sync flush's stored block, slack. */
// A min-heap of [seq, key] pairs (seq, then key), for the lowest seq of a
// conversation's view in O(log n) (Client._addToView).
function heapLess(a, b) { return a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]); }
function heapPush(h, item) {
  let i = h.push(item) - 1;
  while (i > 0) {
    const p = (i - 1) >> 1;
    if (!heapLess(h[i], h[p])) break;
    [h[i], h[p]] = [h[p], h[i]]; i = p;
  }
}
function heapPop(h) {
  const top = h[0], last = h.pop();
  if (h.length) {
    h[0] = last;
    for (let i = 0; ;) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < h.length && heapLess(h[l], h[m])) m = l;
      if (r < h.length && heapLess(h[r], h[m])) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m], h[i]]; i = m;
    }
  }
  return top;
}

function deflateGrowth(n) {
  return Math.ceil((n + 7) / 8) + Math.ceil((n + 63) / 64) + 14;
}

export class SendError extends Error {
  constructor(code, reason = '') {
    super(`${codeName(ErrorCode, code)}${reason ? `: ${reason}` : ''}`);
    this.name = 'SendError'; this.code = code; this.reason = reason;
  }
}
/** No SendAck within the send's timeout; the message may have been stored (send again with `localId`). */
export class SendTimeout extends Error {
  constructor(localId) { super(`no SendAck for local id ${localId}`); this.name = 'SendTimeout'; this.localId = localId; }
}
/**
 * The client was closed (by the application, or Close(REPLACED/KICKED) from the broker).  For a send
 * (or amend) still pending then, `localId` is its local id: the message may have been stored; a new
 * client can send it again with that `localId` (the broker answers with the original ack if it was).
 */
export class ClientClosed extends Error {
  constructor(reason, localId = null) { super(reason); this.name = 'ClientClosed'; this.localId = localId; }
}
/** The broker refused the token (Close(AUTH_FAILED) or TOKEN_REVOKED). */
export class AuthFailed extends Error {
  constructor(reason) { super(reason); this.name = 'AuthFailed'; }
}
/**
 * The first connection failed: a URL that is not ws:// or wss://, a server that refused the WebSocket
 * upgrade, (in Node) a refused port or an unknown host, or no login within `connectTimeout` (with the
 * last attempt's reason).  The client ends.
 */
export class ConnectFailed extends Error {
  constructor(reason) { super(reason); this.name = 'ConnectFailed'; }
}
/** A history or readers request unanswered within its timeout. */
export class RequestTimeout extends Error {
  constructor(what) { super(`${what}: no answer in time`); this.name = 'RequestTimeout'; }
}

const FINAL_CODES = new Set([ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_CONVERSATION, ErrorCode.NOT_MEMBER,
  ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.DUPLICATE_CONFLICT, ErrorCode.REJECTED,
  ErrorCode.NO_SUCH_MESSAGE, ErrorCode.NOT_SENDER, ErrorCode.TOO_LATE, ErrorCode.RECALLED, ErrorCode.BAD_ACTION,
  ErrorCode.TOO_MANY_MENTIONS, ErrorCode.BAD_MENTION, ErrorCode.PURGED]);
const AMEND_KINDS = new Set([MessageKind.RECALL, MessageKind.EDIT, MessageKind.DELETE]);

// `m` -- a copy of a message from a list entry's `last` or a history page --
// as this client may hold it, given the copy it `held` (same msg_id):
// never behind it.  A deletion for oneself and a recall are final, an edit
// is newer by its server time (`edited`): an answer read before an amend
// committed can arrive after the amend's push, and a list entry's `last`
// once carried a message deleted for oneself undeleted, with its text (a
// new user's trial: it came back in view() at the next page).  Both flags
// stay set once set; the payload is the held one's when the held copy is
// further along.  Other fields are `m`'s (a list entry's position 0).  The
// Python SDK's _not_behind is the same rule.
function notBehind(held, m) {
  if (!held || held.seq !== m.seq || m.kind !== MessageKind.MESSAGE) return m;
  const deleted = !!(held.deleted || m.deleted), recalled = !!(held.recalled || m.recalled);
  const he = held.edited || 0, me = m.edited || 0;
  if (deleted || recalled) {
    if (deleted === !!m.deleted && recalled === !!m.recalled && m.payload.length === 0) return m;
    return { ...m, payload: new Uint8Array(0), deleted, recalled, edited: he > me ? he : me };
  }
  return he > me ? { ...m, payload: held.payload, edited: he } : m;
}
const QUICK_RECONNECT = new Set([CloseCode.SHUTDOWN, CloseCode.IDLE_TIMEOUT, CloseCode.TOKEN_EXPIRED, CloseCode.NORMAL]);
const utf8 = new TextEncoder();
/** The broker's limit on a frame before it grants the Login (bytes after the
 * length prefix, as max_frame counts them): pimcore.protocol.PRE_LOGIN_MAX_FRAME. */
export const PRE_LOGIN_MAX_FRAME = 64 * 1024;
/** The widest epoch a Login carries: a pimcore broker's LoginAck.epoch is 16 bytes. */
const EPOCH_BYTES = 16;
// Bytes of frames one WebSocket message carries at most when frames of one
// tick are sent together (_queueOut): the broker's WebSocketStream.MAX_MESSAGE,
// well under its limit on a message before the login (64 KiB).
const OUT_MESSAGE = 8 * 1024;
// SendReqs on the wire at once right after a reconnect that followed a link
// lost with sends unanswered (see _lost): TCP's window after a
// retransmission timeout (RFC 5681 section 3.1), here TCP's initial window of
// up to 4 segments (a window of 1 would take a round trip per send at first).
// The Python SDK's client_session.LOSS_WINDOW.
const LOSS_WINDOW = 4;
const U64_MAX = (1n << 64n) - 1n;

/** A ConnectFailed for a URL the client cannot dial (not ws:// or wss://, or no URL), else null. */
function checkUrl(url) {
  let u;
  try { u = new URL(url); } catch {
    return new ConnectFailed(`cannot connect to ${url}: not a valid URL (the client takes ws:// or wss:// URLs, e.g. ws://127.0.0.1:7480/)`);
  }
  if (u.protocol === 'ws:' || u.protocol === 'wss:') {
    // (As the Python SDK: a query or a fragment was sent as it was, or dropped, where a listener serves a path.)
    return u.search || u.hash || /[?#]/.test(url) ? new ConnectFailed(`cannot connect to ${url}: a URL to connect to has no query or fragment`) : null;
  }
  const hint = u.protocol === 'tcp:' || u.protocol === 'tls:'
    ? ` (${u.protocol}// listeners speak the raw protocol, for the Python SDK: give the broker a ws:// listener, \`pimcore serve --listen ws://127.0.0.1:7480/\`, and use that URL)`
    : '';
  return new ConnectFailed(`cannot connect to ${url}: the client takes ws:// or wss:// URLs, not ${u.protocol}//${hint}`);
}

/**
 * Why a WebSocket upgrade failed, asked again with a plain HTTP upgrade request (Node only: the
 * WebSocket API says nothing): {reason, final} (final: an HTTP refusal a retry will not change), or null.
 */
/**
 * `b` begins a pimcore frame the way a broker answers a stranger: a Close
 * (its length, a varint of 1-5 bytes, >= 2; its head, a protocol version in
 * the high nibble; the type CLOSE) -- the Python SDK's _pimcore_frame_start.
 */
function pimcoreCloseStart(b) {
  let length = 0, i = 0;
  for (; i < 5 && i < b.length; i++) {
    length += (b[i] & 0x7f) * 2 ** (7 * i);
    if (!(b[i] & 0x80)) break;
  }
  if (i >= 5 || i >= b.length) return false;
  return length >= 2 && b.length >= i + 3 && (b[i + 1] >> 4) !== 0 && b[i + 2] === FrameType.CLOSE;
}

// Node's (OpenSSL's) codes for a server certificate it does not trust.
const TLS_CERT_ERRORS = new Set(['DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'UNABLE_TO_GET_ISSUER_CERT', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'CERT_UNTRUSTED']);

async function probeUpgrade(url, ms) {
  if (!globalThis.process?.versions?.node) return null;
  const u = new URL(url);
  const name = u.protocol === 'wss:' ? 'node:https' : 'node:http';
  const http = await import(name);
  return new Promise((resolve) => {
    const req = http.request({ host: u.hostname.replace(/^\[|\]$/g, ''), port: u.port || (u.protocol === 'wss:' ? 443 : 80), path: u.pathname + u.search,
      headers: { Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': btoa(String.fromCharCode(...globalThis.crypto.getRandomValues(new Uint8Array(16)))) } });
    const timer = setTimeout(() => { req.destroy(); resolve({ reason: 'no answer to the WebSocket upgrade', final: false }); }, ms);
    req.on('upgrade', (res, socket) => { clearTimeout(timer); socket.destroy(); resolve(null); });
    req.on('response', (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { if (body.length < 300) body += d; });
      res.on('end', () => {
        clearTimeout(timer);
        const text = body.trim().split('\n')[0].slice(0, 200);
        const status = res.statusCode;
        const final = status >= 400 && status < 500 && status !== 408 && status !== 429;
        resolve({ reason: `the server refused the WebSocket upgrade with HTTP ${status}${text ? ` (${text})` : ''}`, final });
      });
    });
    req.on('error', (e) => {
      clearTimeout(timer);
      if (typeof e.code === 'string' && e.code.startsWith('HPE_')) {
        // No HTTP came back (Node's parser, with the bytes): a pimcore tcp://
        // or tls:// listener answers an upgrade with its binary Close, a TLS
        // server with a TLS record; neither will change on a retry -- say it
        // at once, as the Python SDK does (new users' trials: it waited out
        // connectTimeout, then "no answer"; it said "try tcp://", which this
        // client cannot use).
        const raw = e.rawPacket ? new Uint8Array(e.rawPacket) : new Uint8Array(0);
        let reason;
        if (raw.length >= 2 && (raw[0] === 0x15 || raw[0] === 0x16) && raw[1] === 0x03) {
          reason = `the server answered with TLS (it requires TLS: try wss://${u.host}${u.pathname}${u.search})`;
        } else if (pimcoreCloseStart(raw)) {
          reason = "the server answered the WebSocket upgrade in pimcore's binary protocol (a tcp:// or tls:// listener, for the Python SDK: this client needs the broker's ws:// or wss:// listener)";
        } else reason = 'the server answered the WebSocket upgrade with bytes that are no HTTP (it is not a WebSocket endpoint)';
        resolve({ reason, final: true });
        return;
      }
      if (typeof e.code === 'string' && (TLS_CERT_ERRORS.has(e.code) || e.code.startsWith('ERR_TLS_'))) {
        // A certificate Node does not trust will not change on a retry either (the Python SDK says it at once).
        resolve({ reason: `TLS error: ${e.message} (${e.code}) (NODE_EXTRA_CA_CERTS=ca.pem trusts a private CA)`, final: true });
        return;
      }
      const words = { ECONNREFUSED: 'connection refused', ECONNRESET: 'connection reset by peer', ENOTFOUND: `unknown host '${u.hostname}'`, ETIMEDOUT: 'connection timed out' };
      // A refused port or an unknown host fails the first connect() at once, as the Python SDK's does (a new
      // user's trial: it retried for connectTimeout, then said so); a reset or a timeout may pass.
      resolve({ reason: words[e.code] || e.message, final: e.code === 'ECONNREFUSED' || e.code === 'ENOTFOUND' });
    });
    req.end();
  });
}

// Argument checks at the call (the Python SDK's ValueError / TypeError): a
// seq or a page size out of range is a RangeError naming the call and the
// argument, one that is no integer at all a TypeError, before anything is
// sent or remembered (it was the encoder's 'Read.seq out of range for u: -1',
// or a limit of 0 the broker took as 1).
const TWO_64 = 2 ** 64;
// Why the broker refused a request about `conv` by `user` with `code`, in words, when it gave no reason of its own
// (the Python SDK's _refusal_reason): the codes of the conversation and its membership, '' for the others.
// What the broker's refusals by these codes mean, when it gave no reason of its own (a trial: they came back as
// the bare code name); the Python SDK's _CODE_WORDS.
const CODE_WORDS = new Map([
  [ErrorCode.TOO_MANY_MENTIONS, 'the message mentions more users than the broker takes (its max_mentions, 64 by default)'],
  [ErrorCode.BAD_MENTION, 'a mentioned user id is not a valid user id'],
  [ErrorCode.TOO_LATE, 'the time the broker allows for this after the message was sent has passed (its recall_window or edit_window)'],
]);
function refusalReason(code, conv, user) {
  if (CODE_WORDS.has(code)) return CODE_WORDS.get(code);
  if (code === ErrorCode.BAD_REQUEST) {
    const problem = conv == null ? null : conversationProblem(conv);
    return problem ? `invalid conversation id: ${problem}` : '';
  }
  if (code === ErrorCode.PURGED && typeof conv === 'string') {
    return `group ${showValue(conv)} was purged after this message was written: it answers deleted history and was not `
      + 'stored (the group may have been created again with other members)';
  }
  if (typeof conv !== 'string' || (code !== ErrorCode.NOT_MEMBER && code !== ErrorCode.UNKNOWN_CONVERSATION)) return '';
  const pair = directMembers(conv);
  if (code === ErrorCode.UNKNOWN_CONVERSATION) return `${pair ? 'conversation' : 'group'} ${showValue(conv)} does not exist`;
  if (pair) return `${user} is not one of the two users of the 1:1 conversation ${showValue(conv)} (${pair[0]} and ${pair[1]})`;
  return `${user} is not a member of group ${showValue(conv)}`;
}
function checkConvType(conv) {
  if (typeof conv !== 'string') throw new TypeError(`conv must be a string (a conversation id), not ${conv === null ? 'null' : typeof conv}`);
}
function checkSeq(call, name, v, min = 0) {
  if (typeof v === 'bigint') {
    if (v < BigInt(min) || v >= 1n << 64n) throw new RangeError(`${call}: ${name} must be an integer in ${min}..2**64-1, got ${v}`);
    return;
  }
  if (typeof v !== 'number') throw new TypeError(`${call}: ${name} must be an integer (a number or bigint), not ${v === null ? 'null' : typeof v}`);
  if (!Number.isInteger(v) || v < min || v >= TWO_64) throw new RangeError(`${call}: ${name} must be an integer in ${min}..2**64-1, got ${v}`);
}
// A call's options object: nothing but the names it takes (a typo was taken silently: { mention: [...] } stored
// no mention, { limt: 5 } gave 50 -- a new user's trial, as the constructor's options).
function checkCallOptions(call, opts, names) {
  if (opts == null) return;
  if (typeof opts !== 'object' || Array.isArray(opts)) throw new TypeError(`${call}: options must be an object, not ${JSON.stringify(opts)}`);
  const unknown = Object.keys(opts).filter((k) => !names.includes(k));
  if (unknown.length) throw new TypeError(`${call}: unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')} (the options: ${names.join(', ')})`);
}
function checkTimeout(call, v) {
  if (typeof v !== 'number' || !(v >= 0)) throw new TypeError(`${call}: timeout must be a number of ms >= 0, not ${JSON.stringify(v)}`);
}
function checkLimit(call, v) {
  if (typeof v !== 'number' && typeof v !== 'bigint') throw new TypeError(`${call}: limit must be an integer >= 1, not ${v === null ? 'null' : typeof v}`);
  if (typeof v === 'bigint' ? v < 1n || v >= 1n << 64n : !Number.isInteger(v) || v < 1 || v >= TWO_64) {
    throw new RangeError(`${call}: limit must be an integer >= 1, got ${v}`);
  }
}
const TOKEN_FROM = 'a JWT from `pimcore token --user USER` or your token service';
/** A token as given (or as a token function returned it: `fromFunction`): TypeError if it is no token at all, or empty. */
function checkToken(token, fromFunction = false) {
  const what = fromFunction ? 'the token function returned' : 'token';
  if (typeof token !== 'string' && !(token instanceof Uint8Array)) {
    const got = token === null ? 'null' : typeof token;
    throw new TypeError(fromFunction ? `${what} ${got}: it must return a string or Uint8Array (${TOKEN_FROM})`
      : `token must be a string, a Uint8Array or a function returning one (${TOKEN_FROM}), not ${got}`);
  }
  if (token.length === 0) {
    throw new TypeError(fromFunction ? `${what} an empty token: it must return ${TOKEN_FROM}` : `token cannot be empty: give ${TOKEN_FROM}`);
  }
  return token;
}

export function toHex(b) { return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join(''); }
export function fromHex(s) {
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** A payload as bytes: a string (UTF-8), a Uint8Array, an ArrayBuffer or any ArrayBuffer view (a DataView, a typed array). */
function payloadBytes(p) {
  if (typeof p === 'string') return utf8.encode(p);
  if (p instanceof Uint8Array) return p;
  if (p instanceof ArrayBuffer) return new Uint8Array(p);
  if (ArrayBuffer.isView(p)) return new Uint8Array(p.buffer, p.byteOffset, p.byteLength);
  throw new EncodeError(`payload must be a string, Uint8Array, ArrayBuffer or ArrayBuffer view, not ${p === null ? 'null' : typeof p}`);
}

const CLOCK_MAX = 253_402_300_799_999_999; // the last µs of the year 9999: a device clock above it is in ns

// The default device clock (µs), one per client: the wall clock read once,
// when the client is made, plus the monotonic time elapsed since
// (performance.now(); Date.now() alone where there is none).  Every deadline
// runs on this clock (send timeouts, the heartbeat, dead-link detection), so a
// wall clock stepped *forward* while the client runs (NTP, the user) must not
// be seen: read from Date.now() it fired them all at once.  Local ids still
// start from the wall clock (unique across restarts), and stamps are this clock
// plus the offset calibrated against the broker at each login -- measured
// against this clock, so a wall clock corrected meanwhile changes nothing.
function anchoredClock() {
  const perf = globalThis.performance;
  if (!perf || typeof perf.now !== 'function') return () => Date.now() * 1000;
  const wall0 = Date.now();
  const mono0 = perf.now();
  return () => (wall0 + (perf.now() - mono0)) * 1000;
}

// Frames the broker sends only in answer to something the client sent: their
// arrival proves the way up works (_lastHeard).  Pushes, read states, receipts,
// typing and presence come unasked.
const ANSWERS = new Set([FrameType.LOGIN_ACK, FrameType.CALIBRATE_RESP, FrameType.PONG, FrameType.SEND_ACK,
  FrameType.HISTORY_RESP, FrameType.READERS_RESP, FrameType.CONV_LIST_RESP, FrameType.CONV_SET_RESP]);
/** The `disconnected` reason when frames kept coming but the heartbeat Ping got no Pong. */
export const NO_HEARTBEAT_ANSWER = 'no answer to the heartbeat Ping, though the broker kept sending: it does not hear us (dead link)';

const DEFAULTS = {
  device: 'web',
  position: 0,
  epoch: null, // Uint8Array or hex string: the LoginAck.epoch `position` came from
  compression: null, // e.g. deflateCompression from './deflate.js'; null = Login.caps 0
  ackTimeout: 5000, // ms: time out a calibration sample; the most a Ping waits (with the heartbeat)
  sendTimeout: 60000, // ms: a send (or history/readers request) fails with SendTimeout
  connectTimeout: 10000, // ms: no LoginAck -> drop the connection and retry; the first connect() gives up after it (ConnectFailed)
  ackDelay: 20, // ms: PushAcks are batched this long
  timeSamples: 5,
  backoffInitial: 100, // ms
  backoffMax: 10000, // ms
  deadAfter: 3, // heartbeat intervals of silence from the broker -> dead link
  viewLimit: 1000,
  typingInterval: 2500, // ms: while the user types, typing() sends at most one Typing per conv per interval
  reconnect: true,
  now: null, // µs (an integer; a fraction is floored), the device clock messages are stamped with; null = anchoredClock()
};

// The options without a default (DEFAULTS has the others).
const OPTIONS = new Set(['url', 'token', 'WebSocket']);
// Every event on() takes (index.d.ts ClientEvents).
const EVENTS = new Set(['connected', 'disconnected', 'message', 'amended', 'sent', 'readstate', 'receipt', 'conversation',
  'purged', 'resynced', 'sendsStalled', 'sendsResumed', 'error', 'brokerRefused', 'closed', 'state', 'typing', 'presence', 'privacy']);

// Option values, checked by the constructor (a new user's trial: viewLimit -1 made every push throw, device 5
// crashed Node at connect(), connectTimeout '100' and reconnect 'no' were taken as they were).
function checkOptions(o) {
  for (const name of ['ackTimeout', 'sendTimeout', 'connectTimeout', 'ackDelay', 'backoffInitial', 'backoffMax', 'typingInterval']) {
    const v = o[name];
    if (typeof v !== 'number' || Number.isNaN(v)) throw new TypeError(`${name} must be a number of ms, not ${JSON.stringify(v)}`);
    if (!(v >= 0)) throw new RangeError(`${name} must be a number of ms >= 0, not ${v}`);
  }
  if (typeof o.deadAfter !== 'number' || !(o.deadAfter > 0)) {
    throw new RangeError(`deadAfter must be a number > 0 (heartbeat intervals), not ${JSON.stringify(o.deadAfter)}`);
  }
  for (const name of ['viewLimit', 'timeSamples']) {
    if (!Number.isSafeInteger(o[name]) || o[name] < 0) throw new RangeError(`${name} must be an integer >= 0, not ${JSON.stringify(o[name])}`);
  }
  if (typeof o.reconnect !== 'boolean') throw new TypeError(`reconnect must be true or false, not ${JSON.stringify(o.reconnect)}`);
  if (typeof o.device !== 'string') throw new TypeError(`device must be a string (this installation's id), not ${JSON.stringify(o.device)}`);
  // (The broker refuses it at login, which the client said as AuthFailed -- "authentication": a new user's trial.)
  if (!validId(o.device)) throw new RangeError(`device ${showValue(o.device)} is no device id: 1-64 ASCII characters from A-Z a-z 0-9 _ . @ -`);
  const z = o.compression;
  if (z != null && !(typeof z === 'object' && Number.isInteger(z.caps) && typeof z.createInflater === 'function' && typeof z.createDeflater === 'function')) {
    throw new TypeError('compression must be null or a compression from ./deflate.js (deflateCompression, deflateCompressionWith(pako))');
  }
}

/**
 * One device of one user.  Events (`on(name, fn)`): connected, disconnected,
 * message, amended, sent, readstate, receipt, conversation, purged, resynced,
 * sendsStalled, sendsResumed, error, brokerRefused, closed, state, typing,
 * presence, privacy.  See index.d.ts for the shapes.  An unknown option is a
 * TypeError.
 */
export class PimcoreClient {
  constructor(options) {
    // A misspelt option would be ignored, its default used (a new user's trial: connectTimout).
    const unknown = Object.keys(options || {}).filter((k) => !(k in DEFAULTS) && !OPTIONS.has(k));
    if (unknown.length) {
      throw new TypeError(`unknown option${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')} (the options: ${[...OPTIONS, ...Object.keys(DEFAULTS)].join(', ')})`);
    }
    this.opts = { ...DEFAULTS, ...options };
    checkOptions(this.opts);
    // now() is µs; wire times are integers, so a fractional clock (e.g.
    // (performance.timeOrigin + performance.now()) * 1000) is floored here.
    const clock = this.opts.now ?? anchoredClock();
    if (typeof clock !== 'function') throw new TypeError('now must be a function returning µs');
    this.opts.now = () => {
      const v = clock();
      // (NaN reached the Login's encoder, which threw outside connect()'s promise: Node exited -- a trial.)
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`now() must return µs (a finite number), not ${v}`);
      // (A clock at 0 or below hung sends, or restarted local ids at 1 on every run: a new user's trial.)
      if (!(v >= 1)) throw new RangeError(`now() must return µs since 1970 (>= 1), not ${v}`);
      // (One in ns was taken: deadlines ran 1000x fast and stamps were years ahead -- a trial.  No check for ms:
      // a device whose clock lost its battery reads 1970.)
      if (v > CLOCK_MAX) throw new RangeError(`now() must return µs since 1970, not ns: ${v} is after the year 9999 (e.g. Date.now() * 1000)`);
      return Math.floor(v);
    };
    // Timers run on session time (_sessionNow): the device clock plus a skew, never backwards.
    this._t = -Infinity; this._skew = 0; this._rawNow = 0;
    if (!this.opts.url) throw new TypeError('url is required');
    if (this.opts.token == null) throw new TypeError(`token is required (a string, or a function returning one: ${TOKEN_FROM})`);
    if (typeof this.opts.token !== 'function') checkToken(this.opts.token);
    this.WebSocket = this.opts.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError('no WebSocket: pass options.WebSocket (Node 20: run with --experimental-websocket)');
    this.device = this.opts.device;
    this.user = null;
    this.state = State.DISCONNECTED;
    this.error = null;
    // The saved cursor, checked here (a bad one was an EncodeError thrown from
    // the socket's open handler, which no caller could catch: a new user's trial).
    const ep = this.opts.epoch;
    if (ep != null && !(ep instanceof Uint8Array) && !(typeof ep === 'string' && /^([0-9a-fA-F]{2})*$/.test(ep))) {
      throw new TypeError(`epoch must be a Uint8Array or a hex string (as saved from client.epoch), not ${JSON.stringify(ep)}`);
    }
    this.epoch = ep == null ? new Uint8Array(0) : typeof ep === 'string' ? fromHex(ep) : ep;
    if (this.epoch.length && this.epoch.length !== EPOCH_BYTES) {
      // (The broker knows no such epoch: the login would resync the device, every message of its inbox again.)
      throw new RangeError(`epoch must be ${EPOCH_BYTES} bytes (LoginAck.epoch, as saved from client.epoch) or empty (a fresh install), not ${this.epoch.length} bytes`);
    }
    let pos = this.opts.position;
    if (typeof pos === 'bigint' && pos >= 0n && pos <= BigInt(Number.MAX_SAFE_INTEGER)) pos = Number(pos);
    if (!(Number.isSafeInteger(pos) && pos >= 0)) {
      throw new RangeError(`position must be an integer in 0..2**53-1 (an inbox position, as saved from client.takenUpto), not ${typeof pos === 'bigint' ? pos : JSON.stringify(pos)}`);
    }
    // Positions (docs/CLIENT.md "Receiving"): taken = handed to the app = what Login.position carries.
    this.takenUpto = pos;
    this.ackedUpto = 0;
    this.clockOffset = 0; // µs: server clock - device clock
    this.rtt = -1;
    this._listeners = new Map();
    this._pending = new Map(); // local id -> send entry
    this._expired = new Map(); // local id -> {conv, client_time, after_seq} of a send that timed out (for its retry)
    this._lastLocalId = 0n; // (a BigInt: local ids run to 2**64 - 1)
    this._localIdBase = 0; // µs: the clock at this run's first local id of its own (_newLocalId)
    this._lastStamp = 0;
    // Congestion control (the Python SDK's ClientSession; CLIENT.md "Back-pressure"):
    // the window (_cwnd, <= LoginAck.window) is halved once per congestion
    // event and grows by one per answered send (AIMD), kept across reconnects.
    // A congestion event is the first refusal of a transmission made after
    // the last one (_tx > _recover): a window's refusals answer one burst.
    // A link lost with sends on it restarts the window at LOSS_WINDOW with
    // _ssthresh at half the sends that were on the wire (TCP's retransmission
    // timeout, RFC 5681 section 3.1; see _lost): +1 per answer below
    // _ssthresh (slow start), +1/_cwnd at or above it (congestion avoidance).
    this._cwnd = 65536;
    this._ssthresh = Infinity; // no loss yet: slow start up to LoginAck.window
    this._tx = 0; this._recover = 0; this._holdUntil = 0; this._holdTimer = null;
    this._refusals = 0; // congestion events since the last answered send (the hold's exponent)
    this._episodeAt = 0; this._episodeBackoff = 0; // session time of the current event; its jittered backoff (µs)
    // The broker's acceptance rate, learned from its refusals (it does not
    // announce its send_rate): sends answered between two congestion events
    // / the time between them -- between two moments its bucket was empty,
    // what it took is what it refilled.
    this._answers = 0; // sends answered (OK or final)
    this._rateMark = { at: 0, answers: 0 }; // where the current sample began
    this._rate = 0; // answers per µs; 0 = no sample yet
    this._stall = null;
    this._seen = new Map(); // conv -> highest seq seen (after_seq of the next send)
    this._readStates = new Map();
    // conv -> the highest seq a read state's unread count accounts for (the
    // broker's last ReadState, the messages pushed since), kept apart from
    // the last seq shown: an own send raises that, and others' messages
    // stored just before it (lower seqs) may be pushed after its SendAck.
    this._counted = new Map();
    this._loginStates = 0; // the login's read state entries still to come (LoginAck.states)
    this._loginPrior = new Set(); // conversations held before that login
    this._loginSeen = new Set(); // those its read states named
    this._wanted = new Map(); // conv -> read marker not yet confirmed
    this._receipts = new Map();
    this._views = new Map();
    this._purgeTold = new Map(); // conv -> the purge point last emitted ('purged' once each)
    // Per conversation, [seq, key] of every message put in its view, a
    // min-heap (heapPush): once the view is full each message taken drops
    // the lowest seq in O(log n) -- sorting the whole view per message made
    // a catch-up of thousands of messages crawl.  Entries whose message
    // left the view are skipped when they come up.
    this._viewHeaps = new Map();
    // Per conversation, seq -> msg_id key of each message (kind MESSAGE) in its
    // view: a recall, edit or delete finds its target by seq, not by a scan.
    this._viewSeqs = new Map();
    this._requests = new Map(); // req id -> history / readers request
    this._nextReqId = 1;
    // typing and presence (ephemeral; PROTOCOL.md "Typing and presence")
    this._typingSent = new Map(); // conv -> device time (µs) of the last active Typing sent
    this._typingSeen = new Map(); // `${conv}\n${user}` -> {conv, user, until (µs, device clock)}
    this._presenceWanted = null; // {reqId, users}: sent again after every reconnect
    this._presenceUsers = []; // the users of the subscription the broker accepted last
    this._presenceWaiting = []; // [{reqId, resolve, reject, deadline}]
    this._privacyWaiting = []; // [{mode, resolve, reject, deadline}]
    this.presence = new Map(); // user -> {user, state, last_seen} (UNKNOWN while disconnected)
    this.hideLastSeen = null; // this user's setting, once the broker told it
    this._ws = null;
    this._out = null; // {ws, parts, size}: frames of this tick not yet sent (_queueOut)
    this._attempt = 0;
    this._quick = false; // the last dial was an immediate redial after a clean close
    this._reconnectTimer = null;
    this._ackTimer = null;
    this._ticker = null;
    this._connectWaiters = [];
    // One 100 ms ticker runs every timer (deadlines, holds, heartbeat);
    // it holds a Node process open only while a send or request waits.
    this._ticker = setInterval(() => this._tick(), 100);
    this._ticker.unref?.();
    this.stats = { connects: 0, retransmits: 0, duplicatesDropped: 0, acksSent: 0, framesIn: 0, framesOut: 0, congestionEvents: 0 };
  }

  // ------------------------------------------------------------ events
  on(name, fn) {
    // (A misspelt event would never fire; a listener that is no function threw later, from a timer: Node exits.)
    if (!EVENTS.has(name)) throw new TypeError(`unknown event ${showValue(name)} (the events: ${[...EVENTS].join(', ')})`);
    if (typeof fn !== 'function') throw new TypeError(`on(${showValue(name)}): the listener must be a function, not ${fn === null ? 'null' : typeof fn}`);
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name).delete(fn);
  }
  // A local id of the client's own: consecutive within this run, from the
  // clock at its first (a burst's sends are then one dedupe record per batch
  // in the broker's store; from the clock each time they never were).
  // Unique across restarts while the clock does not go back by more than the
  // time between the two runs' first sends less the earlier run's sends.
  // Only the send path assigns _lastLocalId (after the frame is built).
  _newLocalId(raw, call) {
    if (!this._localIdBase) this._localIdBase = raw;
    let next = this._lastLocalId + 1n;
    const base = BigInt(Math.trunc(this._localIdBase));
    if (base > next) next = base;
    if (next > U64_MAX) throw new RangeError(`${call}: no local id is left above the last one taken (2**64-1): give localId`);
    return next <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(next) : next;
  }

  _emit(name, ev) {
    const fns = this._listeners.get(name);
    if (!fns) return;
    for (const fn of [...fns]) {
      try { fn(ev); } catch (e) { setTimeout(() => { throw e; }); } // an app bug must not break the protocol
    }
  }
  _setState(s) { if (this.state !== s) { this.state = s; this._emit('state', s); } }

  // ------------------------------------------------------------ lifecycle
  /**
   * Connect (and keep reconnecting); resolves at the first login, rejects with AuthFailed / ClientClosed,
   * or with the token function's own error when it fails before the first login (the client ends).
   * What the broker sends with the login (the catch-up) is handed to the listeners only on a later
   * turn of the event loop, after the code following `await connect()` ran: a 'message' listener
   * attached right there gets every message (none is taken, and acked, before).
   */
  connect() {
    try { return this._connect(); } catch (e) { this._terminate(e); return Promise.reject(e); } // (a bad clock: see the constructor)
  }
  _connect() {
    if (this.state === State.CLOSED) return Promise.reject(this.error);
    // Connected already: this login's 'connected' event again (a second call waited for the next login).
    if (this.state === State.ACTIVE && this._connected) return Promise.resolve(this._connected);
    const bad = checkUrl(this.opts.url);
    if (bad) { this._terminate(bad); return Promise.reject(bad); }
    // The first connection gives up at connectTimeout (as the Python SDK's):
    // ConnectFailed with the last attempt's reason.
    if (this.stats.connects === 0 && this._firstDeadline == null) this._firstDeadline = this._sessionNow() + this.opts.connectTimeout * 1000;
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    this._refTicker();
    if (!this._ws && !this._reconnectTimer) this._dial();
    return p;
  }

  /** Hang up the current connection (e.g. the browser went offline); reconnects with backoff. */
  dropConnection(reason = 'dropped by the application') {
    if (this._ws) this._lost(null, reason);
  }

  /** Reconnect now if waiting to (e.g. the browser came back online). */
  reconnectNow() {
    if (this.state === State.CLOSED || this._ws) return;
    clearTimeout(this._reconnectTimer); this._reconnectTimer = null;
    this._dial();
  }

  /**
   * PushAck what was taken, Close(NORMAL), stop.  Pending sends fail with ClientClosed carrying their
   * `localId` (they may have been stored: send again with it from a new client).
   */
  async close() {
    if (this.state === State.CLOSED) return;
    const ws = this._ws;
    if (ws && this.state === State.ACTIVE && this.takenUpto > this.ackedUpto) this._sendFrame(frame('PushAck', { position: this.takenUpto }));
    if (ws) this._sendFrame(frame('Close', { code: CloseCode.NORMAL, reason: 'client closing' }));
    this._terminate(new ClientClosed('client closed'));
    if (ws) {
      await new Promise((resolve) => {
        const t = setTimeout(resolve, 1000);
        if (ws.readyState === 3 || !ws.addEventListener) { clearTimeout(t); resolve(); return; }
        ws.addEventListener('close', () => { clearTimeout(t); resolve(); });
      });
    }
  }

  _terminate(err) {
    this.error = err;
    this._detach();
    this._setState(State.CLOSED);
    clearInterval(this._ticker); this._ticker = null;
    clearTimeout(this._reconnectTimer); this._reconnectTimer = null;
    clearTimeout(this._ackTimer); this._ackTimer = null;
    clearTimeout(this._holdTimer); this._holdTimer = null;
    for (const e of this._pending.values()) e.reject(err instanceof ClientClosed ? new ClientClosed(err.message, e.localId) : err);
    this._pending.clear();
    for (const r of this._requests.values()) r.reject(err);
    this._requests.clear();
    for (const w of this._presenceWaiting.splice(0)) w.reject(err);
    for (const w of this._privacyWaiting.splice(0)) w.reject(err);
    for (const w of this._connectWaiters.splice(0)) w.reject(err);
    // Nothing will tell this client of presence any more: as on a dropped
    // connection, no entry goes on claiming ONLINE or OFFLINE.
    this._presenceUnknown();
    this._emit('closed', err);
  }

  async _dial() {
    // (A local error here -- a clock gone bad -- ends the client, rejecting connect(): an async function's throw was
    // an unhandled rejection, which exits Node.)
    try { await this._dialOnce(); } catch (e) { if (this.state !== State.CLOSED) this._terminate(e); }
  }
  async _dialOnce() {
    if (this.state === State.CLOSED) return;
    let token = this.opts.token;
    if (typeof token === 'function') {
      try { token = checkToken(await token(), true); } catch (e) {
        // Before the first login a failing token function is the app's
        // answer (e.g. its token endpoint refused the user id): connect()
        // rejects with it and the client ends.  After a login it is most
        // likely the outage itself: retried with the backoff.
        if (this.stats.connects === 0) { this._terminate(e); return; }
        this._scheduleReconnect(false); return;
      }
    }
    if (this.state === State.CLOSED || this._ws) return;
    // A token whose Login could be over the broker's pre-login limit (the
    // largest this client will send for it, a reconnect's) is never sent --
    // the broker would close every attempt, FRAME_TOO_LARGE -- checked
    // before every dial (a token function may return another token each
    // time): connect() rejects at once, saying so, or after a login the
    // client ends with that error ('closed'), not a reconnect loop.
    const tooLarge = this._loginTooLarge(token);
    if (tooLarge) { this._terminate(new ConnectFailed(`cannot connect to ${this.opts.url}: ${tooLarge}`)); return; }
    let ws;
    try { ws = new this.WebSocket(this.opts.url); } catch (e) {
      if (this.stats.connects === 0) { this._terminate(new ConnectFailed(`cannot connect to ${this.opts.url}: ${e.message}`)); return; }
      this._scheduleReconnect(false); return;
    }
    ws.binaryType = 'arraybuffer';
    this._ws = ws;
    const now = this._sessionNow();
    this._conn = { opened: false, active: false, openedAt: now, closeFrame: null };
    this._loginDeadline = now + this.opts.connectTimeout * 1000;
    ws.onopen = () => { if (this._ws === ws) this._connectionMade(token); };
    ws.onmessage = (ev) => { if (this._ws === ws) this._receive(new Uint8Array(ev.data)); };
    ws.onclose = () => { if (this._ws === ws) this._failed(ws, 'connection closed'); };
    // Browsers follow an error with a close event; Node 20's WebSocket may not.
    ws.onerror = () => { if (this._ws === ws) this._failed(ws, 'connection failed'); };
  }

  // A connection ended by the transport.  Before the first login, one that
  // never opened is asked why (Node: refused, an HTTP status; browsers do
  // not say): the reason the first connect() gives up with.
  _failed(ws, reason) {
    const opened = this._conn && this._conn.opened;
    this._lost(null, reason);
    if (opened || this.stats.connects > 0 || this.state === State.CLOSED) return;
    // (Kept from an earlier attempt until this one's answer: the probe may be
    // slower than the last retry at the deadline.)
    this._lastAttempt ??= 'no WebSocket connection (the WebSocket API gives no reason)';
    const left = Math.max(1000, (this._firstDeadline - this._sessionNow()) / 1000);
    probeUpgrade(this.opts.url, Math.min(5000, left)).then((why) => {
      if (!why || this.state === State.CLOSED || this.stats.connects > 0) return;
      this._lastAttempt = why.reason;
      // A refused upgrade (404: the wrong path) will not change on a retry.
      if (why.final) this._terminate(new ConnectFailed(`cannot connect to ${this.opts.url}: ${why.reason}`));
    }, () => {});
  }

  _giveUp(now) {
    let why = this._lastAttempt || 'no answer';
    if (this._ws && this._conn) why = this._conn.opened ? 'no LoginAck (is it a pimcore broker?)' : 'no answer to the WebSocket upgrade';
    const s = this.opts.connectTimeout / 1000;
    this._terminate(new ConnectFailed(`cannot connect to ${this.opts.url} within ${s} s (connectTimeout): ${why}`));
  }

  _detach() {
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._flushOut(); // (a Close or PushAck queued in this tick goes out before the socket's close)
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      if (this.state !== State.CLOSED) { try { ws.close(); } catch { /* already closing */ } }
    }
    for (const e of this._pending.values()) e.inFlight = false;
  }

  _lost(code, reason) {
    const wasActive = this._conn && this._conn.active;
    let inFlight = 0;
    for (const e of this._pending.values()) if (e.inFlight) inFlight++;
    if (inFlight > 0 && code == null && this.state !== State.CLOSED) {
      // Lost (transport closed or failed, dead link: not the broker's Close)
      // with sends unanswered on it: TCP's retransmission timeout (RFC 5681
      // section 3.1) -- ssthresh = max(FlightSize / 2, 2), the window back
      // to the loss window, then slow start.  Without it every reconnect
      // wrote the whole window again (256 SendReqs), cut again on a link
      // that drops every few KiB (a trial: 83 of 600 sent in 60 s).  They go
      // again oldest first (_fill: local-id order, PROTOCOL.md section 6).
      // Nothing in flight: no sign of loss, the window stays.
      this._ssthresh = Math.max(inFlight / 2, 2);
      this._cwnd = Math.min(this._cwnd, this._window || LOSS_WINDOW, LOSS_WINDOW);
    }
    const lived = this._conn ? this._sessionNow() - this._conn.openedAt : 0;
    this._detach();
    if (this.state === State.CLOSED) return;
    this._setState(State.DISCONNECTED);
    this.lastDisconnect = { code, reason };
    this._emit('disconnected', { code, reason });
    this._presenceUnknown();
    this._scheduleReconnect(wasActive, code, lived);
  }

  // The reconnect backoff (the Python SDK's ReconnectBackoff; CLIENT.md
  // "Reconnect backoff"): a connection that completed its login and then
  // failed in transport (code null) resets it -- the next dial waits
  // backoffInitial, jittered; a working session the broker closed with a
  // QUICK_RECONNECT code is redialled at once -- unless the dial before was
  // such an immediate redial too and this session lived less than
  // backoffMax (no tight loop against a broker closing every login);
  // anything else (a dial, token or login failure, OVERLOADED, RATE_LIMITED,
  // ... which ask clients to wait) doubles the delay.
  _scheduleReconnect(established, code = null, lived = 0) {
    if (!this.opts.reconnect || this.state === State.CLOSED) return;
    let delay = 0;
    const clean = established && code != null && QUICK_RECONNECT.has(code);
    if (clean && (!this._quick || lived >= this.opts.backoffMax * 1000)) {
      this._quick = true;
      this._attempt = 0;
    } else {
      if (!clean) this._quick = false;
      this._attempt = established && code == null ? 0 : Math.min(this._attempt + 1, 30);
      delay = Math.min(this.opts.backoffMax, this.opts.backoffInitial * 2 ** Math.min(this._attempt, 16)) * (0.5 + Math.random());
    }
    // The first connection: a last attempt at its deadline, not a sleep past it.
    if (this.stats.connects === 0 && this._firstDeadline != null) delay = Math.min(delay, Math.max(0, (this._firstDeadline - this._sessionNow()) / 1000));
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => { this._reconnectTimer = null; this._dial(); }, delay);
  }

  // ------------------------------------------------------------ wire
  /**
   * Why a Login for `token` could be over the broker's pre-login limit, in
   * words, or null.  The largest Login this client will ever send for it
   * counts: after a login a reconnect's also carries the epoch and the inbox
   * position, here at their widest encodings (a 16-byte epoch, or this
   * session's if longer; a position of 2**64 - 1), so a token that fits the
   * first connection cannot fail on a later one.
   */
  _loginTooLarge(token) {
    const tok = typeof token === 'string' ? utf8.encode(token) : token;
    const caps = (this.opts.compression ? this.opts.compression.caps : 0) | CAP_CONV_PURGED;
    this._sessionNow(); // (sets _rawNow: the Login's client_time, as _connectionMade sends it)
    const epoch = new Uint8Array(Math.max(this.epoch ? this.epoch.length : 0, EPOCH_BYTES));
    const body = encodeBody(frame('Login', { token: tok, device: this.device, client_time: this._rawNow, position: U64_MAX, caps, epoch, sent: 0 }));
    const len = 2 + body.length; // head + type + body: what the limit counts
    if (len <= PRE_LOGIN_MAX_FRAME) return null;
    const n = (x) => x.toLocaleString('en-US');
    return `the token is ${n(tok.length)} bytes: its Login frame (${n(len)} bytes at most: a reconnect's carries the epoch`
      + ` and the inbox position) is over the broker's pre-login limit (${n(PRE_LOGIN_MAX_FRAME)} bytes: a frame before the`
      + ' Login is granted)';
  }

  _connectionMade(token) {
    const now = this._sessionNow();
    const raw = this._rawNow; // Login and calibration carry the device clock
    this._decoder = new FrameDecoder({ maxFrameSize: 1 << 20 });
    this._deflate = null;
    this._window = 1;
    this._heartbeat = 0;
    this._lastSent = this._lastRecv = this._lastHeard = now;
    this._ping = null;
    this._held = [];
    this._deferred = null;
    this._calib = { t0: raw, deadline: now + this.opts.connectTimeout * 1000, taken: 0, login: true };
    this._conn.opened = true;
    this._loginDeadline = now + this.opts.connectTimeout * 1000;
    this._setState(State.AWAITING_LOGIN_ACK);
    const tok = typeof token === 'string' ? utf8.encode(token) : token;
    const caps = (this.opts.compression ? this.opts.compression.caps : 0) | CAP_CONV_PURGED;
    this._sendFrame(frame('Login', { token: tok, device: this.device, client_time: raw, position: this.takenUpto, caps, epoch: this.epoch,
      // Login.sent: 0, as this client takes what a Push brings on receipt
      // (its listeners run then), so its position covers its own sends.
      sent: 0 }));
    this._sendFrame(frame('CalibrateReq', { client_time: raw }));
  }

  _sendFrame(f) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    const body = f._body || encodeBody(f);
    let bytes;
    // Deflated, a body that does not compress grows (zlib's bound): one that
    // might then be over the broker's max_frame goes out as it is (outside
    // the stream, PROTOCOL.md 7.2), or the broker would close the connection
    // and every retry send the same frame.
    const maxFrame = this.loginAck ? this.loginAck.max_frame : 0;
    if (this._deflate && body.length >= (this.opts.compression.minBody || 16)
        && !(maxFrame > 0 && 2 + body.length + deflateGrowth(body.length) > maxFrame)) {
      bytes = frameBytes(f.type, this._deflate(body), 1);
    } else bytes = frameBytes(f.type, body);
    this._queueOut(ws, bytes);
    this._lastSent = this._sessionNow();
    this.stats.framesOut++;
    return true;
  }

  // The frames of one tick go out as one WebSocket message (up to OUT_MESSAGE
  // bytes; a larger frame alone): the broker pays for a logged-in peer's
  // messages from a bucket (512 a second past a burst of 1,024, PROTOCOL.md),
  // as each costs it a parse and a hop whatever its size, and a window of
  // SendReqs refilled by one message of SendAcks is one message, not dozens.
  // A frame alone in its tick is a message of its own, as before.
  _queueOut(ws, bytes) {
    const out = this._out;
    if (out && out.ws === ws && out.size + bytes.length <= OUT_MESSAGE) {
      out.parts.push(bytes);
      out.size += bytes.length;
      return;
    }
    this._flushOut(); // (another socket's, or full: what came before goes first)
    this._out = { ws, parts: [bytes], size: bytes.length };
    queueMicrotask(() => this._flushOut());
  }

  _flushOut() {
    const out = this._out;
    if (!out) return;
    this._out = null;
    if (out.ws.readyState !== 1) return; // (closed since: lost with it, as a frame sent just before would be)
    let data = out.parts[0];
    if (out.parts.length > 1) {
      data = new Uint8Array(out.size);
      let at = 0;
      for (const p of out.parts) { data.set(p, at); at += p.length; }
    }
    out.ws.send(data);
  }

  _receive(data) {
    const now = this._sessionNow();
    this._lastRecv = now;
    const dec = this._decoder;
    dec.push(data);
    for (let whole = 0; ; whole++) {
      let f;
      try {
        f = dec.next();
      } catch (e) {
        this._sendFrame(frame('Close', { code: CloseCode.PROTOCOL_ERROR, reason: e.message.slice(0, 200) }));
        this._lost(null, `malformed data from the broker: ${e.message}`);
        return;
      }
      if (!f) {
        // Bytes of a frame still arriving (one Push can take longer than an
        // interval on a slow way down): the Pong may be behind it.
        if (!whole && this._ping) this._ping.backlogAt = now;
        return;
      }
      this._handle(f, now);
      if (!this._ws || this._decoder !== dec) return; // processing stops the moment the connection ends
    }
  }

  _handle(f, now) {
    this.stats.framesIn++;
    if (ANSWERS.has(f.type)) this._lastHeard = now; // the broker hears us (a Ping needs one: _tick)
    else if (f.type === FrameType.PUSH && this._ping && f.messages && f.messages.length) {
      // Messages stored before the Ping's send time on the broker's clock
      // (plus the Pong's timeout) may be queued ahead of its Pong: each such
      // push gives the Pong another interval (a slow way down draining a
      // backlog).  Ones stored later were queued after it: no more time.
      const newest = Math.max(...f.messages.map((m) => Number(m.server_time)));
      if (newest <= this._ping.server + this._pongTimeout()) this._ping.backlogAt = now;
    }
    const st = this.state;
    if (f.type === FrameType.CLOSE) { this._onClose(f); return; }
    if (f.type === FrameType.PING && st !== State.CALIBRATING) { this._sendFrame(frame('Pong', { nonce: f.nonce })); return; }
    if (st === State.AWAITING_LOGIN_ACK) {
      if (f.type === FrameType.LOGIN_ACK) this._onLoginAck(f, now);
      return;
    }
    if (st === State.CALIBRATING) {
      if (f.type === FrameType.CALIBRATE_RESP && f.client_time === this._calib.t0) {
        this._sample(f);
        this._establish(now);
      } else this._held.push(f);
      return;
    }
    if (st !== State.ACTIVE) return;
    if (this._deferred) { this._deferred.push(f); return; } // connect() resolves first (_establish)
    switch (f.type) {
      case FrameType.CALIBRATE_RESP:
        if (this._calib && f.client_time === this._calib.t0) { this._sample(f); this._nextSample(now); }
        break;
      case FrameType.SEND_ACK: this._onSendAck(f, now); break;
      case FrameType.PUSH: this._onPush(f, now); break;
      case FrameType.READ_STATES: this._onReadStates(f); break;
      case FrameType.READ_RECEIPT: this._onReceipt(f); break;
      case FrameType.HISTORY_RESP: case FrameType.READERS_RESP: this._onResponse(f); break;
      case FrameType.CONV_LIST_RESP: case FrameType.CONV_SET_RESP: this._onResponse(f); break;
      // (The entry as this client may show it: its `last` never behind the copy held.)
      case FrameType.CONV_UPDATE: for (const e of f.entries) this._emit('conversation', this._notBehindEntry(e)); break;
      case FrameType.CONV_PURGED: this._onConvPurged(f); break;
      case FrameType.PONG: if (this._ping && f.nonce === this._ping.nonce) this._ping = null; break;
      case FrameType.TYPING: this._onTyping(f, now); break;
      case FrameType.PRESENCE: this._onPresence(f); break;
      case FrameType.PRESENCE_PRIVACY: this._onPrivacy(f); break;
      case FrameType.ERROR: this._onError(f); break;
      default: break;
    }
  }

  // Every Error frame is an 'error' event, as it came.  One that explains a
  // pending send's refusal (ref = its local id; its SendAck follows) gives
  // that send's SendError its reason.  One nothing waits for (ref 0: a Read
  // has no request id, nor does Typing or PresencePrivacy) is the only word
  // the app gets of that refusal: a 'brokerRefused' event (the Python SDK's
  // BrokerRefused).  TYPING_NOT_RELAYED is expected in large groups: not one.
  _onError(f) {
    this._emit('error', { code: f.code, ref: f.ref, reason: f.reason });
    const e = f.ref ? this._pending.get(f.ref) : undefined;
    if (e) { e.reason = f.reason; return; }
    if (f.code === ErrorCode.TYPING_NOT_RELAYED) return;
    this._emit('brokerRefused', { code: f.code, codeName: codeName(ErrorCode, f.code), ref: f.ref, reason: f.reason });
  }

  _onClose(f) {
    const code = Object.values(CloseCode).includes(f.code) ? f.code : null;
    const reason = f.reason;
    if (code === CloseCode.AUTH_FAILED || code === CloseCode.TOKEN_REVOKED) {
      this._lost(code, reason);
      this._terminate(new AuthFailed(reason));
    } else if (code === CloseCode.REPLACED || code === CloseCode.KICKED) {
      this._lost(code, reason);
      this._terminate(new ClientClosed(`${codeName(CloseCode, code)}: ${reason}`));
    } else this._lost(code, reason);
  }

  _onLoginAck(f, now) {
    this.user = f.user;
    this.loginAck = f;
    this._window = Math.max(1, f.window);
    this._heartbeat = f.heartbeat_ms * 1000;
    this._decoder.maxFrameSize = Math.max(this._decoder.maxFrameSize, f.max_frame);
    this.maxPayload = f.max_payload;
    const comp = this.opts.compression;
    const granted = comp ? (f.caps & comp.caps) : 0;
    if (granted & 2) this._decoder.inflate = comp.createInflater(); // CAP_DEFLATE_DOWN
    if (granted & 4) this._deflate = comp.createDeflater(); // CAP_DEFLATE_UP
    this.compressionCaps = granted;
    if (f.resync) {
      // The broker does not vouch for our cursor: drop every cursor we hold
      // and rebuild from this session; pending sends go again (same local ids).
      const old = this.epoch;
      this.takenUpto = f.position;
      this._seen.clear(); this._wanted.clear(); this._readStates.clear(); this._counted.clear(); this._receipts.clear(); this._views.clear(); this._viewHeaps.clear(); this._viewSeqs.clear();
      this._emit('resynced', { oldEpoch: old, epoch: f.epoch, position: f.position });
    }
    this.epoch = f.epoch;
    // The login's read states (LoginAck.states entries, the first from here
    // on) cover every conversation of the user's list: once they came, the
    // state held before of any other is dropped (a group purged while this
    // device was away kept its unread count for good: a new user's trial).
    this._loginStates = f.states || 0;
    this._loginPrior = new Set(this._readStates.keys());
    this._loginSeen = new Set();
    if (!this._loginStates) this._dropUnlisted();
    this.takenUpto = Math.max(this.takenUpto, f.position);
    this.ackedUpto = f.position;
    this.head = f.head;
    this.gap = f.gap;
    this.stats.connects++;
    this._setState(State.CALIBRATING);
    this._calib.deadline = now + this.opts.ackTimeout * 1000;
  }

  _sample(f) {
    // On the device clock (the one CalibrateReq.client_time carried), as read for this frame.
    const t0 = this._calib.t0, t1 = this._rawNow;
    const rtt = Math.max(0, t1 - t0);
    const offset = Math.floor(f.server_time - (t0 + t1) / 2);
    const c = this._calib;
    c.taken++;
    if (!c.best || rtt < c.best.rtt || (rtt === c.best.rtt && offset < c.best.offset)) c.best = { rtt, offset };
    this.clockOffset = c.best.offset; this.rtt = c.best.rtt;
    c.t0 = null;
  }

  _nextSample(now) {
    const c = this._calib;
    if (c.taken >= Math.max(1, this.opts.timeSamples)) { c.t0 = null; return; }
    c.t0 = this._rawNow; c.deadline = now + this.opts.ackTimeout * 1000;
    this._sendFrame(frame('CalibrateReq', { client_time: c.t0 }));
  }

  _establish(now) {
    this._setState(State.ACTIVE);
    this._conn.active = true; // a completed login: see _scheduleReconnect
    const ack = this.loginAck;
    const ev = { user: this.user, device: this.device, position: ack.position, gap: ack.gap, clockOffset: this.clockOffset, rtt: this.rtt, epoch: this.epoch };
    this._connected = ev;
    this._emit('connected', ev);
    for (const w of this._connectWaiters.splice(0)) w.resolve(ev);
    // What came during calibration (the catch-up) and whatever comes before
    // the next macrotask is handled only then: the code after `await
    // connect()` runs first and can attach its 'message' listener, so no
    // message is taken (and acked) with nobody there to handle it.
    this._deferred = this._held; this._held = [];
    const dec = this._decoder;
    setTimeout(() => {
      const frames = this._deferred;
      if (this._decoder !== dec || !frames) return; // that connection ended: its frames are void
      this._deferred = null;
      for (const f of frames) { if (!this._ws || this._decoder !== dec) return; this._handle(f, this._sessionNow()); }
    }, 0);
    for (const e of this._pending.values()) e.inFlight = false;
    this._rateMark = { at: now, answers: this._answers }; // a new connection, a full bucket: a new rate sample
    this._fill(now);
    for (const [conv, seq] of this._wanted) this._sendFrame(frame('Read', { conv, seq }));
    if (this.takenUpto > this.ackedUpto) this._armAck();
    for (const r of this._requests.values()) this._sendFrame(r.frame);
    this._resendPresence();
    if (this._calib.taken > 0) this._nextSample(now); else this._calib.t0 = null;
  }

  // ------------------------------------------------------------ sending
  get sendWindow() { return Math.max(1, Math.min(this._window || 1, Math.floor(this._cwnd))); }

  /**
   * Send `payload` (Uint8Array, ArrayBuffer or any ArrayBuffer view, or a
   * string sent as UTF-8) to `conv`.  Resolves with {local_id, conv, msg_id,
   * seq, server_time, client_time} once durable; rejects with SendError
   * (final code), SendTimeout, ClientClosed, or EncodeError (never thrown)
   * for arguments no SendReq can carry.  With the `localId` of a send still
   * pending it returns that send's promise if the message is the same (conv,
   * payload, mentions in any order, mentionAll: a retry, the later deadline
   * applies); a different message, or the localId of a pending amend,
   * rejects at once with an Error ("local id N is still pending with a
   * different message"), nothing sent: a local id names one message.
   */
  send(conv, payload, options = {}) {
    // Bad arguments (EncodeError) reject the promise, never throw.
    try {
      checkCallOptions('send', options, ['localId', 'timeout', 'mentions', 'mentionAll']);
      return this._send(conv, payload, options ?? {});
    } catch (e) { return Promise.reject(e); }
  }
  _send(conv, payload, { localId = null, timeout = this.opts.sendTimeout, mentions = [], mentionAll = false } = {}) {
    if (this.state === State.CLOSED) return Promise.reject(this.error);
    if (typeof mentionAll !== 'boolean') throw new TypeError(`send: mentionAll must be true or false, not ${JSON.stringify(mentionAll)}`);
    checkTimeout('send', timeout);
    if (!Array.isArray(mentions) || !mentions.every((u) => typeof u === 'string')) {
      // (A string is no list: 'carol' would be c, a, r, o and l.)
      throw new TypeError(`send: mentions must be an array of user ids (strings), not ${JSON.stringify(mentions)}`);
    }
    const now = this._sessionNow(); // deadlines
    const raw = this._rawNow; // local ids and stamps
    const bytes = payloadBytes(payload);
    if (localId != null) localId = localIdKey('send', localId);
    if (localId != null && this._pending.has(localId)) {
      const e = this._pending.get(localId);
      const m = e.frame;
      const differ = m.name !== 'SendReq' ? null : [
        ['conv', m.conv === conv], ['payload', sameBytes(m.payload, bytes)],
        ['mentions', sameUsers(m.mentions.map((x) => x.user), mentions)], ['mentionAll', m.mention_all === !!mentionAll],
      ].filter(([, same]) => !same).map(([name]) => name);
      if (!differ || differ.length) return Promise.reject(pendingWithAnother('send', localId, e, differ));
      e.deadline = Math.max(e.deadline, now + timeout * 1000);
      return e.promise;
    }
    const lid = localId != null ? localId : this._newLocalId(raw, 'send');
    // A retry of a send that timed out (same local id, same conv) carries the
    // first attempt's stamp and after_seq: the same local id carries the same
    // SendReq, so the broker's original ack matches what was stored.
    const first = localId != null ? this._expired.get(localId) : undefined;
    const again = first && first.conv === conv;
    const stamp = again ? first.client_time : Math.max(this._lastStamp + 1, raw + this.clockOffset);
    const f = frame('SendReq', {
      local_id: lid, conv, client_time: stamp, payload: bytes, after_seq: again ? first.after_seq : this._seen.get(conv) || 0,
      mentions: mentions.map((user) => ({ user })), mention_all: !!mentionAll,
    });
    f._body = encodeBody(f); // encoded once: every attempt sends the same bytes
    if (BigInt(lid) > this._lastLocalId) this._lastLocalId = BigInt(lid);
    this._lastStamp = Math.max(this._lastStamp, stamp);
    const entry = { localId: lid, conv, frame: f, deadline: now + timeout * 1000, inFlight: false, sentAt: 0, tx: 0 };
    entry.promise = new Promise((resolve, reject) => { entry.resolve = resolve; entry.reject = reject; });
    entry.promise.catch(() => {}); // rejections are the caller's business
    // Above the broker's limits: refused here, never sent (the broker would
    // close the connection on a frame above max_frame, and a resend after the
    // reconnect would do it again, holding up every send behind it).
    if (this.loginAck && this._refuseOversize(entry)) return entry.promise;
    if (!this._pending.size) this._rateMark = { at: now, answers: this._answers }; // idle until now: a rate sample starts here
    this._pending.set(lid, entry);
    // The message ends this user's typing indicator at the other members
    // (PROTOCOL.md): the next keystroke sends a fresh Typing at once.
    this._typingSent.delete(conv);
    this._refTicker();
    this._fill(now);
    return entry.promise;
  }

  /**
   * Recall (MessageKind.RECALL), edit (EDIT, with the new `payload`) or
   * delete for this user (DELETE) the message at `target` (its seq) of
   * `conv`: an AmendReq, sent exactly like a send (same local ids, window,
   * retries).  Resolves like send() (`seq` is the entry's, 0 for DELETE)
   * once durable, and the local view shows the change; rejects with
   * SendError (NOT_SENDER, TOO_LATE, RECALLED, NO_SUCH_MESSAGE, ...); rejects at once, nothing sent, with
   * RangeError for a `target` that is not an integer in 1..2**64-1 (TypeError if no number or bigint), and
   * with an Error for the `localId` of a send or amend still pending with a different message (as send()).
   */
  amend(conv, target, action, payload = new Uint8Array(0), options = {}) {
    return this._amendCall('amend', 'target', conv, target, action, payload, options);
  }
  _amendCall(call, name, conv, target, action, payload, options) {
    try {
      checkCallOptions(call, options, ['localId', 'timeout']);
      checkSeq(call, name, target, 1);
      return this._amend(conv, target, action, payload, options);
    } catch (e) { return Promise.reject(e); }
  }
  _amend(conv, target, action, payload, { localId = null, timeout = this.opts.sendTimeout } = {}) {
    if (this.state === State.CLOSED) return Promise.reject(this.error);
    const now = this._sessionNow(); // deadlines
    const raw = this._rawNow; // local ids and stamps
    const bytes = payloadBytes(payload);
    if (localId != null) localId = localIdKey('amend', localId);
    if (localId != null && this._pending.has(localId)) {
      const e = this._pending.get(localId);
      const m = e.frame;
      const differ = m.name !== 'AmendReq' ? null : [
        ['conv', m.conv === conv], ['target', BigInt(m.target) === BigInt(target)], ['action', m.action === action],
        ['payload', sameBytes(m.payload, bytes)],
      ].filter(([, same]) => !same).map(([name]) => name);
      if (!differ || differ.length) return Promise.reject(pendingWithAnother('amend', localId, e, differ));
      e.deadline = Math.max(e.deadline, now + timeout * 1000);
      return e.promise;
    }
    const lid = localId != null ? localId : this._newLocalId(raw, 'amend');
    const stamp = Math.max(this._lastStamp + 1, raw + this.clockOffset);
    const f = frame('AmendReq', { local_id: lid, conv, target, action, client_time: stamp, payload: bytes });
    f._body = encodeBody(f); // throws EncodeError before any state changes
    if (BigInt(lid) > this._lastLocalId) this._lastLocalId = BigInt(lid);
    this._lastStamp = stamp;
    const entry = { localId: lid, conv, frame: f, deadline: now + timeout * 1000, inFlight: false, sentAt: 0, tx: 0, action, target };
    entry.promise = new Promise((resolve, reject) => { entry.resolve = resolve; entry.reject = reject; });
    entry.promise.catch(() => {});
    if (this.loginAck && this._refuseOversize(entry)) return entry.promise;
    if (!this._pending.size) this._rateMark = { at: now, answers: this._answers }; // idle until now: a rate sample starts here
    this._pending.set(lid, entry);
    this._refTicker();
    this._fill(now);
    return entry.promise;
  }

  /** Recall our message at `seq` of `conv` for everyone (see amend()). */
  recall(conv, seq, opts = {}) { return this._amendCall('recall', 'seq', conv, seq, MessageKind.RECALL, new Uint8Array(0), opts); }

  /** Replace the payload of our message at `seq` of `conv` (see amend()). */
  edit(conv, seq, payload, opts = {}) { return this._amendCall('edit', 'seq', conv, seq, MessageKind.EDIT, payload, opts); }

  /** Delete the message at `seq` of `conv` for this user only (see amend()). */
  deleteForMe(conv, seq, opts = {}) { return this._amendCall('deleteForMe', 'seq', conv, seq, MessageKind.DELETE, new Uint8Array(0), opts); }

  /** Keep what a send that failed unanswered carried, for a retry with its local id (the newest 1000). */
  _rememberExpired(e) {
    if (e.action || e.frame.name !== 'SendReq') return;
    this._expired.delete(e.localId);
    this._expired.set(e.localId, { conv: e.conv, client_time: e.frame.client_time, after_seq: e.frame.after_seq });
    if (this._expired.size > 1000) this._expired.delete(this._expired.keys().next().value);
  }

  /** Local ids of the sends not answered yet (in local-id order). */
  pendingSends() { return [...this._pending.keys()].sort((a, b) => a - b); }

  _fill(now) {
    if (this.state !== State.ACTIVE || now < this._holdUntil) return;
    let inFlight = 0;
    for (const e of this._pending.values()) if (e.inFlight) inFlight++;
    if (inFlight >= this.sendWindow) return;
    const queue = [...this._pending.values()].filter((e) => !e.inFlight).sort((a, b) => (a.localId < b.localId ? -1 : a.localId > b.localId ? 1 : 0)); // (numbers and BigInts)
    for (const e of queue) {
      if (inFlight >= this.sendWindow) break;
      if (this._refuseOversize(e)) { this._pending.delete(e.localId); continue; } // queued before the limits were known
      this._transmit(e, now);
      inFlight++;
    }
  }

  /** Reject `e` with SendError(PAYLOAD_TOO_LARGE) if it breaks this connection's LoginAck limits; true if so. */
  _refuseOversize(e) {
    const ack = this.loginAck;
    const payload = e.frame.payload.length;
    const frameLen = 2 + e.frame._body.length; // head + type + body: what max_frame bounds (before any compression)
    let reason = '';
    if (ack.max_payload > 0 && payload > ack.max_payload) reason = `payload of ${payload} bytes is above the broker's max_payload ${ack.max_payload}`;
    else if (ack.max_frame > 0 && frameLen > ack.max_frame) reason = `SendReq frame of ${frameLen} bytes is above the broker's max_frame ${ack.max_frame}`;
    if (!reason) return false;
    e.reject(new SendError(ErrorCode.PAYLOAD_TOO_LARGE, reason));
    return true;
  }

  // Written once per connection: the broker answers every request it reads
  // (or closes), and the transport delivers it; a copy on the same
  // connection would only queue behind the first one.  Sent again after a
  // reconnect (_establish) or a refusal; a silent broker is the heartbeat's job.
  _transmit(e, now) {
    if (e.tx) this.stats.retransmits++;
    this._tx++;
    e.tx = this._tx; e.inFlight = true; e.sentAt = now;
    this._sendFrame(e.frame);
  }

  _onSendAck(f, now) {
    const e = this._pending.get(f.local_id);
    if (!e) return; // the answer to a retry of a send already answered
    if (f.code === ErrorCode.OK) {
      this._pending.delete(f.local_id);
      this._expired.delete(f.local_id);
      if (this._stall) { this._emit('sendsResumed', { since: this._stall.since, pending: this._pending.size }); this._stall = null; }
      this._answered(e);
      this._seen.set(e.conv, Math.max(this._seen.get(e.conv) || 0, f.seq));
      // Its conversation counts it as the broker does (its last seq; never
      // unread, the marker stays), a first message of a conversation too:
      // the broker sends the sender no ReadStates for its own messages.
      let rs = this._readStates.get(e.conv);
      if (!rs) { rs = { conv: e.conv, read_seq: 0, last_seq: 0, unread: 0 }; this._readStates.set(e.conv, rs); }
      if (f.seq > rs.last_seq) rs.last_seq = f.seq;
      const sent = { local_id: f.local_id, conv: e.conv, msg_id: f.msg_id, seq: f.seq, server_time: f.server_time, client_time: e.frame.client_time };
      this._addToView({ position: 0, msg_id: f.msg_id, conv: e.conv, seq: f.seq, sender: this.user, device: this.device,
        client_time: e.frame.client_time, server_time: f.server_time, payload: e.frame.payload, kind: e.action || MessageKind.MESSAGE,
        // A message is never shown above what its sender could see, nor does it claim to follow a seq above its own
        // (an answer to a retry whose frame saw more than the stored first attempt): as the broker stores it.
        local_id: f.local_id, after_seq: e.action ? Math.max(0, f.seq - 1) : Math.min(e.frame.after_seq, Math.max(0, f.seq - 1)), target: e.target || 0,
        edited: 0, recalled: false, deleted: false,
        // Its mentions as the broker stores them (sorted, unique, never the sender): as every other device shows it.
        mentions: e.action ? [] : [...new Set(e.frame.mentions.map((m) => m.user))].filter((u) => u !== this.user).sort().map((user) => ({ user })),
        mention_all: e.action ? false : e.frame.mention_all });
      e.resolve(sent);
      this._emit('sent', sent);
    } else if (FINAL_CODES.has(f.code)) {
      this._pending.delete(f.local_id);
      const reason = e.reason || refusalReason(f.code, e.frame.conv, this.user);
      this._answered(e);
      e.reject(new SendError(f.code, reason));
    } else {
      // Transient: back into the queue; one congestion event per window.
      e.inFlight = false;
      if ((f.code === ErrorCode.STORE_UNAVAILABLE || f.code === ErrorCode.INTERNAL) && !this._stall) {
        this._stall = { since: this._rawNow }; // device clock
        this._emit('sendsStalled', { code: f.code, pending: this._pending.size, since: this._stall.since });
      }
      this._onRefusal(e, f.code, now);
    }
    this._fill(now);
  }

  /** A send answered (OK or final): the broker took it. */
  _answered(e) {
    this._answers++;
    this._refusals = 0;
    // Additive increase -- for what was sent after the last event only:
    // answers to the refused window do not undo its halving.
    // Past a link loss's threshold, +1 per window (RFC 5681 section 3.1,
    // congestion avoidance) rather than per answer.
    if (e.tx > this._recover) {
      const cwnd = Math.min(this._cwnd, this._window);
      this._cwnd = Math.min(this._window, cwnd + (cwnd < this._ssthresh ? 1 : 1 / cwnd));
    }
  }

  /** Window and hold after a transient refusal of `e` (the Python SDK's ClientSession._on_refusal). */
  _onRefusal(e, code, now) {
    const backoffInitial = this.opts.backoffInitial * 1000; // µs
    const backoffMax = this.opts.backoffMax * 1000;
    if (e.tx > this._recover) {
      // A new congestion event: the first refusal of a transmission made after the last event.
      this._recover = this._tx;
      this.stats.congestionEvents++;
      // Consecutive events with no send answered between them: the windows
      // were refused whole, so the holds were too short (or the store is
      // down): only then does the hold grow.
      this._refusals++;
      const { at, answers } = this._rateMark;
      if (this._answers > answers && now > at) this._rate = (this._answers - answers) / (now - at);
      this._rateMark = { at: now, answers: this._answers };
      // Multiplicative decrease of what is really in use.
      this._cwnd = Math.max(1, Math.min(this._cwnd, this._window) / 2);
      this._episodeAt = now;
      const backoff = Math.min(backoffMax, backoffInitial * 2 ** Math.min(this._refusals - 1, 16));
      this._episodeBackoff = Math.floor(backoff * (0.5 + Math.random())); // jitter: no thundering herd
    }
    let delay;
    if (code === ErrorCode.RATE_LIMITED) {
      // The broker's token bucket is empty; it refills at about _rate.
      // Hold until it holds the window that goes out next (not a blind
      // growing backoff), but never longer than backoffInitial: a hold
      // longer than the bucket's size / its rate wastes its refill (and
      // would make the next _rate sample too low).  Doubled per window
      // refused whole: then _rate was too high.
      const need = this._rate > 0 ? this.sendWindow / this._rate : backoffInitial;
      delay = Math.min(backoffMax, Math.min(backoffInitial, need) * 2 ** Math.min(this._refusals - 1, 16));
    } else {
      delay = this._episodeBackoff;
    }
    const until = this._episodeAt + Math.floor(delay);
    if (until > this._holdUntil) {
      this._holdUntil = until;
      // Sent again when the hold ends, not at the next 100 ms tick (a hold is often a few ms).
      clearTimeout(this._holdTimer);
      this._holdTimer = setTimeout(() => { this._holdTimer = null; if (this.state !== State.CLOSED) this._fill(this._sessionNow()); }, Math.max(0, (until - now) / 1000));
      this._holdTimer.unref?.(); // the ticker keeps the process up while sends wait
    }
  }

  // ------------------------------------------------------------ receiving
  _onPush(f, now) {
    if (f.position <= this.takenUpto) { this.stats.duplicatesDropped += f.messages.length; return; }
    const kept = f.messages.filter((m) => m.position > this.takenUpto);
    this.stats.duplicatesDropped += f.messages.length - kept.length;
    for (const m of kept) {
      this._addToView(m);
      this._seen.set(m.conv, Math.max(this._seen.get(m.conv) || 0, m.seq));
      let rs = this._readStates.get(m.conv);
      if (!rs) { rs = { conv: m.conv, read_seq: 0, last_seq: 0, unread: 0 }; this._readStates.set(m.conv, rs); }
      if (m.seq > (this._counted.get(m.conv) || 0)) {
        this._counted.set(m.conv, m.seq);
        if (m.seq > rs.last_seq) rs.last_seq = m.seq;
        if (m.kind === MessageKind.MESSAGE && m.sender !== this.user && m.seq > rs.read_seq) rs.unread++;
      }
    }
    // "Taking" = handing the messages to the listeners; acked only after that.
    // A RECALL / EDIT / DELETE entry is an 'amended' event: {entry, message}
    // (the changed message as held, or null when this client does not hold it).
    for (const m of kept) {
      // PROTOCOL.md: an indicator ends at a message from that user; the stop
      // comes before the message itself (as pimcore.client_session does).
      if (m.kind === MessageKind.MESSAGE && this._typingSeen.delete(`${m.conv}\n${m.sender}`)) {
        this._emit('typing', { conv: m.conv, user: m.sender, active: false, expires: 0 });
      }
      if (AMEND_KINDS.has(m.kind)) this._emit('amended', { entry: m, message: this._heldMessage(m.conv, m.target) });
      else this._emit('message', m);
    }
    this.takenUpto = f.position;
    this._armAck();
  }

  _armAck() {
    if (this._ackTimer) return;
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      if (this.state === State.ACTIVE && this.takenUpto > this.ackedUpto) {
        this._sendFrame(frame('PushAck', { position: this.takenUpto }));
        this.ackedUpto = this.takenUpto;
        this.stats.acksSent++;
      }
    }, this.opts.ackDelay);
  }

  _dropUnlisted() {
    for (const conv of [...this._loginPrior].sort()) {
      if (!this._loginSeen.has(conv)) {
        // Its read state and its messages: a purge deleted them (a group re-created with the same id showed them).
        const rs = this._readStates.get(conv);
        const last = Math.max(rs ? rs.last_seq : 0, this._seen.get(conv) || 0);
        this._readStates.delete(conv); this._counted.delete(conv);
        if (rs && directMembers(conv)) {
          // A 1:1 chat keeps its markers through a purge: its next message counts after this one, as the broker
          // counts it (a trial's client showed read_seq 0 where the broker kept 1).
          this._readStates.set(conv, { conv, read_seq: rs.read_seq, last_seq: rs.last_seq, unread: 0 });
          this._counted.set(conv, rs.last_seq);
        }
        this._views.delete(conv); this._viewHeaps.delete(conv); this._viewSeqs.delete(conv);
        // Its unconfirmed marker too (sent again at every reconnect, it landed in a group created again with the id);
        // and it is said, with the last seq this client knew (a trial: an app that stores messages had no word of it).
        this._wanted.delete(conv);
        if (!directMembers(conv)) this._seen.delete(conv); // (a group's next send answers nothing of it: _onConvPurged)
        this._purgeTold.set(conv, Math.max(this._purgeTold.get(conv) || 0, last));
        this._emit('purged', { conv, last_seq: last, gone: !directMembers(conv) });
      }
    }
    this._loginPrior = new Set(); this._loginSeen = new Set();
  }

  // The host purged f.conv (PROTOCOL.md, Retention and purge; told while online, or at a login before its
  // ReadStates): its messages up to f.last_seq leave the view (a group created again with the same id showed them
  // beside its new ones: new users' trials); a group's read state goes too (its markers went with it: created
  // again, the login's ReadStates bring its new one).  A 1:1 chat keeps its read state.
  _onConvPurged(f) {
    const conv = f.conv, upto = f.last_seq; // (a number, or a bigint past 2**53: compared as either)
    if (!directMembers(conv)) {
      this._readStates.delete(conv); this._counted.delete(conv);
      // Its seqs seen too: a send whose after_seq is at or below the purge point is refused (PURGED: it would answer
      // deleted history); sends written before this keep theirs.
      const seen = this._seen.get(conv);
      if (seen !== undefined && !(seen > upto)) this._seen.delete(conv);
    }
    const v = this._views.get(conv);
    if (v) {
      for (const [k, x] of [...v]) if (x.seq <= upto) v.delete(k);
      const seqs = this._viewSeqs.get(conv);
      if (seqs) for (const q of [...seqs.keys()]) if (q <= upto) seqs.delete(q);
      const h = this._viewHeaps.get(conv);
      if (h) { h.length = 0; for (const [k, x] of v) heapPush(h, [x.seq, k]); }
    }
    // Once per purge point in a running client: a login repeats every conversation's (the broker cannot know what
    // this client holds).
    if (f.gone || !((this._purgeTold.get(conv) ?? -1) >= upto)) {
      this._purgeTold.set(conv, upto);
      this._emit('purged', { conv, last_seq: upto, gone: f.gone });
    }
  }

  _onReadStates(f) {
    for (const entry of f.entries) {
      if (this._loginStates > 0) {
        this._loginStates--;
        this._loginSeen.add(entry.conv);
        if (!this._loginStates) this._dropUnlisted();
      }
      const w = this._wanted.get(entry.conv);
      if (w !== undefined && entry.read_seq >= w) this._wanted.delete(entry.conv);
      const known = this._readStates.get(entry.conv);
      if (known && entry.read_seq < known.read_seq) continue; // markers never move back
      // The count is the broker's, up to its last_seq; the last seq shown never moves back.
      const rs = { conv: entry.conv, read_seq: entry.read_seq, last_seq: known && known.last_seq > entry.last_seq ? known.last_seq : entry.last_seq,
        unread: entry.unread };
      this._readStates.set(entry.conv, rs);
      this._counted.set(entry.conv, entry.last_seq);
      this._emit('readstate', { ...rs });
    }
  }

  _onReceipt(f) {
    const key = `${f.conv}\n${f.reader}`;
    if ((this._receipts.get(key) || 0) >= f.seq) return;
    this._receipts.set(key, f.seq);
    this._emit('receipt', { conv: f.conv, reader: f.reader, seq: f.seq });
  }

  // ------------------------------------------------------------ read state
  /**
   * Move the user's read marker of `conv` to `seq` (never back, and never past the last seq this client knows of,
   * as the broker clamps it); sent again after reconnects until confirmed.  Throws, nothing sent or remembered:
   * RangeError for a `seq` that is not an integer in 0..2**64-1 (TypeError if no number or bigint), TypeError
   * for a `conv` that is no string, SendError for what the client can judge itself -- BAD_REQUEST for a malformed
   * conversation id, NOT_MEMBER for a 1:1 id without this user (once the first login named the user).  A Read
   * carries no request id, so the broker's refusal of a group (NOT_MEMBER, UNKNOWN_CONVERSATION) cannot be tied
   * to this call: it comes as a 'brokerRefused' event.
   */
  markRead(conv, seq) {
    checkSeq('markRead', 'seq', seq);
    if (typeof conv !== 'string') throw new TypeError(`markRead: conv must be a string (a conversation id), not ${conv === null ? 'null' : typeof conv}`);
    if (this.state === State.CLOSED) throw this.error;
    const f = frame('Read', { conv, seq });
    f._body = encodeBody(f); // throws EncodeError before any state changes
    const problem = conversationProblem(conv);
    if (problem) throw new SendError(ErrorCode.BAD_REQUEST, `invalid conversation id: ${problem}`);
    const pair = directMembers(conv);
    if (pair && this.user && !pair.includes(this.user)) {
      throw new SendError(ErrorCode.NOT_MEMBER, `${this.user} is not one of the two users of the 1:1 conversation ${showValue(conv)} (${pair[0]} and ${pair[1]})`);
    }
    // A bigint marker as a number (the read states hold numbers): past 2**53 it means "all of it", which the
    // broker clamps to the last seq anyway (it threw "Cannot convert a BigInt value to a number").
    if (typeof seq === 'bigint') seq = seq > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(seq);
    const rs = this._readStates.get(conv);
    // The broker clamps a marker to the last seq the user may see: so does
    // the client with what it knows, or the lower confirmation would look
    // like a marker moving back and be ignored (unread wrong for good).
    const known = Math.max(rs ? rs.last_seq : 0, this._seen.get(conv) || 0);
    if (known) seq = Math.min(seq, known);
    if (rs && seq > rs.read_seq) {
      rs.read_seq = seq;
      // Until the broker confirms (with the exact count): at most what lies past the marker
      // (among the seqs the count accounts for).
      const counted = this._counted.get(conv) || 0;
      rs.unread = seq >= counted ? 0 : Math.min(rs.unread, counted - seq);
    }
    this._wanted.set(conv, Math.max(this._wanted.get(conv) || 0, seq));
    if (this.state === State.ACTIVE) this._sendFrame(frame('Read', { conv, seq }));
  }
  /** {conv, read_seq, last_seq, unread} or undefined. */
  readState(conv) { checkConvType(conv); const rs = this._readStates.get(conv); return rs && { ...rs }; }
  unread(conv) { checkConvType(conv); const rs = this._readStates.get(conv); return rs ? rs.unread : 0; }
  /** Every conversation this client knows a read state of (from login's ReadStates and pushes). */
  conversations() { return [...this._readStates.values()].map((rs) => ({ ...rs })); }
  /** How far `reader` (the 1:1 peer) has read `conv`: a seq, 0 if unknown. */
  receipt(conv, reader) { return this._receipts.get(`${conv}\n${reader}`) || 0; }

  // ------------------------------------------------------------ history, readers, view
  _request(name, fields, timeout, what) {
    if (this.state === State.CLOSED) return Promise.reject(this.error);
    // A malformed conversation id (BAD_REQUEST) or a frame above max_frame (PAYLOAD_TOO_LARGE) is refused here:
    // the broker would refuse it or close the connection, and a request is asked again on every new connection
    // (a new user's trial: a 2 MB id, 130 reconnects in 20 s).
    const problem = 'conv' in fields ? conversationProblem(fields.conv) : null;
    if (problem) return Promise.reject(new SendError(ErrorCode.BAD_REQUEST, `${what}: invalid conversation id: ${problem}`));
    const now = this._sessionNow();
    const reqId = this._nextReqId;
    const f = frame(name, { req_id: reqId, ...fields });
    // Encoded before anything is registered: arguments no frame can carry
    // reject the promise (EncodeError) and leave nothing to re-send.
    try { f._body = encodeBody(f); } catch (e) { return Promise.reject(e); }
    const frameLen = 2 + f._body.length; // (head + type + body: what max_frame bounds)
    const limit = this.loginAck && this.loginAck.max_frame > 0 ? this.loginAck.max_frame : 1 << 20;
    if (frameLen > limit) {
      return Promise.reject(new SendError(ErrorCode.PAYLOAD_TOO_LARGE, `${what}: its frame of ${frameLen} bytes is above the broker's max_frame (${limit} bytes)`));
    }
    this._nextReqId++;
    const r = { reqId, frame: f, deadline: now + timeout * 1000, what };
    const p = new Promise((resolve, reject) => { r.resolve = resolve; r.reject = reject; });
    this._requests.set(reqId, r);
    this._refTicker();
    if (this.state === State.ACTIVE) this._sendFrame(r.frame);
    return p;
  }
  /**
   * One page of history: {messages, more}; rejects with SendError(code) or RequestTimeout.  This and every
   * request below reject (never throw) with EncodeError for arguments no frame can carry, and leave nothing behind;
   * a `fromSeq` outside 0..2**64-1 or a `limit` < 1 (here and in listConversations) with a RangeError naming it
   * (TypeError if no number or bigint).
   */
  history(conv, opts = {}) {
    try { checkCallOptions('history', opts, ['fromSeq', 'limit', 'backward', 'timeout']); } catch (e) { return Promise.reject(e); }
    const { fromSeq = 0, limit = 50, backward = false, timeout = this.opts.sendTimeout } = opts ?? {};
    try { checkSeq('history', 'fromSeq', fromSeq); checkLimit('history', limit); checkTimeout('history', timeout); } catch (e) { return Promise.reject(e); }
    return this._request('HistoryReq', { conv, from_seq: fromSeq, limit, backward }, timeout, `history of ${showValue(conv)}`);
  }
  /** [{user, read_seq}] for every current member of `conv`. */
  readers(conv, opts = {}) {
    try { checkCallOptions('readers', opts, ['timeout']); } catch (e) { return Promise.reject(e); }
    const { timeout = this.opts.sendTimeout } = opts ?? {};
    try { checkTimeout('readers', timeout); } catch (e) { return Promise.reject(e); }
    return this._request('ReadersReq', { conv }, timeout, `readers of ${showValue(conv)}`);
  }
  /**
   * A page of this user's conversation list (pinned first, then newest
   * activity first): {entries, cursor, more}; pass `cursor` for the next
   * page.  Live changes come as 'conversation' events (settings, read
   * marker) and 'message' events (new messages).  Rejects with
   * SendError(BAD_CURSOR) or RequestTimeout.
   */
  listConversations(opts = {}) {
    try { checkCallOptions('listConversations', opts, ['cursor', 'limit', 'includeHidden', 'timeout']); } catch (e) { return Promise.reject(e); }
    const { cursor = new Uint8Array(0), limit = 50, includeHidden = false, timeout = this.opts.sendTimeout } = opts ?? {};
    try { checkLimit('listConversations', limit); checkTimeout('listConversations', timeout); } catch (e) { return Promise.reject(e); }
    return this._request('ConvListReq', { cursor, limit, include_hidden: includeHidden }, timeout, 'listConversations');
  }
  /**
   * Change this user's settings of `conv` (undefined = unchanged); resolves
   * once durable.  Every device of the user gets a 'conversation' event.
   */
  setConversation(conv, opts = {}) {
    try { checkCallOptions('setConversation', opts, ['pinned', 'muted', 'hidden', 'timeout']); } catch (e) { return Promise.reject(e); }
    const { pinned, muted, hidden, timeout = this.opts.sendTimeout } = opts ?? {};
    try { checkTimeout('setConversation', timeout); } catch (e) { return Promise.reject(e); }
    for (const [name, x] of [['pinned', pinned], ['muted', muted], ['hidden', hidden]]) {
      // ('no' and 'false' are truthy: they would set it.)
      if (x !== undefined && x !== null && typeof x !== 'boolean') {
        return Promise.reject(new TypeError(`setConversation: ${name} must be true, false or undefined, not ${JSON.stringify(x)}`));
      }
    }
    const v = (x) => (x === undefined || x === null ? Setting.KEEP : x ? Setting.ON : Setting.OFF);
    return this._request('ConvSetReq', { conv, pinned: v(pinned), muted: v(muted), hidden: v(hidden) }, timeout, `setConversation of ${showValue(conv)}`);
  }
  _onResponse(f) {
    const r = this._requests.get(f.req_id);
    if (!r || (f.type === FrameType.CONV_LIST_RESP) !== (r.frame.name === 'ConvListReq')
      || (f.type === FrameType.CONV_SET_RESP) !== (r.frame.name === 'ConvSetReq')) return;
    this._requests.delete(f.req_id);
    if (f.code !== ErrorCode.OK) {
      const why = refusalReason(f.code, r.frame.conv, this.user);
      r.reject(new SendError(f.code, why ? `${r.what}: ${why}` : r.what));
      return;
    }
    if (f.type === FrameType.CONV_LIST_RESP) {
      // Each entry's `last` never behind the copy view() holds (notBehind),
      // and view() takes it by the same rule (_addToView).
      const entries = f.entries.map((e) => this._notBehindEntry(e));
      for (const e of entries) for (const m of e.last) this._addToView(m);
      r.resolve({ entries, cursor: f.cursor, more: f.more });
      return;
    }
    if (f.type === FrameType.CONV_SET_RESP) { r.resolve(); return; }
    if (f.type === FrameType.HISTORY_RESP) {
      for (const m of f.messages) {
        this._addToView(m);
        this._seen.set(m.conv, Math.max(this._seen.get(m.conv) || 0, m.seq));
      }
      r.resolve({ messages: f.messages, more: f.more });
    } else r.resolve(f.readers);
  }
  /** `e` (a ConvEntry) with its `last` never behind the copy view() holds (notBehind). */
  _notBehindEntry(e) {
    const v = this._views.get(e.conv);
    if (!v || !e.last.length) return e;
    const last = e.last.map((m) => notBehind(v.get(toHex(m.msg_id)), m));
    return last.every((m, i) => m === e.last[i]) ? e : { ...e, last };
  }
  _heldMessage(conv, seq) {
    const seqs = this._viewSeqs.get(conv), key = seqs && seqs.get(seq);
    if (key === undefined) return null;
    const m = this._views.get(conv).get(key);
    return m && m.seq === seq && m.kind === MessageKind.MESSAGE ? m : null;
  }
  /**
   * Apply a RECALL / EDIT / DELETE entry to the held target (entries are not
   * kept in the view).  A recall, or a delete for this user, of an unread
   * message from someone else leaves the unread count, as the broker counts
   * it (its next ReadState is exact); applying one twice counts nothing twice.
   */
  _applyAmend(e) {
    const t = this._heldMessage(e.conv, e.target);
    const rs = this._readStates.get(e.conv);
    const counted = rs && rs.unread > 0 && e.target > rs.read_seq && e.target <= (this._counted.get(e.conv) || 0)
      && (!t || !(t.recalled || t.deleted));
    let n = null;
    if (e.kind === MessageKind.RECALL) {
      // Only its sender (or the host, for them) recalls a message: the
      // entry's sender is the target's when the target is not held.
      if (counted && (t ? t.sender : e.sender) !== this.user) rs.unread--;
      if (t && !t.recalled) n = { ...t, payload: new Uint8Array(0), recalled: true };
    } else if (e.kind === MessageKind.EDIT) {
      if (t && !t.recalled && !t.deleted && e.server_time >= (t.edited || 0)) n = { ...t, payload: e.payload, edited: e.server_time };
    } else if (t) { // DELETE: for this user only
      if (counted && t.sender !== this.user) rs.unread--;
      n = { ...t, payload: new Uint8Array(0), deleted: true };
    }
    // A DELETE of a message not in the local view (older than viewLimit
    // kept, or never fetched) leaves the count: the entry's sender is the
    // deleting user, so whose the message was -- and whether it was recalled
    // or deleted already -- is unknown here, and the protocol has no request
    // for one conversation's ReadState.  Lowering it could count a message
    // twice (an unread message hidden); leaving it shows at most one too
    // many until the broker's next ReadState (a markRead on any of the
    // user's devices, the next login).
    if (n) this._views.get(e.conv).set(toHex(n.msg_id), n);
  }
  _addToView(m) {
    if (AMEND_KINDS.has(m.kind)) { this._applyAmend(m); return; }
    let v = this._views.get(m.conv), h = this._viewHeaps.get(m.conv), seqs = this._viewSeqs.get(m.conv);
    if (!v) { v = new Map(); this._views.set(m.conv, v); }
    if (!h) { h = []; this._viewHeaps.set(m.conv, h); }
    if (!seqs) { seqs = new Map(); this._viewSeqs.set(m.conv, seqs); }
    const key = toHex(m.msg_id), held = v.get(key);
    // (A copy behind the held one -- an older answer, a stale list entry --
    // never undoes a deletion, a recall or a newer edit.)
    m = notBehind(held, m);
    v.set(key, m);
    if (held && held.seq !== m.seq && seqs.get(held.seq) === key) seqs.delete(held.seq);
    if (m.kind === MessageKind.MESSAGE) seqs.set(m.seq, key);
    if (!held || held.seq !== m.seq) heapPush(h, [m.seq, key]);
    // Bounded memory: forget the lowest seqs (a history page brings them back).
    while (v.size > this.opts.viewLimit) {
      const [seq, k] = heapPop(h), kept = v.get(k);
      if (kept && kept.seq === seq) { v.delete(k); if (seqs.get(seq) === k) seqs.delete(seq); }
    }
    if (h.length > 2 * v.size + 64) {  // stale entries: messages remembered again at another seq
      h.length = 0;
      for (const [k, x] of v) heapPush(h, [x.seq, k]);
    }
  }
  /** The messages this client holds for `conv` (sent, received, fetched) in display order. */
  view(conv) { checkConvType(conv); const v = this._views.get(conv); return v ? displayOrder([...v.values()]) : []; }

  /** The broker's clock estimate, µs. */
  serverNow() { return this.opts.now() + this.clockOffset; }

  // ------------------------------------------------------------ typing and presence
  /**
   * The user is typing in `conv` (`active`) or stopped.  Call it on every
   * keystroke: while active, at most one Typing per `typingInterval` per
   * conversation goes out; a stop only after an active one.  Nothing is
   * sent while disconnected (ephemeral).  Returns whether a frame went out.
   */
  typing(conv, active = true) {
    if (this.state === State.CLOSED) throw this.error;
    const f = frame('Typing', { conv, active, user: '', ttl_ms: 0 });
    const problem = conversationProblem(conv);
    if (problem) throw new SendError(ErrorCode.BAD_REQUEST, `typing in ${showValue(conv)}: invalid conversation id: ${problem}`);
    const now = this._sessionNow();
    const last = this._typingSent.get(conv);
    if (active) { if (last !== undefined && now - last < this.opts.typingInterval * 1000) return false; }
    else if (last === undefined) return false;
    if (this.state !== State.ACTIVE) return false;
    if (active) this._typingSent.set(conv, now); else this._typingSent.delete(conv);
    this._sendFrame(f);
    return true;
  }
  /** Users whose typing indicator in `conv` is on now, sorted. */
  typingUsers(conv) {
    const now = this._sessionNow();
    return [...this._typingSeen.values()].filter((t) => t.conv === conv && t.until > now).map((t) => t.user).sort();
  }
  _onTyping(f, now) {
    const key = `${f.conv}\n${f.user}`;
    if (f.active && f.ttl_ms) {
      const until = now + f.ttl_ms * 1000;
      this._typingSeen.set(key, { conv: f.conv, user: f.user, until });
      this._emit('typing', { conv: f.conv, user: f.user, active: true, expires: until - this._skew }); // device clock
    } else if (this._typingSeen.delete(key)) {
      this._emit('typing', { conv: f.conv, user: f.user, active: false, expires: 0 });
    }
  }
  /**
   * Replace the presence subscription by `users` (empty: unsubscribe).
   * Resolves with {user: {user, state, last_seen}} of every user asked for
   * (state PresenceState.UNKNOWN: shares no conversation with this user);
   * then every change comes as a 'presence' event.  While the connection is
   * down nobody tells this client anything: right after the 'disconnected'
   * event every entry of `presence` turns UNKNOWN (last_seen kept), each with
   * a 'presence' event, and so after close() or a terminal error.  Sent
   * again after every reconnect, whose answer brings the current states.  Rejects with SendError(PRESENCE_LIMIT),
   * RequestTimeout.
   */
  subscribePresence(users, opts = {}) {
    try {
      checkCallOptions('subscribePresence', opts, ['timeout']);
      // (A string is iterable: 'bob' subscribed 'b' and 'o' -- a trial.)
      if (!Array.isArray(users)) throw new TypeError(`subscribePresence: users must be an array of user ids, not ${JSON.stringify(users)}`);
      // (Sent, an invalid id came back as an unknown user, which hid the mistake: a trial.)
      // (findIndex, not find: an undefined id is itself the bad one -- a last trial; a hole in a sparse array too.)
      const at = Array.from(users).findIndex((u) => !validId(u));
      if (at >= 0) {
        const bad = users[at];
        if (typeof bad !== 'string') throw new TypeError(`subscribePresence: a user id must be a string, not ${bad === undefined ? 'undefined' : `${typeof bad} ${JSON.stringify(bad)}`}`);
        throw new RangeError(`subscribePresence: ${showValue(bad)} is no user id: 1-64 ASCII characters from A-Z a-z 0-9 _ . @ -`);
      }
    } catch (e) { return Promise.reject(e); }
    const { timeout = this.opts.sendTimeout } = opts ?? {};
    if (this.state === State.CLOSED) return Promise.reject(this.error);
    let wanted, f;
    const reqId = this._nextReqId;
    try {
      wanted = [...new Set(users)];
      f = frame('PresenceSub', { req_id: reqId, users: wanted.map((user) => ({ user })) });
      encodeBody(f); // arguments no frame can carry: rejected, the subscription unchanged
    } catch (e) { return Promise.reject(e instanceof EncodeError ? e : new EncodeError(`users must be an array of user ids: ${e.message}`)); }
    this._nextReqId++;
    this._presenceWanted = { reqId, users: wanted };
    const p = new Promise((resolve, reject) => {
      this._presenceWaiting.push({ reqId, users: wanted, resolve, reject, deadline: this._sessionNow() + timeout * 1000 });
    });
    this._refTicker();
    if (this.state === State.ACTIVE) this._sendFrame(f);
    return p;
  }
  /**
   * Hide (true) or show (false) this user's last-seen time, or only ask
   * (null).  Durable on the broker, synced to the user's other devices.
   * Resolves with the setting in force; rejects with RequestTimeout.
   */
  setPresencePrivacy(hideLastSeen, { timeout = this.opts.sendTimeout } = {}) {
    if (this.state === State.CLOSED) return Promise.reject(this.error);
    const mode = hideLastSeen == null ? 0 : hideLastSeen ? 2 : 1;
    const p = new Promise((resolve, reject) => {
      this._privacyWaiting.push({ mode, resolve, reject, deadline: this._sessionNow() + timeout * 1000 });
    });
    this._refTicker();
    if (this.state === State.ACTIVE) this._sendFrame(frame('PresencePrivacy', { mode }));
    return p;
  }
  _resendPresence() {
    const w = this._presenceWanted;
    if (w && (w.users.length || this._presenceWaiting.length)) {
      this._sendFrame(frame('PresenceSub', { req_id: w.reqId, users: w.users.map((user) => ({ user })) }));
    }
    for (const mode of new Set(this._privacyWaiting.map((x) => x.mode))) this._sendFrame(frame('PresencePrivacy', { mode }));
  }
  // The connection is down: what the client knew of the subscribed users may
  // be stale by now and nothing will tell it otherwise (the broker forgot the
  // subscription with the connection), so no entry may go on claiming ONLINE
  // or OFFLINE.  Each becomes UNKNOWN with its last_seen kept (still true as a
  // lower bound), with a 'presence' event so that an app following the events
  // alone stops showing it too.  Entries are kept: the user set stays what was
  // subscribed.  The subscription renewed at the next establish
  // (_resendPresence) brings the broker's current states back.
  _presenceUnknown() {
    for (const [user, e] of [...this.presence]) {
      if (e.state === PresenceState.UNKNOWN) continue;
      const entry = { user, state: PresenceState.UNKNOWN, last_seen: e.last_seen };
      this.presence.set(user, entry);
      this._emit('presence', { ...entry });
    }
  }
  _onPresence(f) {
    const w = this._presenceWanted;
    if (f.req_id) {
      const answerFor = (users) => {
        const answer = {};
        for (const e of f.entries) if (users.includes(e.user)) answer[e.user] = { ...e };
        return answer;
      };
      if (!w || f.req_id !== w.reqId) {
        // The answer to a subscription replaced since (a newer one is on its
        // way): it resolves (or rejects) its own call with its own users'
        // states, and changes nothing else.
        const i = this._presenceWaiting.findIndex((x) => x.reqId === f.req_id);
        if (i < 0) return;
        const [x] = this._presenceWaiting.splice(i, 1);
        if (f.code !== ErrorCode.OK) x.reject(new SendError(f.code)); else x.resolve(answerFor(x.users));
        return;
      }
      // This answer ends the calls up to it (an earlier one whose own answer
      // was lost with a connection gets its users' states as far as known).
      const done = this._presenceWaiting.filter((x) => x.reqId <= f.req_id);
      this._presenceWaiting = this._presenceWaiting.filter((x) => x.reqId > f.req_id);
      if (f.code !== ErrorCode.OK) {
        // the broker kept the previous subscription: so does the client
        this._presenceWanted = { reqId: f.req_id, users: this._presenceUsers };
        for (const x of done) x.reject(new SendError(f.code));
        return;
      }
      this._presenceUsers = w.users;
      for (const u of [...this.presence.keys()]) if (!w.users.includes(u)) this.presence.delete(u);
      for (const x of done) x.resolve(answerFor(x.users));
    }
    for (const e of f.entries) {
      if (!this._presenceUsers.includes(e.user)) continue;
      this.presence.set(e.user, { ...e });
      this._emit('presence', { ...e });
    }
  }
  _onPrivacy(f) {
    if (f.mode !== 1 && f.mode !== 2) return;
    const hide = f.mode === 2;
    if (this.hideLastSeen !== hide) { this.hideLastSeen = hide; this._emit('privacy', { hideLastSeen: hide }); }
    const keep = [];
    for (const x of this._privacyWaiting) { if (x.mode === 0 || x.mode === f.mode) x.resolve(hide); else keep.push(x); }
    this._privacyWaiting = keep;
  }

  // ------------------------------------------------------------ timers
  // Session time, µs: what every timer and deadline runs on (the Python SDK's
  // ClientSession._tick).  The device clock plus a skew, never backwards: a
  // backward step of the clock (NTP, the user) is absorbed into the skew, so
  // deadlines already set keep their distance instead of moving away by the
  // size of the step.  A forward step fires the timers it jumps over (a
  // reconnect, send timeouts): the default clock (anchoredClock) is never
  // stepped.  Stamps, local ids and calibration use the device clock as read
  // here (_rawNow).
  _sessionNow() {
    const raw = this.opts.now();
    this._rawNow = raw;
    let t = raw + this._skew;
    if (t < this._t) { this._skew += this._t - t; t = this._t; }
    this._t = t;
    return t;
  }

  // The ticker keeps a Node process alive only while something waits on it
  // (a send or a request must time out even with no socket up).
  _refTicker() {
    if (!this._ticker) return;
    if (this._pending.size || this._requests.size || this._presenceWaiting.length || this._privacyWaiting.length || this._connectWaiters.length) this._ticker.ref?.();
    else this._ticker.unref?.();
  }

  /** How long a heartbeat Ping may wait for its Pong while nothing at all arrives (µs). */
  _pongTimeout() { return Math.min(this._heartbeat, this.opts.ackTimeout * 1000); }

  _tick() {
    this._refTicker();
    const now = this._sessionNow();
    for (const e of [...this._pending.values()]) {
      if (now >= e.deadline) { this._pending.delete(e.localId); this._rememberExpired(e); e.reject(new SendTimeout(e.localId)); }
    }
    for (const r of [...this._requests.values()]) {
      if (now >= r.deadline) { this._requests.delete(r.reqId); r.reject(new RequestTimeout(r.frame.name)); }
    }
    for (const [key, t] of [...this._typingSeen]) {
      if (now >= t.until) { this._typingSeen.delete(key); this._emit('typing', { conv: t.conv, user: t.user, active: false, expires: 0 }); }
    }
    for (const name of ['_presenceWaiting', '_privacyWaiting']) {
      const late = this[name].filter((x) => now >= x.deadline);
      if (late.length) {
        this[name] = this[name].filter((x) => now < x.deadline);
        for (const x of late) x.reject(new RequestTimeout(name === '_presenceWaiting' ? 'PresenceSub' : 'PresencePrivacy'));
      }
    }
    if (this.stats.connects === 0 && this._firstDeadline != null && now >= this._firstDeadline && this.state !== State.CLOSED) { this._giveUp(now); return; }
    if (!this._ws) return;
    const st = this.state;
    if (st === State.AWAITING_LOGIN_ACK || (st === State.DISCONNECTED && this._conn && !this._conn.opened)) {
      if (now >= this._loginDeadline) this._lost(null, 'timed out: no LoginAck within connect_timeout');
      return;
    }
    if (st === State.CALIBRATING) {
      if (now >= this._calib.deadline) this._establish(now);
      return;
    }
    if (st !== State.ACTIVE) return;
    if (this._calib.t0 != null && now >= this._calib.deadline) this._calib.t0 = null;
    const H = this._heartbeat;
    if (H > 0) {
      if (now - this._lastRecv >= this.opts.deadAfter * H) { this._lost(null, 'no traffic from the broker: dead link'); return; }
      // Only its Pong answers a Ping (PONG clears _ping): frames the broker
      // sends unasked (pushes) show the way down works, not that it hears us.
      // Nothing at all since the Ping: dead after min(H, ackTimeout).  Other
      // frames arriving: one interval after the Ping, or after the last push
      // of a backlog that may be queued ahead of the Pong (_handle).
      if (this._ping && this._lastRecv < this._ping.at && now - this._ping.at >= this._pongTimeout()) {
        this._lost(null, 'no Pong from the broker: dead link'); return;
      }
      if (this._ping && this._lastRecv >= this._ping.at && now - Math.max(this._ping.at, this._ping.backlogAt) >= Math.max(H, this._pongTimeout())) {
        this._lost(null, NO_HEARTBEAT_ANSWER); return;
      }
    }
    if (now >= this._holdUntil) this._fill(now);
    // A Ping one interval after the last frame received (whatever we sent
    // meanwhile: a dead link is found within two intervals), sent (the broker
    // hears from an idle client), or answering something we sent (pushes
    // that keep coming while the client only acks them prove nothing about
    // the way up: such a client pings once an interval; one whose requests
    // are answered needs no Ping).
    if (H > 0 && !this._ping && (now - this._lastRecv >= H || now - this._lastSent >= H || now - this._lastHeard >= H)) {
      const nonce = (this._nonce = (this._nonce || 0) + 1);
      // server: the broker's clock now, as calibrated; backlogAt: see _handle.
      this._ping = { nonce, at: now, server: this.serverNow(), backlogAt: 0 };
      this._sendFrame(frame('Ping', { nonce }));
    }
  }
}
