"""Sort pairs by expert into block_m-aligned slots: the launch wrappers of kernels/permute.py
and their plain-torch twin.

    permute(expert_ids, E, block_m)          device sort, no host sync (one launch up to
                                             SMALL_SORT_MAX_PAIRS pairs, else histogram, scan, scatter)
    permute_torch(expert_ids, E, block_m)    the twin of `permute` (same buffers; unset slots hold -1)

Both return a `Permutation`; integer outputs of the kernels and the twin match exactly on
the slots in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.ops.launch import launcher
from epmoe.util import cdiv, next_pow2

# the sort: up to this many pairs one program does everything (one launch); beyond, the pairs are
# split into segments over about SORT_SEGMENTS programs (histogram, scan, scatter: three launches).
# Measured on H200 (E = 128): one program 27 us at 512 pairs and 276 us at 8192, the segmented
# sort 15-18 us up to 8192 pairs and 41 us at 131072; equal at 256
SMALL_SORT_MAX_PAIRS = 256
SORT_SEGMENTS = 256


@dataclass
class Permutation:
    """Pairs grouped by expert into block_m-aligned slots (see kernels/permute.py).

    sorted_pair:  [max_blocks * block_m] int32, pair of each slot (slots past expert_end: unset).
    block_expert: [max_blocks] int32, expert of each block of slots, -1 = unused block.
    expert_end:   [E] int32, first padding slot of each expert.
    """

    sorted_pair: torch.Tensor
    block_expert: torch.Tensor
    expert_end: torch.Tensor
    block_m: int

    @property
    def pair_mode(self) -> bool:
        """block_m 1: one slot per pair in pair order (the kernels then read no slot tensors)."""
        return self.block_m == 1

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks the sort can need: each expert adds at most one partly filled block."""
    return cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def sort_segment(num_pairs: int, sub: int) -> int:
    """Pairs per program of the segmented sort: a power-of-two multiple of the one-hot chunk
    `sub`, small enough for about SORT_SEGMENTS programs (each walks its segment serially)."""
    return min(max(sub, next_pow2(cdiv(num_pairs, SORT_SEGMENTS))), 2048)


def _e_pad(num_experts: int) -> int:
    return max(16, next_pow2(num_experts))


def permute(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> Permutation:
    """Sort pairs by expert on the device (no host sync). expert_ids [M] int32, -1 = padding."""
    from epmoe.kernels.permute import (
        moe_align_kernel,
        moe_histogram_kernel,
        moe_permute_small_kernel,
        moe_scatter_kernel,
    )

    M, dev = expert_ids.shape[0], expert_ids.device
    nb = max_blocks(M, num_experts, block_m)
    e_pad = _e_pad(num_experts)
    sub = max(16, min(256, 8192 // e_pad))  # one-hot chunk [sub, e_pad] stays near 8K elements
    sorted_pair = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    expert_end = torch.empty(num_experts, dtype=torch.int32, device=dev)
    NB = 64
    if M <= SMALL_SORT_MAX_PAIRS:
        launcher(moe_permute_small_kernel)[(1,)](expert_ids, M, num_experts, sorted_pair, block_expert, expert_end,
                                                 nb, BLOCK_M=block_m, SUB=sub, E_PAD=e_pad, NB=NB, num_warps=4)
    else:
        seg = sort_segment(M, sub)
        segs = cdiv(M, seg)
        hist = torch.empty(segs, e_pad, dtype=torch.int32, device=dev)
        seg_base = torch.empty(segs, e_pad, dtype=torch.int32, device=dev)
        bounds = torch.empty(2, e_pad, dtype=torch.int32, device=dev)
        launcher(moe_histogram_kernel)[(segs,)](expert_ids, M, num_experts, hist, SEG=seg, SUB=sub, E_PAD=e_pad,
                                                num_warps=4)
        launcher(moe_align_kernel)[(1,)](hist, segs, num_experts, seg_base, bounds, expert_end,
                                         BLOCK_M=block_m, E_PAD=e_pad, SC=max(1, 16384 // e_pad), num_warps=8)
        launcher(moe_scatter_kernel)[(segs,)](expert_ids, M, num_experts, seg_base, bounds, sorted_pair,
                                              block_expert, nb, SEG=seg, SUB=sub, E_PAD=e_pad, BLOCK_M=block_m,
                                              NB=16, num_warps=4)
    return Permutation(sorted_pair, block_expert, expert_end, block_m)


def permute_torch(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> Permutation:
    """Plain-torch twin of `permute` (same buffers; unset slots hold -1)."""
    M, dev = expert_ids.shape[0], expert_ids.device
    nb = max_blocks(M, num_experts, block_m)
    ids = expert_ids.long()
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, -1))
    counts = torch.bincount(ids[ids >= 0], minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    sorted_pair = torch.full((nb * block_m,), -1, dtype=torch.int32, device=dev)
    block_expert = torch.full((nb,), -1, dtype=torch.int32, device=dev)
    for e in range(num_experts):
        pairs = (ids == e).nonzero().flatten()  # stable: ascending pair order
        s = int(starts[e])
        sorted_pair[s:s + pairs.numel()] = pairs.to(torch.int32)
        block_expert[s // block_m:(s + int(padded[e])) // block_m] = e
    return Permutation(sorted_pair, block_expert, (starts + counts).to(torch.int32), block_m)
