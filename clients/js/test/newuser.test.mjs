// New-user findings (clients/js): each test failed before its fix.
// Loopback only; the install test asks the npm registry for pako (or the
// local npm cache).
import assert from 'node:assert/strict';
import { execSync, spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { PimcoreClient, State } from '../src/index.js';
import { Broker, PYTHON } from './broker.mjs';

const JS = fileURLToPath(new URL('..', import.meta.url));

/** A loopback port nothing listens on (bound, then closed). */
async function freePort() {
  const srv = createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

/** Fail the test if an unhandled rejection happens while fn runs. */
async function noUnhandled(fn) {
  const seen = [];
  const on = (e) => seen.push(e);
  process.on('unhandledRejection', on);
  try {
    const out = await fn();
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(seen.map(String), [], 'unhandled rejections');
    return out;
  } finally { process.off('unhandledRejection', on); }
}

describe('README install line', () => {
  test('the documented npm install gives a project pako too (a fresh clone has no node_modules)', () => {
    const readme = readFileSync(join(JS, 'README.md'), 'utf-8');
    const m = readme.match(/`(npm install [^`]*\.\/clients\/js)`/);
    assert.ok(m, 'README names an npm install of ./clients/js');
    const root = mkdtempSync(join(tmpdir(), 'pimcore-js-install-'));
    try {
      // The repository as a fresh clone has it: clients/js without node_modules.
      const pkg = join(root, 'repo', 'clients', 'js');
      for (const f of ['package.json', 'README.md', 'src']) cpSync(join(JS, f), join(pkg, f), { recursive: true });
      // The project lives next to the clone, not in it: the README's path, from there.
      const proj = join(root, 'app');
      mkdirSync(proj);
      writeFileSync(join(proj, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', type: 'module' }));
      execSync(`${m[1].replace('./clients/js', '../repo/clients/js')} --prefer-offline --no-audit --no-fund --loglevel=error`, { cwd: proj, stdio: 'pipe', timeout: 180000 });
      writeFileSync(join(proj, 'check.mjs'),
        "import { PimcoreClient } from '@pimcore/client';\nimport { deflateCompression } from '@pimcore/client/deflate';\n"
        + "console.log(typeof PimcoreClient, deflateCompression.caps);\n");
      const r = spawnSync(process.execPath, ['check.mjs'], { cwd: proj, encoding: 'utf-8' });
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /^function \d+/);
    } finally { rmSync(root, { recursive: true, force: true }); }
  });
});

describe('connect() failures', () => {
  test('a URL that is not ws:// or wss:// rejects connect(), no unhandled rejection', async () => {
    for (const url of ['tcp://127.0.0.1:7400', 'http://127.0.0.1:7400/', 'not a url']) {
      const err = await noUnhandled(async () => {
        const c = new PimcoreClient({ url, token: 'x' });
        try { await c.connect(); } catch (e) { return e; }
        return null;
      });
      assert.ok(err, `connect() rejected for ${url}`);
      assert.match(err.message, /ws:\/\/ or wss:\/\//, url);
      assert.ok(err.message.includes(url), url);
    }
    // A query or a fragment: refused as the Python SDK refuses it (a new user's trial: taken as it was).
    for (const url of ['ws://127.0.0.1:7480/im?x=1', 'ws://127.0.0.1:7480/im#top']) {
      const c = new PimcoreClient({ url, token: 'x' });
      await assert.rejects(c.connect(), (e) => e.name === 'ConnectFailed' && e.message === `cannot connect to ${url}: a URL to connect to has no query or fragment`);
    }
  });

  // A refused port or an unknown host: the first connect() rejects at once, saying so, as the Python
  // SDK's does (a new user's trial: it retried for connectTimeout, 10 s by default, then said it).
  test('a refused port or an unknown host: the first connect() rejects at once (not after connectTimeout), saying which', { timeout: 30000 }, async () => {
    const port = await freePort();
    for (const [url, said] of [[`ws://127.0.0.1:${port}/`, 'connection refused'], ['ws://no-such-host.invalid:7400/', "unknown host 'no-such-host.invalid'"]]) {
      const c = new PimcoreClient({ url, token: 'x', connectTimeout: 20000 });
      const t0 = Date.now();
      const err = await noUnhandled(() => c.connect().then(() => null, (e) => e));
      assert.ok(err, 'connect() rejected');
      assert.equal(err.name, 'ConnectFailed');
      assert.equal(err.message, `cannot connect to ${url}: ${said}`);
      assert.ok(Date.now() - t0 < 15000, `${Date.now() - t0} ms`);
      assert.equal(c.state, State.CLOSED);
    }
  });

  // 65,516: found by a reviewer, a token whose first Login just fit the
  // pre-login limit failed at every reconnect (a reconnect's Login also
  // carries the epoch and the inbox position), and the client reconnected
  // for ever.  The check counts the widest Login.
  for (const [size, what] of [[70000, 'is over'], [65516, "fits at first but a reconnect's would not"]]) {
    test(`a token whose Login ${what} the broker's pre-login limit (64 KiB): connect() rejects at once, before dialing, saying so`, { timeout: 30000 }, async () => {
      const port = await freePort();
      const url = `ws://127.0.0.1:${port}/`;
      const c = new PimcoreClient({ url, token: 'a'.repeat(size), device: 'd1', connectTimeout: 60000 });
      const err = await noUnhandled(() => c.connect().then(() => null, (e) => e));
      assert.ok(err, 'connect() rejected');
      assert.equal(err.name, 'ConnectFailed');
      assert.equal(err.message, `cannot connect to ${url}: the token is ${size.toLocaleString('en-US')} bytes: its Login frame`
        + ` (${(size + 45).toLocaleString('en-US')} bytes at most: a reconnect's carries the epoch and the inbox position) is`
        + " over the broker's pre-login limit (65,536 bytes: a frame before the Login is granted)");
      assert.equal(c.state, State.CLOSED);
      assert.equal(c.stats.connects, 0);
    });
  }

  test('a ws:// URL at a pimcore tcp:// listener: connect() rejects at once, naming the URL to try', { timeout: 30000 }, async () => {
    // (A new user's trial: it waited out connectTimeout, then said "no answer to the WebSocket upgrade".)
    const port = await freePort();
    const broker = await new Broker({ heartbeatMs: 30000, extra: ['--listen', `tcp://127.0.0.1:${port}`] }).start();
    try {
      const url = `ws://127.0.0.1:${port}/`;
      const c = new PimcoreClient({ url, token: broker.token('np-a'), connectTimeout: 20000 });
      const t0 = Date.now();
      const err = await noUnhandled(() => c.connect().then(() => null, (e) => e));
      assert.ok(err, 'connect() rejected');
      assert.equal(err.name, 'ConnectFailed');
      assert.equal(err.message, `cannot connect to ${url}: the server answered the WebSocket upgrade in pimcore's binary protocol`
        + ' (a tcp:// or tls:// listener, for the Python SDK: this client needs the broker\'s ws:// or wss:// listener)');
      assert.ok(Date.now() - t0 < 10000, `${Date.now() - t0} ms`);
      assert.equal(c.state, State.CLOSED);
    } finally {
      await broker.dispose();
    }
  });

  // A new user's trial (MEDIUM): a wss:// URL whose certificate Node does not trust waited out connectTimeout and
  // said "no answer to the WebSocket upgrade"; a ws:// URL at a TLS port said "try tcp://...", which this client
  // cannot use; so did a ws:// URL at a tcp:// listener.  A TLS server made with trustme (the Python tests' CA).
  const certs = (() => {
    const dir = mkdtempSync(join(tmpdir(), 'pimcore-js-tls-'));
    const r = spawnSync(PYTHON, ['-c', `import trustme, sys; ca = trustme.CA(); c = ca.issue_cert('127.0.0.1')
c.private_key_pem.write_to_path(sys.argv[1] + '/key.pem'); c.cert_chain_pems[0].write_to_path(sys.argv[1] + '/cert.pem')`, dir]);
    return r.status === 0 ? dir : null;
  })();
  test('a wss:// URL Node does not trust, or a ws:// URL at a TLS port: connect() rejects at once, saying which', { timeout: 30000, skip: certs ? false : 'trustme is not installed (pip install trustme)' }, async () => {
    const port = await freePort();
    const broker = await new Broker({ extra: ['--listen', `wss://127.0.0.1:${port}/im`, '--cert', join(certs, 'cert.pem'), '--key', join(certs, 'key.pem')] }).start();
    try {
      for (const [url, said] of [
        [`wss://127.0.0.1:${port}/im`, /^cannot connect to wss:\/\/127\.0\.0\.1:\d+\/im: TLS error: .*certificate.*\(NODE_EXTRA_CA_CERTS=ca\.pem trusts a private CA\)$/],
        [`ws://127.0.0.1:${port}/im`, /^cannot connect to ws:\/\/127\.0\.0\.1:\d+\/im: the server answered with TLS \(it requires TLS: try wss:\/\/127\.0\.0\.1:\d+\/im\)$/],
      ]) {
        const c = new PimcoreClient({ url, token: 'x', connectTimeout: 20000 });
        const t0 = Date.now();
        const err = await noUnhandled(() => c.connect().then(() => null, (e) => e));
        assert.ok(err, `connect() rejected for ${url}`);
        assert.match(err.message, said);
        assert.ok(Date.now() - t0 < 10000, `${Date.now() - t0} ms`);
      }
    } finally {
      await broker.dispose();
      rmSync(certs, { recursive: true, force: true });
    }
  });

  describe('a live broker', () => {
    let broker;
    before(async () => { broker = await new Broker({ heartbeatMs: 30000 }).start(); });
    after(async () => { await broker.dispose(); });

    test('a token function returning a too-large token on a reconnect: the client ends with ConnectFailed, not a reconnect loop', { timeout: 30000 }, async () => {
      let calls = 0;
      const token = () => (++calls === 1 ? broker.token('np-big') : 'a'.repeat(70000));
      const c = new PimcoreClient({ url: broker.url, token, device: 'd1', connectTimeout: 5000, backoffInitial: 50, backoffMax: 200 });
      const closed = new Promise((resolve) => c.on('closed', resolve));
      await c.connect();
      await broker.restart(); // the broker's Close(SHUTDOWN): the client reconnects, asking for a token
      const err = await closed;
      assert.equal(err.name, 'ConnectFailed');
      assert.equal(err.message, `cannot connect to ${broker.url}: the token is 70,000 bytes: its Login frame (70,045 bytes at most:`
        + " a reconnect's carries the epoch and the inbox position) is over the broker's pre-login limit (65,536 bytes: a"
        + ' frame before the Login is granted)');
      assert.equal(c.state, State.CLOSED);
      assert.equal(calls, 2);
      assert.equal(c.stats.connects, 1);
      await assert.rejects(c.send('d:np-big:np-other', 'after'), (e) => e.name === 'ConnectFailed');
    });

    test('a wrong path: connect() rejects naming the HTTP status and the listener path', { timeout: 30000 }, async () => {
      const url = broker.url.replace(/\/$/, '') + '/wrong';
      const c = new PimcoreClient({ url, token: broker.token('np-a'), connectTimeout: 1500 });
      const err = await noUnhandled(() => c.connect().then(() => null, (e) => e));
      assert.ok(err, 'connect() rejected');
      assert.equal(err.name, 'ConnectFailed');
      assert.match(err.message, /HTTP 404/);
      assert.match(err.message, /pimcore ws:\/\/ listener/);
    });

    test('the default connectTimeout is 10 s, and a right URL still connects', async () => {
      const c = new PimcoreClient({ url: broker.url, token: broker.token('np-b') });
      assert.equal(c.opts.connectTimeout, 10000);
      await c.connect();
      await c.close();
    });
  });
});
