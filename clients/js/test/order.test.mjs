// The display order against the Python reference (pimcore.order.interleave)
// on random conversations with skewed clocks, several devices and causality.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import { interleave } from '../src/order.js';
import { PYTHON, REPO } from './broker.mjs';

const SCRIPT = `
import json, random, sys
from pimcore.order import interleave
rng = random.Random(int(sys.argv[1]))
cases = []
for _ in range(300):
    n = rng.randint(0, 14)
    items = []
    for seq in range(1, n + 1):
        sender = rng.choice("ab" if rng.random() < 0.5 else "abc")
        device = rng.choice(["p", "l"])
        lid = rng.randint(1, 6) if rng.random() < 0.3 else seq * 10 + rng.randint(0, 3)
        after = rng.randint(0, seq + (2 if rng.random() < 0.1 else -1))
        items.append((sender, device, lid, max(0, after), seq if rng.random() > 0.1 else 0,
                      rng.randint(-5, 20), seq * 3 + rng.randint(0, 2), bytes([rng.randint(0, 3), seq])))
    cases.append({"items": [[*it[:7], list(it[7])] for it in items], "order": interleave(items)})
json.dump(cases, sys.stdout)
`;

test('interleave matches pimcore.order.interleave on 600 random cases', () => {
  for (const seed of [1, 2]) {
    const r = spawnSync(PYTHON, ['-c', SCRIPT, String(seed)], { env: { ...process.env, PYTHONPATH: REPO }, encoding: 'utf-8', maxBuffer: 1 << 26 });
    assert.equal(r.status, 0, r.stderr);
    for (const c of JSON.parse(r.stdout)) {
      const items = c.items.map(([sender, device, local_id, after_seq, seq, client_time, server_time, mid]) =>
        ({ sender, device, local_id, after_seq, seq, client_time, server_time, msg_id: Uint8Array.from(mid) }));
      assert.deepEqual(interleave(items), c.order, JSON.stringify(c.items));
    }
  }
});

test('a reply never shows above its question, even when the sender clock is ahead', () => {
  const m = (sender, device, local_id, after_seq, seq, client_time, server_time) =>
    ({ sender, device, local_id, after_seq, seq, client_time, server_time, msg_id: Uint8Array.of(seq) });
  // alice's phone is 5 min ahead: q1 (phone), r1 (bob, after q1), q2 (laptop, after r1)
  const items = [m('alice', 'phone', 1, 0, 1, 300_000_000, 10), m('bob', 'x', 1, 1, 2, 20, 20), m('alice', 'laptop', 1, 2, 3, 30, 30)];
  assert.deepEqual(interleave(items), [0, 1, 2]);
  assert.deepEqual(interleave([]), []);
});
