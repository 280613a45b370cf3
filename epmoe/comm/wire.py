"""The base class of the count-exchanging backends (`allgather`, `nccl_a2a`).

A dispatched token travels as one byte row (payload.py `row_layout`), so one collective moves the
payload, its scales and the token's routing together:

    row = [ payload bytes | scale bytes (quantized payloads) | ids int32 [K] | weights fp32 [K] ]

`WireBackend` holds what both share: options, capabilities, packing, the fp32 reduction at home, and
the cross-rank check of config and call number, folded into the count exchange (a rank whose own
checks fail still takes part, so every peer raises `PeerFailedError` naming it).
Counts travel on the host each call; with `static_shapes=True` every collective has a fixed size and
a call can be captured in a CUDA graph (eager static calls still run the check; captures skip it).
Both run across nodes (docs/design.md "Multi-node launch").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from epmoe.comm.base import CommBackend, CommOptions, Dispatched, agree, call_bound, capturing, config_code, finish
from epmoe.comm.payload import (
    PAYLOADS,
    RowLayout,
    check_input_scale,
    check_options,
    check_payload,
    decode,
    encode,
    pack_rows,
    scale_code,
    scale_text,
    unpack_rows,
)
from epmoe.config import MoEConfig
from epmoe.group import Placement, RankGroup
from epmoe.ops.combine import count_experts, gather_sum, local_pairs, weighted_sum
from epmoe.routing import Routing

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class WireOptions(CommOptions):
    """Options of `allgather` and `nccl_a2a` (payload and combine_dtype read back canonical)."""

    max_tokens_per_rank: int | None = None  # the largest T any rank passes (larger: ValueError)
    payload: str | None = "bf16"  # None/"bf16" (as they are), "fp8", "fp8_block", "nvfp4": quantized by the sender
    # partial sums on the combine wire: fp32 or bf16 (torch dtypes or "fp32" / "bf16"; bf16: half the bytes, each
    # rank's partial sum rounded once, relative error <= 2^-9, before the fp32 sum)
    combine_dtype: torch.dtype | str = torch.float32
    # every collective moves max_tokens_per_rank (or dispatch's max_tokens) rows per rank pair, padding included:
    # no host sync, CUDA-graph capturable (needs max_tokens_per_rank)
    static_shapes: bool = False
    # static activation scale shared by every rank (the checkpoint's `input_scale`): fp8's per-tensor or nvfp4's
    # global scale instead of each rank's batch amax
    input_scale: float | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.static_shapes and self.max_tokens_per_rank is None:
            raise ValueError("static_shapes needs max_tokens_per_rank (the bound every collective is sized by)")
        check_options(self)
        object.__setattr__(self, "static_shapes", bool(self.static_shapes))


class WireBackend(CommBackend):
    """What `allgather` and `nccl_a2a` share (see the module docstring; options: `WireOptions`)."""

    layouts = ("dp",)
    payloads = PAYLOADS
    devices = ("cpu", "cuda")
    needs_host_sync = True  # unless static_shapes (the instance attribute then reads False)
    static_capable = True
    single_node = False
    moves_tokens = True
    split_phase = True  # the data collectives are posted async (count exchange and agreement block)
    options: WireOptions

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement,
                 options: WireOptions | None = None, *, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__(cfg, group, placement, options, device=device, dtype=dtype)
        world, o = self.world, self.options
        if placement.world != world or placement.num_experts != cfg.num_experts:
            raise ValueError(f"comm {self.name!r}: placement covers {placement.num_experts} experts on "
                             f"{placement.world} ranks, the layer has {cfg.num_experts} experts on {world} ranks; "
                             f"build it with Placement.contiguous({cfg.num_experts}, {world})")
        self.payload = check_payload(o.payload, cfg.hidden)
        self.combine_dtype: torch.dtype = o.combine_dtype  # type: ignore[assignment]
        self.max_tokens_per_rank = self.capacity = o.max_tokens_per_rank
        self.static_shapes = o.static_shapes
        self.needs_host_sync = not self.static_shapes  # type: ignore[misc]
        self.input_scale = check_input_scale(o.input_scale, self.payload)
        self.calls = 0  # count exchanges so far: an agreed field, so a rank that skipped a call is named
        # on the construction device now, so no first call copies it inside a graph capture
        self._scales: dict[torch.device, torch.Tensor] = (
            {} if self.input_scale is None else {self.device: self.input_scale.to(self.device)})

    def scale_on(self, device: torch.device) -> torch.Tensor | None:
        """The static input scale on `device`, copied once (before any graph capture)."""
        if self.input_scale is None:
            return None
        if device not in self._scales:
            self._scales[device] = self.input_scale.to(device)
        return self._scales[device]

    def _check_local(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Checks that read no device values (safe in every mode)."""
        T = x.shape[0]
        if x.dim() != 2 or ids.shape != (T, self.cfg.top_k):
            raise ValueError(f"comm {self.name!r} on rank {self.rank}: need x [T, H] and ids [T, "
                             f"{self.cfg.top_k}], got {tuple(x.shape)} and {tuple(ids.shape)}")
        if x.dtype not in _X_DTYPES:
            raise ValueError(f"comm {self.name!r}: x must be fp32, bf16 or fp16, got {x.dtype}")
        if self.input_scale is not None and capturing(x):
            raise ValueError(f"comm {self.name!r}: input_scale cannot be captured in a CUDA graph yet (epmoe.quant "
                             "checks a static scale on the host); run these calls eagerly or drop input_scale")
        if self.static_shapes and T > self.max_tokens_per_rank:
            raise ValueError(f"comm {self.name!r} on rank {self.rank}: T={T} exceeds max_tokens_per_rank="
                             f"{self.max_tokens_per_rank}; build the backend with a larger bound")

    def _exchange(self, x: torch.Tensor, ids: torch.Tensor, counts: Sequence[int] = (), cap: int = 0,
                  failure: BaseException | None = None) -> list[list[int]]:
        """One `agree` of what every rank must share, this rank's T, whether its routing ids are bad
        and `counts` (up to W ints; `failure`: this rank's own check failed, reported here). cap: a
        static call's rows per rank pair (0 otherwise). Returns every rank's counts (W ints, 0-padded)."""
        E, W = self.cfg.num_experts, self.world
        self.calls += 1
        if failure is None:
            T = x.shape[0]
            bad = int(bool(((ids < -1) | (ids >= E)).any())) if ids.numel() else 0
            shape = {"hidden": x.shape[1], "top_k": ids.shape[1], "x dtype": _X_DTYPES.index(x.dtype)}
        else:  # x may be anything here: zeros stand in, the failure is what the peers read
            T, bad, counts = 0, 0, ()
            shape = {"hidden": 0, "top_k": 0, "x dtype": 0}
        fields = {**shape, "experts": E, "config": config_code(self.cfg), "payload": PAYLOADS.index(self.payload),
                  "combine dtype": 0 if self.combine_dtype == torch.float32 else 1,
                  "max_tokens_per_rank": self.max_tokens_per_rank or 0, "static_shapes": int(self.static_shapes),
                  "input_scale": scale_code(self.input_scale), "max_tokens of the call": cap,
                  "call number (a rank skipped a call)": self.calls}
        limit = self.max_tokens_per_rank

        def report(table: list[list[int]]) -> list[str]:
            problems = []
            bad = [r for r, row in enumerate(table) if row[1]]
            if bad:
                problems.append(f"ranks {bad} passed routing ids outside [0, {E}) (-1 marks a masked pair)")
            over = [r for r, row in enumerate(table) if limit is not None and row[0] > limit]
            if over:
                problems.append(f"ranks {over} passed more tokens than max_tokens_per_rank={limit} "
                                f"({[table[r][0] for r in over]})")
            return problems

        counts = [*counts, *[0] * (W - len(counts))]
        table = agree(self.group, f"comm {self.name!r} on rank {self.rank}", fields, [T, bad, *counts],
                      device=x.device, shown={"input_scale": scale_text}, report=report, failure=failure,
                      fix="Every rank must build the layer with the same MoEConfig and options and pass x [T, H] "
                          "with valid routing")
        return [row[2:] for row in table]

    def fail(self, failure: BaseException, device: torch.device) -> NoReturn:
        """Report `failure` in this call's count exchange (peers raise `PeerFailedError`), then raise it
        (one rank, or a CUDA graph capture: just raise it)."""
        if self.world > 1 and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self._exchange(torch.empty(0, 0, device=device), torch.empty(0, 0, dtype=torch.int32, device=device),
                           failure=failure)
        raise failure

    def _checked(self, x: torch.Tensor, ids: torch.Tensor, max_tokens: int | None) -> int:
        """This rank's checks of a call (a failure goes to the peers by `fail`); returns a static call's
        rows per rank pair (after the check exchange, when eager), else 0."""
        try:
            self._check_local(x, ids)
            if not self.static_shapes:
                return 0
            who = f"comm {self.name!r} on rank {self.rank}"
            cap = call_bound(max_tokens, x.shape[0], self.max_tokens_per_rank, who)
        except Exception as exc:  # noqa: BLE001 - re-raised by fail on this rank, reported to its peers
            self.fail(exc, x.device)
        if not capturing(x):
            self._exchange(x, ids, cap=cap)
        return cap

    def _pack(self, x: torch.Tensor, routing: Routing, layout: RowLayout, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        """x [T, H] and its routing -> wire rows uint8 [T, layout.nbytes] (into `out` if given)."""
        return pack_rows([*encode(x, self.payload, self.scale_on(x.device)), routing.ids, routing.weights], layout,
                         out=out)

    def _unpack(self, buf: torch.Tensor, layout: RowLayout, handle_fn: Callable[[Pairs], Any]) -> Dispatched:
        """Received wire rows [N, B] -> Dispatched: the decoded payload and the pairs the local
        experts compute (dense under static_shapes, else compact); handle_fn(pairs) -> the handle."""
        parts = unpack_rows(buf, layout)
        local = local_pairs(parts[-2], self.placement_on(buf.device), self.rank)  # [N, K]
        pairs = make_pairs(local, parts[-1], compact=not self.static_shapes)
        return Dispatched(hidden=decode(parts[:-2], self.payload, self.cfg.hidden), row_ids=pairs.row_ids,
                          expert_ids=pairs.expert_ids, handle=handle_fn(pairs),
                          expert_counts=count_experts(pairs.expert_ids, self.placement.local_experts))

    def _finish(self, acc: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None,
                addend: torch.Tensor | None = None) -> torch.Tensor:
        """The one cast of the fp32 result [T, H], after adding `addend` (into `out` when given)."""
        return finish(acc, dtype, out, addend, f"comm {self.name!r}")


@dataclass
class WireHandle:
    """What combine needs of a wire dispatch: the pairs computed here, the output dtype (x's), the
    bytes sent to other ranks per phase, and the bytes written by staging copies per phase
    (`*_copied`: host ints from the call's shapes, for `epmoe bench comm`; docs/bench.md)."""

    pairs: Pairs
    dtype: torch.dtype
    dispatch_bytes: int
    combine_bytes: int
    dispatch_copied: int = field(default=0, init=False)
    combine_copied: int = field(default=0, init=False)

    def copied(self, dispatch: int, combine: int) -> WireHandle:
        """This handle with its staging-copy counts set."""
        self.dispatch_copied, self.combine_copied = dispatch, combine
        return self


def unpacked_bytes(rows: int, layout: RowLayout) -> int:
    """Bytes `unpack_rows` copies out of `rows` wire rows: every part but the payload (a view)."""
    return rows * (layout.nbytes - layout.widths[0])


def sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """[W, T, H] per-rank partial sums (any float dtype) -> [T, H] fp32, added in rank order; no copy of
    parts[0] (one rank: parts[0] itself when fp32, read only)."""
    if not parts.shape[0]:
        return parts.new_zeros(parts.shape[1:], dtype=torch.float32)
    if parts.shape[0] == 1:
        return parts[0].float()
    acc = parts[0].float() + parts[1].float()
    for r in range(2, parts.shape[0]):
        acc += parts[r].float()
    return acc


@dataclass
class Pairs:
    """The (row, k) pairs of N received rows that this rank computes. dense (static_shapes): every
    (row, k), pair p = row * K + k, -1 where the expert lives elsewhere; compact (after a count
    exchange): local pairs only, grouped by k, rows ascending inside a group."""

    row_ids: torch.Tensor  # [M] int32 row of each pair
    expert_ids: torch.Tensor  # [M] int32 local expert (-1 = not computed here; dense only)
    weights: torch.Tensor  # [M] fp32 router weight of each pair (compact) or [N, K] (dense)
    valid: torch.Tensor | None  # [N, K] bool (dense) or None
    slots: torch.Tensor | None  # [N, K] int32 pair of (row, k), -1 = none (compact) or None
    rows: int  # N


def make_pairs(local: torch.Tensor, weights: torch.Tensor, compact: bool) -> Pairs:
    """local [N, K] int32 local expert or -1, weights [N, K] fp32 -> the pairs to compute."""
    N, K = local.shape
    valid = local >= 0
    if not compact:
        row_ids = torch.arange(N, dtype=torch.int32, device=local.device).repeat_interleave(K)
        return Pairs(row_ids, local.reshape(-1), weights, valid, None, N)
    kt = valid.T.nonzero()  # [M, 2] (k, row), k-major, rows ascending (host sync; callers have synced already)
    k, row = kt[:, 0], kt[:, 1]
    slots = torch.full((N, K), -1, dtype=torch.int32, device=local.device)
    slots[row, k] = torch.arange(kt.shape[0], dtype=torch.int32, device=local.device)
    return Pairs(row.to(torch.int32), local[row, k], weights[row, k], None, slots, N)


def partial_sums(out: torch.Tensor, pairs: Pairs, H: int, impl: str = "auto") -> torch.Tensor:
    """Expert outputs [M, H] -> per-row fp32 sums [N, H] of weight * out over the row's pairs, k order;
    rows without a pair are 0, padding never reaches the sum (masked with `where`, or absent)."""
    N = pairs.rows
    if pairs.valid is not None:
        return weighted_sum(out, pairs.weights, pairs.valid, N, pairs.valid.shape[1], impl=impl)
    return gather_sum(out, pairs.weights, pairs.slots, impl=impl)
