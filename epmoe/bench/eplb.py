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
        us_contiguous, us_eplb = the slowest rank's experts stage (µs) on the last window's picks, token
                     t on rank t % W, contiguous blocks vs that window's plan (docs/bench.md)
    per rank: one row per rank of the picks it serves in the last window of each trace (the
              first --tokens value), before (contiguous blocks) and after (that window's plan with
              the largest R; a copy serves an even share of its expert, `rank_loads`), and a
              last row of max/mean
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import torch

from epmoe.bench.core import bench, format_table, write_json
from epmoe.comm.base import Dispatched
from epmoe.config import MoEConfig
from epmoe.eplb import ExpertLoad, ReplicaMap, ReplicaPlan, max_over_mean, plan_replicas, rank_loads
from epmoe.experts import ExpertWeights, get_runner
from epmoe.select import pick_runner

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


def window_counts(trace: str, num_experts: int, top_k: int, tokens: int, seed: int
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[E] int64 picks per expert of each window: ids [T, K] drawn and counted by `ExpertLoad`;
    and the last window's ids."""
    g, load, out = torch.Generator().manual_seed(seed), ExpertLoad(num_experts), []
    for p in popularity(trace, num_experts, WINDOWS, g):
        ids = torch.multinomial(p.float().expand(tokens, -1), top_k, generator=g).int()  # [T, K], no repeats
        load.record(ids)
        out.append(load.counts().clone())
        load.reset()
    return out, ids


def slowest_rank_us(cfg: MoEConfig, ids: torch.Tensor, plan: ReplicaPlan, device: torch.device) -> float:
    """µs of the experts stage on the slowest rank for the picks ids [T, K] under `plan` (module
    docstring): token t on rank t % W, its picks mapped to slots by `ReplicaMap`."""
    W, S = plan.num_ranks, plan.slots_per_rank
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    weights = ExpertWeights.random(cfg, S, dtype, device, generator=g)
    cls = get_runner(pick_runner(device.type, weights.format))
    runner = cls(cfg, cls.prepare(weights, cfg))
    x = torch.randn(ids.shape[0], cfg.hidden, generator=g).to(device, dtype)
    slots = torch.empty_like(ids)
    for r in range(W):
        slots[r::W] = ReplicaMap(plan, r, "dp", "cpu")(ids[r::W])
    worst = 0.0
    for r in range(W):
        mine = slots // S == r  # [T, K]
        rows = mine.nonzero()[:, 0].int()  # [M] the token of each pair on rank r
        local = (slots[mine] % S).int()  # [M] its local slot
        d = Dispatched(hidden=x, row_ids=rows.to(device), expert_ids=local.to(device),
                       expert_counts=torch.bincount(local, minlength=S).int().to(device))
        iters = 20 if device.type == "cuda" else 3  # the CPU's loops over experts: a few calls (noisy numbers)
        worst = max(worst, bench(lambda d=d: runner(d), device, warmup=1, iters=iters))
    return worst


def bench_eplb(num_experts: int, top_k: int, tokens: list[int], ranks: int, redundant: list[int], nodes: int = 1,
               groups: int = 1, seed: int = 0, timing: MoEConfig | None = None,
               device: torch.device | str = "cpu") -> list[dict]:
    """One row per (trace, tokens, R): mean max/mean rank load of contiguous blocks and of the
    plans; with `timing` (a config of E experts), the slowest rank's experts stage (µs) on `device`."""
    contiguous, rows, device = ReplicaPlan.contiguous(num_experts, ranks), [], torch.device(device)
    for trace in TRACES:
        for t in tokens:
            counts, last = window_counts(trace, num_experts, top_k, t, seed)
            before = sum(max_over_mean(c, contiguous) for c in counts) / len(counts)
            us_before = slowest_rank_us(timing, last, contiguous, device) if timing is not None else None
            for r in redundant:
                plans = [plan_replicas(c, num_experts + r, ranks, nodes, groups) for c in counts]
                now = [max_over_mean(c, p) for c, p in zip(counts, plans)]
                stale = [max_over_mean(c, p) for c, p in zip(counts[1:], plans)]
                rows.append({"trace": trace, "tokens": t, "redundant": r, "contiguous": before,
                             "eplb": sum(now) / len(now), "eplb_next": sum(stale) / len(stale)})
                if timing is not None:
                    rows[-1].update(us_contiguous=us_before, us_eplb=slowest_rank_us(timing, last, plans[-1], device))
    return rows


def per_rank_rows(num_experts: int, top_k: int, tokens: int, ranks: int, redundant: int, nodes: int = 1,
                  groups: int = 1, seed: int = 0) -> list[dict]:
    """One row per rank (module docstring, "per rank"): picks served in each trace's last window
    before and after balancing with `redundant` extra slots, then a row of max/mean."""
    contiguous, before, after = ReplicaPlan.contiguous(num_experts, ranks), {}, {}
    for trace in TRACES:
        last = window_counts(trace, num_experts, top_k, tokens, seed)[0][-1]
        before[trace] = rank_loads(last, contiguous)
        after[trace] = rank_loads(last, plan_replicas(last, num_experts + redundant, ranks, nodes, groups))
    rows: list[dict] = [{"rank": r, **{f"{t} {when}": loads[t][r].item() for t in TRACES
                                       for when, loads in (("before", before), ("after", after))}}
                        for r in range(ranks)]
    ratio = lambda v: (v.max() / v.mean()).item() if v.sum() > 0 else 1.0  # noqa: E731
    rows.append({"rank": "max/mean", **{f"{t} {when}": ratio(loads[t]) for t in TRACES
                                        for when, loads in (("before", before), ("after", after))}})
    return rows


def main(args: argparse.Namespace) -> int:
    """`epmoe bench eplb` (arguments from epmoe/cli.py: preset, experts, world, tokens, redundant, nodes, json)."""
    cfg = MoEConfig.from_preset(args.preset)
    num_experts, ranks = args.experts or cfg.num_experts, args.world or 8
    groups = cfg.n_group if num_experts % cfg.n_group == 0 else 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    hidden = getattr(args, "hidden", None) or (cfg.hidden if on_gpu else 256)
    intermediate = getattr(args, "intermediate", None) or (cfg.intermediate if on_gpu else 96)
    try:
        tokens, redundant = ([int(v) for v in text.split(",") if v] for text in (args.tokens or "4096", args.redundant))
        # the runner reads shapes and the activation only: routing fields reset so any E fits
        timing = cfg.replace(hidden=hidden, intermediate=intermediate, num_experts=num_experts, routing="softmax",
                             n_group=1, topk_group=1, top_k=min(cfg.top_k, num_experts))
        rows = bench_eplb(num_experts, min(cfg.top_k, num_experts), tokens, ranks, redundant, args.nodes, groups,
                          timing=timing, device=device)
        ranked = per_rank_rows(num_experts, min(cfg.top_k, num_experts), tokens[0], ranks, max(redundant),
                               args.nodes, groups)
    except ValueError as exc:
        print(f"epmoe bench eplb: {exc}", file=sys.stderr)
        return 2
    print(f"epmoe bench eplb: {args.preset} routing shapes, E={num_experts}, top-{cfg.top_k}, {groups} expert groups, "
          f"{ranks} ranks on {args.nodes} node(s); {WINDOWS} windows per trace; max/mean rank load, 1.0 = balanced; "
          f"us_*: slowest rank's experts stage on {device} (H={hidden}, I={intermediate}, "
          f"{'bf16' if on_gpu else 'fp32'}), last window")
    meta = {"command": "epmoe " + " ".join(args.argv), "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "date": time.strftime("%Y-%m-%d"), "hidden": hidden, "intermediate": intermediate,
            "preset": args.preset, "experts": num_experts, "top_k": cfg.top_k, "groups": groups,
            "ranks": ranks, "nodes": args.nodes, "windows": WINDOWS, "drift": {"hot": DRIFT_HOT, "step": DRIFT_STEP}}
    shown = [{k: (f"{v:.0f}" if k.startswith("us_") else f"{v:.3f}") if isinstance(v, float) else v
              for k, v in r.items()} for r in rows]
    print(format_table(shown))
    print(f"\nper rank: picks served in the last window of each trace (T={tokens[0]}), before = contiguous blocks, "
          f"after = its plan with R={max(redundant)} redundant slots")
    print(format_table([{k: v if isinstance(v, (int, str)) else f"{v:.3f}" if r["rank"] == "max/mean" else f"{v:.1f}"
                         for k, v in r.items()} for r in ranked]))
    meta["per_rank"] = ranked
    if args.json:
        write_json(rows, args.json, meta)
        print(f"wrote {args.json}")
    return 0
