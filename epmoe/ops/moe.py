"""The whole MoE layer as one torch.library custom op, so compilers and graph capture see one node.

    torch.ops.epmoe.moe_forward(x [T, H], router_logits [T, E]?, ids [T, K] int32?, weights [T, K] fp32?,
                                layer: int) -> y [T, H] in x's dtype

`layer` is the id `register_layer` gave a layer at construction; the op runs that layer's eager
forward (route -> dispatch -> experts -> combine). Its fake implementation returns an empty
[T, H] tensor of x's dtype, so `torch.compile(fullgraph=True)` traces a model through the layer
with no graph break and no data-dependent guard (token counts, routing and the backend choice
stay inside the op), and CUDA graphs (torch.compile's mode="reduce-overhead", piecewise graphs
of serving engines) capture the launches the op makes. The layer keeps its own state (workspaces,
sequence numbers, routing capture) outside the op's arguments, as opaque module state; the op
never returns a view of an input.

Exactly one of `router_logits` and (`ids`, `weights`) is given, as for `MoELayer.forward`.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any, Protocol

import torch


class _Layer(Protocol):
    def forward_eager(self, x: torch.Tensor, router_logits: torch.Tensor | None, routing: Any) -> torch.Tensor: ...


_LAYERS: dict[int, weakref.ReferenceType[Any]] = {}
_IDS = itertools.count()
_LOCK = threading.Lock()


def register_layer(layer: _Layer) -> int:
    """An id under which the op finds `layer` (held weakly: a deleted layer frees its id)."""
    with _LOCK:
        i = next(_IDS)
        _LAYERS[i] = weakref.ref(layer, lambda _ref, i=i: _LAYERS.pop(i, None))
    return i


def _layer(i: int) -> _Layer:
    ref = _LAYERS.get(i)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"epmoe::moe_forward: layer id {i} belongs to no live MoELayer (it was deleted)")
    return layer


# The schema is spelled out: torch < 2.5 cannot infer one from postponed (string) annotations.
@torch.library.custom_op("epmoe::moe_forward", mutates_args=(),
                         schema="(Tensor x, Tensor? router_logits, Tensor? ids, Tensor? weights, int layer) -> Tensor")
def moe_forward(x: torch.Tensor, router_logits: torch.Tensor | None, ids: torch.Tensor | None,
                weights: torch.Tensor | None, layer: int) -> torch.Tensor:
    """One eager forward of the registered layer `layer` (see the module docstring)."""
    from epmoe.routing import Routing

    routing = Routing(ids, weights) if ids is not None else None
    y = _layer(layer).forward_eager(x, router_logits, routing)
    return y.clone() if y.data_ptr() == x.data_ptr() and x.numel() else y


@moe_forward.register_fake
def _moe_forward_fake(x: torch.Tensor, router_logits: torch.Tensor | None, ids: torch.Tensor | None,
                      weights: torch.Tensor | None, layer: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)
