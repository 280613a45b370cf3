"""`allgather`: every rank receives every token, runs its local experts, and a reduce-scatter
returns each token's per-rank partial sums to its home rank.

    dispatch:  counts  = all_gather(T_r)                       (host sync; skipped by static_shapes)
               wire    = [payload | scales | ids | weights] per row
               rows    = every rank's rows, rank-major         (padded all-gather or all-to-all-v)
               pairs   = (row, k) whose expert is local (static_shapes: every (row, k), -1 elsewhere)
    combine:   part[n] = sum_k w[n, k] * out[n, k]  (fp32, k order, local pairs only)
               back    = all_to_all_v(part rows of rank j -> rank j)
               y[t]    = sum_r back[r, t]                      (fp32, rank order), cast once

How the rows are gathered (`gather` option), after the counts are known:
  "padded"  one all-gather of cap = max_r T_r rows per rank (NCCL `all_gather_into_tensor`);
            moves W * cap rows, so the padding costs W * cap - sum_r T_r rows.
  "a2a"     one all-to-all-v in which each rank sends its T rows to every rank: exactly
            sum_r T_r rows, no padding (what grouped broadcasts move, in one collective).
  "auto"    "padded" when the padding is at most 25% of the rows and the transport is not gloo,
            else "a2a". static_shapes always gathers padded (the sizes must not depend on data),
            cap = dispatch's `max_tokens` (the call's bound, alike on every rank) or else
            max_tokens_per_rank.
Measured (gloo on 2 CPU cores, 4 ranks, H = 2048 fp32 rows, median µs; padded / W broadcasts /
a2a): counts 256x4: 33582 / 14171 / 13528; 512,512,512,0: 31695 / 14441 / 18390; 1024,0,0,0:
132257 / 8702 / 29489; 1x4: 6210 / 5485 / 1372; 8,0,0,1: 3892 / 1094 / 1011. So gloo always takes
"a2a"; W broadcasts were no faster than the all-to-all-v, so not kept. NCCL is not measured yet:
the 25% rule stands until `epmoe bench comm` on GPUs says otherwise.

Bytes per rank: dispatch sends (W - 1) * cap rows, combine each peer's T_j partial rows back. Every
token goes to every rank: this wins at large batches and loses at decode sizes to `nccl_a2a`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from epmoe.comm.base import Dispatched
from epmoe.comm.payload import empty_rows, row_layout
from epmoe.comm.registry import register_comm
from epmoe.comm.wire import WireBackend, WireHandle, WireOptions, partial_sums, sum_in_rank_order, unpacked_bytes
from epmoe.group import Pending
from epmoe.routing import Routing

GATHER_MODES = ("auto", "padded", "a2a")


@dataclass
class AllGatherHandle(WireHandle):
    """A `WireHandle` and the gather's shape (host ints)."""

    counts: list[int] | None  # tokens per rank; None under static_shapes (every rank sends cap)
    starts: list[int]  # first gathered row of each rank: r * cap when padded, else prefix sums
    cap: int  # rows per rank of a padded gather, else 0
    tokens: int  # this rank's T


@dataclass(frozen=True)
class AllGatherOptions(WireOptions):
    """`WireOptions` and gather: "auto", "padded" or "a2a" (see the module docstring)."""

    gather: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {GATHER_MODES}, got {self.gather!r}")


@register_comm
class AllGatherComm(WireBackend):
    """All-gather-v dispatch, reduce-scatter-v combine (module docstring; options: `AllGatherOptions`)."""

    name = "allgather"
    Options = AllGatherOptions
    options: AllGatherOptions

    def _padded(self, counts: list[int]) -> bool:
        """Whether to gather padded rows (the same answer on every rank: counts are shared)."""
        if self.options.gather != "auto":
            return self.options.gather == "padded"
        if self.group is not None and self.group.backend == "gloo":
            return False
        return self.world * max(counts) <= 1.25 * sum(counts)

    def dispatch_start(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None
                       ) -> Pending[Dispatched]:
        cap = self._checked(x, routing.ids, max_tokens)  # a failure here is reported to the peers first
        T, H, W = x.shape[0], self.cfg.hidden, self.world
        counts = None
        if not self.static_shapes:
            counts = [row[0] for row in self._exchange(x, routing.ids, [T])]
            cap = max(counts) if self._padded(counts) else 0
        layout = row_layout(self.cfg, self.payload, x.dtype)
        wire = empty_rows(cap or T, layout, x.device, filled=T)  # [cap or T, B] uint8
        if T:
            self._pack(x, routing, layout, out=wire[:T])
        if counts is None or cap:  # static (cap may be 0: every rank's bound is 0) or padded
            starts = [r * cap for r in range(W)]
            gathered = self.group.start_all_gather(wire) if W > 1 else Pending.done(wire)
            sent_rows = (W - 1) * cap
        else:  # exact counts, no padding: each rank sends its T rows to every rank
            starts = [sum(counts[:r]) for r in range(W)]
            gathered = (self.group.start_all_to_all_v(wire.repeat(W, 1), [T] * W, counts) if W > 1 and sum(counts)
                        else Pending.done(wire))
            sent_rows = (W - 1) * T
        combine_rows = (W - 1) * cap if counts is None else sum(counts) - T
        copied = self._copied(T, cap, counts, layout)
        return Pending(lambda: self._unpack(gathered.wait().flatten(0, -2), layout, lambda pairs:
                                            AllGatherHandle(pairs, x.dtype, sent_rows * layout.nbytes,
                                                            combine_rows * H * self.combine_dtype.itemsize,
                                                            counts=counts, starts=starts, cap=cap,
                                                            tokens=T).copied(*copied)))

    def _copied(self, T: int, cap: int, counts: list[int] | None, layout: Any) -> tuple[int, int]:
        """(dispatch, combine) staging-copy bytes of a call (`WireHandle`): dispatch packs T rows
        (and repeats them W times for the all-to-all gather), the gather copies this rank's own
        chunk, unpacking copies all but the payload of every gathered row; combine casts the
        partial sums to the wire dtype, packs a padded gather's rows, copies its own chunk back and
        (a bf16 wire) casts each rank's rows to fp32 for the sum."""
        W, B, HC = self.world, layout.nbytes, self.cfg.hidden * self.combine_dtype.itemsize
        padded = counts is None or cap > 0
        moves = W > 1 and (padded or sum(counts))
        own = (cap if padded else T) if moves else 0  # rows of this rank's chunk to itself, each way
        N = (W * cap if padded else sum(counts)) if W > 1 else (cap or T)  # gathered rows
        dispatch = T * B + (W * T * B if moves and not padded else 0) + own * B + unpacked_bytes(N, layout)
        if W == 1:
            return dispatch, 0
        wide = self.combine_dtype != torch.float32
        combine = (N * HC if wide else 0) + (sum(counts) * HC if counts is not None and cap else 0) + own * HC
        return dispatch, combine + (W * T * self.cfg.hidden * 4 if wide and moves else 0)

    def combine_start(self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                      addend: torch.Tensor | None = None) -> Pending[torch.Tensor]:
        h: AllGatherHandle = dispatched.handle
        W, H, cap, T = self.world, self.cfg.hidden, h.cap, h.tokens
        partial = partial_sums(expert_out, h.pairs, H)  # [N, H] fp32
        if W == 1:
            return Pending(lambda: self._finish(partial[:T], h.dtype, out, addend))
        partial = partial.to(self.combine_dtype)  # the combine wire
        if h.counts is None:  # static: every rank gets all cap rows of its block back
            back = self.group.start_all_to_all_v(partial, [cap] * W, [cap] * W)
        elif sum(h.counts) == 0:  # no rank holds a token: nothing to move
            back = Pending.done(partial.new_zeros(W, 0, H))
        else:
            if cap:  # padded rows: keep each rank's first counts[j] rows
                partial = torch.cat([partial[s : s + n] for s, n in zip(h.starts, h.counts)])  # [sum T, H]
            back = self.group.start_all_to_all_v(partial, h.counts, [T] * W)
        rows = cap if h.counts is None else T  # rows back from each rank (static: T of them are ours)
        return Pending(lambda: self._finish(sum_in_rank_order(back.wait().view(W, rows, H)[:, :T]), h.dtype, out,
                                            addend))  # [T, H]
