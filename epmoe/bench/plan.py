"""A cost model for one MoE layer forward per rank: bytes moved and FLOPs over link and chip rates.

    time(backend) = dispatch + experts + combine
    dispatch      = latency(backend, peers) + max(bytes over NVLink / nvlink_bw, bytes over the net / net_bw)
    experts       = max(touched expert weight bytes / hbm_bw, FLOPs / tensor_peak)

Routing is modelled as uniform: each token picks K of E experts without replacement, experts
spread evenly over W ranks, G ranks per node. A token is sent once per distinct destination
rank (nccl_a2a, symm_a2a); allgather moves every token to every rank. Latency constants are
the model's assumptions, stated in `Links`; compare with measured numbers before trusting them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from epmoe.config import MoEConfig

# bytes per activation element and per-row scale bytes of each payload format
_PAYLOAD_BYTES = {
    "bf16": lambda h: 2 * h,
    "fp8": lambda h: h + 4,  # one fp32 scale per row
    "fp8_block": lambda h: h + 4 * math.ceil(h / 128),  # fp32 scale per 128 values
    "nvfp4": lambda h: h // 2 + math.ceil(h / 16),  # e2m1 pairs + one e4m3 scale per 16
}
_WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "fp8_block": 1.0 + 4 / 128 / 128, "nvfp4": 0.5 + 1 / 16}


@dataclass(frozen=True)
class Links:
    """Rates and latencies (assumptions, defaults for H200 nodes with NVLink 4 and 400 Gb/s NICs).

    nvlink_gbps: per-GPU unidirectional NVLink bandwidth, GB/s. net_gbps: per-GPU network, GB/s.
    hbm_tbps: HBM bandwidth, TB/s. tflops: dense bf16 tensor-core rate.
    gpus_per_node: ranks sharing one NVLink domain.
    *_latency_us: fixed cost of one dispatch or combine call.
    """

    nvlink_gbps: float = 450.0
    net_gbps: float = 50.0
    hbm_tbps: float = 4.2
    tflops: float = 790.0
    gpus_per_node: int = 8
    nccl_latency_us: float = 25.0
    symm_latency_us: float = 6.0
    net_latency_us: float = 15.0


def expected_ranks_hit(cfg: MoEConfig, world: int) -> float:
    """Expected distinct ranks among a token's K experts (uniform, without replacement)."""
    E, K, per = cfg.num_experts, cfg.top_k, cfg.num_experts // world
    # P(rank r holds none of the K experts) = C(E - per, K) / C(E, K)
    p_miss = math.comb(E - per, K) / math.comb(E, K) if E - per >= K else 0.0
    return world * (1.0 - p_miss)


def _touched_experts(cfg: MoEConfig, world: int, pairs_per_rank: float) -> float:
    """Expected local experts with at least one pair, when `pairs_per_rank` land uniformly."""
    local = cfg.num_experts / world
    return local * (1.0 - (1.0 - 1.0 / local) ** pairs_per_rank)


def predict(
    cfg: MoEConfig,
    world: int,
    tokens: int,
    backend: str,
    links: Links = Links(),  # noqa: B008 (frozen dataclass)
    payload: str = "bf16",
    weights: str = "bf16",
    combine_bytes: int = 2,
) -> dict[str, float | str | int] | None:
    """Predicted µs of one layer forward on one rank; None where the backend cannot run."""
    if cfg.num_experts % world:
        return None
    G = min(links.gpus_per_node, world)
    if backend == "symm_a2a" and world > links.gpus_per_node:
        return None
    row = _PAYLOAD_BYTES[payload](cfg.hidden)
    out_row = combine_bytes * cfg.hidden
    if backend in ("nccl_a2a", "symm_a2a"):
        hit = expected_ranks_hit(cfg, world)
        frac_other = (hit - hit / world) / max(hit, 1e-9)  # share of hits that are not this rank
        sends = tokens * hit * frac_other  # rows leaving this rank
        local_share = (G - 1) / max(world - 1, 1)
        d_bytes_nv, d_bytes_net = sends * local_share * row, sends * (1 - local_share) * row
        c_bytes_nv, c_bytes_net = sends * local_share * out_row, sends * (1 - local_share) * out_row
        lat = links.symm_latency_us if backend == "symm_a2a" else links.nccl_latency_us
    elif backend == "allgather":
        others = tokens * (world - 1)
        local_share = (G - 1) / max(world - 1, 1)
        d_bytes_nv, d_bytes_net = others * local_share * row, others * (1 - local_share) * row
        c_bytes_nv, c_bytes_net = others * local_share * out_row * 2, others * (1 - local_share) * out_row * 2
        lat = links.nccl_latency_us
    else:
        raise ValueError(f"no cost model for backend {backend!r}; choose allgather, nccl_a2a or symm_a2a")
    if world > links.gpus_per_node:
        lat += links.net_latency_us

    def move(nv: float, net: float) -> float:
        return lat + max(nv / (links.nvlink_gbps * 1e3), net / (links.net_gbps * 1e3))  # bytes/(GB/s) -> µs

    dispatch_us, combine_us = move(d_bytes_nv, d_bytes_net), move(c_bytes_nv, c_bytes_net)
    pairs = tokens * cfg.top_k  # balanced routing: each rank computes as many pairs as it sends
    touched = _touched_experts(cfg, world, pairs)
    w_bytes = touched * 3 * cfg.hidden * cfg.intermediate * _WEIGHT_BYTES[weights]
    flops = 2 * 3 * cfg.hidden * cfg.intermediate * pairs
    experts_us = max(w_bytes / (links.hbm_tbps * 1e6), flops / (links.tflops * 1e6))
    return {
        "backend": backend, "gpus": world, "tokens": tokens,
        "dispatch_us": dispatch_us, "combine_us": combine_us, "experts_us": experts_us,
        "total_us": dispatch_us + combine_us + experts_us,
        "dispatch_MB": (d_bytes_nv + d_bytes_net) / 1e6,
    }


def plan(
    cfg: MoEConfig,
    gpus: list[int],
    tokens: list[int],
    links: Links = Links(),  # noqa: B008
    backends: tuple[str, ...] = ("symm_a2a", "nccl_a2a", "allgather"),
    payload: str = "bf16",
    weights: str = "bf16",
) -> list[dict[str, float | str | int]]:
    """Predictions for every (gpus, tokens, backend), marking the fastest per (gpus, tokens)."""
    rows = []
    for w in gpus:
        for t in tokens:
            group = [r for b in backends if (r := predict(cfg, w, t, b, links, payload, weights)) is not None]
            if group:
                best = min(group, key=lambda r: r["total_us"])
                for r in group:
                    r["best"] = "*" if r is best else ""
            rows += group
    return rows
