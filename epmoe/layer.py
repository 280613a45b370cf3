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

from epmoe.comm import accepted_options, get_comm
from epmoe.comm.base import CommBackend
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, get_runner
from epmoe.experts.activation import activate
from epmoe.group import Placement, RankGroup
from epmoe.routing import Routing, RoutingCapture, check_correction_bias, check_routing, route
from epmoe.select import Combo, comm_candidates, comm_capacity, crossovers, ensure, pick_comm, pick_runner

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

    w13: [2S, H] gate rows then up rows; w2: [H, S].
    """

    w13: torch.Tensor
    w2: torch.Tensor

    def __call__(self, x: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
        h = activate(x.float() @ self.w13.float().T, cfg)  # [T, S]
        return h @ self.w2.float().T  # [T, H] fp32

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
            layout=layout, world=world, device=device,
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
        self.combo = dataclasses.replace(base, comm=names[0])
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
        setup = {"device": weights.device, "dtype": activation_dtype(weights)}
        for n in names:
            cls = get_comm(n)
            own = options if comm != "auto" else accepted_options(cls, options)
            self.comms[n] = cls(cfg, group, self.placement, **{**accepted_options(cls, setup), **own})
        self.comm: CommBackend = self.comms[names[0]]
        self._ladder = crossovers(_device_name(weights.device), world)[0] if len(names) > 1 else None
        self._capacities = {n: comm_capacity(c) for n, c in self.comms.items()}  # auto skips what cannot hold T
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

    def capture_graphs(self, max_tokens: int, buckets: list[int] | None = None) -> list[int]:
        """Capture dispatch -> experts -> combine in CUDA graphs, one per token bucket.

        Later forward() calls on CUDA with T <= max_tokens and router logits (or the gate)
        replay the graph of the smallest bucket >= T: x and logits are copied into static
        buffers, rows past T are zero tokens whose outputs are discarded, and the routing
        capture (if any) reports T. Routed-mode calls and larger T run eagerly. Buckets default
        to powers of two up to max_tokens. Returns the buckets. Every piece must be
        capturable (select.py's table: no host-sync comm or runner).
        """
        device = self.runner.weights.device
        if device.type != "cuda":
            raise ValueError("capture_graphs needs the layer's weights on a CUDA device")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        ensure(dataclasses.replace(self.combo, graph=True))
        buckets = sorted(set(buckets or [min(2**i, max_tokens) for i in range(max_tokens.bit_length() + 1)]))
        if buckets[-1] < max_tokens or buckets[0] <= 0:
            raise ValueError(f"buckets {buckets} must be positive and reach max_tokens={max_tokens}")
        dtype = activation_dtype(self.runner.weights)
        top = buckets[-1]
        self._graph_x = torch.zeros(top, self.cfg.hidden, dtype=dtype, device=device)
        self._graph_logits = torch.zeros(top, self.cfg.num_experts, dtype=torch.float32, device=device)
        # bucket -> (graph, its output rows, the comm backend captured in it)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, CommBackend]] = {}
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for b in buckets:  # warm up every shape outside the graph (allocations, autotuning)
                self._eager(self._graph_x[:b], self._graph_logits[:b], None)
        torch.cuda.current_stream(device).wait_stream(stream)
        pool = None
        for b in reversed(buckets):  # largest first, so smaller graphs reuse its memory pool
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._eager(self._graph_x[:b], self._graph_logits[:b], None)
            pool = g.pool()
            self._graphs[b] = (g, out, self.comm)
        torch.cuda.synchronize(device)
        return buckets

    def _replay(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        bucket = min(b for b in self._graphs if b >= T)
        if logits.numel() and not bool(torch.isfinite(logits).all()):
            raise ValueError("router_logits contain NaN or inf; check the router input")
        self._graph_x[:T].copy_(x)
        self._graph_x[T:bucket].zero_()
        self._graph_logits[:T].copy_(logits)
        self._graph_logits[T:bucket].zero_()
        graph, out, comm = self._graphs[bucket]
        graph.replay()
        # A bounded wait inside the graph (symm_a2a) only records a timeout in the backend's error
        # word; read it here, as an eager combine does, unless the caller opted out.
        check = getattr(comm, "check", None)
        if callable(check) and getattr(comm, "check_errors", True):
            check()
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
        from the layer's `gate` (+ `gate_bias`). After `capture_graphs`, calls that fit a bucket
        replay a graph.
        """
        self._check_x(x)
        if router_logits is not None:
            self._check_logits(x, router_logits)
        graphs = getattr(self, "_graphs", None)
        if graphs and routing is None and x.is_cuda and not _capturing(x) and x.shape[0] <= max(graphs):
            if router_logits is None:
                router_logits = self._gate_logits(x)
            return self._replay(x, router_logits)
        return self._eager(x, router_logits, routing)

    def _pick_comm(self, x: torch.Tensor) -> CommBackend:
        """The backend for this call: fixed, or by the largest token count over ranks (auto).

        Every rank must pick the same backend, so auto agrees on max(T) with one small
        exchange; inside a CUDA graph capture the bucket size stands in for it.
        """
        if self._ladder is None:
            return self.comm
        tokens = x.shape[0]
        if self.group is not None and self.group.world > 1 and not _capturing(x):
            tokens = max(t for (t,) in self.group.all_gather_ints([tokens], device=x.device))
        self.comm = self.comms[pick_comm(tokens, list(self.comms), self._ladder, capacities=self._capacities)]
        return self.comm

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

    def _eager(
        self, x: torch.Tensor, router_logits: torch.Tensor | None, routing: Routing | None
    ) -> torch.Tensor:
        cfg = self.cfg
        if routing is None:
            if router_logits is None:
                router_logits = self._gate_logits(x)
            routing = route(router_logits, cfg, self.correction_bias)
        else:
            if router_logits is not None:
                raise ValueError("pass router_logits or routing, not both")
            if routing.ids.shape != (x.shape[0], cfg.top_k):
                raise ValueError(
                    f"routing must be [{x.shape[0]}, {cfg.top_k}] for x of {x.shape[0]} tokens, "
                    f"got {tuple(routing.ids.shape)}"
                )
            if not _capturing(x):
                check_routing(routing, cfg.num_experts)
        if self.capture is not None:
            self.capture.record(routing)
        comm = self._pick_comm(x)
        dispatched = comm.dispatch(x, routing)
        expert_out = self.runner(dispatched)
        if self.shared is None:
            return comm.combine(expert_out, dispatched)
        # Combine into fp32 so routed and shared outputs are added before the one cast.
        acc = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        acc = comm.combine(expert_out, dispatched, out=acc)
        return (acc + self.shared(x, cfg)).to(x.dtype)
