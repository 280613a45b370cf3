"""`auto`: a composite comm backend that runs each call on one of its candidates.

    tokens  = max over ranks of T          one all_gather_ints of one int per call (skipped on
                                           one rank, with one candidate, and while a CUDA graph
                                           is captured: the bucket size stands in for it)
    backend = the first rung of the crossover ladder whose limit covers tokens, that is a
              candidate and whose capacity holds tokens            (select.pick_comm)
    dispatch, combine = backend's, with max_tokens = tokens

The layer builds it for comm="auto" (not registered: it moves nothing itself). Candidates: every
registered backend select.py's table allows for the layer's combination with the options it names
(on one rank or with the tp layout only those with moves_tokens=False). The ladder comes from
epmoe/tuning/crossovers.json (select.crossovers) per GPU model and world size, else its default.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from epmoe.comm.base import CommBackend, CommOptions, Dispatched, agree, capturing, check_keys, option_names
from epmoe.comm.payload import PAYLOADS
from epmoe.comm.registry import COMM_BACKENDS
from epmoe.config import MoEConfig
from epmoe.group import Pending, Placement, RankGroup
from epmoe.routing import Routing
from epmoe.select import DEVICES, LAYOUTS, Combo, check, crossovers, pick_comm


def device_name(device: torch.device) -> str:
    """The GPU model crossovers are measured for ("cpu" off CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass(frozen=True)
class AutoOptions(CommOptions):
    """auto has no options of its own: each candidate gets the keys its own Options has."""


@dataclass
class AutoHandle:
    """backend: the candidate that dispatched the call; handle: its own handle."""

    backend: CommBackend
    handle: Any


class AutoComm(CommBackend):
    """Picks a candidate per call by the largest token count over ranks (see the module docstring).
    options: keyword options for the candidates, each a field of at least one candidate's Options;
    combo: the layer's combination (its comm, payload and static_shapes fields are ignored)."""

    name = "auto"
    layouts = LAYOUTS
    payloads = PAYLOADS
    devices = DEVICES
    needs_host_sync = True  # the per-call agreement on max T, with several ranks
    static_capable = False
    single_node = False
    moves_tokens = True
    split_phase = True  # forwards the candidate's halves (which overlap where it has split phases)
    Options = AutoOptions

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement,
                 options: Mapping[str, Any] | None = None, *, device: torch.device | str, dtype: torch.dtype,
                 combo: Combo) -> None:
        super().__init__(cfg, group, placement, AutoOptions(), device=device, dtype=dtype)
        chosen = self.candidates(combo, dict(options or {}))
        self.backends: dict[str, CommBackend] = {
            n: COMM_BACKENDS[n](cfg, group, placement, o, device=device, dtype=dtype) for n, o in chosen.items()}
        # the crossover ladder (None with one candidate)
        self.ladder = crossovers(device_name(self.device), self.world)[0] if len(self.backends) > 1 else None
        caps = [b.capacity for b in self.backends.values()]
        self.capacity = None if None in caps else max(caps)
        self.allowed: list[str] | None = None  # while set (graph capture), the only names that may be picked
        self._current = next(iter(self.backends.values()))
        self.current = self.pick(1)  # the candidate of the last call; before any, the pick for one token

    @staticmethod
    def candidates(combo: Combo, options: Mapping[str, Any]) -> dict[str, CommOptions]:
        """name -> Options (its make_options) of every backend the table allows for combo with the
        payload and static_shapes of the options it names. A key no backend fitting combo (with
        default options) has raises; on one rank or with tp only backends that move no tokens stay."""
        fits: dict[str, CommOptions] = {}
        reasons = []
        names: set[str] = set()  # the options of every backend that fits combo with its defaults
        for n in sorted(COMM_BACKENDS):
            cls = COMM_BACKENDS[n]
            plain = dataclasses.replace(combo, comm=n, payload="bf16", static_shapes=False)
            own = {k: v for k, v in options.items() if k in option_names(cls)}
            mine = dataclasses.replace(plain, payload=own.get("payload") or "bf16",
                                       static_shapes=bool(own.get("static_shapes", False)))
            if check(plain)[0]:
                names.update(option_names(cls))
            ok, reason = check(mine)
            if ok:
                fits[n] = cls.make_options(**own)
            else:
                reasons.append(f"{n}: {reason}")
        check_keys("comm 'auto'", options, sorted(names), "its candidates' options")
        if combo.layout == "tp" or combo.world == 1:
            fits = {n: o for n, o in fits.items() if not COMM_BACKENDS[n].moves_tokens}
            reasons.append("on one rank or with the tp layout auto runs only backends that move no tokens")
        if not fits:
            shown = dataclasses.replace(combo, comm="auto", payload=options.get("payload") or "bf16",
                                        static_shapes=bool(options.get("static_shapes", False)))
            raise ValueError(f"comm 'auto': no registered backend can run ({shown}): " + "; ".join(reasons))
        return fits

    @property
    def current(self) -> CommBackend:
        """The candidate of the last call."""
        return self._current

    @current.setter
    def current(self, backend: CommBackend) -> None:
        self._current, self.payload, self.static_shapes = backend, backend.payload, backend.static_shapes

    @property
    def graph_safe(self) -> bool:
        """Whether the current candidate can sit in a CUDA graph (a capture agrees on no T)."""
        return self._current.graph_safe

    def agree_tokens(self, x: torch.Tensor) -> int | None:
        """The bound on every rank's T that picks this call's backend: the largest T over ranks (one
        small exchange); T itself on one rank or while capturing (the graph's bucket); None with one
        candidate over several ranks (no exchange)."""
        if self.world > 1 and self.ladder is None:
            return None
        if self.world == 1 or self.allowed is not None or capturing(x):
            return x.shape[0]
        return max(t for (t,) in agree(self.group, "comm 'auto'", {}, [x.shape[0]], device=self.device))

    def fail(self, failure: BaseException, device: torch.device) -> NoReturn:
        """Report `failure` in the exchange this call's peers enter first: auto's agreement on T
        (with a ladder), else the one candidate's own (`CommBackend.fail`)."""
        if self.world > 1 and self.ladder is not None and self.allowed is None and not (
                device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            agree(self.group, "comm 'auto'", {}, [0], device=self.device, failure=failure)
        self._current.fail(failure, device)

    def pick(self, tokens: int) -> CommBackend:
        """The candidate for a call whose ranks hold at most `tokens` tokens each."""
        if self.ladder is None:
            return self._current
        names = self.allowed or list(self.backends)
        caps = {n: self.backends[n].capacity for n in names}
        return self.backends[pick_comm(tokens, names, self.ladder, capacities=caps)]

    def dispatch_start(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None
                       ) -> Pending[Dispatched]:
        """max_tokens: the agreed bound when the caller already has it (a graph bucket, or the
        layer's replay check); else auto agrees on it here."""
        tokens = max_tokens if max_tokens is not None else self.agree_tokens(x)
        self.current = backend = self.pick(tokens if tokens is not None else x.shape[0])
        inner = backend.dispatch_start(x, routing, max_tokens=tokens)

        def wrap() -> Dispatched:
            wrapped = copy.copy(inner.wait())  # no __post_init__ again: the runner sees the same rows
            wrapped.handle = AutoHandle(backend, wrapped.handle)
            return wrapped

        return Pending(wrap)

    def combine_start(self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                      addend: torch.Tensor | None = None) -> Pending[torch.Tensor]:
        h: AutoHandle = dispatched.handle
        inner = copy.copy(dispatched)
        inner.handle = h.handle
        return h.backend.combine_start(expert_out, inner, out, addend=addend)

    def check(self) -> None:
        for b in self.backends.values():
            b.check()

    def after_replay(self) -> None:
        self._current.after_replay()
