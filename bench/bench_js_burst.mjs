// A burst of sends through the JS SDK against a rate-limited broker: the JS
// twin of bench_sdk_burst.py.
//
//   node --experimental-websocket bench/bench_js_burst.mjs [rounds=3] [sends=1500] [durability=sync] [limits]
//
// (with PYTHONPATH naming this checkout, or the package installed: each round
// starts a fresh `python -m pimcore.cli serve` as the JS tests do, ws:// on
// loopback.)  One PimcoreClient starts `sends` concurrent send() calls to one
// 1:1 conversation.  By default the broker has the limits `pimcore serve`
// uses: window 256, send_rate 2,000/s per connection, send_burst 512; the
// bucket's 512 tokens go at once, the other 988 sends no faster than the
// refill, so the floor is about 0.5 s.  `limits` overrides some, e.g.
// send_rate=500,send_burst=50,window=8 (a bucket that binds even where the
// broker itself is slower than 2,000 sends/s).  Printed per round: seconds
// from the first send() to the last ack, congestion events, retransmits; then
// the median.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PimcoreClient, directConv } from '../clients/js/src/index.js';
import { Broker } from '../clients/js/test/broker.mjs';

const rounds = Number(process.argv[2] || 3);
const SENDS = Number(process.argv[3] || 1500);
const durability = process.argv[4] || 'sync'; // pimcore serve's default
const limits = (process.argv[5] || '').split(',').filter(Boolean).map((kv) => kv.split('='));
const payload = 'x'.repeat(100);
const took = [];
for (let r = 0; r < rounds; r++) {
  const broker = new Broker({ heartbeatMs: 15000, extra: ['--durability', durability] });
  if (limits.length) {
    const cfg = join(broker.dataDir, 'limits.toml');
    writeFileSync(cfg, `[limits]\n${limits.map(([k, v]) => `${k} = ${v}`).join('\n')}\n`);
    broker.extra.push('--config', cfg);
  }
  await broker.start();
  try {
    const c = new PimcoreClient({ url: broker.url, token: broker.token('alice'), device: 'bench', sendTimeout: 300000 });
    await c.connect();
    const conv = directConv('alice', 'bob');
    const t0 = performance.now();
    const sent = await Promise.all(Array.from({ length: SENDS }, () => c.send(conv, payload)));
    const s = (performance.now() - t0) / 1000;
    if (sent.some((m, i) => m.seq !== i + 1)) throw new Error('a send lost or out of order');
    took.push(s);
    console.log(`round ${r + 1}: ${SENDS} sends in ${s.toFixed(3)} s (${Math.round(SENDS / s)}/s), congestion events ${c.stats.congestionEvents}, retransmits ${c.stats.retransmits}`);
    await c.close();
  } finally {
    await broker.dispose();
  }
}
took.sort((a, b) => a - b);
console.log(`median of ${rounds}: ${took[Math.floor(rounds / 2)].toFixed(3)} s`);
