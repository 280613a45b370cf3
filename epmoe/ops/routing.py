"""Top-k routing in one Triton launch: the launch wrapper of kernels/routing.py, beside its
plain-torch twin `route_torch` (epmoe.routing, imported here: same arguments, ids equal and
weights within fp32 rounding; see kernels/routing.py). `epmoe.routing.route` picks between them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import torch

from epmoe.config import MoEConfig
from epmoe.ops.launch import launcher
from epmoe.routing import Routing, check_route_inputs, route_torch
from epmoe.util import cdiv, next_pow2

__all__ = ["kernel_supports", "route_torch", "route_triton"]

_MODES = {"softmax": 0, "softmax_after_topk": 1, "sigmoid_bias": 2, "sigmoid_grouped": 3}  # kernel MODE
_MAX_COLUMNS = 1024  # kernel tile width (padded experts); wider configs route with torch
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # loaded as they are


def _kernel_groups(cfg: MoEConfig) -> tuple[int, int, int]:
    """(groups, experts per group, groups kept) as the kernel tiles them."""
    if cfg.routing == "sigmoid_grouped":
        return cfg.n_group, cfg.num_experts // cfg.n_group, cfg.topk_group
    return 1, cfg.num_experts, 1


@lru_cache(maxsize=64)
def kernel_supports(cfg: MoEConfig) -> tuple[bool, str]:
    """(ok, reason): whether `route_triton` takes this config (its tile must fit)."""
    groups, per_group, _ = _kernel_groups(cfg)
    columns = next_pow2(groups) * max(2, next_pow2(per_group))
    if columns > _MAX_COLUMNS:
        return False, (
            f"{cfg.num_experts} experts in {groups} group(s) pad to {columns} columns, over the "
            f"routing kernel's {_MAX_COLUMNS}; use impl='torch'"
        )
    return True, ""


@lru_cache(maxsize=256)
def _launch_params(cfg: MoEConfig, t_pow2: int, interpret: bool) -> tuple[int, dict[str, Any]]:
    """The routing kernel's constexprs for `cfg` at up to t_pow2 tokens (kept per argument set).
    A tile of <= 2K elements, one warp per 256 (not tuned on a GPU yet); at decode one token per
    program, and for E <= 256 one warp, so every reduction stays within the warp."""
    groups, per_group, topk_group = _kernel_groups(cfg)
    g_pad, pg_pad = next_pow2(groups), max(2, next_pow2(per_group))
    columns = g_pad * pg_pad
    block_t = min(t_pow2, max(1, 2048 // columns), 64)
    return block_t, dict(
        MODE=_MODES[cfg.routing], K=cfg.top_k, K_PAD=next_pow2(cfg.top_k), N_GROUP=groups, PER_GROUP=per_group,
        G_PAD=g_pad, PG_PAD=pg_pad, TOPK_GROUP=topk_group, NORM=cfg.norm_topk_prob, PRECISE_EXP=not interpret,
        BLOCK_T=block_t, num_warps=min(4, max(1, block_t * columns // 256)))


def route_triton(
    router_logits: torch.Tensor,
    cfg: MoEConfig,
    correction_bias: torch.Tensor | None = None,
    num_valid: torch.Tensor | None = None,
    check_values: bool = True,
) -> Routing:
    """`route` in one Triton launch (kernels/routing.py); no host sync besides `route`'s own
    input checks, which are skipped while a CUDA graph is captured.

    Logits live on CUDA, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1).
    """
    from epmoe.kernels.routing import moe_route_kernel

    check_route_inputs(router_logits, cfg, correction_bias, num_valid, check_values)
    ok, reason = kernel_supports(cfg)
    if not ok:
        raise ValueError(reason)
    interpret = router_logits.device.type != "cuda"
    if interpret and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"route_triton needs CUDA logits, got {router_logits.device}; use impl='torch' "
            "(or TRITON_INTERPRET=1 to run the kernel on the CPU)"
        )
    logits = router_logits if router_logits.dtype in _KERNEL_DTYPES else router_logits.float()
    bias = None
    if cfg.uses_correction_bias:
        bias = correction_bias if correction_bias.dtype in _KERNEL_DTYPES else correction_bias.float()
        bias = bias.contiguous()

    T, K = logits.shape[0], cfg.top_k
    ids = torch.empty(T, K, dtype=torch.int32, device=logits.device)
    weights = torch.empty(T, K, dtype=torch.float32, device=logits.device)
    if T == 0:
        return Routing(ids, weights)
    block_t, kwargs = _launch_params(cfg, next_pow2(T), interpret)
    launcher(moe_route_kernel)[(cdiv(T, block_t),)](
        logits, bias, num_valid, ids, weights, T, logits.stride(0), logits.stride(1),
        float(cfg.routed_scaling_factor), HAS_NUM_VALID=num_valid is not None, **kwargs,
    )
    return Routing(ids, weights)
