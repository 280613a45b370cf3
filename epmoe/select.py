"""What works with what: one table, and `auto` choices.

    check(Combo(comm="nccl_a2a", runner="triton", ...)) -> (ok, reason)

Every rule lives in `_rules`, read off the registered classes' declared capabilities:

CommBackend class attributes
    layouts           attention layouts served ("dp", "tp")
    needs_host_sync   reads device values on the host per call (not CUDA-graph capturable)
    payloads          payload formats it can move ("bf16" = the activation dtype unquantized)
    devices           "cpu" / "cuda"
    single_node       needs every rank inside one NVLink domain
    static_capable    has a `static_shapes` option that fixes every collective's size, which
                      makes an instance capturable although the class needs host syncs
ExpertRunner class attributes
    formats           weight formats it computes
    devices           "cpu" / "cuda"

`ensure(combo)` raises a ValueError with the reason and the valid alternatives.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from epmoe.comm import COMM_BACKENDS
from epmoe.comm.payload import PAYLOADS
from epmoe.config import ROUTINGS
from epmoe.experts import RUNNERS

WEIGHT_FORMATS = ("bf16", "fp8", "fp8_block", "nvfp4")
LAYOUTS = ("dp", "tp")
DEVICES = ("cpu", "cuda")
# How a layer gets its routing: one of the router functions from logits, or "routed" (ids and
# weights from the caller, e.g. RL routing replay).
ROUTING_MODES = (*ROUTINGS, "routed")


@dataclass(frozen=True)
class Combo:
    """One way to run a layer.

    comm, runner: registry names. payload: what dispatch moves ("bf16" = activations as they
    are). weights: expert weight format. layout: "dp" or "tp". world: EP ranks. device:
    "cpu" or "cuda". graph: captured in a CUDA graph. nodes: hosts the ranks span. routing:
    one of ROUTING_MODES. static_shapes: the comm backend's `static_shapes` option is set.
    """

    comm: str = "none"
    runner: str = "reference"
    payload: str = "bf16"
    weights: str = "bf16"
    layout: str = "dp"
    world: int = 1
    device: str = "cpu"
    graph: bool = False
    nodes: int = 1
    routing: str = "softmax"
    static_shapes: bool = False

    def __str__(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def _rules(c: Combo) -> str | None:
    """The reason `c` cannot work, or None."""
    if c.routing not in ROUTING_MODES:
        return f"unknown routing mode {c.routing!r}; choose one of {', '.join(ROUTING_MODES)}"
    if c.comm not in COMM_BACKENDS:
        return f"unknown comm backend {c.comm!r}"
    if c.runner not in RUNNERS:
        return f"unknown expert runner {c.runner!r}"
    comm, runner = COMM_BACKENDS[c.comm], RUNNERS[c.runner]
    if c.layout not in comm.layouts:
        return f"comm {c.comm!r} serves the {'/'.join(comm.layouts)} layout, not {c.layout!r}"
    if c.comm == "none" and c.layout == "dp" and c.world > 1:
        return "comm 'none' moves no tokens: with several ranks it needs the tp layout"
    if c.layout == "tp" and c.comm != "none":
        return "the tp layout holds every token on every rank: use comm 'none'"
    if c.device not in getattr(comm, "devices", DEVICES):
        return f"comm {c.comm!r} runs on {'/'.join(getattr(comm, 'devices', DEVICES))}, not {c.device}"
    if c.device not in runner.devices:
        return f"runner {c.runner!r} runs on {'/'.join(runner.devices)}, not {c.device}"
    if c.weights not in runner.formats:
        return f"runner {c.runner!r} computes {'/'.join(runner.formats)} weights, not {c.weights}"
    payloads = getattr(comm, "payloads", ("bf16",))
    if c.payload not in payloads:
        return f"comm {c.comm!r} moves {'/'.join(payloads)} payloads, not {c.payload}"
    if c.static_shapes and not getattr(comm, "static_capable", False):
        return f"comm {c.comm!r} has no static_shapes option (only allgather and nccl_a2a size their collectives by it)"
    if c.nodes > 1 and getattr(comm, "single_node", False):
        return f"{c.comm} needs all ranks on one NVLink domain; use nccl_a2a across nodes"
    if c.graph and c.device != "cuda":
        return "CUDA graphs need a CUDA device"
    if c.graph and comm.needs_host_sync and not c.static_shapes:
        static = getattr(comm, "static_capable", False)
        fix = "; build it with static_shapes=True and max_tokens_per_rank" if static else ""
        return (f"comm {c.comm!r} exchanges token counts on the host each call, which a CUDA graph cannot "
                f"hold{fix}")
    if c.graph and getattr(runner, "needs_host_sync", False):
        return f"runner {c.runner!r} reads counts on the host, which a CUDA graph cannot hold"
    return None


def check(combo: Combo) -> tuple[bool, str]:
    """(True, "ok") or (False, the reason it cannot work)."""
    reason = _rules(combo)
    return (reason is None, reason or "ok")


def alternatives(combo: Combo, limit: int = 6) -> list[Combo]:
    """Valid combos that differ from `combo` in one field (comm, runner, payload, layout,
    static_shapes or graph)."""
    out = []
    for name, values in (("comm", sorted(COMM_BACKENDS)), ("runner", sorted(RUNNERS)),
                         ("payload", PAYLOADS), ("layout", LAYOUTS), ("static_shapes", (True, False)),
                         ("graph", (False,))):
        for v in values:
            alt = replace(combo, **{name: v})
            if alt != combo and _rules(alt) is None:
                out.append(alt)
    return out[:limit]


def ensure(combo: Combo) -> None:
    """Raise ValueError naming why `combo` cannot work and what would."""
    reason = _rules(combo)
    if reason is None:
        return
    alts = alternatives(combo)
    base = {f.name: getattr(combo, f.name) for f in fields(combo)}
    hint = "; ".join(
        ", ".join(f"{k}={v}" for k, v in vars(a).items() if base[k] != v) for a in alts
    ) or "none with one change"
    raise ValueError(f"unsupported combination ({combo}): {reason}. Valid alternatives: {hint}")


def all_combos(worlds: tuple[int, ...] = (1, 2, 3, 4), devices: tuple[str, ...] = DEVICES,
               routings: tuple[str, ...] = ROUTING_MODES) -> list[Combo]:
    """Every combination of registered pieces (valid or not), for the combinatorial tests."""
    return [
        Combo(comm=comm, runner=runner, payload=payload, weights=weights, layout=layout, world=world,
              device=device, graph=graph, routing=routing, static_shapes=static)
        for comm, runner, payload, weights, layout, world, device, graph, routing, static in itertools.product(
            sorted(COMM_BACKENDS), sorted(RUNNERS), PAYLOADS, WEIGHT_FORMATS, LAYOUTS, worlds, devices,
            (False, True), routings, (False, True),
        )
    ]


# ---------------------------------------------------------------------------------------
# auto
# ---------------------------------------------------------------------------------------

# Used where no crossover was measured for the GPU model: one-sided puts win while latency
# dominates (decode), NCCL's all-to-all once bandwidth does, all-gather for very large
# batches. Thresholds are tokens per rank (the largest over ranks); replaced per GPU model by
# `epmoe bench comm --store-crossovers`. A rung whose backend was built for fewer tokens (symm_a2a's
# default workspace holds 128) is skipped by pick_comm when it is given the capacities.
DEFAULT_CROSSOVERS: list[tuple[int | None, str]] = [(512, "symm_a2a"), (None, "nccl_a2a")]


def _crossover_file() -> Path:
    return Path(__file__).parent / "tuning" / "crossovers.json"


def crossovers(device_name: str, world: int, path: str | Path | None = None
               ) -> tuple[list[tuple[int | None, str]], str]:
    """The (max tokens, backend) ladder for a GPU model and world size, and where it came from.

    The file (default epmoe/tuning/crossovers.json) maps GPU model -> world size -> ladder:
    {"NVIDIA H200": {"4": [[128, "symm_a2a"], [null, "nccl_a2a"]]}}."""
    path = Path(path) if path is not None else _crossover_file()
    if path.exists():
        table = json.loads(path.read_text())
        entry = table.get(device_name, {}).get(str(world))
        if entry:
            return [(row[0], row[1]) for row in entry], f"measured ({path.name}: {device_name}, W={world})"
    return DEFAULT_CROSSOVERS, "defaults (nothing measured for this GPU and world size)"


def write_crossovers(device_name: str, world: int, ladder: list[tuple[int | None, str]],
                     path: str | Path | None = None) -> Path:
    """Store `ladder` for (device_name, world) in the file `crossovers` reads (other entries
    kept). The last rung must have no limit (None), so every token count has a backend."""
    if not ladder or ladder[-1][0] is not None:
        raise ValueError(f"a crossover ladder ends with (None, backend), got {ladder}")
    limits = [n for n, _ in ladder[:-1]]
    if any(n is None for n in limits) or limits != sorted(set(limits)):
        raise ValueError(f"ladder limits must increase, with only the last one None: {ladder}")
    path = Path(path) if path is not None else _crossover_file()
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(device_name, {})[str(world)] = [[n, name] for n, name in ladder]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path


def comm_capacity(backend: object) -> int | None:
    """The largest token count per rank one call of `backend` (an instance) accepts: its
    `max_tokens_per_rank` (a pre-sized workspace or a static bound), None when unbounded."""
    cap = getattr(backend, "max_tokens_per_rank", None)
    return int(cap) if cap is not None else None


def pick_comm(tokens: int, candidates: list[str], ladder: list[tuple[int | None, str]],
              capacities: Mapping[str, int | None] | None = None) -> str:
    """The first backend of the ladder whose limit covers `tokens`, that is a candidate and
    whose capacity holds `tokens`; falls back along the ladder, then to the first candidate.

    capacities: backend name -> `comm_capacity` of the built instance (None or absent =
    unbounded). A backend whose pre-sized workspace is smaller than `tokens` would raise, so it
    is never picked while another candidate fits; when none fits, the largest one is returned
    (its call raises the error that names max_tokens_per_rank)."""
    caps = capacities or {}
    fits = [n for n in candidates if caps.get(n) is None or tokens <= caps[n]]
    if not fits:
        return max(candidates, key=lambda n: caps[n])
    for limit, name in ladder:
        if (limit is None or tokens <= limit) and name in fits:
            return name
    for _, name in reversed(ladder):
        if name in fits:
            return name
    return fits[0]


def pick_runner(device: str, weights: str, graph: bool = False) -> str:
    """The fastest registered runner for the device and weight format (Triton on CUDA)."""
    order = ["triton", "reference"] if device == "cuda" else ["reference"]
    for name in order:
        if name in RUNNERS and _rules(Combo(runner=name, weights=weights, device=device, graph=graph)) is None:
            return name
    raise ValueError(f"no registered runner computes {weights} weights on {device}")


def comm_candidates(combo: Combo) -> list[str]:
    """Registered backends that can run `combo` with its comm field replaced (static_shapes
    counts only for the backends that have the option)."""
    out = []
    for n in sorted(COMM_BACKENDS):
        static = combo.static_shapes and getattr(COMM_BACKENDS[n], "static_capable", False)
        if _rules(replace(combo, comm=n, static_shapes=static)) is None:
            out.append(n)
    return out
