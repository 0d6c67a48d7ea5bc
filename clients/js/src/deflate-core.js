// Per-connection deflate streams (PROTOCOL.md section 7.2) on top of a
// given pako module (deflate.js passes the npm package; a page may pass the
// `pako` global of pako.min.js).  It does not import pako, so browsers load
// it without a bundler or an import map.
import { CAP_DEFLATE_DOWN, CAP_DEFLATE_UP, ErrorCode, ProtocolError } from './codec.js';

const TAIL = new Uint8Array([0x00, 0x00, 0xff, 0xff]);
const Z_SYNC_FLUSH = 2;

/** The downstream stream: inflate(zbody, maxBytes) -> body. */
function inflaterWith(pako) {
  const inf = new pako.Inflate({ raw: true, windowBits: 15, chunkSize: 16384 });
  let chunks = []; let size = 0; let limit = 0; let over = false;
  inf.onData = (chunk) => {
    size += chunk.length;
    if (size > limit) { over = true; throw new ProtocolError(ErrorCode.FRAME_TOO_LARGE, `compressed body inflates to more than ${limit} bytes`); }
    chunks.push(chunk.slice());
  };
  return function inflate(zbody, maxBytes) {
    chunks = []; size = 0; limit = maxBytes;
    const data = new Uint8Array(zbody.length + 4);
    data.set(zbody); data.set(TAIL, zbody.length);
    try {
      inf.push(data, Z_SYNC_FLUSH);
    } catch (e) {
      if (over) throw e;
      throw new ProtocolError(ErrorCode.MALFORMED_FRAME, `compressed body does not inflate: ${e.message}`);
    }
    if (inf.err) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, `compressed body does not inflate: ${inf.msg}`);
    if (inf.ended) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'compressed body ends the deflate stream (BFINAL)');
    if (size === 0) throw new ProtocolError(ErrorCode.MALFORMED_FRAME, 'compressed body inflates to 0 bytes');
    const out = new Uint8Array(size); let o = 0;
    for (const c of chunks) { out.set(c, o); o += c.length; }
    return out;
  };
}

/** The upstream stream (window 2^11): deflate(body) -> zbody. */
function deflaterWith(pako) {
  const def = new pako.Deflate({ raw: true, windowBits: 11, memLevel: 1, level: 6 });
  let chunks = [];
  def.onData = (chunk) => { chunks.push(chunk.slice()); };
  return function deflate(body) {
    chunks = [];
    def.push(body, Z_SYNC_FLUSH);
    let size = 0; for (const c of chunks) size += c.length;
    const out = new Uint8Array(size); let o = 0;
    for (const c of chunks) { out.set(c, o); o += c.length; }
    return out.subarray(0, size - 4); // strip the sync flush's 00 00 ff ff
  };
}

/** The client's `compression` option (CAP_DEFLATE_DOWN | CAP_DEFLATE_UP) using `pako`. */
export function deflateCompressionWith(pako) {
  return Object.freeze({
    caps: CAP_DEFLATE_DOWN | CAP_DEFLATE_UP,
    createInflater: () => inflaterWith(pako),
    createDeflater: () => deflaterWith(pako),
    minBody: 16,
  });
}
