// Test helper: a live `pimcore serve` (python -m pimcore.cli) with a ws://
// listener, and HS256 tokens made the way PROTOCOL.md section 8 says.
import { spawn, spawnSync } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const PYTHON = process.env.PIMCORE_PYTHON || 'python3';
export const REPO = fileURLToPath(new URL('../../..', import.meta.url));

function b64url(buf) { return Buffer.from(buf).toString('base64url'); }

export function makeToken(secret, user, { device, ttl = 3600 } = {}) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = { sub: user, aud: 'pimcore', exp: Math.floor(Date.now() / 1000) + ttl, iat: Date.now() / 1000 - 5 };
  if (device) claims.dev = device;
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url');
  return `${header}.${body}.${sig}`;
}

function env(secret) {
  const e = { ...process.env, PIMCORE_SECRET: secret, PYTHONUNBUFFERED: '1' };
  e.PYTHONPATH = e.PYTHONPATH ? `${REPO}:${e.PYTHONPATH}` : REPO;
  return e;
}

/** Run `pimcore ARGS` to completion (e.g. group create); returns stdout. */
export function pimcore(broker, ...args) {
  const r = spawnSync(PYTHON, ['-m', 'pimcore.cli', ...args, '--data-dir', broker.dataDir], { env: env(broker.secret), encoding: 'utf-8' });
  if (r.status !== 0) throw new Error(`pimcore ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

/** A running broker: .url (ws://), .httpUrl, .restart(), .stop(). */
export class Broker {
  constructor({ heartbeatMs = 1000, extra = [], http = false } = {}) {
    this.dataDir = mkdtempSync(join(tmpdir(), 'pimcore-js-'));
    this.secret = randomBytes(24).toString('hex');
    this.heartbeatMs = heartbeatMs;
    this.extra = extra;
    this.http = http;
    this.wsPort = 0;
    this.httpPort = 0;
  }

  token(user, opts) { return makeToken(this.secret, user, opts); }

  start() {
    const args = ['-m', 'pimcore.cli', 'serve', '--data-dir', this.dataDir, '--durability', 'os',
      '--listen', `ws://127.0.0.1:${this.wsPort}/`, '--heartbeat-ms', String(this.heartbeatMs), ...this.extra];
    if (this.http) args.push('--http', `tcp://127.0.0.1:${this.httpPort}`);
    this.proc = spawn(PYTHON, args, { env: env(this.secret), stdio: ['ignore', 'pipe', 'pipe'] });
    this.output = '';
    this.proc.stderr.on('data', (d) => { this.output += d; });
    return new Promise((resolve, reject) => {
      let buf = ''; let ready = false;
      const timer = setTimeout(() => reject(new Error(`broker not ready in 20 s:\n${this.output}${buf}`)), 20000);
      this.proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`broker exited (${code}):\n${this.output}${buf}`)); });
      this.proc.stdout.on('data', (d) => {
        if (ready) return;
        buf += d;
        for (const m of buf.matchAll(/^listening on (\S+)$/gm)) {
          const url = m[1];
          if (url.startsWith('ws://')) { this.url = url; this.wsPort = Number(new URL(url).port); }
          if (url.startsWith('http://') || url.startsWith('tcp://')) { this.httpUrl = url.replace(/^tcp:/, 'http:'); this.httpPort = Number(new URL(this.httpUrl).port); }
        }
        if (/^ready; Ctrl-C to stop$/m.test(buf)) { ready = true; clearTimeout(timer); this.proc.removeAllListeners('exit'); resolve(this); }
      });
    });
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return;
    const p = new Promise((resolve) => this.proc.on('exit', resolve));
    this.proc.kill('SIGTERM');
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 10000);
    await p; clearTimeout(t);
  }

  async restart() { await this.stop(); await this.start(); }

  async dispose() { await this.stop(); rmSync(this.dataDir, { recursive: true, force: true }); }
}

/** Resolve when `pred()` is true (polled), or reject after `ms`. */
export async function until(pred, ms = 10000, what = 'condition') {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
