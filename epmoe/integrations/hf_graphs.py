"""CUDA graphs of whole patched HF MoE blocks (router + MoELayer), each bucket captured on first use.

    block.graphs = BlockGraphs(block, max_tokens, pool)      (patch_model(graphs=N), capture_model_graphs)
    block(hidden_states), T tokens, b = the smallest power-of-two bucket >= T:
        first call of b:  warm up on a side stream, then capture  out[b] = block body on x[:b]
        x[:T] = hidden_states; valid = T (skipped when the last replay had the same T)
        graph[b].replay(); return a copy of out[b][:T] (reshaped as hidden_states)
    body: the HF router and the layer's eager stages; rows >= valid go to no expert (ids -1,
          or route's `num_valid`), so a padded bucket computes only the real rows' experts.

A layer graph (`MoELayer.capture_graphs`) replays route -> combine; the HF router (a linear, a
softmax, a top-k, a division: each an eager launch with HF's Python around it) stays outside and
costs more host time than the whole replay. Capturing the block takes it in.

Calls run eagerly instead when the block's input is not a CUDA tensor of the layer's dtype, T is
past the largest bucket, under torch.compile or another capture, with grad enabled, or when a
forward hook other than transformers' output recorder watches the router, or that recorder is
recording router logits (`output_router_logits`): hooks do not run inside a replay.
All blocks share one memory pool: replays run one after the other on one stream and each output
is copied out before the next block's replay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from epmoe.comm.base import capturing
from epmoe.graphs import LayerGraphs, capture_graph, default_buckets, warm_up

if TYPE_CHECKING:
    from epmoe.integrations.hf import HFMoEBlock

_RECORDER = "output_capturing_hook"  # transformers' output-recording hook (active only while it records)


def _recording_router_logits() -> bool:
    """Whether transformers' output recorder is collecting router logits in this forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older layout: its hooks are not recognised, so hooked routers run eagerly
        return True
    collected = _active_collector.get()
    return collected is not None and "router_logits" in collected


class BlockGraphs:
    """One patched block's static input and its graphs, one per power-of-two bucket up to max_tokens."""

    def __init__(self, block: HFMoEBlock, max_tokens: int, pool: tuple[int, int] | None = None) -> None:
        layer = block.moe
        LayerGraphs._check(layer, max_tokens)  # CUDA, a capturable backend: the reason otherwise
        if layer.world > 1:
            raise ValueError("block graphs captured on first use serve one rank; with several ranks call "
                             "MoELayer.capture_graphs(max_tokens) on every rank alike")
        self.block, self.buckets, self.pool = block, default_buckets(max_tokens), pool
        self.x = torch.zeros(max_tokens, layer.cfg.hidden, dtype=layer.dtype, device=layer.device)  # [top, H]
        self.valid = torch.zeros((), dtype=torch.int32, device=layer.device)  # rows < it are real
        self._valid_now: int | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]] = {}

    def serves(self, hidden_states: torch.Tensor) -> bool:
        """Whether this call may replay (see the module docstring)."""
        T = hidden_states.numel() // self.x.shape[1] if hidden_states.dim() else 0
        if not (hidden_states.is_cuda and hidden_states.dtype == self.x.dtype and 0 < T <= self.buckets[-1]):
            return False
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or capturing(hidden_states):
            return False
        router = getattr(self.block, self.block.router_name)
        hooks = router._forward_hooks
        if router._forward_pre_hooks or any(getattr(h, "__name__", "") != _RECORDER for h in hooks.values()):
            return False
        return not (hooks and _recording_router_logits())

    def replay(self, hidden_states: torch.Tensor) -> Any:
        """One call by replay (same return value as the block's eager forward)."""
        shape, H = hidden_states.shape, self.x.shape[1]
        x = hidden_states.reshape(-1, H)
        T = x.shape[0]
        b = next(b for b in self.buckets if b >= T)
        if b not in self.graphs:
            self._capture(b)
        self.x[:T].copy_(x)
        if self._valid_now != T:
            self.valid.fill_(T)
            self._valid_now = T
        graph, out = self.graphs[b]
        graph.replay()
        if self.block.moe.capture is not None:
            self.block.moe.capture.replayed(T)
        if isinstance(out, tuple):
            return out[0][:T].clone().reshape(shape), out[1][:T].clone()
        return out[:T].clone().reshape(shape)

    def _body(self, b: int) -> Any:
        """The block's eager work on the first b static rows; outputs [b, H] (and [b, K] scores)."""
        return self.block.body(self.x[:b], self.valid)

    def _capture(self, b: int) -> None:
        """Warm bucket b up on a side stream (allocations, compilation), then capture it (graphs.py)."""
        self._valid_now = None
        warm_up(self.x.device, [lambda: (self.valid.fill_(b), self._body(b))])
        graph, out, self.pool = capture_graph(lambda: self._body(b), self.pool)  # no grad: `serves` asks for it
        self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.x.device)
