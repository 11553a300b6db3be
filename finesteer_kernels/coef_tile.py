"""Pass 1 and the per-row epilogue, shared by the token-mode and the synthesize kernels (device functions).

For a tile of BLOCK_T rows, pass 1 centres each row on the gate's mean, ``xc = h - mu`` (mu read in fp32), and
accumulates ``xc @ W_in`` (fp32, tl.dot) and ``||xc||^2`` in one sweep over d. The epilogue turns the NP accumulated
columns ``[S^T xc | A^T xc | W1 xc | zero padding]`` into the coefficient row
``alpha * gamma * g * [softmax(A^T xc + (c + A^T mu)) | W2 act(W1 xc + (b1 + W1 mu)) + b2]`` (NCP columns, the
first NC valid); ``A^T mu`` and ``W1 mu`` are folded into the biases at packing (`SteerParams.pack_centred`).
Centring before the dot keeps the gate exact for rows close to a large mu, where the expansion
``||h||^2 - 2 h.mu + ||mu||^2`` cancels. Readable equivalent: `reference.coefficients`.
"""
import triton
import triton.language as tl

# `reference.GATE_SCALE_FLOOR`: rows are scaled by at least this, so 1 / scale stays finite
GATE_SCALE_FLOOR = tl.constexpr(2.0 ** -64)


@triton.jit
def add_scaled_squares(xc32, sq, scale):
    """Adds a d-chunk's squares to a row's running ``||xc||^2 = scale^2 * sq``, ``scale`` the largest magnitude seen
    so far (at least GATE_SCALE_FLOOR): the plain sum overflows fp32 from entries of ~1e19, this never does for a
    finite row. One more reduction (the chunk's max) and one multiply per element; returns ``(sq, scale)``."""
    new_scale = tl.maximum(scale, tl.max(tl.abs(xc32), axis=1))
    inv = 1.0 / new_scale
    shrink = scale * inv  # <= 1: the sum so far, re-expressed relative to the new scale
    unit = xc32 * inv[:, None]
    return sq * shrink * shrink + tl.sum(unit * unit, axis=1), new_scale


@triton.jit
def combine_scaled_squares(sq, scale, part_sq, part_scale):
    """Two running sums of `add_scaled_squares` as one (split-d: the slices' partial sums)."""
    new_scale = tl.maximum(scale, part_scale)
    a = scale / new_scale
    b = part_scale / new_scale
    return sq * a * a + part_sq * b * b, new_scale


@triton.jit
def gate_open(proj, sq, scale, tau, eps):
    """``||S^T xc||^2 / max(||xc||^2, eps) >= tau`` from the masked projections ``proj`` ``(BLOCK_T, NP)`` and the
    scaled sum of squares, every term divided by ``scale^2`` (no overflow; `reference.gate`)."""
    inv = 1.0 / scale
    unit = proj * inv[:, None]
    return tl.sum(unit * unit, axis=1) / tl.maximum(sq, eps * inv * inv) >= tau


@triton.jit
def centred_projections(h_ptr, rows, row_mask, d, w_in_ptr, mean_ptr, d_start, d_stop,
                        HAS_GATE: tl.constexpr, HAS_MEAN: tl.constexpr, W_IN_STRIDE: tl.constexpr,
                        NP: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        NUM_STAGES: tl.constexpr, NORM: tl.constexpr = False):
    """Pass 1 over ``[d_start, d_stop)``: ``(xc @ W_in, sq, scale, ||h||^2)``, fp32 ``(BLOCK_T, NP)`` then three
    ``(BLOCK_T,)``: ``||xc||^2 = scale^2 * sq`` (`add_scaled_squares`; with a gate only) and the uncentred
    ``||h||^2`` only for a fused RMSNorm (``NORM``, whose W_in also holds ``W_out^T``, `norm.NormPack`), else zeros.

    The loop is software-pipelined (``NUM_STAGES`` buffers, cp.async on sm_80+): h tiles are loaded
    ``evict_last`` so that pass 2's second read finds them in L2. W_in's zero padding (columns past W_IN_STRIDE)
    is masked, so never fetched."""
    cols = tl.arange(0, NP)
    acc = tl.zeros((BLOCK_T, NP), tl.float32)
    sq = tl.zeros((BLOCK_T,), tl.float32)
    scale = tl.full((BLOCK_T,), GATE_SCALE_FLOOR, tl.float32)
    sq_h = tl.zeros((BLOCK_T,), tl.float32)
    row_base = rows.to(tl.int64) * d
    for d0 in tl.range(d_start, d_stop, BLOCK_D, num_stages=NUM_STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_stop
        x = tl.load(h_ptr + row_base[:, None] + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0, eviction_policy="evict_last")
        w = tl.load(w_in_ptr + offs_d[:, None] * W_IN_STRIDE + cols[None, :],
                    mask=d_mask[:, None] & (cols[None, :] < W_IN_STRIDE), other=0.0)
        if HAS_MEAN:
            mu = tl.load(mean_ptr + offs_d, mask=d_mask, other=0.0)
            xc32 = x.to(tl.float32) - mu[None, :]
            xc = xc32.to(x.dtype)
        else:
            xc32 = x.to(tl.float32)
            xc = x
        if HAS_GATE:
            sq, scale = add_scaled_squares(xc32, sq, scale)
        if NORM:
            x32 = x.to(tl.float32)
            sq_h += tl.sum(x32 * x32, axis=1)
        if NATIVE_DOT:  # 16-bit tensor-core operands; xc is small next to mu, so its rounding costs little
            acc = tl.dot(xc, w, acc)
        else:
            acc = tl.dot(xc32, w.to(tl.float32), acc, input_precision="ieee")
    return acc, sq, scale, sq_h


@triton.jit
def coefficients_from_projections(acc, sq, sq_scale, row_mask, consts_ptr, tau, eps, scale,
                                  R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                                  HAS_GATE: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_RES: tl.constexpr,
                                  RELU: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr,
                                  RB_OFF: tl.constexpr, B1_OFF: tl.constexpr, W2_OFF: tl.constexpr,
                                  B2_OFF: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, NCP: tl.constexpr,
                                  BLOCK_T: tl.constexpr):
    """The epilogue: ``(coef, g)``, ``(BLOCK_T, NCP)`` fp32 coefficients (scale folded in, exactly 0 where the gate
    is off) and the fp32 gate; rows outside ``row_mask`` get ``g = 0``. ``||xc||^2 = sq_scale^2 * sq``."""
    cols = tl.arange(0, NP)
    g = tl.where(row_mask, 1.0, 0.0)
    if HAS_GATE:  # ||S^T(h-mu)||^2 / max(||h-mu||^2, eps) >= tau, both from the centred pass
        g = tl.where(gate_open(tl.where(cols[None, :] < R, acc, 0.0), sq, sq_scale, tau, eps), g, 0.0)

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
    # selected, not multiplied by g: a router or MLP that overflows would give inf * 0 = NaN in gated-off rows
    coef = tl.where((g != 0.0)[:, None], coef * scale, 0.0)
    return coef, g


@triton.jit
def tile_coefficients(h_ptr, rows, row_mask, d, w_in_ptr, mean_ptr, consts_ptr, tau, eps, scale,
                      R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                      HAS_GATE: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ROUTER: tl.constexpr,
                      HAS_RES: tl.constexpr, RELU: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr,
                      W_IN_STRIDE: tl.constexpr, RB_OFF: tl.constexpr, B1_OFF: tl.constexpr,
                      W2_OFF: tl.constexpr, B2_OFF: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                      NCP: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """Pass 1 over all of d, then the epilogue: ``(coef, g)``."""
    # CAA-like steerers (no gate, router or MLP) read nothing in pass 1: an empty range
    d_stop = d if (HAS_GATE or HAS_ROUTER or HAS_RES) else 0
    acc, sq, sq_scale, _ = centred_projections(h_ptr, rows, row_mask, d, w_in_ptr, mean_ptr, 0, d_stop, HAS_GATE,
                                               HAS_MEAN, W_IN_STRIDE, NP, NATIVE_DOT, BLOCK_T, BLOCK_D, NUM_STAGES)
    return coefficients_from_projections(acc, sq, sq_scale, row_mask, consts_ptr, tau, eps, scale, R, K, M, KR, HAS_GATE,
                                         HAS_ROUTER, HAS_RES, RELU, ROUTER_COL, RES_COL, RB_OFF, B1_OFF, W2_OFF,
                                         B2_OFF, NP, MP, NCP, BLOCK_T)
