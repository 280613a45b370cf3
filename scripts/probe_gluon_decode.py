"""Probe: nvfp4 decode (pair mode) written in Gluon, with explicit register layouts.

    python scripts/probe_gluon_decode.py --compile-only          # any machine: compile for sm_90
    python scripts/probe_gluon_decode.py qwen3-30b-a3b,deepseek-v3 1,4,16   # a Hopper GPU

Why: the Triton pair-mode nvfp4 kernels (kernels/grouped_gemm.py) broadcast the activation row
over a tile's weight rows, and Triton moves it (and the per-block sums) between register layouts
through shared memory, with about ten CTA barriers per k step (read in the PTX). Here every
operand is loaded straight in the layout its product uses: the weight bytes as [R, G, 8] (8
bytes = one 16-value block per thread), decoded by `gl.fp4_to_fp` into [R, G, 16] in the same
threads, the activation as [G, 16] in the slice of that layout (each thread loads the 16 values
of its blocks; rows on other threads load them again from L1), the block scales as [R, G].
The compiled kernel has no barrier at all.

On a GPU: both kernels (gate_up with SiLU, down) against the reference runner, then the stage
timed as CUDA-graph replays of several routings (as `bench experts` does) next to the triton
runner on the same inputs, nvfp4 (pair mode) and bf16 (the target: nvfp4 decode >= 1.7x bf16).
Not wired into the runner; what it measures decides that.
"""

from __future__ import annotations

import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


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


def compile_only() -> None:
    """Compile both kernels for sm_90 (no GPU needed) and report what the PTX holds."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

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
        order = list(fn.arg_names)
        sig = {name: sig[name] for name in order}
        for bn, bk, tg, nw in TILES:
            src = GluonASTSource(fn, sig, constexprs={"BLOCK_N": bn, "BLOCK_K": bk, "TG": tg})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
            ptx = kernel.asm["ptx"]
            print(f"{fn.__name__} {bn}x{bk} tg={tg} warps={nw}: {ptx.count(chr(10))} PTX lines, "
                  f"{ptx.count('bar.sync')} bar.sync, {ptx.count('ld.shared')} ld.shared, "
                  f"{ptx.count('ld.global')} ld.global")


def run_gpu(presets: list[str], tokens: list[int]) -> None:
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


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
    else:
        run_gpu(sys.argv[1].split(","), [int(t) for t in sys.argv[2].split(",")])
