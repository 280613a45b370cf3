"""epmoe/ops/launch.py: the launcher that skips JITFunction.run's per-call work.

CPU: the specialization key separates everything Triton specializes on (a key coarser than
Triton's would launch the wrong binary), and interpreted kernels take Triton's own path.
GPU (marked): launches through the kept compiled kernel equal plain launches over the cases that
change Triton's specialization (alignment, ints equal to 1 or divisible by 16, None, constexprs
passed by position or keyword), and a kept key never serves an argument set it does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import triton
import triton.language as tl

from epmoe.ops.launch import Launcher, _split, launcher

ON_GPU = torch.cuda.is_available()


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, alpha, bias_ptr, SCALE: tl.constexpr, BLOCK: tl.constexpr = 64):
    """out[i] = SCALE * alpha * x[i] + y[i] (+ bias[0]) for i < n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = SCALE * alpha * tl.load(x_ptr + offs, mask=mask, other=0.0) + tl.load(y_ptr + offs, mask=mask, other=0.0)
    if bias_ptr is not None:
        v += tl.load(bias_ptr)
    tl.store(out_ptr + offs, v, mask=mask)


def _key(*args: object) -> tuple:
    split = _split(args, frozenset())
    assert split is not None
    return split[0]


def test_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.float32)
    aligned, unaligned = base[:32], base[1:33]  # 4-byte offset: not 16-byte aligned
    assert _key(aligned) != _key(unaligned)
    assert _key(aligned) != _key(aligned.half())
    assert _key(aligned) == _key(torch.ones(8))  # same dtype, device and alignment: one binary
    assert len({_key(v) for v in (1, 2, 16, 17, 32)}) == 3  # == 1, % 16 == 0, other
    assert _key(5) != _key(2**40) != _key(2**63 + 5)  # 32-bit, 64-bit, unsigned 64-bit
    assert _key(None) != _key(0.5) != _key(True) != _key(False)
    assert _split((object(),), frozenset()) is None  # a type the key does not cover: Triton's path
    constexpr = frozenset({0})  # a constexpr passed by position is keyed by its value
    assert _split((2,), constexpr)[0] != _split((3,), constexpr)[0]


def test_tensors_travel_as_addresses():
    x = torch.arange(4.0)
    _, out = _split((x, 3, None), frozenset())
    assert out == [x.data_ptr(), 3, None]


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs kernels only without a GPU here")
def test_interpreted_kernels_take_tritons_path():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 at import")
    la = Launcher(_axpy_kernel)
    assert not la.fast
    x, y, out = torch.arange(10.0), torch.ones(10), torch.empty(10)
    la[(1,)](x, y, out, 10, 2.0, None, SCALE=3)
    torch.testing.assert_close(out, 6 * x + 1)
    assert launcher(_axpy_kernel) is launcher(_axpy_kernel)


def test_hooks_count_only_when_set():
    from epmoe.ops.launch import _hooked

    class Chain:  # Triton >= 3.6 keeps launch hooks in a HookChain, empty by default
        def __init__(self, calls):
            self.calls = calls

    assert not _hooked(None) and not _hooked(Chain([]))
    assert _hooked(Chain([print])) and _hooked(print)


@dataclass(frozen=True)
class Case:
    n: int
    offset: int = 0  # elements into the buffers: 1 makes every pointer unaligned
    bias: bool = False
    scale: int = 1
    by_keyword: bool = False  # BLOCK passed as a keyword (else its default)

    @property
    def name(self) -> str:
        extra = ("_bias" if self.bias else "") + ("_kw" if self.by_keyword else "")
        return f"n{self.n}_off{self.offset}_s{self.scale}{extra}"


CASES = [Case(0), Case(1), Case(16), Case(17), Case(300), Case(300, offset=1), Case(1, offset=1),
         Case(64, bias=True), Case(64, scale=2), Case(64, by_keyword=True), Case(33, offset=1, bias=True, scale=3)]


@pytest.mark.gpu
def test_fast_launches_equal_plain_launches_over_specializations():
    la = Launcher(_axpy_kernel, fast=True)
    assert la.fast
    buf = torch.randn(3, 1024, device="cuda")
    bias = torch.tensor([0.25], device="cuda")
    for round_ in range(3):  # round 0 compiles and keeps; rounds 1 and 2 launch through the kept kernels
        for c in CASES:
            x, y = buf[0, c.offset:c.offset + c.n], buf[1, c.offset:c.offset + c.n]
            out = torch.full((c.n + c.offset,), float("nan"), device="cuda")[c.offset:]
            kw = {"SCALE": c.scale, **({"BLOCK": 128} if c.by_keyword else {})}
            block = kw.get("BLOCK", 64)
            la[(max(1, triton.cdiv(c.n, block)),)](x, y, out, c.n, 0.5, bias if c.bias else None, **kw)
            want = c.scale * 0.5 * x + y + (0.25 if c.bias else 0.0)
            torch.testing.assert_close(out, want, msg=f"{c.name}, round {round_}")
    assert len(la.entries) == len({(c.n == 1, c.n % 16 == 0, c.offset, c.bias, c.scale, c.by_keyword) for c in CASES})


@pytest.mark.gpu
def test_fast_launch_follows_the_current_stream_and_graph_capture():
    la = Launcher(_axpy_kernel, fast=True)
    x, y = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
    out = torch.empty(256, device="cuda")
    la[(4,)](x, y, out, 256, 1.0, None, SCALE=1)  # compiles and keeps
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        la[(4,)](x, y, out, 256, 2.0, None, SCALE=1)  # kept kernel, on the capture stream
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 2.0 * x + y)
