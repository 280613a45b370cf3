"""Launch wrappers of the one-sided all-to-all kernels (epmoe/kernels/symm_a2a.py) beside the
plain-torch twins of the same protocol steps (the protocol: epmoe/comm/symmetric.py).

    step             Triton launch        plain-torch twin
    dispatch send    dispatch_send        dispatch_send_torch  (rows, meta, count, then flags)
    dispatch recv    dispatch_recv        dispatch_recv_torch  (wait, list the pairs)
    combine send     combine_send         combine_send_torch   (partial sums, then flags)
    combine recv     combine_recv         combine_recv_torch   (wait, add in rank order)

The launches take a `KernelWorkspace` (fixed when the workspace is built), the twins every rank's
`RankViews` (epmoe/comm/symm_workspace.py). Grids: the per-token kernels launch min(T, 4 programs
per SM) programs and dispatch_recv one per (source, chunk of tokens); with the backend's
`sm_budget` every launch takes at most sm_budget programs (a program runs on one SM, so a launch
occupies at most that many SMs and the rest stay free for work on other streams). The kernels
loop over their work in strides of the grid, so any grid gives the same bits. The twins raise
`SymmTimeoutError` from the host; the kernels record a timeout in the state words, which the
backend's `check()` reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from epmoe.group import Placement
from epmoe.ops.combine import expert_owners, weighted_sum
from epmoe.util import cdiv, next_pow2

if TYPE_CHECKING:
    from epmoe.comm.symm_workspace import RankViews


class SymmTimeoutError(RuntimeError):
    """A wait for peers' flags ran past timeout_s; the message names the silent ranks."""


def slot_meta(ids: torch.Tensor, weights: torch.Tensor, placement: Placement, world: int, kl: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per destination rank r: (meta ids [W, T, Kl] int32 local ids in k order, -1 padded; meta
    weights [W, T, Kl] fp32, 0 where padded; has [W, T] bool: t picks an expert on r)."""
    T, K = ids.shape
    ranks, local = expert_owners(ids, placement)  # [T, K] each, -1 for masked pairs
    r = torch.arange(world, device=ids.device).view(world, 1, 1)
    sel = ranks.unsqueeze(0) == r  # [W, T, K]
    order = torch.sort((~sel).to(torch.int8), dim=2, stable=True).indices[..., :kl]  # selected first
    valid = sel.gather(2, order)  # [W, T, Kl]
    meta_ids = torch.where(valid, local.unsqueeze(0).expand(world, T, K).gather(2, order), -1)
    meta_w = torch.where(valid, weights.unsqueeze(0).expand(world, T, K).gather(2, order), 0.0)
    return meta_ids.to(torch.int32), meta_w.float(), sel.any(dim=2)


def wait_flags(flags: torch.Tensor, seq: int, timeout_s: float, what: str) -> None:
    """Poll `flags` [W] until every entry equals seq; SymmTimeoutError naming the others."""
    deadline, spins = time.monotonic() + timeout_s, 0
    while True:
        missing = [s for s, v in enumerate(flags.tolist()) if v != seq]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SymmTimeoutError(f"{what} (sequence number {seq}) timed out after {timeout_s}s: ranks {missing} never"
                                   " signalled (they crashed, are slower than timeout_s, or did not make this call)")
        spins += 1
        time.sleep(0 if spins < 64 else 50e-6)


def dispatch_send_torch(peers: list[RankViews], rank: int, rows: tuple[torch.Tensor, ...],
                        meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seq: int, max_tokens: int) -> None:
    """Write this rank's rows, meta and count into every peer's slots, then raise its flags."""
    (data, scales, gscale), (meta_ids, meta_w, has) = rows, meta
    T, base = data.shape[0], rank * max_tokens
    for r, peer in enumerate(peers):
        peer.meta_ids[rank, :T] = meta_ids[r]
        peer.meta_w[rank, :T] = meta_w[r]
        t = has[r].nonzero().flatten()
        for dst, src in ((peer.data, data), (peer.scales, scales), (peer.gscale, gscale)):
            if t.numel() and src.shape[1]:
                dst[base + t] = src[t]
        peer.flags[2, rank] = T
    for peer in peers:  # flags last: a peer that sees one sees everything above
        peer.flags[0, rank] = seq


def dispatch_recv_torch(own: RankViews, seq: int, timeout_s: float, rank: int, bound: int | None = None
                        ) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Wait for every source's flag; return the pair expert ids [W * B * Kl] (-1 = padding; B = `bound`
    or Tm; pair (s, t, j) at (s * B + t) * Kl + j) and (source, count) of the first source that
    sent more than B tokens (its tokens past B are not listed), else None."""
    wait_flags(own.flags[0], seq, timeout_s, f"symm_a2a rank {rank}: dispatch")
    W, Tm, Kl = own.meta_ids.shape
    B, counts = Tm if bound is None else bound, own.flags[2].clone()  # counts [W]
    over = [(s, c) for s, c in enumerate(counts.tolist()) if c > B]
    live = torch.arange(B, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)  # [W, B]
    return torch.where(live.unsqueeze(-1), own.meta_ids[:, :B], -1).reshape(-1), (over[0] if over else None)


def combine_send_torch(own: RankViews, peers: list[RankViews], rank: int, expert_out: torch.Tensor,
                       seq: int, push: bool = True) -> None:
    """Weighted fp32 partial sums of the slots that picked an expert here into home s's
    comb_out[rank] (push) or own comb_out[s] (pull), then flags. expert_out: [W * B * Kl, H]."""
    W, Tm, Kl = own.meta_ids.shape
    B, counts = expert_out.shape[0] // (W * Kl), own.flags[2].tolist()
    out = expert_out.view(W, B, Kl, own.comb_out.shape[-1])
    for s in range(W):
        n = min(counts[s], B)
        if n:
            ids = own.meta_ids[s, :n]  # [n, Kl]
            acc = weighted_sum(out[s, :n].reshape(n * Kl, -1), own.meta_w[s, :n], ids >= 0, n, Kl, impl="torch")
            live = (ids >= 0).any(dim=1).nonzero().flatten()  # tokens its home reads back from here
            dst = peers[s].comb_out[rank] if push else own.comb_out[s]
            dst[live] = acc[live].to(dst.dtype)
    for peer in peers:
        peer.flags[1, rank] = seq


def combine_recv_torch(own: RankViews, peers: list[RankViews], rank: int, ids: torch.Tensor,
                       placement: Placement, seq: int, timeout_s: float, push: bool = True) -> torch.Tensor:
    """Wait for every expert rank's flag; y [T, H] fp32 = partial sums added in rank order."""
    wait_flags(own.flags[1], seq, timeout_s, f"symm_a2a rank {rank}: combine")
    T, H = ids.shape[0], own.comb_out.shape[-1]
    ranks = expert_owners(ids, placement)[0]  # [T, K]
    acc = torch.zeros(T, H, dtype=torch.float32, device=ids.device)
    for r, peer in enumerate(peers):
        picked = (ranks == r).any(dim=1, keepdim=True)  # [T, 1]
        part = own.comb_out[r, :T] if push else peer.comb_out[rank, :T]
        acc += torch.where(picked, part.float(), 0.0)
    return acc


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1, the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class KernelWorkspace:
    """What every kernel launch of one rank reads, fixed when the workspace is built."""

    ptrs: torch.Tensor  # [W] int64 device addresses of every rank's workspace (own included)
    state: torch.Tensor  # [8 + 2W] int32 state words (kernels/symm_a2a.py)
    offsets: dict[str, int] = field(repr=False)  # region -> byte offset (`Layout.offsets`)
    rank: int
    world: int  # W
    num_experts: int  # E
    max_tokens: int  # Tm, token slots per source
    slot_experts: int  # Kl, local experts a token can pick on one rank
    hidden: int  # H
    row_bytes: tuple[int, int, int]  # (D, S, G) payload bytes per row: data, scales, global scale
    combine_dtype: torch.dtype  # partial sums (fp32 or bf16)
    push: bool  # combine_mode "push" (expert ranks write into the home) or "pull"
    max_programs: int  # grid cap of the per-token kernels: 4 per SM, or sm_budget
    timeout: int  # bound of every wait: ns of %globaltimer, or spins under the interpreter
    use_timer: bool  # the waits read %globaltimer (CUDA, not interpreted)
    dummy: torch.Tensor = field(repr=False)  # [4] fp32, stands in for absent planes
    sm_budget: int | None = None  # SMs the launches may occupy (None: 4 programs per SM, one per recv item)


def _row_warps(hidden: int) -> int:
    """Warps of the combine kernels, which hold a fp32 row in registers: ~32 values a thread (H 7168: 8)."""
    return max(1, min(16, next_pow2(hidden) // 1024))


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def dispatch_send(ws: KernelWorkspace, ids: torch.Tensor, weights: torch.Tensor, expert_rank: torch.Tensor,
                  expert_local: torch.Tensor, planes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Any:
    """Launch the send kernel: T tokens (ids, weights [T, K]; byte planes of `encode_bytes`; placement
    [E] int32) into every peer's slots, then the flags. Returns the kernel (`.asm` holds the PTX)."""
    from epmoe.kernels.symm_a2a import symm_dispatch_send_kernel

    o, (d_bytes, s_bytes, g_bytes), (data, scales, gscale) = ws.offsets, ws.row_bytes, planes
    (T, K), Kl = ids.shape, ws.slot_experts
    if d_bytes % 4 == 0:  # move 4-byte words, not bytes
        data = data.view(torch.int32)
    D = data.shape[1]
    scales = scales if s_bytes else ws.dummy.view(torch.uint8)
    gscale = gscale if g_bytes else ws.dummy
    return symm_dispatch_send_kernel[(max(1, min(T, ws.max_programs)),)](
        ws.ptrs, ws.state, ids.contiguous(), weights.contiguous(), expert_rank, expert_local,
        data, scales, gscale, T, ws.rank, ws.num_experts,
        o["flags"], o["meta_ids"], o["meta_w"], o["data"], o["scales"], o["gscale"],
        Tm=ws.max_tokens, D=D, D_BYTES=d_bytes, S=s_bytes, G=g_bytes // 4,
        W=ws.world, K=K, K_PAD=next_pow2(K), KL=Kl, KL_PAD=next_pow2(Kl),
        BLOCK_D=min(next_pow2(D), 2048), BLOCK_S=min(next_pow2(max(s_bytes, 1)), 1024))


def dispatch_recv(ws: KernelWorkspace, expert_ids: torch.Tensor, bound: int) -> torch.Tensor:
    """Launch the receive kernel: wait for every source's flag, pair expert ids [W * bound * Kl]
    (-1 = padding) into `expert_ids`; returns it."""
    from epmoe.kernels.symm_a2a import symm_dispatch_recv_kernel

    o, Tm, Kl = ws.offsets, ws.max_tokens, ws.slot_experts
    block_t = min(next_pow2(bound), max(1, 2048 // next_pow2(Kl)))
    chunks = max(1, cdiv(bound, block_t))  # >= 1: every source's flag is awaited
    programs = ws.world * chunks if ws.sm_budget is None else min(ws.world * chunks, ws.sm_budget)
    symm_dispatch_recv_kernel[(programs,)](
        ws.ptrs, ws.state, expert_ids, ws.rank, ws.timeout, bound, chunks, o["flags"], o["meta_ids"],
        Tm=Tm, W=ws.world, KL=Kl, KL_PAD=next_pow2(Kl), BLOCK_T=block_t, USE_TIMER=ws.use_timer)
    return expert_ids


def combine_send(ws: KernelWorkspace, expert_out: torch.Tensor, bound: int | None = None) -> Any:
    """Launch the combine-send kernel: weighted partial sums of `expert_out` [W * bound * Kl, H] (bound
    None = Tm), then flags. Returns the kernel (`.asm` holds the PTX)."""
    from epmoe.kernels.symm_a2a import symm_combine_send_kernel

    o, H, bound = ws.offsets, ws.hidden, ws.max_tokens if bound is None else bound
    return symm_combine_send_kernel[(max(1, min(bound, ws.max_programs)),)](
        ws.ptrs, ws.state, expert_out.contiguous(), ws.rank, bound,
        o["flags"], o["meta_ids"], o["meta_w"], o["comb_out"],
        Tm=ws.max_tokens, H=H, W=ws.world, KL=ws.slot_experts, H_PAD=next_pow2(H),
        COMB_DTYPE=_tl_dtype(ws.combine_dtype), PUSH=ws.push, num_warps=_row_warps(H))


def combine_recv(ws: KernelWorkspace, ids: torch.Tensor, expert_rank: torch.Tensor, y: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Launch the combine-receive kernel: wait for every expert rank's flag, y [T, H] = the partial
    sums of this rank's tokens (ids [T, K]) in rank order, cast as stored (y None: new, of `dtype`)."""
    from epmoe.kernels.symm_a2a import symm_combine_recv_kernel

    o, H, (T, K) = ws.offsets, ws.hidden, ids.shape
    if y is None:
        y = torch.empty(T, H, dtype=dtype, device=ids.device)
    if y.stride(-1) != 1:
        raise ValueError("combine out must have unit stride along H")
    symm_combine_recv_kernel[(max(1, min(T, ws.max_programs)),)](
        ws.ptrs, ws.state, ids.contiguous(), expert_rank, y, y.stride(0) if T else H,
        T, ws.rank, ws.num_experts, ws.timeout, o["flags"], o["comb_out"],
        Tm=ws.max_tokens, H=H, W=ws.world, K=K, K_PAD=next_pow2(K), H_PAD=next_pow2(H),
        COMB_DTYPE=_tl_dtype(ws.combine_dtype), USE_TIMER=ws.use_timer, PUSH=ws.push, num_warps=_row_warps(H))
    return y
