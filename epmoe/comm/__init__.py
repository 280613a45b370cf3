"""Communication backends: dispatch token rows to expert ranks, combine the results back.

Importing this package registers every backend; `get_comm(name)` returns its class, which is
built as `cls(cfg, group, placement, cls.make_options(**options), device=..., dtype=...)`.
"""

from epmoe.comm import allgather, nccl_a2a, none, symmetric  # noqa: F401  (each registers its backend)
from epmoe.comm.base import CommBackend, CommOptions, Dispatched
from epmoe.comm.registry import COMM_BACKENDS, get_comm, register_comm

__all__ = ["COMM_BACKENDS", "CommBackend", "CommOptions", "Dispatched", "get_comm", "register_comm"]
