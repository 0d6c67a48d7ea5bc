// Interop with the Python SDK (pimcore.client): a Python client receives
// what the JS client sends, and the other way round, through one broker.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { after, before, test } from 'node:test';
import { PimcoreClient, directConv } from '../src/index.js';
import { deflateCompression } from '../src/deflate.js';
import { Broker, PYTHON, REPO, until } from './broker.mjs';

const PY = `
import json, sys, trio
from pimcore.client import open_client

async def main(url, token):
    async with open_client(url, token, device="py") as c:
        conv = "d:js:py"
        sent = await c.send(conv, "from python \\u00e9".encode())
        print(json.dumps({"sent_seq": sent.seq}), flush=True)
        with trio.fail_after(20):
            async for m in c.messages():
                if m.sender == "js":
                    print(json.dumps({"got": m.payload.decode(), "seq": m.seq, "device": m.device,
                                      "after_seq": m.after_seq}), flush=True)
                    break
        await c.mark_read(conv, 2)
        with trio.fail_after(10):
            while (c.read_state(conv) is None) or c.read_state(conv).read_seq < 2 or c.read_state(conv).unread:
                await trio.sleep(0.02)
        print(json.dumps({"done": True}), flush=True)

trio.run(main, sys.argv[1], sys.argv[2])
`;

let broker;
before(async () => { broker = await new Broker().start(); });
after(async () => { await broker.dispose(); });

test('JS <-> Python SDK through one broker (deflate on both)', async () => {
  const js = new PimcoreClient({ url: broker.url, token: broker.token('js'), device: 'node', compression: deflateCompression });
  const got = []; js.on('message', (m) => got.push(m));
  const receipts = []; js.on('receipt', (r) => receipts.push(r));
  await js.connect();
  const proc = spawn(PYTHON, ['-c', PY, broker.url, broker.token('py')], { env: { ...process.env, PYTHONPATH: REPO } });
  const lines = []; let err = ''; let out = '';
  proc.stdout.on('data', (d) => { // whole lines only: a chunk may end mid-line
    out += d;
    const parts = out.split('\n'); out = parts.pop();
    for (const l of parts) if (l.trim()) lines.push(JSON.parse(l));
  });
  proc.stderr.on('data', (d) => { err += d; });
  const exited = new Promise((resolve) => proc.on('exit', resolve));
  try {
    await until(() => got.length === 1, 20000, 'the Python message');
    assert.equal(new TextDecoder().decode(got[0].payload), 'from python é');
    assert.equal(got[0].sender, 'py'); assert.equal(got[0].device, 'py'); assert.equal(got[0].seq, 1);
    const s = await js.send(directConv('js', 'py'), 'from js 🙂');
    assert.equal(s.seq, 2);
    await until(() => lines.some((l) => l.done), 20000, 'the Python side to finish');
    const g = lines.find((l) => l.got);
    assert.deepEqual(g, { got: 'from js 🙂', seq: 2, device: 'node', after_seq: 1 });
    await until(() => receipts.length === 1, 5000, 'the receipt of the Python read');
    assert.deepEqual(receipts[0], { conv: 'd:js:py', reader: 'py', seq: 2 });
    assert.equal(await exited, 0, err);
  } finally {
    proc.kill();
    await js.close();
  }
});
