"""Probes: expert kernels written in Gluon (Triton's dialect with explicit layouts, shared memory,
barriers and warp specialization), next to the triton runner's kernels. Not wired into the runner;
what they measure decides that.

    python scripts/probe_gluon.py compile                                  # any machine: sm_90 builds
    python scripts/probe_gluon.py decode qwen3-30b-a3b,deepseek-v3 1,4     # a Hopper GPU
    python scripts/probe_gluon.py gemm qwen3-30b-a3b,mixtral-8x7b 4096,16384

decode: nvfp4 pair mode (the stage at 1-16 tokens). The Triton pair-mode nvfp4 kernels
(kernels/grouped_gemm.py) broadcast the activation row over a tile's weight rows, and Triton moves
it (and the per-block sums) between register layouts through shared memory, with about ten CTA
barriers per k step (read in the PTX). Here every operand is loaded straight in the layout its
product uses: the weight bytes as [R, G, 8] (8 bytes = one 16-value block per thread), decoded by
`gl.fp4_to_fp` into [R, G, 16] in the same threads, the activation as [G, 16] in the slice of that
layout (each thread loads the 16 values of its blocks; rows on other threads load them again from
L1), the block scales as [R, G]. The compiled kernels have no barrier at all. On a GPU: both
kernels (gate_up with SiLU, down) against the reference runner, then the stage timed as CUDA-graph
replays of several routings (as `bench experts` does) next to the triton runner on the same
inputs, nvfp4 (pair mode) and bf16 (the target: nvfp4 decode >= 1.7x bf16).

gemm: the sorted (prefill) bf16 down GEMM, persistent and warp-specialized. The bf16 stage sits at
1.5-2.0x its roofline at prefill (docs/performance.md); Triton 3.6's `tl` kernels wait for every
MMA and cannot overlap one tile's epilogue with the next tile's loads (its warp_specialize flag
changed nothing here). One loader warp streams act rows and weight tiles through the bulk tensor
copy engine into a ring of shared-memory stages (mbarriers `ready` / `empty`); the default warps
run wgmma on them and write each tile's rows to their pairs while the loader already fills the
stages of the next tile. Tiles walk the m blocks of one n column first, so the programs of one
expert share its weight tile in L2; blocks past the last expert (block_expert < 0) are skipped by
both partitions alike. Only the down GEMM (its A rows are contiguous slots, so both operands go
through tensor descriptors); gate_up gathers hidden rows by index and would need a cp.async
loader. On a GPU it checks the result against the runner's down kernel on the same slots and
times both.

Neither has run on a GPU yet: a mistake in the gemm kernel's barrier phases would hang, so run
the probes under `timeout`.
"""

from __future__ import annotations

import sys
from typing import Any

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


def compile_sm90(fn: Any, sig: dict[str, str], constexprs: dict[str, Any], num_warps: int) -> Any:
    """Build a Gluon kernel for sm_90 without a GPU (the argument order is the kernel's)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    src = GluonASTSource(fn, {name: sig[name] for name in fn.arg_names}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


# ---------------------------------------------------------------------------------------
# decode: nvfp4 pair mode
# ---------------------------------------------------------------------------------------


@gluon.jit
def _matvec(x_row, w_base, s_base, n0, N, K, stride_wn, stride_sn,
            BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TG: gl.constexpr):
    """fp32 [BLOCK_N] = sum_k e2m1(w[n0 + r, k]) * scale[n0 + r, k // 16] * x[k] (no global scale),
    in SliceLayout(1, SliceLayout(2, L16))."""
    G: gl.constexpr = BLOCK_K // 16
    NW: gl.constexpr = gl.num_warps()
    TR: gl.constexpr = 32 // TG
    L8: gl.constexpr = gl.BlockedLayout([1, 1, 8], [TR, TG, 1], [NW, 1, 1], [2, 1, 0])  # weight bytes
    L16: gl.constexpr = gl.BlockedLayout([1, 1, 16], [TR, TG, 1], [NW, 1, 1], [2, 1, 0])  # their values
    LRG: gl.constexpr = gl.SliceLayout(2, L16)
    LX: gl.constexpr = gl.SliceLayout(0, L16)
    L8_RG: gl.constexpr = gl.SliceLayout(2, L8)
    r3 = gl.expand_dims(gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L8_RG)), 1), 2)
    g3 = gl.expand_dims(gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(0, L8_RG)), 0), 2)
    j3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L8))), 0), 1)
    w_ptrs = w_base + r3.to(gl.int64) * stride_wn + g3 * 8 + j3  # [R, G, 8] bytes
    rs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LRG))
    gs = gl.arange(0, G, layout=gl.SliceLayout(0, LRG))
    s_ptrs = s_base + gl.expand_dims(rs.to(gl.int64), 1) * stride_sn + gl.expand_dims(gs, 0)  # [R, G]
    gx = gl.arange(0, G, layout=gl.SliceLayout(1, LX))
    x_ptrs = x_row + gl.expand_dims(gx, 1) * 16 + gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, LX)), 0)
    part = gl.zeros([BLOCK_N, G], gl.float32, layout=LRG)
    for k0 in range(0, K, BLOCK_K):
        b = gl.load(w_ptrs + k0 // 2, mask=(r3 < N) & (g3 * 16 + k0 < K), other=0)
        w = gl.convert_layout(gl.fp4_to_fp(b, gl.bfloat16, 2), L16, assert_trivial=True)  # [R, G, 16]
        x = gl.load(x_ptrs + k0, mask=gl.expand_dims(gx * 16 + k0 < K, 1), other=0.0)
        sc = gl.load(s_ptrs + k0 // 16, mask=gl.expand_dims(rs < N, 1) & gl.expand_dims(gs * 16 + k0 < K, 0),
                     other=0.0)
        part += gl.sum(w.to(gl.float32) * gl.expand_dims(x.to(gl.float32), 0), axis=2) * sc.to(gl.float32)
    return gl.sum(part, axis=1), rs


@gluon.jit
def _pair_tile(expert_ids_ptr, N, BLOCK_N: gl.constexpr):
    """This program's (pair m, first output column n0, expert e)."""
    pid = gl.program_id(0)
    num_n = gl.cdiv(N, BLOCK_N)
    m = pid // num_n
    return m, (pid % num_n) * BLOCK_N, gl.load(expert_ids_ptr + m)


@gluon.jit
def nvfp4_pair_gate_up_kernel(x_ptr, stride_xm, row_ids_ptr, expert_ids_ptr, w_ptr, stride_we, stride_wn,
                              s_ptr, stride_se, stride_sn, g_ptr, stride_ge, act_ptr, stride_am, E, I, K,
                              BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TG: gl.constexpr):
    """Program (pair m, n tile): act[m, n] = silu(x . w_gate[n]) * (x . w_up[n]), x = hidden[row_ids[m]]."""
    m, n0, e = _pair_tile(expert_ids_ptr, I, BLOCK_N)
    if (e >= 0) & (e < E):
        x_row = x_ptr + gl.load(row_ids_ptr + m).to(gl.int64) * stride_xm
        w_base = w_ptr + e.to(gl.int64) * stride_we
        s_base = s_ptr + e.to(gl.int64) * stride_se
        gate, rs = _matvec(x_row, w_base, s_base, n0, I, K, stride_wn, stride_sn, BLOCK_N, BLOCK_K, TG)
        up, _ = _matvec(x_row, w_base + I.to(gl.int64) * stride_wn, s_base + I.to(gl.int64) * stride_sn, n0, I, K,
                        stride_wn, stride_sn, BLOCK_N, BLOCK_K, TG)
        glob = gl.load(g_ptr + e.to(gl.int64) * stride_ge)
        gate = gate * glob
        up = up * glob
        h = gate / (1.0 + gl.exp(-gate)) * up
        gl.store(act_ptr + m.to(gl.int64) * stride_am + rs, h.to(act_ptr.dtype.element_ty), mask=rs < I)


@gluon.jit
def nvfp4_pair_down_kernel(act_ptr, stride_am, expert_ids_ptr, w_ptr, stride_we, stride_wn, s_ptr, stride_se,
                           stride_sn, g_ptr, stride_ge, out_ptr, stride_om, E, N, K,
                           BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TG: gl.constexpr):
    """Program (pair m, n tile): out[m, n] = act[m] . w2[n]."""
    m, n0, e = _pair_tile(expert_ids_ptr, N, BLOCK_N)
    if (e >= 0) & (e < E):
        acc, rs = _matvec(act_ptr + m.to(gl.int64) * stride_am, w_ptr + e.to(gl.int64) * stride_we,
                          s_ptr + e.to(gl.int64) * stride_se, n0, N, K, stride_wn, stride_sn, BLOCK_N, BLOCK_K, TG)
        acc = acc * gl.load(g_ptr + e.to(gl.int64) * stride_ge)
        gl.store(out_ptr + m.to(gl.int64) * stride_om + rs, acc.to(out_ptr.dtype.element_ty), mask=rs < N)


TILES = [(16, 256, 16, 4), (32, 256, 16, 4), (16, 512, 32, 4), (8, 512, 32, 2), (32, 512, 32, 4), (64, 256, 16, 8)]


def compile_decode() -> None:
    """Compile both decode kernels for sm_90 and report what the PTX holds."""
    common = {"w_ptr": "*u8", "stride_we": "i32", "stride_wn": "i32", "s_ptr": "*fp8e4nv",
              "stride_se": "i32", "stride_sn": "i32", "g_ptr": "*fp32", "stride_ge": "i32",
              "expert_ids_ptr": "*i32", "E": "i32", "K": "i32",
              "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "TG": "constexpr"}
    sigs = {
        nvfp4_pair_gate_up_kernel: {**common, "x_ptr": "*bf16", "stride_xm": "i32", "row_ids_ptr": "*i32",
                                    "act_ptr": "*bf16", "stride_am": "i32", "I": "i32"},
        nvfp4_pair_down_kernel: {**common, "act_ptr": "*bf16", "stride_am": "i32", "out_ptr": "*bf16",
                                 "stride_om": "i32", "N": "i32"},
    }
    for fn, sig in sigs.items():
        for bn, bk, tg, nw in TILES:
            ptx = compile_sm90(fn, sig, {"BLOCK_N": bn, "BLOCK_K": bk, "TG": tg}, nw).asm["ptx"]
            print(f"{fn.__name__} {bn}x{bk} tg={tg} warps={nw}: {ptx.count(chr(10))} PTX lines, "
                  f"{ptx.count('bar.sync')} bar.sync, {ptx.count('ld.shared')} ld.shared, "
                  f"{ptx.count('ld.global')} ld.global")


def run_decode(presets: list[str], tokens: list[int]) -> None:
    import torch

    from epmoe.bench.core import bench
    from epmoe.bench.experts import quantized_weights, random_weights, route_tokens
    from epmoe.config import MoEConfig
    from epmoe.experts.reference import reference_experts
    from epmoe.experts.triton import _weight_args, triton_experts

    dev = torch.device("cuda")
    for preset in presets:
        cfg = MoEConfig.from_preset(preset)
        if cfg.activation != "silu" or cfg.has_bias:
            print(f"{preset}: the probe's gate_up computes SiLU without biases; skipped")
            continue
        E, H, I, K = cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.top_k
        w_bf16 = random_weights(cfg, E, dev)
        w = quantized_weights(w_bf16, "nvfp4")
        w13, se13, sn13, s13, sse13, ssn13, _, g13, sg13, _ = _weight_args(w.w13)
        w2, se2, sn2, s2, sse2, ssn2, _, g2, sg2, _ = _weight_args(w.w2)
        swapped = None  # whether fp4_to_fp takes the high nibble first (ours: element 2i in the low nibble)
        for T in tokens:
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            row_ids = torch.arange(T, device=dev, dtype=torch.int32).repeat_interleave(K)
            per_expert = 3 * H * I * (0.5 + 1 / 16)
            reps = max(1, min(8, int(0.5e9 // (K * T * per_expert)) + 1))
            routings = [route_tokens(T, E, K, "uniform", dev, seed=T + 1000 * r).flatten().contiguous()
                        for r in range(reps)]
            M = T * K
            act = torch.empty(M, I, device=dev, dtype=torch.bfloat16)
            out = torch.empty(M, H, device=dev, dtype=torch.bfloat16)

            def gluon_stage(eids: torch.Tensor, gu: tuple, dn: tuple) -> None:
                nvfp4_pair_gate_up_kernel[(M * triton.cdiv(I, gu[0]),)](
                    x, x.stride(0), row_ids, eids, w13, se13, sn13, s13, sse13, ssn13, g13, sg13, act, act.stride(0),
                    E, I, H, BLOCK_N=gu[0], BLOCK_K=gu[1], TG=gu[2], num_warps=gu[3])
                nvfp4_pair_down_kernel[(M * triton.cdiv(H, dn[0]),)](
                    act, act.stride(0), eids, w2, se2, sn2, s2, sse2, ssn2, g2, sg2, out, out.stride(0),
                    E, H, I, BLOCK_N=dn[0], BLOCK_K=dn[1], TG=dn[2], num_warps=dn[3])

            ref = reference_experts(x, row_ids, routings[0], w, cfg, out_dtype=torch.float32)
            base_out = triton_experts(x, row_ids, routings[0], w, cfg)
            base_err = float((base_out.float() - ref).abs().max() / ref.abs().max())
            base_us = bench(lambda: [triton_experts(x, row_ids, e, w, cfg, out=out) for e in routings], device=dev,
                            warmup=2, iters=10, graph=True, flush_l2=False) / reps
            bf16_us = bench(lambda: [triton_experts(x, row_ids, e, w_bf16, cfg, out=out) for e in routings],
                            device=dev, warmup=2, iters=10, graph=True, flush_l2=False) / reps
            print(f"{preset} T={T}: triton bf16 {bf16_us:.1f} us, triton nvfp4 pair mode {base_us:.1f} us "
                  f"(rel err {base_err:.1e})", flush=True)
            if swapped is None:
                gluon_stage(routings[0], TILES[0], TILES[0])
                err0 = float((out.float() - ref).abs().max() / ref.abs().max())
                swapped = err0 > 0.05
                if swapped:  # a copy with the nibbles of every byte exchanged
                    w13, w2 = ((d << 4) | (d >> 4) for d in (w13, w2))
                    gluon_stage(routings[0], TILES[0], TILES[0])
                    err1 = float((out.float() - ref).abs().max() / ref.abs().max())
                    print(f"  rel err {err0:.1e}: fp4_to_fp reads the high nibble first? with the nibbles swapped: "
                          f"{err1:.1e}", flush=True)
            best = None
            for gu in TILES:
                for dn in TILES:
                    try:
                        gluon_stage(routings[0], gu, dn)
                        err = float((out.float() - ref).abs().max() / ref.abs().max())
                        us = bench(lambda gu=gu, dn=dn: [gluon_stage(e, gu, dn) for e in routings], device=dev,
                                   warmup=2, iters=10, graph=True, flush_l2=False) / reps
                    except Exception as exc:  # a tile this GPU cannot run
                        print(f"  gate_up {gu} down {dn}: {type(exc).__name__}: {str(exc)[:160]}")
                        torch.cuda.synchronize()
                        continue
                    if best is None or us < best[0]:
                        best = (us, gu, dn, err)
            if best:
                print(f"  gluon nvfp4 best {best[0]:.1f} us: {base_us / best[0]:.2f}x the triton nvfp4 pair mode, "
                      f"{bf16_us / best[0]:.2f}x triton bf16 (gate_up {best[1]}, down {best[2]}, "
                      f"rel err {best[3]:.1e})", flush=True)


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
        kernel = compile_sm90(moe_down_ws_kernel, sig, {"BLOCK_N": bn, "STAGES": stages, "num_warps": nw}, nw)
        ptx = kernel.asm["ptx"]
        print(f"moe_down_ws_kernel {bm}x{bn}x{bk} stages={stages} warps={nw}: {ptx.count(chr(10))} PTX lines, "
              f"{ptx.count('wgmma.mma_async')} wgmma, {ptx.count('cp.async.bulk.tensor')} bulk copies, "
              f"shared {kernel.metadata.shared} bytes")


def run_gemm(presets: list[str], tokens: list[int]) -> None:
    import torch

    from epmoe.bench.core import bench
    from epmoe.bench.experts import random_weights, route_tokens
    from epmoe.config import MoEConfig
    from epmoe.experts.triton import ExpertsConfig, permute, select_config
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
        compile_decode()
        compile_gemm()
    elif mode in ("decode", "gemm") and len(sys.argv) == 4:
        run = run_decode if mode == "decode" else run_gemm
        run(sys.argv[2].split(","), [int(t) for t in sys.argv[3].split(",")])
    else:
        sys.exit(__doc__)
