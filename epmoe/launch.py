"""Run a function on W ranks in separate processes; fail, never hang.

    results = run_ranks(fn, world=2, args=(cfg,))     # [fn(group, *args) on rank 0, ...]

Ranks use NCCL with one GPU each when `backend="nccl"`, else gloo on the CPU (the tests, `epmoe demo`
and `epmoe bench` outside torchrun). `fn` must be a module-level function (pickled by reference) taking
an `EPGroup` first. Workers live on between calls (one pool per world size: a process importing torch
costs seconds); a pool that failed or timed out is killed and started afresh. A rank that does not
answer within `timeout` seconds makes the call raise `DistTimeout` naming it; a rank that raises, `DistError`
with its traceback. Every collective inside is bounded too (`EPGroup(timeout=collective_timeout)`, default
min(timeout, 60) s): a rank waiting on a failed or absent peer raises `CollectiveTimeoutError` naming it.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_CTX = mp.get_context("spawn")
_POOLS: dict[tuple[int, str, float], _Pool] = {}


class DistError(RuntimeError):
    """A rank raised; the message holds its traceback."""


class DistTimeout(RuntimeError):
    """Some ranks did not finish in time; the message names them."""


def _worker(rank: int, world: int, port: int, inbox: Any, outbox: Any, pg_timeout: float, backend: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # gloo: EPGroup bounds each collective by pg_timeout itself, so the process group's own timeout
    # (which also bounds connecting to the store at start-up, slow on a loaded machine) may be longer
    setup = max(pg_timeout, 60.0) if backend == "gloo" else pg_timeout
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=setup))
    from epmoe.group import EPGroup

    group = EPGroup(timeout=pg_timeout)
    while (job := inbox.get()) is not None:
        fn, args, kwargs = job
        try:
            outbox.put((rank, True, fn(group, *args, **kwargs)))
        except BaseException:  # reported to the parent, which raises
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world: int, pg_timeout: float, backend: str) -> None:
        self.world, self.pg_timeout = world, pg_timeout
        self.outbox = _CTX.Queue()
        self.inboxes = [_CTX.Queue() for _ in range(world)]
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = [_CTX.Process(target=_worker, daemon=True,
                                   args=(r, world, port, self.inboxes[r], self.outbox, pg_timeout, backend))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list[Any]:
        for box in self.inboxes:
            box.put((fn, args, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        dead_at: float | None = None  # when a dead rank was first seen

        def detail() -> str:
            return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))

        while len(results) + len(errors) < self.world:
            now = time.monotonic()
            left = deadline - now
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in results and r not in errors]
            if dead and dead_at is None:
                dead_at = now
            # a dead rank never answers: give the live ones time to raise (their collectives are
            # bounded by pg_timeout) so their errors are reported with it, then stop waiting
            if left <= 0 or (dead_at is not None and now - dead_at > self.pg_timeout + 10):
                missing = [r for r in range(self.world) if r not in results and r not in errors]
                raise DistTimeout(f"{fn.__name__} on {self.world} ranks: ranks {missing} did not finish within "
                                  f"{now - deadline + timeout:.0f}s (dead processes: {dead}){detail()}")
            if dead and len(results) + len(errors) + len(dead) == self.world:
                dead_at = now - self.pg_timeout - 11  # every live rank answered: report now
                continue
            try:
                rank, ok, value = self.outbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            (results if ok else errors)[rank] = value
        if errors:
            raise DistError(f"{fn.__name__} failed on ranks {sorted(errors)}:{detail()}")
        return [results[r] for r in range(self.world)]

    def close(self) -> None:
        for box in self.inboxes:
            try:
                box.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()


def run_ranks(fn: Callable[..., Any], world: int, args: tuple = (), kwargs: dict | None = None,
              timeout: float = 120.0, backend: str = "gloo", collective_timeout: float | None = None) -> list[Any]:
    """Run fn(group, *args, **kwargs) on `world` ranks ("gloo" on the CPU, or "nccl" with one
    GPU per rank); return the per-rank results. timeout: seconds the whole call may take;
    collective_timeout: seconds one collective may wait inside the ranks (default
    min(timeout, 60); pools are kept per world, backend and this bound)."""
    if not 1 <= world <= 8:
        raise ValueError(f"world must be in 1..8, got {world}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < world:
            raise ValueError(f"nccl ranks need {world} GPUs, found {torch.cuda.device_count()}; use gloo")
    pg_timeout = float(collective_timeout) if collective_timeout is not None else min(timeout, 60.0)
    if not pg_timeout > 0:
        raise ValueError(f"collective_timeout must be positive seconds, got {collective_timeout!r}")
    key = (world, backend, pg_timeout)
    pool = _POOLS.get(key) or _POOLS.setdefault(key, _Pool(world, pg_timeout=pg_timeout, backend=backend))
    try:
        return pool.run(fn, args, kwargs or {}, timeout)
    except BaseException:  # a failed collective can leave peers blocked or the group poisoned: start afresh
        pool.close()
        _POOLS.pop(key, None)
        raise


@atexit.register
def _shutdown() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()
