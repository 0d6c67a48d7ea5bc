import type { Compression } from './index.js';
export declare function createInflater(): (zbody: Uint8Array, maxBytes: number) => Uint8Array;
export declare function createDeflater(): (body: Uint8Array) => Uint8Array;
/** CAP_DEFLATE_DOWN | CAP_DEFLATE_UP via pako (PROTOCOL.md section 7.2). */
export declare const deflateCompression: Compression;
/** The same with a given pako module (e.g. the `pako` global of pako.min.js in a page). */
export declare function deflateCompressionWith(pako: unknown): Compression;
