"""The comm backend registry: name -> CommBackend subclass."""

from __future__ import annotations

import inspect
from typing import Any

from epmoe.comm.base import CommBackend

COMM_BACKENDS: dict[str, type[CommBackend]] = {}


def register_comm(cls: type[CommBackend]) -> type[CommBackend]:
    """Class decorator: make a backend available under `cls.name`."""
    if not cls.name or cls.name in COMM_BACKENDS:
        raise ValueError(f"comm backend name {cls.name!r} is empty or taken")
    COMM_BACKENDS[cls.name] = cls
    return cls


def get_comm(name: str) -> type[CommBackend]:
    if name not in COMM_BACKENDS:
        raise ValueError(f"unknown comm backend {name!r}; available: {', '.join(sorted(COMM_BACKENDS))}")
    return COMM_BACKENDS[name]


def accepted_options(cls: type[CommBackend], options: dict[str, Any]) -> dict[str, Any]:
    """The subset of `options` that `cls.__init__` names explicitly (for callers that hand the
    same options, e.g. max_tokens_per_rank, to several backends)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}
