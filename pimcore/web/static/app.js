// The web demo: one page (tab) = one device of one user, over the broker's
// WebSocket listener, with the JavaScript client (./client/, a copy of
// clients/js/src).  Plain DOM, re-rendered on every client event.
import { PimcoreClient, MessageKind, directConv } from '/web/client/index.js';
import { deflateCompressionWith } from '/web/client/deflate-core.js';

const $ = (sel) => document.querySelector(sel);
const dec = new TextDecoder();
const text = (m) => dec.decode(m.payload);

let cfg = { ws: [], demo: false };
let client = null;
let me = null;
let current = null; // the open conversation
const known = new Set(); // conversations in the list
const fetched = new Set(); // conversations whose recent history was fetched
const pending = new Map(); // conv -> [{key, text}] sends not acked yet
const groupReads = new Map(); // conv -> [{user, read_seq}]
let keySeq = 0;

function wsUrl() {
  const u = new URL(cfg.ws[0]);
  if (u.hostname === '0.0.0.0' || u.hostname === '[::]') u.hostname = location.hostname;
  if (location.protocol === 'https:' && u.protocol === 'ws:') u.protocol = 'wss:';
  return u.toString();
}

function title(conv) {
  if (conv.startsWith('d:')) {
    const [, a, b] = conv.split(':');
    return a === me ? b : a;
  }
  return `# ${conv}`;
}

async function post(path, body) {
  const r = await fetch(path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const j = await r.json();
  if (!r.ok) throw new Error(j.error ? j.error.message : `HTTP ${r.status}`);
  return j;
}

// ------------------------------------------------------------ rendering
let scheduled = false;
function render() {
  if (scheduled) return;
  scheduled = true;
  setTimeout(() => { scheduled = false; draw(); }, 0);
}

function draw() {
  const list = $('#convs');
  list.textContent = '';
  const convs = [...known].sort((a, b) => lastTime(b) - lastTime(a) || (a < b ? -1 : 1));
  for (const conv of convs) {
    const li = document.createElement('li');
    li.dataset.conv = conv;
    li.dataset.testid = 'conv';
    if (conv === current) li.className = 'current';
    const name = document.createElement('span'); name.textContent = title(conv);
    const badge = document.createElement('span'); badge.className = 'badge';
    const n = client ? client.unread(conv) : 0;
    badge.textContent = String(n); badge.dataset.unread = String(n); badge.dataset.testid = 'badge';
    li.append(name, badge);
    li.onclick = () => open(conv);
    list.append(li);
  }
  const ul = $('#messages');
  ul.textContent = '';
  if (!current) return;
  $('#chat-title').textContent = title(current);
  const peer = current.startsWith('d:') ? title(current) : null;
  for (const m of client.view(current)) {
    const li = document.createElement('li');
    li.className = 'msg';
    li.dataset.seq = String(m.seq);
    if (m.kind !== MessageKind.MESSAGE) {
      li.classList.add('notice');
      const by = dec.decode(m.payload);
      li.textContent = `${m.sender} ${m.kind === MessageKind.JOINED ? 'joined' : 'left'}${by ? ` (by ${by})` : ''}`;
      ul.append(li); continue;
    }
    const mine = m.sender === me;
    li.dataset.mine = String(mine);
    const who = document.createElement('span'); who.className = 'who'; who.textContent = mine ? 'me' : (m.sender || 'system');
    const body = document.createElement('span'); body.className = 'text'; body.textContent = text(m);
    li.append(who, body);
    if (mine) {
      const read = peer ? client.receipt(current, peer) >= m.seq
        : (groupReads.get(current) || []).some((r) => r.user !== me && r.read_seq >= m.seq);
      li.append(markSpan(read ? 'read' : 'sent'));
    }
    ul.append(li);
  }
  for (const p of pending.get(current) || []) {
    const li = document.createElement('li');
    li.className = 'msg'; li.dataset.mine = 'true'; li.dataset.pending = 'true';
    const who = document.createElement('span'); who.className = 'who'; who.textContent = 'me';
    const body = document.createElement('span'); body.className = 'text'; body.textContent = p.text;
    const mark = markSpan(p.failed ? 'failed' : 'sending');
    if (p.failed) { mark.textContent = `✗ failed: ${p.reason}`; mark.title = p.reason; }
    li.append(who, body, mark);
    ul.append(li);
  }
  ul.scrollTop = ul.scrollHeight;
}

function markSpan(mark) {
  const s = document.createElement('span');
  s.className = 'mark'; s.dataset.mark = mark; s.dataset.testid = 'mark';
  s.textContent = { sending: '⏳ sending', sent: '✓ sent', read: '✓✓ read', failed: '✗ failed' }[mark];
  s.title = { sending: 'not acked by the broker yet', sent: 'stored by the broker in the recipients\' inboxes', read: 'read by the recipient', failed: 'refused' }[mark];
  return s;
}

const lastTimes = new Map();
function lastTime(conv) { return lastTimes.get(conv) || 0; }

// ------------------------------------------------------------ behaviour
function addConv(conv) {
  if (!known.has(conv)) { known.add(conv); render(); }
  if (!fetched.has(conv) && client && client.state === 'ACTIVE') {
    fetched.add(conv);
    client.history(conv, { backward: true, limit: 50 }).then(() => { markIfOpen(); render(); }, () => fetched.delete(conv));
  }
}

function markIfOpen() {
  if (!current || document.visibilityState !== 'visible') return;
  const v = client.view(current);
  const last = v.length ? v[v.length - 1].seq : 0;
  const rs = client.readState(current);
  const target = Math.max(last, rs ? rs.last_seq : 0);
  if (target > 0 && (!rs || rs.read_seq < target)) client.markRead(current, target);
}

async function refreshGroupReads() {
  if (!current || current.startsWith('d:') || !client || client.state !== 'ACTIVE') return;
  const conv = current;
  try { groupReads.set(conv, await client.readers(conv)); render(); } catch { /* not a member any more */ }
}

function open(conv) {
  current = conv;
  addConv(conv);
  $('#compose').hidden = false;
  markIfOpen();
  refreshGroupReads();
  render();
  $('#text').focus();
}

async function sendText(conv, body) {
  const entry = { key: ++keySeq, text: body };
  if (!pending.has(conv)) pending.set(conv, []);
  pending.get(conv).push(entry);
  lastTimes.set(conv, Date.now());
  render();
  // A SendTimeout is not a refusal (docs/CLIENT.md): the message may be
  // stored, so it goes again with the same local id (the broker answers a
  // stored one from its dedupe record) until it is acked or refused for good.
  let localId = null;
  for (;;) {
    try {
      await client.send(conv, body, localId == null ? {} : { localId });
      pending.set(conv, pending.get(conv).filter((p) => p !== entry));
    } catch (e) {
      if (e.name === 'SendTimeout' && client && client.state !== 'CLOSED') { localId = e.localId; continue; }
      entry.failed = true;
      entry.reason = String(e.message || e);
      console.warn('send failed', e);
    }
    break;
  }
  refreshGroupReads();
  render();
}

// A device id for this tab.  Each open tab is a device of its own -- two
// tabs sharing one device id replaced each other (the broker keeps one
// session per device) -- and a reload keeps its tab's id, so its inbox
// position and its unsent messages' local ids stay its own: the ids of a
// user's tabs are kept in localStorage, and a tab takes the first one no
// other open tab holds (a Web Lock held for the page's life; without Web
// Locks, the first id, as before).
async function claimDevice(user) {
  const key = `pimcore-demo-devices:${user}`;
  let ids = [];
  try { ids = JSON.parse(localStorage.getItem(key) || '[]'); } catch { /* not ours: start over */ }
  if (!Array.isArray(ids)) ids = [];
  const fresh = () => `web-${Math.random().toString(36).slice(2, 8)}`;
  const keep = () => localStorage.setItem(key, JSON.stringify(ids));
  if (!navigator.locks) {
    if (!ids.length) { ids.push(fresh()); keep(); }
    return ids[0];
  }
  for (let i = 0; ; i++) {
    if (i >= ids.length) {
      ids = [...JSON.parse(localStorage.getItem(key) || '[]'), fresh()]; // (another tab may have added one)
      keep();
      i = ids.length - 1;
    }
    const held = await new Promise((resolve) => {
      navigator.locks.request(`pimcore-demo:${user}:${ids[i]}`, { ifAvailable: true }, (lock) => {
        resolve(lock !== null);
        return lock === null ? undefined : new Promise(() => {}); // held until the page goes
      });
    });
    if (held) return ids[i];
  }
}

// Messages typed but not acked yet live only in this page: leaving it (a
// reload, a closed tab) would lose them, so the browser asks first.
window.addEventListener('beforeunload', (ev) => {
  if ([...pending.values()].some((list) => list.some((p) => !p.failed))) {
    ev.preventDefault();
    ev.returnValue = '';
  }
});

async function signIn(user, pasted) {
  const device = await claimDevice(user);
  const token = cfg.demo ? async () => (await post('/web/token', { user })).token : pasted;
  // deflate streams both ways with pako's browser build (a `pako` global); without it, none
  const compression = window.pako ? deflateCompressionWith(window.pako) : null;
  client = new PimcoreClient({ url: wsUrl(), token, device, compression });
  window.pimcoreClient = client; // for the browser tests and curious people
  client.on('state', (s) => {
    const st = $('#status');
    st.dataset.state = s;
    st.textContent = { ACTIVE: 'connected', DISCONNECTED: 'reconnecting…', AWAITING_LOGIN_ACK: 'logging in…', CALIBRATING: 'logging in…', CLOSED: 'closed' }[s];
  });
  client.on('connected', () => { for (const c of known) addConv(c); markIfOpen(); refreshGroupReads(); render(); });
  client.on('message', (m) => { lastTimes.set(m.conv, m.server_time / 1000); addConv(m.conv); if (m.conv === current) markIfOpen(); render(); });
  client.on('readstate', (rs) => { addConv(rs.conv); render(); });
  client.on('receipt', () => render());
  client.on('sent', () => render());
  client.on('resynced', () => { fetched.clear(); render(); });
  // The host purged a conversation: the client dropped its messages; a group (gone) leaves the list.
  client.on('purged', (p) => { if (p.gone) { known.delete(p.conv); fetched.delete(p.conv); } render(); });
  client.on('closed', (e) => {
    // For good (replaced by another login of this device, token expired or
    // revoked): say why where it can be seen, not in the hidden sign-in form.
    $('#login-error').textContent = String(e.message || e);
    if (!$('#app').hidden) {
      $('#closed-reason').textContent = `Disconnected for good: ${e.message || e}. Reload the page to sign in again.`;
      $('#closed-reason').hidden = false;
    }
  });
  client.on('brokerRefused', showRefusal);
  await client.connect();
  me = client.user;
  $('#me').textContent = `${me} (${device})`;
  $('#login').hidden = true;
  $('#app').hidden = false;
  $('#new-group').hidden = !cfg.demo;
}

// A request the broker refused that no call waits for (a read mark of a
// group one is not a member of, a typing signal...: no request id): the
// client's 'brokerRefused' event is the only word of it.  Said on the page,
// as pimcore chat prints it; the latest few are kept.
const MAX_REFUSALS = 5;
function showRefusal(e) {
  const ul = $('#refusals');
  const li = document.createElement('li');
  li.dataset.code = e.codeName;
  li.textContent = `⚠ the broker refused a request (${e.codeName}): ${e.reason}`;
  ul.append(li);
  while (ul.children.length > MAX_REFUSALS) ul.firstElementChild.remove();
  ul.hidden = false;
  console.warn('broker refused', e);
}

// The browser knows when the network goes: drop the socket at once (the
// heartbeat would notice in a few seconds anyway) and come back at once.
window.addEventListener('offline', () => client && client.dropConnection('the browser went offline'));
window.addEventListener('online', () => client && client.reconnectNow());
document.addEventListener('visibilitychange', () => client && markIfOpen());
setInterval(refreshGroupReads, 3000);

$('#login').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('#login-error').textContent = '';
  $('#signin').disabled = true;
  try {
    const user = $('#user').value.trim();
    const pasted = $('#token').value.trim();
    if (cfg.demo ? !user : !pasted) throw new Error(cfg.demo ? 'type a user name' : 'paste a token');
    await signIn(user || 'token', pasted);
  } catch (e) {
    $('#login-error').textContent = String(e.message || e);
    client = null;
  } finally {
    $('#signin').disabled = false;
  }
});
$('#new-chat').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const peer = $('#peer').value.trim();
  if (!peer || peer === me) return;
  $('#peer').value = '';
  open(directConv(me, peer));
});
$('#new-group').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = $('#group-name').value.trim();
  const members = [me, ...$('#group-members').value.split(/[\s,]+/).filter(Boolean)];
  try {
    await post('/web/group', { name, members });
    $('#group-name').value = ''; $('#group-members').value = '';
    open(name);
  } catch (e) { alert(e.message); }
});
$('#compose').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const body = $('#text').value;
  if (!body || !current) return;
  $('#text').value = '';
  sendText(current, body);
});

cfg = await (await fetch('/web/config.json')).json();
$('#demo-banner').hidden = !cfg.demo;
$('#token-note').hidden = cfg.demo;
$('#token-label').hidden = cfg.demo;
$('#user-label').hidden = !cfg.demo; // with a pasted token the broker says who we are
if (!cfg.ws.length) $('#login-error').textContent = 'this broker has no ws:// listener';
const preset = new URLSearchParams(location.search).get('user');
if (preset && cfg.demo) { $('#user').value = preset; }
