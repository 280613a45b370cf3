"""Kernels of the local path (comm "none"): dispatch metadata and the weighted k-sum of combine.

local_pairs_kernel, one program per BLOCK pairs p = t * K + k (dispatch, one launch):
    g              = ids[p]                                   global expert, -1 = masked pair
    expert_ids[p]  = local[g]  if 0 <= g < E and rank_of[g] == rank, else -1
    row_ids[p]     = p // K
    counts[e]      = #{p : expert_ids[p] == e}                one program: stored; several:
                                                              atomically added to zeroed counts

weighted_sum_kernel, program (t, column tile) (combine, one launch):
    acc = 0                                                   fp32
    for k in 0 .. K-1 (k order):
        p = rows[t, k] (GATHER) or t * K + k                  the expert-output row of pair (t, k)
        if pair (t, k) is valid: acc += w[p] * out[p, cols]   invalid: neither out nor w is read,
                                                              and `where` keeps any value out
    acc += addend[t, cols]                                    (HAS_ADDEND: shared experts)
    y[t, cols] = cast(acc)                                    once, to y's dtype

Validity of (t, k) comes from one [T, K] array `sel`: GATHER: sel holds rows (-1 = none);
otherwise sel is a bool mask (SEL_BOOL, passed as uint8) or int32 expert ids (valid in [0, id_limit)).
"""

import triton
import triton.language as tl


@triton.jit
def local_pairs_kernel(
    ids_ptr, expert_rank_ptr, expert_local_ptr,  # ids [M] int32 (routing ids [T, K] flattened); placement [E]
    expert_ids_ptr, row_ids_ptr, counts_ptr,  # out: [M] int32, [M] int32, [E_LOCAL] int32
    M, E, rank,
    K: tl.constexpr, E_LOCAL: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, ATOMIC: tl.constexpr,
):
    """This rank's local expert of every pair (-1: masked, out of range or another rank's), the
    token row of every pair, and pairs per local expert. NB = next power of two >= E_LOCAL."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < M
    g = tl.load(ids_ptr + p, mask=m, other=-1)
    ok = (g >= 0) & (g < E)
    owner = tl.load(expert_rank_ptr + g, mask=ok, other=-1)
    loc = tl.load(expert_local_ptr + g, mask=ok, other=0)
    local = tl.where(ok & (owner == rank), loc, -1)
    tl.store(expert_ids_ptr + p, local, mask=m)
    tl.store(row_ids_ptr + p, p // K, mask=m)
    hist = tl.histogram(local, NB, mask=(local >= 0) & (local < NB))  # [NB]
    bins = tl.arange(0, NB)
    if ATOMIC:
        tl.atomic_add(counts_ptr + bins, hist, mask=bins < E_LOCAL, sem="relaxed")
    else:
        tl.store(counts_ptr + bins, hist, mask=bins < E_LOCAL)


@triton.jit
def weighted_sum_kernel(
    out_ptr, stride_out,  # expert outputs [M, H] (fp32 / bf16 / fp16), unit stride along H
    w_ptr,  # fp32 router weight of each output row p (dense: [T, K] flattened; gather: [M])
    sel_ptr,  # [T, K]: rows (GATHER, int32), or bool (SEL_BOOL, as uint8), or int32 ids
    add_ptr, stride_add,  # addend [T, H] fp32 (HAS_ADDEND)
    y_ptr, stride_y,  # y [T, H] (fp32 / bf16 / fp16)
    H, id_limit,  # int32 ids at or past id_limit are invalid too (not GATHER, not SEL_BOOL)
    K: tl.constexpr, GATHER: tl.constexpr, SEL_BOOL: tl.constexpr, HAS_ADDEND: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cm = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        s = tl.load(sel_ptr + t * K + k)
        if GATHER:
            p = s.to(tl.int64)
            ok = s >= 0
        else:
            p = t * K + k
            if SEL_BOOL:
                ok = s != 0
            else:
                ok = (s >= 0) & (s < id_limit)
        w = tl.load(w_ptr + p, mask=ok, other=0.0)
        # tl.where(ok, cm, False), not cm & ok: Triton 3.9's interpreter refuses the splatted int1 as a mask
        o = tl.load(out_ptr + p * stride_out + cols, mask=tl.where(ok, cm, False), other=0.0).to(tl.float32)
        acc += tl.where(ok, w * o, 0.0)
    if HAS_ADDEND:
        acc += tl.load(add_ptr + t * stride_add + cols, mask=cm, other=0.0)
    tl.store(y_ptr + t * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=cm)
