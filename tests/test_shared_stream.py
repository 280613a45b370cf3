"""Shared experts beside the exchange (`MoELayer(shared_stream=...)`, epmoe/overlap.py).

CPU: gloo processes and virtual ranks (W = 2, 3) for every backend that moves tokens, and one
rank forced on: the layer with the shared experts beside the exchange (between dispatch's halves
on the CPU) equals the layer with it off bit for bit, for logits and routed calls, 0 tokens
on a rank included; the default is on exactly where the comm moves bytes; forward_microbatches
runs the shared experts through the side stream and equals forward with it off (W = 2).
GPU (skipped here): one GPU eager and CUDA-graph replays with the side stream equal the layer
with it off bit for bit (DeepSeek-V3 shapes scaled down, Triton runner); virtual ranks on one GPU;
forward_microbatches with the side stream equals it with the side stream off.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Routing, VirtualGroup
from epmoe.comm import COMM_BACKENDS
from epmoe.layer import SharedExperts
from tests.dist import run_ranks

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=24, top_k=4, shared_experts=1)
MOVING = sorted(n for n in COMM_BACKENDS if COMM_BACKENDS[n].moves_tokens)
TOKENS = (7, 0, 5)  # per rank: a rank with no tokens


@lru_cache(maxsize=None)
def all_weights() -> tuple[ExpertWeights, SharedExperts]:
    g = torch.Generator().manual_seed(0)
    return ExpertWeights.random(CFG, CFG.num_experts, generator=g), SharedExperts.random(CFG, generator=g)


def inputs(rank: int, T: int, device: str = "cpu", dtype: torch.dtype = torch.float32, cfg: MoEConfig = CFG
           ) -> tuple[torch.Tensor, torch.Tensor, Routing]:
    g = torch.Generator().manual_seed(zlib.crc32(f"shared/{rank}/{T}".encode()))
    x = torch.randn(T, cfg.hidden, generator=g).to(device, dtype)
    logits = torch.randn(T, cfg.num_experts, generator=g).to(device)
    ids = torch.rand(T, cfg.num_experts, generator=g).argsort(dim=1)[:, : cfg.top_k].int().to(device)
    return x, logits, Routing(ids, (torch.rand(T, cfg.top_k, generator=g) + 0.1).to(device))


def on_off_rank(group) -> dict:
    """Per moving backend: (default flag, on == off for logits and routed calls, a second call too)."""
    torch.set_num_threads(1)
    weights, shared = all_weights()
    out = {}
    for comm in MOVING:
        layers = {flag: MoELayer.from_global(CFG, weights, group, comm=comm, shared=shared, shared_stream=flag)
                  for flag in (None, False)}
        x, logits, routing = inputs(group.rank, TOKENS[group.rank])
        same = [torch.equal(layers[None](x, logits), layers[False](x, logits)),
                torch.equal(layers[None](x, routing=routing), layers[False](x, routing=routing)),
                torch.equal(layers[None](x, logits), layers[False](x, logits))]
        out[comm] = (layers[None].shared_stream, layers[False].shared_stream, all(same))
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("ranks", ["gloo", "virtual"])
def test_shared_beside_the_exchange_equals_the_sequential_layer(ranks, world):
    results = run_ranks(on_off_rank, world, timeout=300) if ranks == "gloo" else VirtualGroup(world).run(on_off_rank)
    for rank, got in enumerate(results):
        for comm, (default, off, same) in got.items():
            assert default and not off, f"{comm} W={world}: shared_stream defaults to on where the comm moves bytes"
            assert same, f"{comm} W={world} ({ranks}) rank {rank}: shared experts beside the exchange differ"


def test_one_rank_default_off_and_forced_on():
    weights, shared = all_weights()
    plain = MoELayer(CFG, weights, shared=shared)
    forced = MoELayer(CFG, weights, shared=shared, shared_stream=True)
    assert not plain.shared_stream and forced.shared_stream
    for T in (0, 1, 9):
        x, logits, routing = inputs(0, T)
        assert torch.equal(forced(x, logits), plain(x, logits)), T
        assert torch.equal(forced(x, routing=routing), plain(x, routing=routing)), T
    no_shared = MoELayer(CFG.replace(shared_experts=0), weights, shared_stream=True)
    x, logits, _ = inputs(0, 4)
    assert torch.isfinite(no_shared(x, logits)).all()  # nothing to run beside: the plain stages


def microbatch_rank(group) -> dict:
    """Per moving backend: forward_microbatches with the side stream on ran the shared experts
    through it once per call, and equals forward and forward_microbatches with it off (a runner
    that computes one row at a time: the CPU GEMM's rows depend on how many it gets)."""
    from tests.test_split_phase import one_row_at_a_time

    torch.set_num_threads(1)
    weights, shared = all_weights()
    out = {}
    for comm in MOVING:
        layers = {flag: MoELayer.from_global(CFG, weights, group, comm=comm, shared=shared, shared_stream=flag)
                  for flag in (True, False)}
        for layer in layers.values():
            layer.runner = one_row_at_a_time(layer.runner.weights, CFG)
        side, runs = layers[True]._side, []
        side.run = lambda *a, run=side.run, runs=runs: (runs.append(1), run(*a))[1]
        x, logits, routing = inputs(group.rank, TOKENS[group.rank])
        want, want_routed = layers[False](x, logits), layers[False](x, routing=routing)
        same = [torch.equal(layers[True].forward_microbatches(x, logits), want),
                torch.equal(layers[True].forward_microbatches(x, logits, splits=3), want),
                torch.equal(layers[True].forward_microbatches(x, routing=routing), want_routed),
                torch.equal(layers[False].forward_microbatches(x, logits), want)]
        out[comm] = (len(runs), same)
    return out


@pytest.mark.parametrize("ranks", ["gloo", "virtual"])
def test_microbatches_run_the_shared_experts_on_the_side_stream(ranks):
    results = run_ranks(microbatch_rank, 2, timeout=300) if ranks == "gloo" else VirtualGroup(2).run(microbatch_rank)
    for rank, got in enumerate(results):
        for comm, (runs, same) in got.items():
            assert runs == 3, f"{comm} rank {rank}: the side stream ran {runs} times in 3 calls"
            assert all(same), f"{comm} ({ranks}) rank {rank}: micro-batches beside the side stream differ: {same}"


def test_bad_shared_stream_value_names_the_choices():
    weights, shared = all_weights()
    with pytest.raises(ValueError, match="shared_stream must be None"):
        MoELayer(CFG, weights, shared=shared, shared_stream="on")


# --- GPU ---

GPU_CFG = MoEConfig.from_preset("deepseek-v3").scaled(hidden=256, intermediate=128, num_experts=16)


def _gpu_layers(world_group=None, comm: str = "none", **kw) -> dict[bool, MoELayer]:
    g = torch.Generator().manual_seed(3)
    cfg = GPU_CFG
    weights = ExpertWeights.random(cfg, cfg.num_experts, dtype=torch.bfloat16, device="cuda", generator=g)
    bias = torch.randn(cfg.num_experts, generator=g).cuda() * 0.1
    shared = SharedExperts.random(cfg, torch.bfloat16, "cuda", g)
    return {flag: MoELayer.from_global(cfg, weights, world_group, comm=comm, runner="triton", correction_bias=bias,
                                       shared=shared, shared_stream=flag, **kw) for flag in (True, False)}


@pytest.mark.gpu
def test_gpu_side_stream_eager_and_graphs_equal_the_plain_layer():
    """One GPU (comm none, side stream forced on): eager calls, then replays of captured graphs
    (the side stream's fork and join captured with them), equal the layer with it off bit for bit."""
    layers = _gpu_layers()
    assert layers[True]._side is not None and layers[True]._side.stream is not None
    for T in (1, 5, 64, 0, 128):
        x, logits, _ = inputs(0, T, "cuda", torch.bfloat16, GPU_CFG)
        torch.testing.assert_close(layers[True](x, logits), layers[False](x, logits), atol=0, rtol=0, msg=f"T={T}")
    for layer in layers.values():
        layer.capture_graphs(128, buckets=[8, 128])
    for T in (8, 3, 128, 100, 1):
        x, logits, _ = inputs(1, T, "cuda", torch.bfloat16, GPU_CFG)
        y = layers[True](x, logits)
        torch.testing.assert_close(y, layers[False](x, logits), atol=0, rtol=0, msg=f"graph T={T}")
        torch.cuda.synchronize()
        torch.testing.assert_close(y, layers[True]._eager(x, logits, None), atol=0, rtol=0, msg=f"T={T}")


@pytest.mark.gpu
@pytest.mark.parametrize("comm", ["symm_a2a", "nccl_a2a", "allgather"])
def test_gpu_side_stream_on_virtual_ranks(comm):
    """Virtual ranks on one GPU: the default (on, world 2) equals off bit for bit."""
    def rank(group) -> bool:
        layers = _gpu_layers(group, comm)
        x, logits, _ = inputs(group.rank, (9, 4)[group.rank], "cuda", torch.bfloat16, GPU_CFG)
        return all(torch.equal(layers[True](x, logits), layers[False](x, logits)) for _ in range(2))

    assert all(VirtualGroup(2, timeout=120).run(rank))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_bench_layer_shared_stream_rows(tmp_path, capsys):
    import json

    from epmoe.bench.layer import bench_layer
    from epmoe.cli import main

    out_json = tmp_path / "l.json"
    assert main(["bench", "layer", "--preset", "deepseek-v3", "--hidden", "64", "--intermediate", "32",
                 "--experts", "16", "--tokens", "1,4", "--shared-stream", "on,off,routed,shared",
                 "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["shared_stream"], r["tokens"]) for r in rows] == [
        (m, t) for m in ("on", "off", "routed", "shared") for t in (1, 4)]
    assert all(r["us"] > 0 and r["comm"] == "none" for r in rows)
    with pytest.raises(ValueError, match="comma-separated values of default, on, off"):
        bench_layer("deepseek-v3", [1], shared_stream="sideways")
    with pytest.raises(ValueError, match="this config has none"):
        bench_layer(MoEConfig(hidden=32, intermediate=16, num_experts=4, top_k=2), [1], shared_stream="shared")


def _shared_into_cases(device: str) -> None:
    from epmoe.integrations.hf import GatedSharedExperts

    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        plain = SharedExperts.random(CFG, dtype, device, g)
        gated = GatedSharedExperts(plain.w13, plain.w2, gate=torch.randn(1, CFG.hidden, generator=g).to(device, dtype))
        for shared in (plain, gated):
            for T in (0, 1, 6):
                x = torch.randn(T, CFG.hidden, generator=g).to(device, dtype)
                into = torch.full((T, CFG.hidden), float("nan"), device=device)
                got = shared(x, CFG, out=into)
                assert got.data_ptr() == into.data_ptr() and torch.equal(got, shared(x, CFG)), (dtype, T)


def test_shared_experts_into_out_give_the_same_bits():
    _shared_into_cases("cpu")


@pytest.mark.gpu
def test_gpu_shared_experts_into_out_give_the_same_bits():
    _shared_into_cases("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("comm", ["none", "symm_a2a"])
def test_gpu_microbatches_with_the_side_stream_equal_it_off(comm):
    """One GPU: forward_microbatches with the shared experts on the side stream equals the same call
    with it off bit for bit (same micro-batches, same runner), 2 and 3 splits."""
    layers = _gpu_layers(comm=comm)
    for T in (1, 6, 64):
        x, logits, _ = inputs(0, T, "cuda", torch.bfloat16, GPU_CFG)
        for splits in (2, 3):
            torch.testing.assert_close(layers[True].forward_microbatches(x, logits, splits=splits),
                                       layers[False].forward_microbatches(x, logits, splits=splits), atol=0, rtol=0,
                                       msg=f"T={T} splits={splits}")
