"""Communication backends: dispatch token rows to expert ranks, combine the results back.

Importing this package registers every backend; `get_comm(name)` returns its class.
"""

from epmoe.comm import (
    allgather,  # noqa: F401  (registers "allgather")
    nccl_a2a,  # noqa: F401  (registers "nccl_a2a")
    none,  # noqa: F401  (registers "none")
    symmetric,  # noqa: F401  (registers "symm_a2a")
)
from epmoe.comm.base import CommBackend, Dispatched
from epmoe.comm.registry import COMM_BACKENDS, accepted_options, get_comm, register_comm

__all__ = ["COMM_BACKENDS", "CommBackend", "Dispatched", "accepted_options", "get_comm", "register_comm"]
