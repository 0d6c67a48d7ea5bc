// PIM wire protocol v4 codec (docs/PROTOCOL.md): frames <-> bytes.
//
// Integers: `u` and `s` fields decode to a JS number when they fit in
// Number.MAX_SAFE_INTEGER (times in µs, positions, seqs, local ids all do in
// practice) and to a BigInt otherwise; encoders take either.  `b` fields are
// Uint8Array, `t` fields strings (strict UTF-8), `?` booleans, lists arrays.

export const PROTOCOL_VERSION = 4;
export const CAP_ZSTD = 1;
export const CAP_DEFLATE_DOWN = 2;
export const CAP_DEFLATE_UP = 4;
// The client takes ConvPurged frames (a purge told to a device online during it): every Login asks for it.
export const CAP_CONV_PURGED = 8;

export const FrameType = Object.freeze({
  LOGIN: 0x01, LOGIN_ACK: 0x02, CALIBRATE_REQ: 0x03, CALIBRATE_RESP: 0x04,
  SEND_REQ: 0x05, SEND_ACK: 0x06, PUSH: 0x07, PUSH_ACK: 0x08, READ: 0x09,
  READ_STATES: 0x0a, READ_RECEIPT: 0x0b, HISTORY_REQ: 0x0c, HISTORY_RESP: 0x0d,
  PING: 0x0e, PONG: 0x0f, ERROR: 0x10, CLOSE: 0x11, READERS_REQ: 0x12, READERS_RESP: 0x13,
  AMEND_REQ: 0x14, CONV_PURGED: 0x15,
  CONV_LIST_REQ: 0x16, CONV_LIST_RESP: 0x17, CONV_SET_REQ: 0x18, CONV_SET_RESP: 0x19, CONV_UPDATE: 0x1a,
  // typing and presence
  TYPING: 0x1c, PRESENCE_SUB: 0x1d, PRESENCE: 0x1e, PRESENCE_PRIVACY: 0x1f,
});

export const ErrorCode = Object.freeze({
  OK: 0, MALFORMED_FRAME: 1, FRAME_TOO_LARGE: 2, UNSUPPORTED_VERSION: 3, UNKNOWN_FRAME_TYPE: 4,
  UNEXPECTED_FRAME: 5, AUTH_FAILED: 10, BAD_REQUEST: 20, UNKNOWN_CONVERSATION: 21, NOT_MEMBER: 22,
  PAYLOAD_TOO_LARGE: 23, DUPLICATE_CONFLICT: 24, TOO_MANY_IN_FLIGHT: 25, RATE_LIMITED: 26,
  REJECTED: 27, ALREADY_EXISTS: 28, STORE_UNAVAILABLE: 30, INTERNAL: 31,
  NO_SUCH_MESSAGE: 40, NOT_SENDER: 41, TOO_LATE: 42, RECALLED: 43, BAD_ACTION: 44,
  TOO_MANY_MENTIONS: 45, BAD_MENTION: 46, BAD_CURSOR: 47,
  PRESENCE_LIMIT: 48, TYPING_NOT_RELAYED: 49, PURGED: 50,
});

/** ConvSetReq values of pinned / muted / hidden. */
export const Setting = Object.freeze({ KEEP: 0, ON: 1, OFF: 2 });

/** PresenceEntry.state. */
export const PresenceState = Object.freeze({ UNKNOWN: 0, OFFLINE: 1, ONLINE: 2 });

export const CloseCode = Object.freeze({
  NORMAL: 0, PROTOCOL_ERROR: 1, AUTH_FAILED: 2, LOGIN_TIMEOUT: 3, IDLE_TIMEOUT: 4, REPLACED: 5,
  SLOW_CONSUMER: 6, RATE_LIMITED: 7, SHUTDOWN: 8, INTERNAL: 9, OVERLOADED: 10, TOKEN_EXPIRED: 11,
  KICKED: 12, TOKEN_REVOKED: 13,
});

export const MessageKind = Object.freeze({ MESSAGE: 0, JOINED: 1, LEFT: 2, RECALL: 3, EDIT: 4, DELETE: 5 });

export function codeName(table, code) {
  for (const [k, v] of Object.entries(table)) if (v === code) return k;
  return String(code);
}

// Records: [name, kind] in wire order.  kind: 'u' 's' 'b' 't' '?' or [Record].
// A third element is the value the encoder uses when the field is absent.
export const Records = {
  Message: [['position', 'u'], ['msg_id', 'b'], ['conv', 't'], ['seq', 'u'], ['sender', 't'],
    ['device', 't'], ['client_time', 's'], ['server_time', 'u'], ['payload', 'b'], ['kind', 'u'],
    ['local_id', 'u'], ['after_seq', 'u'], ['target', 'u', 0], ['edited', 'u', 0], ['recalled', '?', false], ['deleted', '?', false],
    ['mentions', ['Mention'], []], ['mention_all', '?', false]],
  ReadState: [['conv', 't'], ['read_seq', 'u'], ['last_seq', 'u'], ['unread', 'u']],
  Reader: [['user', 't'], ['read_seq', 'u']],
  Mention: [['user', 't']],
  ConvEntry: [['conv', 't'], ['last', ['Message']], ['read_seq', 'u'], ['last_seq', 'u'], ['unread', 'u'],
    ['mention_count', 'u'], ['pinned', '?'], ['muted', '?'], ['hidden', '?']],
  PresenceUser: [['user', 't']],
  PresenceEntry: [['user', 't'], ['state', 'u'], ['last_seen', 'u']],
};

// Frames by type: [name, fields].
export const Frames = {
  [FrameType.LOGIN]: ['Login', [['token', 'b'], ['device', 't'], ['client_time', 's'], ['position', 'u'], ['caps', 'u'], ['epoch', 'b'], ['sent', 'u']]],
  [FrameType.LOGIN_ACK]: ['LoginAck', [['user', 't'], ['device', 't'], ['server_time', 'u'], ['position', 'u'], ['head', 'u'],
    ['gap', '?'], ['max_frame', 'u'], ['max_payload', 'u'], ['window', 'u'], ['heartbeat_ms', 'u'], ['caps', 'u'], ['epoch', 'b'], ['resync', '?'], ['states', 'u']]],
  [FrameType.CALIBRATE_REQ]: ['CalibrateReq', [['client_time', 's']]],
  [FrameType.CALIBRATE_RESP]: ['CalibrateResp', [['client_time', 's'], ['server_time', 'u']]],
  [FrameType.SEND_REQ]: ['SendReq', [['local_id', 'u'], ['conv', 't'], ['client_time', 's'], ['payload', 'b'], ['after_seq', 'u'],
    ['mentions', ['Mention'], []], ['mention_all', '?', false]]],
  [FrameType.SEND_ACK]: ['SendAck', [['local_id', 'u'], ['code', 'u'], ['msg_id', 'b'], ['seq', 'u'], ['server_time', 'u']]],
  [FrameType.PUSH]: ['Push', [['position', 'u'], ['messages', ['Message']]]],
  [FrameType.PUSH_ACK]: ['PushAck', [['position', 'u']]],
  [FrameType.READ]: ['Read', [['conv', 't'], ['seq', 'u']]],
  [FrameType.READ_STATES]: ['ReadStates', [['entries', ['ReadState']]]],
  [FrameType.READ_RECEIPT]: ['ReadReceipt', [['conv', 't'], ['reader', 't'], ['seq', 'u']]],
  [FrameType.HISTORY_REQ]: ['HistoryReq', [['req_id', 'u'], ['conv', 't'], ['from_seq', 'u'], ['limit', 'u'], ['backward', '?']]],
  [FrameType.HISTORY_RESP]: ['HistoryResp', [['req_id', 'u'], ['conv', 't'], ['code', 'u'], ['messages', ['Message']], ['more', '?']]],
  [FrameType.READERS_REQ]: ['ReadersReq', [['req_id', 'u'], ['conv', 't']]],
  [FrameType.READERS_RESP]: ['ReadersResp', [['req_id', 'u'], ['conv', 't'], ['code', 'u'], ['readers', ['Reader']], ['more_unused', null]]],
  [FrameType.AMEND_REQ]: ['AmendReq', [['local_id', 'u'], ['conv', 't'], ['target', 'u'], ['action', 'u'], ['client_time', 's'], ['payload', 'b']]],
  [FrameType.CONV_LIST_REQ]: ['ConvListReq', [['req_id', 'u'], ['cursor', 'b'], ['limit', 'u'], ['include_hidden', '?']]],
  [FrameType.CONV_LIST_RESP]: ['ConvListResp', [['req_id', 'u'], ['code', 'u'], ['entries', ['ConvEntry']], ['cursor', 'b'], ['more', '?']]],
  [FrameType.CONV_SET_REQ]: ['ConvSetReq', [['req_id', 'u'], ['conv', 't'], ['pinned', 'u'], ['muted', 'u'], ['hidden', 'u']]],
  [FrameType.CONV_SET_RESP]: ['ConvSetResp', [['req_id', 'u'], ['conv', 't'], ['code', 'u']]],
  [FrameType.CONV_UPDATE]: ['ConvUpdate', [['entries', ['ConvEntry']]]],
  [FrameType.CONV_PURGED]: ['ConvPurged', [['conv', 't'], ['last_seq', 'u'], ['gone', '?']]],
  [FrameType.TYPING]: ['Typing', [['conv', 't'], ['active', '?'], ['user', 't'], ['ttl_ms', 'u']]],
  [FrameType.PRESENCE_SUB]: ['PresenceSub', [['req_id', 'u'], ['users', ['PresenceUser']]]],
  [FrameType.PRESENCE]: ['Presence', [['req_id', 'u'], ['code', 'u'], ['entries', ['PresenceEntry']]]],
  [FrameType.PRESENCE_PRIVACY]: ['PresencePrivacy', [['mode', 'u']]],
  [FrameType.PING]: ['Ping', [['nonce', 'u']]],
  [FrameType.PONG]: ['Pong', [['nonce', 'u']]],
  [FrameType.ERROR]: ['Error', [['code', 'u'], ['ref', 'u'], ['reason', 't']]],
  [FrameType.CLOSE]: ['Close', [['code', 'u'], ['reason', 't']]],
};
// ReadersResp has exactly four fields; drop the placeholder above.
Frames[FrameType.READERS_RESP][1].pop();

export const TypeByName = Object.fromEntries(Object.entries(Frames).map(([t, [n]]) => [n, Number(t)]));

/** A decoding error: `code` is the ErrorCode (1..4) the spec assigns. */
export class ProtocolError extends Error {
  constructor(code, message) {
    super(`${codeName(ErrorCode, code)}: ${message}`);
    this.name = 'ProtocolError';
    this.code = code;
  }
}

/** Raised by the encoder for anything it cannot encode exactly. */
export class EncodeError extends TypeError {
  constructor(message) { super(message); this.name = 'EncodeError'; }
}

const U64_MAX = (1n << 64n) - 1n;
const S64_MIN = -(1n << 63n);
const S64_MAX = (1n << 63n) - 1n;
const utf8enc = new TextEncoder();
const utf8dec = new TextDecoder('utf-8', { fatal: true });

function toBig(v, what) {
  if (typeof v === 'bigint') return v;
  if (typeof v === 'number' && Number.isInteger(v)) return BigInt(v);
  throw new EncodeError(`${what} must be an integer (number or bigint), not ${typeof v}`);
}

class Writer {
  constructor() { this.buf = new Uint8Array(64); this.n = 0; }
  need(k) {
    if (this.n + k <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.n + k) size *= 2;
    const b = new Uint8Array(size); b.set(this.buf.subarray(0, this.n)); this.buf = b;
  }
  byte(x) { this.need(1); this.buf[this.n++] = x; }
  bytes(b) { this.need(b.length); this.buf.set(b, this.n); this.n += b.length; }
  uvar(v, what) {
    if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) {
      this.need(8);
      while (v >= 0x80) { this.buf[this.n++] = (v % 128) | 0x80; v = Math.floor(v / 128); }
      this.buf[this.n++] = v;
      return;
    }
    let b = toBig(v, what);
    if (b < 0n || b > U64_MAX) throw new EncodeError(`${what} out of range for u: ${v}`);
    this.need(10);
    while (b >= 0x80n) { this.buf[this.n++] = Number(b & 0x7fn) | 0x80; b >>= 7n; }
    this.buf[this.n++] = Number(b);
  }
  svar(v, what) {
    if (typeof v === 'number' && Number.isSafeInteger(v) && Math.abs(v) < 2 ** 52) {
      this.uvar(v >= 0 ? v * 2 : -v * 2 - 1, what);
      return;
    }
    const b = toBig(v, what);
    if (b < S64_MIN || b > S64_MAX) throw new EncodeError(`${what} out of range for s: ${v}`);
    this.uvar(b >= 0n ? b << 1n : ((-b) << 1n) - 1n, what);
  }
  blob(b, what) {
    if (!(b instanceof Uint8Array)) throw new EncodeError(`${what} must be a Uint8Array`);
    this.uvar(b.length, what); this.bytes(b);
  }
  text(s, what) {
    if (typeof s !== 'string') throw new EncodeError(`${what} must be a string`);
    if (!s.isWellFormed()) throw new EncodeError(`${what} holds a lone surrogate`);
    this.blob(utf8enc.encode(s), what);
  }
  out() { return this.buf.slice(0, this.n); }
}

function writeFields(w, fields, obj, where) {
  for (const [name, kind, dflt] of fields) {
    let v = obj[name];
    if (v === undefined) v = dflt;
    const what = `${where}.${name}`;
    if (v === undefined) throw new EncodeError(`${what} is missing`);
    if (kind === 'u') w.uvar(v, what);
    else if (kind === 's') w.svar(v, what);
    else if (kind === 'b') w.blob(v, what);
    else if (kind === 't') w.text(v, what);
    else if (kind === '?') {
      if (typeof v !== 'boolean') throw new EncodeError(`${what} must be a boolean`);
      w.byte(v ? 1 : 0);
    } else {
      if (!Array.isArray(v)) throw new EncodeError(`${what} must be an array`);
      w.uvar(v.length, what);
      for (const item of v) writeFields(w, Records[kind[0]], item, kind[0]);
    }
  }
}

/** The body of a frame (the bytes after `type`). `frame.type` is a FrameType. */
export function encodeBody(frame) {
  const spec = Frames[frame && frame.type];
  if (!spec) throw new EncodeError(`not a frame: type ${frame && frame.type}`);
  const w = new Writer();
  writeFields(w, spec[1], frame, spec[0]);
  return w.out();
}

function lengthPrefix(n) {
  const w = new Writer(); w.uvar(n, 'length'); return w.out();
}

/** Frame the body: length, head (version 4, flags), type, body. */
export function frameBytes(type, body, flags = 0) {
  const pre = lengthPrefix(body.length + 2);
  const out = new Uint8Array(pre.length + 2 + body.length);
  out.set(pre, 0);
  out[pre.length] = (PROTOCOL_VERSION << 4) | flags;
  out[pre.length + 1] = type;
  out.set(body, pre.length + 2);
  return out;
}

/** One uncompressed frame on the wire. */
export function encodeFrame(frame) {
  return frameBytes(frame.type, encodeBody(frame));
}

class Reader {
  constructor(buf) { this.buf = buf; this.i = 0; }
  left() { return this.buf.length - this.i; }
  uvar(max10 = true) {
    const buf = this.buf;
    let result = 0; let mul = 1; let big = null;
    for (let k = 0; k < 10; k++) {
      if (this.i >= buf.length) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'varint runs past the body');
      const byte = buf[this.i++];
      if (k === 9 && byte > 1) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'varint above 2^64-1');
      if (k > 0 && byte === 0) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'non-minimal varint');
      const low = byte & 0x7f;
      if (big === null && k < 7) { result += low * mul; mul *= 128; }
      else {
        if (big === null) big = BigInt(result);
        big += BigInt(low) << BigInt(7 * k);
      }
      if (!(byte & 0x80)) {
        if (big === null) return result;
        return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
      }
    }
    throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'varint longer than 10 bytes');
  }
  svar() {
    const u = this.uvar();
    if (typeof u === 'number') return u % 2 === 0 ? u / 2 : -(u + 1) / 2;
    const r = (u & 1n) ? -((u + 1n) >> 1n) : u >> 1n;
    return r >= BigInt(Number.MIN_SAFE_INTEGER) && r <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(r) : r;
  }
  count() {
    const n = this.uvar();
    if (typeof n !== 'number' || n > this.left()) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'length runs past the body');
    return n;
  }
  blob() { const n = this.count(); const b = this.buf.slice(this.i, this.i + n); this.i += n; return b; }
  text() {
    const b = this.blob();
    try { return utf8dec.decode(b); } catch { throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'text is not valid UTF-8'); }
  }
  bool() {
    if (this.i >= this.buf.length) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'bool runs past the body');
    const b = this.buf[this.i++];
    if (b > 1) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, `bool byte ${b}`);
    return b === 1;
  }
}

function readFields(r, fields, obj) {
  for (const [name, kind] of fields) {
    if (kind === 'u') obj[name] = r.uvar();
    else if (kind === 's') obj[name] = r.svar();
    else if (kind === 'b') obj[name] = r.blob();
    else if (kind === 't') obj[name] = r.text();
    else if (kind === '?') obj[name] = r.bool();
    else {
      const rec = Records[kind[0]];
      const n = r.uvar();
      if (typeof n !== 'number' || n > r.left() / rec.length) {
        throw new ProtocolError(ErrorCode.MALFORMED_FRAME, `list count ${n} exceeds the bytes left`);
      }
      const items = new Array(n);
      for (let k = 0; k < n; k++) { const it = {}; readFields(r, rec, it); items[k] = it; }
      obj[name] = items;
    }
  }
  return obj;
}

/** Decode a frame body of `type`; `{type, name, ...fields}`. */
export function decodeBody(type, body) {
  const spec = Frames[type];
  if (!spec) throw new ProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE, `type 0x${type.toString(16)}`);
  const r = new Reader(body);
  const obj = readFields(r, spec[1], { type, name: spec[0] });
  if (r.left() !== 0) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, `${r.left()} bytes left over after ${spec[0]}`);
  return obj;
}

/**
 * Streaming frame decoder (section 3).  feed(bytes) returns the frames
 * completed so far; an error poisons it (every later feed throws the same).
 * `inflate(body) -> Uint8Array` handles compressed frames (flag bit 0) once
 * compression is active downstream; without it such a frame is malformed.
 */
export class FrameDecoder {
  constructor({ maxFrameSize = 1 << 20 } = {}) {
    this.maxFrameSize = maxFrameSize;
    this.inflate = null;
    this.buf = new Uint8Array(0);
    this.i = 0;
    this.error = null;
  }
  /** Append bytes from the stream (split anywhere). */
  push(data) {
    if (data && data.length) {
      const rest = this.buf.subarray(this.i || 0);
      const b = new Uint8Array(rest.length + data.length);
      b.set(rest); b.set(data, rest.length); this.buf = b; this.i = 0;
    }
  }

  /**
   * The next complete frame, or null until more bytes arrive.  One at a
   * time, so that a LoginAck granting compression takes effect before the
   * frame behind it is parsed.  Throws ProtocolError (and stays poisoned).
   */
  next() {
    if (this.error) throw this.error;
    try {
      const buf = this.buf; const i = this.i || 0;
      // length prefix: at most 5 bytes, minimal, >= 2
      let len = 0; let mul = 1; let j = i; let done = false;
      while (j < buf.length && j - i < 5) {
        const byte = buf[j++];
        if (j - i > 1 && byte === 0) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'non-minimal length prefix');
        len += (byte & 0x7f) * mul; mul *= 128;
        if (!(byte & 0x80)) { done = true; break; }
        if (j - i === 5) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'length prefix longer than 5 bytes');
      }
      if (!done) return null;
      if (len < 2) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, `length ${len} < 2`);
      if (len > this.maxFrameSize) throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `frame of ${len} bytes > ${this.maxFrameSize}`);
      if (j < buf.length) {
        const head = buf[j];
        if (head >> 4 !== PROTOCOL_VERSION) throw new ProtocolError(ErrorCode.UNSUPPORTED_VERSION, `version ${head >> 4}`);
        if (head & 0x0e) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'reserved flag bit set');
        if ((head & 1) && !this.inflate) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'compressed frame while compression is not active');
      }
      if (j + 1 < buf.length && !Frames[buf[j + 1]]) {
        throw new ProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE, `type 0x${buf[j + 1].toString(16)}`);
      }
      if (buf.length - j < len) return null;
      const head = buf[j]; const type = buf[j + 1];
      let body = buf.subarray(j + 2, j + len);
      if (head & 1) body = this.inflate(body, this.maxFrameSize - 2);
      const f = decodeBody(type, body);
      this.i = j + len;
      return f;
    } catch (e) {
      this.error = e instanceof ProtocolError ? e : new ProtocolError(ErrorCode.MALFORMED_FRAME, String((e && e.message) || e));
      throw this.error;
    }
  }

  /** push(data), then every complete frame.  On an error, `error.frames` holds the frames decoded before it. */
  feed(data) {
    if (this.error) throw this.error;
    this.push(data);
    const out = [];
    try {
      for (let f = this.next(); f; f = this.next()) out.push(f);
    } catch (e) {
      e.frames = out; // frames decoded before the bad one stay valid
      throw e;
    }
    return out;
  }
}

/** Build a frame object: frame('SendReq', {...}) -> {type, name, ...}. */
export function frame(name, fields) {
  const type = TypeByName[name];
  if (type === undefined) throw new EncodeError(`no frame named ${name}`);
  return { type, name, ...fields };
}

// The id grammar (pimcore.ids, docs/PROTOCOL.md "Ids"): user ids are 1-64
// characters of A-Z a-z 0-9 _ . @ -; a direct id is d:<a>:<b> with a < b; any
// other id is a group's, 1-128 printable ASCII characters without spaces.
const ID_RE = /^[A-Za-z0-9_.@-]{1,64}$/;
const CONV_RE = /^[!-~]{1,131}$/;

/** A value quoted for a message, cut short (a refusal never quotes 1 MiB of id). */
export function showValue(v) {
  // (Control and bidirectional-override characters escaped: a trial's error quoted a raw NUL and U+202E.)
  const t = String(v).replace(/[\u0000-\u001f\u007f\u202a-\u202e\u2066-\u2069]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  return t.length > 70 ? `'${t.slice(0, 70)}'...(${t.length} chars)` : `'${t}'`;
}

/** Whether `v` is a valid user or device id (1-64 characters of A-Z a-z 0-9 _ . @ -). */
export function validId(v) {
  return typeof v === 'string' && ID_RE.test(v);
}

/** The two users of a well-formed direct (1:1) conversation id, else null. */
export function directMembers(conv) {
  if (typeof conv !== 'string' || !conv.startsWith('d:')) return null;
  const parts = conv.slice(2).split(':');
  if (parts.length !== 2) return null;
  const [a, b] = parts;
  return ID_RE.test(a) && ID_RE.test(b) && a < b ? [a, b] : null;
}

/** Why `conv` is not a valid conversation id, in words (pimcore.ids.conversation_problem), or null. */
export function conversationProblem(conv) {
  if (typeof conv !== 'string') return `a conversation id must be text, not ${conv === null ? 'null' : typeof conv}`;
  if (conv.startsWith('d:')) {
    return CONV_RE.test(conv) && directMembers(conv) ? null
      : `direct conversation id ${showValue(conv)} is not d:<a>:<b> with two valid user ids a < b (at most 131 characters)`;
  }
  return CONV_RE.test(conv) && conv.length <= 128 ? null
    : `group id ${showValue(conv)} is not 1-128 printable ASCII characters without spaces`;
}

/** The direct (1:1) conversation id of two users (section 8). */
export function directConv(a, b) {
  if (a === b) throw new Error('a direct conversation needs two different users');
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}
