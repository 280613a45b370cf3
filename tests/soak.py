"""A randomized multi-rank soak over gloo processes: `python -m tests.soak --calls 1000 [--faults 200]`.

Calls: for W in {2, 3, 4}, every comm backend and payload that runs on the CPU (nccl_a2a,
allgather, symm_a2a over /dev/shm, auto, none with the tp layout; bf16 / fp8 / fp8_block / nvfp4
payloads, static shapes, bf16 combine), random token counts per rank (0 included), routing
skewed, uniform, all to one expert or all to one rank, in routed and logits modes. Each rank
compares its output with a single-rank reference layer (comm "none", every expert) on the same
inputs, within a per-payload tolerance, and runs every call twice to check bitwise equality.
Prints one line: calls, wrong, hangs, non-deterministic (and errors, time).

Faults: a random bad input on a random rank under every backend above (the ranks stay in step:
every rank must raise, the bad one its own error, the others PeerFailedError naming it), and
jobs that end in a fault: a rank that skips a call, a rank that exits, a bad input under
symm_a2a; every other rank must raise (PeerFailedError / CollectiveTimeoutError /
SymmTimeoutError naming the faulty rank) within the timeout, never hang. Prints one line:
faults, ok, hangs, wrong (the wrong error or words).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights
from epmoe.launch import DistError, DistTimeout, run_ranks
from epmoe.layer import MoELayer
from epmoe.routing import Routing

CFG = MoEConfig(hidden=128, intermediate=32, num_experts=12, top_k=3)
WORLDS = (2, 3, 4)
MAX_T = 48
TOKENS = (0, 0, 1, 2, 3, 5, 8, 13, 31, MAX_T)
DISTS = ("uniform", "skewed", "one_expert", "one_rank")

# (name, comm, layout, comm_options, normwise relative tolerance against the fp32 reference):
# bf16 rows of fp32 x move exactly (only the fp32 sum order differs: ~1e-6); the quantized
# payloads round x once (fp8 e4m3: 2^-4 relative per value; nvfp4 e2m1 with block scales: up to
# 1/4 per value) and a bf16 combine rounds each rank's partial sum once (2^-9). The worst seen
# over 1000 calls (seed 0): fp8 0.077, fp8_block 0.072, nvfp4 0.31, bf16 combine 0.0018, the rest
# below 1e-6; the tolerances are about twice those.
BACKENDS = [
    ("nccl_a2a", "nccl_a2a", "dp", {}, 1e-5),
    ("nccl_a2a fp8", "nccl_a2a", "dp", {"payload": "fp8"}, 0.15),
    ("nccl_a2a fp8_block", "nccl_a2a", "dp", {"payload": "fp8_block"}, 0.15),
    ("nccl_a2a nvfp4", "nccl_a2a", "dp", {"payload": "nvfp4"}, 0.6),
    ("nccl_a2a static", "nccl_a2a", "dp", {"static_shapes": True, "max_tokens_per_rank": MAX_T}, 1e-5),
    ("nccl_a2a bf16 combine", "nccl_a2a", "dp", {"combine_dtype": "bf16"}, 0.01),
    ("allgather", "allgather", "dp", {}, 1e-5),
    ("allgather padded", "allgather", "dp", {"gather": "padded"}, 1e-5),
    ("allgather fp8", "allgather", "dp", {"payload": "fp8"}, 0.15),
    ("allgather nvfp4", "allgather", "dp", {"payload": "nvfp4"}, 0.6),
    ("allgather static", "allgather", "dp", {"static_shapes": True, "max_tokens_per_rank": MAX_T}, 1e-5),
    ("symm_a2a", "symm_a2a", "dp", {"max_tokens_per_rank": MAX_T, "timeout_s": 30.0}, 1e-5),
    ("symm_a2a fp8_block", "symm_a2a", "dp", {"max_tokens_per_rank": MAX_T, "payload": "fp8_block",
                                              "timeout_s": 30.0}, 0.15),
    ("auto", "auto", "dp", {"max_tokens_per_rank": MAX_T}, 1e-5),
    ("none tp", "none", "tp", {}, 1e-5),
]


def _full() -> ExpertWeights:
    return ExpertWeights.random(CFG, CFG.num_experts, generator=torch.Generator().manual_seed(7))


@dataclass
class Spec:
    """One call, the same on every rank (drawn from the seed and the call's index)."""

    backend: int
    tokens: list[int]
    routed: bool
    dist: str
    target: int  # the expert (one_expert) or rank (one_rank) everything goes to


def _spec(seed: int, i: int, world: int) -> Spec:
    rng = random.Random(seed * 1_000_003 + i)
    b = rng.randrange(len(BACKENDS))
    if BACKENDS[b][2] == "tp":
        tokens = [rng.choice(TOKENS)] * world
    else:
        tokens = [rng.choice(TOKENS) for _ in range(world)]
    dist = rng.choice(DISTS)
    target = rng.randrange(CFG.num_experts if dist == "one_expert" else world)
    return Spec(b, tokens, rng.random() < 0.5, dist, target)


def _inputs(spec: Spec, seed: int, i: int, rank: int, world: int) -> tuple[torch.Tensor, Any, Routing | None]:
    """x, logits (or None) and routing (or None) of `rank` for call i."""
    tp = BACKENDS[spec.backend][2] == "tp"
    g = torch.Generator().manual_seed(seed * 7919 + i * 131 + (0 if tp else rank))
    T, E, K = spec.tokens[rank], CFG.num_experts, CFG.top_k
    x = torch.randn(T, CFG.hidden, generator=g)
    logits = torch.randn(T, E, generator=g)
    per = E // world
    if spec.dist == "skewed":
        logits[:, :2] += 3.0
    elif spec.dist == "one_expert":
        logits[:, spec.target] += 30.0
    elif spec.dist == "one_rank":
        logits[:, spec.target * per : (spec.target + 1) * per] += 30.0
    if not spec.routed:
        return x, logits, None
    ids = logits.topk(K, dim=1).indices.to(torch.int32)  # distinct, follow the distribution
    w = torch.rand(T, K, generator=g) + 0.1
    return x, None, Routing(ids, w / w.sum(1, keepdim=True))


@dataclass
class Tally:
    calls: int = 0
    wrong: int = 0
    nondet: int = 0
    errors: int = 0
    worst: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _rank_calls(group, seed: int, first: int, count: int) -> dict:
    """Run calls [first, first + count) on this rank; what went wrong, counted per call."""
    W, r = group.world, group.rank
    full = _full()
    layers = [MoELayer.from_global(CFG, full, group, comm=c, layout=lay, comm_options=dict(o))
              for _, c, lay, o, _ in BACKENDS]
    ref = MoELayer(CFG, full)  # one rank, every expert
    out = {"wrong": [], "nondet": [], "errors": [], "worst": {}}
    for i in range(first, first + count):
        spec = _spec(seed, i, W)
        name, *_, tol = BACKENDS[spec.backend]
        x, logits, routing = _inputs(spec, seed, i, r, W)
        layer = layers[spec.backend]
        try:
            y1 = layer(x, logits, routing)
            y2 = layer(x, logits, routing)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            out["errors"].append(f"call {i} ({name}, T={spec.tokens}): {type(exc).__name__}: {str(exc)[:300]}")
            raise
        want = ref(x, logits, routing)
        err = float((y1.float() - want).norm() / want.norm().clamp_min(1e-30)) if want.numel() else 0.0
        out["worst"][name] = max(out["worst"].get(name, 0.0), err)
        if not err <= tol or tuple(y1.shape) != tuple(x.shape):
            out["wrong"].append(f"call {i} ({name}, T={spec.tokens}, {spec.dist}): rel err {err:.3g} > {tol}")
        if not torch.equal(y1, y2):
            out["nondet"].append(f"call {i} ({name}): two runs differ")
    _destroy(layers)
    return out


def _destroy(layers: list[MoELayer]) -> None:
    for layer in layers:
        for comm in layer.comms.values():
            if hasattr(comm, "destroy"):  # symm_a2a's workspace (collective)
                comm.destroy()


def soak_calls(calls: int, seed: int = 0, worlds: tuple[int, ...] = WORLDS, chunk: int = 100,
               timeout: float = 300.0) -> Tally:
    """`calls` calls spread over `worlds`, in jobs of `chunk` calls."""
    tally = Tally()
    per = [calls // len(worlds) + (1 if k < calls % len(worlds) else 0) for k in range(len(worlds))]
    for W, n in zip(worlds, per):
        for first in range(0, n, chunk):
            count = min(chunk, n - first)
            tally.calls += count
            try:
                ranks = run_ranks(_rank_calls, W, args=(seed + W, first, count), timeout=timeout,
                                  collective_timeout=60.0)
            except (DistError, DistTimeout) as exc:
                kind = "hang" if isinstance(exc, DistTimeout) else "error"
                tally.errors += 1
                tally.notes.append(f"W={W} calls {first}..{first + count}: {kind}: {str(exc)[-1500:]}")
                continue
            for key, attr in (("wrong", "wrong"), ("nondet", "nondet")):
                bad = {m.split(" (")[0] for rank in ranks for m in rank[key]}
                setattr(tally, attr, getattr(tally, attr) + len(bad))
                tally.notes += [f"W={W} rank {r}: {m}" for r, rank in enumerate(ranks) for m in rank[key][:3]]
            for rank in ranks:
                for k, v in rank["worst"].items():
                    tally.worst[k] = max(tally.worst.get(k, 0.0), v)
    return tally


# ---- faults -------------------------------------------------------------------------------

FAULT_BACKENDS = BACKENDS


def _bad_input(kind: str, x: torch.Tensor, logits: torch.Tensor, routing: Routing | None) -> tuple:
    """One bad input of `kind` on the bad rank: (x, logits, routing, the words its error holds)."""
    T = x.shape[0]
    if kind == "float64":
        return x.double(), logits, routing, "x must be bf16, fp16 or fp32"
    if kind == "hidden":
        return x[:, 1:], logits, routing, r"x must be \[T, 128\]"
    if kind == "nan_logits":
        logits = torch.randn(max(T, 1), CFG.num_experts)
        logits[0, 0] = float("nan")
        return torch.randn(max(T, 1), CFG.hidden), logits, None, "router_logits contain NaN or inf"
    if kind == "logits_shape":
        return x, torch.randn(T + 1, CFG.num_experts), None, r"router_logits must be \[T, E\]"
    ids = torch.tensor([[0, 1, 2]] * max(T, 1), dtype=torch.int32)
    w = torch.full((max(T, 1), 3), 1 / 3)
    xx = torch.randn(max(T, 1), CFG.hidden)
    if kind == "id_range":
        ids[0, 1] = CFG.num_experts + 5
        return xx, None, Routing(ids, w), r"routing ids must lie in \[0, 12\)"
    if kind == "nan_weight":
        w[0, 2] = float("nan")
        return xx, None, Routing(ids, w), "routing weights contain NaN or inf"
    raise ValueError(kind)


BAD_INPUTS = ("float64", "hidden", "nan_logits", "logits_shape", "id_range", "nan_weight")


def _rank_faults(group, seed: int, first: int, count: int) -> dict:
    """Bad-input trials [first, first + count): the problems (rank must raise, rightly), the
    slowest raise (seconds) and the trials per backend."""
    W, r = group.world, group.rank
    full = _full()
    layers = [MoELayer.from_global(CFG, full, group, comm=c, layout=lay, comm_options=dict(o))
              for _, c, lay, o, _ in FAULT_BACKENDS]
    problems, slowest, per = [], 0.0, {}
    for i in range(first, first + count):
        rng = random.Random(seed * 999_983 + i)
        b, bad_rank, kind = rng.randrange(len(layers)), rng.randrange(W), rng.choice(BAD_INPUTS)
        spec = _spec(seed, i, W)
        spec.backend = BACKENDS.index(FAULT_BACKENDS[b])
        if FAULT_BACKENDS[b][2] == "tp":
            spec.tokens = [spec.tokens[0]] * W
        x, logits, routing = _inputs(spec, seed, i, r, W)
        if logits is None:
            logits = torch.randn(x.shape[0], CFG.num_experts)
        words = ""
        if r == bad_rank:
            x, logits, routing, words = _bad_input(kind, x, logits, routing)
        else:
            words = rf"rank {bad_rank} failed its own checks"
        start = time.monotonic()
        try:
            layers[b](x, None if routing is not None else logits, routing)
            problems.append(f"trial {i} ({FAULT_BACKENDS[b][0]}, {kind} on rank {bad_rank}): rank {r} did not raise")
        except Exception as exc:  # noqa: BLE001 - checked below
            if not re.search(words, str(exc)):
                problems.append(f"trial {i} ({FAULT_BACKENDS[b][0]}, {kind} on rank {bad_rank}): rank {r} raised "
                                f"{type(exc).__name__}: {str(exc)[:300]} (want {words!r})")
        took = time.monotonic() - start
        slowest = max(slowest, took)
        per[FAULT_BACKENDS[b][0]] = per.get(FAULT_BACKENDS[b][0], 0) + 1
        if took > 20:
            problems.append(f"trial {i}: rank {r} took {took:.1f}s to raise")
    _destroy(layers)
    return {"problems": problems, "slowest": slowest, "per": per}


def _rank_terminal(group, kind: str, comm: int, faulty: int, symm_timeout: float) -> str:
    """One call that ends in a fault on rank `faulty`: it skips the call, exits, or (symm_a2a)
    passes bad input; the others must raise."""
    name, c, lay, o, _ = BACKENDS[comm]
    o = dict(o)
    if c == "symm_a2a":
        o["timeout_s"] = symm_timeout
    layer = MoELayer.from_global(CFG, _full(), group, comm=c, layout=lay, comm_options=o)
    x = torch.randn(4, CFG.hidden, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(4, CFG.num_experts, generator=torch.Generator().manual_seed(1))
    layer(x, logits)  # one good call first
    if group.rank == faulty:
        if kind == "skip":
            return "skipped"
        if kind == "exit":
            os._exit(3)
        x = x.double()  # bad input
    layer(x, logits)
    return "went ahead"


TERMINAL = ("skip", "exit", "symm_bad_input")


def _terminal_trial(rng: random.Random, collective_timeout: float, kind: str | None = None
                    ) -> tuple[bool, bool, str]:
    """One terminal fault (`kind`, else a random one); returns (ok, hang, note)."""
    W, kind = rng.choice(WORLDS), kind or rng.choice(TERMINAL)
    symm = [i for i, b in enumerate(BACKENDS) if b[1] == "symm_a2a"]
    other = [i for i, b in enumerate(BACKENDS) if b[1] in ("nccl_a2a", "allgather", "auto", "none")]
    comm = rng.choice(symm if kind == "symm_bad_input" else symm + other)
    faulty = rng.randrange(W)
    limit = collective_timeout * 2 + 30
    start = time.monotonic()
    tag = f"{kind} on rank {faulty} of {W}, {BACKENDS[comm][0]}"
    try:
        run_ranks(_rank_terminal, W, args=(kind, comm, faulty, collective_timeout), timeout=limit,
                  collective_timeout=collective_timeout)
        return False, False, f"{tag}: every rank went ahead"
    except (DistError, DistTimeout) as exc:
        text = str(exc)
        took = time.monotonic() - start
    sections = dict(re.findall(r"--- rank (\d+) ---\n([\s\S]*?)(?=\n--- rank \d+ ---|\Z)", text))
    want = ("CollectiveTimeoutError", "SymmTimeoutError", "PeerFailedError", "ValueError")
    for r in range(W):
        if r == faulty:
            continue
        tb = sections.get(str(r), "")
        if not any(w in tb for w in want):
            hang = "did not finish" in text and str(r) in text.split("did not finish")[0]
            return False, hang, f"{tag}: rank {r} did not raise ({took:.1f}s): {text[-800:]}"
        if not re.search(rf"ranks? \[(\d+, )*{faulty}(, \d+)*\]|rank {faulty}\b", tb):
            return False, False, f"{tag}: rank {r}'s error does not name rank {faulty}: {tb[-400:]}"
    return True, False, f"{tag}: every other rank raised in {took:.1f}s"


@dataclass
class FaultTally:
    faults: int = 0
    ok: int = 0
    hangs: int = 0
    wrong: int = 0
    notes: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # bad-input trials per backend, terminal faults per kind
    slowest: float = 0.0  # the longest a rank took to raise in a bad-input trial (seconds)
    slowest_terminal: float = 0.0  # the longest a terminal fault's job took to end (seconds)


def soak_faults(faults: int, seed: int = 0, terminal_share: float = 0.1, chunk: int = 50,
                collective_timeout: float = 3.0) -> FaultTally:
    """`faults` faults: bad-input trials in jobs of `chunk` on random worlds, and about
    terminal_share of them ending their job (skip, exit, symm_a2a bad input)."""
    tally = FaultTally()
    rng = random.Random(seed)
    terminal = max(1, round(faults * terminal_share)) if faults >= 2 else 0
    inputs = faults - terminal
    first = 0
    while first < inputs:
        W, count = rng.choice(WORLDS), min(chunk, inputs - first)
        tally.faults += count
        try:
            ranks = run_ranks(_rank_faults, W, args=(seed, first, count), timeout=300,
                              collective_timeout=collective_timeout * 4)
        except (DistError, DistTimeout) as exc:
            tally.hangs += isinstance(exc, DistTimeout)
            tally.wrong += not isinstance(exc, DistTimeout)
            tally.notes.append(f"W={W} trials {first}..{first + count}: {str(exc)[-1500:]}")
            first += count
            continue
        bad = {p.split(":")[0] for rank in ranks for p in rank["problems"]}
        tally.wrong += len(bad)
        tally.ok += count - len(bad)
        tally.notes += [p for rank in ranks for p in rank["problems"][:3]]
        tally.slowest = max([tally.slowest] + [rank["slowest"] for rank in ranks])
        for name, n in ranks[0]["per"].items():
            tally.kinds[name] = tally.kinds.get(name, 0) + n
        first += count
    for _ in range(terminal):
        tally.faults += 1
        kind = rng.choice(TERMINAL)
        tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
        start = time.monotonic()
        ok, hang, note = _terminal_trial(rng, collective_timeout, kind)
        tally.slowest_terminal = max(tally.slowest_terminal, time.monotonic() - start)
        tally.ok += ok
        tally.hangs += hang
        tally.wrong += not ok and not hang
        if not ok:
            tally.notes.append(note)
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--faults", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    status = 0
    if a.calls:
        t = time.monotonic()
        s = soak_calls(a.calls, a.seed)
        print(f"soak: calls={s.calls} wrong={s.wrong} hangs={sum('hang' in n for n in s.notes)} "
              f"non-deterministic={s.nondet} errors={s.errors} time={time.monotonic() - t:.1f}s")
        print("  worst rel err: " + ", ".join(f"{k} {v:.2g}" for k, v in sorted(s.worst.items())))
        for n in s.notes[: 20 if a.verbose else 5]:
            print("  " + n)
        status |= bool(s.wrong or s.nondet or s.errors)
    if a.faults:
        t = time.monotonic()
        f = soak_faults(a.faults, a.seed)
        print(f"fault soak: faults={f.faults} ok={f.ok} hangs={f.hangs} wrong={f.wrong} "
              f"time={time.monotonic() - t:.1f}s")
        print(f"  slowest raise: bad input {f.slowest:.2f}s, terminal job {f.slowest_terminal:.1f}s; faults: "
              + ", ".join(f"{k} {v}" for k, v in sorted(f.kinds.items())))
        for n in f.notes[: 20 if a.verbose else 5]:
            print("  " + n)
        status |= bool(f.hangs or f.wrong)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
