"""Routing in one launch: scores, (grouped) top-k, renormalisation and scaling (notes: docs/kernels.md).

Each program routes BLOCK_T tokens over a [BLOCK_T, C] tile of logits, C = G_PAD * PG_PAD
columns: column c holds expert (c // PG_PAD) * PER_GROUP + c % PG_PAD, so group g owns the
columns [g * PG_PAD, (g + 1) * PG_PAD) (ungrouped modes: one group of all E experts). Column
order is expert order, so "lowest column" and "lowest expert id" break ties alike.

    for each token t < num_valid (rows past it: ids -1, weights 0):
        softmax:            key = val = softmax(logits[t])
        softmax_after_topk: key = val = logits[t]
        sigmoid_bias:       val = sigmoid(logits[t]);  key = val + bias
        sigmoid_grouped:    as sigmoid_bias, then key = -inf outside the TOPK_GROUP groups with
                            the largest (top-1 + top-2 key in the group)
        for i < K:  pick = lowest column among the largest remaining key
                    ids[t, i] = expert(pick);  w[t, i] = val[pick]
        softmax_after_topk: w = softmax(w);  else if NORM: w = w / max(sum(w), 1e-20)
        w *= scaling

Reproduces `epmoe.routing.route_torch` (stable descending sort): ids exactly where the scores
agree, weights to fp32 rounding. PRECISE_EXP: libdevice expf; divisions `div_rn` (`tl.exp` and
fp32 `/` are ~1e-6 relative off torch). NaN keys (graph capture skips route()'s check) still give
distinct in-range ids. libdevice flushes to zero: a probability below 2^-126 is 0 on the GPU
(torch keeps a denormal), so such experts rank by id.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

SOFTMAX = tl.constexpr(0)
SOFTMAX_AFTER_TOPK = tl.constexpr(1)
SIGMOID_BIAS = tl.constexpr(2)
SIGMOID_GROUPED = tl.constexpr(3)


@triton.jit
def _exp(x, PRECISE_EXP: tl.constexpr):
    if PRECISE_EXP:
        return libdevice.exp(x)
    else:  # the interpreter has no libdevice: numpy's float32 exp, within about an ulp of torch's
        return tl.exp(x)


@triton.jit
def _keep_groups(key, col_ok, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, PG_PAD: tl.constexpr,
                 N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """key [BLOCK_T, C] with -inf outside the TOPK_GROUP best groups (score: top-1 + top-2)."""
    C: tl.constexpr = G_PAD * PG_PAD
    key3 = tl.reshape(tl.where(col_ok[None, :], key, float("-inf")), [BLOCK_T, G_PAD, PG_PAD])
    j3 = tl.arange(0, PG_PAD)[None, None, :]
    top1 = tl.max(key3, axis=2)  # [BLOCK_T, G_PAD]
    first = tl.min(tl.where(key3 == top1[:, :, None], j3, PG_PAD), axis=2)
    top2 = tl.max(tl.where(j3 == first[:, :, None], float("-inf"), key3), axis=2)
    score = top1 + top2  # [BLOCK_T, G_PAD]; padding groups -inf

    g = tl.arange(0, G_PAD)[None, :]
    free = tl.broadcast_to(g < N_GROUP, [BLOCK_T, G_PAD])
    col_group = (tl.arange(0, C) // PG_PAD)[None, :]
    kept = tl.zeros([BLOCK_T, C], dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        masked = tl.where(free, score, float("-inf"))
        best = tl.max(masked, axis=1)
        tie = free & ((masked == best[:, None]) | (best != best)[:, None])
        pick = tl.min(tl.where(tie, g, G_PAD), axis=1)  # [BLOCK_T] lowest group id
        free = free & (g != pick[:, None])
        kept = kept | (col_group == pick[:, None])
    return tl.where(kept, key, float("-inf"))


@triton.jit
def moe_route_kernel(
    logits_ptr,  # [T, E] fp32 / bf16 / fp16 / fp64, strides (stride_t, stride_e)
    bias_ptr,  # [E] float correction bias (sigmoid modes), else None
    num_valid_ptr,  # int32 scalar: tokens to route (HAS_NUM_VALID), else None
    ids_ptr,  # [T, K] int32 out, -1 = padding row
    weights_ptr,  # [T, K] fp32 out
    T, stride_t, stride_e,
    scaling,  # routed_scaling_factor
    MODE: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, N_GROUP: tl.constexpr, PER_GROUP: tl.constexpr,
    G_PAD: tl.constexpr, PG_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr,
    HAS_NUM_VALID: tl.constexpr, PRECISE_EXP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),): route tokens [pid * BLOCK_T, (pid + 1) * BLOCK_T)."""
    C: tl.constexpr = G_PAD * PG_PAD
    NEG: tl.constexpr = float("-inf")
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, C)  # [C]
    col_ok = (cols // PG_PAD < N_GROUP) & (cols % PG_PAD < PER_GROUP)
    expert = (cols // PG_PAD) * PER_GROUP + cols % PG_PAD  # [C] expert id of each column
    n = T
    if HAS_NUM_VALID:
        n = tl.minimum(tl.load(num_valid_ptr), T)
    row_ok = rows < n

    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_t + expert[None, :] * stride_e
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, NEG)  # [BLOCK_T, C]

    if MODE == SOFTMAX:
        e = _exp(x - tl.max(x, axis=1)[:, None], PRECISE_EXP)
        key = tl.div_rn(e, tl.broadcast_to(tl.sum(e, axis=1)[:, None], [BLOCK_T, C]))  # probs
        val = key
    elif MODE == SOFTMAX_AFTER_TOPK:
        key = x
        val = x
    else:
        bias = tl.load(bias_ptr + expert, mask=col_ok, other=0.0).to(tl.float32)  # [C]
        val = tl.div_rn(tl.full([BLOCK_T, C], 1.0, tl.float32), 1.0 + _exp(-x, PRECISE_EXP))  # sigmoid
        key = val + bias[None, :]
        if MODE == SIGMOID_GROUPED:
            key = _keep_groups(key, col_ok, BLOCK_T, G_PAD, PG_PAD, N_GROUP, TOPK_GROUP)

    # top-k: K rounds of argmax, ties (and NaN rows) to the lowest free column
    kk = tl.arange(0, K_PAD)[None, :]  # [1, K_PAD]
    free = tl.broadcast_to(col_ok[None, :], [BLOCK_T, C])
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for i in tl.static_range(K):
        masked = tl.where(free, key, NEG)
        best = tl.max(masked, axis=1)  # [BLOCK_T]
        tie = free & ((masked == best[:, None]) | (best != best)[:, None])
        pick = tl.min(tl.where(tie, cols[None, :], C), axis=1)  # [BLOCK_T]
        hit = cols[None, :] == pick[:, None]  # [BLOCK_T, C]
        if MODE == SOFTMAX or MODE == SOFTMAX_AFTER_TOPK:
            picked = best
        else:
            picked = tl.sum(tl.where(hit, val, 0.0), axis=1)
        ids = tl.where(kk == i, ((pick // PG_PAD) * PER_GROUP + pick % PG_PAD)[:, None], ids)
        w = tl.where(kk == i, picked[:, None], w)
        free = free & ~hit

    if MODE == SOFTMAX_AFTER_TOPK:
        top = tl.where(kk < K, w, NEG)
        e = _exp(top - tl.max(top, axis=1)[:, None], PRECISE_EXP)
        w = tl.div_rn(e, tl.broadcast_to(tl.sum(e, axis=1)[:, None], [BLOCK_T, K_PAD]))
    elif NORM:
        total = tl.maximum(tl.sum(w, axis=1), 1e-20)[:, None]
        w = tl.div_rn(w, tl.broadcast_to(total, [BLOCK_T, K_PAD]))
    w = w * scaling

    ids = tl.where(row_ok[:, None], ids, -1)
    w = tl.where(row_ok[:, None], w, 0.0)
    out = rows.to(tl.int64)[:, None] * K + kk
    store_ok = (rows < T)[:, None] & (kk < K)
    tl.store(ids_ptr + out, ids, mask=store_ok)
    tl.store(weights_ptr + out, w, mask=store_ok)
