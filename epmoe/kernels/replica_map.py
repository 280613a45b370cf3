"""Logical expert ids -> physical slots, one program per BLOCK (token, k) picks (wrapper and
plain-torch twin: epmoe/ops/replica_map.py; the choice of copy: epmoe/eplb.py).

    for each pick i = t * K + k (t < T, k < K):
        e = ids[t, k]
        if 0 <= e < E:  out[t, k] = slots[first[e] + (t * token_stride + offset) % copies[e]]
        else:           out[t, k] = -1                       (padding and out-of-range ids)

ids are read through their strides in their own dtype (int32 or int64, compared with E before
any narrowing); the turn t * token_stride + offset is int64, as in the twin. No atomics and no
value-dependent sizes: one launch over cdiv(T * K, BLOCK) programs, graph-safe.
"""

import triton
import triton.language as tl


@triton.jit
def replica_map_kernel(ids_ptr, slots_ptr, first_ptr, copies_ptr, out_ptr, n_picks, K, E,
                       stride_t, stride_k, token_stride, offset, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] picks, row-major
    live = i < n_picks
    t = i // K
    k = i - t * K
    e = tl.load(ids_ptr + t * stride_t + k * stride_k, mask=live, other=-1)
    valid = live & (e >= 0) & (e < E)
    e_safe = tl.where(valid, e, 0).to(tl.int32)
    first = tl.load(first_ptr + e_safe, mask=valid, other=0)
    copies = tl.load(copies_ptr + e_safe, mask=valid, other=1)
    turn = t * token_stride + offset  # int64 [BLOCK]
    copy = turn % copies.to(tl.int64)
    slot = tl.load(slots_ptr + (first.to(tl.int64) + copy), mask=valid, other=-1)
    tl.store(out_ptr + i, tl.where(valid, slot, -1), mask=live)
