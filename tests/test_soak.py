"""The CI slice of the randomized multi-rank soak (tests/soak.py): a fixed seed, a few hundred
calls over 2, 3 and 4 gloo ranks, and a few faults, every rank raising within the timeout."""

import random

from tests import soak


def test_soak_calls_match_the_reference_and_repeat_bitwise():
    s = soak.soak_calls(240, seed=1)
    assert s.calls == 240
    assert (s.wrong, s.nondet, s.errors) == (0, 0, 0), "\n".join(s.notes[:10])


def test_fault_soak_every_rank_raises_never_hangs():
    f = soak.soak_faults(24, seed=2, terminal_share=0, chunk=12)
    assert (f.faults, f.ok, f.hangs, f.wrong) == (24, 24, 0, 0), "\n".join(f.notes[:10])


def test_a_rank_that_skips_or_exits_makes_the_others_raise_naming_it():
    rng = random.Random(3)
    for kind in ("skip", "exit"):
        ok, hang, note = soak._terminal_trial(rng, collective_timeout=2.0, kind=kind)
        assert ok and not hang, note
