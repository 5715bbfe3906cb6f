"""Triton kernels of fused MSPLoRA training (the LoRAFusion design, all levels at once).

A is the levels' A factors side by side, scales folded in (K x R); B their B factors
stacked (R x N). R = sum of the ranks is padded to BLOCK_R inside the kernels only.
Offsets are int64, accumulation fp32. fp32 inputs multiply in IEEE fp32 unless torch allows
TF32 (torch.backends.cuda.matmul.allow_tf32), so results agree with torch's own matmul. Dropout
hashes (seed, row*K + col) as the CPU and CUDA kernels do (csrc/dropout_hash.h), so every backend
draws the same mask; the forward's shrink can store it packed (1 bit an element) for the backward
to read instead of hashing again.
"""
import triton
import triton.language as tl


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Group M tiles so consecutive programs reuse the same weight tiles from L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols):
    # A (rows x cols) tile, zero outside the matrix, so ragged edges add nothing to a dot.
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_tile(ptr, values, rows, cols, stride_row, stride_col, n_rows, n_cols):
    # Rounded to the output's dtype once, here; nothing outside the matrix is written.
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, values.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _keep(seed, rows, cols, K, p):
    # csrc/dropout_hash.h's hash (splitmix64's finalizer over a Weyl sequence) of element
    # row*K + col, so the Triton, CPU and CUDA backends draw the same mask. About 20 integer
    # instructions an element, where tl.rand ran a whole Philox4x32-10 for each (about 90).
    z = (rows[:, None] * K + cols[None, :]).to(tl.uint64) + seed.to(tl.uint64) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z >> 40).to(tl.float32) * (1.0 / 16777216.0) >= p


@triton.jit
def _apply_keep(x, keep, keep_scale):
    # Inverted dropout of an x tile, multiplied in fp32 and rounded once to x's dtype, as the
    # reference and the CPU and CUDA kernels do.
    return tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x.dtype)


@triton.jit
def _dropped(x, seed, rows, cols, K, p, keep_scale):
    return _apply_keep(x, _keep(seed, rows, cols, K, p), keep_scale)


@triton.jit
def _store_bits(bits_ptr, keep, rows, cols, k0, M, K, W, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # The tile's keep flags packed 32 to an int32 word (bit k % 32 of word k // 32; 0 past K), so
    # that the backward reads 1 bit an element instead of hashing it again. BLOCK_K % 32 == 0.
    flags = tl.reshape((keep & (cols[None, :] < K)).to(tl.uint32), (BLOCK_M, BLOCK_K // 32, 32))
    shifts = tl.arange(0, 32).to(tl.uint32)
    words = tl.sum(flags << shifts[None, None, :], axis=2).to(tl.uint32)  # distinct bits: the sum is the OR
    rw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    tl.store(bits_ptr + rows[:, None] * W + rw[None, :], words.to(tl.int32, bitcast=True),
             mask=(rows[:, None] < M) & (rw[None, :] < W))


@triton.jit
def _kept_bits(bits_ptr, rows, cols, M, K, W):
    # Keep flags of a tile from the packed mask: one word load per element (neighbours share it in L1).
    words = tl.load(bits_ptr + rows[:, None] * W + (cols // 32)[None, :],
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0)
    return ((words >> (cols % 32).to(tl.int32)[None, :]) & 1) != 0


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, t_ptr, seed_ptr, bits_ptr, M, K, R, W,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_tm, stride_tr,
    p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KEEP_BITS: tl.constexpr = False,
):
    """K1: T = dropout(x) @ A; with KEEP_BITS the first rank block's programs also store the
    mask they draw, packed (W = ceil(K / 32) words a row)."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = _load_tile(x_ptr, rm, rk, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            keep = _keep(seed, rm, rk, K, p)
            x = _apply_keep(x, keep, keep_scale)
            if KEEP_BITS:
                if tl.program_id(1) == 0:
                    _store_bits(bits_ptr, keep, rm, rk, k0, M, K, W, BLOCK_M, BLOCK_K)
        a = _load_tile(a_ptr, rk, rr, stride_ak, stride_ar, K, R)
        acc += tl.dot(x, a, input_precision=DOT_PRECISION)
    _store_tile(t_ptr, acc, rm, rr, stride_tm, stride_tr, M, R)


@triton.jit
def expand_linear_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, y_ptr, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_bn_r, stride_bn_n,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """K2: y = x @ W^T + T @ B + bias, the LoRA expand in the base GEMM's fp32 accumulator."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = _load_tile(x_ptr, rm, rk, stride_xm, stride_xk, M, K)
        w = _load_tile(w_ptr, rk, rn, stride_wk, stride_wn, K, N)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    # The rank loop runs once or twice: not software-pipelined, so that it does not hold a buffer
    # per stage in shared memory (at R = 112 that alone was over sm_90's 227 KiB).
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rr = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        t = _load_tile(t_ptr, rm, rr, stride_tm, stride_tr, M, R)
        b = _load_tile(b_ptr, rr, rn, stride_bn_r, stride_bn_n, R, N)
        acc += tl.dot(t, b, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_ptr, acc, rm, rn, stride_ym, stride_yn, M, N)


@triton.jit
def shrink_expand_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, t_ptr, seed_ptr, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ak, stride_ar, stride_bn_r, stride_bn_n,
    stride_ym, stride_yn, stride_tm, stride_tr, p, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """K1 and K2 in one pass, for small widths: each output tile recomputes its rows of
    T = dropout(x) @ A from the x tiles it loads anyway, so T never makes a round trip through
    memory and the forward is one launch. Costs N / BLOCK_N times the shrink's FLOPs and mask
    hashes; R must fit one rank block. Column-tile 0 writes T for the backward."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = _load_tile(x_ptr, rm, rk, stride_xm, stride_xk, M, K)
        w = _load_tile(w_ptr, rk, rn, stride_wk, stride_wn, K, N)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            x = _dropped(x, seed, rm, rk, K, p, keep_scale)
        a = _load_tile(a_ptr, rk, rr, stride_ak, stride_ar, K, R)
        acc_t += tl.dot(x, a, input_precision=DOT_PRECISION)
    # T in the inputs' dtype, as the two-kernel path stores and reloads it.
    t = acc_t.to(t_ptr.dtype.element_ty)
    if pid_n == 0:
        _store_tile(t_ptr, t, rm, rr, stride_tm, stride_tr, M, R)
    b = _load_tile(b_ptr, rr, rn, stride_bn_r, stride_bn_n, R, N)
    acc += tl.dot(t, b, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_ptr, acc, rm, rn, stride_ym, stride_yn, M, N)


@triton.jit
def grad_t_b_kernel(
    dy_ptr, t_ptr, b_ptr, dt_ptr, db_ptr, M, N, R,
    stride_dym, stride_dyn, stride_tm, stride_tr, stride_br, stride_bn, stride_dtm, stride_dtr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """K3: one pass over dy gives dT = dy @ B^T and dB = T^T @ dy (dB accumulated in fp32)."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = _load_tile(t_ptr, rm, rr, stride_tm, stride_tr, M, R)
    t_trans = tl.trans(t)
    acc_dt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dy = _load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, M, N)
        b = _load_tile(b_ptr, rr, rn, stride_br, stride_bn, R, N)
        acc_dt += tl.dot(dy, tl.trans(b), input_precision=DOT_PRECISION)
        db = tl.dot(t_trans, dy, input_precision=DOT_PRECISION)
        # Relaxed: each sum is read only after the kernel ends, so no fence is needed per add.
        tl.atomic_add(db_ptr + rr[:, None] * N + rn[None, :], db, mask=(rr[:, None] < R) & (rn[None, :] < N),
                      sem="relaxed")
    _store_tile(dt_ptr, acc_dt, rm, rr, stride_dtm, stride_dtr, M, R)


@triton.jit
def grad_x_kernel(
    dy_ptr, w_ptr, dt_ptr, a_ptr, dx_ptr, seed_ptr, bits_ptr, M, N, K, R, W, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dtm, stride_dtr, stride_ak, stride_ar,
    stride_dxm, stride_dxk, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr = False, MASK_BITS: tl.constexpr = False,
):
    """K4: dx = dy @ W + mask * (dT @ A^T); the LoRA term goes first so the mask applies to it alone.
    With N = 0 and ACCUMULATE, only dx += mask * (dT @ A^T): the cuBLAS path's epilogue, after
    cuBLAS has written dy @ W into dx."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):  # not pipelined, as in expand_linear
        rr = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        dt = _load_tile(dt_ptr, rm, rr, stride_dtm, stride_dtr, M, R)
        a = _load_tile(a_ptr, rr, rk, stride_ar, stride_ak, R, K)
        acc += tl.dot(dt, a, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        if MASK_BITS:  # the forward's packed mask
            keep = _kept_bits(bits_ptr, rm, rk, M, K, W)
        else:
            keep = _keep(tl.load(seed_ptr), rm, rk, K, p)
        acc = tl.where(keep, acc * keep_scale, 0.0)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dy = _load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, M, N)
        w = _load_tile(w_ptr, rn, rk, stride_wn, stride_wk, N, K)
        acc += tl.dot(dy, w, input_precision=DOT_PRECISION)
    if ACCUMULATE:
        acc += _load_tile(dx_ptr, rm, rk, stride_dxm, stride_dxk, M, K).to(tl.float32)
    _store_tile(dx_ptr, acc, rm, rk, stride_dxm, stride_dxk, M, K)


@triton.jit
def grad_a_kernel(
    x_ptr, dt_ptr, da_ptr, seed_ptr, bits_ptr, M, K, R, W, rows_per_split,
    stride_xm, stride_xk, stride_dtm, stride_dtr, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASK_BITS: tl.constexpr = False,
):
    """dA = dropout(x)^T @ dT, split over rows; splits meet by fp32 atomics."""
    rk = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.program_id(2).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_start = tl.program_id(1).to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT and not MASK_BITS:
        seed = tl.load(seed_ptr)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        x = _load_tile(x_ptr, rm, rk, stride_xm, stride_xk, m_end, K)
        if HAS_DROPOUT:
            if MASK_BITS:  # the forward's packed mask
                x = _apply_keep(x, _kept_bits(bits_ptr, rm, rk, M, K, W), keep_scale)
            else:
                x = _dropped(x, seed, rm, rk, K, p, keep_scale)
        dt = _load_tile(dt_ptr, rm, rr, stride_dtm, stride_dtr, m_end, R)
        acc += tl.dot(tl.trans(x), dt, input_precision=DOT_PRECISION)
    tl.atomic_add(da_ptr + rk[:, None] * R + rr[None, :], acc, mask=(rk[:, None] < K) & (rr[None, :] < R),
                  sem="relaxed")


@triton.jit
def dropout_mask_kernel(out_ptr, seed_ptr, M, K, p, keep_scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The multiplier the kernels above apply to x: keep_scale where kept, 0 where dropped."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), rm, rk, K, p)
    val = tl.where(keep, keep_scale, 0.0)
    _store_tile(out_ptr, val, rm, rk, K, 1, M, K)


@triton.jit
def dropout_kernel(x_ptr, out_ptr, seed_ptr, M, K, stride_xm, stride_xk, p, keep_scale,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """dropout(x) itself, row-major: for a backward that reuses it rather than regenerating the mask."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    x = _load_tile(x_ptr, rm, rk, stride_xm, stride_xk, M, K)
    _store_tile(out_ptr, _dropped(x, tl.load(seed_ptr), rm, rk, K, p, keep_scale), rm, rk, K, 1, M, K)
