"""The fused routing kernel (`route_triton`) against its plain-torch twin (`route_torch`).

CPU: the Triton interpreter on fp32 / fp16 logits. GPU (marked): bf16 logits at model sizes and
a CUDA-graph replay with a device-side token count. Ids must match exactly, ties included;
rows past `num_valid` hold poison (huge logits) that must not leak into the valid rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epmoe.config import MoEConfig
from epmoe.ops.routing import kernel_supports, route_triton
from epmoe.routing import route, route_torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# Weights, relative: both sides compute the same formulas in fp32, but the CPU interpreter's
# exp (numpy) is not torch's (Sleef) and sums run in another order; measured max 3.4e-7.
# atol only covers probabilities that underflow to denormals, where relative error is meaningless.
TOL = {"rtol": 1e-6, "atol": 1e-35}

# (n_group, topk_group) per E for "sigmoid_grouped": odd group counts, a padded group (G=3 ->
# 4 tile groups), 3 experts per group (padded to 4), DeepSeek-V3's 8 groups keep 4.
GROUPS = {8: (4, 2), 12: (3, 2), 64: (8, 4), 128: (8, 3), 256: (8, 4)}
SMALL_GROUPS = {12: (4, 2)}  # 3 experts per group


@dataclass(frozen=True)
class Case:
    routing: str
    E: int
    K: int
    T: int = 33
    groups: tuple[int, int] = (1, 1)  # (n_group, topk_group), sigmoid_grouped only
    norm: bool = True
    scale: float = 1.0
    logits: str = "randn"  # randn | zeros | dups | group_dups | large | huge
    bias: str = "randn"  # randn | zeros | coarse (sigmoid modes)
    dtype: torch.dtype = torch.float32
    num_valid: int | None = None
    strided: bool = False  # logits a non-contiguous view

    def __str__(self) -> str:
        parts = [self.routing, f"E{self.E}", f"K{self.K}", f"T{self.T}"]
        if self.routing == "sigmoid_grouped":
            parts.append(f"G{self.groups[0]}k{self.groups[1]}")
        if not self.norm:
            parts.append("nonorm")
        if self.scale != 1.0:
            parts.append(f"x{self.scale}")
        if self.logits != "randn":
            parts.append(self.logits)
        if self.bias != "randn" and self.routing.startswith("sigmoid"):
            parts.append(f"bias-{self.bias}")
        if self.dtype != torch.float32:
            parts.append(str(self.dtype).removeprefix("torch."))
        if self.num_valid is not None:
            parts.append(f"valid{self.num_valid}")
        if self.strided:
            parts.append("strided")
        return "-".join(parts)

    def config(self) -> MoEConfig:
        n_group, topk_group = self.groups if self.routing == "sigmoid_grouped" else (1, 1)
        return MoEConfig(
            hidden=16, intermediate=8, num_experts=self.E, top_k=self.K, routing=self.routing,
            norm_topk_prob=self.norm, routed_scaling_factor=self.scale, n_group=n_group, topk_group=topk_group,
        )


def _grouped(E: int, K: int, **kw) -> Case:
    return Case("sigmoid_grouped", E, K, groups=GROUPS[E], **kw)


MODES = ("softmax", "softmax_after_topk", "sigmoid_bias", "sigmoid_grouped")


def _grid() -> list[Case]:
    cases = []
    # every mode x E x K at T=33 (several programs once E >= 64)
    for routing in MODES:
        for E in (8, 12, 64, 128, 256):
            for K in (1, 2, 8):
                if K > E:
                    continue
                if routing == "sigmoid_grouped":
                    n_group, topk_group = GROUPS[E]
                    if K > topk_group * (E // n_group):
                        continue
                    cases.append(_grouped(E, K, scale=2.5))
                else:
                    cases.append(Case(routing, E, K))
    for routing in MODES:
        g = {"groups": GROUPS[64]}
        # token counts: none, one, odd; many (E=8 tiles 64 tokens a program)
        cases += [Case(routing, 64, 8, T=T, **g) for T in (0, 1, 3)]
        cases.append(Case(routing, 8, 2, T=150, groups=GROUPS[8]))
        # renormalisation and scaling
        cases += [Case(routing, 64, 8, T=3, norm=norm, scale=scale, **g)
                  for norm in (True, False) for scale in (1.0, 2.5)]
        # ties: all-equal logits (ids 0..K-1), duplicated values, whole groups duplicated
        cases += [Case(routing, E, 8, T=3, logits="zeros", bias="zeros", groups=GROUPS[E]) for E in (12, 256)]
        cases += [Case(routing, E, K, logits="dups", bias="coarse", groups=GROUPS[E]) for E, K in ((12, 8), (128, 8))]
        cases.append(Case(routing, 64, 8, T=5, logits="group_dups", bias="zeros", **g))
        # magnitude: softmax underflows to 0 and sigmoid saturates (ties at 0 and 1)
        cases += [Case(routing, 64, 8, T=5, logits=kind, **g) for kind in ("large", "huge")]
        # fp16 logits, strided logits
        cases.append(Case(routing, 64, 8, T=5, logits="dups", dtype=torch.float16, **g))
        cases.append(Case(routing, 12, 2, T=5, strided=True, groups=SMALL_GROUPS[12]))
        # graph-bucket padding: none, part, all, more than T
        cases += [Case(routing, 64, 8, T=9, num_valid=n, **g) for n in (0, 4, 9, 20)]
        cases.append(Case(routing, 12, 2, T=1, num_valid=0, groups=SMALL_GROUPS[12]))
    return cases


CASES = _grid()


def _logits(case: Case, g: torch.Generator, device: str = "cpu") -> torch.Tensor:
    T, E = case.T, case.E
    if case.logits == "randn":
        x = torch.randn(T, E, generator=g)
    elif case.logits == "zeros":
        x = torch.zeros(T, E)
    elif case.logits == "dups":  # a few distinct values, each repeated across the row
        x = torch.randint(-3, 4, (T, E), generator=g).float() / 4
    elif case.logits == "group_dups":  # every group (and half group) holds the same values
        x = torch.randn(T, 4, generator=g).repeat(1, E // 4)
    elif case.logits == "large":  # softmax: most probabilities exactly 0
        x = torch.randn(T, E, generator=g) * 300
    else:  # "huge": fp16's range, exact ties at the top
        x = torch.randint(-2, 3, (T, E), generator=g).float() * 3e4
    if case.num_valid is not None:  # rows past num_valid are padding: poison them
        x[max(case.num_valid, 0):] = 6e4
    x = x.to(device=device, dtype=case.dtype)
    if case.strided:  # every other column of a wider buffer
        wide = torch.full((T, 2 * E), float("nan"), dtype=case.dtype, device=device)
        wide[:, ::2] = x
        x = wide[:, ::2]
    return x


def _bias(case: Case, g: torch.Generator, device: str = "cpu") -> torch.Tensor | None:
    if not case.routing.startswith("sigmoid"):
        return None
    if case.bias == "zeros":
        return torch.zeros(case.E, device=device)
    if case.bias == "coarse":
        return (torch.randint(-1, 2, (case.E,), generator=g).float() / 8).to(device)
    return (torch.randn(case.E, generator=g) * 0.1).to(device)


def _num_valid(case: Case, device: str = "cpu") -> torch.Tensor | None:
    if case.num_valid is None:
        return None
    return torch.tensor(case.num_valid, dtype=torch.int32, device=device)


def _check(case: Case, got, want) -> None:
    assert got.ids.dtype == torch.int32 and got.weights.dtype == torch.float32
    assert got.ids.shape == want.ids.shape == (case.T, case.K)
    assert torch.equal(got.ids, want.ids), f"ids differ:\n{got.ids}\nvs\n{want.ids}"
    torch.testing.assert_close(got.weights, want.weights, **TOL)


# numpy warns when sigmoid's exp(-x) overflows to inf for very negative logits; 1 / (1 + inf) = 0
# is the right answer (torch's too).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_torch(case: Case):
    g = torch.Generator().manual_seed(case.E * 1000 + case.K * 10 + case.T)
    cfg = case.config()
    logits, bias, num_valid = _logits(case, g), _bias(case, g), _num_valid(case)
    got = route_triton(logits, cfg, bias, num_valid)
    want = route_torch(logits, cfg, bias, num_valid)
    _check(case, got, want)

    if case.logits == "zeros":  # all ties: the lowest ids, in order
        assert got.ids.tolist() == [list(range(case.K))] * case.T
    if case.num_valid is not None:
        n = min(max(case.num_valid, 0), case.T)
        assert bool((got.ids[n:] == -1).all()) and bool((got.weights[n:] == 0).all())
        # the valid rows route as if the padding rows did not exist
        alone = route_torch(logits[:n], cfg, bias)
        assert torch.equal(got.ids[:n], alone.ids)
        torch.testing.assert_close(got.weights[:n], alone.weights, **TOL)


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(MODES), E=st.sampled_from([4, 8, 12, 24]), T=st.integers(0, 20), k=st.integers(1, 4),
       norm=st.booleans(), scale=st.sampled_from([1.0, 2.5]), coarse=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_matches_torch_random(mode, E, T, k, norm, scale, coarse, seed):
    kw = {"n_group": E // 4 if E > 4 else 2, "topk_group": 1} if mode == "sigmoid_grouped" else {}
    if mode == "sigmoid_grouped":
        k = min(k, E // kw["n_group"])
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=E, top_k=k, routing=mode, norm_topk_prob=norm,
                    routed_scaling_factor=scale, **kw)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1 if cfg.uses_correction_bias else None
    if coarse:  # many exact ties
        logits = logits.round()
        bias = bias.round() if bias is not None else None
    got, want = route_triton(logits, cfg, bias), route_torch(logits, cfg, bias)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights, **TOL)


def test_route_dispatches_by_impl():
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=8, top_k=2)
    logits = torch.randn(5, 8)
    for impl in ("auto", "torch", "triton"):
        r = route(logits, cfg, impl=impl)
        assert torch.equal(r.ids, route_torch(logits, cfg).ids)
    nv = torch.tensor(3, dtype=torch.int32)
    assert route(logits, cfg, num_valid=nv).ids[3:].eq(-1).all()
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        route(logits, cfg, impl="cuda")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_route_bad_num_valid(impl):
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=8, top_k=2)
    logits = torch.randn(5, 8)
    for bad in (torch.tensor(3), torch.tensor([3, 4], dtype=torch.int32), 3):
        with pytest.raises(ValueError, match="num_valid must be an int32 tensor of one element"):
            route(logits, cfg, num_valid=bad, impl=impl)
    with pytest.raises(ValueError, match="NaN or inf"):
        route(torch.full((2, 8), float("nan")), cfg, impl=impl)
    with pytest.raises(ValueError, match="needs correction_bias"):
        route(logits, cfg.replace(routing="sigmoid_bias"), impl=impl)


def test_kernel_supports_wide_configs_only_up_to_its_tile():
    assert kernel_supports(MoEConfig(hidden=16, intermediate=8, num_experts=1024, top_k=8))[0]
    ok, reason = kernel_supports(MoEConfig(hidden=16, intermediate=8, num_experts=1025, top_k=8))
    assert not ok and "impl='torch'" in reason
    with pytest.raises(ValueError, match="over the routing kernel's 1024"):
        route_triton(torch.randn(2, 1025), MoEConfig(hidden=16, intermediate=8, num_experts=1025, top_k=8))


def test_triton_off_cuda_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="route_triton needs CUDA logits, got cpu; use impl='torch'"):
        route_triton(torch.randn(2, 8), cfg)


# ---- GPU -----------------------------------------------------------------------------------

GPU_CASES = [
    _grouped(256, 8, T=T, scale=2.5) for T in (1, 7, 256, 4096)  # DeepSeek-V3
] + [
    Case("softmax", 128, 8, T=77),  # Qwen3-30B-A3B
    Case("softmax", 64, 8, T=77, norm=False, logits="dups"),  # OLMoE
    Case("softmax_after_topk", 128, 4, T=300),  # GPT-OSS-120B
    Case("sigmoid_bias", 256, 8, T=300),  # MiniMax
    Case("softmax", 512, 10, T=64),  # widest supported softmax
    Case("sigmoid_grouped", 256, 8, T=64, groups=(8, 4), logits="zeros", bias="zeros"),
    Case("sigmoid_grouped", 256, 8, T=64, groups=(8, 4), num_valid=17),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_kernel_matches_torch_gpu_bf16(case: Case):
    g = torch.Generator().manual_seed(case.T)
    cfg = case.config()
    logits = _logits(case, g, "cuda").to(torch.bfloat16)
    bias, num_valid = _bias(case, g, "cuda"), _num_valid(case, "cuda")
    got = route(logits, cfg, bias, num_valid)  # "auto" on CUDA: the kernel
    want = route_torch(logits, cfg, bias, num_valid)
    _check(case, got, want)


@pytest.mark.gpu
def test_kernel_in_cuda_graph_reads_num_valid_on_replay():
    cfg = MoEConfig.from_preset("deepseek-v3")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, cfg.num_experts, generator=g).cuda().to(torch.bfloat16)
    bias = (torch.randn(cfg.num_experts, generator=g) * 0.1).cuda()
    num_valid = torch.tensor(64, dtype=torch.int32, device="cuda")
    route_triton(logits, cfg, bias, num_valid)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = route_triton(logits, cfg, bias, num_valid)
    for n in (64, 5, 0):
        num_valid.fill_(n)
        out.ids.fill_(12345)
        graph.replay()
        _check(Case("sigmoid_grouped", 256, 8, T=64), out, route_torch(logits, cfg, bias, num_valid))

