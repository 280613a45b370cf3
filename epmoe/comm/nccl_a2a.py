"""`nccl_a2a`: exchange the W x W count matrix, then `all_to_all_single` with splits, both ways.

    dispatch:  hit[t, r]  = token t has an expert on rank r               [T, W] bool
               C[s][r]    = rows rank s sends rank r = sum_t hit[t, r]      (all-gather of counts:
                                                                           one host sync)
               send       = rows grouped by destination rank, token order inside a group;
                            a token goes once per destination *rank*, not once per expert
               recv       = all_to_all_v(send, C[me][:], C[:][me])          rows from rank s, in
                                                                           s's token order
               pairs      = (row, k) whose expert is local (static_shapes: every (row, k),
                            -1 elsewhere)
    combine:   part[n]    = sum_k w[n, k] * out[n, k]    (fp32, k order, local pairs only)
               back       = all_to_all_v(part, C[:][me], C[me][:])          one partial per
                                                                           (token, rank) it hit
               y[t]       = sum_{r: hit[t, r]} back[r, t]   (fp32, rank order), cast once

Each row carries the token's ids and weights (8K bytes): the receiver expands it to its local
experts. Top-8 of 256 experts over 4 ranks hits ~3.6 ranks a token: ~2.2x fewer bytes than a row
per expert. static_shapes: every rank sends exactly cap rows to every rank (its hits, then 0xFF
padding rows whose ids read -1; cap = dispatch's `max_tokens` or max_tokens_per_rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.comm.base import Dispatched
from epmoe.comm.payload import empty_rows, row_layout
from epmoe.comm.registry import register_comm
from epmoe.comm.wire import WireBackend, WireHandle, WireOptions, partial_sums, unpacked_bytes
from epmoe.group import Pending
from epmoe.ops.combine import expert_owners
from epmoe.routing import Routing


@dataclass
class A2AHandle(WireHandle):
    """A `WireHandle` and the splits."""

    hit: torch.Tensor  # [T, W] bool, token t sent to rank r
    slot: torch.Tensor  # [T, W] int64, row of (t, r) in the send (and returned) buffer; 0 where not hit
    send_splits: list[int]  # rows sent to each rank (host ints)
    recv_splits: list[int]  # rows received from each rank (host ints)
    moved: bool  # whether any rank sends a row (else no rank calls the collectives)


@register_comm
class NcclA2AComm(WireBackend):
    """Count exchange + all-to-all with splits (see the module docstring; options: `WireOptions`)."""

    name = "nccl_a2a"
    Options = WireOptions

    def dispatch_start(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None
                       ) -> Pending[Dispatched]:
        ids = routing.ids  # [T, K] int32
        cap = self._checked(x, ids, max_tokens)  # a failure here is reported to the peers first
        T, H, W, me, dev = x.shape[0], self.cfg.hidden, self.world, self.rank, x.device
        # Out-of-range ids are reported by the count exchange below; until then they index nothing.
        dest = expert_owners(ids, self.placement_on(dev))[0]  # [T, K] rank of each pair's expert, -1 = masked
        ranks = torch.arange(W, dtype=dest.dtype, device=dev)
        hit = (dest.unsqueeze(-1) == ranks).any(dim=1)  # [T, W]
        pos = hit.long().cumsum(0) - 1  # [T, W] position of t among rank r's rows
        # first send row of each destination, computed on the device (no host-to-device copy,
        # so the static path can be captured in a CUDA graph)
        if self.static_shapes:
            send_splits, recv_splits, moved = [cap] * W, [cap] * W, cap > 0
            per_dest = torch.full((W,), cap, dtype=torch.long, device=dev)  # [W]
        else:
            send_splits = hit.sum(0).tolist()  # the host sync
            matrix = self._exchange(x, ids, send_splits)  # [W][W]: matrix[s][r] rows s -> r
            recv_splits = [matrix[s][me] for s in range(W)]
            moved = any(any(row) for row in matrix)  # the same on every rank: all call, or none
            per_dest = hit.long().sum(0)  # [W]
        offsets = per_dest.cumsum(0) - per_dest  # [W]
        total = sum(send_splits)
        slot = torch.where(hit, offsets + pos, torch.zeros_like(pos))  # [T, W]
        layout = row_layout(self.cfg, self.payload, x.dtype)
        # [total + 1, B]; the last row takes misses. Counted sends fill every row; static ones
        # leave padding rows, which must read as -1 ids.
        send = empty_rows(total + 1, layout, dev, filled=0 if self.static_shapes else total + 1)
        if T:
            rows = self._pack(x, routing, layout)  # [T, B]
            for r in range(W):
                send.index_copy_(0, torch.where(hit[:, r], slot[:, r], total), rows)
        send = send[:total]
        recv = self.group.start_all_to_all_v(send, send_splits, recv_splits) if W > 1 and moved else Pending.done(send)
        combine_bytes = (sum(recv_splits) - recv_splits[me]) * H * self.combine_dtype.itemsize
        # staging copies (WireHandle): dispatch packs T rows, copies them into the send buffer once per
        # rank (misses to a spare row), the collective copies this rank's own rows, unpacking copies all
        # but the payload; combine casts to the wire dtype, copies its own rows back, gathers each rank's
        # rows per token (and casts a bf16 wire to fp32)
        B, HC, wide = layout.nbytes, H * self.combine_dtype.itemsize, self.combine_dtype != torch.float32
        own = recv_splits[me] if W > 1 and moved else 0
        R = sum(recv_splits) if W > 1 and moved else total
        copied = ((1 + W) * T * B + own * B + unpacked_bytes(R, layout),
                  (R * HC if wide else 0) + own * HC + (W * T * (HC + (4 * H if wide else 0)) if total else 0))
        return Pending(lambda: self._unpack(recv.wait(), layout, lambda pairs: A2AHandle(  # [R, B] rows
            pairs, x.dtype, (total - send_splits[me]) * layout.nbytes, combine_bytes,
            hit=hit, slot=slot, send_splits=send_splits, recv_splits=recv_splits, moved=moved).copied(*copied)))

    def combine_start(self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                      addend: torch.Tensor | None = None) -> Pending[torch.Tensor]:
        h: A2AHandle = dispatched.handle
        partial = partial_sums(expert_out, h.pairs, self.cfg.hidden)  # [R, H] fp32
        if self.world > 1 and h.moved:  # the combine wire
            back = self.group.start_all_to_all_v(partial.to(self.combine_dtype), h.recv_splits, h.send_splits)
        else:
            back = Pending.done(partial)
        return Pending(lambda: self._sum(back.wait(), h, out, addend))

    def _sum(self, back: torch.Tensor, h: A2AHandle, out: torch.Tensor | None, addend: torch.Tensor | None
             ) -> torch.Tensor:
        """back [total, H]: the partial sum of each (token, rank) sent -> y [T, H] (rank order, one cast)."""
        W, H, T, total = self.world, self.cfg.hidden, h.hit.shape[0], sum(h.send_splits)
        acc = torch.zeros(T, H, dtype=torch.float32, device=back.device)  # [T, H]
        if total:
            for r in range(W):  # rank order; 0 + p == p, so tokens hitting one rank get it exactly
                got = back[h.slot[:, r]].float()  # [T, H]
                acc = torch.where(h.hit[:, r, None], acc + got, acc)
        return self._finish(acc, h.dtype, out, addend)
