"""The symm_a2a workspace: its byte layout, typed views, and the transports that map every
rank's workspace into every rank (the protocol that uses it: epmoe/comm/symmetric.py).

Layout of one rank's buffer (identical on every rank; each region aligned to 128 bytes; W ranks,
Tm = max_tokens_per_rank, H hidden, Kl = min(top_k, E_local) local experts a token can pick on one
rank):

    flags     int32 [3, W]     [0, s] dispatch flag written by source s; [1, r] combine flag
                               written by expert rank r; [2, s] token count of source s
    meta_ids  int32 [W, Tm, Kl] local expert ids of slot [s, t] (-1 = none)
    meta_w    fp32  [W, Tm, Kl] their router weights
    data      [W * Tm, D] bytes row payload: bf16 -> H * itemsize; fp8/fp8_block -> H;
                               nvfp4 -> H / 2 (two e2m1 codes a byte)
    scales    [W * Tm, S] bytes fp8: 4 (fp32 per row); fp8_block: 4 * ceil(H / 128);
                               nvfp4: H / 16 (e4m3 per 16 values); bf16: none
    gscale    fp32 [W * Tm, G/4] nvfp4 global scale per row (rows of several ranks are mixed)
    comb_out  [W, Tm, H]       partial sums, combine dtype (fp32 by default): push: [r, t] from
                               expert rank r for this rank's token t; pull: [s, t] for home s

    bytes per rank = 12 W + W * Tm * (8 Kl + D + S + G + H * c) (+ alignment)
    G = 4 for nvfp4 else 0, c = combine dtype size (4 for fp32, 2 for bf16)

e.g. DeepSeek-V3 (H 7168, Kl 8, W 8), per rank: Tm 128 with bf16 rows and fp32 combine 42.1 MiB
(fp8 35.1, nvfp4 32.0; bf16 combine saves 14 MiB); Tm 4096: 1346 MiB (nvfp4 1024).
`SymmA2A.workspace_bytes(...)` evaluates it without building anything.

`map_workspaces` maps every rank's buffer here: plain allocations shared in one table for a
VirtualGroup (W ranks in one process), one /dev/shm file every gloo process maps on the CPU, torch
symmetric memory for NCCL ranks on GPUs of one node.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from epmoe.comm.payload import payload_row_bytes
from epmoe.group import EPGroup, RankGroup

ALIGN = 128  # every region starts on a 128-byte boundary


@dataclass
class RankViews:
    """One rank's workspace as typed tensors (the regions of the module docstring)."""

    flags: torch.Tensor
    meta_ids: torch.Tensor
    meta_w: torch.Tensor
    data: torch.Tensor
    scales: torch.Tensor
    gscale: torch.Tensor
    comb_out: torch.Tensor


@dataclass(frozen=True)
class Layout:
    """Byte offsets of the regions of one rank's workspace (the module docstring)."""

    world: int
    max_tokens: int
    hidden: int
    slot_experts: int  # Kl
    payload: str
    dtype: torch.dtype  # activation dtype of bf16 payload rows
    combine_dtype: torch.dtype
    offsets: dict = field(init=False, repr=False)  # region -> byte offset
    row_bytes: tuple = field(init=False, repr=False)  # (D, S, G) bytes per row
    nbytes: int = field(init=False)

    def regions(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """region -> (dtype, shape), in buffer order."""
        d, s, g = self.row_bytes
        W, Tm, Kl, slots = self.world, self.max_tokens, self.slot_experts, self.world * self.max_tokens
        return {"flags": (torch.int32, (3, W)), "meta_ids": (torch.int32, (W, Tm, Kl)),
                "meta_w": (torch.float32, (W, Tm, Kl)), "data": (torch.uint8, (slots, d)),
                "scales": (torch.uint8, (slots, s)), "gscale": (torch.float32, (slots, g // 4)),
                "comb_out": (self.combine_dtype, (W, Tm, self.hidden))}

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_bytes", payload_row_bytes(self.payload, self.hidden, self.dtype))
        off, offsets = 0, {}
        for name, (dtype, shape) in self.regions().items():
            offsets[name] = off
            off += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "nbytes", off)

    def views(self, buf: torch.Tensor) -> RankViews:
        """Typed views of one rank's workspace bytes `buf` [nbytes] uint8."""
        views = {}
        for name, (dtype, shape) in self.regions().items():
            o = self.offsets[name]
            views[name] = buf[o : o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        return RankViews(**views)


_MAILBOX: dict[int, list[Any]] = {}
_MAILBOX_LOCK = threading.Lock()


def shared_key(group: RankGroup | None) -> int:
    """A random key every rank agrees on (rank 0's)."""
    key = secrets.randbits(62)
    return key if group is None or group.world == 1 else int(group.all_gather_ints([key])[0][0])


def exchange_local(group: RankGroup | None, value: Any) -> list[Any]:
    """Every rank's `value`, for ranks that live in one process (a VirtualGroup)."""
    if group is None or group.world == 1:
        return [value]
    key = shared_key(group)
    with _MAILBOX_LOCK:
        _MAILBOX.setdefault(key, [None] * group.world)[group.rank] = value
    group.barrier()
    values = list(_MAILBOX[key])
    group.barrier()
    if group.rank == 0:
        with _MAILBOX_LOCK:
            _MAILBOX.pop(key, None)
    return values


def map_shm(group: RankGroup, nbytes: int) -> list[torch.Tensor]:
    """W workspaces in one /dev/shm file that every process maps; unlinked once all mapped."""
    root, total = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", nbytes * group.world
    path = os.path.join(root, f"epmoe-symm-{shared_key(group):x}-w{group.world}")
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

    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device).zero_()
    handle = symm_mem.rendezvous(buf, (group.pg or dist.group.WORLD).group_name)
    peers = [buf if r == group.rank else handle.get_remote_tensor(r, (nbytes,), torch.uint8)
             for r in range(group.world)]
    return peers, handle


@dataclass
class Mapped:
    """Every rank's workspace as mapped on this rank."""

    buffers: list[torch.Tensor]  # [W] uint8 [nbytes], own at this rank (they hold the peer mappings: keep alive)
    in_process: bool  # the ranks are threads of one process (a VirtualGroup, or no group)
    symm_handle: Any = None  # the torch symmetric-memory handle (NCCL ranks on GPUs)


def map_workspaces(group: RankGroup | None, nbytes: int, device: torch.device) -> Mapped:
    """Allocate this rank's zeroed workspace of `nbytes` and map every peer's (collective: every
    rank calls it together); returns once every rank's workspace is zeroed and mapped."""
    in_process, handle = not isinstance(group, EPGroup), None
    if in_process:
        peers = exchange_local(group, torch.zeros(nbytes, dtype=torch.uint8, device=device))
    elif device.type == "cpu":
        peers = map_shm(group, nbytes)
    else:
        peers, handle = map_symmetric(group, nbytes, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # zeroed before any peer may write
    if group is not None and group.world > 1:
        group.barrier()
    return Mapped(peers, in_process, handle)
