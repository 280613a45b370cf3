"""`symm_a2a`: one-sided all-to-all over memory every rank can write (symmetric memory).

Each rank owns one workspace buffer every peer can read and write (symmetric memory on GPUs of one
node, a /dev/shm file for gloo processes, one table for a VirtualGroup; its layout, size and
transports: epmoe/comm/symm_workspace.py; kernel launches and plain-torch twins: epmoe/ops/symm.py):

    dispatch_send   home s, for every destination rank r (itself included):
                      rows:  for each token t that picks an expert on r, copy x[t] once (bf16,
                             or the quantized payload with its scales) into r's slot [s, t]
                      meta:  for every t < T: the local expert ids on r (k order, -1 padded to
                             Kl) and their router weights -> r's meta[s, t]
                      count: T -> r's count[s];  then release-store seq -> r's dispatch flag[s]
    dispatch_recv   rank r: acquire-wait until dispatch flag[s] == seq for every s (bounded);
                      pairs (s, t, j) for t < count[s] with meta id >= 0 go to the experts
    experts         out[(s * Tm + t) * Kl + j] for every pair (padding pairs ignored)
    combine_send    rank r: partial[s, t] = sum_j w[s, t, j] * out[(s, t, j)]  (fp32, j order)
                      for the tokens t that picked an expert on r, stored (combine_mode)
                        "push" (default): into home s's comb_out[r, t]  (a write over NVLink)
                        "pull":           into r's own comb_out[s, t]
                      then release-store seq -> s's combine flag[r]
    combine_recv    home s: acquire-wait until combine flag[r] == seq for every r (bounded);
                      y[t] = sum over r in rank order of r's partial sum for t (push: own
                      comb_out[r, t], local reads; pull: r's comb_out[s, t], reads over NVLink)
                      for the ranks t picked, in fp32, cast once

Push is the default because GPU-initiated writes to a peer are much faster than reads from it:
on 2 H200s over NVLink (NV18), dispatch stores moved rows at 262 GB/s while the pull combine's
reads came back at about 40 GB/s (DeepSeek-V3 shapes, 4096 tokens per rank: dispatch 221 µs,
pull combine 2972 µs; `epmoe bench comm --world 2`, docs/performance.md). Either way the home
adds the W partial sums itself, in rank order, so results do not depend on the mode.

Slots are indexed by the source token itself (slot [s, t]), so a sender needs no prefix sum
over its tokens, the home knows where its partial sums sit without any handle state, and every
kernel's grid is fixed by T and the workspace shape: a call can be captured in a CUDA graph.

Sequence numbers instead of barriers: call n uses seq = n mod (2^31 - 1) + 1 (never 0, the value
a fresh workspace holds). Waits test flag == seq, so nothing is reset and wrapping is safe: a
flag a reader waits on is always either the previous call's value or this call's, because

    * s writes r's slots for call n+1 only after s's combine_recv(n), which waited for r's
      combine flag n, which r raised after its experts and combine_send(n) read those slots;
    * r writes the partial sums for s of call n+1 (into s's comb_out or its own) only after
      dispatch_recv(n+1) saw s's flag n+1, which s raised after its combine_recv(n) had read
      them.

So a call is always dispatch followed by combine; a second dispatch without a combine raises.
A rank with zero tokens still writes count 0 and raises its flags (no dummy token). An eager
blocking call on several ranks first agrees over the group (one small host exchange,
comm/call_agreement.py), so a rank whose checks fail makes every rank raise, naming it, before
any flag is written; captured calls and the split phases agree on nothing. Every flag wait
is bounded by `timeout_s`: on the host (torch transport) a `SymmTimeoutError` names the ranks
whose flags never showed the call's sequence number; in the Triton kernels the waiting program
records the silent ranks in an error word, later waits of the call skip, and `check()` (run
after every eager call unless check_errors=False) raises the same error. A backend that timed
out is broken for good: its peers' state is unknown, so later calls raise at once.

Split phases (`dispatch_start` / `combine_start`, comm/base.py): each start is the send phase
(launched, or on the CPU written, at once; it waits for no peer) and its `wait()` the receive
phase, so a caller's work between them (the shared experts, the experts of another batch) runs
while the peers' rows arrive; the blocking calls are start + wait, the same kernels in the same
order, so they give the same bits and a CUDA graph captures the halves as it captures the whole
(every pointer and grid is fixed by T and the workspace). One call is in flight at a time
(`calls_in_flight = 1`): the next dispatch reuses the slots [s, t] of this one, so it may start
only after this call's combine was waited for (a second start raises on every rank alike, before
anything is written). Micro-batches therefore run one after another on this backend; overlapping
two calls would need a second workspace.

SM budget (`sm_budget`, Triton path): every kernel launch takes at most sm_budget programs (a
program runs on one SM, so the exchange occupies at most that many SMs and the others stay free
for the side stream's shared experts or another micro-batch's experts); None launches up to 4
programs per SM. The kernels stride over their tokens (dispatch_recv over its (source, chunk)
items) by the grid, so the budget changes no bit of any result, and it is fixed at construction:
captured graphs keep it. The torch twin ignores it, and so do the quantize kernels of an fp8 / nvfp4
payload (compute on this rank's own rows before the send, not the exchange).

CPU memory ordering (shm transport): payload and meta are written by torch ops, then the flag by
one aligned 4-byte store; the reader loads the flag, then the payload. x86-64 keeps stores in
program order and loads in program order (TSO), and the torch calls are opaque to the compiler,
so a reader that sees the flag sees the payload. On weakly ordered hosts (Arm) this transport
would need fences; it exists to test the protocol on CPU, the GPU path uses release/acquire
atomics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from epmoe.comm.base import (
    CommBackend,
    CommOptions,
    Dispatched,
    agree,
    call_bound,
    capturing,
    check_addend,
    config_code,
    finish,
)
from epmoe.comm.call_agreement import CallAgreement
from epmoe.comm.payload import (
    PAYLOADS,
    check_input_scale,
    check_options,
    check_payload,
    decode_bytes,
    encode_bytes,
    scale_code,
    scale_text,
)
from epmoe.comm.registry import register_comm
from epmoe.comm.symm_workspace import Layout, map_workspaces
from epmoe.config import MoEConfig
from epmoe.group import Pending, Placement, RankGroup
from epmoe.ops import symm as symm_ops
from epmoe.ops.combine import IMPLS, count_experts, expert_owners
from epmoe.ops.symm import KernelWorkspace, SymmTimeoutError, interpreting
from epmoe.routing import Routing

COMBINE_MODES = ("push", "pull")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # codes of the setup agreement
SEQ_WRAP = 2**31 - 1  # sequence numbers run 1 .. SEQ_WRAP, then 1 again
DEFAULT_MAX_TOKENS = 128  # decode batches; prefill callers pass max_tokens_per_rank


def next_seq(seq: int) -> int:
    """The sequence number of the call after `seq` (0 = no call yet)."""
    return seq % SEQ_WRAP + 1


@dataclass
class SymmHandle:
    """What combine needs from a dispatch: ids [T, K] int32 global expert ids of this rank's tokens
    (-1 = masked, sent nowhere); seq, the call's sequence number (host copy; the Triton path keeps
    its own on the device, so graph replays advance it); bound B on every rank's T (max_tokens, else
    Tm: the pair list has W * B * Kl entries).

    dispatch_bytes, combine_bytes (from `ids` on first read, a host sync: never in a CUDA graph):
        dispatch  per other rank r: meta of every token (T * Kl * 8, written whether or not t
                  picks r), the payload row (D + S + G) of each token with an expert on r (once
                  per rank, not per expert), count and flag (8)
        combine   a partial-sum row (H * combine dtype size) per (token, other rank it picked),
                  written here by peers (or read by this rank under "pull"), and a flag per peer (4)

    dispatch_copied, combine_copied (staging copies on this rank, as comm/wire.py's WireHandle
    counts them): dispatch writes the rows of this rank's tokens with an expert here into its own
    slots (D + S + G each), the meta of every token into its own meta (Kl * 8), and lays the
    scales of a quantized payload out per row (S + G per token); the received rows reach the
    experts as views of the workspace. combine copies nothing: each partial sum is written once,
    where its home reads it, and the home sums them in place.
    """

    ids: torch.Tensor
    num_tokens: int
    dtype: torch.dtype  # the output dtype (x's)
    seq: int
    placement: Placement | None = field(default=None, repr=False)  # on ids' device
    rank: int = 0
    world: int = 1
    wire_row_bytes: int = 0  # D + S + G
    data_row_bytes: int = 0  # D
    meta_bytes: int = 0  # Kl * 8
    combine_row_bytes: int = 0  # H * combine dtype size
    bound: int = 0
    _hits: list[int] | None = field(default=None, init=False, repr=False)

    def _others(self) -> list[int]:
        """Tokens with at least one expert on each other rank (host ints)."""
        if self._hits is None:
            self._hits = [0] * self.world
            if self.placement is not None and self.num_tokens:
                owner = expert_owners(self.ids, self.placement)[0]  # [T, K]
                r = torch.arange(self.world, device=owner.device)
                self._hits = (owner.unsqueeze(-1) == r).any(dim=1).sum(0).tolist()  # [W]
        return [h for r, h in enumerate(self._hits) if r != self.rank]

    @property
    def dispatch_bytes(self) -> int:
        return sum(self.num_tokens * self.meta_bytes + h * self.wire_row_bytes + 8 for h in self._others())

    @property
    def combine_bytes(self) -> int:
        return sum(h * self.combine_row_bytes + 4 for h in self._others())

    @property
    def dispatch_copied(self) -> int:
        self._others()  # fills the per-rank hits
        scales = self.wire_row_bytes - self.data_row_bytes  # scale planes laid out per row
        own = self._hits[self.rank] if self._hits else 0  # type: ignore[index]
        return own * self.wire_row_bytes + self.num_tokens * (self.meta_bytes + scales)

    @property
    def combine_copied(self) -> int:
        return 0


@dataclass(frozen=True)
class SymmOptions(CommOptions):
    """Options of `symm_a2a`; payload, combine_dtype and input_scale as in `WireOptions` (input_scale:
    eager calls only for now, epmoe.quant checks it on the host, so a capture with it raises)."""

    max_tokens_per_rank: int | None = DEFAULT_MAX_TOKENS  # T limit of one call on one rank; sizes the workspace
    payload: str | None = "bf16"
    timeout_s: float = 10.0  # bound of every wait for peers' flags
    combine_dtype: torch.dtype | str = torch.float32  # or bf16 / "bf16": half the bytes, one more rounding
    # "push": expert ranks write into the home's workspace; "pull": the home reads theirs (same results; push is
    # faster over NVLink, module docstring)
    combine_mode: str = "push"
    # "auto": "triton" (CUDA kernels) on CUDA, "torch" (the plain-torch twin; on CUDA it polls flags from the host)
    # on the CPU
    impl: str = "auto"
    # read the kernels' error word after every eager combine (a host sync) and every graph replay, and raise on
    # timeouts; with False call `check()` yourself
    check_errors: bool = True
    input_scale: float | torch.Tensor | None = None
    # SMs the comm kernels may occupy (Triton path): every launch takes at most this many programs, one SM each,
    # leaving the other SMs to work on other streams (the shared experts, another micro-batch's experts). None:
    # up to 4 programs per SM of the device. Any value gives the same bits; at most the device's SM count
    sm_budget: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_per_rank is None:
            object.__setattr__(self, "max_tokens_per_rank", DEFAULT_MAX_TOKENS)
        check_options(self)
        if self.sm_budget is not None and (isinstance(self.sm_budget, bool) or not isinstance(self.sm_budget, int)
                                           or self.sm_budget < 1):
            raise ValueError(f"sm_budget must be a positive int (SMs the comm kernels may occupy) or None (up to 4 "
                             f"programs per SM of the device), got {self.sm_budget!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.combine_mode not in COMBINE_MODES:
            raise ValueError(f"combine_mode must be 'push' or 'pull', got {self.combine_mode!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {self.impl!r}")


@register_comm
class SymmA2A(CommBackend):
    """One-sided dispatch/combine through every rank's workspace (module docstring; options:
    `SymmOptions`), built at construction on `device` for bf16 rows of `dtype` (a collective)."""

    name = "symm_a2a"
    layouts = ("dp",)
    payloads = PAYLOADS
    devices = ("cpu", "cuda")
    needs_host_sync = False
    static_capable = False
    single_node = True
    moves_tokens = True
    split_phase = True  # send phase in the start, receive phase in the wait (module docstring)
    calls_in_flight = 1  # one workspace: the next dispatch starts after this call's combine wait
    Options = SymmOptions
    options: SymmOptions

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement,
                 options: SymmOptions | None = None, *, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__(cfg, group, placement, options, device=device, dtype=dtype)
        o, device = self.options, self.device
        self.max_tokens: int = o.max_tokens_per_rank  # type: ignore[assignment]
        self.capacity = self.max_tokens
        self.payload = check_payload(o.payload, cfg.hidden)
        self.timeout_s = float(o.timeout_s)
        self.combine_dtype: torch.dtype = o.combine_dtype  # type: ignore[assignment]
        self.combine_mode, self.impl, self.check_errors = o.combine_mode, o.impl, o.check_errors
        self.input_scale = check_input_scale(o.input_scale, self.payload)
        self.slot_experts = min(cfg.top_k, placement.local_experts)
        self.seq = 0  # last completed call's sequence number (host copy)
        self.layout: Layout | None = None
        self._open: SymmHandle | None = None
        self._broken: str | None = None
        if dtype not in _DTYPES:
            raise ValueError(f"symm_a2a rows must be bf16, fp16 or fp32, got {dtype}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        impl = self.impl if self.impl != "auto" else ("triton" if device.type == "cuda" else "torch")
        if impl == "triton" and device.type != "cuda" and not interpreting():
            raise ValueError("impl='triton' needs a CUDA device (or TRITON_INTERPRET=1); use impl='torch' on the CPU")
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        if device.type == "cuda" and o.sm_budget is not None and o.sm_budget > sms:  # before anything collective
            raise ValueError(f"symm_a2a rank {self.rank}: sm_budget={o.sm_budget} exceeds the {sms} SMs of {device}; "
                             f"pass at most {sms}, or None for every SM")
        W = self.world
        lay = Layout(W, self.max_tokens, cfg.hidden, self.slot_experts, self.payload, dtype, self.combine_dtype)
        self._agree(lay, device)
        self.device, self.dtype, self._impl, self.layout = device, dtype, impl, lay
        self._calls = CallAgreement(f"symm_a2a rank {self.rank}", self.group, device)  # eager calls agree first
        self._scale_dev = self.input_scale.to(device) if self.input_scale is not None else None
        mapped = map_workspaces(self.group, lay.nbytes, device)
        self.in_process, self._symm_handle = mapped.in_process, mapped.symm_handle
        self._buffers = mapped.buffers  # keeps peer mappings alive as long as this backend
        self.peers = [lay.views(b) for b in mapped.buffers]
        self.own = self.peers[self.rank]
        self._pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._overflow: str | None = None
        self._placement_dev = self.placement.to(device)
        if impl == "triton":
            # [seq, counter x3, err code, err seq, over-bound source + 1, its count] then [2, W] silent flags
            self._state = torch.zeros(8 + 2 * W, dtype=torch.int32, device=device)
            use_timer = device.type == "cuda" and not interpreting()
            self._kernel_ws = KernelWorkspace(
                ptrs=torch.tensor([b.data_ptr() for b in mapped.buffers], dtype=torch.int64, device=device),
                state=self._state, offsets=lay.offsets, rank=self.rank, world=W, num_experts=cfg.num_experts,
                max_tokens=self.max_tokens, slot_experts=self.slot_experts, hidden=cfg.hidden,
                row_bytes=lay.row_bytes, combine_dtype=self.combine_dtype, push=self.combine_mode == "push",
                max_programs=4 * sms if o.sm_budget is None else o.sm_budget, sm_budget=o.sm_budget,
                use_timer=use_timer,
                # the interpreter has no %globaltimer: bound its spins instead (about 10k per second)
                timeout=int(self.timeout_s * 1e9) if use_timer else max(1, int(self.timeout_s * 1e4)),
                dummy=torch.zeros(4, dtype=torch.float32, device=device))  # stands in for absent planes

    @staticmethod
    def workspace_bytes(cfg: MoEConfig, world: int, max_tokens_per_rank: int, payload: str = "bf16",
                        dtype: torch.dtype = torch.bfloat16, combine_dtype: torch.dtype = torch.float32,
                        local_experts: int | None = None) -> int:
        """Bytes of one rank's workspace (the formula of epmoe/comm/symm_workspace.py)."""
        local = local_experts or cfg.num_experts // world
        return Layout(world, max_tokens_per_rank, cfg.hidden, min(cfg.top_k, local), payload, dtype,
                      combine_dtype).nbytes

    @property
    def max_tokens_per_rank(self) -> int:
        """The largest T one call accepts (the workspace's Tm; select.comm_capacity reads it)."""
        return self.max_tokens

    def _agree(self, lay: Layout, device: torch.device) -> None:
        """One `agree` of what every rank's workspace layout depends on: a ValueError on every rank
        (none is left waiting on a peer's flags) naming the ranks that differ from rank 0."""
        fields = {
            "world": lay.world, "max_tokens_per_rank": lay.max_tokens, "hidden": lay.hidden,
            "local experts per token (Kl)": lay.slot_experts, "payload": PAYLOADS.index(lay.payload),
            "row dtype": _DTYPES.index(lay.dtype), "combine dtype": _DTYPES.index(lay.combine_dtype),
            "workspace bytes": lay.nbytes, "config": config_code(self.cfg),
            "input_scale": scale_code(self.input_scale), "combine_mode": COMBINE_MODES.index(self.combine_mode)}
        shown = {"payload": PAYLOADS.__getitem__, "row dtype": lambda v: str(_DTYPES[v]),
                 "combine dtype": lambda v: str(_DTYPES[v]), "combine_mode": COMBINE_MODES.__getitem__,
                 "input_scale": scale_text}
        agree(self.group, f"symm_a2a rank {self.rank}", fields, device=device, shown=shown,
              fix="Every rank must build the layer with the same MoEConfig and comm_options and pass x of the "
                  "same dtype")

    def destroy(self) -> None:
        """Drop the workspace (collective: every rank calls it before any peer frees memory)."""
        if self.layout is not None and self.group is not None and self.world > 1:
            self.group.barrier()
        self.layout, self.peers, self._buffers = None, [], []

    def _check_call(self, x: torch.Tensor, routing: Routing) -> None:
        if self._broken:
            raise RuntimeError(f"symm_a2a rank {self.rank} is unusable after an earlier failure: {self._broken}")
        if self.layout is None:
            raise RuntimeError(f"symm_a2a rank {self.rank}: the workspace was destroyed; build a new backend")
        T = x.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"symm_a2a: {T} tokens on rank {self.rank} exceed max_tokens_per_rank={self.max_tokens}, "
                             "the size the workspace was built for; build the layer with a larger "
                             "comm_options['max_tokens_per_rank'] or split the batch")
        if x.dim() != 2 or x.shape[1] != self.cfg.hidden:
            raise ValueError(f"x must be [T, {self.cfg.hidden}], got {tuple(x.shape)}")
        if routing.ids.shape != (T, self.cfg.top_k):
            raise ValueError(f"routing must be [{T}, {self.cfg.top_k}], got {tuple(routing.ids.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device}, the symm_a2a workspace on {self.device}")
        if self.payload == "bf16" and x.dtype != self.dtype:
            raise ValueError(f"x is {x.dtype}, the workspace holds {self.dtype} rows; pass dtype= at construction")
        if self._open is not None:
            raise RuntimeError("symm_a2a: a dispatch started before the previous call's combine was waited for; "
                               "symm_a2a holds one call in flight (calls_in_flight = 1): finish each call's "
                               "combine (its wait) before the next dispatch")
        if routing.ids.device != self.device or routing.weights.device != self.device:
            raise ValueError(f"routing is on {routing.ids.device}, the symm_a2a workspace on {self.device}")
        if capturing(x) and self.input_scale is not None:
            raise ValueError("symm_a2a: input_scale cannot be captured in a CUDA graph yet (epmoe.quant checks a "
                             "static scale on the host); run these calls eagerly or drop input_scale")
        if routing.ids.numel() and not capturing(x):
            E = self.cfg.num_experts
            bad = (routing.ids < -1) | (routing.ids >= E)  # one host sync per eager call
            if bool(bad.any()):
                t, k = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"symm_a2a rank {self.rank}: routing ids outside [0, {E}) (token {t}, k {k}: id "
                                 f"{int(routing.ids[t, k])}; -1 marks a masked pair). Nothing was sent")

    def dispatch_start(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None
                       ) -> Pending[Dispatched]:
        """`dispatch_send` now; `.wait()` is `dispatch_recv`, the bounded wait for every source and
        the landed rows. max_tokens (the same on every rank): the experts get W * max_tokens * Kl
        pair slots, not W * Tm * Kl, so a decode call on a prefill-sized workspace costs what a
        decode workspace would. A peer that sent more tokens than the bound makes `check()` raise.
        Eager calls over ranks in separate processes agree first (comm/call_agreement.py: a rank
        whose checks fail raises its error and every peer PeerFailedError naming it, before any
        flag is written), so such a start waits for its peers to arrive; captured calls agree on
        nothing and wait for no peer. Virtual ranks in one process agree in the blocking
        `dispatch` only (a single thread may drive every rank's start in turn)."""
        if self._calls.active(x) and not self.in_process:
            self._agreed_send(x, routing, max_tokens)
        else:
            self.dispatch_send(x, routing, max_tokens)
        if self._phase_barrier():
            self.group.barrier()
        return Pending(self.dispatch_recv)

    def dispatch(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None) -> Dispatched:
        """The blocking call: `dispatch_start` then its wait; eager calls on several ranks agree
        first, virtual ranks in one process included (see `dispatch_start`)."""
        if not (self._calls.active(x) and self.in_process):
            return self.dispatch_start(x, routing, max_tokens).wait()
        self._agreed_send(x, routing, max_tokens)
        if self._phase_barrier():
            self.group.barrier()
        return self.dispatch_recv()

    def _agreed_send(self, x: torch.Tensor, routing: Routing, max_tokens: int | None) -> None:
        """This rank's checks, the call agreement (every rank goes ahead or every rank raises), then the send."""
        self._calls.run(lambda: (self._check_call(x, routing), self._bound(max_tokens, x)))
        self._send(x, routing, max_tokens)

    def combine_start(self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                      addend: torch.Tensor | None = None) -> Pending[torch.Tensor]:
        """`combine_send` now (partial sums stored, flags raised); `.wait()` is `combine_recv`
        (addend and out are read there), then `check()` on eager calls unless check_errors=False."""
        self.combine_send(expert_out, dispatched)
        if self._phase_barrier():
            self.group.barrier()
        return Pending(lambda: self._combine_wait(dispatched, out, addend))

    def _combine_wait(self, dispatched: Dispatched, out: torch.Tensor | None, addend: torch.Tensor | None
                      ) -> torch.Tensor:
        y = self.combine_recv(dispatched, out, addend=addend)
        if self.check_errors and not capturing(y):
            self.check()
        return y

    def fail(self, failure: BaseException, device: torch.device) -> NoReturn:
        """The layer's checks of a call failed on this rank: report it in the call's agreement (its
        peers raise PeerFailedError naming this rank), then raise it."""
        self._calls.fail(failure, device)

    def _phase_barrier(self) -> bool:
        """Virtual ranks on one GPU share one stream: a receive kernel spinning ahead of a peer's
        send would block it, so every rank's send is enqueued before any receive (the barrier
        ends each start, so a wait's kernel is always enqueued after every peer's send)."""
        return self.in_process and self.device.type == "cuda" and self.world > 1

    def dispatch_send(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None) -> SymmHandle:
        """Phase 1: rows, meta, count and flags into every peer; max_tokens: see `dispatch`. Eager
        calls check the routing ids on the host first (ValueError, nothing written); captured calls
        skip that, and the kernels treat an out-of-range id as masked (never out of bounds). The
        phases agree on nothing: a rank that fails here leaves its peers to time out naming it
        (the blocking `dispatch` agrees first)."""
        self._check_call(x, routing)
        return self._send(x, routing, max_tokens)

    def _bound(self, max_tokens: int | None, x: torch.Tensor) -> int:
        """The call's bound on every rank's T (a ValueError for a bad max_tokens)."""
        return call_bound(max_tokens, x.shape[0], self.max_tokens, f"symm_a2a rank {self.rank}")

    def _send(self, x: torch.Tensor, routing: Routing, max_tokens: int | None) -> SymmHandle:
        """dispatch_send on checked inputs."""
        bound = self._bound(max_tokens, x)
        seq = next_seq(self.seq)
        handle = SymmHandle(routing.ids, x.shape[0], x.dtype, seq, self._placement_dev, self.rank,
                            self.world, sum(self.layout.row_bytes), self.layout.row_bytes[0], self.slot_experts * 8,
                            self.cfg.hidden * self.combine_dtype.itemsize, bound)
        if self._impl == "torch":
            rows = encode_bytes(x, self.payload, self._scale_dev, backend="torch")
            meta = symm_ops.slot_meta(routing.ids, routing.weights, self._placement_dev, self.world, self.slot_experts)
            symm_ops.dispatch_send_torch(self.peers, self.rank, rows, meta, seq, self.max_tokens)
        else:
            self._triton_dispatch_send(x, routing)
        self._open = handle
        return handle

    def dispatch_recv(self) -> Dispatched:
        """Phase 2: wait for every source, hand the landed rows to the experts."""
        h = self._open
        if h is None:
            raise RuntimeError("symm_a2a: dispatch_recv without dispatch_send")
        row_ids, ids_buf = self._pair_lists(h.bound)
        if self._impl == "torch":
            try:
                expert_ids, over = symm_ops.dispatch_recv_torch(self.own, h.seq, self.timeout_s, self.rank, h.bound)
            except SymmTimeoutError as exc:
                self._broken, self._open = str(exc), None
                raise
            if over is not None:
                self._overflow = self._overflow_text(*over, h.bound)
        else:
            expert_ids = symm_ops.dispatch_recv(self._kernel_ws, ids_buf, h.bound)
        return Dispatched(hidden=self.received_rows(), row_ids=row_ids, expert_ids=expert_ids, handle=h,
                          expert_counts=count_experts(expert_ids, self.placement.local_experts))

    def _pair_lists(self, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_ids, expert-id buffer) [W * B * Kl] int32 of the pair list for bound B: pair
        (s, t, j) at (s * B + t) * Kl + j reads received row s * Tm + t. Built once per bound
        (a graph bucket's are built while it warms up, before capture)."""
        if bound not in self._pairs:
            W, Tm, Kl, dev = self.world, self.max_tokens, self.slot_experts, self.device
            slot = torch.arange(W * bound, dtype=torch.int32, device=dev)
            rows = (slot // max(bound, 1) * Tm + slot % max(bound, 1)).repeat_interleave(Kl)
            self._pairs[bound] = (rows, torch.full((W * bound * Kl,), -1, dtype=torch.int32, device=dev))
        return self._pairs[bound]

    def _overflow_text(self, source: int, count: int, bound: int | None) -> str:
        told = f"max_tokens={bound}" if bound is not None else "a smaller max_tokens"
        return (f"symm_a2a rank {self.rank}: rank {source} sent {count} tokens in a call this rank ran with {told}; "
                "the tokens past the bound were not computed, so that call's output is wrong. Every rank must pass "
                "the same max_tokens to dispatch, at least the largest T over ranks")

    def received_rows(self) -> Any:
        """[W * Tm, H] rows of the receive buffer (slot [s, t] is row s * Tm + t): a view of the
        workspace (a QuantizedTensor with per-row scales for quantized payloads). Valid only until
        this rank's combine_send raised its flags (a peer may then start its next dispatch and
        overwrite them): read or copy them before, as the expert stage does."""
        v = self.own
        return decode_bytes([v.data, v.scales, v.gscale], self.payload, self.cfg.hidden, self.dtype)

    def combine_send(self, expert_out: torch.Tensor, dispatched: Dispatched) -> None:
        """Phase 3 (expert rank): weighted partial sums into own buffer, flags to every home."""
        h: SymmHandle = dispatched.handle
        if h is not self._open:
            raise RuntimeError("symm_a2a: combine got a Dispatched that is not this backend's open call")
        M = self.world * h.bound * self.slot_experts
        if expert_out.shape != (M, self.cfg.hidden):
            raise ValueError(f"expert_out must be [{M}, {self.cfg.hidden}] (one row per pair), got "
                             f"{tuple(expert_out.shape)}")
        if self._impl == "torch":
            symm_ops.combine_send_torch(self.own, self.peers, self.rank, expert_out, h.seq, self.combine_mode == "push")
        else:
            self._triton_combine_send(expert_out, h.bound)

    def combine_recv(self, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                     addend: torch.Tensor | None = None) -> torch.Tensor:
        """Phase 4 (home rank): wait for every expert rank, add partial sums in rank order (then
        `addend` [T, H] fp32, before the one cast)."""
        h: SymmHandle = dispatched.handle
        T, H = h.num_tokens, self.cfg.hidden
        if out is not None and (out.shape != (T, H) or out.device != self.device):
            raise ValueError(f"out must be [{T}, {H}] on {self.device}, got {tuple(out.shape)} on {out.device}")
        if addend is not None:
            check_addend(addend, T, H, self.device, f"symm_a2a rank {self.rank}")
        try:
            if self._impl == "torch":
                acc = symm_ops.combine_recv_torch(self.own, self.peers, self.rank, h.ids, self._placement_dev, h.seq,
                                                  self.timeout_s, self.combine_mode == "push")
                y = finish(acc, h.dtype, out, addend, "symm_a2a")
            elif addend is None:
                y = symm_ops.combine_recv(self._kernel_ws, h.ids, self._placement_dev.expert_rank, out, h.dtype)
            else:  # the kernel casts as it stores: sum in fp32, add, then cast
                acc = symm_ops.combine_recv(self._kernel_ws, h.ids, self._placement_dev.expert_rank,
                                            torch.empty(T, H, dtype=torch.float32, device=self.device))
                y = finish(acc, h.dtype, out, addend, "symm_a2a")
        except SymmTimeoutError as exc:
            self._broken = str(exc)
            raise
        finally:
            self._open = None
        self.seq = h.seq
        return y

    def _triton_dispatch_send(self, x: torch.Tensor, routing: Routing) -> Any:
        """Quantize x (Triton quantizers on CUDA where they take the shape) and launch the send
        kernel; returns the launched kernel (its `.asm` holds the PTX)."""
        p = self._placement_dev
        return symm_ops.dispatch_send(self._kernel_ws, routing.ids, routing.weights, p.expert_rank, p.expert_local,
                                      encode_bytes(x, self.payload, self._scale_dev))

    def _triton_combine_send(self, expert_out: torch.Tensor, bound: int | None = None) -> Any:
        """Launch the combine-send kernel; returns the launched kernel (its `.asm` holds the PTX)."""
        return symm_ops.combine_send(self._kernel_ws, expert_out, bound)

    def after_replay(self) -> None:
        """After a CUDA-graph replay: read the error word as an eager combine does (unless
        check_errors=False); a wait inside the graph only records its timeout there."""
        if self.check_errors:
            self.check()

    def check(self) -> None:
        """Raise what an earlier call recorded: SymmTimeoutError for a timed-out wait (the backend
        stays broken), ValueError for a peer past the call's bound (a host sync on GPU)."""
        if self._broken:
            raise SymmTimeoutError(self._broken)
        if self.layout is None:
            return
        state = self._state.tolist() if self._impl == "triton" else [0] * 8
        if state[6]:
            self._state[6] = 0
            self._overflow = self._overflow_text(state[6] - 1, state[7], None)
        if self._overflow:
            msg, self._overflow = self._overflow, None
            raise ValueError(msg)
        if state[4]:
            W, silent = self.world, state[8:]
            silent_ranks = {name: [r for r in range(W) if silent[phase * W + r]]
                            for phase, name in enumerate(("dispatch", "combine"))}
            parts = [f"{name}: ranks {ranks} never signalled" for name, ranks in silent_ranks.items() if ranks]
            self._broken = (f"symm_a2a rank {self.rank}: a wait (sequence number {state[5]}) timed out after "
                            f"{self.timeout_s}s; {'; '.join(parts)} (they crashed, are slower than timeout_s, or "
                            "did not make this call)")
            raise SymmTimeoutError(self._broken)
