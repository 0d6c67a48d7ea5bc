// Copy the client's sources into the Python package's web demo
// (pimcore/web/static/client/), which the broker serves to browsers.
// tests/test_web.py fails when the two differ.
import { copyFileSync } from 'node:fs';

const src = new URL('../src/', import.meta.url);
const dst = new URL('../../../pimcore/web/static/client/', import.meta.url);
for (const name of ['codec.js', 'order.js', 'client.js', 'index.js']) copyFileSync(new URL(name, src), new URL(name, dst));
