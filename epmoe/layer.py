"""MoELayer: route -> dispatch -> experts -> combine (+ shared experts).

The layer only composes the stages; which comm backend and runner run is decided once, at
construction, from the registries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from epmoe.comm import get_comm
from epmoe.comm.base import CommBackend
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, get_runner
from epmoe.experts.activation import activate
from epmoe.group import Placement, RankGroup
from epmoe.routing import Routing, RoutingCapture, check_correction_bias, check_routing, route
from epmoe.select import Combo, check, comm_candidates, comm_capacity, crossovers, ensure, pick_comm, pick_runner

LAYOUTS = ("dp", "tp")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on x's device (host reads are then illegal)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


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
    the activation in fp32; the result is fp32.
    """

    w13: torch.Tensor
    w2: torch.Tensor

    def __call__(self, x: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
        dtype = torch.float32 if torch.float32 in (x.dtype, self.w13.dtype) else self.w13.dtype
        h = activate((x.to(dtype) @ self.w13.to(dtype).T).float(), cfg)  # [T, S] fp32
        return (h.to(dtype) @ self.w2.to(dtype).T).float()  # [T, H] fp32

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
    weights:  this rank's experts (`ExpertWeights`, local indices of `placement`).
    group:    the EP ranks (`EPGroup`, a `VirtualGroup` rank, or None for one rank).
    comm:     comm backend name ("none", "allgather", "nccl_a2a", "symm_a2a") or "auto" (picks
              per call by token count from measured crossovers, see select.py).
    runner:   expert runner name ("reference", "triton") or "auto", the default: the fastest
              runner for the weights' device and format (select.pick_runner: triton on CUDA,
              reference on the CPU).
    layout:   "dp" (each rank its own tokens) or "tp" (every rank the same tokens).
    gate:     router weight [E, H] used when forward() gets neither logits nor routing:
              logits = x @ gate.T (+ gate_bias), computed in fp32.
    gate_bias: [E] router bias added to the gate's logits (GPT-OSS `router.bias`); needs gate.
    correction_bias: [E] fp32 for sigmoid_bias / sigmoid_grouped routing; must be finite.
    shared:   shared experts, added to the output of every token.
    capture:  a `RoutingCapture` that receives the ids of every call.
    comm_options: keyword options for the comm backend (e.g. max_tokens_per_rank, payload).
              Backends whose constructor takes `device` / `dtype` (symm_a2a) get the weights'
              device and `activation_dtype(weights)` unless given here, so they allocate their
              workspace at construction, not on the first forward.
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
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        world = group.world if group is not None else 1
        self.cfg = cfg
        self.layout = layout
        self.placement = placement or Placement.contiguous(cfg.num_experts, world)
        if self.placement.world != world or self.placement.num_experts != cfg.num_experts:
            raise ValueError(
                f"placement covers {self.placement.num_experts} experts on {self.placement.world} "
                f"ranks, layer has {cfg.num_experts} experts on {world} ranks"
            )
        weights.check(cfg, self.placement.local_experts)
        options = dict(comm_options or {})
        device = weights.device.type
        if runner == "auto":
            runner = pick_runner(device, weights.format)
        get_runner(runner)  # unknown names fail here with the list of known ones
        base = Combo(
            comm="none", runner=runner, payload=options.get("payload") or "bf16", weights=weights.format,
            layout=layout, world=world, device=device, nodes=getattr(group, "nodes", 1), routing=cfg.routing,
            static_shapes=bool(options.get("static_shapes", False)),
        )
        if comm == "auto":
            # One rank or the tp layout moves nothing: "none". Otherwise every dp backend that fits.
            local = world == 1 or layout == "tp"
            names = ["none"] if local else [n for n in comm_candidates(base) if n != "none"]
            if not names:
                ensure(base)  # raises with the reason and the alternatives
        else:
            get_comm(comm)
            ensure(dataclasses.replace(base, comm=comm))
            names = [comm]
        self._base = base
        self._mode = cfg.routing  # the routing mode of the last call ("routed" or cfg.routing)
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
        if cfg.shared_experts and shared is None:
            raise ValueError(f"cfg has {cfg.shared_experts} shared experts; pass shared=SharedExperts(...)")
        if shared is not None:
            S = cfg.shared_width
            if tuple(shared.w13.shape) != (2 * S, cfg.hidden) or tuple(shared.w2.shape) != (cfg.hidden, S):
                raise ValueError(
                    f"shared experts must be w13 [{2 * S}, {cfg.hidden}], w2 [{cfg.hidden}, {S}]; got "
                    f"{tuple(shared.w13.shape)}, {tuple(shared.w2.shape)}"
                )
        self.group = group
        # comm="auto" builds every candidate once and picks per call by token count.
        self.comms: dict[str, CommBackend] = {}
        for n in names:
            cls = get_comm(n)
            own = options if comm != "auto" else {k: v for k, v in options.items()
                                                  if k in {f.name for f in dataclasses.fields(cls.Options)}}
            self.comms[n] = cls(cfg, group, self.placement, cls.make_options(**own), device=weights.device,
                                dtype=activation_dtype(weights))
        self._ladder = crossovers(_device_name(weights.device), world)[0] if len(names) > 1 else None
        self._capacities = {n: comm_capacity(c) for n, c in self.comms.items()}  # auto skips what cannot hold T
        # Before any call, auto reports its pick for one token; after, the backend of the last call.
        first = pick_comm(1, names, self._ladder, self._capacities) if self._ladder else names[0]
        self.comm: CommBackend = self.comms[first]
        self._graph_names: list[str] | None = None  # while capturing graphs: the backends a graph may hold
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, CommBackend]] = {}
        self.runner = get_runner(runner)(cfg, weights)
        self.gate = gate
        self.gate_bias = gate_bias
        self.correction_bias = correction_bias
        self.shared = shared
        self.capture = capture

    @classmethod
    def from_global(
        cls,
        cfg: MoEConfig,
        all_weights: ExpertWeights,
        group: RankGroup | None = None,
        **kwargs,
    ) -> MoELayer:
        """Build the layer of `group.rank` from weights of all E experts (slices its share)."""
        world = group.world if group is not None else 1
        placement = kwargs.pop("placement", None) or Placement.contiguous(cfg.num_experts, world)
        rank = group.rank if group is not None else 0
        local = placement.global_ids(rank)
        return cls(cfg, all_weights.select(local), group=group, placement=placement, **kwargs)

    @property
    def combo(self) -> Combo:
        """The combination the layer runs (select.py's table); under comm="auto" the backend of
        the last call, before any call the one auto picks for one token."""
        static = self._base.static_shapes and bool(getattr(self.comm, "static_shapes", False))
        return dataclasses.replace(self._base, comm=self.comm.name, static_shapes=static, routing=self._mode)

    def _combo_of(self, name: str) -> Combo:
        comm = self.comms[name]
        return dataclasses.replace(self._base, comm=name, static_shapes=bool(getattr(comm, "static_shapes", False)))

    def capture_graphs(self, max_tokens: int, buckets: list[int] | None = None, routed: bool = False,
                       validate: bool = True) -> list[int]:
        """Capture route -> dispatch -> experts -> combine in CUDA graphs, one per token bucket.

        Later forward() calls on CUDA with T <= max_tokens replay the graph of the smallest
        bucket >= T: the inputs are copied into static buffers and rows past T are padding,
        routed nowhere (expert id -1: no expert computes them, no comm moves them) and cut off the
        output; the routing capture (if any) reports T.

        routed:   False: the graphs take router logits (or the layer's gate); True: they take
                  `routing=` (routed mode, e.g. RL routing replay). Calls of the other mode, and
                  larger T, run eagerly.
        validate: replays check their inputs on the host as eager calls do (finite logits; routing
                  ids in range, distinct, finite weights): one device-to-host read per call. Pass
                  False where the inputs are trusted, so a replay never waits for the GPU.

        comm="auto" captures each bucket with the backend auto picks for it among the capturable
        ones; with several ranks, each call agrees on the largest T over ranks first (one small
        exchange, as eager auto calls do), so every rank replays the same bucket and backend.
        Buckets default to powers of two up to max_tokens. Returns the buckets. select.py's table
        must allow graph=True (no host-sync comm or runner; allgather / nccl_a2a with
        static_shapes=True).
        """
        if self.group is not None and self.group.world > 1 and getattr(self.group, "virtual", False):
            raise ValueError(
                "virtual ranks share one device and exchange through host threads, so a CUDA graph cannot "
                "hold their communication; capture with one process per GPU (EPGroup) or a world-1 layer"
            )
        device = self.runner.weights.device
        if device.type != "cuda":
            raise ValueError("capture_graphs needs the layer's weights on a CUDA device")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        names = list(self.comms)
        if self._ladder is not None:
            names = [n for n in names if check(dataclasses.replace(self._combo_of(n), graph=True))[0]]
            if not names:
                ensure(dataclasses.replace(self.combo, graph=True))  # raises with the reason
        else:
            ensure(dataclasses.replace(self.combo, graph=True))
        buckets = sorted(set(buckets or [min(2**i, max_tokens) for i in range(max_tokens.bit_length() + 1)]))
        if buckets[-1] < max_tokens or buckets[0] <= 0:
            raise ValueError(f"buckets {buckets} must be positive and reach max_tokens={max_tokens}")
        dtype = activation_dtype(self.runner.weights)
        top, K = buckets[-1], self.cfg.top_k
        self._graph_x = torch.zeros(top, self.cfg.hidden, dtype=dtype, device=device)
        self._graph_logits = torch.zeros(top, self.cfg.num_experts, dtype=torch.float32, device=device)
        # routed mode: distinct valid ids for the warm-up calls; replays overwrite them
        self._graph_ids = torch.arange(K, dtype=torch.int32, device=device).repeat(top, 1)  # [top, K]
        self._graph_w = torch.zeros(top, K, dtype=torch.float32, device=device)
        self._graph_valid = torch.zeros((), dtype=torch.int32, device=device)  # rows < it are real
        self._graph_routed, self._graph_validate = routed, validate
        self._graphs = {}

        def body(b: int) -> torch.Tensor:
            if routed:
                return self._eager(self._graph_x[:b], None, Routing(self._graph_ids[:b], self._graph_w[:b]),
                                   check=False)
            return self._eager(self._graph_x[:b], self._graph_logits[:b], None)

        self._graph_names = names
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for b in buckets:  # warm up every shape outside the graph (allocations, autotuning)
                    self._graph_valid.fill_(b)
                    body(b)
            torch.cuda.current_stream(device).wait_stream(stream)
            pool = None
            graphs = {}
            for b in reversed(buckets):  # largest first, so smaller graphs reuse its memory pool
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = body(b)
                pool = g.pool()
                graphs[b] = (g, out, self.comm)
            torch.cuda.synchronize(device)
        finally:
            self._graph_names = None
        self._graphs = graphs
        return buckets

    def _stage(self, x: torch.Tensor, logits: torch.Tensor | None, routing: Routing | None, bucket: int
               ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, CommBackend]:
        """Copy one call's inputs into the static buffers of the graphs; returns the bucket's
        (graph, output rows, comm backend)."""
        T = x.shape[0]
        self._graph_x[:T].copy_(x)
        if routing is not None:
            self._graph_ids[:T].copy_(routing.ids)
            self._graph_ids[T:bucket].fill_(-1)
            self._graph_w[:T].copy_(routing.weights)
        else:
            self._graph_logits[:T].copy_(logits)
        self._graph_valid.fill_(T)
        return self._graphs[bucket]

    def _replay(self, x: torch.Tensor, logits: torch.Tensor | None, routing: Routing | None, bucket: int
                ) -> torch.Tensor:
        T = x.shape[0]
        if self._graph_validate:
            if routing is not None:
                check_routing(routing, self.cfg.num_experts)
            elif logits.numel() and not bool(torch.isfinite(logits).all()):
                raise ValueError("router_logits contain NaN or inf; check the router input")
        graph, out, comm = self._stage(x, logits, routing, bucket)
        graph.replay()
        self.comm = comm
        # A bounded wait inside the graph (symm_a2a) only records a timeout in the backend's error
        # word; read it here, as an eager combine does, unless the caller opted out.
        check_errors = getattr(comm, "check", None)
        if callable(check_errors) and getattr(comm, "check_errors", True):
            check_errors()
        if self.capture is not None:
            self.capture.num_tokens = T
            self.capture.num_tokens_dev.fill_(T)
        return out[:T].clone()

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
        self._check_x(x)
        if router_logits is not None:
            self._check_logits(x, router_logits)
            if routing is not None:
                raise ValueError("pass router_logits or routing, not both")
        if routing is not None:
            self._check_routing_shape(x, routing)
        self._mode = "routed" if routing is not None else self.cfg.routing
        tokens = None
        if self._graphs and x.is_cuda and not _capturing(x) and (routing is not None) == self._graph_routed:
            tokens = self._agreed_tokens(x.shape[0])
            if tokens <= max(self._graphs):
                if routing is None and router_logits is None:
                    router_logits = self._gate_logits(x)
                bucket = min(b for b in self._graphs if b >= tokens)
                return self._replay(x, router_logits, routing, bucket)
        return self._eager(x, router_logits, routing, tokens=tokens)

    def _agreed_tokens(self, tokens: int) -> int:
        """The token count that picks the backend: under comm="auto" with several ranks, the largest
        T over ranks (one small exchange, so every rank picks the same one); otherwise T."""
        if self._ladder is None or self.group is None or self.group.world <= 1:
            return tokens
        device = self.runner.weights.device
        return max(t for (t,) in self.group.all_gather_ints([tokens], device=device))

    def _pick_comm(self, x: torch.Tensor, tokens: int | None = None) -> tuple[CommBackend, int | None]:
        """The backend for this call: fixed, or by the largest token count over ranks (auto),
        and the bound on every rank's T that the ranks agree on for this call (None where they
        do not: a fixed backend over several ranks), which dispatch uses to size the experts'
        pair list (symm_a2a).

        Every rank must pick the same backend, so auto agrees on max(T) with one small
        exchange (or takes `tokens`, already agreed); while graphs are captured the bucket size
        stands in for it (every rank replays the same bucket) and only capturable backends are
        candidates.
        """
        if self._ladder is None:
            alone = self.group is None or self.group.world <= 1
            return self.comm, (x.shape[0] if alone else None)
        names = self._graph_names or list(self.comms)
        if self._graph_names is not None or _capturing(x):
            tokens = x.shape[0]
        elif tokens is None:
            tokens = self._agreed_tokens(x.shape[0])
        self.comm = self.comms[pick_comm(tokens, names, self._ladder, capacities=self._capacities)]
        return self.comm, tokens

    def _check_x(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if x.dim() != 2 or x.shape[1] != cfg.hidden:
            raise ValueError(f"x must be [T, {cfg.hidden}], got {tuple(x.shape)}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")

    def _check_logits(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        E = self.cfg.num_experts
        if logits.dim() != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] != E:
            raise ValueError(
                f"router_logits must be [T, E] = [{x.shape[0]}, {E}] for x of shape {tuple(x.shape)} and "
                f"{E} experts, got {tuple(logits.shape)}"
            )

    def _gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] fp32 from the layer's gate: x @ gate.T + gate_bias."""
        if self.gate is None:
            raise ValueError("pass router_logits or routing, or build the layer with gate=")
        logits = x.float() @ self.gate.float().T  # [T, E]
        if self.gate_bias is not None:
            logits = logits + self.gate_bias.float()
        return logits

    def _check_routing_shape(self, x: torch.Tensor, routing: Routing) -> None:
        if routing.ids.shape != (x.shape[0], self.cfg.top_k):
            raise ValueError(
                f"routing must be [{x.shape[0]}, {self.cfg.top_k}] for x of {x.shape[0]} tokens, "
                f"got {tuple(routing.ids.shape)}"
            )

    def _eager(
        self, x: torch.Tensor, router_logits: torch.Tensor | None, routing: Routing | None,
        tokens: int | None = None, check: bool = True,
    ) -> torch.Tensor:
        """One call without replay. tokens: the agreed token count under comm="auto", when the
        caller already exchanged it; check: validate routed-mode ids on the host (outside captures)."""
        cfg = self.cfg
        if routing is None:
            if router_logits is None:
                router_logits = self._gate_logits(x)
            # in a graph bucket, rows at or past the replayed call's T are routed nowhere (ids -1)
            valid = self._graph_valid if self._graph_names is not None else None
            routing = route(router_logits, cfg, self.correction_bias, num_valid=valid)
        else:
            if router_logits is not None:
                raise ValueError("pass router_logits or routing, not both")
            self._check_routing_shape(x, routing)
            if check and not _capturing(x):
                check_routing(routing, cfg.num_experts)
        if self.capture is not None:
            self.capture.record(routing)
        comm, bound = self._pick_comm(x, tokens)
        dispatched = comm.dispatch(x, routing, max_tokens=bound)
        expert_out = self.runner(dispatched)
        # Shared experts [T, H] fp32 are added to the routed fp32 sum inside combine, before its one cast.
        shared = self.shared(x, cfg) if self.shared is not None else None
        return comm.combine(expert_out, dispatched, addend=shared)
