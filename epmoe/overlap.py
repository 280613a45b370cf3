"""A side CUDA stream for work that runs beside a layer's exchange (the shared experts).

    fork = side.fork(x)                      an event on the current stream: where the side work may start
    ... launch dispatch's send half ...      (the exchange goes first on the host)
    out  = side.run(fork, fn, out)           fn() on the side stream, after `fork`, writing into `out`
    ... dispatch wait, experts, combine's send half ...
    side.join(x)                             the current stream waits for the side stream
    ... combine's wait reads `out` ...

Memory: `out` is allocated by the caller on the current stream, and the side stream only writes
into it (the shared experts' last cast or matmul writes there: no extra copy), so no tensor
allocated on the side stream is ever read on the current one (no `record_stream`, whose use
inside a CUDA-graph capture the caching allocator defers and has had bugs around). The side
stream's own intermediates are freed in its pool and reused only by its later work, which is
ordered after them. Inputs read on the side stream (x, the weights) were allocated on the current
stream; the caller's later frees and allocations there are ordered after `join`, so none reuses
them while the side stream still reads. Under a CUDA-graph capture the fork event and the join
make the side stream part of the captured graph (a fork and a join node), so replays overlap the
same way.

On the CPU, or with no stream (off), `fork` returns None and `run` calls fn inline: the same code
path minus the streams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SideStream:
    """One side stream on `device` (a CUDA device; elsewhere none: work runs inline), built once
    (outside any capture) with the event that marks each call's fork point."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self._fork = torch.cuda.Event() if cuda else None

    def fork(self, x: torch.Tensor) -> torch.cuda.Event | None:
        """Record where the side work may start on x's current stream (None off CUDA). The event is
        reused call after call: each `run` waits on its latest record, made by this call."""
        if self.stream is None or not x.is_cuda:
            return None
        self._fork.record(torch.cuda.current_stream(x.device))
        return self._fork

    def run(self, fork: torch.cuda.Event | None, fn: Callable[[torch.Tensor | None], torch.Tensor],
            out: torch.Tensor | None) -> torch.Tensor:
        """fn(out) on the side stream after `fork` (inline when fork is None). `out` must be
        allocated on the current stream (or None inline); fn writes its result there."""
        if fork is None:
            return fn(out)
        assert self.stream is not None and out is not None
        self.stream.wait_event(fork)
        with torch.cuda.stream(self.stream):
            return fn(out)

    def join(self, x: torch.Tensor) -> None:
        """x's current stream waits for everything launched on the side stream so far."""
        if self.stream is not None and x.is_cuda:
            torch.cuda.current_stream(x.device).wait_stream(self.stream)
