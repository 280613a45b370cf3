"""CUDA-graph capture and replay of a whole MoELayer: route -> dispatch -> experts -> combine.

    capture:  for each token bucket b (largest first, so smaller graphs reuse its memory pool):
                  graph[b] = the layer's eager call on rows [0, b) of static buffers,
                             rows >= valid routed to expert -1 (no expert computes them, no
                             comm moves them)
    replay:   T <= the largest bucket, b = the smallest bucket >= T:
                  validate=True: check the inputs' values on the host; with several ranks
                    agree on the outcome first (`agree_inputs`), so all replay or all raise
                  copy x, logits (or routing) into the static buffers; valid = T
                  graph[b].replay(); its comm backend's after_replay(); return out[b][:T]

Under comm="auto" bucket b holds auto's pick for b among the capturable candidates; with several
ranks every call first agrees on the largest T over ranks, so every rank replays the same bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from epmoe.comm.base import CommBackend, agree, capturing
from epmoe.routing import Routing, check_finite_logits, check_routing
from epmoe.select import check, ensure

if TYPE_CHECKING:
    from epmoe.layer import MoELayer


def default_buckets(max_tokens: int) -> list[int]:
    """Powers of two up to max_tokens, and max_tokens itself."""
    return sorted({min(2**i, max_tokens) for i in range(max_tokens.bit_length() + 1)})


def warm_up(device: torch.device, bodies: list[Callable[[], Any]]) -> None:
    """Run each body once on a side stream (allocations, compilation and autotuning happen outside
    any graph), then make the current stream wait for it."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for body in bodies:
            body()
    torch.cuda.current_stream(device).wait_stream(stream)


def capture_graph(body: Callable[[], Any], pool: tuple[int, int] | None
                  ) -> tuple[torch.cuda.CUDAGraph, Any, tuple[int, int]]:
    """(graph, body's output, memory pool): body captured in `pool` (None: the graph's own, returned)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = body()
    return graph, out, pool or graph.pool()


@dataclass
class Bucket:
    """One captured graph: the layer for `tokens` rows into out [tokens, H], through `comm`."""

    tokens: int
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor
    comm: CommBackend


class LayerGraphs:
    """The static buffers and one graph per token bucket (ascending) of a layer; built by `capture`.

    routed:   False: the graphs take router logits (or the layer's gate); True: `routing=`.
    validate: replays check their inputs on the host as eager calls do (one device-to-host read
              per call) and, with several ranks, agree on the outcome before any rank replays (one
              small exchange: `agree_inputs`); False where the inputs are trusted, so a replay never
              waits for the GPU nor exchanges anything: then a rank's bad input is not reported
              to its peers (they replay and wait for it in the graph's collectives, bounded only by
              the process group's timeout) and the caller must check its inputs itself.
    """

    def __init__(self, layer: MoELayer, buckets: list[int], routed: bool = False, validate: bool = True) -> None:
        cfg, device = layer.cfg, layer.device
        top, K = buckets[-1], cfg.top_k
        self.layer, self.buckets, self.routed, self.validate = layer, buckets, routed, validate
        self.x = torch.zeros(top, cfg.hidden, dtype=layer.dtype, device=device)  # [top, H]
        self.logits = torch.zeros(top, cfg.num_experts, dtype=torch.float32, device=device)  # [top, E]
        # routed mode: distinct valid ids for the warm-up calls; replays overwrite them
        self.ids = torch.arange(K, dtype=torch.int32, device=device).repeat(top, 1)  # [top, K]
        self.weights = torch.zeros(top, K, dtype=torch.float32, device=device)  # [top, K]
        self.valid = torch.zeros((), dtype=torch.int32, device=device)  # rows < it are real
        self._valid_now: int | None = None  # what `valid` holds (None: unknown): a replay of the same T skips the fill
        self.graphs: dict[int, Bucket] = {}
        self.pool: tuple[int, int] | None = None  # the memory pool the graphs share
        self.names: list[str] | None = None  # set by `lazy`: capture each bucket when first needed

    @classmethod
    def capture(cls, layer: MoELayer, max_tokens: int, buckets: list[int] | None = None, routed: bool = False,
                validate: bool = True) -> LayerGraphs:
        """Check that `layer` can be captured (see MoELayer.capture_graphs), then capture one
        graph per bucket."""
        names = cls._check(layer, max_tokens)
        buckets = sorted(set(buckets or default_buckets(max_tokens)))
        if buckets[-1] < max_tokens or buckets[0] <= 0:
            raise ValueError(f"buckets {buckets} must be positive and reach max_tokens={max_tokens}")
        graphs = cls(layer, buckets, routed, validate)
        graphs._capture(names)
        return graphs

    @classmethod
    def lazy(cls, layer: MoELayer, max_tokens: int, routed: bool = False, validate: bool = True,
             pool: tuple[int, int] | None = None) -> LayerGraphs:
        """The graphs of `capture`, each bucket captured when a call first needs it (powers of two
        up to max_tokens). pool: a `torch.cuda.graph_pool_handle()` several layers share (their
        graphs replay one after the other on one stream, and each replay's output is copied out
        before the next, so they may reuse each other's intermediate memory); None: one of its own.
        One rank only: ranks capture when their own calls first need a bucket."""
        if layer.world > 1:
            raise ValueError("graphs captured on first use serve one rank; with several ranks call "
                             "capture_graphs(max_tokens) on every rank alike")
        graphs = cls(layer, default_buckets(max_tokens), routed, validate)
        graphs.names, graphs.pool = cls._check(layer, max_tokens), pool
        return graphs

    @classmethod
    def _check(cls, layer: MoELayer, max_tokens: int) -> list[str]:
        """The layer's capturable comm backends; a ValueError naming why it cannot be captured."""
        group = layer.group
        if group is not None and group.world > 1 and group.virtual:
            raise ValueError("virtual ranks share one device and exchange through host threads, so a CUDA graph "
                             "cannot hold their communication; capture with one process per GPU (EPGroup) or a "
                             "world-1 layer")
        if layer.device.type != "cuda":
            raise ValueError("capture_graphs needs the layer's weights on a CUDA device")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        names = cls.capturable(layer)
        if not names:
            ensure(dataclasses.replace(layer.combo, graph=True))  # raises with the reason
        return names

    @staticmethod
    def capturable(layer: MoELayer) -> list[str]:
        """The layer's comm backends (auto's candidates, or its one) that select.py lets a graph hold."""
        return [n for n in layer.comms if check(dataclasses.replace(layer.combo_for(n), graph=True))[0]]

    def _body(self, b: int) -> torch.Tensor:
        """The layer's eager call on the first b rows of the static buffers."""
        if self.routed:
            routing = Routing(self.ids[:b], self.weights[:b])
            return self.layer._eager(self.x[:b], None, routing, num_valid=self.valid, check=False)
        return self.layer._eager(self.x[:b], self.logits[:b], None, num_valid=self.valid)

    def _capture(self, names: list[str], buckets: list[int] | None = None) -> None:
        """Warm up, then capture `buckets` (default: all), largest first so smaller graphs reuse its
        memory pool (or the shared `pool`)."""
        layer, device, auto = self.layer, self.layer.device, self.layer.auto
        if auto is not None:
            auto.allowed = names  # only capturable candidates; the bucket size picks among them
        try:
            todo = sorted(buckets or self.buckets, reverse=True)
            self._valid_now = None
            warm_up(device, [lambda b=b: (self.valid.fill_(b), self._body(b)) for b in todo])
            for b in todo:
                g, out, self.pool = capture_graph(lambda b=b: self._body(b), self.pool)
                self.graphs[b] = Bucket(b, g, out, layer.comm)
            torch.cuda.synchronize(device)
        finally:
            if auto is not None:
                auto.allowed = None

    def serves(self, x: torch.Tensor, routing: Routing | None) -> bool:
        """Whether a call of this mode on x's device may replay (T decides the bucket after)."""
        return ((bool(self.graphs) or self.names is not None) and x.is_cuda and not capturing(x)
                and (routing is not None) == self.routed)

    def bucket(self, tokens: int) -> int | None:
        """The smallest bucket holding `tokens`, None when it is larger than every bucket."""
        return next((b for b in self.buckets if b >= tokens), None) if self.graphs or self.names is not None else None

    def stage(self, x: torch.Tensor, logits: torch.Tensor | None, routing: Routing | None, bucket: int) -> Bucket:
        """Copy one call's inputs into the static buffers; returns the bucket to replay."""
        T = x.shape[0]
        # a replay of the T the last one had (decode steps) finds `valid` = T and ids rows >= T at -1
        # (only a larger T or a capture's warm-up writes them): two launches fewer
        fresh = self._valid_now != T
        self.x[:T].copy_(x)
        if routing is not None:
            self.ids[:T].copy_(routing.ids)
            if fresh:
                self.ids[T:].fill_(-1)
            self.weights[:T].copy_(routing.weights)
        else:
            self.logits[:T].copy_(logits)
        if fresh:
            self.valid.fill_(T)
            self._valid_now = T
        return self.graphs[bucket]

    def agrees(self) -> bool:
        """Whether replays agree across ranks before replaying (validate, several ranks)."""
        return self.validate and self.layer.world > 1

    def agree_inputs(self, x: torch.Tensor, logits: torch.Tensor | None, routing: Routing | None) -> None:
        """A replay's input checks (validate=True): finite logits, or routing ids in range and
        distinct with finite weights. With several ranks every rank then takes part in one
        exchange before any replays (a failing rank's error travels in it): the tp layout's token
        check (count and hash, as eager calls), else the call number and a failure slot. So a
        rank whose inputs fail raises its error and every peer PeerFailedError naming it."""
        layer, failure = self.layer, None
        try:
            if routing is not None:
                check_routing(routing, layer.cfg.num_experts)
            else:
                check_finite_logits(logits)
        except Exception as exc:  # noqa: BLE001 - raised below, after the peers are told
            failure = exc
        if not self.agrees():
            if failure is not None:
                raise failure
            return
        layer._start_call()  # counted as eager calls are: a timeout names it
        if layer.layout == "tp":
            layer._agree_tokens_tp(x, logits, routing, failure, self._agree_device())
        self._agree(failure)

    def fail(self, failure: BaseException) -> NoReturn:
        """This rank's call failed its shape checks while its peers replay (`agrees()`): report it
        in their replay's exchange, then raise it."""
        layer = self.layer
        if layer.layout == "tp":  # the token check is the replay's exchange there
            layer._agree_tokens_tp(None, None, None, failure, self._agree_device())
        self._agree(failure)
        raise failure

    def _agree(self, failure: BaseException | None) -> None:
        layer = self.layer
        if layer.layout == "tp" and failure is None:
            return  # the token check agreed
        agree(layer.group, f"MoELayer {layer.op_id} (graph replay) on rank {layer.rank}, call {layer.calls}",
              {"call number": layer.calls}, device=self._agree_device(), failure=failure,
              fix="Every rank replays the same calls")

    def _agree_device(self) -> torch.device:
        """Where the group exchanges ints: the layer's GPU for NCCL, else the CPU."""
        group = self.layer.group
        return self.layer.device if group is not None and group.backend == "nccl" else torch.device("cpu")

    def replay(self, x: torch.Tensor, logits: torch.Tensor | None, routing: Routing | None, bucket: int
               ) -> torch.Tensor:
        """One call by replay: y [T, H] (a copy of the bucket's first T output rows)."""
        T, layer = x.shape[0], self.layer
        if bucket not in self.graphs:  # lazy graphs: this bucket's first call captures it
            self._capture(self.names, [bucket])
        if self.validate:
            self.agree_inputs(x, logits, routing)
        b = self.stage(x, logits, routing, bucket)
        b.graph.replay()
        if layer.auto is not None:
            layer.auto.current = b.comm
        b.comm.after_replay()  # a bounded wait in the graph only records its timeout: read it here
        if layer.capture is not None:
            layer.capture.replayed(T)
        return b.out[:T].clone()
