"""The comm backend registry: name -> CommBackend subclass (an `epmoe.registry.Registry` that
refuses a backend leaving any declared capability to CommBackend)."""

from __future__ import annotations

from epmoe.comm.base import CommBackend
from epmoe.registry import Registry

COMM_BACKENDS: Registry[type[CommBackend]] = Registry("comm backend", required=(
    "layouts", "payloads", "devices", "needs_host_sync", "static_capable", "single_node", "moves_tokens",
    "split_phase", "Options"))
register_comm = COMM_BACKENDS.register
get_comm = COMM_BACKENDS.get
