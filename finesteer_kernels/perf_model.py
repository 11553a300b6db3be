"""Bytes-and-occupancy model of the steering kernels: what a launch moves through HBM and L2, how many programs
fit on a multiprocessor, and the time that follows. Plain Python (no torch, no triton): the config heuristic
(`heuristics.py`) chooses with it, `benchmarks/gpu_check.py` prints it beside each measured row, and
`benchmarks/model_table.py` turns it into the tables of `benchmarks/RESULTS.md`.

Units: bytes, GB/s (1e9 B/s), microseconds. One "unit" below is ``T * d * elem``, the bytes of h.

What a design moves (token mode, ``T`` rows, width ``d``, ``n_tiles = cdiv(T, BLOCK_T)``):

* HBM: h read once, the output written once, the weights once (they stay in L2), plus a second read of h when
  it is not L2-resident and the split-d partial sums written back. The second read counts as L2-resident only when
  the *in-flight working set* (h bytes read by pass 1 and not yet re-read by pass 2) fits in half of L2 (the
  issue's rule; the other half holds the weights, the outputs being written and whatever else runs).
* L2 (every byte between the multiprocessors and L2, reads and writes): h read by pass 1 and by pass 2, the output
  writes, ``W_in`` re-read once per row tile (only its ``w_in_cols`` stored columns: the zero padding up to the
  power-of-two accumulator width is masked, so never fetched), ``W_out`` and mu once per row tile, and the split-d
  partial sums written and read back.
* Time = the largest of HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth and the multiprocessors' feed time
  (bytes each active SM must move / its rate, the rate being the smaller of a per-SM port cap and Little's law:
  bytes in flight per SM / loaded latency). Launch overhead is reported beside it, not added.

Occupancy: resident programs per SM from shared memory, registers (allocated per warp in 256-register chunks)
and warps. Shared memory and registers are *estimates* (`resources`), fitted to ptxas reports of Triton 3.9 for
sm_90a; `tests/test_kernel_compile.py` checks them against ptxas for the configurations the heuristic picks.

Card figures and where they come from are in `CARDS` (docs/kernels.md repeats them). Figures that no data sheet
gives (L2 bandwidth, per-SM cap, loaded latency) are parameters; `benchmarks/gpu_check.py` measures the first
two on the first GPU run so the model can be corrected.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

from .ptxas_table import PTXAS_REGISTERS

KiB = 1024
MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Card:
    """A GPU as the model sees it. Bandwidths in GB/s (1e9 bytes per second, reads plus writes)."""

    name: str
    sms: int
    l2_bytes: int
    peak_gbps: float  # data-sheet HBM bandwidth
    hbm_gbps: float  # achievable HBM bandwidth (a large device-to-device copy)
    l2_gbps: float  # L2 <-> SM bandwidth, all SMs together (no data sheet gives it: an assumption)
    sm_gbps: float  # one SM's load/store port cap
    latency_ns: float  # loaded HBM latency, for Little's law
    smem_per_sm: int = 228 * KiB
    smem_per_cta: int = 227 * KiB
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    launch_us: float = 2.5  # launch-to-launch gap of dependent kernels on one stream (outside CUDA graphs)
    source: str = ""


# Copy efficiency: 4.3 TB/s measured for a device-to-device copy on this workplace's H200 (KINDS.md, 2026-10-28)
# against 4.8 TB/s on the data sheet = 0.9; applied to the H100 too until a run measures it.
COPY_EFFICIENCY = 4.3 / 4.8
# L2 bandwidth: public microbenchmarks of the H100 SXM put L2 read bandwidth at roughly 2-3x its HBM3 bandwidth
# (3.35 TB/s); we take 2.5x = 8.4 TB/s for the GH100 die, the same on the H200 (same die and clocks, faster HBM
# only). Uncertainty about +-30 %; gpu_check measures it (repeated reads of a buffer that fits in L2).
GH100_L2_GBPS = 2.5 * 3350.0
# One SM: 64 bytes per clock between L1 and L2 at the 1.98 GHz boost clock seen on the H200 here (KINDS.md);
# an assumption (+-50 %), measured by gpu_check with a copy over a few SMs.
GH100_SM_GBPS = 64 * 1.98
# Loaded HBM latency: FACTS.md's "25-30 KiB in flight per SM saturates H200 HBM" is Little's law with ~750 ns
# (4.8 TB/s / 132 SMs * 750 ns = 27 KiB).
GH100_LATENCY_NS = 750.0

CARDS = {
    "H100 SXM": Card("H100 SXM", sms=132, l2_bytes=50 * MiB, peak_gbps=3350.0, hbm_gbps=3350.0 * COPY_EFFICIENCY,
                     l2_gbps=GH100_L2_GBPS, sm_gbps=GH100_SM_GBPS, latency_ns=GH100_LATENCY_NS,
                     source="H100 data sheet (SXM5: 132 SMs, 50 MB L2, 3.35 TB/s HBM3)"),
    "H200": Card("H200", sms=132, l2_bytes=60 * MiB, peak_gbps=4800.0, hbm_gbps=4800.0 * COPY_EFFICIENCY,
                 l2_gbps=GH100_L2_GBPS, sm_gbps=GH100_SM_GBPS, latency_ns=GH100_LATENCY_NS,
                 source="H200 data sheet (4.8 TB/s HBM3e); 132 SMs and 60 MB L2 as PyTorch reported them on "
                        "this workplace's H200 (KINDS.md, 2026-10-28)"),
}
DEFAULT_CARD = CARDS["H100 SXM"]  # the heuristic's card when no GPU can be asked (e.g. compiling ahead of time)


def card_from_properties(name: str, sms: int, l2_bytes: int, peak_gbps: Optional[float] = None) -> Card:
    """A card from what ``torch.cuda.get_device_properties`` says: a known card by name (with the SM count and L2
    size the device reports), else a generic Hopper-like card scaled by SM count."""
    sxm_h100 = "H100" in name and not any(other in name for other in ("PCIe", "NVL"))
    for key, card in CARDS.items():
        if (key == "H100 SXM" and sxm_h100) or (key == "H200" and "H200" in name):
            return dataclasses.replace(card, sms=sms, l2_bytes=l2_bytes or card.l2_bytes)
    peak = peak_gbps or 2000.0
    return Card(name, sms=sms, l2_bytes=l2_bytes or 40 * MiB, peak_gbps=peak, hbm_gbps=peak * COPY_EFFICIENCY,
                l2_gbps=2.5 * peak, sm_gbps=GH100_SM_GBPS * 0.8, latency_ns=GH100_LATENCY_NS,
                source="generic: SM count and L2 from the device, bandwidths assumed")


_DEVICE_CARDS: dict = {}


def card_for_device(device) -> Card:
    """The card of a CUDA device (cached per device index)."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    card = _DEVICE_CARDS.get(index)
    if card is None:
        props = torch.cuda.get_device_properties(index)
        card = _DEVICE_CARDS[index] = card_from_properties(props.name, props.multi_processor_count,
                                                           getattr(props, "L2_cache_size", 0))
    return card


# ---- what is moved --------------------------------------------------------------------------------------------
MIN_DOT = 16  # smallest M, N, K that tl.dot accepts on the GPU
EPILOGUE_ROWS = 64  # split-d: rows the last slice sums and finishes at a time (`steer_kernel`)
W_IN_ALIGN = 8  # W_in columns padded to 8 elements: 16-byte rows in 16-bit dtypes


def padded(n: int) -> int:
    """Width of a tl.dot operand holding ``n`` columns: a power of two, at least 16."""
    return max(MIN_DOT, 1 << max(0, (n - 1).bit_length()))


def stored_w_in_cols(r: int, K: int, m: int, align: int = W_IN_ALIGN) -> int:
    """Columns of a steerer's centred W_in as stored (`SteerParams.pack_centred`): ``r + K (when K > 1) + m``,
    zero-padded to a multiple of ``align``, at least ``align``."""
    n_in = r + (K if K > 1 else 0) + m
    return max(align, -(-n_in // align) * align)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of one call. ``w_in_cols``: stored W_in columns (r + K (if K > 1) + m, padded to a multiple of 8);
    ``np``: the accumulator width (power of two); ``n_coef``: K + k; ``extra_weight_bytes``: weights read once per
    row tile besides W_in, mu and W_out (e.g. a norm weight for a fused RMSNorm); ``norm_out``: bytes per element
    of the normalised rows a fused RMSNorm writes (0: no fused norm; see `with_norm`)."""

    rows: int
    d: int
    elem: int  # bytes per element of h (and of the packed weights)
    w_in_cols: int
    n_coef: int
    has_pass1: bool = True
    has_mean: bool = True
    extra_weight_bytes: int = 0
    norm_out: int = 0
    has_router: bool = True  # K > 1 (the epilogue's softmax); with `has_residual`, what a compiled kernel holds
    has_residual: bool = True  # the residual MLP
    dtype: str = ""  # "bf16", "fp16" or "fp32" where known: ptxas allocates bf16 and fp16 kernels differently

    @property
    def np(self) -> int:
        return padded(self.w_in_cols)

    @property
    def ncp(self) -> int:
        return padded(self.n_coef)

    @property
    def h_bytes(self) -> int:
        return self.rows * self.d * self.elem

    @property
    def w_in_bytes(self) -> int:
        if not self.has_pass1:
            return 0
        return self.d * self.w_in_cols * self.elem + (self.d * 4 if self.has_mean else 0)

    @property
    def w_out_bytes(self) -> int:
        return self.n_coef * self.d * self.elem + self.extra_weight_bytes

    @property
    def y_bytes(self) -> int:
        """The normalised rows a fused RMSNorm writes (0 without one)."""
        return self.rows * self.d * self.norm_out

    def with_norm(self, out_elem: int, weight_elem: Optional[int] = None) -> "Shape":
        """The same call with a fused RMSNorm (issue 14) writing ``out_elem``-byte rows, for a W_in that already
        carries ``W_out^T`` among its ``w_in_cols`` (`norm.NormPack`; `Shape.of` adds them): pass 1 always runs
        (the norm needs ``||h||^2``), and per row tile the norm's weight (d elements of ``weight_elem`` bytes,
        default h's) and its constants (``W_out mu`` and the Gram matrix of W_out, NCP + NCP^2 floats) are read."""
        weight = (weight_elem or self.elem) * self.d + 4 * (self.ncp + self.ncp ** 2)
        return dataclasses.replace(self, has_pass1=True, norm_out=out_elem,
                                   extra_weight_bytes=self.extra_weight_bytes + weight)

    @classmethod
    def of(cls, rows: int, d: int, elem: int, r: int, K: int, m: int = 0, k: int = 0, align: int = W_IN_ALIGN,
           norm_out: int = 0, **kw) -> "Shape":
        """The shape of a steerer with these sizes; ``norm_out``: fused with an RMSNorm writing ``norm_out``-byte
        rows (W_in then also holds ``W_out^T``)."""
        cols = stored_w_in_cols(r, K, m, align)
        if norm_out:
            cols = -(-(cols + K + k) // align) * align
        shape = cls(rows, d, elem, cols, K + k, has_pass1=bool(r or K > 1 or m), has_mean=bool(r),
                    has_router=K > 1, has_residual=k > 0, **kw)
        return shape.with_norm(norm_out) if norm_out else shape


@dataclasses.dataclass(frozen=True)
class Config:
    """A launch configuration. ``SPLIT`` > 1: each row tile's d is split over SPLIT programs (split-d, see
    docs/kernels.md); 1: one program per row tile does pass 1, the epilogue and pass 2."""

    BLOCK_T: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    SPLIT: int = 1

    def short(self) -> str:
        split = f", split {self.SPLIT}" if self.SPLIT > 1 else ""
        return f"{self.BLOCK_T}x{self.BLOCK_D}, {self.num_warps}w, {self.num_stages}st{split}"


@dataclasses.dataclass(frozen=True)
class Resources:
    smem: int  # bytes per program
    regs: int  # per thread
    ctas_per_sm: int  # resident programs per SM (0: does not fit)
    limited_by: str
    spill_bytes: int = 0  # what ptxas spilled, where measured (`ptxas_table`): the heuristic avoids these
    measured: bool = False  # registers from ptxas itself, not the formula


def register_key(shape: Shape, config: Config) -> tuple:
    """What the token-mode kernel's registers depend on: the dtype (or, unknown, its size: the table then holds the
    larger over bf16 and fp16), the configuration (SPLIT included: the partials' reduction is unrolled) and the
    compiled layout."""
    return (shape.dtype or f"{shape.elem}B", config.BLOCK_T, config.BLOCK_D, config.num_warps, config.SPLIT,
            shape.np, shape.ncp, shape.has_pass1, shape.norm_out > 0, shape.has_router, shape.has_residual)


def resources(shape: Shape, config: Config, card: Card, kind: str = "steer", tile_on_chip: bool = False) -> Resources:
    """Estimated shared memory and registers of one program, and the resident programs per SM that follow.

    Registers of the token-mode kernel are ptxas's own where the configuration and layout were compiled
    (`ptxas_table`, sm_90a, Triton 3.9: every layout of r in {1, 8, 16, 32, 64}, K in {1, 4, 8}, with and without
    the MLP, and the issue grid's, at the configurations the heuristic picks); elsewhere a formula fitted to ptxas
    on the wide layouts. ptxas does not grow registers smoothly with the tile: it settles at occupancy steps (168
    registers for 3 programs of 4 warps, 128, 255) whatever the accumulator width, which is why the formula
    overstated occupancy 2x at small r (issue 24). tests/test_kernel_compile.py checks the estimate against ptxas
    (within 10 % and the same resident programs) on a sample covering every r and K above.

    ``tile_on_chip`` (a design the kernels do not implement, `predict_steer`): the program also holds its row tile
    (its d-slice with split-d) in shared memory between the passes."""
    bt, bd, e = config.BLOCK_T, config.BLOCK_D, shape.elem
    threads = 32 * config.num_warps
    buffers = max(1, config.num_stages - 1)
    if kind == "apply":
        smem = buffers * (bt * bd * e + shape.ncp * bd * e)
        regs = 32 + (3 * bt * bd + 2 * bt * shape.ncp) // threads
    else:
        dot_e = 4 if e == 4 else 2  # fp32 runs fp32 dots on fp32 copies
        norm = shape.norm_out > 0  # a fused RMSNorm also stages the norm weight (h's dtype) in pass 2
        pass1 = buffers * (bt * bd * e + bd * shape.np * e + bd * 4) if shape.has_pass1 else 0
        pass2 = buffers * (bt * bd * e + shape.ncp * bd * e + (bd * e if norm else 0))
        wgmma_a = 2 * bt * bd * dot_e if bt >= 64 else 0  # the centred tile staged for wgmma
        wgmma_a += bt * bd * 4 if e == 4 else 0  # fp32 'ieee' dots stage the centred tile too
        # epilogue layout conversions of a wide accumulator (in the fused-norm kernel Triton places them inside the
        # pipeline buffers: measured on sm_90a, tests/test_kernel_compile.py)
        scratch = bt * shape.np * 4 if shape.np > 128 and not norm else 0
        held = bt * -(-shape.d // config.SPLIT) * e if tile_on_chip else 0
        smem = max(pass1, pass2) + wgmma_a + scratch + held + 1 * KiB
        # the epilogue holds the accumulator and ~2 more (BLOCK_T, NP) fp32 temporaries (softmax, gathers); the
        # split-d reduction one more (the partial being added); fp32 tiles cost ~4x the registers of 16-bit ones
        acc = bt * shape.np // threads if shape.has_pass1 else 0
        acc_factor = (13 if shape.np <= 128 else 36) + (4 if config.SPLIT > 1 else 0)
        tile = bt * bd // threads
        regs = 24 + acc_factor * acc // 4 + (5 if e == 4 else 5 // 4) * tile + tile // 4 + 2 * bt * shape.ncp // threads
    spills, measured = 0, kind == "steer" and register_key(shape, config) in PTXAS_REGISTERS
    if measured:
        regs, spills = PTXAS_REGISTERS[register_key(shape, config)]
    else:
        regs = min(255, -(-regs // 8) * 8)
    by_smem = card.smem_per_sm // (smem + KiB) if smem <= card.smem_per_cta else 0
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = card.regs_per_sm // (per_warp * config.num_warps)
    by_warps = card.max_warps_per_sm // config.num_warps
    limits = {"smem": by_smem, "registers": by_regs, "warps": by_warps, "programs": card.max_ctas_per_sm}
    limited_by = min(limits, key=limits.get)
    return Resources(smem, regs, limits[limited_by], limited_by, spills, measured)


@dataclasses.dataclass(frozen=True)
class Prediction:
    kind: str
    card: str
    config: Optional[Config]
    grid: int
    ctas_per_sm: int
    concurrent: int  # programs resident at once
    working_set: int  # in-flight h bytes between pass 1 and pass 2
    second_read_l2: bool
    hbm_bytes: int
    l2_bytes: int
    ideal_bytes: int
    hbm_us: float
    l2_us: float
    sm_us: float
    ideal_us: float
    launches: int
    launch_us: float
    latency_us: float = 0.0  # dependent memory round trips on the critical path (matters at decode sizes only)

    @property
    def time_us(self) -> float:
        return max(self.hbm_us, self.l2_us, self.sm_us) + self.latency_us

    @property
    def ratio(self) -> float:
        """Predicted time over the ideal HBM time (1.0 = at the memory-bound limit)."""
        return self.time_us / self.ideal_us

    @property
    def fraction_of_copy(self) -> float:
        return 1.0 / self.ratio

    @property
    def bound(self) -> str:
        terms = {"HBM": self.hbm_us, "L2": self.l2_us, "SM feed": self.sm_us}
        return max(terms, key=terms.get)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(config=None if self.config is None else dataclasses.asdict(self.config), time_us=self.time_us,
                   ratio=self.ratio, bound=self.bound)
        return out


def _sm_rate(card: Card, inflight_per_sm: float) -> float:
    """GB/s one SM sustains with ``inflight_per_sm`` bytes of loads outstanding (Little's law, port-capped)."""
    return min(card.sm_gbps, inflight_per_sm / card.latency_ns)  # bytes/ns == GB/s


def lag_tiles(concurrent: int, split: int) -> int:
    """Split-d: row tiles between a tile's pass 1 and its pass 2, so that pass 2 rarely waits for the tile's
    coefficients (all programs of the tile have finished pass 1 once ``concurrent`` programs have started since)."""
    return -(-concurrent // split) + 1


def round_trips(split: int) -> int:
    """Dependent memory round trips on a launch's critical path, each a loaded latency that no bandwidth hides:
    the first loads of pass 1 and of pass 2; split-d adds the partials' read-back, the coefficient store and the
    flag poll. They set a ceiling on a launch of ideal time t: t / (t + round trips x latency)."""
    return 2 if split == 1 else 5


class SplitPlan(NamedTuple):
    """How a split-d launch (`steer_kernel`, ``SPLIT > 1``) runs, as the kernel launches it and the model counts it.

    ``grid``: persistent programs (at most those resident at once); ``lag``: row tiles between a tile's pass 1 and
    its pass 2 (0 for `synthesize`, else 1 .. n_tiles); ``ring``: slots of partial sums, reused round robin;
    ``part_w`` / ``coef_w``: fp32 words per row of a slice's partial sums (NP projections and ``||xc||^2`` plain
    and scaled, with a fused norm also ``||h||^2``) and of a tile's published coefficients (NCP, the gate, with a
    fused norm also ``1 / rms``); ``workspace``: fp32 words of the launch's workspace (the ring, then every tile's
    coefficients)."""

    grid: int
    lag: int
    ring: int
    n_tiles: int
    part_w: int
    coef_w: int
    workspace: int


def split_plan(shape: Shape, config: Config, card: Card, store_coef: bool = False,
               lag: Optional[int] = None) -> SplitPlan:
    """The split-d plan of ``shape`` (with ``shape.norm_out`` for the fused norm) under ``config``; ``lag``
    overrides the model's distance (tests), clamped as the kernel needs it."""
    split, bt = config.SPLIT, config.BLOCK_T
    n_tiles = -(-shape.rows // bt)
    slots = card.sms * max(1, resources(shape, config, card).ctas_per_sm)
    concurrent = min(n_tiles * split, slots)
    if store_coef:
        lag = 0
    else:
        lag = max(1, min(lag_tiles(concurrent, split) if lag is None else lag, n_tiles))
    ring = max(1, min(n_tiles, -(-concurrent // split) + lag + 2))
    norm = int(shape.norm_out > 0)
    part_w, coef_w = shape.np + 2 + norm, shape.ncp + 1 + norm
    return SplitPlan(min((n_tiles + lag) * split, slots), lag, ring, n_tiles, part_w, coef_w,
                     ring * split * bt * part_w + n_tiles * bt * coef_w)


def predict_steer(shape: Shape, config: Config, card: Card, pipelined_pass2: bool = True,
                  store_coef: bool = False, multicast: int = 1, partials_on_chip: bool = False,
                  tile_on_chip: bool = False, hide_ramp: bool = False, edited: float = 1.0) -> Prediction:
    """Token mode (``store_coef``: `synthesize`, pass 1 and the epilogue only) with ``config``; with a fused
    RMSNorm when ``shape.norm_out`` (`Shape.with_norm`: pass 2 also writes the normalised rows).
    ``edited``: the share of rows written back (in place, rows whose gate is off are not written).

    ``pipelined_pass2=False`` models the v1 kernel (synchronous loads of h in pass 2). Designs the kernels do not
    implement, to show what they would buy: ``multicast`` (W_in/W_out tiles fetched once per cluster of that many
    SMs, TMA multicast), ``partials_on_chip`` (split-d partial sums exchanged in distributed shared memory instead
    of L2), ``tile_on_chip`` (the row tile kept in shared memory between the passes: no second read of h at all),
    none of them expressible in Triton 3.6's ``tl``; ``hide_ramp`` (no dependent round trips at all: a bound, not
    what programmatic dependent launch gives, whose wait precedes every memory access: `pdl_model`)."""
    e, T, d = shape.elem, shape.rows, shape.d
    bt, split = config.BLOCK_T, config.SPLIT
    norm = shape.norm_out > 0
    res = resources(shape, config, card, tile_on_chip=tile_on_chip)
    if tile_on_chip and res.ctas_per_sm == 0:
        raise ValueError(f"tile_on_chip: a {bt}-row tile of d = {d} / split {split} does not fit in shared memory "
                         f"beside {config.short()}'s buffers ({res.smem} of {card.smem_per_cta} bytes)")
    occ = max(res.ctas_per_sm, 1)
    n_tiles = -(-T // bt)
    h = shape.h_bytes
    written = round(edited * h)
    if split > 1:
        plan = split_plan(shape, config, card, store_coef)
        lag, grid = plan.lag, plan.grid  # persistent: programs loop over the work items
        # fp32 partials per row and slice, as the kernel stores them: the stored W_in columns (not the padding) and
        # ||xc||^2 (plain and scaled), with a fused norm also ||h||^2; read back once, a fused norm's W_out xc
        # columns a second time
        part_cols = shape.w_in_cols + 2 + norm
        stored_rows = n_tiles * bt if bt > EPILOGUE_ROWS else T  # tall tiles store every row's projections
        partial_bytes = 0 if partials_on_chip else stored_rows * split * part_cols * 4
        partial_reads = 0 if partials_on_chip else partial_bytes + T * split * norm * shape.n_coef * 4
        # a tile's coefficients as published: BLOCK_T rows of coef_w words, written once, read by every slice
        coef_bytes = n_tiles * bt * plan.coef_w * 4 * (1 + split)
    else:
        lag, grid, partial_bytes, partial_reads, coef_bytes = 0, n_tiles, 0, 0, 0
    concurrent = min(grid, card.sms * occ)
    active = min(card.sms, grid)
    if store_coef or not shape.has_pass1 or tile_on_chip:
        working_set, second_l2 = 0, True
    else:
        working_set = (lag + 1) * bt * d * e if split > 1 else concurrent * bt * d * e
        second_l2 = working_set <= card.l2_bytes // 2
    tiles_fetched = -(-n_tiles // multicast)
    pass1_l2 = (h if shape.has_pass1 else 0) + tiles_fetched * shape.w_in_bytes + partial_bytes + partial_reads
    pass2_l2 = 0 if store_coef else (0 if tile_on_chip and shape.has_pass1 else h) + written + shape.y_bytes \
        + tiles_fetched * shape.w_out_bytes + coef_bytes
    l2 = pass1_l2 + pass2_l2
    weights = shape.w_in_bytes + (0 if store_coef else shape.w_out_bytes)
    out_bytes = T * shape.n_coef * 4 if store_coef else written + shape.y_bytes
    hbm = h + out_bytes + weights + (0 if second_l2 or store_coef else h) + partial_bytes // 2
    ideal = (h if shape.has_pass1 or not store_coef else 0) + out_bytes + weights
    # multiprocessor feed: pass 1 and pass 2 run one after the other in a program
    buffers = max(1, config.num_stages - 1)
    per_sm = concurrent / active
    rows = min(bt, T)  # masked rows load nothing
    stage1 = rows * config.BLOCK_D * e + config.BLOCK_D * shape.w_in_cols * e
    stage2 = rows * config.BLOCK_D * e + shape.n_coef * config.BLOCK_D * e + (config.BLOCK_D * e if norm else 0)
    rate1 = _sm_rate(card, per_sm * buffers * stage1)
    rate2 = _sm_rate(card, per_sm * (buffers if pipelined_pass2 else 1) * stage2)
    waves = grid / (card.sms * occ)
    quantum = math.ceil(waves) / waves if 1 < waves < 4 and split == 1 else 1.0  # a short grid's last wave
    sm_us = quantum * (pass1_l2 / (active * rate1) + pass2_l2 / (active * rate2)) / 1e3
    return Prediction("synthesize" if store_coef else "steer", card.name, config, grid, res.ctas_per_sm, concurrent,
                      working_set, second_l2, hbm, l2, ideal, hbm / card.hbm_gbps / 1e3, l2 / card.l2_gbps / 1e3,
                      sm_us, ideal / card.hbm_gbps / 1e3, 2 if split > 1 else 1, card.launch_us,
                      0.0 if hide_ramp else round_trips(split) * card.latency_ns / 1e3)


def predict_apply(shape: Shape, config: Config, card: Card, sequences: int) -> Prediction:
    """Query-mode `apply_coef`: one pass, grid over row tiles and d blocks, W_out re-read per row tile."""
    e, T, d = shape.elem, shape.rows, shape.d
    bt, bd = config.BLOCK_T, config.BLOCK_D
    res = resources(shape, config, card, kind="apply")
    occ = max(res.ctas_per_sm, 1)
    n_tiles = -(-T // bt)
    grid = n_tiles * -(-d // bd)
    h = shape.h_bytes
    small = sequences * shape.n_coef * 4 + T * 8
    l2 = 2 * h + n_tiles * shape.n_coef * d * e + n_tiles * -(-d // bd) * bt * shape.ncp * 4 + T * 8
    hbm = 2 * h + shape.n_coef * d * e + small
    concurrent = min(grid, card.sms * occ)
    active = min(card.sms, grid)
    rate = _sm_rate(card, concurrent / active * (bt * bd * e + shape.n_coef * bd * e))
    return Prediction("apply", card.name, config, grid, res.ctas_per_sm, concurrent, 0, True, hbm, l2, hbm,
                      hbm / card.hbm_gbps / 1e3, l2 / card.l2_gbps / 1e3, l2 / (active * rate) / 1e3,
                      hbm / card.hbm_gbps / 1e3, 1, card.launch_us)  # one load per program: sm_us is its latency


def predict_apply_delta(rows: int, d: int, elem: int, sequences: int, card: Card, block: int = 512,
                        delta_elem: int = 4) -> Prediction:
    """Decode fast path: ``h + delta[seq]`` (one delta row per sequence, fp32 or ``delta_elem`` bytes an element:
    `coef_delta`'s dtype); ``block``: elements a program handles (delta_kernel's BLOCK_D for one row)."""
    h = rows * d * elem
    hbm = 2 * h + sequences * d * delta_elem
    grid = -(-rows * d // block)
    active = min(card.sms, grid)
    rate = _sm_rate(card, block * (elem + delta_elem))
    return Prediction("apply_delta", card.name, None, grid, 0, grid, 0, True, hbm, hbm, hbm,
                      hbm / card.hbm_gbps / 1e3, hbm / card.l2_gbps / 1e3, hbm / (active * rate) / 1e3,
                      hbm / card.hbm_gbps / 1e3, 1, card.launch_us)  # one load per program: sm_us is its latency


ONE_PASS_MAX_D = 8192  # rows up to this wide stay in registers between their sum of squares and their writes
WIDE_BLOCK_D = 4096


def row_blocks(d: int) -> tuple:
    """``(BLOCK_T, BLOCK_D, one pass, warps)`` of a kernel that owns whole rows (`delta_norm_kernel`, and the model's
    separate RMSNorm): up to `ONE_PASS_MAX_D` columns the row is one tile (several rows per program for narrow
    ones, about 2K elements a program), wider rows are swept twice in `WIDE_BLOCK_D` chunks; 4 to 16 warps as
    the tile grows."""
    if d <= ONE_PASS_MAX_D:
        block_d = 1 << max(0, (d - 1).bit_length())
        block_t, one_pass = max(1, min(16, 2048 // block_d)), True
    else:
        block_d, block_t, one_pass = WIDE_BLOCK_D, 1, False
    elems = block_t * block_d
    return block_t, block_d, one_pass, 4 if elems <= 2048 else 8 if elems <= 4096 else 16


def _predict_rows(kind: str, rows: int, d: int, hbm: int, l2: int, loaded_per_elem: float, card: Card) -> Prediction:
    """A one-launch kernel that owns whole rows (`row_blocks`): programs resident per SM as warps allow, each with
    all of its tile's loads in flight at once (``loaded_per_elem`` bytes per element of the tile: h, and the
    weight or delta rows read beside it)."""
    block_t, block_d, _, warps = row_blocks(d)
    grid = -(-rows // block_t)
    per_sm = min(card.max_warps_per_sm // warps, card.max_ctas_per_sm, -(-grid // card.sms))
    active = min(card.sms, grid)
    rate = _sm_rate(card, per_sm * min(rows, block_t) * min(d, block_d) * loaded_per_elem)
    return Prediction(kind, card.name, None, grid, per_sm, min(grid, card.sms * per_sm), 0, True, hbm, l2, hbm,
                      hbm / card.hbm_gbps / 1e3, l2 / card.l2_gbps / 1e3, l2 / (active * rate) / 1e3,
                      hbm / card.hbm_gbps / 1e3, 1, card.launch_us, latency_us=card.latency_ns / 1e3)


def predict_rmsnorm(rows: int, d: int, elem: int, card: Card, out_elem: Optional[int] = None,
                    weight_elem: Optional[int] = None) -> Prediction:
    """A separate RMSNorm in one launch, the baseline the fused ops are held to (transformers' eager RMSNorm is
    several launches and moves more): read h and the weight, write the normalised rows."""
    weight_elem = weight_elem or elem
    hbm = rows * d * (elem + (out_elem or elem)) + d * weight_elem
    return _predict_rows("rmsnorm", rows, d, hbm, hbm, elem + weight_elem, card)


def predict_apply_delta_norm(rows: int, d: int, elem: int, sequences: int, card: Card,
                             out_elem: Optional[int] = None, weight_elem: Optional[int] = None,
                             delta_elem: int = 4) -> Prediction:
    """Query mode fused with the next RMSNorm (`delta_norm_kernel`): read h, one delta row per sequence
    (``delta_elem`` bytes an element) and
    the norm's weight (``weight_elem`` bytes an element, default h's), write the edited rows and the normalised
    rows; rows wider than `ONE_PASS_MAX_D` are read a second time (from L2)."""
    weight_elem = weight_elem or elem
    h = rows * d * elem
    hbm = 2 * h + rows * d * (out_elem or elem) + sequences * d * delta_elem + d * weight_elem
    l2 = hbm + (0 if row_blocks(d)[2] else h) + (rows - sequences) * d * delta_elem  # delta re-read per row
    return _predict_rows("apply_delta_norm", rows, d, hbm, l2, elem + delta_elem + weight_elem, card)


def v1_config(rows: int, shape: Shape) -> Config:
    """The configuration the v1 kernels used (fixed thresholds), kept to predict what v2 changes."""
    wide = shape.np > 128
    if rows <= 16:
        return Config(16, 64, 8 if wide else 4, 3)
    if rows >= 4096 or wide:
        return Config(64, 64, 8, 3)
    return Config(32, 64, 4, 3)


def predict_v1(shape: Shape, card: Card) -> Prediction:
    """The v1 token-mode kernel: one program per row tile, pass 2's loads of h synchronous."""
    return predict_steer(shape, v1_config(shape.rows, shape), card, pipelined_pass2=False)


# The bank kernel's model (issue 13) is `bank_perf_model.predict_bank`.
