"""Probe: the sorted (prefill) bf16 down GEMM written in Gluon, persistent and warp-specialized,
timed next to the triton runner's down kernel on the same slots. Not wired into the runner.

    python scripts/probe_gluon.py compile                                  # any machine: sm_90 builds
    python scripts/probe_gluon.py gemm qwen3-30b-a3b,mixtral-8x7b 4096,16384   # a Hopper GPU

The bf16 stage sits at 1.5-2.0x its roofline at prefill (docs/performance.md); Triton 3.6's `tl`
kernels wait for every MMA and cannot overlap one tile's epilogue with the next tile's loads (its
warp_specialize flag changed nothing here). One loader warp streams act rows and weight tiles
through the bulk tensor copy engine into a ring of shared-memory stages (mbarriers `ready` /
`empty`); the default warps run wgmma on them and write each tile's rows to their pairs while the
loader already fills the stages of the next tile. Tiles walk the m blocks of one n column first,
so the programs of one expert share its weight tile in L2; blocks past the last expert
(block_expert < 0) are skipped by both partitions alike. Only the down GEMM (its A rows are
contiguous slots, so both operands go through tensor descriptors); gate_up gathers hidden rows by
index and would need a cp.async loader.

Measured on one H200 (2026-11-29): bit-identical rows; faster than the triton kernel only for
mixtral-8x7b at 4096 tokens (1486 against 1590 us), slower elsewhere (qwen3-30b-a3b 4096: 335
against 268 us; 16384: 1023 against 831 us; mixtral 16384: 6059 against 5670 us).
(The nvfp4 decode kernels that began here live in epmoe/kernels/nvfp4_decode.py.)
"""

from __future__ import annotations

import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from epmoe.ops.build import compile_gluon

# ---------------------------------------------------------------------------------------
# gemm: the sorted bf16 down GEMM, persistent and warp-specialized
# ---------------------------------------------------------------------------------------


@gluon.jit
def _tile(t, num_m, block_expert_ptr):
    """Tile t of the walk both partitions share: (m block, n tile, expert; < 0: no expert, skipped)."""
    pid_m = t % num_m
    return pid_m, t // num_m, gl.load(block_expert_ptr + pid_m)


@gluon.jit
def _load_partition(a_desc, w_desc, a_bufs, w_bufs, ready, empty, block_expert_ptr, num_m, N,
                    BLOCK_N: gl.constexpr):
    """One warp: for every tile of this program, every k step: wait for a free stage, then load
    the act rows [BM, BK] and the weight rows [BN, BK] of the tile's expert into it."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    NB: gl.constexpr = a_bufs.shape[0]
    K = a_desc.shape[1]
    num_tiles = num_m * gl.cdiv(N, BLOCK_N)
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n, e = _tile(t, num_m, block_expert_ptr)
        if e >= 0:
            row_w = e * N + pid_n * BLOCK_N
            for k in range(0, K, BK):
                s = it % NB
                mbarrier.wait(empty.index(s), ((it // NB) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k], bar, a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [row_w, k], bar, w_bufs.index(s))
                it += 1


@gluon.jit
def _mma_partition(a_bufs, w_bufs, ready, empty, out_ptr, stride_om, sorted_pair_ptr, block_expert_ptr,
                   expert_end_ptr, num_m, N, K, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    """Default warps: wgmma over the stages as they fill (one MMA in flight, a stage released once
    the MMA after it was issued and the one reading it retired), then the tile's rows go straight
    from registers to their pairs' output rows."""
    BM: gl.constexpr = a_bufs.shape[1]
    BK: gl.constexpr = a_bufs.shape[2]
    NB: gl.constexpr = a_bufs.shape[0]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    num_tiles = num_m * gl.cdiv(N, BLOCK_N)
    it = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n, e = _tile(t, num_m, block_expert_ptr)
        if e >= 0:
            acc = gl.zeros((BM, BLOCK_N), dtype=gl.float32, layout=acc_layout)
            for k in range(0, K, BK):
                s = it % NB
                mbarrier.wait(ready.index(s), (it // NB) & 1)
                acc = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc,))
                mbarrier.arrive(empty.index((it + NB - 1) % NB), pred=k > 0)  # the previous MMA retired
                it += 1
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((it + NB - 1) % NB))
            slots = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
            cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
            valid = slots < gl.load(expert_end_ptr + e)
            pairs = gl.load(sorted_pair_ptr + slots, mask=valid, other=0)
            ptrs = out_ptr + gl.expand_dims(pairs.to(gl.int64) * stride_om, 1) + gl.expand_dims(cols, 0)
            gl.store(ptrs, acc.to(out_ptr.dtype.element_ty),
                     mask=gl.expand_dims(valid, 1) & gl.expand_dims(cols < N, 0))


@gluon.jit
def moe_down_ws_kernel(a_desc, w_desc, out_ptr, stride_om, sorted_pair_ptr, block_expert_ptr, expert_end_ptr,
                       num_m, N, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: program p takes tiles p, p + programs, ... of (m block, n tile), m fastest.
    out[sorted_pair[s], n] = act[s] . w2[e][n] for the slots s of each block of expert e."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()
    K = a_desc.shape[1]
    gl.warp_specialize([
        (_mma_partition, (a_bufs, w_bufs, ready, empty, out_ptr, stride_om, sorted_pair_ptr, block_expert_ptr,
                          expert_end_ptr, num_m, N, K, BLOCK_N, num_warps)),
        (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, block_expert_ptr, num_m, N, BLOCK_N)),
    ], [1], [40])


# (BM, BN, BK, stages, warps)
CONFIGS = [(128, 128, 64, 4, 4), (128, 256, 64, 3, 8), (64, 128, 64, 5, 4), (128, 128, 64, 5, 8)]


def _descriptors(act, w2_2d, bm: int, bn: int, bk: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16)
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
    return (TensorDescriptor.from_tensor(act, [bm, bk], a_layout),
            TensorDescriptor.from_tensor(w2_2d, [bn, bk], w_layout))


def compile_gemm() -> None:
    """Compile the warp-specialized down GEMM for sm_90 and report what the PTX holds."""
    for bm, bn, bk, stages, nw in CONFIGS:
        a_layout = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16)
        w_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], gl.bfloat16)
        sig = {"a_desc": f"tensordesc<bf16[{bm}, {bk}],{a_layout!r}>",
               "w_desc": f"tensordesc<bf16[{bn}, {bk}],{w_layout!r}>", "out_ptr": "*bf16", "stride_om": "i32",
               "sorted_pair_ptr": "*i32", "block_expert_ptr": "*i32", "expert_end_ptr": "*i32", "num_m": "i32",
               "N": "i32", "BLOCK_N": "constexpr", "STAGES": "constexpr", "num_warps": "constexpr"}
        kernel = compile_gluon(moe_down_ws_kernel, sig, {"BLOCK_N": bn, "STAGES": stages, "num_warps": nw}, nw)
        ptx = kernel.asm["ptx"]
        print(f"moe_down_ws_kernel {bm}x{bn}x{bk} stages={stages} warps={nw}: {ptx.count(chr(10))} PTX lines, "
              f"{ptx.count('wgmma.mma_async')} wgmma, {ptx.count('cp.async.bulk.tensor')} bulk copies, "
              f"shared {kernel.metadata.shared} bytes")


def run_gemm(presets: list[str], tokens: list[int]) -> None:
    import torch

    from epmoe.bench.core import bench
    from epmoe.bench.experts import random_weights, route_tokens
    from epmoe.config import MoEConfig
    from epmoe.experts.tuning import ExpertsConfig, select_config
    from epmoe.ops.permute import permute
    from epmoe.kernels.grouped_gemm import moe_down_kernel

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for preset in presets:
        cfg = MoEConfig.from_preset(preset)
        E, H, I, K = cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.top_k
        w2 = random_weights(cfg, E, dev).w2.contiguous()  # [E, H, I]
        w2_2d = w2.view(E * H, I)
        for T in tokens:
            M = T * K
            eids = route_tokens(T, E, K, "uniform", dev, seed=T).flatten().contiguous()
            base: ExpertsConfig = select_config("bf16", M, E, H, I, K, dev)
            d = base.down
            flops = 2.0 * M * H * I
            results = []
            for bm in sorted({base.block_m, 64, 128}):
                perm = permute(eids, E, bm)
                act = torch.randn(perm.max_blocks * bm, I, device=dev, dtype=torch.bfloat16)
                ref = torch.full((M, H), float("nan"), device=dev, dtype=torch.bfloat16)

                def triton_down(bm: int = bm, perm=perm, act=act, ref=ref) -> None:
                    moe_down_kernel[(perm.max_blocks * triton.cdiv(H, d.block_n),)](
                        act, act.stride(0), act, 0, w2, w2.stride(0), w2.stride(1), w2, w2, 0, 0, 0, w2, 0, w2, 0,
                        ref, ref.stride(0), eids, perm.sorted_pair, perm.block_expert, perm.expert_end,
                        perm.max_blocks, E, 0, E, H, I,
                        HAS_BIAS=False, PAIR_MODE=False, DOT_PREC="tf32", W_TMA=False, USE_PDL=False, W_FMT=0,
                        A_FP8=False, W_UNIFORM=False, FAST_E2M1=True, W_GLOBAL=False,
                        BLOCK_M=bm, BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=d.group_m,
                        num_warps=d.num_warps, num_stages=d.num_stages)

                us = bench(triton_down, device=dev, warmup=2, iters=10, graph=True, flush_l2=False)
                results.append((us, f"triton down bm={bm} {d}"))
                for cbm, bn, bk, stages, nw in CONFIGS:
                    if cbm != bm:
                        continue
                    out = torch.full((M, H), float("nan"), device=dev, dtype=torch.bfloat16)
                    a_desc, w_desc = _descriptors(act, w2_2d, bm, bn, bk)
                    grid = (min(sms, perm.max_blocks * triton.cdiv(H, bn)),)

                    def gluon_down(a_desc=a_desc, w_desc=w_desc, out=out, bn=bn, stages=stages, nw=nw,
                                   perm=perm, grid=grid) -> None:
                        moe_down_ws_kernel[grid](a_desc, w_desc, out, out.stride(0), perm.sorted_pair,
                                                 perm.block_expert, perm.expert_end, perm.max_blocks, H,
                                                 BLOCK_N=bn, STAGES=stages, num_warps=nw)

                    try:
                        gluon_down()
                        torch.cuda.synchronize()
                        valid = eids >= 0
                        err = float((out[valid].float() - ref[valid].float()).abs().max()
                                    / ref[valid].float().abs().max())
                        us = bench(gluon_down, device=dev, warmup=2, iters=10, graph=True, flush_l2=False)
                    except Exception as exc:
                        print(f"  gluon {(cbm, bn, bk, stages, nw)}: {type(exc).__name__}: {str(exc)[:200]}")
                        torch.cuda.synchronize()
                        continue
                    results.append((us, f"gluon ws bm={bm} bn={bn} bk={bk} stages={stages} warps={nw} "
                                        f"(rel diff to triton {err:.1e})"))
            print(f"{preset} T={T} down GEMM ({flops / 1e9:.0f} GFLOP):")
            for us, name in sorted(results):
                print(f"  {us:9.1f} us  {flops / us / 1e6:6.0f} TFLOP/s  {name}", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "compile":
        compile_gemm()
    elif mode == "gemm" and len(sys.argv) == 4:
        run_gemm(sys.argv[2].split(","), [int(t) for t in sys.argv[3].split(",")])
    else:
        sys.exit(__doc__)
