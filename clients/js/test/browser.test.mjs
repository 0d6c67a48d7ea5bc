// The web demo (pimcore serve --web --demo) in a real browser: Debian's
// Chromium driven by playwright-core (never a downloaded browser build).
// Two browser contexts chat both ways; one goes offline while the other
// writes, then catches up; the broker restarts and both reconnect without
// loss; read marks and unread badges appear; a screenshot is written to
// $PIMCORE_ARTIFACTS (pytest's tmp dir) or clients/js/artifacts/.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Broker } from './broker.mjs';

const CANDIDATES = [process.env.PIMCORE_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].filter(Boolean);
const chromiumPath = CANDIDATES.find((p) => existsSync(p));
let playwright = null;
try { playwright = await import('playwright-core'); } catch { /* skipped below */ }
const skip = !playwright ? 'playwright-core is not installed (npm ci in clients/js)'
  : !chromiumPath ? `no Chromium at ${CANDIDATES.join(' or ')} (apt-get install chromium, or set PIMCORE_CHROMIUM)` : false;
if (skip) console.log(`# browser tests skipped: ${skip}`);

const ARTIFACTS = process.env.PIMCORE_ARTIFACTS || fileURLToPath(new URL('../artifacts/', import.meta.url));

describe('web demo in Chromium', { skip }, () => {
  let broker; let browser;
  before(async () => {
    broker = await new Broker({ http: true, extra: ['--web', '--demo'] }).start();
    browser = await playwright.chromium.launch({ executablePath: chromiumPath, headless: true, args: ['--no-sandbox'] });
  });
  after(async () => {
    if (browser) await browser.close();
    if (broker) await broker.dispose();
  });

  async function signIn(user) {
    const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => console.log(`# ${user} page error: ${e.message}`));
    await page.goto(`${broker.httpUrl}/web/`);
    await page.getByTestId('demo-banner').waitFor({ state: 'visible' });
    await page.getByTestId('user').fill(user);
    await page.getByTestId('signin').click();
    await connected(page);
    return { context, page };
  }
  const connected = (page) => page.locator('#status[data-state="ACTIVE"]').waitFor({ timeout: 20000 });
  const texts = (page) => page.locator('#messages li .text').allTextContents();
  const until = async (fn, what, ms = 20000) => {
    const end = Date.now() + ms;
    for (;;) {
      const r = await fn();
      if (r) return r;
      if (Date.now() > end) throw new Error(`timed out: ${what}`);
      await new Promise((res) => setTimeout(res, 50));
    }
  };
  async function say(page, text) {
    await page.getByTestId('text').fill(text);
    await page.getByTestId('send').click();
  }
  const eq = (a, b) => JSON.stringify(a) === JSON.stringify(b);

  test('two users chat, go offline, survive a broker restart; marks, badges, screenshot', async () => {
    const a = await signIn('alice');
    const b = await signIn('bob');
    assert.match(await a.page.getByTestId('demo-banner').textContent(), /anyone/);
    // deflate streams both ways, in the browser too (pako's browser build)
    assert.equal(await a.page.evaluate(() => window.pimcoreClient.compressionCaps), 6);

    // 1:1 both ways, unread badge, read mark
    await a.page.getByTestId('peer').fill('bob');
    await a.page.getByTestId('open-chat').click();
    await say(a.page, 'hello bob');
    await a.page.locator('#messages li[data-mine="true"] [data-mark="sent"], #messages li[data-mine="true"] [data-mark="read"]').first().waitFor();
    const bobConv = b.page.locator('#convs li[data-conv="d:alice:bob"]');
    await bobConv.locator('.badge[data-unread="1"]').waitFor();
    await bobConv.click();
    await until(async () => eq(await texts(b.page), ['hello bob']), 'bob sees the message');
    await bobConv.locator('.badge[data-unread="0"]').waitFor({ state: 'attached' });
    await a.page.locator('#messages [data-mark="read"]').first().waitFor();
    await say(b.page, 'hi alice');
    await until(async () => eq(await texts(a.page), ['hello bob', 'hi alice']), 'alice sees the reply');

    // bob goes offline; alice writes; bob catches up
    await b.context.setOffline(true);
    await b.page.locator('#status[data-state="DISCONNECTED"]').waitFor({ timeout: 10000 });
    for (const t of ['while you were away 1', 'while you were away 2', 'while you were away 3']) await say(a.page, t);
    await until(async () => (await a.page.locator('#messages [data-mark="sent"]').count()) === 3, 'stored while bob is away');
    await b.context.setOffline(false);
    await connected(b.page);
    const afterOffline = ['hello bob', 'hi alice', 'while you were away 1', 'while you were away 2', 'while you were away 3'];
    await until(async () => eq(await texts(b.page), afterOffline), 'bob catches up');
    await until(async () => (await a.page.locator('#messages [data-mark="read"]').count()) === 4, 'read marks on all four of alice\'s');

    // the broker restarts: both reconnect, a message written meanwhile is not lost
    const statesSeen = [];
    await b.page.exposeFunction('noteState', (s) => statesSeen.push(s));
    await b.page.evaluate(() => window.pimcoreClient.on('state', (s) => window.noteState(s)));
    await broker.stop();
    await a.page.locator('#status[data-state="DISCONNECTED"]').waitFor({ timeout: 10000 });
    await say(a.page, 'during the restart');
    await a.page.locator('#messages [data-mark="sending"]').waitFor();
    await broker.start();
    await connected(a.page); await connected(b.page);
    await a.page.locator('#messages [data-mark="sending"]').waitFor({ state: 'detached', timeout: 20000 });
    await say(b.page, 'back again');
    const all = [...afterOffline, 'during the restart', 'back again'];
    await until(async () => eq(await texts(b.page), all), 'bob has everything after the restart');
    await until(async () => eq(await texts(a.page), all), 'alice has everything after the restart');
    assert.ok(statesSeen.includes('DISCONNECTED') && statesSeen.at(-1) === 'ACTIVE', statesSeen.join(','));

    // a group: created from the page (demo), fan-out, badge
    await a.page.getByTestId('group-name').fill('team');
    await a.page.getByTestId('group-members').fill('bob');
    await a.page.getByTestId('create-group').click();
    await a.page.getByTestId('chat-title').filter({ hasText: '# team' }).waitFor();
    await say(a.page, 'hello team');
    await b.page.locator('#convs li[data-conv="team"] .badge[data-unread="1"]').waitFor();
    await b.page.locator('#convs li[data-conv="team"]').click();
    await until(async () => (await texts(b.page)).includes('hello team'), 'bob sees the group message');
    await a.page.locator('#messages [data-mark="read"]').first().waitFor({ timeout: 10000 });

    // the 1:1 chat for the screenshot, alice's side
    await a.page.locator('#convs li[data-conv="d:alice:bob"]').click();
    await until(async () => eq(await texts(a.page), all), 'alice back in the 1:1 chat');
    mkdirSync(ARTIFACTS, { recursive: true });
    const shot = join(ARTIFACTS, 'web-demo.png');
    await a.page.screenshot({ path: shot, fullPage: true });
    assert.ok(existsSync(shot));
    console.log(`# screenshot: ${shot}`);
    await a.context.close(); await b.context.close();
  });

  test('bad user names, oversize and bidi text, an outage longer than the send timeout, a second tab, leaving with a message unsent', async () => {
    // an invalid user id: the token endpoint's 400 is shown, sign-in works again
    const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
    const page = await context.newPage();
    await page.goto(`${broker.httpUrl}/web/`);
    await page.getByTestId('user').fill('ali ce');
    await page.getByTestId('signin').click();
    await page.getByTestId('login-error').filter({ hasText: "user id 'ali ce' has the character ' '" }).waitFor({ timeout: 10000 });
    assert.equal(await page.getByTestId('signin').isEnabled(), true);
    await page.getByTestId('user').fill('uma');
    await page.getByTestId('signin').click();
    await connected(page);
    const v = await signIn('vic');
    await page.getByTestId('peer').fill('vic');
    await page.getByTestId('open-chat').click();

    // a U+202E in a message cannot move the mark: it stays right of the text
    await say(page, 'pay \u202Etnuocca ot 001$');
    const li = page.locator('#messages li[data-mine="true"]').first();
    await li.locator('[data-mark="sent"], [data-mark="read"]').waitFor();
    const tb = await li.locator('.text').boundingBox(); const mb = await li.locator('.mark').boundingBox();
    assert.ok(mb.x >= tb.x + tb.width - 1, `mark at ${mb.x}, text ends at ${tb.x + tb.width}`);

    // above max_payload: refused at once, with the reason on the mark
    await say(page, 'z'.repeat(70000));
    await page.locator('#messages [data-mark="failed"]').filter({ hasText: 'PAYLOAD_TOO_LARGE' }).waitFor({ timeout: 5000 });

    // offline longer than the send timeout: the message stays "sending" and goes once back online
    await page.evaluate(() => { window.pimcoreClient.opts.sendTimeout = 1000; });
    await context.setOffline(true);
    await page.locator('#status[data-state="DISCONNECTED"]').waitFor({ timeout: 10000 });
    await say(page, 'typed while offline');
    await new Promise((r) => setTimeout(r, 3500));
    assert.equal(await page.locator('#messages [data-mark="sending"]').count(), 1, 'still sending after 3 send timeouts');
    await context.setOffline(false);
    await connected(page);
    await page.locator('#messages [data-mark="sending"]').waitFor({ state: 'detached', timeout: 20000 });
    await v.page.locator('#convs li[data-conv="d:uma:vic"]').click();
    await until(async () => (await texts(v.page)).filter((t) => t === 'typed while offline').length === 1, 'vic gets it once');

    // another tab of the same user is another device: both stay connected
    // (one device id for both replaced the first tab for good: a trial), and
    // what one sends shows in the other as the user's own
    const device = () => window.pimcoreClient.device;
    const page2 = await context.newPage();
    await page2.goto(`${broker.httpUrl}/web/`);
    await page2.getByTestId('user').fill('uma');
    await page2.getByTestId('signin').click();
    await connected(page2);
    assert.notEqual(await page2.evaluate(device), await page.evaluate(device));
    await page2.locator('#convs li[data-conv="d:uma:vic"]').click();
    await say(page2, 'from the second tab');
    await until(async () => (await texts(page)).includes('from the second tab'), 'the first tab shows it');
    assert.equal(await page.locator('#status').getAttribute('data-state'), 'ACTIVE');
    assert.equal(await page.getByTestId('closed-reason').isVisible(), false);
    // a reload keeps the tab's device (its inbox position and local ids)
    const before = await page2.evaluate(device);
    await page2.reload();
    await page2.getByTestId('user').fill('uma');
    await page2.getByTestId('signin').click();
    await connected(page2);
    assert.equal(await page2.evaluate(device), before);

    // a message not acked yet is lost with the page: leaving asks first
    await context.setOffline(true);
    await page2.locator('#status[data-state="DISCONNECTED"]').waitFor({ timeout: 10000 });
    await page2.locator('#convs li[data-conv="d:uma:vic"]').click();
    await say(page2, 'not sent yet');
    await page2.locator('#messages [data-mark="sending"]').waitFor();
    const asked = new Promise((resolve) => page2.once('dialog', (d) => { resolve(d.type()); d.accept(); }));
    const closed = page2.waitForEvent('close');
    await page2.close({ runBeforeUnload: true }); // (returns before the page is gone: the dialog decides)
    assert.equal(await asked, 'beforeunload');
    await closed;
    await context.close(); await v.context.close();
  });

  test("a refusal the client cannot tie to a call ('brokerRefused') is shown on the page, as the chat prints it", async () => {
    // A Read has no request id: the broker's refusal of it (here a group
    // that does not exist) reached the client's 'brokerRefused' event, and
    // the page said nothing.
    const w = await signIn('wes');
    const area = w.page.getByTestId('refusals');
    assert.equal(await area.isVisible(), false, 'nothing refused yet: nothing shown');
    await w.page.evaluate(() => window.pimcoreClient.markRead('nosuch', 1));
    const shown = area.locator('li').filter({ hasText: 'UNKNOWN_CONVERSATION' });
    await shown.waitFor({ timeout: 10000 });
    assert.equal(await area.isVisible(), true);
    const said = await shown.textContent();
    assert.match(said, /^⚠ the broker refused a request \(UNKNOWN_CONVERSATION\): .*nosuch/, said);
    assert.equal(await shown.getAttribute('data-code'), 'UNKNOWN_CONVERSATION');
    await w.context.close();
  });

  test('without --demo the page asks for a token and mints none', async () => {
    const plain = await new Broker({ http: true, extra: ['--web'] }).start();
    const context = await browser.newContext();
    try {
      const page = await context.newPage();
      await page.goto(`${plain.httpUrl}/web/`);
      await page.getByTestId('token').waitFor({ state: 'visible' });
      assert.equal(await page.getByTestId('demo-banner').isVisible(), false);
      assert.equal(await page.getByTestId('user').isVisible(), false);
      const refused = await page.evaluate(async () => (await fetch('/web/token', { method: 'POST', body: '{"user":"x"}' })).status);
      assert.equal(refused, 403);
      await page.getByTestId('signin').click();
      await page.getByTestId('login-error').filter({ hasText: 'paste a token' }).waitFor();
      await page.getByTestId('token').fill(plain.token('zoe'));
      await page.getByTestId('signin').click();
      await connected(page);
      assert.match(await page.getByTestId('me').textContent(), /^zoe /);
    } finally {
      await context.close();
      await plain.dispose();
    }
  });
});
