"""Pass 1 and the per-row epilogue, shared by the token-mode and the synthesize kernels (a device function).

For a tile of BLOCK_T rows it accumulates ``h @ W_in`` (fp32, tl.dot) and ``||h||^2`` in one sweep over d, then
turns the NP accumulated columns ``[S^T h | h.mu | A^T h | W1 h | zero padding]`` into the coefficient row
``alpha * gamma * g * [softmax(A^T h + c) | W2 act(W1 h + b1) + b2]`` (NCP columns, the first NC valid).
Readable equivalent: `reference.coefficients`.
"""
import triton
import triton.language as tl


@triton.jit
def tile_coefficients(h_ptr, rows, row_mask, d, w_in_ptr, consts_ptr, tau, eps, scale,
                      R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                      HAS_GATE: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                      MEAN_COL: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr,
                      W_IN_STRIDE: tl.constexpr, S_MU_OFF: tl.constexpr, MU_SQ_OFF: tl.constexpr,
                      RB_OFF: tl.constexpr, B1_OFF: tl.constexpr, W2_OFF: tl.constexpr, B2_OFF: tl.constexpr,
                      NP: tl.constexpr, MP: tl.constexpr, NCP: tl.constexpr, NATIVE_DOT: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Returns ``(coef, g)``: ``(BLOCK_T, NCP)`` fp32 coefficients (scale and gate folded in) and the fp32 gate."""
    cols = tl.arange(0, NP)
    acc = tl.zeros((BLOCK_T, NP), tl.float32)
    sq = tl.zeros((BLOCK_T,), tl.float32)
    row_base = rows.to(tl.int64) * d
    if HAS_GATE or HAS_ROUTER or HAS_RES:  # CAA-like steerers read nothing in pass 1
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            x = tl.load(h_ptr + row_base[:, None] + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0)
            w = tl.load(w_in_ptr + offs_d[:, None] * W_IN_STRIDE + cols[None, :],
                        mask=d_mask[:, None] & (cols[None, :] < W_IN_STRIDE), other=0.0)
            x32 = x.to(tl.float32)
            if HAS_GATE:
                sq += tl.sum(x32 * x32, axis=1)
            if NATIVE_DOT:
                acc = tl.dot(x, w, acc)
            else:
                acc = tl.dot(x32, w.to(tl.float32), acc, input_precision="ieee")

    g = tl.full((BLOCK_T,), 1.0, tl.float32)
    if HAS_GATE:
        # ||S^T(h-mu)||^2 / max(||h-mu||^2, eps) from the one pass over h:
        # S^T(h-mu) = S^T h - S^T mu and ||h-mu||^2 = ||h||^2 - 2 h.mu + ||mu||^2
        s_mu = tl.load(consts_ptr + S_MU_OFF + cols, mask=cols < R, other=0.0)
        proj = tl.where(cols[None, :] < R, acc - s_mu[None, :], 0.0)
        inside = tl.sum(proj * proj, axis=1)
        h_mu = tl.sum(tl.where(cols[None, :] == MEAN_COL, acc, 0.0), axis=1)
        energy = tl.maximum(sq - 2.0 * h_mu + tl.load(consts_ptr + MU_SQ_OFF), eps)
        g = tl.where(inside / energy >= tau, 1.0, 0.0)

    # Coefficient columns [0, K) take the softmax weights of the router columns, [K, K+k) the MLP's output; the
    # accumulator's columns are picked out with tl.gather (no slicing of register tensors in Triton).
    coef_cols = tl.arange(0, NCP)
    if HAS_ROUTER:
        is_router = (cols >= ROUTER_COL) & (cols < ROUTER_COL + K)
        bias = tl.load(consts_ptr + RB_OFF + cols - ROUTER_COL, mask=is_router, other=0.0)
        logits = tl.where(is_router[None, :], acc + bias[None, :], float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        weights = e / tl.sum(e, axis=1)[:, None]
        pick = tl.minimum(ROUTER_COL + coef_cols, NP - 1)
        weights = tl.gather(weights, tl.broadcast_to(pick[None, :], (BLOCK_T, NCP)), axis=1)
        coef = tl.where((coef_cols < K)[None, :], weights, 0.0)
    else:  # one expert: softmax weight 1
        coef = tl.broadcast_to(tl.where(coef_cols == 0, 1.0, 0.0)[None, :], (BLOCK_T, NCP))
    if HAS_RES:
        m_cols = tl.arange(0, MP)
        pick = tl.minimum(RES_COL + m_cols, NP - 1)
        hidden = tl.gather(acc, tl.broadcast_to(pick[None, :], (BLOCK_T, MP)), axis=1)
        hidden += tl.load(consts_ptr + B1_OFF + m_cols, mask=m_cols < M, other=0.0)[None, :]
        if RELU:
            hidden = tl.maximum(hidden, 0.0)
        hidden = tl.where((m_cols < M)[None, :], hidden, 0.0)
        is_beta = (coef_cols >= K) & (coef_cols < K + KR)
        w2_t = tl.load(consts_ptr + W2_OFF + (coef_cols[None, :] - K) * M + m_cols[:, None],
                       mask=(m_cols < M)[:, None] & is_beta[None, :], other=0.0)
        b2 = tl.load(consts_ptr + B2_OFF + coef_cols - K, mask=is_beta, other=0.0)
        coef += tl.dot(hidden, w2_t, input_precision="ieee") + b2[None, :]
    coef = coef * (scale * g)[:, None]
    return coef, g
