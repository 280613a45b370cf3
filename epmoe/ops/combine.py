"""Launch wrappers and plain-torch twins of the local comm kernels (epmoe/kernels/combine.py):
which (token, k) pairs a rank computes, and the weighted k-sum of combine.

    local_dispatch   ids [T, K] -> this rank's pairs: local expert ids, token rows, counts   one launch
    weighted_sum     y[t] = cast(sum over valid k, in k order, of w[t, k] * out[t*K + k] (+ addend[t]))
    gather_sum       the same over pairs in any order (rows [T, K] name each pair's row of out)

Each takes `impl`: "auto" (the Triton kernel on CUDA, the twin elsewhere), "triton" (also on
the CPU under TRITON_INTERPRET=1) or "torch" (the twin, `*_torch`, same arguments). The twins
are what tests compare the kernels with: integer outputs exactly, sums within a stated
tolerance. `expert_owners` is the one expert-owner lookup every comm backend uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from epmoe.group import Placement
from epmoe.ops.launch import launcher
from epmoe.util import cdiv, next_pow2

IMPLS = ("auto", "torch", "triton")
ID_LIMIT = 2**31 - 1  # weighted_sum's bound on valid ids when none is given
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def pick_impl(impl: str, device: torch.device) -> str:
    """"triton" or "torch" for a call on `device`. "auto": Triton on CUDA, the plain-torch twin
    elsewhere; "triton" off CUDA runs only through the Triton interpreter (TRITON_INTERPRET=1)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"impl='triton' needs a CUDA device (or TRITON_INTERPRET=1), got {device}; "
                         "use impl='auto' or 'torch' on the CPU")
    return impl


def expert_owners(ids: torch.Tensor, placement: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, local index) of each global expert id in `ids` (any shape, int32), -1 for masked
    pairs: ids < 0 or >= E (padding rows of a CUDA-graph bucket carry -1; eager calls reject
    ids past E, or report them in the count exchange, so there they index nothing). The one
    expert-owner lookup of every backend; `placement` should already live on ids' device (see
    CommBackend.placement_on)."""
    masked = (ids < 0) | (ids >= placement.num_experts)
    safe = ids.long().masked_fill(masked, 0)
    ranks = placement.expert_rank.to(ids.device)[safe].masked_fill(masked, -1)
    local = placement.expert_local.to(ids.device)[safe].masked_fill(masked, -1)
    return ranks, local


def local_pairs(ids: torch.Tensor, placement: Placement, rank: int) -> torch.Tensor:
    """Map global expert ids (any shape, int32) to this rank's local ids; -1 where another rank
    owns the expert and where the pair is masked (`expert_owners`)."""
    ranks, local = expert_owners(ids, placement)
    return torch.where(ranks == rank, local, -1).to(torch.int32)


def count_experts(expert_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """[num_local] int32 pairs per local expert, ignoring -1 padding (no host sync)."""
    valid = expert_ids >= 0
    counts = torch.zeros(num_local, dtype=torch.int32, device=expert_ids.device)
    counts.index_add_(0, expert_ids.long().clamp_min(0), valid.to(torch.int32))
    return counts



# ---------------------------------------------------------------------------------------
# which pairs a rank computes (kernel: local_pairs_kernel)
# ---------------------------------------------------------------------------------------


# Pairs one dispatch program handles; up to this many pairs (128 tokens at top-8) one program
# does everything, counts included (a single launch). More pairs: one program per block, counts
# added atomically into zeroed counts (a memset, then the kernel).
DISPATCH_BLOCK = 1024


@dataclass
class LocalPairs:
    """This rank's pairs p = t*K + k of a [T, K] routing.

    expert_ids: [T*K] int32 local expert, -1 = masked (id -1 or outside [0, E)) or another rank's.
    row_ids:    [T*K] int32 token row, p // K.
    counts:     [E_local] int32 pairs per local expert.
    """

    expert_ids: torch.Tensor
    row_ids: torch.Tensor
    counts: torch.Tensor


def local_dispatch_torch(ids: torch.Tensor, placement: Placement, rank: int) -> LocalPairs:
    """Plain-torch twin of `local_dispatch`."""
    T, K = ids.shape
    flat = local_pairs(ids, placement, rank).reshape(-1)  # [T*K]
    rows = torch.arange(T, dtype=torch.int32, device=ids.device).repeat_interleave(K)
    return LocalPairs(flat, rows, count_experts(flat, placement.local_experts))


def local_dispatch(ids: torch.Tensor, placement: Placement, rank: int, impl: str = "auto",
                   check: bool = True) -> LocalPairs:
    """ids [T, K] int32 global expert ids (-1 = masked pair) -> this rank's pairs. `placement`
    must live on ids' device. impl: "auto" (Triton on CUDA, the torch twin elsewhere), "triton",
    "torch". check False: the caller vouches for ids (a `Routing`'s, which checked them)."""
    if check and (ids.dim() != 2 or ids.dtype != torch.int32):
        raise ValueError(f"ids must be int32 [T, K], got {ids.dtype} {tuple(ids.shape)}; build a Routing")
    if pick_impl(impl, ids.device) == "torch":
        return local_dispatch_torch(ids, placement, rank)
    from epmoe.kernels.combine import local_pairs_kernel

    T, K = ids.shape
    M, E_local, dev = T * K, placement.local_experts, ids.device
    expert_ids = torch.empty(M, dtype=torch.int32, device=dev)
    row_ids = torch.empty(M, dtype=torch.int32, device=dev)
    single = M <= DISPATCH_BLOCK
    block = max(16, next_pow2(M)) if single else DISPATCH_BLOCK
    alloc = torch.empty if single else torch.zeros
    counts = alloc(E_local, dtype=torch.int32, device=dev)
    launcher(local_pairs_kernel)[(cdiv(M, block) if M else 1,)](
        ids.contiguous(), placement.expert_rank, placement.expert_local, expert_ids, row_ids, counts,
        M, placement.num_experts, rank,
        K=K, E_LOCAL=E_local, NB=max(16, next_pow2(E_local)), BLOCK=block,
        ATOMIC=not single, num_warps=4,
    )
    return LocalPairs(expert_ids, row_ids, counts)


# ---------------------------------------------------------------------------------------
# the weighted k-sum of combine (kernel: weighted_sum_kernel)
# ---------------------------------------------------------------------------------------


def _ksum(contrib: torch.Tensor, valid: torch.Tensor, addend: torch.Tensor | None,
          y: torch.Tensor | None) -> torch.Tensor:
    """contrib [T, K, H] fp32, valid [T, K] bool -> sum over valid k in k order (+ addend), into y."""
    contrib = torch.where(valid.unsqueeze(-1), contrib, torch.zeros((), device=contrib.device))
    acc = contrib.new_zeros(contrib.shape[0], contrib.shape[2]) if contrib.shape[1] == 0 else contrib[:, 0].clone()
    for k in range(1, contrib.shape[1]):
        acc += contrib[:, k]
    if addend is not None:
        acc += addend
    return acc if y is None else y.copy_(acc)


def weighted_sum_torch(
    out: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, num_tokens: int, top_k: int, *,
    addend: torch.Tensor | None = None, y: torch.Tensor | None = None, num_ids: int | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `weighted_sum` (same arguments but impl and check; no checks)."""
    mask = valid if valid.dtype == torch.bool else (valid >= 0) & (valid < (ID_LIMIT if num_ids is None else num_ids))
    contrib = out.float().view(num_tokens, top_k, out.shape[-1]) * weights.unsqueeze(-1)  # [T, K, H]
    return _ksum(contrib, mask, addend, y)


def gather_sum_torch(
    out: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, *,
    addend: torch.Tensor | None = None, y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `gather_sum` (same arguments but impl; no checks)."""
    M, H = out.shape
    valid = rows >= 0  # [T, K]
    safe = torch.where(valid, rows, M).long()  # row M: a zero row, for invalid pairs and M = 0
    src = torch.cat([out.float(), out.new_zeros(1, H, dtype=torch.float32)])  # [M + 1, H]
    w = torch.cat([weights, weights.new_zeros(1)])  # [M + 1]
    return _ksum(src[safe] * w[safe].unsqueeze(-1), valid, addend, y)  # [T, K, H] -> [T, H]


def weighted_sum(
    out: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, num_tokens: int, top_k: int, *,
    addend: torch.Tensor | None = None, y: torch.Tensor | None = None, impl: str = "auto", check: bool = True,
    num_ids: int | None = None,
) -> torch.Tensor:
    """Per-token fp32 sum over k of weights * out, in k order, skipping invalid pairs; plus an
    optional fp32 addend; cast once:

        y[t] = cast(sum over valid k, in k order, of weights[t, k] * out[t * K + k]  + addend[t])

    out [T*K, H] fp32/bf16/fp16 (pair t*K + k, unit stride along H), weights [T, K] fp32,
    valid [T, K] bool (or the pairs' int32 expert ids: -1, and ids >= num_ids when given, are
    invalid), addend [T, H] fp32 (the
    shared experts' output), y [T, H] fp32/bf16/fp16: the result buffer (None: a new fp32
    tensor). Invalid rows are masked with `where`, not multiplied by zero, so garbage (NaN,
    inf) in padding rows never leaks into the sum. impl: "auto" (one Triton launch on CUDA,
    `weighted_sum_torch` elsewhere), "triton" or "torch". check False: the caller built every
    argument to this contract (a comm backend's own combine) and y is given; nothing is checked.
    """
    T, K = num_tokens, top_k
    if not check and y is not None and pick_impl(impl, out.device) == "triton":
        sel = valid.contiguous()
        return _launch_sum(out, weights.contiguous(), sel.view(torch.uint8) if sel.dtype == torch.bool else sel,
                           addend, y, gather=False, num_ids=num_ids)
    H = out.shape[-1] if out.dim() == 2 else 0
    _check_out(out, T * K, "weighted_sum")
    if tuple(weights.shape) != (T, K) or weights.dtype != torch.float32:
        raise ValueError(f"weighted_sum: weights must be fp32 [{T}, {K}], got {weights.dtype} "
                         f"{tuple(weights.shape)}; pass the router weights as .float()")
    if tuple(valid.shape) != (T, K) or valid.dtype not in (torch.bool, torch.int32):
        raise ValueError(f"weighted_sum: valid must be a [{T}, {K}] bool mask (or int32 expert ids, -1 = "
                         f"invalid), got {valid.dtype} {tuple(valid.shape)}")
    y = _check_result(out, addend, y, T, H, "weighted_sum")
    if pick_impl(impl, out.device) == "torch":
        return weighted_sum_torch(out, weights, valid, T, K, addend=addend, y=y, num_ids=num_ids)
    sel = valid.contiguous()
    sel = sel.view(torch.uint8) if sel.dtype == torch.bool else sel
    return _launch_sum(out, weights.contiguous(), sel, addend, y, gather=False, num_ids=num_ids)


def gather_sum(
    out: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, *,
    addend: torch.Tensor | None = None, y: torch.Tensor | None = None, impl: str = "auto",
) -> torch.Tensor:
    """`weighted_sum` over pairs in any order: rows [T, K] int32 names the row of out [M, H]
    of pair (t, k) (-1 = no pair), weights [M] fp32 the router weight of each row of out.

        y[t] = cast(sum over k with rows[t, k] >= 0, in k order, of weights[p] * out[p]  + addend[t]),
               p = rows[t, k]

    addend, y and impl as in `weighted_sum`. Rows of out that no pair names are never read.
    """
    T, K = rows.shape if rows.dim() == 2 else (0, 0)
    if rows.dim() != 2 or rows.dtype != torch.int32:
        raise ValueError(f"gather_sum: rows must be int32 [T, K] (-1 = no pair), got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    M = out.shape[0]
    _check_out(out, M, "gather_sum")
    H = out.shape[1]
    if tuple(weights.shape) != (M,) or weights.dtype != torch.float32:
        raise ValueError(f"gather_sum: weights must be fp32 [{M}] (one per row of out), got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    y = _check_result(out, addend, y, T, H, "gather_sum")
    if pick_impl(impl, out.device) == "torch":
        return gather_sum_torch(out, weights, rows, addend=addend, y=y)
    return _launch_sum(out, weights.contiguous(), rows.contiguous(), addend, y, gather=True)


def _check_out(out: torch.Tensor, rows: int, who: str) -> None:
    if out.dim() != 2 or out.shape[0] != rows or out.dtype not in _FLOATS:
        raise ValueError(f"{who}: out must be the expert outputs [{rows}, H] in fp32, bf16 or fp16 (one row "
                         f"per pair), got {out.dtype} {tuple(out.shape)}")
    if out.shape[1] > 1 and out.stride(1) != 1:
        raise ValueError(f"{who}: out needs unit stride along H; pass out.contiguous()")


def _check_result(out: torch.Tensor, addend: torch.Tensor | None, y: torch.Tensor | None, T: int, H: int,
                  who: str) -> torch.Tensor:
    """Check addend and y; returns y, a new fp32 [T, H] tensor when None."""
    for name, t in (("addend", addend), ("y", y)):
        if t is None:
            continue
        if t.device != out.device:
            raise ValueError(f"{who}: {name} is on {t.device}, out on {out.device}; move it to {out.device}")
        if tuple(t.shape) != (T, H):
            raise ValueError(f"{who}: {name} must be [{T}, {H}], got {tuple(t.shape)}")
        if H > 1 and t.stride(1) != 1:
            raise ValueError(f"{who}: {name} needs unit stride along H; pass {name}.contiguous()")
    if addend is not None and addend.dtype != torch.float32:
        raise ValueError(f"{who}: addend must be fp32 (it is added before the one cast), got {addend.dtype}; "
                         "pass addend.float()")
    if y is None:
        return torch.empty(T, H, dtype=torch.float32, device=out.device)
    if y.dtype not in _FLOATS:
        raise ValueError(f"{who}: y must be fp32, bf16 or fp16, got {y.dtype}")
    return y


def _launch_sum(out: torch.Tensor, weights: torch.Tensor, sel: torch.Tensor, addend: torch.Tensor | None,
                y: torch.Tensor, gather: bool, num_ids: int | None = None) -> torch.Tensor:
    """One launch of weighted_sum_kernel: a program per (token, tile of up to 1024 columns; 4
    warps hold 8 values a thread, 16-byte bf16 loads). Tile and warps are not tuned yet."""
    from epmoe.kernels.combine import weighted_sum_kernel

    T, K = sel.shape
    H = y.shape[1]
    if T == 0 or H == 0:
        return y
    block_h = min(next_pow2(H), 1024)
    add = addend if addend is not None else y
    limit = ID_LIMIT if num_ids is None else num_ids
    launcher(weighted_sum_kernel)[(T, cdiv(H, block_h))](
        out, out.stride(0), weights, sel, add, add.stride(0), y, y.stride(0), H, limit,
        K=K, GATHER=gather, SEL_BOOL=sel.dtype == torch.uint8, HAS_ADDEND=addend is not None, BLOCK_H=block_h,
        num_warps=max(1, min(4, block_h // 256)),
    )
    return y
