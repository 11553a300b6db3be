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

# ||xc||^2 in fp32 overflows from entries of ~1e19. Pass 1 therefore also sums the squares of xc * BIG_SCALE, which
# no finite row overflows (d * (3.4e38 * 2^-80)^2 is far below the fp32 maximum), and the gate reads that sum when
# the plain one reaches BIG_ENERGY: then the energy is so large that the entries whose scaled squares underflow
# (|x| < 2^17) weigh less than 2^-66 of it.
BIG_SCALE = tl.constexpr(2.0 ** -80)
BIG_ENERGY = tl.constexpr(2.0 ** 100)


@triton.jit
def add_squares(xc32, sq, sq_big):
    """Adds a d-chunk's squares to the row's plain sum and to its sum scaled by ``BIG_SCALE^2``."""
    big = xc32 * BIG_SCALE
    return sq + tl.sum(xc32 * xc32, axis=1), sq_big + tl.sum(big * big, axis=1)


@triton.jit
def gate_open(proj, sq, sq_big, tau, eps):
    """``||S^T xc||^2 / max(||xc||^2, eps) >= tau`` from the masked projections ``proj`` ``(BLOCK_T, NP)`` and the two
    sums of `add_squares`; past BIG_ENERGY every term is taken scaled by ``BIG_SCALE^2`` (no overflow;
    `reference.gate` divides by the row's max-abs instead, the same number)."""
    big = sq >= BIG_ENERGY  # inf included
    s = tl.where(big, BIG_SCALE, 1.0)
    unit = proj * s[:, None]
    return tl.sum(unit * unit, axis=1) / tl.maximum(tl.where(big, sq_big, sq), eps * s * s) >= tau


@triton.jit
def centred_projections(h_ptr, rows, row_mask, d, w_in_ptr, mean_ptr, d_start, d_stop,
                        HAS_GATE: tl.constexpr, HAS_MEAN: tl.constexpr, W_IN_STRIDE: tl.constexpr,
                        NP: tl.constexpr, NATIVE_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        NUM_STAGES: tl.constexpr, NORM: tl.constexpr = False):
    """Pass 1 over ``[d_start, d_stop)``: ``(xc @ W_in, sq, sq_big, ||h||^2)``, fp32 ``(BLOCK_T, NP)`` then three
    ``(BLOCK_T,)``: ``||xc||^2`` plain and scaled (`add_squares`; with a gate only) and the uncentred ``||h||^2``
    only for a fused RMSNorm (``NORM``, whose W_in also holds ``W_out^T``, `norm.NormPack`), else zeros.

    The loop is software-pipelined (``NUM_STAGES`` buffers, cp.async on sm_80+): h tiles are loaded
    ``evict_last`` so that pass 2's second read finds them in L2. W_in's zero padding (columns past W_IN_STRIDE)
    is masked, so never fetched."""
    cols = tl.arange(0, NP)
    acc = tl.zeros((BLOCK_T, NP), tl.float32)
    sq = tl.zeros((BLOCK_T,), tl.float32)
    sq_big = tl.zeros((BLOCK_T,), tl.float32)
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
            sq, sq_big = add_squares(xc32, sq, sq_big)
        if NORM:
            x32 = x.to(tl.float32)
            sq_h += tl.sum(x32 * x32, axis=1)
        if NATIVE_DOT:  # 16-bit tensor-core operands; xc is small next to mu, so its rounding costs little
            acc = tl.dot(xc, w, acc)
        else:
            acc = tl.dot(xc32, w.to(tl.float32), acc, input_precision="ieee")
    return acc, sq, sq_big, sq_h


@triton.jit
def coefficients_from_projections(acc, sq, sq_big, row_mask, consts_ptr, tau, eps, scale,
                                  R: tl.constexpr, K: tl.constexpr, M: tl.constexpr, KR: tl.constexpr,
                                  HAS_GATE: tl.constexpr, HAS_ROUTER: tl.constexpr, HAS_RES: tl.constexpr,
                                  RELU: tl.constexpr, ROUTER_COL: tl.constexpr, RES_COL: tl.constexpr,
                                  RB_OFF: tl.constexpr, B1_OFF: tl.constexpr, W2_OFF: tl.constexpr,
                                  B2_OFF: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, NCP: tl.constexpr,
                                  BLOCK_T: tl.constexpr):
    """The epilogue: ``(coef, g)``, ``(BLOCK_T, NCP)`` fp32 coefficients (scale folded in, exactly 0 where the gate
    is off) and the fp32 gate; rows outside ``row_mask`` get ``g = 0``. ``sq``, ``sq_big``: `add_squares`."""
    cols = tl.arange(0, NP)
    g = tl.where(row_mask, 1.0, 0.0)
    if HAS_GATE:  # ||S^T(h-mu)||^2 / max(||h-mu||^2, eps) >= tau, both from the centred pass
        g = tl.where(gate_open(tl.where(cols[None, :] < R, acc, 0.0), sq, sq_big, tau, eps), g, 0.0)

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
    acc, sq, sq_big, _ = centred_projections(h_ptr, rows, row_mask, d, w_in_ptr, mean_ptr, 0, d_stop, HAS_GATE,
                                               HAS_MEAN, W_IN_STRIDE, NP, NATIVE_DOT, BLOCK_T, BLOCK_D, NUM_STAGES)
    return coefficients_from_projections(acc, sq, sq_big, row_mask, consts_ptr, tau, eps, scale, R, K, M, KR, HAS_GATE,
                                         HAS_ROUTER, HAS_RES, RELU, ROUTER_COL, RES_COL, RB_OFF, B1_OFF, W2_OFF,
                                         B2_OFF, NP, MP, NCP, BLOCK_T)
