"""Expert-parallel rank groups and expert placement.

Comm backends talk to other ranks only through `RankGroup`: `all_reduce`, `all_gather`,
`all_to_all_v`, `barrier` (and `all_gather_ints`); `start_*` post one and return a `Pending`.
`EPGroup` implements it over a torch.distributed process group; `VirtualGroup(W).run(fn)` runs
fn(rank_group) on W ranks, one Python thread each, through a shared rendezvous, so the same
backend code runs on one device.
`Placement` maps each global expert to (rank, local index); kernels read the map, never recompute it.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class Pending(Generic[T]):
    """A result still in flight (a posted collective, a split comm call): `wait()` finishes it
    and returns it; later waits return the same value."""

    def __init__(self, finish: Callable[[], T]) -> None:
        self._finish: Callable[[], T] | None = finish
        self._value: Any = None

    @classmethod
    def done(cls, value: T) -> Pending[T]:
        """A result already there."""
        return cls(lambda: value)

    def wait(self) -> T:
        if self._finish is not None:
            self._value, self._finish = self._finish(), None
        return self._value


@dataclass(frozen=True)
class Placement:
    """Where each expert lives."""

    expert_rank: torch.Tensor  # [E] int32, rank owning expert e
    expert_local: torch.Tensor  # [E] int32, index of expert e among its rank's local experts
    world: int  # EP ranks
    local_experts: int  # experts per rank (every rank holds the same number)

    @classmethod
    def contiguous(cls, num_experts: int, world: int) -> Placement:
        """Rank r owns experts [r * E/W, (r + 1) * E/W)."""
        if world <= 0:
            raise ValueError(f"world size must be positive, got {world}")
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} is not divisible by the EP world size {world}; use a "
                             f"world size that divides it (e.g. one of "
                             f"{[w for w in range(1, num_experts + 1) if num_experts % w == 0][:8]})")
        per = num_experts // world
        e = torch.arange(num_experts, dtype=torch.int32)
        return cls(e // per, e % per, world, per)

    @property
    def num_experts(self) -> int:
        return self.expert_rank.numel()

    def global_ids(self, rank: int) -> torch.Tensor:
        """[local_experts] int64 global ids of `rank`'s experts, by local index."""
        owned = (self.expert_rank == rank).nonzero().flatten()
        return owned[self.expert_local[owned].argsort()]

    def to(self, device: torch.device | str) -> Placement:
        return Placement(self.expert_rank.to(device), self.expert_local.to(device), self.world, self.local_experts)


class RankGroup:
    """The collectives comm backends use. Counts and splits are host lists of ints. Every
    implementation declares these itself (never inherited; readers use them, no probing):"""

    rank: int
    world: int
    backend: str  # "nccl", "gloo", ... ("virtual" for VirtualGroup); allgather gathers with a2a on gloo
    nodes: int  # hosts the ranks span (1 for virtual ranks); select.py refuses single-node backends above 1
    virtual: bool  # ranks of one process exchanging through host threads, which no CUDA graph can hold
    call: str  # what the ranks are doing, named by a timeout ("MoELayer 3 call 17"; "" outside a call)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns t."""
        raise NotImplementedError

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[W, *t.shape]: every rank's t (same shape on all ranks)."""
        raise NotImplementedError

    def all_to_all_v(self, t: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
        """Rows t[sum(send[:j]) : sum(send[:j+1])] go to rank j; returns the received rows in
        rank order, [sum(recv_splits), *t.shape[1:]]."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    # Posted collectives: the same as above, waited for by `Pending.wait()`, so a caller can work
    # meanwhile. Here (virtual ranks) they complete before returning; EPGroup posts them async.
    def start_all_gather(self, t: torch.Tensor) -> Pending[torch.Tensor]:
        return Pending.done(self.all_gather(t))

    def start_all_to_all_v(self, t: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]
                           ) -> Pending[torch.Tensor]:
        return Pending.done(self.all_to_all_v(t, send_splits, recv_splits))

    def start_all_reduce(self, t: torch.Tensor) -> Pending[torch.Tensor]:
        return Pending.done(self.all_reduce(t))

    def _sends(self, t: torch.Tensor, send_splits: Sequence[int]) -> list[int]:
        """send_splits as ints, checked against t's rows."""
        send = [int(s) for s in send_splits]
        if t.shape[0] != sum(send):
            raise ValueError(f"all_to_all_v got {t.shape[0]} rows, send splits sum to {sum(send)}")
        return send

    def all_gather_ints(self, values: Sequence[int], device: torch.device | str = "cpu") -> list[list[int]]:
        """Exchange a short list of ints with every rank (one host sync)."""
        t = torch.tensor(list(values), dtype=torch.int64, device=device)
        return self.all_gather(t).tolist()


class EPGroup(RankGroup):
    """A `RankGroup` over a torch.distributed process group (default: the world group).

    nodes: hosts spanned; default: counted with one all-gather of host-name hashes (NCCL: set the device first).
    timeout: seconds a gloo collective may wait (None: the process group's; NCCL: its watchdog) before
    a `CollectiveTimeoutError` names the ranks that did not arrive (from the store) and the `call`.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, nodes: int | None = None,
                 timeout: float | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("EPGroup needs torch.distributed to be initialised (dist.init_process_group, e.g. "
                               "under torchrun); for one process use world=1 layers or VirtualGroup")
        self.pg = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        self.backend = dist.get_backend(process_group)
        self.virtual = False
        self.call = ""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.timeout = timeout
        self._ops = 0  # collectives so far (the key of the arrival marks after a timeout)
        if nodes is None:
            device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
            host = zlib.crc32(socket.gethostname().encode())  # this host's name as an int
            nodes = len(set(sum(self.all_gather_ints([host], device=device), []))) if self.world > 1 else 1
        if not isinstance(nodes, int) or not 1 <= nodes <= self.world:
            raise ValueError(f"nodes must be an int in [1, world={self.world}], got {nodes!r}")
        self.nodes = nodes

    def _post(self, op: str, start: Callable[..., Any], out: torch.Tensor) -> Pending[torch.Tensor]:
        """Post `start(async_op=True)` whose result is `out`; a failure or timeout (gloo: `timeout`) at
        the post or the wait becomes a `CollectiveTimeoutError` naming the late ranks and the call."""
        self._ops += 1
        limit = timedelta(seconds=self.timeout) if self.backend == "gloo" and self.timeout is not None else None
        try:
            work = start(True)
        except RuntimeError as exc:
            raise self._late(op, exc) from exc

        def finish() -> torch.Tensor:
            try:
                work.wait(limit) if limit is not None else work.wait()
            except RuntimeError as exc:
                raise self._late(op, exc) from exc
            return out

        return Pending(finish)

    def _late(self, op: str, exc: BaseException) -> CollectiveTimeoutError:
        """The error of collective `op` that failed with `exc`: which ranks did not arrive (each
        rank that waited marks its arrival in the store; marks are read for a grace period)."""
        grace = min(5.0, max(1.0, (self.timeout or 10.0) / 2))
        try:
            store = dist.distributed_c10d._get_default_store()
            name = getattr(self.pg, "group_name", "") if self.pg is not None else "world"
            # ranks in the same layer call meet at the same key even where a dead peer made them
            # fail in different collectives of it; outside a call, the collective's number
            key = f"epmoe/arrived/{name}/{self.call or self._ops}"
            store.set(f"{key}/{self.rank}", "1")
            deadline = time.monotonic() + grace
            while True:
                here = [r for r in range(self.world) if store.check([f"{key}/{r}"])]
                if len(here) == self.world or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            missing: list[int] | None = [r for r in range(self.world) if r not in here]
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; the error says so
            missing = None
        late = (f"ranks {missing} did not arrive" if missing else
                "every rank arrived (a collective of other sizes, or a transport error)" if missing == [] else
                "the late ranks are unknown (the store is unreachable: rank 0 may have left)")
        limit = f"within {self.timeout:g}s" if self.timeout is not None else "(process-group timeout)"
        return CollectiveTimeoutError(
            f"rank {self.rank}: {op} #{self._ops} of {self.call or 'no layer call'} did not complete {limit}: "
            f"{late} (they failed, left, skipped the call or called another collective); {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}", missing)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.start_all_reduce(t).wait()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.start_all_gather(t).wait()

    def all_to_all_v(self, t: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
        return self.start_all_to_all_v(t, send_splits, recv_splits).wait()

    def barrier(self) -> None:
        self._post("barrier", lambda a: dist.barrier(group=self.pg, async_op=a), torch.empty(0)).wait()

    def start_all_reduce(self, t: torch.Tensor) -> Pending[torch.Tensor]:
        return self._post("all_reduce", lambda a: dist.all_reduce(t, group=self.pg, async_op=a), t)

    def start_all_gather(self, t: torch.Tensor) -> Pending[torch.Tensor]:
        t = t.contiguous()
        out = t.new_empty((self.world, *t.shape))
        if self.backend == "gloo":
            return self._post("all_gather", lambda a: dist.all_gather(list(out.unbind(0)), t, group=self.pg,
                                                                      async_op=a), out)
        return self._post("all_gather", lambda a: dist.all_gather_into_tensor(out, t, group=self.pg, async_op=a), out)

    def start_all_to_all_v(self, t: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]
                           ) -> Pending[torch.Tensor]:
        send = self._sends(t, send_splits)
        recv = [int(s) for s in recv_splits]
        out = t.new_empty((sum(recv), *t.shape[1:]))
        t = t.contiguous()
        return self._post("all_to_all", lambda a: dist.all_to_all_single(out, t, recv, send, group=self.pg,
                                                                        async_op=a), out)


class CollectiveTimeoutError(RuntimeError):
    """A collective timed out or a peer left; `missing`: the ranks that did not arrive (None: unknown)."""

    def __init__(self, message: str, missing: list[int] | None) -> None:
        super().__init__(message)
        self.missing = missing


class PeerFailedError(ValueError):
    """Raised on every other rank when `ranks` failed their own checks (`reasons`: rank -> its message's start)."""

    def __init__(self, message: str, ranks: list[int], reasons: dict[int, str]) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.reasons = reasons


class VirtualGroupError(RuntimeError):
    """A virtual rank failed or a rendezvous timed out."""


class _Rendezvous:
    """Exchange one object per rank; every rank gets the list of all W objects."""

    def __init__(self, world: int, timeout: float) -> None:
        self.world = world
        self.timeout = timeout
        self.slots: list[Any] = [None] * world
        self.arrived: list[bool] = [False] * world
        self.barrier = threading.Barrier(world)
        self.ranks: list[Any] = [None] * world  # each rank's group (its `call` names a timeout)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.arrived[rank] = True
        self._wait(rank)
        values = list(self.slots)
        self._wait(rank)  # nobody overwrites a slot before everyone has read it
        self.arrived[rank] = False
        return values

    def _wait(self, rank: int) -> None:
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            missing = [r for r in range(self.world) if not self.arrived[r]]
            call = self.ranks[rank].call or "no layer call"
            raise VirtualGroupError(f"virtual rank {rank}: collective of {call} did not complete (timeout "
                                    f"{self.timeout:g}s); ranks {missing} never arrived (they failed or called a "
                                    "different collective)") from None

    def abort(self) -> None:
        self.barrier.abort()


class _VirtualRank(RankGroup):
    """One thread of a `VirtualGroup`: collectives go through host threads, so nothing here can
    sit in a CUDA graph."""

    backend = "virtual"
    nodes = 1
    virtual = True

    def __init__(self, rank: int, world: int, rdv: _Rendezvous) -> None:
        self.rank = rank
        self.world = world
        self.call = ""
        self._rdv = rdv
        rdv.ranks[rank] = self

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._rdv.exchange(self.rank, t.clone())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return t.copy_(total)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._rdv.exchange(self.rank, t.contiguous()))

    def all_to_all_v(self, t: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
        chunks = self._rdv.exchange(self.rank, list(t.split(self._sends(t, send_splits))))
        mine = [chunks[src][self.rank] for src in range(self.world)]
        got = [c.shape[0] for c in mine]
        if got != [int(s) for s in recv_splits]:
            raise ValueError(f"rank {self.rank}: expected {list(recv_splits)} rows, peers sent {got}")
        return torch.cat(mine).clone() if mine else t[:0]

    def barrier(self) -> None:
        self._rdv.exchange(self.rank, None)


class VirtualGroup:
    """W ranks in one process, one thread each, sharing one device. `run(fn)` calls fn(rank group) on
    every rank and returns their results; a rank that raises aborts the others' collectives and its
    error is re-raised naming it; a collective waiting over `timeout` s names the ranks never arrived."""

    backend = "virtual"
    nodes = 1
    virtual = True

    def __init__(self, world: int, timeout: float = 60.0) -> None:
        if world <= 0:
            raise ValueError(f"VirtualGroup world must be positive, got {world}")
        self.world = world
        self.timeout = timeout

    def run(self, fn: Callable[[RankGroup], T]) -> list[T]:
        rdv = _Rendezvous(self.world, self.timeout)
        ranks = [_VirtualRank(r, self.world, rdv) for r in range(self.world)]
        results: list[Any] = [None] * self.world
        errors: list[BaseException | None] = [None] * self.world

        def body(r: int) -> None:
            try:
                results[r] = fn(ranks[r])
            except BaseException as exc:  # re-raised on the caller's thread below
                errors[r] = exc
                rdv.abort()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 4)
        alive = [r for r, t in enumerate(threads) if t.is_alive()]
        if alive:
            rdv.abort()
            raise VirtualGroupError(f"virtual ranks {alive} did not finish within {self.timeout * 4}s")
        # Report the root cause first: a rank's own error before the aborts it caused.
        primary = [r for r, e in enumerate(errors)
                   if e is not None and not isinstance(e, (VirtualGroupError, PeerFailedError))]
        failed = primary or [r for r, e in enumerate(errors) if e is not None]
        if failed:
            r = failed[0]
            raise VirtualGroupError(f"virtual rank {r} failed: {errors[r]!r}") from errors[r]
        return results
