"""What works with what: one table, and `auto` choices.

    check(Combo(comm="nccl_a2a", runner="triton", ...)) -> (ok, reason)

Every rule lives in `_rules`, read off the registered classes' declared capabilities (comm/base.py,
experts/base.py), never their names; `ensure(combo)` raises the reason and the valid alternatives.
comm="auto" follows a crossover ladder (`crossovers`, `pick_comm`) stored in epmoe/tuning/crossovers.json.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from epmoe.comm import COMM_BACKENDS, CommBackend
from epmoe.comm.payload import PAYLOADS
from epmoe.config import ROUTINGS
from epmoe.experts import RUNNERS
from epmoe.experts.base import weight_family

# "bf16" stands for the unquantized family (bf16, fp16 and fp32 alike, see experts.base.weight_family).
WEIGHT_FORMATS = ("bf16", "fp8", "fp8_block", "nvfp4")
LAYOUTS = ("dp", "tp")
DEVICES = ("cpu", "cuda")
# A router function from logits, or "routed" (ids and weights from the caller, e.g. RL routing replay).
ROUTING_MODES = (*ROUTINGS, "routed")


@dataclass(frozen=True)
class Combo:
    """One way to run a layer.

    comm, runner: registry names. payload: what dispatch moves ("bf16" = activations as they
    are). weights: ExpertWeights.format (bf16/fp16/fp32 held to the same rules). world: EP ranks.
    graph: captured in a CUDA graph. nodes: hosts the ranks span. routing: one of ROUTING_MODES.
    static_shapes: the comm backend's `static_shapes` option is set.
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


def _names(ok: Callable[[type], bool], joint: str = " or ") -> str:
    """The registered comm backends for which ok(class) holds, quoted and joined."""
    return joint.join(repr(n) for n in sorted(COMM_BACKENDS) if ok(COMM_BACKENDS[n])) or "none registered"


def _rules(c: Combo) -> str | None:
    """The reason `c` cannot work, or None."""
    if c.world < 1:
        return f"world={c.world}: a layer needs at least one EP rank (world >= 1)"
    if c.nodes < 1:
        return f"nodes={c.nodes}: the ranks span at least one host (nodes >= 1)"
    if c.nodes > c.world:
        return f"nodes={c.nodes} > world={c.world}: every host holds at least one rank (nodes <= world)"
    if c.routing not in ROUTING_MODES:
        return f"unknown routing mode {c.routing!r}; choose one of {', '.join(ROUTING_MODES)}"
    if c.comm not in COMM_BACKENDS:
        return f"unknown comm backend {c.comm!r}"
    if c.runner not in RUNNERS:
        return f"unknown expert runner {c.runner!r}"
    if c.graph and c.device != "cuda":
        return "CUDA graphs need a CUDA device"
    return _comm_rules(c, COMM_BACKENDS[c.comm]) or _runner_rules(c, RUNNERS[c.runner])


def _comm_rules(c: Combo, comm: type) -> str | None:
    """The reason the comm backend class `comm` cannot run `c`, or None."""
    if c.layout not in comm.layouts:
        return f"comm {c.comm!r} serves the {'/'.join(comm.layouts)} layout, not {c.layout!r}"
    if not comm.moves_tokens and c.layout == "dp" and c.world > 1:
        return f"comm {c.comm!r} moves no tokens: with several ranks it needs the tp layout"
    if c.layout == "tp" and comm.moves_tokens:
        return f"the tp layout holds every token on every rank: use comm {_names(lambda b: not b.moves_tokens)}"
    if c.device not in comm.devices:
        return f"comm {c.comm!r} runs on {'/'.join(comm.devices)}, not {c.device}"
    if c.payload not in comm.payloads:
        return f"comm {c.comm!r} moves {'/'.join(comm.payloads)} payloads, not {c.payload}"
    if c.static_shapes and not comm.static_capable:
        return (f"comm {c.comm!r} has no static_shapes option (only {_names(lambda b: b.static_capable, ' and ')} "
                "size their collectives by it)")
    if c.nodes > 1 and comm.single_node:
        across = _names(lambda b: b.moves_tokens and not b.single_node)
        return f"{c.comm} needs all ranks on one NVLink domain; use {across} across nodes"
    if c.graph and comm.needs_host_sync and not c.static_shapes:
        fix = "; build it with static_shapes=True and max_tokens_per_rank" if comm.static_capable else ""
        return f"comm {c.comm!r} exchanges token counts on the host each call, which a CUDA graph cannot hold{fix}"
    return None


def _runner_rules(c: Combo, runner: type) -> str | None:
    """The reason the expert runner class `runner` cannot run `c`, or None."""
    if c.device not in runner.devices:
        return f"runner {c.runner!r} runs on {'/'.join(runner.devices)}, not {c.device}"
    if weight_family(c.weights) not in runner.formats:
        return f"runner {c.runner!r} computes {'/'.join(runner.formats)} weights, not {c.weights}"
    if c.graph and runner.needs_host_sync:
        return f"runner {c.runner!r} reads counts on the host, which a CUDA graph cannot hold"
    return None


def check(combo: Combo) -> tuple[bool, str]:
    """(True, "ok") or (False, the reason it cannot work)."""
    reason = _rules(combo)
    return (reason is None, reason or "ok")


def alternatives(combo: Combo, limit: int = 6) -> list[Combo]:
    """Valid combos that differ from `combo` in one field (comm, runner, payload, layout, static_shapes, graph)."""
    choices = (("comm", sorted(COMM_BACKENDS)), ("runner", sorted(RUNNERS)), ("payload", PAYLOADS),
               ("layout", LAYOUTS), ("static_shapes", (True, False)), ("graph", (False,)))
    alts = (replace(combo, **{name: v}) for name, values in choices for v in values)
    return [a for a in alts if a != combo and _rules(a) is None][:limit]


def ensure(combo: Combo) -> None:
    """Raise ValueError naming why `combo` cannot work and what would."""
    reason = _rules(combo)
    if reason is None:
        return
    base = vars(combo)
    hint = "; ".join(", ".join(f"{k}={v}" for k, v in vars(a).items() if base[k] != v)
                     for a in alternatives(combo)) or "none with one change"
    raise ValueError(f"unsupported combination ({combo}): {reason}. Valid alternatives: {hint}")


def all_combos(worlds: tuple[int, ...] = (1, 2, 3, 4), devices: tuple[str, ...] = DEVICES,
               routings: tuple[str, ...] = ROUTING_MODES) -> list[Combo]:
    """Every combination of registered pieces (valid or not), for the combinatorial tests."""
    keys = ("comm", "runner", "payload", "weights", "layout", "world", "device", "graph", "routing", "static_shapes")
    values = (sorted(COMM_BACKENDS), sorted(RUNNERS), PAYLOADS, WEIGHT_FORMATS, LAYOUTS, worlds, devices,
              (False, True), routings, (False, True))
    return [Combo(**dict(zip(keys, v))) for v in itertools.product(*values)]


# --- auto -------------------------------------------------------------------------------

_CROSSOVER_FILE = Path(__file__).parent / "tuning" / "crossovers.json"
# The ladder where nothing was measured for the GPU and world size (the file's "default"); thresholds
# are tokens per rank (the largest over ranks), measured per GPU by `epmoe bench comm --store-crossovers`.
DEFAULT_CROSSOVERS: list[tuple[int | None, str]] = [
    (row[0], row[1]) for row in json.loads(_CROSSOVER_FILE.read_text())["default"]["*"]]


def crossovers(device_name: str, world: int, path: str | Path | None = None
               ) -> tuple[list[tuple[int | None, str]], str]:
    """The (max tokens, backend) ladder for a GPU model and world size, and where it came from.

    The file (default epmoe/tuning/crossovers.json) maps GPU model -> world size -> ladder:
    {"NVIDIA H200": {"4": [[128, "symm_a2a"], [null, "nccl_a2a"]]}}; else DEFAULT_CROSSOVERS."""
    path = Path(path) if path is not None else _CROSSOVER_FILE
    entry = json.loads(path.read_text()).get(device_name, {}).get(str(world)) if path.exists() else None
    if entry:
        return [(row[0], row[1]) for row in entry], f"measured ({path.name}: {device_name}, W={world})"
    return DEFAULT_CROSSOVERS, "defaults (nothing measured for this GPU and world size)"


def write_crossovers(device_name: str, world: int, ladder: list[tuple[int | None, str]],
                     path: str | Path | None = None) -> Path:
    """Store `ladder` for (device_name, world) in the file `crossovers` reads (other entries kept).
    The last rung must have no limit (None), so every token count has a backend."""
    if not ladder or ladder[-1][0] is not None:
        raise ValueError(f"a crossover ladder ends with (None, backend), got {ladder}")
    limits = [n for n, _ in ladder[:-1]]
    if any(n is None for n in limits) or limits != sorted(set(limits)):
        raise ValueError(f"ladder limits must increase, with only the last one None: {ladder}")
    path = Path(path) if path is not None else _CROSSOVER_FILE
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(device_name, {})[str(world)] = [[n, name] for n, name in ladder]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path


def comm_capacity(backend: CommBackend) -> int | None:
    """The largest token count per rank one call of `backend` accepts (its `capacity`), None = unbounded."""
    return backend.capacity


def pick_comm(tokens: int, candidates: list[str], ladder: list[tuple[int | None, str]],
              capacities: Mapping[str, int | None] | None = None) -> str:
    """The first ladder backend whose limit covers `tokens`, a candidate whose capacity (name ->
    `comm_capacity`, None / absent: unbounded) holds them; else along the ladder, then the first
    candidate; none fits: the largest (its call raises the error naming max_tokens_per_rank)."""
    caps = capacities or {}
    fits = [n for n in candidates if caps.get(n) is None or tokens <= caps[n]]
    if not fits:
        return max(candidates, key=lambda n: caps[n])
    for limit, name in ladder:
        if (limit is None or tokens <= limit) and name in fits:
            return name
    return next((name for _, name in reversed(ladder) if name in fits), fits[0])


def pick_runner(device: str, weights: str, graph: bool = False) -> str:
    """The registered runner of highest declared `priority` that computes `weights` on `device`
    (and sits in a CUDA graph, with graph=True)."""
    fits = [n for n in RUNNERS if _runner_rules(Combo(runner=n, weights=weights, device=device, graph=graph),
                                                RUNNERS[n]) is None]
    if not fits:
        raise ValueError(f"no registered runner computes {weights} weights on {device}"
                         + (" inside a CUDA graph" if graph else ""))
    return max(fits, key=lambda n: (RUNNERS[n].priority, n))


def comm_candidates(combo: Combo) -> list[str]:
    """Registered backends that can run `combo` with its comm field replaced (static_shapes
    counts only for the backends that have the option)."""
    return [n for n in sorted(COMM_BACKENDS)
            if _rules(replace(combo, comm=n, static_shapes=combo.static_shapes and COMM_BACKENDS[n].static_capable))
            is None]
