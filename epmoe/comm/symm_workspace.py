"""The symm_a2a workspace: its byte layout, typed views, and the transports that map every
rank's workspace into every rank (the protocol that uses it: epmoe/comm/symmetric.py).

    Layout          byte offsets of the regions of one rank's workspace (identical on every rank)
    RankViews       one rank's workspace as typed tensors (flags, meta, payload planes, comb_out)
    map_workspaces  every rank's workspace, mapped here, by transport:
                      VirtualGroup (W ranks in one process)  plain allocations shared in one table
                      gloo processes on the CPU                 one /dev/shm file every process maps
                      NCCL ranks on GPUs of one node            torch symmetric memory
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from epmoe.comm.payload import payload_row_bytes
from epmoe.group import EPGroup, RankGroup

ALIGN = 128  # every region starts on a 128-byte boundary


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Layout:
    """Byte offsets of the regions of one rank's workspace (identical on every rank)."""

    world: int
    max_tokens: int
    hidden: int
    slot_experts: int  # Kl
    payload: str
    dtype: torch.dtype  # activation dtype of bf16 payload rows
    combine_dtype: torch.dtype

    def __post_init__(self) -> None:
        d, s, g = payload_row_bytes(self.payload, self.hidden, self.dtype)
        W, Tm, Kl, H = self.world, self.max_tokens, self.slot_experts, self.hidden
        slots = W * Tm
        sizes = [
            ("flags", 3 * W * 4),
            ("meta_ids", slots * Kl * 4),
            ("meta_w", slots * Kl * 4),
            ("data", slots * d),
            ("scales", slots * s),
            ("gscale", slots * g),
            ("comb_out", slots * H * self.combine_dtype.itemsize),
        ]
        off = 0
        offsets = {}
        for name, n in sizes:
            offsets[name] = off
            off += _align(n)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "row_bytes", (d, s, g))
        object.__setattr__(self, "nbytes", off)

    offsets: dict = field(init=False, repr=False)  # region -> byte offset
    row_bytes: tuple = field(init=False, repr=False)  # (D, S, G) bytes per row
    nbytes: int = field(init=False)

    def views(self, buf: torch.Tensor) -> RankViews:
        """Typed views of one rank's workspace bytes `buf` [nbytes] uint8."""
        W, Tm, Kl, H = self.world, self.max_tokens, self.slot_experts, self.hidden
        o, (d, s, g) = self.offsets, self.row_bytes

        def region(name: str, nbytes: int) -> torch.Tensor:
            return buf[o[name]: o[name] + nbytes]

        slots = W * Tm
        return RankViews(
            flags=region("flags", 3 * W * 4).view(torch.int32).view(3, W),
            meta_ids=region("meta_ids", slots * Kl * 4).view(torch.int32).view(W, Tm, Kl),
            meta_w=region("meta_w", slots * Kl * 4).view(torch.float32).view(W, Tm, Kl),
            data=region("data", slots * d).view(slots, d),
            scales=region("scales", slots * s).view(slots, s),
            gscale=region("gscale", slots * g).view(torch.float32).view(slots, g // 4),
            comb_out=region("comb_out", slots * H * self.combine_dtype.itemsize)
            .view(self.combine_dtype).view(W, Tm, H),
        )


@dataclass
class RankViews:
    """One rank's workspace as tensors (see the module docstring for each region)."""

    flags: torch.Tensor  # int32 [3, W]
    meta_ids: torch.Tensor  # int32 [W, Tm, Kl]
    meta_w: torch.Tensor  # fp32 [W, Tm, Kl]
    data: torch.Tensor  # uint8 [W*Tm, D]
    scales: torch.Tensor  # uint8 [W*Tm, S]
    gscale: torch.Tensor  # fp32 [W*Tm, G/4]
    comb_out: torch.Tensor  # combine dtype [W, Tm, H]



# ---------------------------------------------------------------------------------------
# transports: how the W workspaces are created and mapped
# ---------------------------------------------------------------------------------------

_MAILBOX: dict[int, list[Any]] = {}
_MAILBOX_LOCK = threading.Lock()


def shared_key(group: RankGroup | None) -> int:
    """A random key every rank agrees on (rank 0's)."""
    key = secrets.randbits(62)
    if group is None or group.world == 1:
        return key
    return int(group.all_gather_ints([key])[0][0])


def exchange_local(group: RankGroup | None, value: Any) -> list[Any]:
    """Every rank's `value`, for ranks that live in one process (a VirtualGroup)."""
    if group is None or group.world == 1:
        return [value]
    key = shared_key(group)
    with _MAILBOX_LOCK:
        box = _MAILBOX.setdefault(key, [None] * group.world)
        box[group.rank] = value
    group.barrier()
    values = list(_MAILBOX[key])
    group.barrier()
    if group.rank == 0:
        with _MAILBOX_LOCK:
            _MAILBOX.pop(key, None)
    return values


def map_shm(group: RankGroup, nbytes: int) -> list[torch.Tensor]:
    """W workspaces in one /dev/shm file that every process maps; unlinked once all mapped."""
    key = shared_key(group)
    root = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    path = os.path.join(root, f"epmoe-symm-{key:x}-w{group.world}")
    total = nbytes * group.world
    if group.rank == 0:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, total)  # zero-filled
        finally:
            os.close(fd)
    group.barrier()
    try:
        buf = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    finally:
        group.barrier()  # everyone has mapped it
        if group.rank == 0:
            os.unlink(path)
    return list(buf.view(group.world, nbytes).unbind(0))


def map_symmetric(group: EPGroup, nbytes: int, device: torch.device) -> tuple[list[torch.Tensor], Any]:
    """W workspaces in torch symmetric memory (one GPU per rank, one NVLink domain)."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    buf.zero_()
    pg = group.pg or dist.group.WORLD
    handle = symm_mem.rendezvous(buf, pg.group_name)
    peers = [buf if r == group.rank else handle.get_remote_tensor(r, (nbytes,), torch.uint8)
             for r in range(group.world)]
    return peers, handle


@dataclass
class Mapped:
    """Every rank's workspace as mapped on this rank.

    buffers:     [W] uint8 [nbytes] tensors, this rank's own at its rank (keep them alive as
                 long as the views: they hold the peer mappings).
    in_process:  the ranks are threads of one process (a VirtualGroup, or no group).
    symm_handle: the torch symmetric-memory handle (NCCL ranks on GPUs), else None.
    """

    buffers: list[torch.Tensor]
    in_process: bool
    symm_handle: Any = None


def map_workspaces(group: RankGroup | None, nbytes: int, device: torch.device) -> Mapped:
    """Allocate this rank's zeroed workspace of `nbytes` and map every peer's (collective: every
    rank calls it together); returns once every rank's workspace is zeroed and mapped."""
    in_process = not isinstance(group, EPGroup)
    handle = None
    if in_process:
        own = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        peers = exchange_local(group, own)
    elif device.type == "cpu":
        peers = map_shm(group, nbytes)
    else:
        peers, handle = map_symmetric(group, nbytes, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # zeroed before any peer may write
    if group is not None and group.world > 1:
        group.barrier()
    return Mapped(peers, in_process, handle)
