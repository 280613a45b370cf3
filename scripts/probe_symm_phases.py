"""Probe: where symm_a2a's time goes on real GPUs, one phase at a time.

    python scripts/probe_symm_phases.py deepseek-v3,qwen3-30b-a3b 128,4096 [--nccl]

On W = (number of GPUs) NCCL ranks, for each preset and tokens per rank: the four kernels of one
call timed alone with CUDA events, each after a sync and a barrier, so a receive never waits for
a peer (its flags are already up): dispatch_send, dispatch_recv, combine_send, combine_recv, and
combine_recv again with every peer pointer replaced by this rank's own workspace (pull: the same
loads from local HBM instead of over NVLink; push reads locally anyway). Variants: combine mode,
programs per SM and combine warps.
`--nccl` adds raw all_to_all_single / all_gather_into_tensor timings (1 KB and 64 MB).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys

for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[k] = v

import torch  # noqa: E402

from epmoe.launch import run_ranks  # noqa: E402


def _events(fn, iters: int, sync_barrier) -> float:
    """Median µs of fn() over `iters` calls, each after sync_barrier() (one bench() call each:
    the ranks line up between calls)."""
    from epmoe.bench.core import bench

    times = []
    for _ in range(iters):
        sync_barrier()
        times.append(bench(fn, torch.cuda.current_device(), warmup=0, iters=1, flush_l2=False))
    return statistics.median(times)


def _rank(group, presets: list[str], tokens: list[int], variants: list[tuple[str, int, int]], nccl: bool
          ) -> list[str]:
    import epmoe.comm.symmetric as sy
    from epmoe.bench.comm import _inputs
    from epmoe.config import MoEConfig
    from epmoe.group import Placement

    dev = torch.device("cuda", torch.cuda.current_device())
    W, rank = group.world, group.rank
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    lines = []

    def sb() -> None:
        torch.cuda.synchronize(dev)
        group.barrier()

    row_warps = sy._row_warps
    for preset in presets:
        cfg = MoEConfig.from_preset(preset)
        placement = Placement.contiguous(cfg.num_experts, W)
        for T in tokens:
            x, routing = _inputs(cfg, rank, T, dev, torch.bfloat16)
            for mode, mult, warps in variants:
                sy._row_warps = (lambda h, w=warps: w) if warps else row_warps
                b = sy.SymmA2A(cfg, group, placement, max_tokens_per_rank=T, device=dev, dtype=torch.bfloat16,
                               check_errors=False, combine_mode=mode)
                b._kernel_ws = dataclasses.replace(b._kernel_ws, max_programs=mult * sms)
                M = W * T * b.slot_experts
                out = torch.zeros(M, cfg.hidden, device=dev, dtype=torch.bfloat16)
                y = torch.empty(T, cfg.hidden, device=dev, dtype=torch.bfloat16)
                own = b._ptrs.clone()
                own.fill_(int(b._ptrs[rank]))
                res: dict[str, list[float]] = {k: [] for k in ("ds", "dr", "cs", "cr", "cr_local")}
                for _ in range(6):
                    sb()
                    res["ds"].append(_events(lambda: b.dispatch_send(x, routing), 1, sb))
                    got = {}
                    res["dr"].append(_events(lambda got=got: got.update(d=b.dispatch_recv()), 1, sb))
                    d = got["d"]
                    res["cs"].append(_events(lambda d=d: b.combine_send(out, d), 1, sb))
                    state = b._state.clone()
                    real = b._ptrs
                    b._ptrs = own
                    res["cr_local"].append(_events(lambda d=d: sy._triton_combine_recv(b, d.handle, y), 1, sb))
                    b._ptrs = real
                    b._state.copy_(state)
                    res["cr"].append(_events(lambda d=d: b.combine_recv(d, y), 1, sb))
                b.check()
                med = {k: statistics.median(v[1:]) for k, v in res.items()}
                lines.append(f"{preset:14s} T={T:5d} {mode} progs/SM={mult:2d} warps={warps or row_warps(cfg.hidden):2d} | "
                             + " ".join(f"{k} {v:8.1f}" for k, v in med.items()))
                b = None
                torch.cuda.empty_cache()
    sy._row_warps = row_warps
    if nccl:
        import torch.distributed as dist

        for nbytes in (1024, 64 << 20):
            t = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
            o = torch.empty_like(t)
            g = torch.empty(W * t.numel(), dtype=torch.bfloat16, device=dev)
            for _ in range(3):
                dist.all_to_all_single(o, t)
            a2a = _events(lambda t=t, o=o: dist.all_to_all_single(o, t), 10, sb)
            ag = _events(lambda t=t, g=g: dist.all_gather_into_tensor(g, t), 10, sb)
            cnt = torch.ones(W, dtype=torch.int64, device=dev)

            def counts(cnt=cnt) -> None:
                r = torch.empty(W * W, dtype=torch.int64, device=dev)
                dist.all_gather_into_tensor(r, cnt)
                r.tolist()

            ce = _events(counts, 10, sb)
            lines.append(f"nccl {nbytes:>9d} B: all_to_all_single {a2a:8.1f} us, all_gather {ag:8.1f} us, "
                         f"counts exchange + host read {ce:8.1f} us")
    return lines


def main() -> None:
    presets = sys.argv[1].split(",")
    tokens = [int(t) for t in sys.argv[2].split(",")]
    variants = [("push", 4, 0), ("pull", 4, 0), ("push", 16, 0), ("pull", 16, 0), ("pull", 4, 16)]
    world = torch.cuda.device_count()
    out = run_ranks(_rank, world, args=(presets, tokens, variants, "--nccl" in sys.argv), timeout=1200,
                    backend="nccl")
    for rank, lines in enumerate(out):
        print(f"--- rank {rank} (us, medians; cr_local = combine_recv reading its own HBM)")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
