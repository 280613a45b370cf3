"""What a layer's ranks must agree on: the construction fingerprint and the tp layout's token hash.

    agree_construction(layer, ...)   one `agree` (comm/base.py) of a fingerprint of everything every
                                     rank's layer must share; a difference or a rank's own failure
                                     raises on every rank, named
    token_code(x, logits, routing)   a cheap hash of a call's inputs (one pass, one host read)
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from epmoe.comm import COMM_BACKENDS
from epmoe.comm.base import agree
from epmoe.config import MoEConfig
from epmoe.experts import RUNNERS, ExpertWeights
from epmoe.routing import Routing
from epmoe.select import LAYOUTS

if TYPE_CHECKING:
    from epmoe.layer import MoELayer, SharedExperts


def _code(value: Any) -> int:
    """A value as one int (crc32 of its repr), for the cross-rank agreement."""
    return zlib.crc32(repr(value).encode())


def _named(names: list[str]) -> Callable[[int], str]:
    """How an agreed `_code` reads in a message: the name among `names` it codes, else its hex."""
    table = {_code(n): repr(n) for n in names}
    return lambda v: table.get(v, f"{v:#010x}")


def _module_code(router: tuple[torch.Tensor | None, ...], shared: SharedExperts | None) -> tuple[int, int]:
    """(router, shared experts) as ints for the construction agreement: each router tensor (gate,
    gate_bias, correction_bias) by presence, shape, dtype and values (`token_code`: one read at
    construction); the shared experts by type and their tensors' shapes and dtypes (their values
    may differ between ranks: each rank applies them to its own tokens)."""
    router_part = [None if t is None else (tuple(t.shape), str(t.dtype), token_code(t, None, None)) for t in router]
    shared_part = None if shared is None else (type(shared).__name__, [
        (f.name, tuple(v.shape), str(v.dtype)) for f in dataclasses.fields(shared)
        if isinstance(v := getattr(shared, f.name), torch.Tensor)] if dataclasses.is_dataclass(shared) else None)
    return _code(router_part), _code(shared_part)


def agree_construction(layer: MoELayer, cfg: MoEConfig, weights: ExpertWeights, comm: str, runner: str,
                       layout: str, comm_options: dict[str, Any] | None, failure: BaseException | None,
                       router: tuple[torch.Tensor | None, ...] = (), shared: SharedExperts | None = None) -> None:
    """Construction agreement (world > 1): one `agree` of a fingerprint of what every rank's layer
    must share (comm, layout, runner, options, config, shapes, experts, placement, validate, the
    router's tensors (gate, gate_bias, correction_bias) and the shared experts' shapes), so
    ranks built differently raise at construction on every rank, the difference named, instead
    of crashing or hanging in the first call; a rank whose own checks failed (`failure`)
    reports it there and its peers raise `PeerFailedError` naming it. One rank: raises `failure`."""
    if layer.world == 1 or layer.group is None:
        if failure is not None:
            raise failure
        return
    if failure is None:
        shapes = [(n, getattr(t, "dtype", None), tuple(getattr(t, "shape", ()))) for n, t in  # None or quantized
                  (("w13", weights.w13), ("w2", weights.w2), ("b13", weights.b13), ("b2", weights.b2))]
        fields = {
            "comm": _code(comm), "layout": _code(layout), "runner": _code(runner),
            "comm_options": _code(sorted((comm_options or {}).items())), "config": _code(cfg),
            "experts": cfg.num_experts, "hidden": cfg.hidden, "top_k": cfg.top_k,
            "weights (format, dtypes, shapes)": _code((weights.format, shapes)),
            "placement": _code((layer.placement.expert_rank.tolist(), layer.placement.expert_local.tolist(),
                                layer.replicas.phy2log.tolist() if layer.replicas is not None else None)),
            "activation dtype": _code(layer.dtype), "validate": int(layer.validate),
        }
        fields["router (gate, gate_bias, correction_bias)"], fields["shared experts (shapes)"] = _module_code(
            router, shared)
    else:  # zeros stand in: the peers read the failure
        fields = dict.fromkeys(("comm", "layout", "runner", "comm_options", "config", "experts", "hidden", "top_k",
                                "weights (format, dtypes, shapes)", "placement", "activation dtype", "validate",
                                "router (gate, gate_bias, correction_bias)", "shared experts (shapes)"), 0)
    shown = {"comm": _named([*COMM_BACKENDS, "auto"]), "layout": _named(list(LAYOUTS)),
             "runner": _named(list(RUNNERS)), "activation dtype": lambda v: _named(
                 [torch.float32, torch.bfloat16, torch.float16])(v).strip("'")}
    device = "cuda" if layer.group.backend == "nccl" else "cpu"  # type: ignore[union-attr]
    if device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    agree(layer.group, f"MoELayer on rank {layer.rank} (construction)", fields, device=device, shown=shown,
          failure=failure, fix="Build every rank's layer with the same comm, layout, runner, comm_options, "
          "MoEConfig, placement, weight format, router tensors and shared experts")


def token_code(x: torch.Tensor, logits: torch.Tensor | None, routing: Routing | None) -> int:
    """A cheap hash of a call's inputs (x, and the logits or routing ids and weights given): the
    bits of each, weighted by a position pattern, summed in int64 (one pass, one host read)."""
    h = torch.zeros((), dtype=torch.int64, device=x.device)
    parts = [x] + ([logits] if logits is not None else []) + (
        [routing.ids, routing.weights] if routing is not None else [])
    for i, t in enumerate(parts):
        if not t.numel():
            continue
        t = t.contiguous()
        bits = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        bits = bits.flatten().long()
        pos = torch.arange(bits.numel(), dtype=torch.int64, device=x.device)
        h = h + (bits * ((pos * 2654435761 + 97 * i) % 1000003 + 1)).sum()
    return int(h)
