"""Routing: pick each token's top-k experts and their weights.

    logits [T, E] --route(cfg)--> Routing(ids [T, K] int32, weights [T, K] fp32)

All modes compute in fp32; ties go to the lowest expert (and group) id: `_topk` sorts stably
(torch.topk's order among equal values is unspecified). `route_torch` (here) is the twin of
`route_triton` (epmoe/ops/routing.py, one launch, the same tie rule), which `route` picks for CUDA
logits: at decode the torch path's launch overhead dominates the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.config import MoEConfig


@dataclass
class Routing:
    """The experts each token goes to.

    ids:     [T, K] int32, global expert ids in [0, E), distinct within a row; -1 in the
             rows route(num_valid=...) marks as padding.
    weights: [T, K] fp32, router weights applied at combine.
    """

    ids: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.dtype != torch.int32:
            raise ValueError(f"Routing.ids must be int32, got {self.ids.dtype}; use Routing.external")
        if self.weights.dtype != torch.float32:
            raise ValueError(f"Routing.weights must be float32, got {self.weights.dtype}")
        if self.ids.dim() != 2 or self.ids.shape != self.weights.shape:
            raise ValueError(f"Routing ids and weights must both be [T, K], got {tuple(self.ids.shape)} and "
                             f"{tuple(self.weights.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def external(cls, ids: torch.Tensor, weights: torch.Tensor, num_experts: int, validate: bool = True) -> Routing:
        """Routing given by the caller (routed mode, e.g. RL routing replay): ids int32/int64, weights any
        float dtype. `validate` runs `check_routing` (a host read: pass False inside a CUDA graph capture)."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"routing ids must be int32 or int64, got {ids.dtype}")
        if not weights.is_floating_point():
            raise ValueError(f"routing weights must be floating point, got {weights.dtype}")
        routing = cls(ids.to(torch.int32), weights.to(torch.float32))
        if validate:
            check_routing(routing, num_experts)
        return routing


def check_routing(routing: Routing, num_experts: int) -> None:
    """Raise ValueError unless ids are in range and distinct per token and weights are finite."""
    ids, weights = routing.ids, routing.weights
    if routing.top_k > num_experts:
        raise ValueError(f"top_k={routing.top_k} exceeds num_experts={num_experts}")
    if ids.numel() == 0:
        return
    # one host read for every check: [min id, max id, a token repeats an expert, a weight is not finite]
    ordered = ids.sort(dim=1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)  # [T]
    lo, hi, repeats, nonfinite = torch.stack([
        ids.min().long(), ids.max().long(), dup.any().long(), (~torch.isfinite(weights)).any().long()]).tolist()
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"routing ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    if repeats:
        token = int(dup.nonzero()[0, 0])
        raise ValueError(f"routing ids repeat an expert within token {token}: {ids[token].tolist()}; "
                         "each token's k experts must be distinct")
    if nonfinite:
        raise ValueError("routing weights contain NaN or inf")


def check_correction_bias(correction_bias: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError unless `correction_bias` is a finite float [E] tensor (a NaN would silently send
    every token to experts 0, 1, ...); a host read, which the layer does once at construction."""
    if not isinstance(correction_bias, torch.Tensor) or not correction_bias.is_floating_point():
        got = correction_bias.dtype if isinstance(correction_bias, torch.Tensor) else type(correction_bias).__name__
        raise ValueError(f"correction_bias must be a float tensor [{num_experts}], got {got}")
    if tuple(correction_bias.shape) != (num_experts,):
        raise ValueError(f"correction_bias must be [{num_experts}], got {tuple(correction_bias.shape)}")
    if not bool(torch.isfinite(correction_bias).all()):
        bad = (~torch.isfinite(correction_bias)).nonzero().flatten().tolist()
        raise ValueError(f"correction_bias (e_score_correction_bias) holds NaN or inf at experts {bad[:8]}; it "
                         "would route every token to the lowest expert ids. Check the checkpoint or how the bias "
                         "was computed")


IMPLS = ("auto", "torch", "triton")


def route(router_logits: torch.Tensor, cfg: MoEConfig, correction_bias: torch.Tensor | None = None,
          num_valid: torch.Tensor | None = None, impl: str = "auto", check_values: bool = True) -> Routing:
    """Route tokens from router logits [T, E] (any float dtype) by `cfg.routing`.

    correction_bias: [E] float, for "sigmoid_bias" / "sigmoid_grouped" (`e_score_correction_bias`):
    it changes which experts are picked, never the weights.
    num_valid: int32 scalar on the logits' device: rows t >= num_valid (a CUDA-graph bucket's
    padding) get ids -1 and weights 0 (read on the device only).
    impl: "triton", "torch" or "auto" (Triton for CUDA logits when the kernel takes the config).
    check_values: read the logits and bias on the host for NaN / inf (a sync); False: metadata only.
    """
    from epmoe.ops.routing import kernel_supports, route_triton

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" or (impl == "auto" and router_logits.is_cuda and kernel_supports(cfg)[0]):
        return route_triton(router_logits, cfg, correction_bias, num_valid, check_values=check_values)
    return route_torch(router_logits, cfg, correction_bias, num_valid, check_values=check_values)


def check_finite_logits(router_logits: torch.Tensor) -> None:
    """ValueError if the router logits hold NaN or inf (one host read)."""
    if router_logits.numel() and not bool(torch.isfinite(router_logits).all()):
        raise ValueError("router_logits contain NaN or inf; check the router input")


def check_route_inputs(router_logits: torch.Tensor, cfg: MoEConfig, correction_bias: torch.Tensor | None,
                       num_valid: torch.Tensor | None, check_values: bool = True) -> None:
    """Validate route()'s inputs. With check_values, outside CUDA-graph captures, this reads the
    logits and the bias on the host (NaN / inf checks); otherwise only metadata is checked."""
    if router_logits.dim() != 2 or router_logits.shape[1] != cfg.num_experts:
        raise ValueError(f"router_logits must be [T, {cfg.num_experts}], got {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
    capturing = not check_values or (router_logits.is_cuda and torch.cuda.is_current_stream_capturing())
    if not capturing:
        check_finite_logits(router_logits)
    if cfg.uses_correction_bias:
        if correction_bias is None:
            raise ValueError(f"routing {cfg.routing!r} needs correction_bias [E]")
        if not capturing:
            check_correction_bias(correction_bias, cfg.num_experts)
        if correction_bias.device != router_logits.device:
            raise ValueError(f"correction_bias is on {correction_bias.device} but router_logits on "
                             f"{router_logits.device}; move the bias to the logits' device once, at load")
    if num_valid is not None and (not isinstance(num_valid, torch.Tensor) or num_valid.dtype != torch.int32
                                  or num_valid.numel() != 1 or num_valid.device != router_logits.device):
        got = (f"{num_valid.dtype} {tuple(num_valid.shape)} on {num_valid.device}"
               if isinstance(num_valid, torch.Tensor) else type(num_valid).__name__)
        raise ValueError(f"num_valid must be an int32 tensor of one element on {router_logits.device}, got {got}; "
                         "e.g. torch.tensor(n, dtype=torch.int32, device=router_logits.device)")


def _topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; among equal values the lowest index wins."""
    sorted_vals, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return sorted_vals[..., :k], order[..., :k]


def route_torch(router_logits: torch.Tensor, cfg: MoEConfig, correction_bias: torch.Tensor | None = None,
                num_valid: torch.Tensor | None = None, check_values: bool = True) -> Routing:
    """Plain-PyTorch twin of `route_triton` (same arguments, see `route`)."""
    check_route_inputs(router_logits, cfg, correction_bias, num_valid, check_values)
    logits = router_logits.float()  # [T, E]
    k = cfg.top_k
    if cfg.routing == "softmax":
        probs = logits.softmax(dim=-1)  # [T, E]
        weights, ids = _topk(probs, k)  # [T, K]
    elif cfg.routing == "softmax_after_topk":
        top, ids = _topk(logits, k)  # [T, K]
        weights = top.softmax(dim=-1)
    elif cfg.routing == "sigmoid_bias":
        scores = logits.sigmoid()  # [T, E]
        _, ids = _topk(scores + correction_bias.float(), k)
        weights = scores.gather(1, ids)
    else:  # sigmoid_grouped
        scores = logits.sigmoid()  # [T, E]
        choice = scores + correction_bias.float()  # [T, E]
        T, E, G = logits.shape[0], cfg.num_experts, cfg.n_group
        grouped = choice.view(T, G, E // G)  # [T, G, E/G]
        group_scores = _topk(grouped, 2)[0].sum(dim=-1)  # [T, G]
        _, keep = _topk(group_scores, cfg.topk_group)  # [T, topk_group]
        group_mask = torch.zeros(T, G, dtype=torch.bool, device=logits.device)
        group_mask.scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        masked = choice.masked_fill(~expert_mask, float("-inf"))
        _, ids = _topk(masked, k)
        weights = scores.gather(1, ids)

    if cfg.norm_topk_prob and cfg.routing != "softmax_after_topk":
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    ids = ids.to(torch.int32)
    if num_valid is not None:
        pad = torch.arange(ids.shape[0], device=ids.device)[:, None] >= num_valid.reshape(())  # [T, 1]
        ids = ids.masked_fill(pad, -1)
        weights = weights.masked_fill(pad, 0.0)
    return Routing(ids, weights.contiguous())


class RoutingCapture:
    """A preallocated buffer a layer writes the routing ids it used into: ids [max_tokens, K] int32,
    `ids[:num_tokens]` the last call's; `num_tokens_dev` (device int32, written in the same stream)
    counts graph replays too, the host int `num_tokens` eager calls only."""

    def __init__(self, max_tokens: int, top_k: int, device: torch.device | str = "cpu") -> None:
        if max_tokens <= 0 or top_k <= 0:
            raise ValueError("RoutingCapture needs max_tokens > 0 and top_k > 0")
        self.ids = torch.full((max_tokens, top_k), -1, dtype=torch.int32, device=device)
        self.num_tokens_dev = torch.zeros((), dtype=torch.int32, device=device)
        self.num_tokens = 0

    def record(self, routing: Routing) -> None:
        t = routing.num_tokens
        if t > self.ids.shape[0] or routing.top_k != self.ids.shape[1]:
            raise ValueError(f"RoutingCapture holds [{self.ids.shape[0]}, {self.ids.shape[1]}] ids, got "
                             f"[{t}, {routing.top_k}]; allocate it with a larger max_tokens or matching top_k")
        self.ids[:t].copy_(routing.ids)
        self.num_tokens_dev.fill_(t)
        self.num_tokens = t

    def replayed(self, tokens: int) -> None:
        """A graph replay of `tokens` real rows wrote the ids (the captured call wrote its bucket's count)."""
        self.num_tokens_dev.fill_(tokens)
        self.num_tokens = tokens

    def captured(self) -> torch.Tensor:
        """The ids of the last call: [num_tokens, K] int32 (reads the device count)."""
        return self.ids[: int(self.num_tokens_dev)]
