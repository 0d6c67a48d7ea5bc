// Display order of a conversation: a port of pimcore/_pure/order.py (the
// rule, its proof sketch and the cycle breaker are documented there).
//
// A message is never displayed before a message its sender's device had
// already seen or sent when sending it (`after_seq`; `local_id` per device);
// otherwise one sender's messages go by that sender's local time and
// different senders are interleaved by server time (the seed's k-way merge).
// The result is a function of the set of messages: every device holding the
// same messages shows the same order, whatever order they arrived in.

function cmpBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
  return a.length - b.length;
}

function cmp(a, b) {
  if (a instanceof Uint8Array) return cmpBytes(a, b);
  return a < b ? -1 : a > b ? 1 : 0;
}

// Lexicographic comparison of key arrays (Python tuple order).
function cmpKey(x, y) {
  for (let i = 0; i < x.length; i++) {
    const c = cmp(x[i], y[i]);
    if (c) return c;
  }
  return 0;
}

class Heap {
  constructor() { this.a = []; }
  get size() { return this.a.length; }
  peek() { return this.a[0]; }
  push(v) {
    const a = this.a; a.push(v);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (cmpKey(a[i], a[p]) >= 0) break;
      [a[i], a[p]] = [a[p], a[i]]; i = p;
    }
  }
  pop() {
    const a = this.a; const top = a[0]; const last = a.pop();
    if (a.length) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1; const r = l + 1; let m = i;
        if (l < a.length && cmpKey(a[l], a[m]) < 0) m = l;
        if (r < a.length && cmpKey(a[r], a[m]) < 0) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m], a[i]]; i = m;
      }
    }
    return top;
  }
}

const BIG = 2n ** 64n;

/**
 * Indices of `items` in display order.  Each item: {sender, device, local_id,
 * after_seq, seq, client_time, server_time, msg_id} (times in µs, msg_id a
 * Uint8Array; seq 0 = no seq yet, after_seq 0 = nothing seen).
 */
export function interleave(items) {
  const recs = items.map((m) => [m.sender, m.device, m.local_id, m.after_seq, m.seq, m.client_time, m.server_time, m.msg_id]);
  const n = recs.length;
  if (n === 0) return [];
  const idx = [...Array(n).keys()];
  const bySeq = idx.filter((i) => recs[i][4] > 0).sort((i, j) => cmpKey([recs[i][4], i], [recs[j][4], j]));
  const byAfter = [...idx].sort((i, j) => cmpKey([recs[i][3], i], [recs[j][3], j]));
  const byChain = [...idx].sort((i, j) => cmpKey([recs[i][0], recs[i][1], recs[i][2], i], [recs[j][0], recs[j][1], recs[j][2], j]));

  const groupOf = new Array(n).fill(0);
  const gStart = []; const gLeft = []; const gNext = []; const gChain = [];
  const chainCur = new Map();
  let prev = null;
  byChain.forEach((i, p) => {
    const r = recs[i];
    if (prev === null || prev[0] !== r[0] || prev[1] !== r[1] || cmp(prev[2], r[2]) !== 0) {
      const sameChain = prev !== null && prev[0] === r[0] && prev[1] === r[1];
      const g = gStart.length;
      if (sameChain) { gNext[g - 1] = g; gChain.push(gChain[g - 1]); } else { gChain.push(g); chainCur.set(g, g); }
      gStart.push(p); gLeft.push(0); gNext.push(-1);
      prev = r;
    }
    groupOf[i] = gStart.length - 1;
    gLeft[gLeft.length - 1] += 1;
  });

  const done = new Array(n).fill(false);
  const pushed = new Array(n).fill(false);
  const seqOk = new Array(n).fill(false);
  const chainOk = idx.map((i) => chainCur.get(groupOf[i]) === groupOf[i]);
  const heaps = new Map();
  const senders = new Heap(); // [server_time, sender, msg_id, i]: lazy, stale entries skipped

  function tryPush(i) {
    if (done[i] || pushed[i] || !(seqOk[i] && chainOk[i])) return;
    pushed[i] = true;
    const [sender, device, localId, afterSeq, seq, ct, st, mid] = recs[i];
    let h = heaps.get(sender);
    if (!h) { h = new Heap(); heaps.set(sender, h); }
    const key = [ct, st, mid, device, localId, seq, afterSeq, i];
    h.push(key);
    if (h.peek() === key) senders.push([st, sender, mid, i]);
  }

  let fp = 0; let ap = 0;
  function releaseSeq() {
    while (fp < bySeq.length && done[bySeq[fp]]) fp++;
    const frontier = fp < bySeq.length ? recs[bySeq[fp]][4] : BIG;
    while (ap < n && recs[byAfter[ap]][3] < frontier) {
      const i = byAfter[ap];
      seqOk[i] = true; tryPush(i); ap++;
    }
  }

  const out = [];
  function emit(i) {
    done[i] = true; out.push(i);
    const g = groupOf[i];
    gLeft[g] -= 1;
    const c = gChain[g];
    while (gLeft[chainCur.get(c)] === 0 && gNext[chainCur.get(c)] !== -1) {
      const cur = gNext[chainCur.get(c)];
      chainCur.set(c, cur);
      const end = cur + 1 < gStart.length ? gStart[cur + 1] : n;
      for (let p = gStart[cur]; p < end; p++) { const j = byChain[p]; chainOk[j] = true; tryPush(j); }
    }
    releaseSeq();
  }

  releaseSeq();
  let byForce = null; let fq = 0;
  while (out.length < n) {
    let pick = -1; let h = null;
    while (senders.size) {
      const [, sender, , i] = senders.peek();
      h = heaps.get(sender);
      if (done[i] || h.peek()[7] !== i) { senders.pop(); continue; }
      pick = i; break;
    }
    if (pick >= 0) {
      const [, sender] = senders.pop();
      h.pop();
      if (h.size) { const top = h.peek(); senders.push([top[1], sender, top[2], top[7]]); }
      emit(pick);
    } else {
      // Nothing ready, items remain: a cycle (inconsistent input).  Output the
      // remaining item first in the broker's order, as if it were ready.
      if (!byForce) {
        byForce = [...idx].sort((i, j) => {
          const a = recs[i]; const b = recs[j];
          return cmpKey([a[4], a[6], a[0], a[7], a[1], a[2], a[3], a[5], i], [b[4], b[6], b[0], b[7], b[1], b[2], b[3], b[5], j]);
        });
      }
      while (done[byForce[fq]]) fq++;
      emit(byForce[fq]);
    }
  }
  return out;
}

/** `messages` (anything with the eight order fields) in display order. */
export function displayOrder(messages) {
  return interleave(messages).map((i) => messages[i]);
}
