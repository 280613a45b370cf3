"""The contract between comm backends and expert runners, and the backend base class.

    x [T, H], Routing ──dispatch──▶ Dispatched ──runner──▶ out [M, H] ──combine──▶ y [T, H]

Every backend declares its capabilities as class attributes (the registry refuses one left to a
base class) and its options as a frozen `CommOptions` dataclass (`make_options`). Backends that
exchange anything first check that every rank agrees (`agree`), so a rank whose inputs fail
raises on every rank instead of leaving its peers waiting.

Split phases (`split_phase`): each call is a send half that returns a `Pending` and its wait,

    rows = comm.dispatch_start(x, routing)      checks, agreement, exchange posted
    ...                                         other work (another micro-batch's experts)
    out  = runner(rows.wait())
    y    = comm.combine_start(out, d).wait()    likewise

and the blocking call is start + wait (one code path). A backend without them runs the whole
call in its start (the base class's default).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import torch

from epmoe.config import MoEConfig
from epmoe.group import PeerFailedError, Pending, Placement, RankGroup
from epmoe.routing import Routing


def capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on x's device (host reads are then illegal)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass
class Dispatched:
    """The rows that landed on this rank, and the (row, local expert) pairs to compute. A runner
    returns out [M, H] in hidden's dtype, one row per pair, in pair order, without router weights."""

    hidden: Any  # [N, H] received rows (a Tensor, or a QuantizedTensor payload); one per token and rank
    row_ids: torch.Tensor  # [M] int32, the row of `hidden` each pair reads
    expert_ids: torch.Tensor  # [M] int32 local expert in [0, E_local); -1 = padding (skipped; output row undefined)
    expert_counts: torch.Tensor | None  # [E_local] int32 on the device, pairs per local expert (padding
    # excluded); None where the backend does not count (world-1 "none", whose dispatch launches nothing)
    handle: Any = field(default=None, repr=False)  # backend-private state that combine needs

    def __post_init__(self) -> None:
        for name in ("row_ids", "expert_ids", "expert_counts"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.int32:
                raise ValueError(f"Dispatched.{name} must be int32, got {t.dtype}")
        if self.row_ids.shape != self.expert_ids.shape or self.row_ids.dim() != 1:
            raise ValueError(f"Dispatched.row_ids and expert_ids must both be [M], got {tuple(self.row_ids.shape)} "
                             f"and {tuple(self.expert_ids.shape)}")

    @property
    def num_pairs(self) -> int:
        """M."""
        return self.expert_ids.shape[0]


def call_bound(max_tokens: int | None, T: int, limit: int, who: str) -> int:
    """A dispatch's bound on every rank's T (`max_tokens`, else `limit`), checked: T <= bound <= limit."""
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
    """The one cast of an fp32 result [T, H], after adding `addend` [T, H] fp32; into `out` if given."""
    if addend is not None:
        check_addend(addend, acc.shape[0], acc.shape[1], acc.device, who)
        acc = acc + addend
    if out is None:
        return acc.to(dtype)
    if tuple(out.shape) != tuple(acc.shape):
        raise ValueError(f"{who}: out must be {tuple(acc.shape)}, got {tuple(out.shape)}")
    return out.copy_(acc)


def config_code(cfg: MoEConfig) -> int:
    """A MoEConfig as one int, for the cross-rank agreement checks."""
    return zlib.crc32(repr(cfg).encode())


FAILURE_INTS = 16  # the failure slot of an agreement row: a flag and 15 int64 of message text (120 bytes)


def failure_ints(failure: BaseException | str | None) -> list[int]:
    """A rank's failure as agreement-row ints: [1, "Type: message" utf-8, 8 bytes an int] or zeros."""
    if failure is None:
        return [0] * FAILURE_INTS
    text = failure if isinstance(failure, str) else f"{type(failure).__name__}: {failure}"
    raw = text.encode()[: 8 * (FAILURE_INTS - 1)].ljust(8 * (FAILURE_INTS - 1), b"\0")
    return [1] + [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, len(raw), 8)]


def failure_text(ints: Sequence[int]) -> str:
    """The message text `failure_ints` packed (cut at 120 bytes)."""
    raw = b"".join(int(v).to_bytes(8, "little", signed=True) for v in ints[1:FAILURE_INTS])
    return raw.rstrip(b"\0").decode(errors="replace")


def agree(group: RankGroup | None, who: str, fields: Mapping[str, int], mine: Sequence[int] = (), *,
          device: torch.device | str = "cpu", shown: Mapping[str, Callable[[int], str]] | None = None,
          report: Callable[[list[list[int]]], list[str]] | None = None, fix: str = "",
          failure: BaseException | str | None = None) -> list[list[int]]:
    """One all_gather_ints of [failure slot, `fields` (name -> int every rank must share), `mine`
    (this rank's own ints)], then the same error on every rank, so none waits on a peer:

        failure given (this rank failed its checks; it still sends as many ints): it re-raises it
        (a str as ValueError); its peers raise PeerFailedError "{who}: rank 1 failed its own checks..."
        fields differ: ValueError "{who}: ranks [2] differ from rank 0 on payload (rank 0: bf16, ...,
        rank 2: fp8); <report(table)>. {fix}"

    shown: field -> how a value reads (default: the int); report(table): more problems from every
    rank's `mine`. Returns every rank's `mine`. With one rank nothing is exchanged."""
    row = failure_ints(failure) + [int(v) for v in fields.values()] + [int(v) for v in mine]
    table = group.all_gather_ints(row, device=device) if group is not None and group.world > 1 else [row]
    if len({len(r) for r in table}) > 1:  # ranks in different agreements (different backends or call kinds)
        text = ", ".join(f"rank {r}: {len(t)} ints" for r, t in enumerate(table))
        raise ValueError(f"{who}: ranks exchanged agreement rows of different lengths ({text}): they run "
                         "different comm backends, layouts or calls. Build every rank's layer alike and call "
                         "it on every rank")
    failed = {r: failure_text(t[:FAILURE_INTS]) for r, t in enumerate(table) if t[0]}
    if failure is not None:
        raise failure if isinstance(failure, BaseException) else ValueError(f"{who}: {failure}")
    if failed:
        ranks = sorted(failed)
        text = "; ".join(f"rank {r}: {why}" for r, why in failed.items())
        raise PeerFailedError(f"{who}: rank{'s' if len(ranks) > 1 else ''} {ranks if len(ranks) > 1 else ranks[0]} "
                              f"failed its own checks, so no rank goes ahead ({text})", ranks, failed)
    table, n, problems = [t[FAILURE_INTS:] for t in table], len(fields), []
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


def check_keys(who: str, given: Mapping[str, Any], valid: Sequence[str], what: str) -> None:
    """A ValueError naming each key of `given` not in `valid`, and listing `valid` (`what`)."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(f"{who} has no option{plural} {', '.join(map(repr, unknown))}; {what}: "
                         f"{', '.join(valid) or 'none'}")


def option_names(cls: type[CommBackend]) -> tuple[str, ...]:
    """The fields of a backend's Options dataclass."""
    return tuple(f.name for f in dataclasses.fields(cls.Options))


@dataclass(frozen=True)
class CommOptions:
    """Base of every backend's options: frozen, every field defaulted, bad values -> ValueError."""


class CommBackend:
    """A dispatch/combine implementation, built once per layer. Every backend declares the class
    attributes below (select.py, the layer and the conformance tests read them). Instance
    attributes: options, payload (what dispatch really moves), static_shapes, capacity (largest T
    per rank one call accepts; None = unbounded), graph_safe."""

    name: ClassVar[str]  # registry key
    layouts: ClassVar[tuple[str, ...]]  # "dp" (each rank its own tokens), "tp" (every rank the same tokens)
    payloads: ClassVar[tuple[str, ...]]  # payload.PAYLOADS it can move ("bf16" = activations as they are)
    devices: ClassVar[tuple[str, ...]]  # "cpu", "cuda"
    needs_host_sync: ClassVar[bool]  # a call reads device values on the host: no CUDA graph (unless static_shapes)
    static_capable: ClassVar[bool]  # has a static_shapes option that makes it graph-capturable
    single_node: ClassVar[bool]  # all ranks must share one NVLink domain
    moves_tokens: ClassVar[bool]  # False for "none": with the dp layout it serves one rank only
    # True: implements dispatch_start / combine_start (the blocking calls are start + wait), whose
    # exchange is in flight until the wait; False: implements dispatch / combine (the start runs them)
    split_phase: ClassVar[bool]
    # most calls one rank may have started and not yet waited for (None: any number; symm_a2a: 1, its one
    # workspace). A default, not a required declaration: callers overlap several calls only where it is None.
    calls_in_flight: ClassVar[int | None] = None
    Options: ClassVar[type[CommOptions]]  # frozen dataclass of its options, every field defaulted

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement,
                 options: CommOptions | None = None, *, device: torch.device | str, dtype: torch.dtype) -> None:
        """options: None = `Options()`; device, dtype: the weights' device and the activation dtype."""
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(f"comm {self.name!r} takes {self.Options.__name__} options (build them with "
                            f"{type(self).__name__}.make_options(...)), got {type(options).__name__}")
        self.options, self.cfg, self.group, self.placement = options, cfg, group, placement
        self.rank = group.rank if group is not None else 0
        self.world = group.world if group is not None else 1
        self.device, self.dtype = torch.device(device), dtype
        self.payload, self.static_shapes = "bf16", False
        self.capacity: int | None = None
        # copied now, not on a first call, which may run inside a CUDA-graph capture (cudagraph trees)
        self._placements: dict[torch.device, Placement] = {self.device: placement.to(self.device)}

    @classmethod
    def make_options(cls, **kwargs: Any) -> CommOptions:
        """`Options(**kwargs)`; a ValueError naming each unknown key and listing the valid ones."""
        check_keys(f"comm {cls.name!r}", kwargs, option_names(cls), "its options")
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

    def fail(self, failure: BaseException, device: torch.device) -> NoReturn:
        """This rank failed its checks of a call before dispatch: tell the peers (backends with a
        per-call agreement take part in it with the failure), then raise `failure`."""
        raise failure

    def placement_on(self, device: torch.device) -> Placement:
        """The placement map on `device` (copied once per device)."""
        p = self._placements.get(device)
        if p is None:
            p = self._placements[device] = self.placement.to(device)
        return p

    def dispatch(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None) -> Dispatched:
        """Send x [T, H] to the ranks of its experts; returns the rows that landed here. max_tokens:
        a bound on T every rank passes alike (a graph bucket, or auto's agreed T); symm_a2a lists
        only that many tokens per source for the experts, the others ignore it."""
        if not self.split_phase:
            raise NotImplementedError
        return self.dispatch_start(x, routing, max_tokens).wait()

    def dispatch_start(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None
                       ) -> Pending[Dispatched]:
        """dispatch's send half: this rank's checks and the agreement (a failure raises here, on
        every rank), the exchange posted; `.wait()` -> the Dispatched. Every rank starts the same
        calls in the same order (waits may come later, in any order); x and routing stay untouched
        until the wait."""
        if self.split_phase:
            raise NotImplementedError
        return Pending.done(self.dispatch(x, routing, max_tokens))

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                addend: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted, reduced outputs [T, H] for this rank's tokens in x's dtype (into `out` if given);
        addend [T, H] fp32 (shared experts) joins the fp32 sum before the one cast."""
        if not self.split_phase:
            raise NotImplementedError
        return self.combine_start(expert_out, dispatched, out, addend=addend).wait()

    def combine_start(self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                      addend: torch.Tensor | None = None) -> Pending[torch.Tensor]:
        """combine's send half (partial sums computed, exchange posted); `.wait()` -> combine's
        result. Split-phase backends read addend and out only in the wait (the layer's shared
        experts may still be running on a side stream until then). Same ordering rule as
        `dispatch_start`."""
        if self.split_phase:
            raise NotImplementedError
        return Pending.done(self.combine(expert_out, dispatched, out, addend=addend))
