"""A cost model for one MoE layer forward per rank: bytes moved and FLOPs over link and chip rates.

    time(backend) = dispatch + experts + combine
    dispatch      = latency(backend, peers) + max(bytes over NVLink / nvlink_bw, bytes over the net / net_bw)
                    (0 when no byte moves: one rank, or no token)
    experts       = max(touched expert weight bytes / hbm_bw, FLOPs / tensor_peak)
                    nvfp4 (a Hopper GPU): from 17 pairs up to one pair per local expert, pair mode (every
                    pair streams its expert's weights); then below 128 rows per local expert, sorted blocks
                    of up to 32 rows (each streams its expert's); from 128, + the decode of every local
                    expert into a bf16 scratch (0.5625 bytes read + 2 written a value) at hbm_bw

Uniform routing (each token picks K of E experts without replacement), experts spread evenly over W
ranks, G per node. Bytes are those the backends send (their handles' dispatch_bytes / combine_bytes):
  nccl_a2a   dispatch: one wire row (payload + scales + K ids and K fp32 weights) per (token,
             other rank hit); combine: one partial-sum row per (token, other rank hit)
  symm_a2a   dispatch: one payload row per (token, other rank hit) plus every token's slot
             metadata (Kl ids and weights, Kl = min(K, E/W)) on every other rank; combine as nccl_a2a
  allgather  dispatch: every token's wire row to every other rank; combine: each peer's partial
             rows back (W - 1) * T
  none       one rank: no bytes, no latency (`plan` lists it for one GPU, where it is the choice)
Partial sums travel in the combine dtype, fp32 by default (`combine_bytes=4`). Latencies are the
model's assumptions (`Links`); `compare` sets predictions next to `epmoe bench comm|layer --json` rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from epmoe.comm.payload import check_payload, payload_parts
from epmoe.config import MoEConfig
from epmoe.experts import tuning

# bench comm rows name unquantized payloads by their dtype
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "fp8_block": 1.0 + 4 / 128 / 128, "nvfp4": 0.5 + 1 / 16}
BACKENDS = ("symm_a2a", "nccl_a2a", "allgather")
# what `plan` predicts: "none" first, so that at one GPU (where every backend moves 0 bytes) it is the pick
PLAN_BACKENDS = ("none", *BACKENDS)


@dataclass(frozen=True)
class Links:
    """Rates and latencies (assumptions, defaults for H200 nodes with NVLink 4 and 400 Gb/s NICs)."""

    nvlink_gbps: float = 450.0  # per-GPU unidirectional NVLink bandwidth, GB/s
    net_gbps: float = 50.0  # per-GPU network, GB/s
    hbm_tbps: float = 4.2  # HBM bandwidth, TB/s
    tflops: float = 790.0  # dense bf16 tensor-core rate
    gpus_per_node: int = 8  # ranks sharing one NVLink domain
    nccl_latency_us: float = 25.0  # *_latency_us: fixed cost of one dispatch or combine call
    symm_latency_us: float = 6.0
    net_latency_us: float = 15.0


def expected_ranks_hit(cfg: MoEConfig, world: int) -> float:
    """Expected distinct ranks among a token's K experts (uniform, without replacement)."""
    E, K, per = cfg.num_experts, cfg.top_k, cfg.num_experts // world
    # P(rank r holds none of the K experts) = C(E - per, K) / C(E, K)
    p_miss = math.comb(E - per, K) / math.comb(E, K) if E - per >= K else 0.0
    return world * (1.0 - p_miss)


def predict(cfg: MoEConfig, world: int, tokens: int, backend: str, links: Links = Links(),  # noqa: B008
            payload: str = "bf16", weights: str = "bf16", combine_bytes: int = 4
            ) -> dict[str, float | str | int] | None:
    """Predicted µs of one layer forward on one rank; None where the backend cannot run.
    combine_bytes: bytes per partial-sum element on the combine wire (4: fp32, the default; 2: bf16)."""
    if cfg.num_experts % world:
        return None
    G = min(links.gpus_per_node, world)
    if backend == "symm_a2a" and world > links.gpus_per_node:
        return None
    # bytes per activation row with its scales (comm/payload.py)
    row = sum(n * d.itemsize for d, n in payload_parts(check_payload("bf16" if payload in _DTYPES else payload),
                                                       cfg.hidden, _DTYPES.get(payload, torch.bfloat16)))
    wire_row = row + 8 * cfg.top_k  # + K int32 ids and K fp32 weights (nccl_a2a, allgather)
    out_row = combine_bytes * cfg.hidden
    local_share = (G - 1) / max(world - 1, 1)  # share of the other ranks inside this node
    if backend == "none":
        if world != 1:
            return None  # the tp layout's all-reduce is not modelled
        d_bytes, c_bytes, lat = 0.0, 0.0, 0.0
    elif backend in ("nccl_a2a", "symm_a2a"):
        hit = expected_ranks_hit(cfg, world)
        sends = tokens * hit * (1 - 1 / world)  # rows leaving this rank: hits on the other W - 1 ranks
        if backend == "symm_a2a":
            slot_meta = 8 * min(cfg.top_k, cfg.num_experts // world)
            d_bytes = sends * row + tokens * (world - 1) * slot_meta
        else:
            d_bytes = sends * wire_row
        c_bytes = sends * out_row
        lat = links.symm_latency_us if backend == "symm_a2a" else links.nccl_latency_us
    elif backend == "allgather":
        others = tokens * (world - 1)
        d_bytes, c_bytes = others * wire_row, others * out_row
        lat = links.nccl_latency_us
    else:
        raise ValueError(f"no cost model for backend {backend!r}; choose none, allgather, nccl_a2a or symm_a2a")
    if world > links.gpus_per_node:
        lat += links.net_latency_us

    def move(nbytes: float) -> float:
        if nbytes == 0:
            return 0.0  # nothing leaves the rank: no call to wait for
        nv, net = nbytes * local_share, nbytes * (1 - local_share)
        return lat + max(nv / (links.nvlink_gbps * 1e3), net / (links.net_gbps * 1e3))  # bytes/(GB/s) -> µs

    dispatch_us, combine_us = move(d_bytes), move(c_bytes)
    pairs = tokens * cfg.top_k  # balanced routing: each rank computes as many pairs as it sends
    local = cfg.num_experts // world
    # expected local experts with at least one pair, the pairs landing uniformly
    touched = cfg.num_experts / world * (1.0 - (1.0 - world / cfg.num_experts) ** pairs)
    if weights == "nvfp4" and tuning.PAIR_MODE_MAX_PAIRS < pairs <= tuning.NVFP4_PAIR_MODE_MAX_RPE * local:
        touched = pairs  # pair mode: each pair streams its expert's weights
    elif weights == "nvfp4" and pairs > tuning.PAIR_MODE_MAX_PAIRS and pairs / local < tuning.NVFP4_MMA_MAX_RPE:
        touched *= math.ceil(pairs / local / tuning.NVFP4_GROUPED_MAX_BM)  # each block streams its expert
    w_bytes = touched * 3 * cfg.hidden * cfg.intermediate * WEIGHT_BYTES[weights]
    flops = 2 * 3 * cfg.hidden * cfg.intermediate * pairs
    experts_us = max(w_bytes / (links.hbm_tbps * 1e6), flops / (links.tflops * 1e6))
    if weights == "nvfp4" and pairs / local >= tuning.NVFP4_MMA_MAX_RPE:
        decode_bytes = local * 3 * cfg.hidden * cfg.intermediate * (WEIGHT_BYTES["nvfp4"] + 2.0)
        experts_us += decode_bytes / (links.hbm_tbps * 1e6)
    return {"backend": backend, "gpus": world, "tokens": tokens, "dispatch_us": dispatch_us, "combine_us": combine_us,
            "experts_us": experts_us, "total_us": dispatch_us + combine_us + experts_us,
            "dispatch_MB": d_bytes / 1e6, "combine_MB": c_bytes / 1e6}


def plan(cfg: MoEConfig, gpus: list[int], tokens: list[int], links: Links = Links(),  # noqa: B008
         backends: tuple[str, ...] = PLAN_BACKENDS, payload: str = "bf16", weights: str = "bf16",
         combine_bytes: int = 4) -> list[dict[str, float | str | int]]:
    """Predictions for every (gpus, tokens, backend), marking the fastest per (gpus, tokens)
    (of equal times, the first in `backends`; "none" runs at one GPU only)."""
    rows = []
    for w in gpus:
        for t in tokens:
            group = [r for b in backends
                     if (r := predict(cfg, w, t, b, links, payload, weights, combine_bytes)) is not None]
            if group:
                best = min(group, key=lambda r: r["total_us"])
                for r in group:
                    r["best"] = "*" if r is best else ""
            rows += group
    return rows


# --- predicted vs measured ---

_NOTES = {"virtual": "virtual ranks: every byte through one GPU's HBM, not a link",
          "gloo": "gloo on the CPU: not the modelled links; no time ratio",
          "cpu": "run on the CPU: the model's rates are a GPU's; no time ratio"}


def preset_of(meta: dict[str, Any]) -> str | None:
    """The preset a `--json` file was measured with: meta["preset"], else `--preset` in meta["command"]."""
    if meta.get("preset"):
        return str(meta["preset"])
    m = re.search(r"--preset[ =](\S+)", str(meta.get("command", "")))
    return m.group(1) if m else None


def compare(cfg: MoEConfig, rows: list[dict[str, Any]], links: Links = Links(),  # noqa: B008
            use_row_rates: bool = True) -> list[dict[str, Any]]:
    """Predicted next to measured for rows of `epmoe bench comm --json` (dispatch + combine) or
    `epmoe bench layer --json` (whole forward; comm "auto" predicted as the fastest backend).
    ratio = measured / predicted, for rows timed on a GPU only; bytes compared wherever the row
    has them; configurations ("symm_a2a pull") predicted as their backend. use_row_rates: a
    layer row's measured `hbm_TBps` / `TFLOPs` replace the links' rates."""
    out = []
    for r in rows:
        world, tokens, ranks = int(r.get("world", 1)), int(r["tokens"]), str(r.get("ranks", ""))
        # timed on the CPU: gloo ranks, perf_counter, or no GPU rates
        on_cpu = r.get("ranks") == "gloo" or r.get("timing") == "cpu" or str(r.get("rates", "")).startswith(
            ("cost-model defaults", "timed on the CPU"))
        note = next((v for k, v in _NOTES.items() if k in ranks), _NOTES["cpu"] if on_cpu else "")
        if "dispatch_us" in r:  # bench comm: the two phases only
            # a row's label names a configuration of its backend: "symm_a2a pull", "nccl_a2a static"
            backend, payload = str(r["backend"]).split(" ")[0], r.get("payload") or "bf16"
            p = predict(cfg, world, tokens, backend, links, payload=payload)
            measured = float(r["dispatch_us"]) + float(r["combine_us"])
            predicted = p["dispatch_us"] + p["combine_us"] if p else None
            meas_mb = (r.get("dispatch_bytes", 0) + r.get("combine_bytes", 0)) / 1e6 if "dispatch_bytes" in r else None
            pred_mb = p["dispatch_MB"] + p["combine_MB"] if p else None
            what = "dispatch+combine"
        else:  # bench layer: the whole forward
            backend = str(r["comm"]).split(" ")[0]  # "nccl_a2a (virtual x4)" in older files
            row_links = links
            if use_row_rates and r.get("hbm_TBps") and r.get("TFLOPs"):
                row_links = replace(links, hbm_tbps=float(r["hbm_TBps"]), tflops=float(r["TFLOPs"]))
            names = PLAN_BACKENDS if backend == "auto" else (backend,)
            preds = [p for b in names if (p := predict(cfg, world, tokens, b, row_links)) is not None]
            best = min(preds, key=lambda p: p["total_us"]) if preds else None
            measured, predicted = float(r["us"]), best["total_us"] if best else None
            meas_mb = pred_mb = None
            what = "layer" if backend != "auto" else f"layer (auto; model: {best['backend'] if best else '-'})"
        label = str(r.get("backend", r.get("comm", backend)))
        out.append({"what": what, "backend": label, "gpus": world, "tokens": tokens, "ranks": ranks or "-",
                    "timing": r.get("timing", "-"), "predicted_us": "-" if predicted is None else predicted,
                    "measured_us": measured, "ratio": measured / predicted if predicted and not on_cpu else "-",
                    "predicted_MB": "-" if pred_mb is None else pred_mb,
                    "measured_MB": "-" if meas_mb is None else meas_mb, "note": note})
    return out
