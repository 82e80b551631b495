"""Fused backward of the mixture-of-prompt-lengths attention (Triton).

Notation as in forward.py (natural-log units here; the kernels use exp2 with
log2(e) folded into the scale). With dO the incoming gradient, per row i:

    Y_c   = sum_{p in c} e^(t_p - m) dO.pv_p         (cheap: P is small)
    X     = sum_j e^(s_j - m) dO.v_j = (dO.O - sum_c gamma_c Y_c) / beta
    D_c   = dO.out_c = (X + Y_c) / Z_c
    delta = sum_c gamma_c D_c

    dL/dw_c    = sum over rows of D_c
    dL/ds_ij   = e^(s_ij - m) (beta dO.v_j - delta)
    dL/dt_ip   = e^(t_ip - m) gamma_c(p) (dO.pv_p - D_c(p))
    dv_j      += e^(s_ij - m) beta dO_i        dpv_p += e^(t_ip - m) gamma_c(p) dO_i

X is recovered from dO.O (the forward keeps no per-candidate output). Its error
in D_c is at most eps |dO.O| / w_c, which the softmax Jacobian multiplies back
by w_c: stable in alpha-space. beta = 0 (possible only with weights that are not
positive) makes X undefined; it is then taken as 0.

Three kernels, none with atomics, so results are bitwise reproducible:

* ``prompt_bwd_kernel``, grid (SPLITS, H): program s walks the (batch, row-block)
  tiles s, s + SPLITS, ... of head h. Per tile it computes Y, X, D, delta and beta
  (delta and beta are stored for the other two kernels), the prompt part of dq,
  and adds its tile's dpk / dpv / dw to partial sums that only it owns
  (SPLITS, H, P, D); the host sums the partials over SPLITS in a fixed order.
* ``kv_bwd_kernel``, grid (cdiv(N, BLOCK_N), B * H): dk, dv of one key block,
  looping over the query rows that see it.
* ``q_bwd_kernel``, grid (cdiv(N, BLOCK_M), B * H): dq of one row block over the
  original keys, added to the prompt part.
"""
import triton
import triton.language as tl

from .forward import _mma, _prompt_scores, _segment_onehot


@triton.jit
def _load_rows(PTR, offs_m, offs_d, row_mask, d_mask, stride_n, stride_d):
    return tl.load(PTR + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=row_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _prompt_terms(q, do, PK, PV, SEG, offs_p, offs_d, offs_c, p_mask, d_mask, m,
                  stride_pp, stride_pd, stride_pvp, stride_pvd, qk_scale, DOT_PRECISION: tl.constexpr):
    """For one block of prompt keys: pk, e^(t - m) (0 where p >= P), dO.pv_p and the one-hot."""
    t = _prompt_scores(q, PK, offs_p, offs_d, p_mask, d_mask, stride_pp, stride_pd, qk_scale, DOT_PRECISION)
    e = tl.exp2(t - m[:, None])
    pv = tl.load(PV + offs_p[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
                 mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    do_pv = _mma(do, tl.trans(pv), DOT_PRECISION)
    onehot = _segment_onehot(SEG, offs_p, p_mask, offs_c)
    return e, do_pv, onehot


@triton.jit
def prompt_bwd_kernel(
    Q, O, DO, PK, PV, SEG, W, RowMax, Denom,
    Delta, Beta, DQPrompt, DPKPart, DPVPart, DWPart,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_pkh, stride_pkp, stride_pkd,
    stride_pvh, stride_pvp, stride_pvd,
    B, H, N, P, C, D, SPLITS, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    d_mask = offs_d < D
    c_mask = offs_c < C
    w = tl.load(W + offs_c, mask=c_mask, other=0.0)
    PK += off_h * stride_pkh
    PV += off_h * stride_pvh
    # This program's own partial sums (no other program touches them).
    part = (split * H + off_h) * P
    DPKPart += part * D
    DPVPart += part * D
    dw = tl.zeros([BLOCK_C], tl.float32)

    blocks_per_seq = tl.cdiv(N, BLOCK_M)
    for tile in range(split, B * blocks_per_seq, SPLITS):
        off_b = (tile // blocks_per_seq).to(tl.int64)
        offs_m = (tile % blocks_per_seq) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < N
        q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, row_mask, d_mask,
                       stride_qn, stride_qd)
        do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, row_mask, d_mask,
                        stride_don, stride_dod)
        o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, offs_m, offs_d, row_mask, d_mask,
                       stride_on, stride_od)
        stat_rows = (off_b * H + off_h) * N + offs_m
        m = tl.load(RowMax + stat_rows, mask=row_mask, other=0.0)
        z = tl.load(Denom + stat_rows[:, None] * C + offs_c[None, :],
                    mask=row_mask[:, None] & c_mask[None, :], other=1.0)
        gamma = tl.where(c_mask[None, :], w[None, :] / z, 0.0)
        beta = tl.sum(gamma, 1)
        do_o = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)

        # Y_c: the prompt part of dO.out_c, times Z_c.
        y = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < P
            e, do_pv, onehot = _prompt_terms(q, do, PK, PV, SEG, offs_p, offs_d, offs_c, p_mask, d_mask, m,
                                             stride_pkp, stride_pkd, stride_pvp, stride_pvd, qk_scale,
                                             DOT_PRECISION)
            y += tl.dot(e * do_pv, onehot, input_precision="ieee")

        x = tl.where(beta != 0.0, (do_o - tl.sum(gamma * y, 1)) / beta, 0.0)
        d_c = tl.where(row_mask[:, None] & c_mask[None, :], (x[:, None] + y) / z, 0.0)  # D_c = dO.out_c
        delta = tl.sum(gamma * d_c, 1)
        dw += tl.sum(d_c, 0)
        tl.store(Delta + stat_rows, delta, mask=row_mask)
        tl.store(Beta + stat_rows, beta, mask=row_mask)

        # Gradients through the prompt scores and values.
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < P
            e, do_pv, onehot = _prompt_terms(q, do, PK, PV, SEG, offs_p, offs_d, offs_c, p_mask, d_mask, m,
                                             stride_pkp, stride_pkd, stride_pvp, stride_pvd, qk_scale,
                                             DOT_PRECISION)
            gamma_p = tl.dot(gamma, tl.trans(onehot), input_precision="ieee")   # gamma_{c(p)}
            d_p = tl.dot(d_c, tl.trans(onehot), input_precision="ieee")         # D_{c(p)}
            weighted = e * gamma_p                                             # attention weight of pk_p
            dt = weighted * (do_pv - d_p)                                      # dL/dt_ip
            pk = tl.load(PK + offs_p[:, None] * stride_pkp + offs_d[None, :] * stride_pkd,
                         mask=p_mask[:, None] & d_mask[None, :], other=0.0)
            dq += _mma(dt.to(pk.dtype), pk, DOT_PRECISION)
            part_ptrs = offs_p[:, None] * D + offs_d[None, :]
            part_mask = p_mask[:, None] & d_mask[None, :]
            dpv = _mma(tl.trans(weighted).to(do.dtype), do, DOT_PRECISION)
            dpk = _mma(tl.trans(dt).to(q.dtype), q, DOT_PRECISION) * sm_scale
            tl.store(DPVPart + part_ptrs, tl.load(DPVPart + part_ptrs, mask=part_mask) + dpv, mask=part_mask)
            tl.store(DPKPart + part_ptrs, tl.load(DPKPart + part_ptrs, mask=part_mask) + dpk, mask=part_mask)
        tl.store(DQPrompt + stat_rows[:, None] * D + offs_d[None, :], dq * sm_scale,
                 mask=row_mask[:, None] & d_mask[None, :])
        # The partial sums are re-read by other threads of this program next tile.
        tl.debug_barrier()

    tl.store(DWPart + (split * H + off_h) * C + offs_c, dw, mask=c_mask)


@triton.jit
def kv_bwd_kernel(
    Q, K, V, DO, RowMax, Delta, Beta, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < D
    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, n_mask, d_mask, stride_kn, stride_kd)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, n_mask, d_mask, stride_vn, stride_vd)
    Q += off_b * stride_qb + off_h * stride_qh
    DO += off_b * stride_dob + off_h * stride_doh
    stats = off_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier rows cannot see these keys
    for m0 in range(lo, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < N
        q = _load_rows(Q, offs_m, offs_d, row_mask, d_mask, stride_qn, stride_qd)
        do = _load_rows(DO, offs_m, offs_d, row_mask, d_mask, stride_don, stride_dod)
        m = tl.load(RowMax + stats + offs_m, mask=row_mask, other=0.0)
        delta = tl.load(Delta + stats + offs_m, mask=row_mask, other=0.0)
        beta = tl.load(Beta + stats + offs_m, mask=row_mask, other=0.0)
        s = _mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
        visible = row_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        probs = tl.where(visible, tl.exp2(s - m[:, None]), 0.0)           # e^(s - m)
        dv += _mma(tl.trans(probs * beta[:, None]).to(do.dtype), do, DOT_PRECISION)
        do_v = _mma(do, tl.trans(v), DOT_PRECISION)
        ds = probs * (beta[:, None] * do_v - delta[:, None])              # dL/ds
        dk += _mma(tl.trans(ds).to(q.dtype), q, DOT_PRECISION)

    out_mask = n_mask[:, None] & d_mask[None, :]
    dk_ptrs = DK + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    dv_ptrs = DV + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def q_bwd_kernel(
    Q, K, V, DO, RowMax, Delta, Beta, DQPrompt, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < N
    d_mask = offs_d < D
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, row_mask, d_mask, stride_qn, stride_qd)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, row_mask, d_mask,
                    stride_don, stride_dod)
    stat_rows = off_bh.to(tl.int64) * N + offs_m
    m = tl.load(RowMax + stat_rows, mask=row_mask, other=0.0)
    delta = tl.load(Delta + stat_rows, mask=row_mask, other=0.0)
    beta = tl.load(Beta + stat_rows, mask=row_mask, other=0.0)
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = N
    if CAUSAL:
        hi = tl.minimum(N, (start_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k = _load_rows(K, offs_n, offs_d, n_mask, d_mask, stride_kn, stride_kd)
        v = _load_rows(V, offs_n, offs_d, n_mask, d_mask, stride_vn, stride_vd)
        s = _mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        probs = tl.where(visible, tl.exp2(s - m[:, None]), 0.0)
        do_v = _mma(do, tl.trans(v), DOT_PRECISION)
        ds = probs * (beta[:, None] * do_v - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, DOT_PRECISION)

    out_mask = row_mask[:, None] & d_mask[None, :]
    dq = dq * sm_scale + tl.load(DQPrompt + stat_rows[:, None] * D + offs_d[None, :], mask=out_mask, other=0.0)
    dq_ptrs = DQ + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=out_mask)
