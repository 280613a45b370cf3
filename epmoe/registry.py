"""One registry class for every kind of pluggable piece (comm backends, expert runners).

    COMM_BACKENDS = Registry("comm backend")
    @COMM_BACKENDS.register
    class MyComm(CommBackend): name = "mine"
    COMM_BACKENDS.get("mine")  # the class; an unknown name raises ValueError listing the known ones

`required` names the class attributes (declared capabilities) every registered class must set
itself: one left to a base class raises, so no capability is an inherited default. A registry is
a read-only mapping name -> class (`name in REG`, `sorted(REG)`, `REG[name]`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """name -> class of one kind of piece; `kind` names it in error messages."""

    def __init__(self, kind: str, required: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.required = required
        self._items: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: make `cls` available under `cls.name`."""
        name = getattr(cls, "name", "")
        if not name or name in self._items:
            raise ValueError(f"{self.kind} name {name!r} is empty or taken")
        contract = cls.__mro__[-2]  # the class right below object: CommBackend, ExpertRunner
        declared = [k for k in cls.__mro__ if k not in (contract, object)]
        missing = [a for a in self.required if not any(a in vars(k) for k in declared)]
        if missing:
            raise TypeError(f"{self.kind} {name!r} must declare {', '.join(missing)} (class attributes)")
        self._items[name] = cls
        return cls

    def get(self, name: str) -> T:  # type: ignore[override]
        """The class registered as `name`; ValueError naming the known ones otherwise."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(sorted(self._items))})"
