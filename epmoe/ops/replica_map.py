"""Logical routing ids -> physical expert slots: the launch wrapper of kernels/replica_map.py
and its plain-torch twin (same arguments, bit-equal outputs).

    replica_map(ids, slots, first, copies, token_stride, offset, out=None, impl="auto")
    replica_map_torch(ids, slots, first, copies, token_stride, offset, out=None)

    ids    [T, K] int32 or int64 logical experts, -1 (or any id outside [0, E)) = padding
    slots  [P] int32: each expert's slots, ascending, expert by expert
    first  [E] int32: where expert e's slots start in `slots`
    copies [E] int32 >= 1: how many slots expert e has
    out    [T, K] int32: slots[first[e] + (t * token_stride + offset) % copies[e]], -1 for padding

`eplb.ReplicaMap` holds the tables and passes (token_stride, offset) = (W, rank) in the dp
layout, (1, 0) in tp. The kernel is one launch where the twin is about eight torch ops, each a
launch and host work on an eager decode step. Neither syncs with the host nor sizes anything
by the ids' values: both fit in a captured CUDA graph.
"""

from __future__ import annotations

import torch

from epmoe.ops.combine import pick_impl
from epmoe.ops.launch import launcher
from epmoe.util import cdiv

__all__ = ["check_tables", "replica_map", "replica_map_torch"]

BLOCK = 1024  # picks per program: decode (T * K <= 1024) is one program


def check_tables(slots: torch.Tensor, first: torch.Tensor, copies: torch.Tensor, device: torch.device) -> None:
    """ValueError unless slots, first and copies are contiguous 1-d int32 tensors on `device`
    and first, copies have one entry per expert (`eplb.ReplicaMap` checks its tables once)."""
    for name, t in (("slots", slots), ("first", first), ("copies", copies)):
        if t.dim() != 1 or t.dtype != torch.int32 or not t.is_contiguous() or t.device != device:
            raise ValueError(f"replica_map's {name} must be a contiguous 1-d int32 tensor on {device} "
                             f"(eplb.ReplicaMap builds the tables), got {tuple(t.shape)} {t.dtype} on {t.device}")
    if first.shape != copies.shape:
        raise ValueError(f"replica_map's first {tuple(first.shape)} and copies {tuple(copies.shape)} must both be [E]")


def _check(ids: torch.Tensor, slots: torch.Tensor, first: torch.Tensor, copies: torch.Tensor,
           out: torch.Tensor | None, tables: bool) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"replica_map takes ids [T, K] int32 or int64, got {tuple(ids.shape)} {ids.dtype}")
    if tables:
        check_tables(slots, first, copies, ids.device)
    elif ids.device != slots.device:
        raise ValueError(f"ids are on {ids.device}, the replica tables on {slots.device}: move the ids")
    if out is not None and (out.shape != ids.shape or out.dtype != torch.int32 or not out.is_contiguous()
                            or out.device != ids.device):
        raise ValueError(f"replica_map's out must be a contiguous int32 tensor of ids' shape {tuple(ids.shape)} on "
                         f"{ids.device}, got {tuple(out.shape)} {out.dtype} on {out.device}; or pass none")


def replica_map_torch(ids: torch.Tensor, slots: torch.Tensor, first: torch.Tensor, copies: torch.Tensor,
                      token_stride: int, offset: int, out: torch.Tensor | None = None,
                      check_tables: bool = True) -> torch.Tensor:
    """Plain-torch twin of `replica_map` (module docstring): [T, K] int32 slots, -1 kept."""
    _check(ids, slots, first, copies, out, check_tables)
    T, E = ids.shape[0], first.shape[0]
    e = ids.clamp(0, E - 1).long()  # [T, K]
    t = torch.arange(T, dtype=torch.int64, device=ids.device)[:, None]  # [T, 1]
    turn = t * token_stride + offset  # [T, 1] int64
    slot = slots[(first[e] + turn % copies[e]).long()]  # [T, K] int32
    mapped = torch.where((ids >= 0) & (ids < E), slot, -1).int()
    return mapped if out is None else out.copy_(mapped)


def replica_map(ids: torch.Tensor, slots: torch.Tensor, first: torch.Tensor, copies: torch.Tensor,
                token_stride: int, offset: int, out: torch.Tensor | None = None, impl: str = "auto",
                check_tables: bool = True) -> torch.Tensor:
    """Physical slot of each pick (module docstring), in one Triton launch. impl: "auto" (the
    kernel on CUDA, the twin elsewhere), "triton" (also on the CPU under TRITON_INTERPRET=1) or
    "torch" (`replica_map_torch`). check_tables=False skips the tables' checks (a caller that
    made them once: `check_tables`); ids and out are checked on every call."""
    if pick_impl(impl, ids.device) == "torch":
        return replica_map_torch(ids, slots, first, copies, token_stride, offset, out, check_tables)
    from epmoe.kernels.replica_map import replica_map_kernel

    _check(ids, slots, first, copies, out, check_tables)
    if out is None:
        out = torch.empty(ids.shape, dtype=torch.int32, device=ids.device)
    n = ids.numel()
    if n:
        launcher(replica_map_kernel)[(cdiv(n, BLOCK),)](
            ids, slots, first, copies, out, n, ids.shape[1], first.shape[0], ids.stride(0), ids.stride(1),
            token_stride, offset, BLOCK=BLOCK, num_warps=4)
    return out
