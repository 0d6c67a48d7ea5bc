"""record_maker (pimcore._pure.records and its compiled twin): a fast
constructor of frozen slotted dataclasses that must be indistinguishable
from the class itself -- same value, same type, same hash, same errors."""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pimcore import core
from pimcore import frames as F
from pimcore.store import lmdb as lmdb_module
from pimcore.store.base import AckPosition, Acked, Appended, NewMessage


@dataclass(frozen=True, slots=True)
class _Plain:
    a: int
    b: str = "x"


@dataclass(frozen=True, slots=True)
class _Checked:
    a: int

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError("negative")


@dataclass(frozen=True, slots=True)
class _Factory:
    a: int
    b: list = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _KwOnly:
    a: int
    b: int = field(kw_only=True, default=0)


@dataclass(frozen=True)
class _NoSlots:
    a: int
    b: int


@dataclass(frozen=True, slots=True)
class _NoInit:
    a: int
    b: int = field(init=False, default=7)


HOT = (NewMessage, Appended, Acked, AckPosition, F.Message, F.SendAck, F.Push, F.PushAck, core.SendData)


def _same(x: Any, y: Any) -> None:
    assert type(x) is type(y)
    assert x == y and repr(x) == repr(y)
    try:
        want = hash(y)
    except TypeError:  # a list field
        with pytest.raises(TypeError):
            hash(x)
    else:
        assert hash(x) == want
    assert dataclasses.astuple(x) == dataclasses.astuple(y)


@pytest.mark.parametrize("cls", HOT, ids=lambda c: c.__name__)
def test_every_field_positionally_equals_the_class(backend: ModuleType, cls: type) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    args = tuple(f"v{i}" for i in range(len(names)))
    made = backend.record_maker(cls)(*args)
    _same(made, cls(*args))
    assert [getattr(made, n) for n in names] == list(args)
    assert gc.is_tracked(made) == gc.is_tracked(cls(*args))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.__setattr__(names[0], 1)


def test_the_compiled_maker_takes_the_fast_route_for_the_hot_records(both: tuple[ModuleType, ModuleType]) -> None:
    cy, pure = both
    for cls in HOT:
        assert cy.record_maker(cls) is not cls, cls  # validated: slot stores
        assert pure.record_maker(cls) is cls
    # Classes whose __init__ does more than assign every field get the class
    # (a default_factory is fine: with every field given it is not called).
    assert cy.record_maker(_Factory) is not _Factory
    for cls in (_Checked, _KwOnly, _NoSlots, _NoInit):
        assert cy.record_maker(cls) is cls, cls


@pytest.mark.parametrize("cls", [_Plain, _Checked, _Factory, _KwOnly, _NoSlots, _NoInit], ids=lambda c: c.__name__)
def test_other_calls_are_the_class_own(backend: ModuleType, cls: type) -> None:
    mk = backend.record_maker(cls)
    for args, kw in [((1,), {}), ((1, 2), {}), ((), {"a": 3}), ((1,), {"b": 2}), ((-1,), {}), ((), {}), ((1, 2, 3), {})]:
        try:
            want: Any = cls(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - the error itself is compared
            with pytest.raises(type(exc)) as got:
                mk(*args, **kw)
            assert str(got.value) == str(exc)
        else:
            _same(mk(*args, **kw), want)


@pytest.mark.parametrize("bad", [1, "x", None, int, F.Message(0, b"", "", 0, "", "", 0, 0, b"")])
def test_a_non_dataclass_type_is_a_type_error(backend: ModuleType, bad: Any) -> None:
    with pytest.raises(TypeError, match="record_maker needs a dataclass type"):
        backend.record_maker(bad)


@given(st.lists(st.one_of(st.integers(), st.text(max_size=5), st.binary(max_size=5), st.none()), max_size=14))
def test_differential(args: list) -> None:
    from pimcore import _backend

    try:
        cy = _backend.load("cython")
    except ImportError:
        pytest.skip("compiled backend not built")
    pure = _backend.load("pure")
    for cls in (F.Message, F.SendAck, NewMessage, _Plain):
        outcomes = []
        for impl in (cy, pure):
            try:
                outcomes.append(("ok", impl.record_maker(cls)(*args)))
            except Exception as exc:  # noqa: BLE001
                outcomes.append(("err", type(exc), str(exc)))
        if outcomes[0][0] == "ok" and outcomes[1][0] == "ok":
            _same(outcomes[0][1], outcomes[1][1])
        else:
            assert outcomes[0] == outcomes[1]


def test_the_hot_path_uses_makers_of_the_right_classes() -> None:
    # A maker built for a class that is later renamed or replaced would still
    # build the old one: the core and the store must use the live classes.
    assert core._new_message(*range(11)).__class__ is NewMessage
    assert core._message(*range(12)).__class__ is F.Message
    assert core._send_ack(*range(5)).__class__ is F.SendAck
    assert core._push(1, ()).__class__ is F.Push
    assert core._ack_position("u", "d", 1, 2).__class__ is AckPosition
    assert core._send_data(1, b"x").__class__ is core.SendData
    assert lmdb_module._appended(b"m", 1, 2, (), 0).__class__ is Appended
    assert lmdb_module._acked("u", "d", 1).__class__ is Acked


def test_the_core_send_path_gives_its_makers_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    # The compiled maker falls back to the dataclass __init__ for any other
    # call (a third of the batch completion's CPU once, for a Message built
    # with its 12 leading fields only): every call the send path makes --
    # plain sends, a mention, the sender's other device -- passes them all.
    from _harness import Harness

    from pimcore.store import MemoryStore

    calls: list[tuple[str, int, int]] = []

    def checked(name: str, maker: Any, cls: type) -> Any:
        n = len(dataclasses.fields(cls))

        def make(*args: Any, **kw: Any) -> Any:
            calls.append((name, len(args) + len(kw), n))
            assert not kw and len(args) == n, f"{name}: {len(args)} positional + {sorted(kw)} of {n} fields"
            return maker(*args)

        return make

    for name, cls in [("_new_message", NewMessage), ("_message", F.Message), ("_send_ack", F.SendAck),
                      ("_push", F.Push), ("_ack_position", AckPosition), ("_send_data", core.SendData)]:
        monkeypatch.setattr(core, name, checked(name, getattr(core, name), cls))
    h = Harness(MemoryStore())
    h.create_group("team", ["alice", "bob"])
    phone, tablet, bob = h.login("alice", "phone"), h.login("alice", "tablet"), h.login("bob", "laptop")
    h.send(phone, "team", b"plain")
    h.feed(phone, F.SendReq(99, "team", h.now, b"@bob", mentions=(F.Mention("bob"),)))
    h.lose(tablet)
    h.send(phone, "team", b"only the sender's device online")
    got = h.pushed(bob)
    assert [m.payload for m in got] == [b"plain", b"@bob", b"only the sender's device online"]
    assert [tuple(x.user for x in m.mentions) for m in got] == [(), ("bob",), ()]
    assert [m.payload for m in h.pushed(tablet)] == [b"plain", b"@bob"]
    assert [a.code for a in h.acks(phone)] == [0, 0, 0]
    assert {name for name, _, _ in calls} >= {"_new_message", "_message", "_send_ack", "_push", "_send_data"}
