"""Per-call agreement for a backend that exchanges nothing on the host (symm_a2a).

Backends with a count exchange (allgather, nccl_a2a) carry a rank's failure in it (`agree`'s
failure slot, comm/base.py). symm_a2a moves data through flags in memory only, so without an
exchange a rank whose own checks fail would leave its peers waiting for its flags until
`timeout_s`. `CallAgreement` gives its eager blocking call one small host exchange first:

    every rank, before any flag is written:
        check()                        this rank's own checks (a failure is not raised yet)
        agree(call number, failure)    one all_gather_ints of 17 ints over the group
    a rank that failed re-raises its error; every peer raises PeerFailedError naming it and
    its reason; a rank that skipped a call is named by the call number (or, when it never
    comes, by the group's bounded wait: CollectiveTimeoutError naming it)

Nothing is exchanged on one rank, while a CUDA graph is captured (a replay's checks are the
caller's: `capture_graphs(validate=)`), or in the split phases (dispatch_send / dispatch_recv),
which single-threaded drivers of virtual ranks call for every rank in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import torch

from epmoe.comm.base import agree, capturing
from epmoe.group import RankGroup


def _capturing_on(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class CallAgreement:
    """The call agreement of one backend on one rank (module docstring). who: how errors name
    the backend and rank ("symm_a2a rank 1"); device: where the group's exchange runs (the
    backend's device: CPU for gloo, the rank's GPU for NCCL)."""

    def __init__(self, who: str, group: RankGroup | None, device: torch.device) -> None:
        self.who, self.group, self.device = who, group, device
        self.calls = 0  # agreed calls so far: a field every rank must share

    def active(self, x: torch.Tensor) -> bool:
        """Whether a call on x agrees first: several ranks, eager (not captured)."""
        return self.group is not None and self.group.world > 1 and not capturing(x)

    def run(self, check: Callable[[], None]) -> None:
        """check() (this rank's own checks), then the agreement: returns on every rank or raises
        on every rank (the failing one its own error, the others PeerFailedError)."""
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - re-raised by fail after the peers are told
            self.fail(exc, self.device)
        self._agree(None)

    def fail(self, failure: BaseException, device: torch.device) -> NoReturn:
        """This rank failed a call's checks (its own, or the layer's before dispatch; device: the
        call's): take part in the call's agreement with `failure` (several ranks, not while a
        CUDA graph is captured on device), then raise it."""
        if self.group is not None and self.group.world > 1 and not _capturing_on(device):
            self._agree(failure)
        raise failure

    def _agree(self, failure: BaseException | None) -> None:
        self.calls += 1
        agree(self.group, f"{self.who}, call {self.calls}", {"call number (a rank skipped a call)": self.calls},
              device=self.device, failure=failure,
              fix="Every rank must make the same calls, in the same order")
