"""The contract between comm backends and expert runners, and the backend base class.

    x [T, H], Routing ──dispatch──▶ Dispatched ──runner──▶ out [M, H] ──combine──▶ y [T, H]

A backend moves token rows to the ranks owning their experts (dispatch) and brings the expert
outputs back, weighted by the router and reduced in a fixed order (combine).

Every backend declares its capabilities as class attributes (`CommBackend`: what select.py, the
layer and the conformance tests read; the registry refuses a backend that leaves one to a base
class) and its options as a frozen dataclass (`Options`, a `CommOptions`), built with
`make_options(**kwargs)`, which names unknown keys and lists the valid ones. Backends that
exchange anything check first that every rank agrees (`agree`), so a rank whose inputs fail
raises on every rank instead of leaving its peers waiting.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from epmoe.config import MoEConfig
from epmoe.group import Placement, RankGroup
from epmoe.routing import Routing


@dataclass
class Dispatched:
    """The rows that landed on this rank, and the (row, local expert) pairs to compute.

    hidden:        [N, H] received token rows (a Tensor, or a quantized payload with its
                   scales); a token is sent once per destination rank, not once per expert.
    row_ids:       [M] int32, the row of `hidden` each pair reads.
    expert_ids:    [M] int32, local expert of each pair in [0, E_local); -1 = padding pair,
                   which runners skip and combine ignores (its output row is undefined).
    expert_counts: [E_local] int32 on the device, pairs per local expert (padding excluded).
    handle:        backend-private state that combine needs (weights, destinations, splits).
    expert_offsets: optional [E_local] int32 on the device: the pairs are grouped by expert,
                   those of local expert e being [expert_offsets[e], expert_offsets[e] +
                   expert_counts[e]) in ascending pair order, every other pair padding (-1).
                   Packed groups (offsets = exclusive cumsum of counts) and fixed-capacity
                   slabs (offsets = e * capacity) both qualify. expert_ids stay filled as usual;
                   runners may use the groups to skip their own sort ("triton" does).

    A runner returns out [M, H] in hidden's dtype (bf16/fp16/fp32), one row per pair, in pair
    order, without router weights.
    """

    hidden: Any
    row_ids: torch.Tensor
    expert_ids: torch.Tensor
    expert_counts: torch.Tensor
    handle: Any = field(default=None, repr=False)
    expert_offsets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("row_ids", "expert_ids", "expert_counts", "expert_offsets"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.int32:
                raise ValueError(f"Dispatched.{name} must be int32, got {t.dtype}")
        if self.row_ids.shape != self.expert_ids.shape or self.row_ids.dim() != 1:
            raise ValueError(
                f"Dispatched.row_ids and expert_ids must both be [M], got "
                f"{tuple(self.row_ids.shape)} and {tuple(self.expert_ids.shape)}"
            )
        if self.expert_offsets is not None:
            check_grouped(self.expert_ids, self.expert_counts, self.expert_offsets)

    @property
    def num_pairs(self) -> int:
        return self.expert_ids.shape[0]


IMPLS = ("auto", "torch", "triton")
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


def check_grouped(expert_ids: torch.Tensor, expert_counts: torch.Tensor, expert_offsets: torch.Tensor) -> None:
    """ValueError unless pairs are grouped as `expert_offsets` says (see Dispatched). The shapes
    always; the contents too, except while a CUDA graph is being captured (that reads the
    device, a host sync: a capture replays shapes that eager calls checked before)."""
    E = expert_counts.shape[0]
    if expert_offsets.shape != (E,) or expert_offsets.device != expert_ids.device:
        raise ValueError(f"Dispatched.expert_offsets must be [{E}] (one per local expert) on "
                         f"{expert_ids.device}, got {tuple(expert_offsets.shape)} on {expert_offsets.device}")
    if expert_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    M = expert_ids.shape[0]
    counts, offsets = expert_counts.long(), expert_offsets.long()
    ends = offsets + counts
    if bool(((counts < 0) | (offsets < 0) | (ends > M)).any()):
        raise ValueError(f"Dispatched.expert_offsets: every group [offset, offset + count) must lie in [0, {M})")
    # every pair of expert e inside e's group, and as many of them as the group holds: then each
    # group holds exactly its expert's pairs (so groups cannot overlap, padding lies outside)
    ids = expert_ids.long()
    e = ids.clamp(0, E - 1) if E else ids.clamp_min(0)
    pos = torch.arange(M, device=ids.device)
    inside = (ids >= 0) & (ids < E) & (pos >= offsets[e]) & (pos < ends[e]) if E else ids < 0
    bad = (ids >= 0) & ~inside
    have = count_experts(torch.where(ids < E, expert_ids, -1), E)
    if bool(bad.any()) or not torch.equal(have.long(), counts):
        p = int(torch.nonzero(bad).flatten()[0]) if bool(bad.any()) else -1
        where = f"pair {p} (expert {int(ids[p])}) lies outside its group" if p >= 0 else \
            "expert_counts do not match the pairs' expert ids"
        raise ValueError(f"Dispatched.expert_offsets: {where}; group the pairs by expert or drop expert_offsets")


def count_experts(expert_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """[num_local] int32 pairs per local expert, ignoring -1 padding (no host sync)."""
    valid = expert_ids >= 0
    counts = torch.zeros(num_local, dtype=torch.int32, device=expert_ids.device)
    counts.index_add_(0, expert_ids.long().clamp_min(0), valid.to(torch.int32))
    return counts


# ---------------------------------------------------------------------------------------
# the weighted k-sum of combine (kernel: epmoe/kernels/combine.py)
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
    addend: torch.Tensor | None = None, y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `weighted_sum` (same arguments but impl; no checks)."""
    mask = valid if valid.dtype == torch.bool else valid >= 0
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
    addend: torch.Tensor | None = None, y: torch.Tensor | None = None, impl: str = "auto",
) -> torch.Tensor:
    """Per-token fp32 sum over k of weights * out, in k order, skipping invalid pairs; plus an
    optional fp32 addend; cast once:

        y[t] = cast(sum over valid k, in k order, of weights[t, k] * out[t * K + k]  + addend[t])

    out [T*K, H] fp32/bf16/fp16 (pair t*K + k, unit stride along H), weights [T, K] fp32,
    valid [T, K] bool (or the pairs' int32 expert ids, -1 = invalid), addend [T, H] fp32 (the
    shared experts' output), y [T, H] fp32/bf16/fp16: the result buffer (None: a new fp32
    tensor). Invalid rows are masked with `where`, not multiplied by zero, so garbage (NaN,
    inf) in padding rows never leaks into the sum. impl: "auto" (one Triton launch on CUDA,
    `weighted_sum_torch` elsewhere), "triton" or "torch".
    """
    T, K = num_tokens, top_k
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
        return weighted_sum_torch(out, weights, valid, T, K, addend=addend, y=y)
    sel = valid.contiguous()
    sel = sel.view(torch.uint8) if sel.dtype == torch.bool else sel
    return _launch_sum(out, weights.contiguous(), sel, addend, y, gather=False)


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
                y: torch.Tensor, gather: bool) -> torch.Tensor:
    """One launch of weighted_sum_kernel: a program per (token, tile of up to 1024 columns; 4
    warps hold 8 values a thread, 16-byte bf16 loads). Tile and warps are not tuned yet."""
    from epmoe.kernels.combine import weighted_sum_kernel

    T, K = sel.shape
    H = y.shape[1]
    if T == 0 or H == 0:
        return y
    block_h = min(1 << (H - 1).bit_length(), 1024)
    add = addend if addend is not None else y
    weighted_sum_kernel[(T, -(-H // block_h))](
        out, out.stride(0), weights, sel, add, add.stride(0), y, y.stride(0), H,
        K=K, GATHER=gather, SEL_BOOL=sel.dtype == torch.uint8, HAS_ADDEND=addend is not None,
        BLOCK_H=block_h, num_warps=max(1, min(4, block_h // 256)),
    )
    return y


def call_bound(max_tokens: int | None, T: int, limit: int, who: str) -> int:
    """A dispatch's bound on every rank's T (`max_tokens`, else the workspace's `limit`),
    checked against this rank's T and the limit; `who` opens the error message."""
    bound = limit if max_tokens is None else max_tokens
    if not isinstance(bound, int) or not T <= bound <= limit:
        raise ValueError(f"{who}: max_tokens={max_tokens!r} must be an int between this rank's {T} tokens and "
                         f"max_tokens_per_rank={limit} (the same on every rank)")
    return bound


def check_addend(addend: torch.Tensor, T: int, H: int, device: torch.device, who: str) -> None:
    """A combine addend must be fp32 [T, H] on the output's device."""
    if addend.dtype != torch.float32 or tuple(addend.shape) != (T, H) or addend.device != device:
        raise ValueError(f"{who}: addend must be fp32 [{T}, {H}] on {device} (the shared experts' output), got "
                         f"{addend.dtype} {tuple(addend.shape)} on {addend.device}")


def finish(acc: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
           addend: torch.Tensor | None = None, who: str = "combine") -> torch.Tensor:
    """The one cast of an fp32 result [T, H], after adding `addend` [T, H] fp32 (shared
    experts); written into `out` when given. For backends whose last step is plain torch."""
    if addend is not None:
        check_addend(addend, acc.shape[0], acc.shape[1], acc.device, who)
        acc = acc + addend
    if out is None:
        return acc.to(dtype)
    if tuple(out.shape) != tuple(acc.shape):
        raise ValueError(f"{who}: out must be {tuple(acc.shape)}, got {tuple(out.shape)}")
    return out.copy_(acc)


COMBINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_combine_dtype(combine_dtype: torch.dtype | str) -> torch.dtype:
    """fp32 (default) or bf16 partial sums on the combine wire."""
    if isinstance(combine_dtype, str):
        if combine_dtype not in COMBINE_DTYPES:
            raise ValueError(f"combine_dtype must be one of {sorted(COMBINE_DTYPES)}, got {combine_dtype!r}")
        return COMBINE_DTYPES[combine_dtype]
    if combine_dtype not in COMBINE_DTYPES.values():
        raise ValueError(f"combine_dtype must be torch.float32 or torch.bfloat16, got {combine_dtype}")
    return combine_dtype


def config_code(cfg: MoEConfig) -> int:
    """A MoEConfig as one int, for the cross-rank agreement checks."""
    return zlib.crc32(repr(cfg).encode())


def agree(group: RankGroup | None, who: str, fields: Mapping[str, int], mine: Sequence[int] = (), *,
          device: torch.device | str = "cpu", shown: Mapping[str, Callable[[int], str]] | None = None,
          report: Callable[[list[list[int]]], list[str]] | None = None, fix: str = "") -> list[list[int]]:
    """The cross-rank agreement of every backend that exchanges anything: one all_gather_ints of
    this rank's `fields` (name -> an int every rank must share) followed by `mine` (this rank's
    own ints: token counts, error flags), then a ValueError raised alike on every rank (so no
    rank is left waiting in a later collective or on a flag):

        "{who}: ranks [2] differ from rank 0 on payload (rank 0: bf16, ..., rank 2: fp8); <report>. {fix}"

    shown: field -> how a value reads in the message (default: the int). report(table): further
    problems found in every rank's `mine` ints (table[r] = rank r's). Returns every rank's `mine`
    ints. With no group or one rank nothing is exchanged, but `report` still runs."""
    row = [int(v) for v in fields.values()] + [int(v) for v in mine]
    world = group.world if group is not None else 1
    table = group.all_gather_ints(row, device=device) if world > 1 else [row]
    n = len(fields)
    problems = []
    for i, name in enumerate(fields):
        values = [r[i] for r in table]
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            show = (shown or {}).get(name, str)
            text = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
            problems.append(f"ranks {differ} differ from rank 0 on {name} ({text})")
    rest = [r[n:] for r in table]
    if report is not None:
        problems += report(rest)
    if problems:
        raise ValueError(f"{who}: " + "; ".join(problems) + (f". {fix}" if fix else ""))
    return rest


@dataclass(frozen=True)
class CommOptions:
    """Base of every backend's options: a frozen dataclass whose fields all have defaults and
    whose `__post_init__` raises a ValueError naming the fix for a bad value."""


class CommBackend:
    """A dispatch/combine implementation, built once per layer.

    Class attributes every backend declares itself (select.py, the layer and the conformance
    tests read them; nothing probes a backend with getattr):
    name:            registry key.
    layouts:         attention layouts it serves ("dp": each rank its own tokens; "tp": every
                     rank the same tokens).
    payloads:        what dispatch can move (epmoe.comm.payload PAYLOADS; "bf16" = the
                     activations as they are).
    devices:         "cpu", "cuda".
    needs_host_sync: whether a call reads device values on the host (count exchange), so it
                     cannot sit inside a CUDA graph (unless static_shapes).
    static_capable:  has a static_shapes option that makes it graph-capturable.
    single_node:     all ranks must share one NVLink domain.
    moves_tokens:    False for "none": with the dp layout it serves one rank only.
    Options:         the frozen dataclass of its options (a CommOptions, every field defaulted).

    Instance attributes: options, payload (what dispatch really moves), static_shapes, capacity
    (the largest T per rank one call accepts; None = unbounded), graph_safe.
    """

    name: ClassVar[str]
    layouts: ClassVar[tuple[str, ...]]
    payloads: ClassVar[tuple[str, ...]]
    devices: ClassVar[tuple[str, ...]]
    needs_host_sync: ClassVar[bool]
    static_capable: ClassVar[bool]
    single_node: ClassVar[bool]
    moves_tokens: ClassVar[bool]
    Options: ClassVar[type[CommOptions]]

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement,
                 options: CommOptions | None = None, *, device: torch.device | str, dtype: torch.dtype) -> None:
        """options: None = `Options()`; device, dtype: the weights' device and the activation
        dtype (backends that pre-allocate use them here; others may ignore them)."""
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(f"comm {self.name!r} takes {self.Options.__name__} options (build them with "
                            f"{type(self).__name__}.make_options(...)), got {type(options).__name__}")
        self.options = options
        self.cfg = cfg
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.world = group.world if group is not None else 1
        self.placement = placement
        self.device = torch.device(device)
        self.dtype = dtype
        self.payload = "bf16"
        self.static_shapes = False
        self.capacity: int | None = None
        self._placements: dict[torch.device, Placement] = {}

    @classmethod
    def make_options(cls, **kwargs: Any) -> CommOptions:
        """`Options(**kwargs)`; a ValueError naming each unknown key and listing the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise ValueError(f"comm {cls.name!r} has no option{plural} {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(valid) or 'none'}")
        try:
            return cls.Options(**kwargs)
        except ValueError as exc:
            raise ValueError(f"comm {cls.name!r}: {exc}") from None

    @property
    def graph_safe(self) -> bool:
        """Whether a call can be captured in a CUDA graph (no host sync)."""
        return not self.needs_host_sync or self.static_shapes

    def check(self) -> None:
        """Raise the errors a device-side wait recorded (none here)."""

    def after_replay(self) -> None:
        """What the layer calls after a CUDA-graph replay (nothing here)."""

    def placement_on(self, device: torch.device) -> Placement:
        """The placement map on `device`, copied once (the first call runs before any graph
        capture, so no host-to-device copy happens inside one)."""
        p = self._placements.get(device)
        if p is None:
            p = self._placements[device] = self.placement.to(device)
        return p

    def dispatch(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None) -> Dispatched:
        """Send this rank's tokens x [T, H] to the ranks of their experts; returns the rows that
        landed here. max_tokens: a bound on T that every rank passes alike for this call (a
        graph bucket, or the T agreed under comm="auto"); backends with pre-sized receive slots
        (symm_a2a) list only that many tokens per source for the experts, the others ignore it."""
        raise NotImplementedError

    def combine(
        self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
        addend: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted, reduced outputs [T, H] for this rank's tokens, in x's dtype (written into
        `out` when given). addend: [T, H] fp32 (the shared experts' output), added to the fp32
        sum over ranks before the one cast."""
        raise NotImplementedError
