"""MoELayer: route -> dispatch -> experts -> combine (+ shared experts).

    routing = route(logits or x @ gate.T, cfg)             routing.py   (or the caller's routing)
    rows    = comm.dispatch(x, routing)                    comm/*       (comm="auto": comm/auto.py)
    out     = runner(rows)                                 experts/*
    y       = comm.combine(out, rows, addend=shared(x))    comm/*

With shared experts and shared_stream on, shared(x) runs beside dispatch -> experts on a side CUDA
stream (overlap.py), or on the CPU between dispatch's send half and its wait.

The layer only composes the stages. Which comm backend and runner run is decided once, at
construction, from the registries and select.py's table; CUDA graphs live in graphs.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn

from epmoe import eplb
from epmoe.agreement import agree_construction, token_code
from epmoe.comm import get_comm
from epmoe.comm.auto import AutoComm
from epmoe.comm.base import CommBackend, Dispatched, agree
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, get_runner
from epmoe.experts.activation import activate
from epmoe.graphs import LayerGraphs, capturing
from epmoe.group import Pending, Placement, RankGroup
from epmoe.ops.moe import moe_forward, register_layer
from epmoe.overlap import SideStream
from epmoe.routing import Routing, RoutingCapture, check_correction_bias, check_finite_logits, check_routing, route
from epmoe.select import LAYOUTS, Combo, ensure, pick_runner


def activation_dtype(weights: ExpertWeights) -> torch.dtype:
    """The activation dtype a layer over `weights` expects: the dtype of unquantized weights;
    for quantized weights bf16 on CUDA, fp32 elsewhere."""
    if isinstance(weights.w13, torch.Tensor):
        return weights.w13.dtype
    return torch.bfloat16 if weights.device.type == "cuda" else torch.float32


@dataclass
class SharedExperts:
    """The always-on shared expert MLP (all shared experts fused into one of width S).

    w13: [2S, H] gate rows then up rows; w2: [H, S]. Both matmuls run in fp32 when x or the
    weights are fp32, else in the weights' dtype (bf16 on GPUs: the tensor cores, as the model
    runs them; fp32 matmuls of DeepSeek-V3's shared expert took milliseconds at 4096 tokens);
    the activation in fp32; the result is fp32, into `out` [T, H] fp32 when given (the same bits:
    the last cast or matmul writes there; the layer's side stream passes a buffer of the current
    stream). A subclass's __call__ takes `out` alike.
    """

    w13: torch.Tensor
    w2: torch.Tensor

    def __call__(self, x: torch.Tensor, cfg: MoEConfig, out: torch.Tensor | None = None) -> torch.Tensor:
        dtype = torch.float32 if torch.float32 in (x.dtype, self.w13.dtype) else self.w13.dtype
        h = activate((x.to(dtype) @ self.w13.to(dtype).T).float(), cfg)  # [T, S] fp32
        if out is None:
            return (h.to(dtype) @ self.w2.to(dtype).T).float()  # [T, H] fp32
        if dtype == torch.float32:
            return torch.matmul(h, self.w2.float().T, out=out)
        return out.copy_(h.to(dtype) @ self.w2.to(dtype).T)

    @classmethod
    def random(
        cls, cfg: MoEConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> SharedExperts:
        S, H = cfg.shared_width, cfg.hidden
        w13 = torch.randn(2 * S, H, generator=generator) / H**0.5
        w2 = torch.randn(H, S, generator=generator) / S**0.5
        return cls(w13.to(device=device, dtype=dtype), w2.to(device=device, dtype=dtype))


class MoELayer(nn.Module):
    """One MoE layer on one expert-parallel rank.

    cfg:      shapes and routing.
    weights:  this rank's experts (`ExpertWeights`, local indices of `placement`; with `replicas`,
              this rank's slots: `replicas.rank_experts(rank)`).
    group:    the EP ranks (`EPGroup`, a `VirtualGroup` rank, or None for one rank).
    comm:     a registered comm backend's name (epmoe.comm.COMM_BACKENDS) or "auto": a composite
              that picks one of the backends fit for the layer per call by token count, from
              measured crossovers (comm/auto.py).
    runner:   a registered expert runner's name or "auto", the default: the highest-priority
              runner for the weights' device and format (select.pick_runner).
    layout:   "dp" (each rank its own tokens) or "tp" (every rank the same tokens).
    gate:     router weight [E, H] used when forward() gets neither logits nor routing:
              logits = x @ gate.T (+ gate_bias), computed in fp32.
    gate_bias: [E] router bias added to the gate's logits (GPT-OSS `router.bias`); needs gate.
    correction_bias: [E] fp32 for sigmoid_bias / sigmoid_grouped routing; must be finite.
    shared:   shared experts, added to the output of every token.
    capture:  a `RoutingCapture` that receives the ids of every call.
    replicas: a `ReplicaPlan` (epmoe/eplb.py): P >= E physical slots, P/W per rank, an expert
              possibly in several; instead of `placement`. Each call maps its routing ids to
              slots on the device (`ReplicaMap`: copy (t * W + rank) % copies of the expert),
              and every comm backend moves slots; outputs are those of the layer without copies
              (summation order aside). `rebalance(plan)` installs another plan in place,
              `without_ranks(lost, group)` rebuilds the layer over surviving ranks.
    load:     an `ExpertLoad` that counts each call's picks per logical expert on the device.
    comm_options: keyword options for the comm backend (fields of its `Options`, e.g.
              max_tokens_per_rank, payload). Under comm="auto" every key must be an option of at
              least one candidate, and each candidate gets the keys it has. Backends get the
              weights' device and `activation_dtype(weights)`, so those that pre-allocate do it at
              construction, not on the first forward.
    shared_stream: run the shared experts beside the exchange (dispatch -> experts, up to combine's
              wait): on a side CUDA stream forked before dispatch and joined before combine reads
              its addend (captured alike in CUDA graphs); on the CPU between dispatch's send half
              and its wait. None (default): on where the comm moves bytes (world > 1 and comm
              != "none"); True / False force it. Outputs are the same bits either way (the
              same ops on the same inputs, added inside combine as before).
    validate: True (default): each eager call reads its inputs' values on the host once (NaN /
              inf router logits; routed ids in range and distinct, finite weights) and raises a
              ValueError naming the problem. False: shapes and dtypes only, no device read, so an
              eager call never waits for the GPU; for trusted inputs (a model's own router, as
              `patch_model` passes). The correction bias is checked once, here. With the tp
              layout on several ranks, True also checks that every rank passes the same tokens
              (count and a hash of the inputs, one small exchange per call); False skips that
              check too, so tp ranks given other tokens are not told: other values give wrong
              outputs, another T fails the all-reduce (gloo aborts the process), as the
              caller's choice.

    Several ranks: construction agrees once (`agree_construction`: comm, layout, runner, options,
    config, weights' format and shapes, placement, validate, router tensors, shared experts'
    shapes), so ranks built differently all
    raise naming the difference. A rank whose own checks of a call fail reports it in the call's
    first exchange (the backend's `fail`), so its peers raise `PeerFailedError` naming it; what
    no exchange covers (a rank that skips a call or dies) ends in the group's bounded waits.
    """

    def __init__(
        self,
        cfg: MoEConfig,
        weights: ExpertWeights,
        group: RankGroup | None = None,
        comm: str = "none",
        runner: str = "auto",
        layout: str = "dp",
        placement: Placement | None = None,
        gate: torch.Tensor | None = None,
        gate_bias: torch.Tensor | None = None,
        correction_bias: torch.Tensor | None = None,
        shared: SharedExperts | None = None,
        capture: RoutingCapture | None = None,
        comm_options: dict[str, Any] | None = None,
        validate: bool = True,
        shared_stream: bool | None = None,
        replicas: eplb.ReplicaPlan | None = None,
        load: eplb.ExpertLoad | None = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.world = group.world if group is not None else 1
        self.calls = 0  # eager calls so far (named by errors and by the tp layout's token check)
        # Every rank checks its own arguments, then (world > 1) all agree once on what must be alike
        # (agree_construction): a rank whose checks failed reports it there, so every rank raises
        # instead of its peers waiting in the first collective.
        failure = None
        try:
            self.validate = bool(validate)
            if layout not in LAYOUTS:
                raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
            self.cfg = cfg
            self.layout = layout
            self.replicas = replicas
            if replicas is not None:
                self._check_replicas(replicas, placement, load)
                placement = replicas.placement()
            self.placement = placement or Placement.contiguous(cfg.num_experts, self.world)
            if self.placement.world != self.world or (
                    replicas is None and self.placement.num_experts != cfg.num_experts):
                raise ValueError(
                    f"placement covers {self.placement.num_experts} experts on {self.placement.world} "
                    f"ranks, layer has {cfg.num_experts} experts on {self.world} ranks"
                )
            weights.check(cfg, self.placement.local_experts)
            self.device = weights.device
            self.dtype = activation_dtype(weights)  # what x should be; backends size their rows by it
            if runner == "auto":
                runner = pick_runner(self.device.type, weights.format)
            runner_cls = get_runner(runner)  # unknown names fail here with the list of known ones
            # The combination without its comm fields; comm, payload and static_shapes come from the backend.
            self._base = Combo(
                runner=runner, weights=weights.format, layout=layout, world=self.world, device=self.device.type,
                nodes=group.nodes if group is not None else 1, routing=cfg.routing,
            )
            options = dict(comm_options or {})
            if comm != "auto":
                comm_cls = get_comm(comm)
                ensure(dataclasses.replace(self._base, comm=comm, payload=options.get("payload") or "bf16",
                                           static_shapes=bool(options.get("static_shapes", False))))
                comm_opts = comm_cls.make_options(**options)
            self._mode = cfg.routing  # the routing mode of the last call ("routed" or cfg.routing)
            self._check_routing_args(gate, gate_bias, correction_bias)
            self._check_shared(shared)
            if shared_stream not in (None, True, False):
                raise ValueError(f"shared_stream must be None (on where the comm moves bytes), True or False; "
                                 f"got {shared_stream!r}")
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the peers are told
            failure = exc
        agree_construction(self, cfg, weights, comm, runner, layout, comm_options, failure,
                           (gate, gate_bias, correction_bias), shared)
        setup = {"device": self.device, "dtype": self.dtype}
        # with replicas the backends move physical slots: P "experts" over the physical placement
        wire = eplb.physical_config(cfg, replicas.num_physical) if replicas is not None else cfg
        self._map = eplb.ReplicaMap(replicas, self.rank, layout, self.device) if replicas is not None else None
        self._rebuild = {"comm": comm, "runner": runner, "layout": layout, "comm_options": comm_options}
        # comm="auto": a composite holding every candidate, built once; it picks per call.
        self.auto: AutoComm | None = None
        if comm == "auto":
            self.auto = self._comm = AutoComm(wire, group, self.placement, options, combo=self._base, **setup)
        else:
            self._comm = comm_cls(wire, group, self.placement, comm_opts, **setup)
        self.graphs: LayerGraphs | None = None
        self.runner = runner_cls(cfg, weights)
        self.gate = gate
        self.gate_bias = gate_bias
        self.correction_bias = correction_bias
        self.shared = shared
        # the shared experts beside the exchange (overlap.py): a side stream on CUDA, built here (never in a capture)
        self.shared_stream = bool(comm != "none" and self.world > 1 if shared_stream is None else shared_stream)
        self._side = SideStream(self.device) if self.shared_stream and shared is not None else None
        self.capture = capture
        self.load = load
        self.op_id = register_layer(self)  # how torch.ops.epmoe.moe_forward finds this layer

    def _check_routing_args(self, gate: torch.Tensor | None, gate_bias: torch.Tensor | None,
                            correction_bias: torch.Tensor | None) -> None:
        cfg = self.cfg
        if cfg.uses_correction_bias and correction_bias is None:
            raise ValueError(f"routing {cfg.routing!r} needs correction_bias [E]")
        if correction_bias is not None:
            check_correction_bias(correction_bias, cfg.num_experts)
        if gate is not None and tuple(gate.shape) != (cfg.num_experts, cfg.hidden):
            raise ValueError(f"gate must be [{cfg.num_experts}, {cfg.hidden}], got {tuple(gate.shape)}")
        if gate_bias is not None:
            if gate is None:
                raise ValueError("gate_bias is added to the gate's logits; pass gate= as well")
            if not gate_bias.is_floating_point() or tuple(gate_bias.shape) != (cfg.num_experts,):
                raise ValueError(
                    f"gate_bias must be a float [{cfg.num_experts}] tensor, got {gate_bias.dtype} "
                    f"{tuple(gate_bias.shape)}"
                )

    def _check_replicas(self, plan: eplb.ReplicaPlan, placement: Placement | None,
                        load: eplb.ExpertLoad | None) -> None:
        cfg = self.cfg
        if placement is not None:
            raise ValueError("pass placement or replicas, not both: a ReplicaPlan places its slots itself "
                             "(slot p on rank p // (P/W))")
        if not isinstance(plan, eplb.ReplicaPlan):
            raise TypeError(f"replicas must be a ReplicaPlan (epmoe.eplb), got {type(plan).__name__}")
        if plan.num_experts != cfg.num_experts or plan.num_ranks != self.world:
            raise ValueError(f"replicas plan {plan.num_experts} experts on {plan.num_ranks} ranks, the layer has "
                             f"{cfg.num_experts} experts on {self.world} ranks")
        if load is not None and load.num_experts != cfg.num_experts:
            raise ValueError(f"load counts {load.num_experts} experts, the layer has {cfg.num_experts}")

    def _check_shared(self, shared: SharedExperts | None) -> None:
        cfg = self.cfg
        if cfg.shared_experts and shared is None:
            raise ValueError(f"cfg has {cfg.shared_experts} shared experts; pass shared=SharedExperts(...)")
        if shared is not None:
            S = cfg.shared_width
            if tuple(shared.w13.shape) != (2 * S, cfg.hidden) or tuple(shared.w2.shape) != (cfg.hidden, S):
                raise ValueError(
                    f"shared experts must be w13 [{2 * S}, {cfg.hidden}], w2 [{cfg.hidden}, {S}]; got "
                    f"{tuple(shared.w13.shape)}, {tuple(shared.w2.shape)}"
                )

    @classmethod
    def from_global(
        cls,
        cfg: MoEConfig,
        all_weights: ExpertWeights,
        group: RankGroup | None = None,
        **kwargs,
    ) -> MoELayer:
        """Build the layer of `group.rank` from weights of all E experts (slices its share)."""
        if all_weights.num_experts != cfg.num_experts:
            raise ValueError(
                f"all_weights holds {all_weights.num_experts} experts, cfg has num_experts={cfg.num_experts}; "
                "pass the weights of every expert of the layer (or build MoELayer with this rank's own)"
            )
        world = group.world if group is not None else 1
        rank = group.rank if group is not None else 0
        plan = kwargs.get("replicas")
        if plan is not None:  # this rank's slots; a plan that does not fit the group: the layer's check names it
            fits = isinstance(plan, eplb.ReplicaPlan) and plan.num_ranks == world
            return cls(cfg, all_weights.select(plan.rank_experts(rank)) if fits else all_weights, group=group, **kwargs)
        placement = kwargs.pop("placement", None) or Placement.contiguous(cfg.num_experts, world)
        local = placement.global_ids(rank)
        return cls(cfg, all_weights.select(local), group=group, placement=placement, **kwargs)

    def rebalance(self, plan: eplb.ReplicaPlan) -> eplb.Rebalanced:
        """Install `plan` (same E, P and W as the layer's `replicas`) in place; a collective: every
        rank calls it with the same plan, between layer calls. Each rank's slots are reordered to
        keep what it keeps (`align_plan`); only slots whose expert changes get weights, from the
        same rank where it holds that expert, else from a rank that held it (one all_to_all_v);
        then the routing map switches. Weights are written in place (the tensors the runner
        holds: captured CUDA graphs stay valid). Returns what moved; `.plan` is the new
        `self.replicas`."""
        if self.replicas is None or self._map is None:
            raise ValueError("this layer has no replica plan; build it with replicas=ReplicaPlan.contiguous(E, W) "
                             "(or a plan_replicas plan) to rebalance it")
        if self.group is not None:  # what a timeout of its exchanges names
            self.group.call = f"MoELayer {self.op_id} rebalance"
        done = eplb.move_expert_weights(self.runner.weights, self.replicas, plan, self.group)
        self._map.load(done.plan)
        self.replicas = done.plan
        return done

    def without_ranks(self, lost: Sequence[int], group: RankGroup | None) -> MoELayer:
        """This rank's layer rebuilt without the ranks `lost` (ranks of this layer's group).
        `group`: the survivors, numbered in their old order (e.g. `EPGroup(dist.new_group(survivors,
        use_local_synchronization=True))`; None for one survivor). Survivors keep their slots and
        weights (`surviving_plan`): where some expert has no copy on a survivor, every survivor
        raises `ExpertsLostError` listing them. The new layer has the same config, comm, runner,
        layout, router, shared experts, capture, load counters and checks, no CUDA graphs;
        `rebalance` it to spread the lost rank's load. This layer is not to be called again."""
        lost = sorted({int(r) for r in lost})
        plan = eplb.surviving_plan(self.replicas or eplb.ReplicaPlan.from_placement(self.placement), lost)
        survivors = [r for r in range(self.world) if r not in lost]
        rank, world = (group.rank, group.world) if group is not None else (0, 1)
        if self.rank in lost or world != len(survivors) or survivors[rank] != self.rank:
            raise ValueError(f"rank {self.rank} of {self.world} without ranks {lost}: the new group must hold the "
                             f"{len(survivors)} survivors {survivors} in their old order (survivor i as rank i); "
                             f"this rank is rank {rank} of {world} there")
        b = self._rebuild
        return MoELayer(self.cfg, self.runner.weights, group, comm=b["comm"], runner=b["runner"], layout=b["layout"],
                        gate=self.gate, gate_bias=self.gate_bias, correction_bias=self.correction_bias,
                        shared=self.shared, capture=self.capture, comm_options=b["comm_options"],
                        validate=self.validate, replicas=plan, load=self.load)

    @property
    def comm(self) -> CommBackend:
        """The comm backend of the last call (under comm="auto": before any call, auto's pick for
        one token)."""
        return self.auto.current if self.auto is not None else self._comm

    @property
    def comms(self) -> dict[str, CommBackend]:
        """name -> every comm backend the layer built (under comm="auto": its candidates)."""
        return self.auto.backends if self.auto is not None else {self._comm.name: self._comm}

    @property
    def combo(self) -> Combo:
        """The combination the layer runs (select.py's table): the backend of the last call and
        the payload it really moves."""
        return dataclasses.replace(self.combo_for(self.comm.name), routing=self._mode)

    def combo_for(self, name: str) -> Combo:
        """The combination of the layer on its backend `name` (one of `comms`)."""
        comm = self.comms[name]
        return dataclasses.replace(self._base, comm=name, payload=comm.payload, static_shapes=comm.static_shapes)

    def extra_repr(self) -> str:
        """Shapes, routing, comm (under auto: its candidates and the last pick), runner, layout,
        rank/world and the weights' format, e.g. `hidden=2048, intermediate=768, experts=128 (16 on
        this rank), top_k=8, ..., comm=auto (allgather/nccl_a2a/symm_a2a; last symm_a2a), payload=bf16,
        runner=triton, layout=dp, rank=0/world=8, weights=fp8_block, activations=bfloat16, device=cuda:0`."""
        cfg = self.cfg
        comm = f"auto ({'/'.join(self.comms)}; last {self.comm.name})" if self.auto is not None else self.comm.name
        shared = f", shared={cfg.shared_experts}x{cfg.shared_width // cfg.shared_experts}" if cfg.shared_experts else ""
        slots = (f"{self.placement.local_experts} on this rank" if self.replicas is None else
                 f"{self.replicas.num_physical} slots, {self.placement.local_experts} on this rank")
        return (f"hidden={cfg.hidden}, intermediate={cfg.intermediate}, experts={cfg.num_experts} "
                f"({slots}), top_k={cfg.top_k}, routing={cfg.routing}, "
                f"activation={cfg.activation}{shared}, comm={comm}, payload={self.comm.payload}, "
                f"runner={self._base.runner}, layout={self.layout}, rank={self.rank}/world={self.world}, "
                f"weights={self._base.weights}, activations={str(self.dtype).removeprefix('torch.')}, "
                f"device={self.device}")

    def capture_graphs(self, max_tokens: int, buckets: list[int] | None = None, routed: bool = False,
                       validate: bool = True, lazy: bool = False, pool: tuple[int, int] | None = None
                       ) -> list[int]:
        """Capture route -> dispatch -> experts -> combine in CUDA graphs, one per token bucket
        (graphs.py `LayerGraphs`).

        Later forward() calls on CUDA with T <= max_tokens replay the graph of the smallest
        bucket >= T: the inputs are copied into static buffers and rows past T are padding,
        routed nowhere (expert id -1: no expert computes them, no comm moves them) and cut off the
        output; the routing capture (if any) reports T.

        routed:   False: the graphs take router logits (or the layer's gate); True: they take
                  `routing=` (routed mode, e.g. RL routing replay). Calls of the other mode, and
                  larger T, run eagerly.
        validate: replays check their inputs on the host as eager calls do (finite logits; routing
                  ids in range, distinct, finite weights): one device-to-host read per call; with
                  several ranks every rank then takes part in one small exchange before any
                  replays, so a rank whose inputs fail raises and its peers raise PeerFailedError
                  naming it (tp: the token check of eager calls). Pass False where the inputs
                  are trusted, so a replay never waits for the GPU: then nothing is checked or
                  exchanged, and a rank's bad input is the caller's to catch.

        comm="auto" captures each bucket with the backend auto picks for it among the capturable
        ones; with several ranks, each call agrees on the largest T over ranks first (one small
        exchange, as eager auto calls do), so every rank replays the same bucket and backend.
        Buckets default to powers of two up to max_tokens. Returns the buckets. select.py's table
        must allow graph=True (no host-sync comm or runner; a backend with static_shapes=True).

        lazy:     capture each power-of-two bucket when a call first needs it (one rank only), so
                  a model's eager calls turn into replays with no capture step up front; pool: a
                  `torch.cuda.graph_pool_handle()` the lazy graphs of several layers share (one
                  stream, one call at a time: see `LayerGraphs.lazy`).
        """
        if lazy:
            if buckets is not None:
                raise ValueError("lazy graphs use power-of-two buckets up to max_tokens; pass buckets=None")
            self.graphs = LayerGraphs.lazy(self, max_tokens, routed, validate, pool)
        else:
            self.graphs = LayerGraphs.capture(self, max_tokens, buckets, routed, validate)
        return self.graphs.buckets

    def forward(
        self,
        x: torch.Tensor,
        router_logits: torch.Tensor | None = None,
        routing: Routing | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> y [T, H] in x's dtype.

        Routing comes from `routing` (routed mode), else from `router_logits` [T, E], else
        from the layer's `gate` (+ `gate_bias`). After `capture_graphs`, calls of the captured
        mode that fit a bucket replay a graph.
        """
        if torch.compiler.is_compiling():
            self._check_inputs(x, router_logits, routing)
            # torch.compile traces one opaque op: token counts, routing and the backend's choices stay
            # inside it, so the traced graph has no data-dependent guard and no break (ops/moe.py)
            if routing is None and router_logits is None:
                router_logits = self._gate_logits(x)
            ids, weights = (routing.ids, routing.weights) if routing is not None else (None, None)
            return moe_forward(x, router_logits, ids, weights, self.op_id)
        try:
            self._check_inputs(x, router_logits, routing)
        except Exception as exc:  # noqa: BLE001 - the peers are told first
            device = x.device if isinstance(x, torch.Tensor) else self.device
            self._start_call()  # the call its peers make: counted alike on every rank
            # with graphs, the peers' calls of the captured mode replay: their exchange is the replay's
            self._fail(exc, device, replay=self.graphs is not None and (routing is not None) == self.graphs.routed)
        return self.forward_eager(x, router_logits, routing)

    def _start_call(self) -> None:
        """Count an eager call (its number is agreed by the tp check and named by errors) and
        name it on the group, whose collectives name it when they time out."""
        # per-call counters skip nn.Module.__setattr__ (a few us each): they are plain ints
        object.__setattr__(self, "calls", self.calls + 1)
        if self.group is not None:
            self.group.call = f"MoELayer {self.op_id} call {self.calls}"

    def _fail(self, failure: BaseException, device: torch.device, tp_check: bool | None = None,
              replay: bool = False) -> NoReturn:
        """This rank failed its own checks of a call: report it in the exchange its peers enter
        first (the tp token check when it runs; with graphs (`replay`: a call that may replay on
        the peers) the replay's exchange unless comm="auto" agrees on T first; else the comm
        backend's agreement: `fail`), so every rank raises (the peers `PeerFailedError` naming
        this rank), then raise it."""
        if tp_check is None:
            tp_check = self._tp_check(device)
        if tp_check:
            self._agree_tokens_tp(None, None, None, failure, device)
        if replay and self.graphs is not None and self.graphs.agrees() and (
                self.auto is None or self.auto.ladder is None):
            self.graphs.fail(failure)
        self._comm.fail(failure, device)

    def _tp_check(self, device: torch.device) -> bool:
        """Whether eager calls check that every rank passes the same tokens (tp layout, several
        ranks, validate=True; never while a CUDA graph is captured)."""
        return (self.layout == "tp" and self.world > 1 and self.validate
                and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))

    def _agree_tokens_tp(self, x: torch.Tensor | None, logits: torch.Tensor | None, routing: Routing | None,
                         failure: BaseException | None, device: torch.device) -> None:
        """The tp layout's check (validate=True): one `agree` of this call's number, token count
        and a hash of its inputs (`token_code`); a ValueError on every rank naming the ranks whose
        tokens differ from rank 0's (a tp layer needs the same tokens on every rank), or the
        failure a rank reports."""
        T = x.shape[0] if x is not None else 0
        code = token_code(x, logits, routing) if x is not None and failure is None else 0

        def report(table: list[list[int]]) -> list[str]:
            differ = [r for r, (t, c) in enumerate(table) if (t, c) != tuple(table[0])]
            if not differ:
                return []
            counts = ", ".join(f"rank {r}: T={t}" for r, (t, _) in enumerate(table))
            same = "; same T, other values" if all(t == table[0][0] for t, _ in table) else ""
            return [f"ranks {differ} pass other tokens than rank 0 ({counts}{same})"]

        agree(self.group, f"MoELayer (tp) on rank {self.rank}, call {self.calls}", {"call number": self.calls},
              [T, code], device=device, report=report, failure=failure,
              fix="With layout='tp' every rank passes the same x and router logits (or routing)")

    def forward_eager(self, x: torch.Tensor, router_logits: torch.Tensor | None, routing: Routing | None
                      ) -> torch.Tensor:
        """One call on shape-checked inputs: a graph replay where one serves it, else the eager stages
        (what `forward` and the custom op run)."""
        object.__setattr__(self, "_mode", "routed" if routing is not None else self.cfg.routing)
        tokens = None  # under comm="auto", the largest T over ranks once agreed
        if self.graphs is not None and self.graphs.serves(x, routing):
            tokens = self.auto.agree_tokens(x) if self.auto is not None else None
            bucket = self.graphs.bucket(tokens if tokens is not None else x.shape[0])
            if bucket is not None:
                if routing is None and router_logits is None:
                    router_logits = self._gate_logits(x)
                return self.graphs.replay(x, router_logits, routing, bucket)
        return self._eager(x, router_logits, routing, tokens=tokens)

    def _check_inputs(self, x: torch.Tensor, logits: torch.Tensor | None, routing: Routing | None) -> None:
        """The one validation pass of a call: shapes and dtypes (contents: route / check_routing)."""
        cfg = self.cfg
        if x.dim() != 2 or x.shape[1] != cfg.hidden:
            raise ValueError(f"x must be [T, {cfg.hidden}], got {tuple(x.shape)}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
        E, T = cfg.num_experts, x.shape[0]
        if logits is not None:
            if logits.dim() != 2 or logits.shape[0] != T or logits.shape[1] != E:
                raise ValueError(
                    f"router_logits must be [T, E] = [{T}, {E}] for x of shape {tuple(x.shape)} and "
                    f"{E} experts, got {tuple(logits.shape)}"
                )
            if routing is not None:
                raise ValueError("pass router_logits or routing, not both")
        if routing is not None and routing.ids.shape != (T, cfg.top_k):
            raise ValueError(
                f"routing must be [{T}, {cfg.top_k}] for x of {T} tokens, got {tuple(routing.ids.shape)}"
            )

    def _gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] fp32 from the layer's gate: x @ gate.T + gate_bias."""
        if self.gate is None:
            raise ValueError("pass router_logits or routing, or build the layer with gate=")
        logits = x.float() @ self.gate.float().T  # [T, E]
        if self.gate_bias is not None:
            logits = logits + self.gate_bias.float()
        return logits

    def _eager(
        self, x: torch.Tensor, router_logits: torch.Tensor | None, routing: Routing | None, *,
        tokens: int | None = None, num_valid: torch.Tensor | None = None, check: bool | None = None,
    ) -> torch.Tensor:
        """One call without replay, on checked inputs. tokens: the largest T over ranks when
        already agreed (comm="auto"); num_valid: a graph bucket's device count of real rows (rows
        at or past it are routed nowhere, ids -1); check: read the inputs' values on the host once
        (default: the layer's `validate`; never inside a capture)."""
        fork = self._side.fork(x) if self._side is not None else None  # before routing: shared(x) needs none
        routing = self._route(x, router_logits, routing, num_valid, check)
        # dispatch's bound on every rank's T: T on one rank, the agreed one under auto (which
        # agrees itself when given none), none for a fixed backend over several ranks
        bound = x.shape[0] if self.world == 1 else tokens
        if self._side is not None:
            return self._shared_beside(x, routing, bound, fork)
        dispatched = self._comm.dispatch(x, routing, max_tokens=bound)
        expert_out = self.runner(dispatched)
        # Shared experts [T, H] fp32 are added to the routed fp32 sum inside combine, before its one cast.
        shared = self.shared(x, self.cfg) if self.shared is not None else None
        return self._comm.combine(expert_out, dispatched, addend=shared)

    def _shared_beside(self, x: torch.Tensor, routing: Routing, bound: int | None,
                       fork: torch.cuda.Event | None) -> torch.Tensor:
        """`_eager`'s stages with the shared experts beside the exchange (shared_stream):

            rows  = comm.dispatch_start(x, routing)          launched first
            add   = shared(x) on the side stream after fork   (CPU: here, while the rows travel)
            out   = runner(rows.wait())
            y     = comm.combine_start(out, rows, addend=add)
            join (the current stream waits for the side stream), y.wait() reads add

        Every split-phase backend reads the addend in its wait; otherwise the join comes before
        combine_start. `add` is allocated here, on the current stream, and the shared experts'
        last step writes into it (overlap.py: memory)."""
        rows = self._comm.dispatch_start(x, routing, max_tokens=bound)
        into = None if fork is None else torch.empty(x.shape[0], self.cfg.hidden, dtype=torch.float32,
                                                     device=x.device)  # [T, H] fp32
        addend = self._side.run(fork, lambda out: self.shared(x, self.cfg, out=out), into)
        dispatched = rows.wait()
        expert_out = self.runner(dispatched)
        split = all(c.split_phase for c in self.comms.values())
        if not split:
            self._side.join(x)
        y = self._comm.combine_start(expert_out, dispatched, addend=addend)
        if split:
            self._side.join(x)
        return y.wait()

    def _route(self, x: torch.Tensor, router_logits: torch.Tensor | None, routing: Routing | None,
               num_valid: torch.Tensor | None = None, check: bool | None = None) -> Routing:
        """A call's routing (`_eager`'s arguments): counted, checked (a failure is reported to the
        peers first), the tp token check, recorded by the capture."""
        cfg = self.cfg
        check = (self.validate if check is None else check) and not capturing(x)
        self._start_call()
        tp_check = check and self._tp_check(x.device)
        given_logits, given_routing = router_logits, routing
        try:  # this rank's own work and checks before any exchange: a failure is reported to the peers
            if routing is None:
                if router_logits is None:
                    router_logits = self._gate_logits(x)
                if check:
                    check_finite_logits(router_logits)
                # values checked above (logits) and at construction (bias): route reads nothing on the host
                routing = route(router_logits, cfg, self.correction_bias, num_valid=num_valid, check_values=False)
            elif check:
                check_routing(routing, cfg.num_experts)
        except Exception as exc:  # noqa: BLE001 - re-raised by _fail after the peers are told
            self._fail(exc, x.device, tp_check)
        if tp_check:
            self._agree_tokens_tp(x, given_logits, given_routing, None, x.device)
        if self.capture is not None:
            self.capture.record(routing)
        if self.load is not None:
            self.load.record(routing.ids)
        if self._map is not None:  # logical experts -> physical slots (capture and load saw the logical ids)
            routing = Routing(self._map(routing.ids), routing.weights)
        return routing

    def forward_microbatches(self, x: torch.Tensor, router_logits: torch.Tensor | None = None,
                             routing: Routing | None = None, splits: int = 2) -> torch.Tensor:
        """`forward` with the tokens cut into `splits` micro-batches (torch.tensor_split) whose
        exchanges overlap the other micro-batches' compute (two-batch overlap, eager stages):

            routing = route(x)  once, checked as forward checks it
            for b:  rows[b] = comm.dispatch_start(x[b], routing[b])        every dispatch posted
            shared  = shared_experts(x)                                    while they travel (on the side
                                                                           stream where shared_stream is on)
            for b:  out = runner(rows[b].wait());  y[b] = comm.combine_start(out, rows[b], addend=shared[b])
            y       = cat(y[b].wait() for b)                               (after joining the side stream)

        Each token's rows and fp32 sums (k order, then rank order) are those of the plain call, so
        y equals forward's bit for bit where the payload's scales are per token or static (bf16,
        fp8_block, or input_scale; fp8 / nvfp4 batch scales are each micro-batch's own) and the
        runner's rows do not depend on how many it gets (MKL's CPU GEMM rows do: a 1..5-row product
        differed in the last bits from the same rows of a 40-row one). Every rank calls it alike,
        with the same splits (each micro-batch is a comm call). Where a backend (under
        comm="auto": a candidate) has no split phases or holds one call in flight (symm_a2a), the
        micro-batches run one after another (the shared experts, on the side stream, beside the
        first one's exchange)."""
        try:
            self._check_inputs(x, router_logits, routing)
            if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
                raise ValueError(f"splits must be a positive int, the same on every rank; got {splits!r}")
        except Exception as exc:  # noqa: BLE001 - the peers are told first
            self._start_call()
            self._fail(exc, x.device if isinstance(x, torch.Tensor) else self.device)
        object.__setattr__(self, "_mode", "routed" if routing is not None else self.cfg.routing)
        fork = self._side.fork(x) if self._side is not None else None  # before routing: shared(x) needs none
        routing = self._route(x, router_logits, routing)
        parts = zip(*(t.tensor_split(splits) for t in (x, routing.ids, routing.weights)))

        def shared() -> list[torch.Tensor | None]:  # [T_b, H] fp32 slices of one call on all of x
            if self.shared is None:
                return [None] * splits
            if self._side is None:
                return list(self.shared(x, self.cfg).tensor_split(splits))
            # on the side stream, into [T, H] fp32 allocated on the current stream (overlap.py: memory)
            into = None if fork is None else torch.empty(x.shape[0], self.cfg.hidden, dtype=torch.float32,
                                                         device=x.device)
            return list(self._side.run(fork, lambda out: self.shared(x, self.cfg, out=out), into).tensor_split(splits))

        join = self._side.join if self._side is not None else lambda x: None  # before any addend is read

        def finish(rows: Pending[Dispatched], addend: torch.Tensor | None) -> Pending[torch.Tensor]:
            d = rows.wait()
            return self._comm.combine_start(self.runner(d), d, addend=addend)

        # without split phases, or with one call in flight at a time (symm_a2a), each runs whole, in turn
        split = all(c.split_phase for c in self.comms.values())  # a split backend reads the addend in its wait
        overlap = split and all(c.calls_in_flight is None for c in self.comms.values())
        addends: list[torch.Tensor | None] = []
        rows, ys = [], []
        for b, (xb, ids, w) in enumerate(parts):
            rows.append(self._comm.dispatch_start(xb, Routing(ids, w), max_tokens=xb.shape[0] if self.world == 1
                                                  else None))
            if not overlap:
                if b == 0:
                    addends = shared()  # beside the first micro-batch's exchange
                if not split:
                    join(x)
                ys.append(finish(rows[b], addends[b]))
                join(x)
                ys[-1].wait()  # the call's combine finished before the next dispatch starts
        if overlap:
            addends = shared()
            ys = [finish(r, a) for r, a in zip(rows, addends)]
            join(x)
        return torch.cat([y.wait() for y in ys])
