"""Fused backward of the mixture-of-prompt-lengths attention (Triton).

Notation as in forward.py (natural-log units here; the kernels use exp2 with
log2(e) folded into the scale). With dO the incoming gradient, per row i:

    X     = sum_j e^(s_j - m) dO.v_j = l dO.O_x        (O_x saved by the forward)
    Y_c   = sum_{p in c} e^(t_p - m) dO.pv_p            (cheap: P is small)
    D_c   = dO.out_c = (X + Y_c) / Z_c
    delta = sum_c gamma_c D_c

    dL/dw_c    = sum over rows of D_c, with X summed exactly (see q_bwd_kernel)
    dL/ds_ij   = e^(s_ij - m) (beta dO.v_j - delta)
    dL/dt_ip   = e^(t_ip - m) gamma_c(p) (dO.pv_p - D_c(p))
    dv_j      += e^(s_ij - m) beta dO_i        dpv_p += e^(t_ip - m) gamma_c(p) dO_i

X carries the rounding of one stored O_x value, relative to X's own size (as
FlashAttention's Delta = dO.O does); nothing is divided by beta. The weight
gradient is different: it sums D_c over every row of the batch, where the rows
cancel, so a per-row rounding of X would be amplified by that cancellation.
q_bwd_kernel, which forms e^(s_ij - m) and dO.v_j for every visible key anyway,
sums X exactly in float32 and writes each row's D_c; the host sums the rows.

Three kernels, none with atomics and none reading what it writes, so results
are bitwise reproducible and a kernel may be re-run (benchmark warm-up,
autotuning) without accumulating twice:

* ``prompt_bwd_kernel``, grid (SPLITS, H_kv, cdiv(P, BLOCK_P)): program (s, g, b)
  walks the (batch, query head, row-block) tiles s, s + SPLITS, ... of the query
  heads that read key/value head g (and so its prompts). Per tile it
  computes X, Y, D, delta and beta (block b = 0 stores delta, beta, Y and D for
  the other two kernels), then for its own prompt block b dpk / dpv, which it
  keeps in registers over all its tiles and writes once to its own slot of
  (SPLITS, H_kv, P, D). The
  host sums those slots over SPLITS in a fixed order. SPLITS, BLOCK_M and
  BLOCK_P of this kernel depend on the shapes only, never on the launch
  configuration of the other kernels, so the reduction order of the prompt
  gradients is fixed.
* ``kv_bwd_kernel``, grid (cdiv(N_K, BLOCK_N), B * H_kv): dk, dv of one key block,
  looping over the query heads of its group and, per head, the query rows that see
  it (causal: from row start - KEY_OFFSET on).
* ``q_bwd_kernel``, grid (cdiv(N, BLOCK_M), B * H): dq of one row block, over the
  original keys and then the prompt keys (it holds q and dO of those rows already,
  so the prompt part costs three small dots and no (B, H, N, D) buffer), and the
  rows' D_c with the exact X (B, H, N, C), summed over rows by the host: the
  weight gradient's reduction order depends on no launch configuration either.

Hidden keys (causal, key_mask) get e^(s - m) = 0 and so no gradient; a candidate
with Z_c = 0 in a row (it sees no key there, its output is 0) gets gamma_c = 0 and
D_c = 0. All of them read q, k, v, dO and O_x through their strides (q, k, v are usually
strided views of one packed projection): nothing is copied.
"""
import triton
import triton.language as tl

from .forward import _cast, _gamma, _head_dot, _mma, _per_candidate, _prompt_scores, _segment_onehot, _visible


@triton.jit
def _load_rows(PTR, offs_m, offs_d, row_mask, d_mask, stride_n, stride_d):
    return tl.load(PTR + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=row_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _prompt_terms(q, do, Q, DO, offs_m, row_mask, stride_qn, stride_qd, stride_don, stride_dod,
                  PK, PV, SEG, offs_p, offs_d, offs_c, p_mask, d_mask, m,
                  stride_pp, stride_pd, stride_pvp, stride_pvd, D, qk_scale,
                  BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """For one block of prompt keys: e^(t - m) (0 where p >= P), dO.pv_p and the one-hot."""
    t = _prompt_scores(q, Q, offs_m, row_mask, stride_qn, stride_qd, PK, offs_p, offs_d, p_mask, d_mask,
                       stride_pp, stride_pd, D, qk_scale, BLOCK_DK, DOT_PRECISION)
    e = tl.exp2(t - m[:, None])
    pv = tl.load(PV + offs_p[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
                 mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    do_pv = _head_dot(do, pv, DO, offs_m, row_mask, stride_don, stride_dod, PV, offs_p, p_mask, stride_pvp,
                      stride_pvd, D, BLOCK_DK, DOT_PRECISION)
    onehot = _segment_onehot(SEG, offs_p, p_mask, offs_c)
    return e, do_pv, onehot


@triton.jit
def _candidate_grads(x, y, z, row_mask, c_mask):
    """D_c = dO.out_c = (X + Y_c) / Z_c per row; 0 where Z_c = 0 (out_c is 0 there) or out of range."""
    valid = row_mask[:, None] & c_mask[None, :] & (z > 0)
    return tl.where(valid, (x[:, None] + y) / tl.where(valid, z, 1.0), 0.0)


@triton.jit
def prompt_bwd_kernel(
    Q, OX, DO, PK, PV, SEG, W, RowMax, RowSum, Denom,
    Delta, Beta, YRows, DPromptRows, DPKPart, DPVPart,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_pkh, stride_pkp, stride_pkd,
    stride_pvh, stride_pvp, stride_pvd,
    B, H, GROUP, N, P, C, D, SPLITS, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    off_kv = tl.program_id(1).to(tl.int64)  # the key/value head whose prompts this program owns
    own_block = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    d_mask = offs_d < D
    c_mask = offs_c < C
    w = tl.load(W + offs_c, mask=c_mask, other=0.0)
    PK += off_kv * stride_pkh
    PV += off_kv * stride_pvh
    own_p = own_block * BLOCK_P + tl.arange(0, BLOCK_P)
    own_mask = own_p < P
    dpk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dpv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)

    # Tiles: (batch, query head of the group, row block), in that order.
    blocks_per_seq = tl.cdiv(N, BLOCK_M)
    for tile in range(split, B * GROUP * blocks_per_seq, SPLITS):
        off_b = (tile // (GROUP * blocks_per_seq)).to(tl.int64)
        off_h = off_kv * GROUP + (tile // blocks_per_seq) % GROUP
        offs_m = (tile % blocks_per_seq) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < N
        q_rows, do_rows = Q + off_b * stride_qb + off_h * stride_qh, DO + off_b * stride_dob + off_h * stride_doh
        q = _load_rows(q_rows, offs_m, offs_d, row_mask, d_mask, stride_qn, stride_qd)
        do = _load_rows(do_rows, offs_m, offs_d, row_mask, d_mask, stride_don, stride_dod)
        ox = _load_rows(OX + off_b * stride_ob + off_h * stride_oh, offs_m, offs_d, row_mask, d_mask,
                        stride_on, stride_od)
        stat_rows = (off_b * H + off_h) * N + offs_m
        m = tl.load(RowMax + stat_rows, mask=row_mask, other=0.0)
        l_x = tl.load(RowSum + stat_rows, mask=row_mask, other=0.0)
        z = tl.load(Denom + stat_rows[:, None] * C + offs_c[None, :],
                    mask=row_mask[:, None] & c_mask[None, :], other=1.0)
        gamma = _gamma(w, z, c_mask)
        beta = tl.sum(gamma, 1)
        x = l_x * tl.sum(do.to(tl.float32) * ox.to(tl.float32), 1)

        # Y_c over every prompt block (each block's own program needs all of D_c).
        y = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < P
            e, do_pv, onehot = _prompt_terms(q, do, q_rows, do_rows, offs_m, row_mask, stride_qn, stride_qd,
                                             stride_don, stride_dod, PK, PV, SEG, offs_p, offs_d, offs_c, p_mask,
                                             d_mask, m, stride_pkp, stride_pkd, stride_pvp, stride_pvd, D, qk_scale,
                                             BLOCK_DK, DOT_PRECISION)
            y += _per_candidate(e * do_pv, onehot)
        d_c = _candidate_grads(x, y, z, row_mask, c_mask)  # D_c = dO.out_c
        delta = tl.sum(gamma * d_c, 1)
        if own_block == 0:
            tl.store(Delta + stat_rows, delta, mask=row_mask)
            tl.store(Beta + stat_rows, beta, mask=row_mask)
            rc = stat_rows[:, None] * C + offs_c[None, :]
            tl.store(YRows + rc, y, mask=row_mask[:, None] & c_mask[None, :])
            tl.store(DPromptRows + rc, d_c, mask=row_mask[:, None] & c_mask[None, :])

        # Gradients through this program's own prompt scores and values.
        e, do_pv, onehot = _prompt_terms(q, do, q_rows, do_rows, offs_m, row_mask, stride_qn, stride_qd,
                                         stride_don, stride_dod, PK, PV, SEG, own_p, offs_d, offs_c, own_mask, d_mask,
                                         m, stride_pkp, stride_pkd, stride_pvp, stride_pvd, D, qk_scale, BLOCK_DK,
                                         DOT_PRECISION)
        weighted = e * _per_candidate(gamma, tl.trans(onehot))         # gamma_{c(p)} e^(t - m)
        dt = weighted * (do_pv - _per_candidate(d_c, tl.trans(onehot)))  # dL/dt_ip
        dpv += _mma(_cast(tl.trans(weighted), do.dtype, DOT_PRECISION), do, DOT_PRECISION)
        dpk += _mma(_cast(tl.trans(dt), q.dtype, DOT_PRECISION), q, DOT_PRECISION)

    part = ((split * (H // GROUP) + off_kv) * P + own_p[:, None]) * D + offs_d[None, :]
    part_mask = own_mask[:, None] & d_mask[None, :]
    tl.store(DPKPart + part, dpk * sm_scale, mask=part_mask)
    tl.store(DPVPart + part, dpv, mask=part_mask)


@triton.jit
def kv_bwd_kernel(
    Q, K, V, DO, DK, DV, RowMax, Delta, Beta,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    KeyMask, stride_kmb, stride_kmn,
    H, GROUP, N, N_K, KEY_OFFSET, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_bkv = tl.program_id(1)
    kv_heads = H // GROUP
    off_b = (off_bkv // kv_heads).to(tl.int64)
    off_kv = (off_bkv % kv_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < N_K
    d_mask = offs_d < D
    k = _load_rows(K + off_b * stride_kb + off_kv * stride_kh, offs_n, offs_d, n_mask, d_mask, stride_kn, stride_kd)
    v = _load_rows(V + off_b * stride_vb + off_kv * stride_vh, offs_n, offs_d, n_mask, d_mask, stride_vn, stride_vd)
    KeyMask += off_b * stride_kmb

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # rows before start_n - KEY_OFFSET cannot see these keys
        lo = (tl.maximum(start_n - KEY_OFFSET, 0) // BLOCK_M) * BLOCK_M
    # The GROUP query heads that read this key/value head, one after the other: their
    # contributions add up in registers (no atomics, a fixed order).
    for g in range(0, GROUP):
        off_h = off_kv * GROUP + g
        q_rows = Q + off_b * stride_qb + off_h * stride_qh
        do_rows = DO + off_b * stride_dob + off_h * stride_doh
        stats = (off_b * H + off_h) * N
        for m0 in range(lo, N, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_mask = offs_m < N
            dk, dv = _kv_step(dk, dv, k, v, q_rows, do_rows, offs_m, offs_n, offs_d, row_mask, n_mask, d_mask,
                              RowMax + stats, Delta + stats, Beta + stats, KeyMask, stride_kmn, KEY_OFFSET,
                              stride_qn, stride_qd, stride_don, stride_dod, qk_scale, CAUSAL, HAS_KEY_MASK,
                              DOT_PRECISION)

    out_mask = n_mask[:, None] & d_mask[None, :]
    dk_ptrs = DK + off_b * stride_dkb + off_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + off_b * stride_dvb + off_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, _cast(dk * sm_scale, DK.dtype.element_ty, DOT_PRECISION), mask=out_mask)
    tl.store(dv_ptrs, _cast(dv, DV.dtype.element_ty, DOT_PRECISION), mask=out_mask)


@triton.jit
def _kv_step(dk, dv, k, v, Q, DO, offs_m, offs_n, offs_d, row_mask, n_mask, d_mask, RowMax, Delta, Beta,
             KeyMask, stride_kmn, KEY_OFFSET, stride_qn, stride_qd, stride_don, stride_dod, qk_scale,
             CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv plus one block of query rows' contribution to this program's keys."""
    q = _load_rows(Q, offs_m, offs_d, row_mask, d_mask, stride_qn, stride_qd)
    do = _load_rows(DO, offs_m, offs_d, row_mask, d_mask, stride_don, stride_dod)
    m = tl.load(RowMax + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(Delta + offs_m, mask=row_mask, other=0.0)
    beta = tl.load(Beta + offs_m, mask=row_mask, other=0.0)
    s = _mma(q, tl.trans(k), DOT_PRECISION) * qk_scale
    visible = row_mask[:, None] & _visible(offs_m, offs_n, n_mask, KeyMask, stride_kmn, KEY_OFFSET, CAUSAL,
                                           HAS_KEY_MASK)
    probs = tl.where(visible, tl.exp2(s - m[:, None]), 0.0)           # e^(s - m)
    dv += _mma(_cast(tl.trans(probs * beta[:, None]), do.dtype, DOT_PRECISION), do, DOT_PRECISION)
    do_v = _mma(do, tl.trans(v), DOT_PRECISION)
    ds = probs * (beta[:, None] * do_v - delta[:, None])              # dL/ds
    dk += _mma(_cast(tl.trans(ds), q.dtype, DOT_PRECISION), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def q_bwd_kernel(
    Q, K, V, DO, DQ, RowMax, Delta, Beta, PK, PV, SEG, W, Denom, YRows, DPromptRows, DRows,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_pkh, stride_pkp, stride_pkd,
    stride_pvh, stride_pvp, stride_pvd,
    KeyMask, stride_kmb, stride_kmn,
    H, GROUP, N, N_K, KEY_OFFSET, P, C, D, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kv = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < N
    d_mask = offs_d < D
    Q += off_b * stride_qb + off_h * stride_qh
    DO += off_b * stride_dob + off_h * stride_doh
    q = _load_rows(Q, offs_m, offs_d, row_mask, d_mask, stride_qn, stride_qd)
    do = _load_rows(DO, offs_m, offs_d, row_mask, d_mask, stride_don, stride_dod)
    stat_rows = off_bh.to(tl.int64) * N + offs_m
    m = tl.load(RowMax + stat_rows, mask=row_mask, other=0.0)
    delta = tl.load(Delta + stat_rows, mask=row_mask, other=0.0)
    beta = tl.load(Beta + stat_rows, mask=row_mask, other=0.0)
    K += off_b * stride_kb + off_kv * stride_kh
    V += off_b * stride_vb + off_kv * stride_vh
    KeyMask += off_b * stride_kmb

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    x = tl.zeros([BLOCK_M], tl.float32)  # X = sum_j e^(s_ij - m) dO.v_j, exact
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (start_m + 1) * BLOCK_M + KEY_OFFSET)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_K
        k = _load_rows(K, offs_n, offs_d, n_mask, d_mask, stride_kn, stride_kd)
        v = _load_rows(V, offs_n, offs_d, n_mask, d_mask, stride_vn, stride_vd)
        s = _head_dot(q, k, Q, offs_m, row_mask, stride_qn, stride_qd, K, offs_n, n_mask, stride_kn, stride_kd, D,
                      BLOCK_DK, DOT_PRECISION) * qk_scale
        visible = _visible(offs_m, offs_n, n_mask, KeyMask, stride_kmn, KEY_OFFSET, CAUSAL, HAS_KEY_MASK)
        probs = tl.where(visible, tl.exp2(s - m[:, None]), 0.0)
        do_v = _head_dot(do, v, DO, offs_m, row_mask, stride_don, stride_dod, V, offs_n, n_mask, stride_vn,
                         stride_vd, D, BLOCK_DK, DOT_PRECISION)
        x += tl.sum(probs * do_v, 1)
        ds = probs * (beta[:, None] * do_v - delta[:, None])
        dq += _mma(_cast(ds, k.dtype, DOT_PRECISION), k, DOT_PRECISION)

    # The prompt keys: dL/dt_ip = e^(t - m) gamma_c(p) (dO.pv_p - D_c(p)), dq += dt pk.
    offs_c = tl.arange(0, BLOCK_C)
    rc_mask = row_mask[:, None] & (offs_c[None, :] < C)
    rc = stat_rows[:, None] * C + offs_c[None, :]
    z = tl.load(Denom + rc, mask=rc_mask, other=1.0)
    w = tl.load(W + offs_c, mask=offs_c < C, other=0.0)
    gamma = _gamma(w, z, offs_c < C)
    d_prompt = tl.load(DPromptRows + rc, mask=rc_mask, other=0.0)
    PK += off_kv * stride_pkh
    PV += off_kv * stride_pvh
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        e, do_pv, onehot = _prompt_terms(q, do, Q, DO, offs_m, row_mask, stride_qn, stride_qd, stride_don, stride_dod,
                                         PK, PV, SEG, offs_p, offs_d, offs_c, p_mask, d_mask, m, stride_pkp,
                                         stride_pkd, stride_pvp, stride_pvd, D, qk_scale, BLOCK_DK, DOT_PRECISION)
        dt = e * _per_candidate(gamma, tl.trans(onehot)) * (do_pv - _per_candidate(d_prompt, tl.trans(onehot)))
        pk = tl.load(PK + offs_p[:, None] * stride_pkp + offs_d[None, :] * stride_pkd,
                     mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        dq += _mma(_cast(dt, pk.dtype, DOT_PRECISION), pk, DOT_PRECISION)

    out_mask = row_mask[:, None] & d_mask[None, :]
    dq = dq * sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, _cast(dq, DQ.dtype.element_ty, DOT_PRECISION), mask=out_mask)

    # This block's rows of D_c = (X + Y_c) / Z_c for the weight gradient, with the exact X.
    y = tl.load(YRows + rc, mask=rc_mask, other=0.0)
    tl.store(DRows + rc, _candidate_grads(x, y, z, row_mask, offs_c < C), mask=rc_mask)
