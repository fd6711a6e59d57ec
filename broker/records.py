"""Records: dataclasses that compile nothing at import.

``dataclasses.dataclass`` writes a class's ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``,
``__setattr__`` and ``__delattr__`` as source text and compiles each with ``exec``: ~1.2 ms a
class on a 2-core machine, ~45 ms of a cold ``stigmer-broker run`` for the 36 records it imports.
``record`` leaves the field processing to the standard library (so ``dataclasses.fields``,
``replace`` and ``asdict`` work as on any dataclass) and gives the class methods built from
closures over the fields it found: ~0.1 ms a class. Creating an instance costs ~1 µs more.

The behaviour is the dataclass's for what the broker uses: positional and keyword arguments,
defaults and ``field(default_factory=…, repr=False, compare=False, hash=…, init=False)``,
``frozen`` (``FrozenInstanceError``), ``eq`` and the hash it implies. ``order``, ``slots``,
``kw_only`` and ``InitVar`` are not offered. The class's ``__dataclass_params__`` says
``init=False, repr=False, eq=False`` (the standard library did not write those methods), and
``inspect.signature`` of a record shows ``(*args, **kwargs)``; mypy sees the real one.
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable
from dataclasses import MISSING, Field, FrozenInstanceError, field
from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["FrozenInstanceError", "field", "record"]

T = TypeVar("T")


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = False, eq: bool = True) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(field, Field))
def record(
    cls: type[T] | None = None, /, *, frozen: bool = False, eq: bool = True
) -> type[T] | Callable[[type[T]], type[T]]:
    """``@dataclass`` for the broker's records: ``@record`` or ``@record(frozen=True, eq=…)``."""

    def wrap(cls: type[T]) -> type[T]:
        return _build(cls, frozen, eq)

    return wrap if cls is None else wrap(cls)


def _build(cls: type[T], frozen: bool, eq: bool) -> type[T]:
    own = cls.__dict__
    if frozen and ("__setattr__" in own or "__delattr__" in own):
        raise TypeError(f"{cls.__name__}: a frozen record cannot define __setattr__/__delattr__")
    explicit_hash = "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own)
    documented = bool(cls.__doc__)
    if not documented:
        cls.__doc__ = cls.__name__  # spares the standard library an inspect.signature
    dataclasses.dataclass(cls, init=False, repr=False, eq=False)
    found = dataclasses.fields(cls)  # type: ignore[arg-type]  # it is a dataclass now
    if not documented:
        cls.__doc__ = f"{cls.__name__}({', '.join(f.name for f in found)})"
    methods: dict[str, Any] = {"__init__": _init(cls, found), "__repr__": _repr(found)}
    if eq:
        values = _getter(tuple(f.name for f in found if f.compare))
        methods["__eq__"] = _eq(values)
    if frozen:
        names = frozenset(f.name for f in found)
        methods["__setattr__"], methods["__delattr__"] = _frozen(cls, names)
    for name, method in methods.items():
        if name not in own:
            method.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, method)
    if eq and not explicit_hash:
        hashed = [f.name for f in found if (f.compare if f.hash is None else f.hash)]
        cls.__hash__ = _hash(_getter(tuple(hashed))) if frozen else None  # type: ignore[assignment]
    return cls


def _getter(names: tuple[str, ...]) -> Callable[[object], tuple[Any, ...]]:
    """The named attributes of an object, as a tuple (attrgetter gives a bare value for one)."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda instance: (one(instance),)
    return lambda instance: ()


def _init(cls: type, found: tuple[Field[Any], ...]) -> Callable[..., None]:
    fields = tuple(f for f in found if f.init)
    names = tuple(f.name for f in fields)
    later = tuple(f for f in found if not f.init)  # set from their defaults
    count = len(names)
    plain = not later
    setter = object.__setattr__
    where = f"{cls.__qualname__}.__init__()"

    def __init__(self: object, *args: Any, **kwargs: Any) -> None:
        if not kwargs and len(args) == count and plain:  # the common case, fast
            attributes = self.__dict__
            for name, value in zip(names, args, strict=False):  # lengths checked
                attributes[name] = value
            return
        if len(args) > count:
            raise TypeError(
                f"{where} takes {count + 1} positional arguments but {len(args) + 1} were given"
            )
        for name, value in zip(names, args, strict=False):
            setter(self, name, value)
        if kwargs or len(args) < count:
            missing = []
            for f in fields[len(args) :]:
                if f.name in kwargs:
                    setter(self, f.name, kwargs.pop(f.name))
                elif _has_default(f):
                    setter(self, f.name, _default(f))
                else:
                    missing.append(repr(f.name))
            if kwargs:
                name = next(iter(kwargs))
                reason = (
                    "multiple values for argument"
                    if name in names
                    else "an unexpected keyword argument"
                )
                raise TypeError(f"{where} got {reason} {name!r}")
            if missing:
                raise TypeError(f"{where} missing required argument(s): {', '.join(missing)}")
        for f in later:
            if _has_default(f):
                setter(self, f.name, _default(f))

    return __init__


def _has_default(f: Field[Any]) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _default(f: Field[Any]) -> Any:
    return f.default if f.default_factory is MISSING else f.default_factory()


def _repr(found: tuple[Field[Any], ...]) -> Callable[[object], str]:
    shown = tuple(f.name for f in found if f.repr)

    @reprlib.recursive_repr()
    def __repr__(self: object) -> str:
        parts = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{type(self).__qualname__}({parts})"

    return __repr__


def _eq(values: Callable[[object], tuple[Any, ...]]) -> Callable[[object, object], Any]:
    def __eq__(self: object, other: object) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    return __eq__


def _hash(values: Callable[[object], tuple[Any, ...]]) -> Callable[[object], int]:
    def __hash__(self: object) -> int:
        return hash(values(self))

    return __hash__


def _frozen(
    cls: type[Any], names: frozenset[str]
) -> tuple[Callable[[object, str, Any], None], Callable[[object, str], None]]:
    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    return __setattr__, __delattr__
