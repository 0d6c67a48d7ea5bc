// Per-connection deflate streams (PROTOCOL.md section 7.2) with the pako
// npm package.  Pass `deflateCompression` as the client's `compression`
// option; without it the client asks for no compression (Login.caps = 0).
import pako from 'pako';
import { deflateCompressionWith } from './deflate-core.js';

export { deflateCompressionWith };
export const deflateCompression = deflateCompressionWith(pako);
/** The downstream stream: inflate(zbody, maxBytes) -> body. */
export const createInflater = deflateCompression.createInflater;
/** The upstream stream (window 2^11): deflate(body) -> zbody. */
export const createDeflater = deflateCompression.createDeflater;
