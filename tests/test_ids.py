"""The id grammar lives in pimcore.ids, and the client does not drag the
store (or LMDB) in with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pimcore import ids
from pimcore.store import base


def test_store_reexports_the_same_functions() -> None:
    for name in ("valid_id", "direct_conversation", "direct_members", "valid_conversation", "member_set", "check_ids"):
        assert getattr(base, name) is getattr(ids, name)


def test_direct_conversation_is_symmetric_and_canonical() -> None:
    assert ids.direct_conversation("bob", "alice") == ids.direct_conversation("alice", "bob") == "d:alice:bob"
    assert ids.direct_members("d:alice:bob") == ("alice", "bob")
    assert ids.direct_members("d:bob:alice") is None  # not canonical
    assert not ids.valid_conversation("d:bob:alice")
    with pytest.raises(ValueError):
        ids.direct_conversation("alice", "alice")
    with pytest.raises(ValueError):
        ids.member_set("alice")


@pytest.mark.parametrize("module", ["pimcore.client", "pimcore.client_session", "pimcore.ids", "pimcore.net.streams"])
def test_client_side_imports_load_no_store(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m == 'lmdb' or m.startswith('pimcore.store') or m == 'pimcore.core')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"{module} loaded {out.stdout.strip()}"


# ------------------------------------------------- every valid id in every role
#
# Item 5 of issue 10: users "a"*63 and "b"*63 are valid, yet their direct id
# (129 characters) was refused because conversation ids were capped at 128.

import trio

from pimcore import frames as F
from pimcore.errors import CloseCode, ErrorCode
from pimcore.store import LmdbStore, MemoryStore

from _harness import Harness
from _net import client, serving

A63, B63 = "a" * 63, "b" * 63


@pytest.fixture(params=["lmdb", "memory"])
def any_store(request, tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os") if request.param == "lmdb" else MemoryStore()
    yield s
    s.close()


async def test_two_long_user_ids_can_talk_through_the_broker(any_store) -> None:
    conv = ids.direct_conversation(A63, B63)
    assert len(conv) == 129
    with trio.fail_after(30):
        async with serving(any_store) as srv:
            async with client(srv.url(), A63, "phone") as a, client(srv.url(), B63, "phone") as b:
                sent = await a.send(conv, b"hi")
                assert sent.seq == 1
                m = await b.receive()
                assert (m.conv, m.sender, m.payload) == (conv, A63, b"hi")


A64, B64, D64 = "a" * 64, "b" * 64, "d" * 64
# The longest ids, with every kind of character the grammar allows.
U_MAX = ("Az09_.@-" * 8)[:64]
G_MAX = ("g!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" * 3).ljust(128, "x")


def test_the_limits_are_derived_in_one_place() -> None:
    assert ids.MAX_USER_ID_LEN == ids.MAX_DEVICE_ID_LEN == ids.MAX_ID_LEN == 64
    assert ids.MAX_DIRECT_ID_LEN == 2 + 64 + 1 + 64 == 131
    assert ids.MAX_GROUP_ID_LEN == 128
    assert ids.MAX_CONVERSATION_ID_LEN == 131
    assert len(G_MAX) == 128 and ids.valid_group(G_MAX)
    longest = ids.direct_conversation(A64, B64)
    assert len(longest) == ids.MAX_DIRECT_ID_LEN and ids.valid_conversation(longest)
    assert ids.valid_conversation(ids.direct_conversation(U_MAX, A64))


@pytest.mark.parametrize(
    "value, words",
    [
        ("", "empty user id"),
        ("a" * 65, "65 characters long"),
        ("bob:x", "character ':'"),
        ("b ob", "character ' '"),
        ("bob\n", "character '\\n'"),
        ("jürgen", "non-ASCII character 'ü'"),
        ("ａlice", "non-ASCII character"),  # fullwidth a: a look-alike, not an id
        ("é" * 64, "non-ASCII"),
    ],
)
def test_an_invalid_id_is_refused_saying_why(value: str, words: str) -> None:
    assert not ids.valid_id(value)
    problem = ids.id_problem(value)
    assert problem is not None and words in problem and "1-64 ASCII characters" in problem
    with pytest.raises(ValueError, match="invalid user id"):
        ids.direct_conversation(value, "alice")
    with pytest.raises(ValueError, match="invalid"):
        ids.member_set([value])
    assert ids.id_problem(A64) is None and ids.id_problem(U_MAX, "device") is None


def test_direct_ids_put_the_smaller_user_first_in_byte_order() -> None:
    # The vectors PROTOCOL.md gives.
    assert ids.direct_conversation("bob", "alice") == "d:alice:bob"
    assert ids.direct_conversation("alice", "Zed") == "d:Zed:alice"  # 'Z' 0x5a < 'a' 0x61
    assert ids.direct_conversation("a.b", "a-b") == "d:a-b:a.b"  # '-' 0x2d < '.' 0x2e
    assert ids.direct_conversation("al", "alice") == "d:al:alice"  # a prefix sorts first
    assert not ids.valid_conversation("d:alice:Zed")  # the other order is no id at all
    assert not ids.valid_conversation("d:" + A64 + ":" + "b" * 65)
    assert not ids.valid_group("d:alice:bob") and not ids.valid_group("d:anything")
    assert not ids.valid_conversation(G_MAX + "x")  # a 129-character group id
    assert not ids.valid_conversation("grüppe") and not ids.valid_conversation("a group")
    assert "1-128 printable ASCII" in (ids.conversation_problem(G_MAX + "x") or "")
    assert ids.conversation_problem(G_MAX) is None


def test_tokens_carry_the_longest_ids_and_refuse_invalid_ones() -> None:
    from pimcore.auth import JwtAuthenticator, issue_token

    secret = b"s" * 32
    tok = issue_token(secret, U_MAX, D64, ttl=60, now=1_700_000_000)
    ident = JwtAuthenticator(secret)(tok.encode(), 1_700_000_000 * 1_000_000)
    assert (ident.user, ident.device) == (U_MAX, D64)
    for user, device, words in (
        ("a" * 65, None, "65 characters"),
        ("jürgen", None, "non-ASCII"),
        ("alice", "téléphone", "device id"),
        ("", None, "empty"),
    ):
        with pytest.raises(ValueError, match=words):
            issue_token(secret, user, device)


# -- the core with a real LMDB store: every role, maximal ids ----------------


def _roles_with_the_longest_ids(h: Harness) -> None:
    """Drive every id role through the broker with maximal ids: users, devices,
    a direct id of two 64-character users, a 128-character group."""
    direct = ids.direct_conversation(A64, B64)
    h.create_group(G_MAX, [A64, B64, U_MAX])
    a = h.login(A64, D64, token=f"{A64}/{D64}".encode())
    b = h.login(B64, D64, token=f"{B64}/{D64}".encode())
    assert h.take(a, F.LoginAck) and h.take(b, F.LoginAck)
    h.send(a, direct, b"1:1", local_id=7)
    h.send(a, G_MAX, b"group", local_id=8)
    assert [(k.code, k.seq) for k in h.acks(a)] == [(0, 1), (0, 1)]
    h.send(a, direct, b"1:1", local_id=7)  # a retry: the dedupe key holds both maximal ids
    [again] = h.acks(a)
    assert (again.code, again.seq) == (0, 1)
    got = h.drain_device(b)
    assert [(m.conv, m.sender, m.device, m.payload) for m in got] == [(direct, A64, D64, b"1:1"), (G_MAX, A64, D64, b"group")]
    h.feed(b, F.Read(direct, 1))
    h.feed(b, F.Read(G_MAX, 1))
    h.feed(b, F.HistoryReq(1, G_MAX, 0, 10, False))
    [page] = h.take(b, F.HistoryResp)
    assert page.code == 0 and [m.payload for m in page.messages] == [b"group"]
    receipts = h.take(a, F.ReadReceipt)
    assert [(r.conv, r.reader, r.seq) for r in receipts] == [(direct, B64, 1)]
    # a mention of a maximal user in the maximal direct id, and settings in the maximal group
    h.feed(a, F.SendReq(9, direct, 0, b"@", 1, (F.Mention(B64),)))
    h.feed(b, F.ConvSetReq(2, G_MAX, 1, 1, 0))
    assert [(k.code, k.seq) for k in h.acks(a)] == [(0, 2)]
    assert [(r.code, r.conv) for r in h.take(b, F.ConvSetResp)] == [(0, G_MAX)]


def test_the_longest_ids_work_in_every_role_of_the_lmdb_store(tmp_path) -> None:
    from pimcore.store.lmdb import MAX_KEY_LEN

    path = str(tmp_path / "db")
    with LmdbStore(path, durability="os") as store:
        _roles_with_the_longest_ids(Harness(store))
        # Every key kind was written with maximal parts; the longest is the
        # computed bound, and LMDB can hold it.
        env = store._env
        longest = 0
        for name in ("convs", "convidx", "members", "userconvs", "inbox", "devices", "dedupe", "reads", "convset",
                     "mentionidx"):
            with env.begin(db=env.open_db(name.encode())) as txn:
                longest = max([longest] + [len(k) for k in txn.cursor().iternext(values=False)])
        assert longest == MAX_KEY_LEN == 1 + 64 + 1 + 131 + 8  # mentionidx: T(user) T(conv) U64(seq)
        assert MAX_KEY_LEN <= env.max_key_size()
    with LmdbStore(path, durability="os", create=False) as store:  # and it all reads back
        direct = ids.direct_conversation(A64, B64)
        assert store.conversations(B64) == sorted([direct, G_MAX])
        assert store.read_marker(B64, direct) == 1 and store.read_marker(B64, G_MAX) == 1
        assert store.members(G_MAX) == tuple(sorted([A64, B64, U_MAX]))
        assert [d.device for d in store.devices(A64)] == [D64]
        assert [m.payload for m in store.history(direct, 0, 10)] == [b"1:1", b"@"]


def test_the_longest_ids_work_in_every_role_of_the_memory_store() -> None:
    _roles_with_the_longest_ids(Harness(MemoryStore()))


@pytest.mark.parametrize("store_kind", ["lmdb", "memory"])
def test_ids_one_past_the_limits_get_clear_refusals(store_kind, tmp_path) -> None:
    store = LmdbStore(str(tmp_path / "db"), durability="os") if store_kind == "lmdb" else MemoryStore()
    with store:
        h = Harness(store)
        with pytest.raises(ValueError, match="128"):
            store.create_group(G_MAX + "x", [A64], 0)
        with pytest.raises(ValueError, match="65 characters"):
            store.create_group("g", [A64 + "a"], 0)
        with pytest.raises(ValueError, match="direct"):
            store.create_group("d:x", [A64], 0)
        # Login: a 65-character or non-ASCII user (from the token) or device.
        for user, device, words in (
            (A64 + "a", "phone", "invalid user id: user id"),
            ("jürgen", "phone", "non-ASCII character 'ü'"),
            ("alice", D64 + "d", "invalid device id: device id"),
            ("alice", "téléphone", "non-ASCII character 'é'"),
        ):
            conn = h.login(user, device, token=f"{user}/{device}".encode())
            close = h.closed[conn]
            assert close.code == CloseCode.AUTH_FAILED and words in close.reason, close.reason
            assert len(close.reason) < 300
        a = h.login("alice", "phone")
        for conv in (G_MAX + "x", "d:" + A64 + ":" + B64 + "b", "grüppe", "d:bob:alice"):
            h.send(a, conv, b"x")
            [ack] = h.acks(a)
            assert ack.code == ErrorCode.BAD_REQUEST, conv


async def test_the_longest_ids_through_the_sdk_and_a_served_broker(any_store) -> None:
    direct = ids.direct_conversation(A64, B64)
    with trio.fail_after(30):
        async with serving(any_store) as srv:
            async with client(srv.url(), A64, D64) as a, client(srv.url(), B64, D64) as b:
                await a.send(direct, b"hello")
                m = await b.receive()
                assert (m.conv, m.sender, m.device) == (direct, A64, D64)
                await b.mark_read(direct, m.seq)
                with trio.fail_after(10):
                    while a.receipt(direct, B64) < 1:
                        await trio.sleep(0.01)
                page = await b.fetch_history(direct)
                assert [p.payload for p in page] == [b"hello"]


# -- Login.token: the recipe and vector PROTOCOL.md gives -----------------------

SPEC_SECRET = b"0123456789abcdef0123456789abcdef"
SPEC_TOKEN = (
    b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    b".eyJzdWIiOiJhbGljZSIsImRldiI6InBob25lIiwiYXVkIjoicGltY29yZSIsImV4cCI6MTcwMDAwMzYwMH0"
    b".XykzRMWNjIG3IbH7KSH2D_fIuxyqhadF2nXn895heRY"
)


def _hand_made_token(claims: dict, secret: bytes = SPEC_SECRET) -> bytes:
    """A JWT made with nothing but the recipe of PROTOCOL.md section 8."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims, separators=(",", ":")).encode())
    return signing_input + b"." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())


def test_the_protocol_token_vector_is_what_the_broker_accepts() -> None:
    from pimcore.auth import JwtAuthenticator, issue_token
    from pimcore.errors import AuthError

    claims = {"sub": "alice", "dev": "phone", "aud": "pimcore", "exp": 1_700_003_600}
    assert _hand_made_token(claims) == SPEC_TOKEN
    auth = JwtAuthenticator(SPEC_SECRET)
    ident = auth(SPEC_TOKEN, 1_700_000_000 * 1_000_000)
    assert (ident.user, ident.device, ident.expires) == ("alice", "phone", (1_700_003_600 + 30) * 1_000_000)
    # issue_token makes an equivalent token (it adds iat).
    made = issue_token(SPEC_SECRET, "alice", "phone", ttl=3600, now=1_700_000_000)
    made_ident = auth(made.encode(), 1_700_000_000 * 1_000_000)
    assert made_ident.issued_at == 1_700_000_000 * 1_000_000 and ident.issued_at == 0  # no iat: issued at 0
    assert (made_ident.user, made_ident.device, made_ident.expires) == (ident.user, ident.device, ident.expires)
    # What the spec says is required, is.
    with pytest.raises(AuthError, match="expired"):
        auth(SPEC_TOKEN, (1_700_003_600 + 31) * 1_000_000)
    for drop in ("sub", "aud", "exp"):
        with pytest.raises(AuthError):
            auth(_hand_made_token({k: v for k, v in claims.items() if k != drop}), 1_700_000_000 * 1_000_000)
    with pytest.raises(AuthError):
        auth(_hand_made_token(dict(claims, aud="other")), 1_700_000_000 * 1_000_000)
    with pytest.raises(AuthError, match="signature"):
        auth(_hand_made_token(claims, b"x" * 32), 1_700_000_000 * 1_000_000)
    ident = auth(_hand_made_token({"sub": "alice", "aud": "pimcore", "exp": 1_700_003_600}), 1_700_000_000 * 1_000_000)
    assert ident.device is None  # no dev: any device of alice


@pytest.mark.parametrize("value", ["x" * 200, "\x1b" * 300, "é" * 81, "a'b" * 40], ids=["plain", "escapes", "non-ascii", "quotes"])
def test_an_id_cut_short_in_a_refusal_keeps_its_closing_quote(value: str) -> None:
    """A refusal quotes at most about 80 characters of an id.  The cut was
    of the repr, so the quote that closed it was lost ('xxx...(200
    chars)') and an escape could be cut in two ('\\x1...)."""
    from pimcore.ids import _show, id_problem

    shown = id_problem(value, "device")
    assert shown is not None
    text = _show(value)
    head, sep, tail = text.rpartition("...(")
    assert sep and tail == f"{len(value)} chars)", text
    assert len(head) <= 80 and head == repr(value[: len(eval(head))]), text  # a whole repr of a prefix
    assert f"device id {text} " in shown


@pytest.mark.parametrize("value, shown", [
    ("b\udcffob", r"'b\xffob'"),  # a byte that was not UTF-8 in an argument (surrogateescape)
    ("\udc80", r"'\x80'"),
    ("a\\udcff", r"'a\\udcff'"),  # a backslash then "udcff": text, kept as repr says it
    ("a\\\udcff", r"'a\\\xff'"),
    ("\ud800", r"'\ud800'"),  # a surrogate no decoding gives: as repr
    ("é", "'é'"),
])
def test_a_byte_that_was_not_utf8_is_shown_as_the_byte(value: str, shown: str) -> None:
    """An argument holding a byte that is not UTF-8 was echoed in refusals
    as Python's surrogate escape ('\\udcff'): quote_arg() and _show() show the
    byte ('\\xff'), and id_problem quotes the character that way too."""
    from pimcore.ids import _show, bytes_readable, id_problem, quote_arg

    assert quote_arg(value) == shown and _show(value) == shown
    assert bytes_readable(f"invalid choice: {value!r}") == f"invalid choice: {shown}"
    assert bytes_readable("unrecognized arguments: a\udcffb") == r"unrecognized arguments: a\xffb"
    assert id_problem("b\udcffob") == (r"user id 'b\xffob' has the non-ASCII character '\xff' (user ids are 1-64"
                                       " ASCII characters from A-Z a-z 0-9 _ . @ -)")
    assert _show("x" * 100 + "\udcff").endswith("...(101 chars)")


@pytest.mark.parametrize("token, said", [
    (b"abc.def.ghi", "token is not a pimcore token: its three parts are not a JWT's"),
    (b"garbage", "token is not a pimcore token: a JWT has three parts separated by dots, this has 1"),
    (b"a.b", "token is not a pimcore token: a JWT has three parts separated by dots, this has 2"),
    (b"a.b.c.d", "token is not a pimcore token: a JWT has three parts separated by dots, this has 4"),
    (b"\xff\xfe.x.y", "token is not a pimcore token: its three parts are not a JWT's"),
], ids=["three-junk-parts", "one-part", "two-parts", "four-parts", "not-ascii"])
def test_a_malformed_token_is_refused_as_not_a_pimcore_token_in_words(token: bytes, said: str) -> None:
    """open_client(url, "abc.def.ghi") was refused as "token is invalid:
    Invalid header string: 'utf-8' codec can't decode byte 0xb7 ..." and
    --token garbage as "token is invalid: Not enough segments" (PyJWT's
    words, new-user pass): now what it is not, and what pimcore takes."""
    from pimcore.auth import JwtAuthenticator
    from pimcore.errors import AuthError

    with pytest.raises(AuthError) as err:
        JwtAuthenticator(SPEC_SECRET)(token, 1_700_000_000 * 1_000_000)
    assert str(err.value).startswith(said), str(err.value)
    assert "(a JWT as pimcore token issues)" in str(err.value), str(err.value)
    assert "codec" not in str(err.value) and "segments" not in str(err.value), str(err.value)
