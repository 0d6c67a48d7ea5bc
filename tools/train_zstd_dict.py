#!/usr/bin/env python3
"""Train the zstd dictionary shipped as ``pimcore/data/zstd-chat-v3.dict``.

    python tools/train_zstd_dict.py --out pimcore/data/zstd-chat-v3.dict
    python tools/train_zstd_dict.py --evaluate      # ratios on held-out traffic

The samples are the BODIES of frames (what ``pimcore.compress.FrameCompressor``
compresses) of synthetic chat traffic generated from a fixed seed, so the
output is byte-for-byte reproducible for a given zstandard/libzstd version
(training runs single-threaded with fixed COVER parameters; the parameters
were picked once with ``--optimize``).  The shipped file was made with
zstandard 0.25.0 / libzstd 1.5.7; tests/test_compress.py re-trains it and
compares when that version is installed.

The traffic imitates a chat app: SendReq/SendAck, Push with a few Messages,
PushAck, Read, ReadStates, ReadReceipt, HistoryResp pages, and the login
handshake.  Payloads are small JSON objects (``{"type":"text","text":...}``,
images, replies, reactions, ...) with short English and Chinese texts, emoji,
links and mentions; user ids look like ``u1234``, conversations like
``d:u12:u345`` and ``g:team-42``, msg ids are 8 bytes of server time (µs, big
endian) + an 8-byte node id, and times increase realistically.

The phrase lists are split in two halves: training uses one, ``--evaluate``
(and the held-out sets of bench/bench_compress.py) the other, with another
seed, so a measurement cannot just replay phrases the dictionary memorised.

This module is also imported (by path) by bench/bench_compress.py and
tests/test_compress.py for their traffic; keep it free of side effects.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pimcore import frames as F  # noqa: E402
from pimcore._pure.codec import encode_frame  # noqa: E402  (bytes identical on both backends)
from pimcore.compress import DEFAULT_THRESHOLD, DICTIONARY_ID  # noqa: E402

#: Dictionary parameters.  The id (pimcore.compress.DICTIONARY_ID, 0xC403)
#: sits in the range zstd leaves to private use (>= 32768) and takes 2 bytes
#: in each frame header instead of the 4 a random id would take.  Size and
#: k/d come from a sweep (--optimize, then 4..64 KiB x k 150..1000 x d 6/8):
#: everything from 8 KiB on was within ~2% on the held-out small frames;
#: 32 KiB gained ~1% over 16 KiB, not worth twice the memory.
DICT_SIZE = 16 * 1024
DICT_ID = DICTIONARY_ID
COVER_K = 400
COVER_D = 8
TRAIN_SEED = 20240601
EVAL_SEED = 7
TRAIN_SAMPLES = 40_000

# ------------------------------------------------------------------ vocabulary

EN = [
    "ok", "okay!", "sure", "thanks!", "thank you so much", "lol", "haha", "yes", "no worries",
    "on my way", "omw", "running 5 min late, sorry", "see you soon", "sounds good", "good morning",
    "good night", "what time works for you?", "can you send me the file?", "just landed",
    "call me when you're free", "let's grab lunch tomorrow", "did you see the game last night?",
    "I'll check and get back to you", "meeting moved to 3pm", "happy birthday!!", "congrats!",
    "where are you?", "almost there", "I'm at the entrance", "can we push it to next week?",
    "the build is green again", "PR is up for review", "deploying now", "rollback done",
    "who's joining the standup?", "I'm out sick today", "brb", "np", "nice one", "love it",
    "agreed", "not sure yet", "let me think about it", "what do you think?", "yep, done",
    "I sent you the invoice", "pick up milk on the way home pls", "dinner at 7?",
    "the kids are asleep", "miss you", "how was your day?", "traffic is terrible",
    "did you get my email?", "please review the doc before Friday", "booked the tickets",
    "flight is delayed 2h", "heading to the gym", "great job everyone", "ship it",
    "the server is down again", "restarting the service", "fixed in the latest release",
    "can you share your screen?", "link doesn't work for me", "try again now",
    "I'll be there in 10", "who wants coffee?", "lunch is on me today", "weekend plans?",
    "watching the new episode tonight", "don't spoil it!", "that's hilarious",
    "cool, thanks for letting me know", "any update on this?", "following up on my last message",
    "let's discuss in the meeting", "I'm offline for an hour", "back now", "wifi is so slow here",
]
ZH = [
    "好的", "收到", "谢谢", "没问题", "哈哈哈", "晚安", "早上好", "我到了", "马上到",
    "你在哪里？", "今天加班", "明天见", "辛苦了", "好久不见", "吃饭了吗？", "我在路上",
    "等我一下", "这个周末有空吗？", "会议改到下午三点", "文件已经发给你了", "稍等，我看一下",
    "太好了！", "生日快乐！", "恭喜恭喜", "路上注意安全", "我先下线了", "周末一起去爬山吧",
    "这个问题已经修复了", "版本已经发布", "麻烦帮我看一下这个PR", "今天天气真好",
    "晚上一起吃火锅？", "刚开完会", "在忙，晚点回你", "好主意", "我也是这么想的",
    "快递到了吗？", "记得带伞", "明天早上九点开会", "收到，马上处理", "已经转账了",
    "你看新闻了吗", "我同意", "再说吧", "有点累", "加油！", "谢谢大家", "群里通知一下",
]
EMOJI = ["😂", "👍", "❤️", "🙏", "😊", "🎉", "😭", "🔥", "😅", "👀", "🤔", "😍", "🙌", "💯", "😴",
         "🥳", "👌", "😎", "🤣", "✅", "🚀", "☕", "🍕", "🎂", "😢", "👋", "🙂", "💪"]
STICKERS = ["cat_wave", "dog_thumbsup", "panda_cry", "bear_love", "bunny_party", "duck_ok"]
DOMAINS = ["https://github.com", "https://www.youtube.com", "https://docs.google.com", "https://twitter.com",
           "https://www.bilibili.com", "https://maps.google.com", "https://example.com", "https://news.ycombinator.com",
           "https://www.zhihu.com", "https://open.spotify.com"]
PATHS = ["/watch?v={tok}", "/document/d/{tok}/edit", "/{user}/status/{num}", "/video/BV{tok}", "/acme/app/pull/{small}",
         "/maps/place/{tok}", "/item?id={num}", "/question/{num}", "/track/{tok}", "/articles/{small}-{tok}"]
TEAMS = ["team", "family", "proj", "friends", "ops", "design", "sales", "book-club", "hiking", "class"]
FILES = ["report.pdf", "slides.pptx", "budget.xlsx", "IMG_2041.HEIC", "notes.txt", "contract_v2.docx", "video.mp4"]


def _half(items: list[str], split: str) -> list[str]:
    """Even-indexed items for training, odd-indexed ones for evaluation."""
    return items[0::2] if split == "train" else items[1::2]


class Traffic:
    """Deterministic synthetic chat traffic (frames, not bytes).

    ``split`` ("train" or "eval") selects the half of the phrase lists used;
    ``seed`` drives everything else."""

    def __init__(self, seed: int, split: str = "train") -> None:
        if split not in ("train", "eval"):
            raise ValueError(split)
        self.rng = random.Random(seed)
        self.en = _half(EN, split)
        self.zh = _half(ZH, split)
        self.emoji = _half(EMOJI, split) + EMOJI[:4]  # the most common ones appear everywhere
        r = self.rng
        self.users = [f"u{n}" for n in r.sample(range(1, 50_000), 400)]
        self.nodes = [r.randbytes(8) for _ in range(3)]
        self.devices = {u: [self._device() for _ in range(r.choice((1, 1, 2, 3)))] for u in self.users}
        self.groups = [f"g:{r.choice(TEAMS)}-{r.randrange(1, 500)}" for _ in range(60)]
        self.group_members = {g: r.sample(self.users, r.randrange(3, 40)) for g in self.groups}
        self.seqs: dict[str, int] = {}
        self.now = 1_717_200_000_000_000 + r.randrange(10**12)  # June 2024, in µs
        self.local_ids = {u: r.randrange(1, 5000) for u in self.users}
        self.positions = {u: r.randrange(1, 200_000) for u in self.users}
        self.history: list[F.Message] = []
        self.epoch = r.randbytes(16)  # one broker store

    # -------------------------------------------------------------- atoms

    def _device(self) -> str:
        r = self.rng
        kind = r.choice(["ios", "android", "web", "desktop", "ipad"])
        return f"{kind}-{r.randbytes(2).hex()}"

    def _tick(self) -> int:
        self.now += int(self.rng.expovariate(1 / 40_000))  # ~25 events per second
        return self.now

    def direct(self, a: str, b: str) -> str:
        lo, hi = sorted((a, b))
        return f"d:{lo}:{hi}"

    def conversation(self, user: Optional[str] = None) -> tuple[str, list[str]]:
        r = self.rng
        if r.random() < 0.6:
            a = user or r.choice(self.users)
            b = r.choice(self.users)
            while b == a:
                b = r.choice(self.users)
            return self.direct(a, b), [a, b]
        g = r.choice(self.groups)
        return g, self.group_members[g]

    def text(self) -> str:
        r = self.rng
        lang = r.random()
        if lang < 0.55:
            parts = [r.choice(self.en) for _ in range(r.choice((1, 1, 1, 2, 3)))]
            s = " ".join(parts)
        elif lang < 0.85:
            s = "，".join(r.choice(self.zh) for _ in range(r.choice((1, 1, 2, 3))))
        else:  # mixed, as people write
            s = f"{r.choice(self.en)} {r.choice(self.zh)}"
        if r.random() < 0.3:
            s += " " + "".join(r.choice(self.emoji) for _ in range(r.choice((1, 1, 2, 3))))
        if r.random() < 0.05:
            s = "".join(r.choice(self.emoji) for _ in range(r.randrange(1, 4)))
        return s

    def url(self) -> str:
        r = self.rng
        path = r.choice(PATHS).format(
            tok="".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") for _ in range(11)),
            user=r.choice(self.users),
            num=r.randrange(10**6, 10**19),
            small=r.randrange(1, 3000),
        )
        return r.choice(DOMAINS) + path

    def msg_ref(self) -> str:
        """A previous message id as apps put it in JSON (hex)."""
        t = self.now - self.rng.randrange(10**6, 10**11)
        return (t.to_bytes(8, "big") + self.rng.choice(self.nodes)).hex()

    def payload(self, conv: str, members: list[str]) -> bytes:
        r = self.rng
        k = r.random()
        obj: dict[str, Any]
        if k < 0.62:
            obj = {"type": "text", "text": self.text()}
            if r.random() < 0.12:
                mentioned = r.sample(members, min(len(members), r.choice((1, 1, 2))))
                obj["text"] = " ".join("@" + m for m in mentioned) + " " + obj["text"]
                obj["mentions"] = mentioned
            if r.random() < 0.08:
                link = self.url()
                obj["text"] += " " + link
        elif k < 0.72:
            obj = {"type": "reply", "reply_to": self.msg_ref(), "text": self.text()}
        elif k < 0.80:
            w, h = r.choice([(1080, 1920), (1920, 1080), (1170, 2532), (800, 600), (1024, 1024)])
            obj = {
                "type": "image",
                "url": f"https://cdn.example.com/m/{r.randbytes(12).hex()}.jpg",
                "w": w,
                "h": h,
                "size": r.randrange(20_000, 4_000_000),
            }
            if r.random() < 0.3:
                obj["caption"] = self.text()
        elif k < 0.86:
            obj = {"type": "reaction", "target": self.msg_ref(), "emoji": r.choice(self.emoji)}
        elif k < 0.90:
            obj = {"type": "sticker", "pack": "basic", "id": r.choice(STICKERS)}
        elif k < 0.94:
            obj = {"type": "link", "url": self.url(), "title": self.text()[:40]}
        elif k < 0.97:
            obj = {"type": "file", "name": r.choice(FILES), "size": r.randrange(1_000, 50_000_000),
                   "url": f"https://cdn.example.com/f/{r.randbytes(12).hex()}"}
        else:
            obj = {"type": "location", "lat": round(r.uniform(-60, 60), 6), "lng": round(r.uniform(-180, 180), 6)}
        if r.random() < 0.25:
            obj["cid"] = r.randbytes(8).hex()  # client-side dedupe id some apps add
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    def message(self, recipient: Optional[str] = None, pos: Optional[int] = None) -> F.Message:
        r = self.rng
        conv, members = self.conversation(recipient)
        sender = r.choice([m for m in members if m != recipient] or members)
        seq = self.seqs[conv] = self.seqs.get(conv, r.randrange(0, 5000)) + 1
        server_time = self._tick()
        msg = F.Message(
            position=pos if pos is not None else 0,
            msg_id=server_time.to_bytes(8, "big") + r.choice(self.nodes),
            conv=conv,
            seq=seq,
            sender=sender,
            device=r.choice(self.devices[sender]),
            client_time=server_time - r.randrange(-2_000_000, 300_000),
            server_time=server_time,
            payload=self.payload(conv, members),
            # The SDK's local ids are µs-like counters; the sender had
            # usually seen the message before (or one a little older).
            kind=0,
            local_id=server_time - r.randrange(0, 3_000_000),
            after_seq=max(0, seq - r.choice((1, 1, 1, 2, 3))),
        )
        self.history.append(msg)
        return msg

    # -------------------------------------------------------------- frames

    def send(self) -> tuple[F.SendReq, F.SendAck]:
        r = self.rng
        user = r.choice(self.users)
        conv, members = self.conversation(user)
        self.local_ids[user] += 1
        local_id = self.local_ids[user]
        client_time = self._tick() - r.randrange(-2_000_000, 300_000)
        seen = self.seqs.get(conv, r.randrange(0, 5000))
        req = F.SendReq(local_id=local_id, conv=conv, client_time=client_time, payload=self.payload(conv, members),
                        after_seq=seen)
        seq = self.seqs[conv] = seen + 1
        server_time = self._tick()
        ack = F.SendAck(local_id, 0, server_time.to_bytes(8, "big") + r.choice(self.nodes), seq, server_time)
        return req, ack

    def push(self, n: Optional[int] = None) -> F.Push:
        r = self.rng
        user = r.choice(self.users)
        if n is None:
            n = r.choice((1, 1, 1, 1, 1, 2, 2, 3, 4, 8))
        start = self.positions[user]
        msgs = tuple(self.message(user, start + i + 1) for i in range(n))
        skipped = r.choice((0, 0, 0, 1))  # own sends are left out but counted
        self.positions[user] = start + n + skipped
        return F.Push(position=self.positions[user], messages=msgs)

    def read(self) -> F.Read:
        conv, _ = self.conversation()
        return F.Read(conv=conv, seq=self.seqs.get(conv, self.rng.randrange(1, 5000)))

    def read_state(self, conv: str) -> F.ReadState:
        last = self.seqs.get(conv, self.rng.randrange(1, 5000))
        unread = self.rng.choice((0, 0, 0, 1, 2, 5, 17))
        return F.ReadState(conv=conv, read_seq=max(0, last - unread), last_seq=last, unread=min(unread, last))

    def sync_read(self, login: bool = False) -> F.ReadStates:
        n = self.rng.randrange(5, 60) if login else 1
        return F.ReadStates(entries=tuple(self.read_state(self.conversation()[0]) for _ in range(n)))

    def receipt(self) -> F.ReadReceipt:
        a, b = self.rng.sample(self.users, 2)
        conv = self.direct(a, b)
        return F.ReadReceipt(conv=conv, reader=b, seq=self.seqs.get(conv, self.rng.randrange(1, 500)))

    def sync_resp(self) -> F.HistoryResp:
        r = self.rng
        conv, members = self.conversation()
        limit = r.choice((20, 50))
        last = max(self.seqs.get(conv, 0), r.randrange(limit, 5000))
        msgs = []
        t = self._tick() - r.randrange(10**9, 10**11)
        for i in range(limit):
            t += int(r.expovariate(1 / 60_000_000))
            sender = r.choice(members)
            msgs.append(
                F.Message(0, t.to_bytes(8, "big") + r.choice(self.nodes), conv, last - limit + i + 1, sender,
                          r.choice(self.devices[sender]), t - r.randrange(-2_000_000, 300_000), t,
                          self.payload(conv, members), 0, t - r.randrange(0, 3_000_000), last - limit + i)
            )
        return F.HistoryResp(req_id=r.randrange(1, 1000), conv=conv, code=0, messages=tuple(msgs), more=r.random() < 0.7)

    def login(self) -> tuple[F.Login, F.LoginAck]:
        r = self.rng
        user = r.choice(self.users)
        device = r.choice(self.devices[user])
        token = f"{user}:{device}:".encode() + r.randbytes(32).hex().encode()
        now = self._tick()
        login = F.Login(token=token, device=device, client_time=now + r.randrange(-10**7, 10**7),
                        position=self.positions[user] - r.randrange(0, 300), caps=F.CAP_ZSTD,
                        epoch=self.epoch)
        ack = F.LoginAck(user, device, now, login.position, self.positions[user], False, 1 << 20, 64 << 10, 64,
                         30_000, F.CAP_ZSTD, self.epoch, False)
        return login, ack

    def frames(self, count: int) -> Iterator[Any]:
        """A mix of ``count`` frames in the proportions of a busy connection:
        mostly sends, pushes and their acks, some read traffic, the odd
        login and history page."""
        r = self.rng
        made = 0
        while made < count:
            k = r.random()
            if k < 0.30:
                out: tuple = self.send()
            elif k < 0.62:
                p = self.push()
                out = (p, F.PushAck(p.position))
            elif k < 0.74:
                out = (self.read(),)
            elif k < 0.82:
                out = (self.sync_read(),)
            elif k < 0.90:
                out = (self.receipt(),)
            elif k < 0.95:
                out = (F.Ping(r.randrange(1 << 32)), F.CalibrateReq(self._tick()))
            elif k < 0.98:
                out = (self.sync_resp(),) if r.random() < 0.3 else (self.sync_read(login=True),)
            else:
                out = self.login()
            for f in out:
                if made < count:
                    yield f
                    made += 1

    # -------------------------------------------------------------- held-out sets

    def small_frames(self, count: int) -> list[Any]:
        """The set the dictionary is judged on: SendReqs with 20..200-byte
        payloads and Pushes of one message, alternating."""
        out: list[Any] = []
        while len(out) < count:
            if len(out) % 2 == 0:
                req, _ = self.send()
                if 20 <= len(req.payload) <= 200:
                    out.append(req)
            else:
                p = self.push(1)
                if 20 <= len(p.messages[0].payload) <= 200:
                    out.append(p)
        return out


def body_of(raw: bytes) -> bytes:
    """The body of one encoded frame (after prefix, head and type)."""
    n = 0
    while raw[n] & 0x80:
        n += 1
    return raw[n + 3 :]


def sample_of(frame: Any) -> bytes:
    """The training sample of one frame: its body as the dictionary was
    trained on it.  A Login or LoginAck is version 3's, without ``sent`` or
    ``states`` (the last field, 0 here: one byte): zstd-chat-v3 was trained
    on version 3 traffic, and version 4 keeps it (PROTOCOL.md, section 7.1)
    -- neither is ever compressed, their samples only shaped the
    dictionary."""
    body = body_of(encode_frame(frame))
    if type(frame) is F.Login or type(frame) is F.LoginAck:
        assert (frame.sent if type(frame) is F.Login else frame.states) == 0 and body[-1:] == b"\x00"
        body = body[:-1]
    return body


def training_samples(seed: int = TRAIN_SEED, count: int = TRAIN_SAMPLES, split: str = "train") -> list[bytes]:
    """Bodies of ``count`` frames of traffic, keeping those the compressor
    would compress (at least DEFAULT_THRESHOLD bytes)."""
    bodies = (sample_of(f) for f in Traffic(seed, split).frames(count))
    return [b for b in bodies if len(b) >= DEFAULT_THRESHOLD]


# ------------------------------------------------------------------ training


def train(samples: list[bytes], k: int = COVER_K, d: int = COVER_D, size: int = DICT_SIZE):  # -> ZstdCompressionDict
    import zstandard

    # fixed k/d and threads=0 (single thread): deterministic output
    return zstandard.train_dictionary(size, samples, k=k, d=d, dict_id=DICT_ID, threads=0)


def optimize(samples: list[bytes], size: int) -> tuple[int, int]:
    import zstandard

    d = zstandard.train_dictionary(size, samples, dict_id=DICT_ID, level=3, steps=40, threads=-1, split_point=0.8)
    return d.k, d.d


def evaluate(dict_data: Any, level: int = 3, count: int = 4000, seed: int = EVAL_SEED) -> dict[str, Any]:
    """Wire bytes of held-out small frames, uncompressed / compressed, each
    frame on its own: through FrameCompressor (threshold, and a frame that
    does not shrink goes out as it is) with the dictionary and with plain
    zstd, plus zstd forced on every body (what the fallback saves)."""
    import zstandard

    from pimcore.compress import FrameCompressor

    frames = Traffic(seed, "eval").small_frames(count)
    raws = [encode_frame(f) for f in frames]
    wire = sum(map(len, raws))
    out: dict[str, Any] = {"frames": len(raws), "wire_bytes": wire}
    for name, d in (("dict", dict_data), ("plain", None)):
        comp = FrameCompressor(level=level, dictionary=d)
        after = sum(len(comp.compress(r)) for r in raws)
        forced = zstandard.ZstdCompressor(level=level, **({"dict_data": d} if d is not None else {}))
        # prefix + head + type stay about the same size when compressed
        overhead = sum(len(r) - len(body_of(r)) for r in raws)
        out[f"ratio_{name}"] = round(wire / after, 4)
        out[f"ratio_{name}_forced"] = round(wire / (overhead + sum(len(forced.compress(body_of(r))) for r in raws)), 4)
        out[f"compressed_{name}"] = comp.statistics().compressed
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the dictionary here (pimcore/data/zstd-chat-v3.dict)")
    ap.add_argument("--size", type=int, default=DICT_SIZE, help="dictionary size in bytes (default %(default)s)")
    ap.add_argument("--samples", type=int, default=TRAIN_SAMPLES, help="training frames (default %(default)s)")
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--optimize", action="store_true", help="search COVER k/d (multi-threaded, not reproducible)")
    ap.add_argument("--evaluate", action="store_true", help="print ratios on held-out traffic")
    args = ap.parse_args(argv)
    import zstandard

    t0 = time.perf_counter()
    samples = training_samples(args.seed, args.samples)
    print(f"{len(samples)} samples, {sum(map(len, samples))} bytes ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    k, d = COVER_K, COVER_D
    if args.optimize:
        k, d = optimize(samples, args.size)
        print(f"optimized: k={k} d={d}", file=sys.stderr)
    t0 = time.perf_counter()
    dictionary = train(samples, k, d, args.size)
    raw = dictionary.as_bytes()
    print(
        f"dictionary: {len(raw)} bytes, id {dictionary.dict_id():#x}, k={k} d={d}, "
        f"sha256 {hashlib.sha256(raw).hexdigest()[:16]} ({time.perf_counter() - t0:.1f}s)",
        file=sys.stderr,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(raw)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.evaluate:
        print(json.dumps(evaluate(zstandard.ZstdCompressionDict(raw)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
