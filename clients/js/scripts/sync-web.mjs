// Copy the client's sources into the Python package's web demo
// (pimcore/web/static/client/, and pako's browser build into static/vendor/),
// which the broker serves to browsers.
// tests/test_web.py fails when the two differ.
import { copyFileSync } from 'node:fs';

const src = new URL('../src/', import.meta.url);
const dst = new URL('../../../pimcore/web/static/client/', import.meta.url);
for (const name of ['codec.js', 'order.js', 'client.js', 'index.js', 'deflate-core.js']) copyFileSync(new URL(name, src), new URL(name, dst));
// pako for the page's deflate streams: its browser build (a `pako` global), with its licence
const vendor = new URL('../../../pimcore/web/static/vendor/', import.meta.url);
copyFileSync(new URL('../node_modules/pako/dist/pako.min.js', import.meta.url), new URL('pako.min.js', vendor));
copyFileSync(new URL('../node_modules/pako/LICENSE', import.meta.url), new URL('pako-LICENSE.txt', vendor));
