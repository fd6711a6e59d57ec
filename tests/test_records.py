"""``record`` behaves as ``dataclass`` does, for everything the broker's records use.

Each test builds the same class twice, once with each decorator, and compares what they do."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any

import pytest

from broker.records import record

pytestmark = pytest.mark.unit

Decorator = Callable[..., Any]
BOTH = pytest.mark.parametrize("make", [dataclass, record], ids=["dataclass", "record"])


def build(make: Decorator, frozen: bool = False, eq: bool = True) -> Any:
    @make(frozen=frozen, eq=eq)
    class Token:
        accessor: str
        secret: str = field(default="", repr=False)
        policies: list[str] = field(default_factory=list)
        ttl: int = 60
        note: str = field(default="-", compare=False)

    return Token


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except Exception as error:
        return type(error).__name__, None


@BOTH
def test_arguments_defaults_and_factories(make: Decorator) -> None:
    cls = build(make)
    token = cls("a1", "s3cret", ttl=5)
    assert (token.accessor, token.secret, token.policies, token.ttl, token.note) == (
        "a1", "s3cret", [], 5, "-",
    )  # fmt: skip
    assert cls("a", policies=["p"]).policies == ["p"]
    assert cls("a").policies is not cls("a").policies  # a new list each time
    assert cls(accessor="k").accessor == "k"


def test_bad_arguments_are_refused_as_by_a_dataclass() -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((), {}),
        (("a", "s", [], 1, "n", "extra"), {}),
        (("a",), {"accessor": "b"}),
        (("a",), {"colour": "red"}),
        ((), {"secret": "s"}),
    ]
    for args, kwargs in calls:
        expected = outcome(lambda a=args, k=kwargs: build(dataclass)(*a, **k))
        got = outcome(lambda a=args, k=kwargs: build(record)(*a, **k))
        assert got[0] == expected[0] == "TypeError", (args, kwargs)


def test_a_bad_argument_is_named() -> None:
    cls = build(record)
    with pytest.raises(TypeError, match="'colour'"):
        cls("a", colour="red")
    with pytest.raises(TypeError, match="multiple values for argument 'accessor'"):
        cls("a", accessor="b")
    with pytest.raises(TypeError, match=r"missing required argument.*'accessor'"):
        cls(ttl=1)


def test_repr_and_fields_match_a_dataclass() -> None:
    for frozen in (False, True):
        ours, theirs = build(record, frozen)("a", "hidden"), build(dataclass, frozen)("a", "hidden")
        assert repr(ours) == repr(theirs)
        assert "hidden" not in repr(ours)
        assert [f.name for f in dataclasses.fields(ours)] == [
            f.name for f in dataclasses.fields(theirs)
        ]
        assert dataclasses.asdict(ours) == dataclasses.asdict(theirs)
        assert dataclasses.is_dataclass(ours)


@BOTH
def test_equality_ignores_compare_false_and_other_classes(make: Decorator) -> None:
    cls = build(make)
    assert cls("a", note="x") == cls("a", note="y")
    assert cls("a") != cls("b")
    assert cls("a") != build(make)("a")  # the same fields, another class
    assert cls("a") != ("a", "", [], 60)


@BOTH
def test_hash_follows_frozen_and_eq(make: Decorator) -> None:
    @make(frozen=True)
    class Key:
        name: str
        note: str = field(default="-", compare=False)
        ttl: int = field(default=0, hash=False)

    assert hash(Key("a")) == hash(Key("a", "other")) == hash(Key("a", ttl=3)) == hash(("a",))
    assert len({Key("a"), Key("a"), Key("b")}) == 2
    with pytest.raises(TypeError):
        hash(build(make)("a"))  # mutable with eq: unhashable
    plain = build(make, eq=False)
    one = plain("a")
    assert one != plain("a") and hash(one) == object.__hash__(one)


@BOTH
def test_a_frozen_record_refuses_changes(make: Decorator) -> None:
    token = build(make, frozen=True)("a")
    with pytest.raises(FrozenInstanceError):
        token.ttl = 2
    with pytest.raises(FrozenInstanceError):
        token.other = 2
    with pytest.raises(FrozenInstanceError):
        del token.ttl
    assert dataclasses.replace(token, ttl=9).ttl == 9 and token.ttl == 60


@BOTH
def test_copies(make: Decorator) -> None:
    token = build(make, frozen=True)("a", "s", ["p"])
    assert copy.copy(token) == token and copy.deepcopy(token) == token


def test_methods_the_class_defines_are_kept() -> None:
    @record(frozen=True)
    class Shown:
        value: str

        def __repr__(self) -> str:
            return "Shown(<hidden>)"

    assert repr(Shown("x")) == "Shown(<hidden>)"
    with pytest.raises(TypeError, match="frozen record"):

        @record(frozen=True)
        class Writable:
            value: str

            def __setattr__(self, name: str, value: Any) -> None: ...


def test_init_false_fields_take_their_defaults() -> None:
    for make in (dataclass, record):

        @make
        class Counter:
            name: str
            seen: list[str] = field(default_factory=list, init=False)

        assert Counter("c").seen == []
        assert outcome(lambda: Counter("c", seen=[]))[0] == "TypeError"


def test_the_broker_declares_its_records_with_record() -> None:
    """``@dataclass`` compiles six methods at import (~1.2 ms a class on a cold start)."""
    import re
    from pathlib import Path

    import broker

    root = Path(broker.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*@(dataclasses\.)?dataclass\b", line)
    ]
    assert offenders == [], f"use @record (broker/records.py) instead of @dataclass: {offenders}"
