"""Fused forward of the mixture-of-prompt-lengths attention (Triton).

Computes, for every query row i of one (batch, head) and every candidate c of
``candidate_lengths`` (prompt rows p in c are a contiguous segment of the shared
prompt_k / prompt_v):

    O_i = sum_c w_c * softmax-attention of q_i over [k ; pk_c] and [v ; pv_c]
        = beta_i * sum_j e^(s_ij - m_i) v_j + sum_p gamma_{i,c(p)} e^(t_ip - m_i) pv_p

    l_i  = sum_j e^(s_ij - m_i)                     (the original keys' share)
    Z_ic = l_i + sum_{p in c} e^(t_ip - m_i)
    gamma_ic = w_c / Z_ic,  beta_i = sum_c gamma_ic

One program owns BLOCK_M query rows of one (batch, query head): grid
``(cdiv(N, BLOCK_M), B * H)``; query head h reads key/value head and prompts
h // GROUP (grouped-query attention, GROUP = H / H_kv; nothing is expanded). The
N queries are the last N of the N_K key positions (KEY_OFFSET = N_K - N: decoding
after a cache), so causal query i sees keys j <= i + KEY_OFFSET; with HAS_KEY_MASK
a (B, N_K) byte mask hides padding keys. It makes three passes:

1. the prompt keys (scores only): running max ``m_p`` and the per-candidate
   prompt sums, gathered per candidate with a one-hot (BLOCK_P, BLOCK_C) matmul;
2. the original keys, FlashAttention-2 style: running max ``m_x``, ``sum_j e^s``
   and ``sum_j e^s v_j`` (causal blocks past the shifted diagonal are skipped);
3. the prompt keys again, now that Z and therefore gamma are known, adding
   ``gamma_{c(p)} e^(t - m) pv_p``.

Written: O; ``O_x = sum_j e^(s_ij - m) v_j / l_i`` (the original keys' own
attention output, a convex combination of the v_j); and per row m (log2 units),
l and the C denominators Z. The backward needs ``X = sum_j e^(s_ij - m) dO.v_j
= l_i dO.O_x``: reading it from O_x keeps its relative error at the rounding of
one stored value, where recovering it from O as ``(dO.O - prompt part) / beta``
would divide that rounding by beta (small wherever the prompts dominate a row).

A row that sees no original key (padding, or a causal row before every real key)
has m_x = -inf and l = 0: the running max is replaced by 0 wherever it is -inf,
so every exponential is 0, never NaN; O_x is 0, and a candidate with Z_c = 0 (no
prompts either) gets gamma_c = 0 and contributes zeros (the op's definition). The
stored m is that safe max.

P (the total prompt rows, 21 for lengths 0..6) is small next to N, so passes 1
and 3 cost about one extra key block each. Exponentials use exp2 with log2(e)
folded into the scale. All accumulation is float32; the main dots run on tensor
cores (bf16/fp16 inputs; fp32 inputs with DOT_PRECISION "tf32x3" or "tf32") and
the PV dots take the probabilities in the input dtype, as FlashAttention does.

Limits: head dim 16..128 (padded to a power of two and masked), any N >= 1,
any number of candidates (the one-hot width BLOCK_C is padded to >= 16).
"""
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with float32 accumulation.

    DOT_PRECISION is "ieee", "tf32" or "tf32x3" (passed to tl.dot), or "upcast":
    the operands are widened to float32 first. The launcher picks "upcast" only for
    bfloat16 under TRITON_INTERPRET=1, whose numpy dot would otherwise multiply
    the raw uint16 storage of bfloat16 values; widening bfloat16 is exact, so
    the result is what a bf16 tensor-core dot with fp32 accumulation gives.
    """
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype, DOT_PRECISION: tl.constexpr):
    """x.to(dtype), rounding to nearest even.

    A GPU rounds fp32 -> bf16 to nearest even; Triton's interpreter truncates,
    which biases every bf16 probability down and makes CPU runs look several
    times less accurate than the compiled kernel. Under the interpreter
    (DOT_PRECISION "upcast" means bf16 there) the rounding is done by hand:
    add half an ulp of bf16 (ties to even) to the fp32 bits and clear the low half,
    after which the conversion is exact.
    """
    if DOT_PRECISION == "upcast":
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _head_dot(a, b, A, offs_a, a_mask, stride_an, stride_ad, B, offs_b, b_mask, stride_bn, stride_bd, D,
              BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b^T, the product over the head dim of rows ``offs_a`` of A and rows ``offs_b`` of B
    (q k^T, q pk^T, dO v^T, dO pv^T): (len(offs_a), len(offs_b)) float32.

    BLOCK_DK == BLOCK_D (a's width): one dot of the tiles ``a`` and ``b`` the caller loaded.
    BLOCK_DK < BLOCK_D: both are read again in chunks of BLOCK_DK columns and the chunk products
    summed, so that no full-width tile is ever a dot operand. A 16-row operand is held whole by
    every warp (16 x D / 32 registers per thread, whatever the warp count), and fp32's TF32x3
    keeps two split copies of it: at head dim 128 q and dO alone would fill the 255 registers.
    Chunking bounds that at 16 x BLOCK_DK / 32 per copy, for a few more (cached) loads."""
    if BLOCK_DK == a.shape[1]:
        return _mma(a, tl.trans(b), DOT_PRECISION)
    else:
        acc = tl.zeros((a.shape[0], b.shape[0]), tl.float32)
        for d0 in range(0, a.shape[1], BLOCK_DK):
            offs_k = d0 + tl.arange(0, BLOCK_DK)
            k_mask = offs_k < D
            a_k = tl.load(A + offs_a[:, None] * stride_an + offs_k[None, :] * stride_ad,
                          mask=a_mask[:, None] & k_mask[None, :], other=0.0)
            b_k = tl.load(B + offs_b[:, None] * stride_bn + offs_k[None, :] * stride_bd,
                          mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            acc += _mma(a_k, tl.trans(b_k), DOT_PRECISION)
        return acc


@triton.jit
def _prompt_scores(q, Q, offs_m, row_mask, stride_qn, stride_qd, PK, offs_p, offs_d, p_mask, d_mask,
                   stride_pp, stride_pd, D, qk_scale, BLOCK_DK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Prompt scores t * log2(e) for a block of prompt keys; -inf where p >= P."""
    pk = tl.load(PK + offs_p[:, None] * stride_pp + offs_d[None, :] * stride_pd,
                 mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    t = _head_dot(q, pk, Q, offs_m, row_mask, stride_qn, stride_qd, PK, offs_p, p_mask, stride_pp, stride_pd, D,
                  BLOCK_DK, DOT_PRECISION) * qk_scale
    return tl.where(p_mask[None, :], t, float("-inf"))


@triton.jit
def _segment_onehot(SEG, offs_p, p_mask, offs_c):
    """(BLOCK_P, BLOCK_C) float32: 1 where prompt row p belongs to candidate c."""
    seg = tl.load(SEG + offs_p, mask=p_mask, other=-1)
    return (seg[:, None] == offs_c[None, :]).to(tl.float32)


@triton.jit
def _per_candidate(x, onehot):
    """(M, BLOCK_P) x (BLOCK_P, BLOCK_C) one-hot gather, exact: each output is a plain
    fp32 sum of the x entries of one candidate (no tensor-core rounding)."""
    return tl.dot(x, onehot, input_precision="ieee")


@triton.jit
def _finite_or_zero(m):
    """A running maximum with -inf (nothing seen yet) replaced by 0: e^(x - m) is then 0 for x = -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _gamma(w, z, c_mask):
    """gamma_c = w_c / Z_c; 0 where Z_c = 0 (candidate c sees no key in the row) or c >= C."""
    seen = c_mask[None, :] & (z > 0)
    return tl.where(seen, w[None, :] / tl.where(seen, z, 1.0), 0.0)


@triton.jit
def _visible(offs_m, offs_n, n_mask, KeyMask, stride_kmn, KEY_OFFSET, CAUSAL: tl.constexpr,
             HAS_KEY_MASK: tl.constexpr):
    """(M, N) or (1, N) bool: which of keys ``offs_n`` the query rows ``offs_m`` see. Causal:
    row i sits at key position i + KEY_OFFSET; KeyMask: the sequence's (N_K,) byte mask, 0 = padding."""
    visible = n_mask[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + KEY_OFFSET)
    if HAS_KEY_MASK:
        real = tl.load(KeyMask + offs_n * stride_kmn, mask=n_mask, other=0)
        visible = visible & (real != 0)[None, :]
    return visible


@triton.jit
def mixture_attention_fwd_kernel(
    Q, K, V, PK, PV, SEG, W, Out, OutX, RowMax, RowSum, Denom,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_pkh, stride_pkp, stride_pkd,
    stride_pvh, stride_pvp, stride_pvd,
    KeyMask, stride_kmb, stride_kmn,
    H, GROUP, N, N_K, KEY_OFFSET, P, C, D, qk_scale,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_P >= 16 and BLOCK_C >= 16 and BLOCK_DK >= 16, "tl.dot needs blocks >= 16")
    tl.static_assert(BLOCK_D % BLOCK_DK == 0, "BLOCK_DK divides BLOCK_D")
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kv = off_h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    row_mask = offs_m < N
    d_mask = offs_d < D
    c_mask = offs_c < C

    Q += off_b * stride_qb + off_h * stride_qh
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    PK += off_kv * stride_pkh
    PV += off_kv * stride_pvh

    # Pass 1: prompt max m_p and per-candidate sums l_c = sum_{p in c} 2^(t - m_p).
    m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_c = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        t = _prompt_scores(q, Q, offs_m, row_mask, stride_qn, stride_qd, PK, offs_p, offs_d, p_mask, d_mask,
                           stride_pkp, stride_pkd, D, qk_scale, BLOCK_DK, DOT_PRECISION)
        m_new = tl.maximum(m_p, tl.max(t, 1))
        e = tl.exp2(t - m_new[:, None])
        onehot = _segment_onehot(SEG, offs_p, p_mask, offs_c)
        l_c = l_c * tl.exp2(m_p - m_new)[:, None] + _per_candidate(e, onehot)
        m_p = m_new

    # Pass 2: the original keys with online softmax (running max m_x).
    m_x = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_x = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    K += off_b * stride_kb + off_kv * stride_kh
    V += off_b * stride_vb + off_kv * stride_vh
    hi = N_K
    if CAUSAL:  # keys past the last row of this block (at position row + KEY_OFFSET) are never seen
        hi = tl.minimum(N_K, (start_m + 1) * BLOCK_M + KEY_OFFSET)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N_K
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = _head_dot(q, k, Q, offs_m, row_mask, stride_qn, stride_qd, K, offs_n, n_mask, stride_kn, stride_kd, D,
                      BLOCK_DK, DOT_PRECISION) * qk_scale
        visible = _visible(offs_m, offs_n, n_mask, KeyMask + off_b * stride_kmb, stride_kmn, KEY_OFFSET,
                           CAUSAL, HAS_KEY_MASK)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_x, tl.max(s, 1))
        m_safe = _finite_or_zero(m_new)  # -inf while a row has seen no key: its exponentials are 0
        alpha = tl.exp2(m_x - m_safe)
        probs = tl.exp2(s - m_safe[:, None])
        l_x = l_x * alpha + tl.sum(probs, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mma(_cast(probs, v.dtype, DOT_PRECISION), v, DOT_PRECISION)
        m_x = m_new

    out_offsets = off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    out_mask = row_mask[:, None] & d_mask[None, :]
    # O_x, the original keys' own attention output (l_x >= 1 when the row sees a key: its
    # maximum term is 2^0; l_x = 0 and O_x = 0 when it sees none).
    tl.store(OutX + out_offsets, _cast(acc / tl.where(l_x > 0, l_x, 1.0)[:, None], OutX.dtype.element_ty,
                                       DOT_PRECISION), mask=out_mask)

    # One maximum for everything; a part that is absent (no prompts, or no visible key) has
    # max -inf and factor 0. Both absent: m = 0, and every term is 0.
    m = _finite_or_zero(tl.maximum(m_x, m_p))
    x_factor = tl.exp2(m_x - m)
    l_x = l_x * x_factor
    acc = acc * x_factor[:, None]
    l_c = l_c * tl.exp2(m_p - m)[:, None]

    w = tl.load(W + offs_c, mask=c_mask, other=0.0)
    z = l_x[:, None] + l_c                                     # Z_c
    gamma = _gamma(w, z, c_mask)                               # w_c / Z_c
    beta = tl.sum(gamma, 1)
    acc = acc * beta[:, None]

    # Pass 3: add sum_p gamma_{c(p)} 2^(t - m) pv_p.
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        t = _prompt_scores(q, Q, offs_m, row_mask, stride_qn, stride_qd, PK, offs_p, offs_d, p_mask, d_mask,
                           stride_pkp, stride_pkd, D, qk_scale, BLOCK_DK, DOT_PRECISION)
        onehot = _segment_onehot(SEG, offs_p, p_mask, offs_c)
        gamma_p = _per_candidate(gamma, tl.trans(onehot))      # gamma_{c(p)}
        pv = tl.load(PV + offs_p[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
                     mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        weighted = tl.exp2(t - m[:, None]) * gamma_p
        acc += _mma(_cast(weighted, pv.dtype, DOT_PRECISION), pv, DOT_PRECISION)

    tl.store(Out + out_offsets, _cast(acc, Out.dtype.element_ty, DOT_PRECISION), mask=out_mask)
    stat_rows = off_bh.to(tl.int64) * N + offs_m
    tl.store(RowMax + stat_rows, m, mask=row_mask)
    tl.store(RowSum + stat_rows, l_x, mask=row_mask)
    tl.store(Denom + stat_rows[:, None] * C + offs_c[None, :], z, mask=row_mask[:, None] & c_mask[None, :])
