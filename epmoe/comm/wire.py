"""What token rows look like on the wire, and the base class of the count-exchanging backends.

A dispatched token travels as one byte row, so one collective moves the payload, its scales
and the routing of the token together:

    row = [ payload bytes | scale bytes (quantized payloads) | ids int32 [K] | weights fp32 [K] ]

payload ("bf16" or None: the activations as they are, any float dtype)
    bf16        x row                               H * x.element_size() bytes
    fp8         e4m3 row + its tensor's fp32 scale  H + 4 (one scale per sending rank's batch)
    fp8_block   e4m3 row + fp32 scale per 128       H + 4 * ceil(H / 128)   (per-token groups)
    nvfp4       e2m1 pairs + e4m3 scale per 16      H / 2 + H / 16 + 4 (fp32 global scale)

The sender quantizes its own rows (scales depend on its batch only); the receiver views the
bytes back as a `QuantizedTensor` with per-row scales, which runners dequantize.

`WireBackend` holds what `allgather` and `nccl_a2a` share: the options, the check that every
rank called with the same config (folded into the count exchange, so it costs no extra
collective), and the fp32 rank-order reduction at the home rank.

Host syncs and CUDA graphs: by default each call exchanges counts (and the config check) on the
host, so both backends declare `needs_host_sync = True`. With `static_shapes=True` (and
`max_tokens_per_rank`) every collective has a fixed size and the instance's `needs_host_sync` is
False: the call can be captured in a CUDA graph. Eager static calls still exchange the config
and routing-id check (one small all-gather, so a bad rank raises on every rank instead of
leaving peers in a collective); calls being captured skip it.

Multi-node: both backends use only torch.distributed collectives, so they run across nodes as
they do on one. Launch one process per GPU with torchrun on every node, e.g. for 2 nodes x 8 GPUs

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 app.py

and in app.py: `torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))`,
`dist.init_process_group("nccl")`, `group = EPGroup()`, then build the layer with
`MoELayer.from_global(cfg, weights, group, comm="nccl_a2a")` (or load this rank's experts).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epmoe.comm.base import (
    CommBackend,
    CommOptions,
    Dispatched,
    agree,
    call_bound,
    count_experts,
    finish,
    gather_sum,
    local_pairs,
    weighted_sum,
)
from epmoe.config import MoEConfig
from epmoe.group import Placement, RankGroup

PAYLOADS = ("bf16", "fp8", "fp8_block", "nvfp4")
COMBINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FILL = 0xFF  # unused wire bytes: NaN floats, -1 ids, so a row nobody wrote is never taken as data


def check_payload(payload: str | None, hidden: int | None = None) -> str:
    """Validate a payload option (and, given `hidden`, that rows of that width can carry it);
    returns the canonical name ("bf16" for None)."""
    name = payload or "bf16"
    if name not in PAYLOADS:
        raise ValueError(f"unknown payload {payload!r}; supported payloads: {', '.join(PAYLOADS)} "
                         "(None or 'bf16' = the activations unquantized)")
    if name == "nvfp4" and hidden is not None and hidden % 16:
        raise ValueError(f"nvfp4 payloads need hidden % 16 == 0, got hidden={hidden}; use fp8_block")
    return name


def check_combine_dtype(combine_dtype: torch.dtype | str) -> torch.dtype:
    """fp32 (default) or bf16 partial sums on the combine wire."""
    if isinstance(combine_dtype, str):
        if combine_dtype not in COMBINE_DTYPES:
            raise ValueError(f"combine_dtype must be one of {sorted(COMBINE_DTYPES)}, got {combine_dtype!r}")
        return COMBINE_DTYPES[combine_dtype]
    if combine_dtype not in COMBINE_DTYPES.values():
        raise ValueError(f"combine_dtype must be torch.float32 or torch.bfloat16, got {combine_dtype}")
    return combine_dtype


@dataclass(frozen=True)
class RowLayout:
    """Byte layout of one wire row: `parts` are (dtype, columns) in order; ids and weights last."""

    payload: str
    parts: tuple[tuple[torch.dtype, int], ...]

    @property
    def widths(self) -> list[int]:
        return [n * torch.empty((), dtype=d).element_size() for d, n in self.parts]

    @property
    def nbytes(self) -> int:
        """Bytes per row."""
        return sum(self.widths)


def row_layout(cfg: MoEConfig, payload: str, x_dtype: torch.dtype) -> RowLayout:
    """The wire row for `payload` with activations of `x_dtype` (see the module docstring)."""
    from epmoe.quant import FP8_BLOCK, FP8_DTYPE, NVFP4_BLOCK

    H, K = cfg.hidden, cfg.top_k
    meta = ((torch.int32, K), (torch.float32, K))
    if payload == "bf16":
        parts: tuple[tuple[torch.dtype, int], ...] = ((x_dtype, H),)
    elif payload == "fp8":
        parts = ((FP8_DTYPE, H), (torch.float32, 1))
    elif payload == "fp8_block":
        parts = ((FP8_DTYPE, H), (torch.float32, math.ceil(H / FP8_BLOCK)))
    else:  # nvfp4
        parts = ((torch.uint8, H // 2), (FP8_DTYPE, H // NVFP4_BLOCK), (torch.float32, 1))
    return RowLayout(payload, parts + meta)


def check_input_scale(input_scale: float | torch.Tensor | None, payload: str) -> torch.Tensor | None:
    """A static activation scale (the checkpoint's per-layer `input_scale`) as an fp32 scalar
    tensor on the CPU, or None. It replaces the per-batch scale of fp8 (per-tensor) and the
    global scale of nvfp4, so every rank quantizes with the same one; fp8_block scales are
    per token group and bf16 rows are not quantized, so those payloads take none."""
    if input_scale is None:
        return None
    if payload not in ("fp8", "nvfp4"):
        raise ValueError(f"input_scale is the static scale of fp8 / nvfp4 payloads, not of {payload!r} "
                         "(fp8_block scales are per token group; bf16 rows are not quantized)")
    scale = torch.as_tensor(input_scale, dtype=torch.float32).detach().cpu()
    if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or not float(scale) > 0:
        raise ValueError(f"input_scale must be one finite value > 0, got {input_scale!r}")
    return scale.reshape(())


def scale_code(scale: torch.Tensor | None) -> int:
    """The bits of a static scale as an int (0 = none), for the cross-rank agreement checks."""
    return 0 if scale is None else int(scale.reshape(1).view(torch.int32)[0])


def scale_text(code: int) -> str:
    """A `scale_code` as a person reads it."""
    return "none" if code == 0 else f"{torch.tensor([code], dtype=torch.int32).view(torch.float32).item():g}"


def encode(x: torch.Tensor, payload: str, scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """x [T, H] -> the per-row payload parts of `row_layout` (quantized on this rank).
    scale: static fp8 scale / nvfp4 global scale on x's device (`check_input_scale`), or None
    for the dynamic one of this rank's batch."""
    if payload == "bf16":
        return [x]
    from epmoe.quant import FP8_BLOCK, quantize_activations, quantize_fp8

    T = x.shape[0]
    if payload == "fp8":  # one scale for this rank's batch, repeated per row for the receivers
        q = quantize_fp8(x, scale)
        return [q.data, q.scales.reshape(1, 1).expand(T, 1)]
    if payload == "fp8_block":
        backend = "auto" if x.shape[1] % FP8_BLOCK == 0 else "torch"
        q = quantize_activations(x, "fp8_block", backend=backend)
        return [q.data, q.scales]
    q = quantize_activations(x, "nvfp4", scale=scale)
    return [q.data, q.scales, q.global_scale.reshape(1, 1).expand(T, 1)]


def decode(parts: Sequence[torch.Tensor], payload: str, hidden: int) -> Any:
    """Received payload parts -> hidden rows [N, H]: a Tensor, or a QuantizedTensor whose
    scales (and nvfp4 global scale) are per row."""
    if payload == "bf16":
        return parts[0]
    from epmoe.quant import FP8_BLOCK, NVFP4_BLOCK, QuantizedTensor

    if payload == "fp8":
        return QuantizedTensor(parts[0], parts[1], (1, hidden), "fp8")
    if payload == "fp8_block":
        return QuantizedTensor(parts[0], parts[1], (1, FP8_BLOCK), "fp8_block")
    return QuantizedTensor(parts[0], parts[1], (1, NVFP4_BLOCK), "nvfp4", parts[2])


def pack_rows(parts: Sequence[torch.Tensor], layout: RowLayout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row parts ([T, n_i] each, dtypes of `layout`) -> uint8 [T, layout.nbytes]."""
    T = parts[0].shape[0]
    if out is None:
        out = torch.empty(T, layout.nbytes, dtype=torch.uint8, device=parts[0].device)
    col = 0
    for p, width in zip(parts, layout.widths):
        out[:, col : col + width] = p.contiguous().view(torch.uint8).reshape(T, width)
        col += width
    return out


def unpack_rows(buf: torch.Tensor, layout: RowLayout) -> list[torch.Tensor]:
    """uint8 [N, layout.nbytes] -> the parts, each [N, n_i] in its dtype. The first part (the
    payload, the largest) is a strided view of `buf` where the row stride allows it; the small
    ones are copies."""
    out, col = [], 0
    for i, ((dtype, n), width) in enumerate(zip(layout.parts, layout.widths)):
        cols = buf[:, col : col + width]
        elt = width // n
        if i == 0 and buf.stride(0) % elt == 0:
            out.append(cols.view(dtype))  # [N, n], row stride nbytes / elt
        else:
            # a fresh copy with standard strides: .contiguous() returns 0 or 1 rows as they are,
            # with a byte offset and row stride that a wider dtype cannot view
            out.append(cols.clone(memory_format=torch.contiguous_format).view(dtype).reshape(buf.shape[0], n))
        col += width
    return out


def empty_rows(n: int, layout: RowLayout, device: torch.device, filled: int = 0) -> torch.Tensor:
    """uint8 [n, nbytes] whose rows past `filled` (rows the caller will not write) hold 0xFF:
    NaN payload and weights, -1 ids. Rows before `filled` are left uninitialised."""
    buf = torch.empty((n, layout.nbytes), dtype=torch.uint8, device=device)
    if filled < n:
        buf[filled:].fill_(_FILL)
    return buf


def local_experts_of(ids: torch.Tensor, placement: Placement, rank: int) -> torch.Tensor:
    """Global ids [..] (-1 = masked pair) -> local ids on `rank`, -1 where another rank owns
    the expert or the pair is masked (ids past E count as masked: the count exchange reports
    them). `placement` must live on ids' device. (`base.local_pairs`, shared with `none`.)"""
    return local_pairs(ids, placement, rank)


# ---------------------------------------------------------------------------------------
# the shared base of the count-exchanging backends
# ---------------------------------------------------------------------------------------

def config_code(cfg: MoEConfig) -> int:
    """A MoEConfig as one int, for the cross-rank agreement checks."""
    return zlib.crc32(repr(cfg).encode())


@dataclass(frozen=True)
class WireOptions(CommOptions):
    """Options of the count-exchanging backends (`allgather`, `nccl_a2a`).

    max_tokens_per_rank: the largest T any rank passes (a larger T raises ValueError). Required
                         by static_shapes.
    payload:             "bf16"/None (activations as they are), "fp8", "fp8_block" or "nvfp4":
                         quantized by the sender, data and scales moved together.
    combine_dtype:       dtype of the per-rank partial sums on the combine wire: fp32 (default)
                         or bf16 (half the bytes; each partial sum is rounded once to bf16, a
                         relative error <= 2^-9 of each rank's partial sum, before the fp32 sum).
    static_shapes:       every collective moves max_tokens_per_rank rows per rank pair, so no
                         count is read on the host and a call can be captured in a CUDA graph
                         (rows past a rank's T are padding; costs the bytes of the full bound).
                         Otherwise each call exchanges counts first (one host sync).
    input_scale:         static activation scale shared by every rank (the checkpoint's
                         per-layer `input_scale`): fp8's per-tensor scale or nvfp4's global
                         scale, instead of each rank's batch amax (`check_input_scale`).

    payload and combine_dtype read back canonical ("bf16", torch.float32 / torch.bfloat16).
    """

    max_tokens_per_rank: int | None = None
    payload: str | None = "bf16"
    combine_dtype: torch.dtype | str = torch.float32
    static_shapes: bool = False
    input_scale: float | torch.Tensor | None = None

    def __post_init__(self) -> None:
        m = self.max_tokens_per_rank
        if m is not None and (not isinstance(m, int) or m <= 0):
            raise ValueError(f"max_tokens_per_rank must be a positive int, got {m!r}")
        if self.static_shapes and m is None:
            raise ValueError("static_shapes needs max_tokens_per_rank (the bound every collective is sized by)")
        object.__setattr__(self, "payload", check_payload(self.payload))
        object.__setattr__(self, "combine_dtype", check_combine_dtype(self.combine_dtype))
        object.__setattr__(self, "static_shapes", bool(self.static_shapes))
        check_input_scale(self.input_scale, self.payload)


class WireBackend(CommBackend):
    """Shared construction and checks of `allgather` and `nccl_a2a` (options: `WireOptions`).

    Host syncs: each call exchanges counts (needs_host_sync); with static_shapes the instance's
    `needs_host_sync` is False and a call can be captured in a CUDA graph."""

    options: WireOptions

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement,
                 options: WireOptions | None = None, *, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__(cfg, group, placement, options, device=device, dtype=dtype)
        world, o = self.world, self.options
        if placement.world != world or placement.num_experts != cfg.num_experts:
            raise ValueError(
                f"comm {self.name!r}: placement covers {placement.num_experts} experts on "
                f"{placement.world} ranks, the layer has {cfg.num_experts} experts on {world} ranks; "
                f"build it with Placement.contiguous({cfg.num_experts}, {world})"
            )
        self.payload = check_payload(o.payload, cfg.hidden)
        self.combine_dtype: torch.dtype = o.combine_dtype  # type: ignore[assignment]
        self.max_tokens_per_rank = o.max_tokens_per_rank
        self.capacity = o.max_tokens_per_rank
        self.static_shapes = o.static_shapes
        self.needs_host_sync = not self.static_shapes  # type: ignore[misc]
        self.input_scale = check_input_scale(o.input_scale, self.payload)
        self._scales: dict[torch.device, torch.Tensor] = {}

    def scale_on(self, device: torch.device) -> torch.Tensor | None:
        """The static input scale on `device`, copied once (before any graph capture)."""
        if self.input_scale is None:
            return None
        s = self._scales.get(device)
        if s is None:
            s = self._scales[device] = self.input_scale.to(device)
        return s

    # ---- checks -----------------------------------------------------------------------------

    @staticmethod
    def host_checks(x: torch.Tensor) -> bool:
        """Whether a call may read values on the host: always, except while a CUDA graph is
        being captured (static_shapes calls then skip the config and routing-id checks, which
        every eager call runs)."""
        return not (x.is_cuda and torch.cuda.is_current_stream_capturing())

    def _check_local(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Checks that read no device values (safe in every mode)."""
        T = x.shape[0]
        if x.dim() != 2 or ids.shape != (T, self.cfg.top_k):
            raise ValueError(f"comm {self.name!r} on rank {self.rank}: need x [T, H] and ids [T, "
                             f"{self.cfg.top_k}], got {tuple(x.shape)} and {tuple(ids.shape)}")
        if x.dtype not in _X_DTYPES:
            raise ValueError(f"comm {self.name!r}: x must be fp32, bf16 or fp16, got {x.dtype}")
        if self.input_scale is not None and not self.host_checks(x):
            raise ValueError(f"comm {self.name!r}: input_scale cannot be captured in a CUDA graph yet (epmoe.quant "
                             "checks a static scale on the host); run these calls eagerly or drop input_scale")
        if self.static_shapes and T > self.max_tokens_per_rank:
            raise ValueError(f"comm {self.name!r} on rank {self.rank}: T={T} exceeds max_tokens_per_rank="
                             f"{self.max_tokens_per_rank}; build the backend with a larger bound")

    def _static_cap(self, T: int, max_tokens: int | None) -> int:
        """Rows per rank pair of a static-shape call: dispatch's `max_tokens` (the bound every
        rank passes alike; eager calls check that in the exchange) or max_tokens_per_rank."""
        return call_bound(max_tokens, T, self.max_tokens_per_rank, f"comm {self.name!r} on rank {self.rank}")

    def _exchange(self, x: torch.Tensor, ids: torch.Tensor, counts: Sequence[int] = (), cap: int = 0
                  ) -> list[list[int]]:
        """One all-gather (`agree`) of what every rank must share, this rank's T and whether its
        routing ids are bad, and `counts`; raises the same ValueError on every rank when ranks
        disagree, so no rank is left waiting in a later collective. cap: a static-shape call's
        rows per rank pair (0 otherwise). Returns each rank's `counts` part."""
        T, E = x.shape[0], self.cfg.num_experts
        bad = int(bool(((ids < -1) | (ids >= E)).any())) if ids.numel() else 0
        fields = {
            "hidden": x.shape[1], "top_k": ids.shape[1], "experts": E, "config": config_code(self.cfg),
            "x dtype": _X_DTYPES.index(x.dtype), "payload": PAYLOADS.index(self.payload),
            "combine dtype": 0 if self.combine_dtype == torch.float32 else 1,
            "max_tokens_per_rank": self.max_tokens_per_rank or 0, "static_shapes": int(self.static_shapes),
            "input_scale": scale_code(self.input_scale), "max_tokens of the call": cap,
        }
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

        table = agree(self.group, f"comm {self.name!r} on rank {self.rank}", fields, [T, bad, *counts],
                      device=x.device, shown={"input_scale": scale_text}, report=report,
                      fix="Every rank must build the layer with the same MoEConfig and options and pass x [T, H] "
                          "with valid routing")
        return [row[2:] for row in table]

    # ---- combine helpers --------------------------------------------------------------------

    def _dispatched(self, parts: Sequence[torch.Tensor], pairs: Pairs, handle: Any) -> Dispatched:
        """The received rows (the payload parts of `row_layout`, decoded; the last two parts are
        routing metadata) and the pairs the local experts compute."""
        return Dispatched(
            hidden=decode(parts[:-2], self.payload, self.cfg.hidden),
            row_ids=pairs.row_ids,
            expert_ids=pairs.expert_ids,
            expert_counts=count_experts(pairs.expert_ids, self.placement.local_experts),
            handle=handle,
        )

    def _finish(self, acc: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None,
                addend: torch.Tensor | None = None) -> torch.Tensor:
        """The one cast of the fp32 result [T, H], after adding `addend` (into `out` when given)."""
        return finish(acc, dtype, out, addend, f"comm {self.name!r}")


def sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """[W, T, H] per-rank partial sums (any float dtype) -> [T, H] fp32, added in rank order."""
    acc = parts[0].float().clone() if parts.shape[0] else parts.new_zeros(parts.shape[1:], dtype=torch.float32)
    for r in range(1, parts.shape[0]):
        acc += parts[r].float()
    return acc


# ---------------------------------------------------------------------------------------
# pairs: which (row, k) this rank computes, and the per-row partial sums of their outputs
# ---------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """The (row, k) pairs of received rows that this rank computes.

    dense (static_shapes: no host sync): every (row, k), pair p = row * K + k, -1 where the
    expert lives elsewhere. compact (after a count exchange): only local pairs, grouped by k
    (k = 0 first; rows ascending inside a group), so the runner's output is no larger than
    the work.

    row_ids:    [M] int32 row of each pair.
    expert_ids: [M] int32 local expert (-1 = not computed here; dense only).
    weights:    [M] fp32 router weight of each pair (compact) or [N, K] (dense).
    valid:      [N, K] bool (dense) or None.
    slots:      [N, K] int32 pair of (row, k), -1 = none (compact) or None.
    """

    row_ids: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor | None
    slots: torch.Tensor | None
    rows: int


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
    """Expert outputs [M, H] -> per-row fp32 sums [N, H] of weight * out over the row's local
    pairs, in k order (one `weighted_sum` / `gather_sum` launch on CUDA). Rows without a pair
    are 0; pairs not computed here are masked with `where` (dense) or absent (compact), so
    padding garbage never reaches the sum."""
    N = pairs.rows
    if pairs.valid is not None:
        return weighted_sum(out, pairs.weights, pairs.valid, N, pairs.valid.shape[1], impl=impl)
    return gather_sum(out, pairs.weights, pairs.slots, impl=impl)
