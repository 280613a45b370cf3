"""Counting sort of (row, expert) pairs by local expert, on the device, with no host sync (notes: docs/kernels.md).

Expert e owns slots [start[e], start[e] + padded[e]), padded[e] = ceil(count[e] / BLOCK_M) * BLOCK_M,
so a GEMM tile of BLOCK_M slots never straddles two experts.

    count[e]        = #{p : expert_ids[p] == e}                       (histogram; -1 skipped)
    start[e]        = sum_{e' < e} padded[e']                         (offsets)
    sorted_pair[s]  = p  for the pairs of e, stable, s in [start[e], start[e] + count[e])   (scatter)
    expert_end[e]   = start[e] + count[e]     slots at or past it are padding (never read)
    block_expert[b] = e owning slots [b*BLOCK_M, (b+1)*BLOCK_M), or -1 past the last expert

Sizes are static given M (at most cdiv(M, BLOCK_M) + min(E, M) blocks), so the sort fits a CUDA
graph. Stable, no atomics (ranks are cumulative sums of a one-hot [SUB, E_PAD] matrix): repeated runs
write identical buffers. Expert ids outside [0, E) are padding. Entry points: moe_permute_small_kernel
(one program, one launch: decode); moe_histogram_kernel -> moe_align_kernel -> moe_scatter_kernel
(segments in parallel, for many pairs).
"""

import triton
import triton.language as tl


@triton.jit
def _onehot(expert_ids_ptr, offs, lo_mask, E, E_PAD: tl.constexpr):
    """[SUB, E_PAD] int32 one-hot of the experts of pairs `offs` (zero rows for padding)."""
    ids = tl.load(expert_ids_ptr + offs, mask=lo_mask, other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, -1)
    return (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32), ids


@triton.jit
def _histogram(expert_ids_ptr, lo, hi, E, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """[E_PAD] int32 pairs per expert among pairs [lo, hi)."""
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(lo, hi, SUB):
        offs = start + tl.arange(0, SUB)
        onehot, _ = _onehot(expert_ids_ptr, offs, offs < hi, E, E_PAD)
        counts += tl.sum(onehot, axis=0)
    return counts


@triton.jit
def _scatter(expert_ids_ptr, lo, hi, base, sorted_pair_ptr, E, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """Write pairs [lo, hi) to their slots; `base` [E_PAD] is the first free slot per expert."""
    running = base
    for start in range(lo, hi, SUB):
        offs = start + tl.arange(0, SUB)
        onehot, ids = _onehot(expert_ids_ptr, offs, offs < hi, E, E_PAD)
        rank = tl.cumsum(onehot, axis=0)  # [SUB, E_PAD] inclusive rank inside the chunk
        slot = tl.sum(onehot * (running[None, :] + rank - 1), axis=1)  # [SUB]
        tl.store(sorted_pair_ptr + slot, offs, mask=ids >= 0)
        running += tl.sum(onehot, axis=0)


@triton.jit
def _padded_ends(counts, BLOCK_M: tl.constexpr):
    """[E_PAD] slots of each expert (its count rounded up to BLOCK_M), and where they end."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return padded, tl.cumsum(padded, axis=0)


@triton.jit
def _block_experts(ends, E, block_expert_ptr, b_lo, b_hi, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, NB: tl.constexpr):
    """block_expert[b], b in [b_lo, b_hi): the expert whose slots (padded ends `ends`) hold b * BLOCK_M, or -1."""
    experts = tl.arange(0, E_PAD)
    total = tl.max(ends, axis=0)
    for b0 in range(b_lo, b_hi, NB):
        blocks = b0 + tl.arange(0, NB)
        slot = blocks * BLOCK_M
        # the expert holding `slot` is the number of experts that end at or before it
        owner = tl.sum(((ends[None, :] <= slot[:, None]) & (experts[None, :] < E)).to(tl.int32), axis=1)
        owner = tl.where(slot < total, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < b_hi)


@triton.jit
def _align(counts, E, block_expert_ptr, expert_end_ptr, max_blocks,
           BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, NB: tl.constexpr):
    """From per-expert counts: write expert_end and block_expert, return start [E_PAD]."""
    experts = tl.arange(0, E_PAD)
    padded, ends = _padded_ends(counts, BLOCK_M)
    starts = ends - padded
    tl.store(expert_end_ptr + experts, starts + counts, mask=experts < E)
    _block_experts(ends, E, block_expert_ptr, 0, max_blocks, BLOCK_M, E_PAD, NB)
    return starts


@triton.jit
def moe_permute_small_kernel(expert_ids_ptr, M, E, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, max_blocks,
                             BLOCK_M: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr, NB: tl.constexpr):
    """Grid (1,): histogram, offsets and scatter of all M pairs in one program."""
    counts = _histogram(expert_ids_ptr, 0, M, E, SUB, E_PAD)
    starts = _align(counts, E, block_expert_ptr, expert_end_ptr, max_blocks, BLOCK_M, E_PAD, NB)
    _scatter(expert_ids_ptr, 0, M, starts, sorted_pair_ptr, E, SUB, E_PAD)


@triton.jit
def moe_histogram_kernel(expert_ids_ptr, M, E, hist_ptr, SEG: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """Grid (segments,): hist[seg, e] = pairs of expert e among pairs [seg*SEG, (seg+1)*SEG)."""
    seg = tl.program_id(0)
    lo = seg * SEG
    hi = tl.minimum(lo + SEG, M)
    counts = _histogram(expert_ids_ptr, lo, hi, E, SUB, E_PAD)
    tl.store(hist_ptr + seg * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit
def moe_align_kernel(hist_ptr, num_segs, E, seg_base_ptr, bounds_ptr, expert_end_ptr,
                     BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, SC: tl.constexpr):
    """Grid (1,): exclusive scan over segments (SC at a time): seg_base[seg, e] = pairs of e before seg;
    then expert_end and bounds = (start [E_PAD], padded end [E_PAD]) of each expert's slots."""
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for s0 in range(0, num_segs, SC):
        segs = s0 + tl.arange(0, SC)
        ptrs = segs[:, None] * E_PAD + experts[None, :]
        seg_ok = (segs < num_segs)[:, None]
        h = tl.load(hist_ptr + ptrs, mask=seg_ok, other=0)
        tl.store(seg_base_ptr + ptrs, counts[None, :] + tl.cumsum(h, axis=0) - h, mask=seg_ok)
        counts += tl.sum(h, axis=0)
    padded, ends = _padded_ends(counts, BLOCK_M)
    tl.store(expert_end_ptr + experts, ends - padded + counts, mask=experts < E)
    tl.store(bounds_ptr + experts, ends - padded)
    tl.store(bounds_ptr + E_PAD + experts, ends)


@triton.jit
def moe_scatter_kernel(expert_ids_ptr, M, E, seg_base_ptr, bounds_ptr, sorted_pair_ptr, block_expert_ptr,
                       max_blocks, SEG: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                       NB: tl.constexpr):
    """Grid (segments,): each segment's pairs to their slots (stable), and block_expert of blocks
    [seg * per, (seg + 1) * per), per = cdiv(max_blocks, segments)."""
    seg = tl.program_id(0)
    lo = seg * SEG
    hi = tl.minimum(lo + SEG, M)
    experts = tl.arange(0, E_PAD)
    base = tl.load(seg_base_ptr + seg * E_PAD + experts) + tl.load(bounds_ptr + experts)
    _scatter(expert_ids_ptr, lo, hi, base, sorted_pair_ptr, E, SUB, E_PAD)
    per = tl.cdiv(max_blocks, tl.num_programs(0))
    b_lo = seg * per
    _block_experts(tl.load(bounds_ptr + E_PAD + experts), E, block_expert_ptr, b_lo,
                   tl.minimum(b_lo + per, max_blocks), BLOCK_M, E_PAD, NB)
