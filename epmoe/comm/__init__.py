"""Communication backends: dispatch token rows to expert ranks, combine the results back.

Importing this package registers every backend; `get_comm(name)` returns its class.
"""

from epmoe.comm import none  # noqa: F401  (registers "none")
from epmoe.comm.base import CommBackend, Dispatched
from epmoe.comm.registry import COMM_BACKENDS, accepted_options, get_comm, register_comm

__all__ = ["COMM_BACKENDS", "CommBackend", "Dispatched", "accepted_options", "get_comm", "register_comm"]
