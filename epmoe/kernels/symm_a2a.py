"""One-sided all-to-all kernels over every rank's workspace (protocol: epmoe/comm/symmetric.py).

Every kernel gets `ptrs` (int64 [W], each rank's workspace base address) and the regions' byte
offsets; a peer's region is `(ptrs[r] + offset).to(pointer)`. `state` is this rank's private int32
word array:

    state[0]   sequence number of the last completed call (this call's = state[0] % WRAP + 1)
    state[1:4] "programs done" counters of dispatch_send, combine_send, combine_recv
    state[4]   error code (1 = a wait timed out), state[5] its sequence number
    state[6]   1 + a source rank that sent more tokens than the call's bound B, state[7] how many
    state[8 + phase * W + r] = 1: rank r never signalled in phase 0 (dispatch) / 1 (combine)

Publishing: the last program of a kernel to finish (a counter RMW with acq_rel after a CTA
barrier) raises the flags with a release store at system scope, so every row any program wrote
is visible to a peer that acquires the flag. The counter RMW is at system scope too (one atomic
per program): the rows go to (or are read by) peer GPUs, a gpu-scope release orders them only for
this GPU, and the flag release is cumulative only over what was acquired at sys scope. Waits are
sys-scope acquire loads bounded by %globaltimer (USE_TIMER) or, interpreted, a spin count.

Measured history (first version 260 / 917 us at T = 128 on one H200; what the rewrite changed):
docs/performance.md, "The symm_a2a kernels' rewrite".
"""

import triton
import triton.language as tl

SEQ_WRAP = tl.constexpr(2147483647)


@triton.jit
def _now(USE_TIMER: tl.constexpr):
    if USE_TIMER:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                      pack=1)
    else:
        t = tl.full([], 0, tl.int64)
    return t


@triton.jit
def _wait_flag(flag_ptr, seq, timeout, USE_TIMER: tl.constexpr):
    """Acquire-spin until *flag_ptr == seq; give up after `timeout` ns (USE_TIMER) or spins.
    Returns whether the flag arrived."""
    v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    start = _now(USE_TIMER)
    elapsed = tl.full([], 0, tl.int64)
    while (v != seq) & (elapsed < timeout):
        v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        if USE_TIMER:
            elapsed = _now(USE_TIMER) - start
        else:
            elapsed += 1
    return v == seq


@triton.jit
def _fail(state, phase, r, seq, W: tl.constexpr):
    tl.store(state + 8 + phase * W + r, 1)
    tl.store(state + 5, seq)
    tl.atomic_xchg(state + 4, 1)


@triton.jit
def _fan_out_row(src, ptrs, region, row_bytes, hits, n: tl.constexpr, BLOCK: tl.constexpr, W: tl.constexpr):
    """Copy n elements from src to `region + row_bytes` of every rank r whose bit is set in
    `hits`: each chunk is read once and stored W times (masked stores, no branches)."""
    for c in range(0, n, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(src + offs, mask=m)
        for r in tl.static_range(W):
            dst = (tl.load(ptrs + r) + region + row_bytes).to(tl.pointer_type(src.dtype.element_ty))
            # tl.where(scalar, m, False), not m & scalar: Triton 3.9's interpreter refuses the latter as a mask
            tl.store(dst + offs, v, mask=tl.where(((hits >> r) & 1) != 0, m, False))


@triton.jit
def symm_dispatch_send_kernel(
    ptrs, state,
    ids_ptr, w_ptr, expert_rank_ptr, expert_local_ptr,  # routing [T, K]; placement [E]
    d_ptr, s_ptr, g_ptr,  # data rows [T, D] (any element type), scales [T, S] uint8, global [T, G] fp32
    T, rank, E,
    OFF_FLAGS, OFF_META_IDS, OFF_META_W, OFF_DATA, OFF_SCALES, OFF_GSCALE,
    Tm: tl.constexpr, D: tl.constexpr, D_BYTES: tl.constexpr, S: tl.constexpr, G: tl.constexpr,
    W: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, KL: tl.constexpr, KL_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """for t in my tokens, r in ranks: meta[r][rank, t] = (local ids on r in k order, weights);
    if t picks r: rows[r][rank, t] = x[t]. Last program: count[r][rank] = T, flag[r][rank] = seq.
    (D, D_BYTES: data elements / bytes a row; S: scale bytes a row, 0 = none; G: global scales, 0/1.)"""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = tl.load(state) % SEQ_WRAP + 1
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    js = tl.arange(0, KL_PAD)
    jmask = js < KL
    t = pid
    while t < T:
        ids = tl.load(ids_ptr + t * K + ks, mask=kmask, other=0)
        wts = tl.load(w_ptr + t * K + ks, mask=kmask, other=0.0)
        live = kmask & (ids >= 0) & (ids < E)  # id -1 (or past E): a masked pair, sent nowhere
        rk = tl.load(expert_rank_ptr + ids, mask=live, other=-1)
        lc = tl.load(expert_local_ptr + ids, mask=live, other=-1)
        slot = (rank * Tm + t).to(tl.int64)
        hits = tl.zeros([], dtype=tl.int32)  # bit r: t picks an expert on rank r
        for r in tl.static_range(W):
            sel = (rk == r) & kmask
            pos = tl.cumsum(sel.to(tl.int32), 0) - 1  # rank of each selected k among selected
            onehot = sel[:, None] & (pos[:, None] == js[None, :])  # [K_PAD, KL_PAD]
            mid = tl.sum(tl.where(onehot, lc[:, None], 0), 0)
            mw = tl.sum(tl.where(onehot, wts[:, None], 0.0), 0)
            got = tl.sum(onehot.to(tl.int32), 0) > 0
            base = tl.load(ptrs + r)
            mp = (base + OFF_META_IDS + slot * (KL * 4)).to(tl.pointer_type(tl.int32))
            tl.store(mp + js, tl.where(got, mid, -1), mask=jmask)
            wp = (base + OFF_META_W + slot * (KL * 4)).to(tl.pointer_type(tl.float32))
            tl.store(wp + js, tl.where(got, mw, 0.0), mask=jmask)
            hits = hits | (tl.max(sel.to(tl.int32), 0) << r)
        # the row is read once and written to every rank it picks (once per rank, not per expert)
        _fan_out_row(d_ptr + t.to(tl.int64) * D, ptrs, OFF_DATA, slot * D_BYTES, hits, D, BLOCK_D, W)
        if S > 0:
            _fan_out_row(s_ptr + t.to(tl.int64) * S, ptrs, OFF_SCALES, slot * S, hits, S, BLOCK_S, W)
        if G > 0:
            _fan_out_row(g_ptr + t.to(tl.int64) * G, ptrs, OFF_GSCALE, slot * (G * 4), hits, G, 16, W)
        t += nprog
    tl.debug_barrier()
    # sys scope, not gpu: this program's stores went to peer GPUs, and the last program's flag
    # release (sys) only carries what it acquired at a scope that includes those peers
    done = tl.atomic_add(state + 1, 1, sem="acq_rel", scope="sys")
    if done == nprog - 1:
        tl.store(state + 1, 0)
        for r in tl.static_range(W):
            fl = (tl.load(ptrs + r) + OFF_FLAGS).to(tl.pointer_type(tl.int32))
            tl.store(fl + 2 * W + rank, T)
        tl.debug_barrier()
        for r in tl.static_range(W):
            fl = (tl.load(ptrs + r) + OFF_FLAGS).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(fl + rank, seq, sem="release", scope="sys")


@triton.jit
def symm_dispatch_recv_kernel(
    ptrs, state, expert_ids_ptr,  # out: pair expert ids [W * B * KL] int32
    rank, timeout, B, CHUNKS, OFF_FLAGS, OFF_META_IDS,
    Tm: tl.constexpr, W: tl.constexpr, KL: tl.constexpr, KL_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_TIMER: tl.constexpr,
):
    """Items i = s * CHUNKS + chunk (CHUNKS = cdiv(B, BLOCK_T)), program p takes p, p + nprog, ...
    (one item each unless the grid is capped): wait for source s's flag, then for t < B (the call's
    bound on every rank's T, at most Tm) in the chunk: expert_ids[(s * B + t) * KL + j] =
    meta_ids[s, t, j] if t < count[s] else -1. A count past B is recorded in state[6:8] (its tokens
    past B are not listed: the kernels stay in bounds, check() raises)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = tl.load(state) % SEQ_WRAP + 1
    own = tl.load(ptrs + rank)
    fl = (own + OFF_FLAGS).to(tl.pointer_type(tl.int32))
    js = tl.arange(0, KL_PAD)
    mp = (own + OFF_META_IDS).to(tl.pointer_type(tl.int32))
    i = pid
    while i < W * CHUNKS:
        s = i // CHUNKS
        chunk = i % CHUNKS
        ok = tl.load(state + 4, volatile=True) == 0
        if ok:
            ok = _wait_flag(fl + s, seq, timeout, USE_TIMER)
            if not ok:
                _fail(state, 0, s, seq, W)
        tl.debug_barrier()
        count = tl.load(fl + 2 * W + s, cache_modifier=".cv")
        count = tl.where(ok, count, 0)
        if (chunk == 0) & (count > B):
            tl.store(state + 7, count)
            tl.atomic_xchg(state + 6, s + 1)
        t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
        m = (t < B)[:, None] & (js < KL)[None, :]
        src = (s * Tm + t).to(tl.int64)[:, None] * KL + js[None, :]
        dst = (s * B + t).to(tl.int64)[:, None] * KL + js[None, :]
        live = m & (t < count)[:, None]
        ids = tl.load(mp + src, mask=live, other=-1, cache_modifier=".cv")
        tl.store(expert_ids_ptr + dst, ids, mask=m)
        i += nprog


@triton.jit
def symm_combine_send_kernel(
    ptrs, state, out_ptr,  # expert outputs [W * B * KL, H], one row per pair of dispatch_recv's list
    rank, B, OFF_FLAGS, OFF_META_IDS, OFF_META_W, OFF_COMB,
    Tm: tl.constexpr, H: tl.constexpr, W: tl.constexpr, KL: tl.constexpr, H_PAD: tl.constexpr,
    COMB_DTYPE: tl.constexpr, PUSH: tl.constexpr,
):
    """partial[s, t] = sum_j w[s, t, j] * out[(s * Tm + t) * KL + j] (fp32, j order, valid j only)
    (out row (s * B + t) * KL + j) for t < min(count[s], B) whose token picked an expert here;
    stored into home s's comb[rank, t] (PUSH) or own comb[s, t]; last program:
    flag_combine[s][rank] = seq."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = tl.load(state) % SEQ_WRAP + 1
    own = tl.load(ptrs + rank)
    fl = (own + OFF_FLAGS).to(tl.pointer_type(tl.int32))
    mi = (own + OFF_META_IDS).to(tl.pointer_type(tl.int32))
    mw = (own + OFF_META_W).to(tl.pointer_type(tl.float32))
    offs = tl.arange(0, H_PAD)
    m = offs < H
    for s in tl.static_range(W):
        n = tl.minimum(tl.load(fl + 2 * W + s), B)
        if PUSH:  # home s's region of partial sums from this rank: [rank * Tm, (rank + 1) * Tm)
            dst = (tl.load(ptrs + s) + OFF_COMB).to(tl.pointer_type(COMB_DTYPE)) + rank * Tm * H
        else:  # own region for home s
            dst = (own + OFF_COMB).to(tl.pointer_type(COMB_DTYPE)) + s * Tm * H
        t = pid
        while t < n:
            slot = (s * Tm + t).to(tl.int64)
            acc = tl.zeros([H_PAD], dtype=tl.float32)
            live = tl.zeros([], dtype=tl.int32)
            for j in tl.static_range(KL):  # k order; no branches, so every row load can be in flight
                e = tl.load(mi + slot * KL + j)
                w = tl.load(mw + slot * KL + j)
                row = ((s * B + t).to(tl.int64) * KL + j) * H
                v = tl.load(out_ptr + row + offs, mask=tl.where(e >= 0, m, False), other=0.0)
                acc += tl.where(e >= 0, w * v.to(tl.float32), 0.0)
                live += (e >= 0).to(tl.int32)
            # a token that picked nothing here is never read by its home: no bytes for it
            tl.store(dst + t.to(tl.int64) * H + offs, acc.to(COMB_DTYPE), mask=tl.where(live > 0, m, False))
            t += nprog
    tl.debug_barrier()
    # sys scope, not gpu: the partial sums went to peer GPUs (PUSH) or are read by them; the last
    # program's flag release only carries stores it acquired at a scope that includes the peers
    done = tl.atomic_add(state + 2, 1, sem="acq_rel", scope="sys")
    if done == nprog - 1:
        tl.store(state + 2, 0)
        for s in tl.static_range(W):
            pf = (tl.load(ptrs + s) + OFF_FLAGS).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(pf + W + rank, seq, sem="release", scope="sys")


@triton.jit
def symm_combine_recv_kernel(
    ptrs, state, ids_ptr, expert_rank_ptr, y_ptr, y_stride,  # routing ids [T, K]; y [T, H]
    T, rank, E, timeout, OFF_FLAGS, OFF_COMB,
    Tm: tl.constexpr, H: tl.constexpr, W: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    H_PAD: tl.constexpr, COMB_DTYPE: tl.constexpr, USE_TIMER: tl.constexpr, PUSH: tl.constexpr,
):
    """Wait for every expert rank's combine flag, then y[t] = sum over r in rank order (ranks t
    picked) of r's partial sum for t: own comb[r, t] (PUSH) or r's comb[rank, t], fp32, cast
    once. Last program: state[0] = seq (call done)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = tl.load(state) % SEQ_WRAP + 1
    own = tl.load(ptrs + rank)
    fl = (own + OFF_FLAGS).to(tl.pointer_type(tl.int32))
    for r in tl.static_range(W):
        ok = tl.load(state + 4, volatile=True) == 0
        if ok:
            ok = _wait_flag(fl + W + r, seq, timeout, USE_TIMER)
            if not ok:
                _fail(state, 1, r, seq, W)
    tl.debug_barrier()
    ks = tl.arange(0, K_PAD)
    kmask = ks < K
    offs = tl.arange(0, H_PAD)
    m = offs < H
    t = pid
    while t < T:
        ids = tl.load(ids_ptr + t * K + ks, mask=kmask, other=0)
        rk = tl.load(expert_rank_ptr + ids, mask=kmask & (ids >= 0) & (ids < E), other=-1)
        acc = tl.zeros([H_PAD], dtype=tl.float32)
        for r in tl.static_range(W):  # rank order; masked loads instead of branches
            hit = tl.max(((rk == r) & kmask).to(tl.int32), 0) > 0
            if PUSH:  # r wrote it into this rank's workspace: a local read
                src = (own + OFF_COMB).to(tl.pointer_type(COMB_DTYPE)) + (r * Tm + t).to(tl.int64) * H
            else:  # a read from r's workspace (over NVLink)
                src = (tl.load(ptrs + r) + OFF_COMB).to(tl.pointer_type(COMB_DTYPE)) + (rank * Tm + t).to(tl.int64) * H
            acc += tl.load(src + offs, mask=tl.where(hit, m, False), other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(y_ptr + t * y_stride + offs, acc.to(y_ptr.dtype.element_ty), mask=m)
        t += nprog
    tl.debug_barrier()
    done = tl.atomic_add(state + 3, 1, sem="acq_rel", scope="gpu")  # publishes only state[0], read on this GPU
    if done == nprog - 1:
        tl.store(state + 3, 0)
        tl.store(state, seq)
