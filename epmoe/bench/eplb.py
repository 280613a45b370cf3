"""`epmoe bench eplb`: the largest rank's expert load over the mean, before and after balancing.

    traces: WINDOWS windows of T tokens, each token picking top-k distinct experts (drawn without
            replacement from the trace's popularity), counted per window with `ExpertLoad`
        zipf           popularity of the i-th hottest expert ~ 1 / i, hottest first in id order
                       (they share rank 0 under contiguous blocks: that placement's worst case)
        zipf-shuffled  the same popularity, the order of the experts random
        drift          DRIFT_HOT of Zipf popularity over a random order whose log-popularity takes
                       a N(0, DRIFT_STEP) step per expert and window, plus 1 - DRIFT_HOT uniform:
                       hot experts cool down and others heat up, as a served mix of prompts does
    for each trace and R in --redundant (E + R slots, (E + R) / W per rank):
        contiguous = max / mean rank load of contiguous blocks (no copies), mean over windows
        eplb       = the same for plan_replicas(counts of window w), measured on window w
        eplb_next  = the plan of window w measured on window w + 1: a plan one window stale, as a
                     server that rebalances from the load it last counted
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import torch

from epmoe.bench.core import format_table, write_json
from epmoe.config import MoEConfig
from epmoe.eplb import ExpertLoad, ReplicaPlan, max_over_mean, plan_replicas

WINDOWS = 8
DRIFT_HOT, DRIFT_STEP = 0.9, 0.3
TRACES = ("zipf", "zipf-shuffled", "drift")


def popularity(trace: str, num_experts: int, windows: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """[E] fp64 pick probabilities of each window of `trace` (summing to 1)."""
    logits = -torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))  # Zipf: p ~ 1 / rank
    if trace != "zipf":
        logits = logits[torch.randperm(num_experts, generator=g)]
    for _ in range(windows):
        p = logits.softmax(0)
        if trace == "drift":
            p = DRIFT_HOT * p + (1 - DRIFT_HOT) / num_experts
            logits = logits + DRIFT_STEP * torch.randn(num_experts, generator=g, dtype=torch.float64)
        yield p


def window_counts(trace: str, num_experts: int, top_k: int, tokens: int, seed: int) -> list[torch.Tensor]:
    """[E] int64 picks per expert of each window: ids [T, K] drawn and counted by `ExpertLoad`."""
    g, load, out = torch.Generator().manual_seed(seed), ExpertLoad(num_experts), []
    for p in popularity(trace, num_experts, WINDOWS, g):
        ids = torch.multinomial(p.float().expand(tokens, -1), top_k, generator=g).int()  # [T, K], no repeats
        load.record(ids)
        out.append(load.counts().clone())
        load.reset()
    return out


def bench_eplb(num_experts: int, top_k: int, tokens: list[int], ranks: int, redundant: list[int], nodes: int = 1,
               groups: int = 1, seed: int = 0) -> list[dict]:
    """One row per (trace, tokens, R): mean max/mean rank load of contiguous blocks and of the plans."""
    contiguous, rows = ReplicaPlan.contiguous(num_experts, ranks), []
    for trace in TRACES:
        for t in tokens:
            counts = window_counts(trace, num_experts, top_k, t, seed)
            before = sum(max_over_mean(c, contiguous) for c in counts) / len(counts)
            for r in redundant:
                plans = [plan_replicas(c, num_experts + r, ranks, nodes, groups) for c in counts]
                now = [max_over_mean(c, p) for c, p in zip(counts, plans)]
                stale = [max_over_mean(c, p) for c, p in zip(counts[1:], plans)]
                rows.append({"trace": trace, "tokens": t, "redundant": r, "contiguous": before,
                             "eplb": sum(now) / len(now), "eplb_next": sum(stale) / len(stale)})
    return rows


def main(args: argparse.Namespace) -> int:
    """`epmoe bench eplb` (arguments from epmoe/cli.py: preset, experts, world, tokens, redundant, nodes, json)."""
    cfg = MoEConfig.from_preset(args.preset)
    num_experts, ranks = args.experts or cfg.num_experts, args.world or 8
    groups = cfg.n_group if num_experts % cfg.n_group == 0 else 1
    try:
        tokens, redundant = ([int(v) for v in text.split(",") if v] for text in (args.tokens or "4096",
                                                                                   args.redundant))
        rows = bench_eplb(num_experts, min(cfg.top_k, num_experts), tokens, ranks, redundant, args.nodes, groups)
    except ValueError as exc:
        print(f"epmoe bench eplb: {exc}", file=sys.stderr)
        return 2
    print(f"epmoe bench eplb: {args.preset} routing shapes, E={num_experts}, top-{cfg.top_k}, {groups} expert groups, "
          f"{ranks} ranks on {args.nodes} node(s); {WINDOWS} windows per trace; max/mean rank load, 1.0 = balanced")
    meta = {"command": "epmoe " + " ".join(args.argv), "device": "cpu", "date": time.strftime("%Y-%m-%d"),
            "preset": args.preset, "experts": num_experts, "top_k": cfg.top_k, "groups": groups,
            "ranks": ranks, "nodes": args.nodes, "windows": WINDOWS, "drift": {"hot": DRIFT_HOT, "step": DRIFT_STEP}}
    print(format_table([{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]))
    if args.json:
        write_json(rows, args.json, meta)
        print(f"wrote {args.json}")
    return 0
