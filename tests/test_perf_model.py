"""The bytes-and-occupancy model and the configuration heuristic (plain Python: no GPU, no interpreter).

The issue's acceptance grid: T in {1, 16, 512, 4096, 8192, 65536}, d in {576, 2048, 4096, 8192}, bf16 and fp16,
r = 64, K = 8, with (m = 16, k = 8) and without the residual MLP, on the H100 SXM and the H200. Predicted time is
the largest of HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth and the SMs' feed time, plus the dependent round
trips at the start and end of a launch (perf_model's docstring and docs/kernels.md give every figure's source).
"""
import dataclasses
import itertools

import pytest

from finesteer_kernels.heuristics import (TALL_SPLITS, TALL_TILE, best_design, best_steer, best_unbuilt, steer_candidates,
                                         steer_config)
from finesteer_kernels.perf_model import (CARDS, MiB, Config, Shape, card_from_properties, predict_apply_delta,
                                          predict_steer, predict_v1, resources, round_trips)

T_GRID = (1, 16, 512, 4096, 8192, 65536)
D_GRID = (576, 2048, 4096, 8192)
RESIDUAL = {False: (64, 8, 0, 0), True: (64, 8, 16, 8)}
GOAL = 1.25  # predicted time within 1.25x of the ideal HBM time, for T >= 4096 and d >= 2048

# Where no configuration the kernels can run reaches the goal, the best reachable ratio, pinned (a model change
# that moves one must update it here and in benchmarks/RESULTS.md). Two causes, both in docs/kernels.md: at
# T = 4096, d = 2048 the whole op is 8-11 us and the dependent round trips at the launch's start and end are a third
# of it; on the H200 the L2 (the H100's, an assumed 8.4 TB/s) is less than twice its 4.3 TB/s HBM, and the three
# reads/writes of h plus W_in's re-reads and the split-d partials exceed that (128-row tiles, issue 24 item 6, took
# eight points off this list).
BEST_REACHABLE = {
    ("H100 SXM", False, 2048, 4096): 1.37,
    ("H100 SXM", True, 2048, 4096): 1.37,
    ("H200", False, 2048, 4096): 1.57,
    ("H200", False, 2048, 8192): 1.34,
    ("H200", False, 4096, 4096): 1.29,
    ("H200", True, 2048, 4096): 1.64,
    ("H200", True, 2048, 8192): 1.42,
    ("H200", True, 4096, 4096): 1.36,
}


def grid():
    for card, residual, d, T, elem in itertools.product(CARDS.values(), RESIDUAL, D_GRID, T_GRID, (2,)):
        yield card, residual, d, T, Shape.of(T, d, elem, *RESIDUAL[residual])


def test_every_pick_keeps_two_programs_per_sm_or_a_persistent_grid_on_every_sm():
    for card, residual, d, T, shape in grid():
        pred = best_steer(shape, card)
        persistent_full = pred.config.SPLIT > 1 and pred.grid >= card.sms
        assert pred.ctas_per_sm >= 2 or persistent_full, (card.name, residual, d, T, pred.config)
        assert pred.config.num_stages >= 2  # every hot-loop load of h pipelined (checked in the TTGIR too)


def test_prefill_meets_the_goal_or_the_pinned_best_reachable_figure():
    unreachable = {}
    for card, residual, d, T, shape in grid():
        if T < 4096 or d < 2048:
            continue
        pred = best_steer(shape, card)
        key = (card.name, residual, d, T)
        if pred.ratio <= GOAL:
            assert key not in BEST_REACHABLE, key
            continue
        unreachable[key] = round(pred.ratio, 2)
        # the pick is the best of the configurations the heuristic prefers, and none the kernels can run beats it by
        # more than 7 %: at T = 4096, d = 2048 on the H200 a 128-row tile split in 2 (128 programs, 4 SMs idle,
        # outside the rule of two programs per SM or a grid on every SM) is predicted 4-6 % faster
        preds = [(predict_steer(shape, c, card), res) for c, res in steer_candidates(shape, card)]
        preferred = [p for p, res in preds if res.ctas_per_sm >= 2 or (p.config.SPLIT > 1 and p.grid >= card.sms)]
        assert min(p.ratio for p in preferred) >= pred.ratio - 1e-9
        assert min(p.ratio for p, _ in preds) >= pred.ratio / 1.07
        # and two designs the kernels do not implement would reach the goal (docs/kernels.md, "what would reach it"):
        # W_in multicast within 1.1x; the row tile kept on chip within 1.14x, its shared memory counted (a 64-row
        # tile of 2-8 KiB rows fits only beside a d-split's short slices: on the H200 the split's partials stay)
        assert best_design(shape, card, multicast=2, hide_ramp=True).ratio <= 1.1, key
        assert best_design(shape, card, tile_on_chip=True, hide_ramp=True).ratio <= 1.14, key
    assert unreachable == BEST_REACHABLE


def test_fp16_picks_equal_bf16_picks():
    for card, residual, d, T, shape in grid():
        assert steer_config(shape, card) == steer_config(Shape.of(T, d, 2, *RESIDUAL[residual]), card)


def test_v2_moves_h_once_where_v1_read_it_twice_from_hbm():
    """The issue's review figures: v1 at T = 8192, d = 4096 moves ~201 MB of HBM against 135 MB ideal and runs at
    ~30-40 % of H200 peak; v2 keeps the second read in L2."""
    shape = Shape.of(8192, 4096, 2, 64, 8, 16, 8)
    h200 = CARDS["H200"]
    v1 = predict_v1(shape, h200)
    assert v1.working_set == 64 * MiB and not v1.second_read_l2
    assert v1.hbm_bytes == pytest.approx(202e6, rel=0.01) and v1.ideal_bytes == pytest.approx(135e6, rel=0.01)
    assert 0.2 <= v1.fraction_of_copy <= 0.4
    v2 = best_steer(shape, h200)
    assert v2.second_read_l2 and v2.working_set <= h200.l2_bytes // 2
    assert v2.hbm_bytes <= 1.09 * v2.ideal_bytes  # + the split-d partial sums (split 8), half counted as written back
    assert v2.ratio < v1.ratio / 2


def test_bytes_by_hand():
    """One case computed by hand: T = 4096, d = 4096, bf16, no residual (72 W_in columns, K = 8), 64 x 128 tiles
    split in 4 over d: 64 row tiles."""
    shape = Shape.of(4096, 4096, 2, 64, 8)
    assert (shape.w_in_cols, shape.np, shape.n_coef) == (72, 128, 8)
    card = CARDS["H100 SXM"]
    pred = predict_steer(shape, Config(64, 128, 8, 3, SPLIT=4), card)
    h = 4096 * 4096 * 2
    w_in = 4096 * 72 * 2 + 4096 * 4  # stored columns only (the padding to 128 is masked) and fp32 mu
    w_out = 8 * 4096 * 2
    partials = 4096 * 4 * 74 * 4  # fp32, per row and slice: 72 columns + ||xc||^2 (plain and scaled)
    # per row of each of the 64 tiles, as the kernel publishes them: 16 coefficient slots (8 padded to the dot's 16)
    # + the gate, written once, read by each of the 4 slices
    coef = 64 * 64 * 17 * 4 * 5
    assert pred.ideal_bytes == 2 * h + w_in + w_out
    assert pred.l2_bytes == 3 * h + 64 * (w_in + w_out) + 2 * partials + coef
    assert pred.hbm_bytes == 2 * h + w_in + w_out + partials // 2
    assert pred.second_read_l2


def test_working_set_rule_and_occupancy():
    card = CARDS["H100 SXM"]
    shape = Shape.of(8192, 4096, 2, 64, 8)
    no_split = predict_steer(shape, Config(64, 64, 8, 3), card)
    assert no_split.working_set == no_split.concurrent * 64 * 4096 * 2
    assert no_split.second_read_l2 == (no_split.working_set <= card.l2_bytes // 2)
    res = resources(shape, Config(64, 128, 8, 3, SPLIT=4), card)
    assert res.ctas_per_sm == 1 and res.limited_by in ("smem", "registers")
    small = resources(shape, Config(16, 64, 4, 3), card)
    assert small.ctas_per_sm >= 3 and small.smem < 64 * 1024


def test_a_tile_kept_on_chip_takes_shared_memory():
    """The `tile_on_chip` design holds the row tile (its slice with split-d) in shared memory between the passes:
    counted in the program's shared memory, and a tile that does not fit beside the buffers is refused by name
    (before issue 24's last pass it was priced at the buffers' occupancy: 100 % of copy where it cannot run)."""
    card = CARDS["H100 SXM"]
    shape = Shape.of(8192, 4096, 2, 64, 8, 16, 8)
    for config in (Config(16, 128, 4, 3), Config(64, 128, 8, 3, SPLIT=8)):
        plain, held = resources(shape, config, card), resources(shape, config, card, tile_on_chip=True)
        assert held.smem - plain.smem == config.BLOCK_T * 4096 // config.SPLIT * 2
        assert 0 < held.ctas_per_sm <= plain.ctas_per_sm
    with pytest.raises(ValueError, match=r"tile_on_chip: a 64-row tile of d = 4096 / split 2 does not fit"):
        predict_steer(shape, Config(64, 128, 8, 3, SPLIT=2), card, tile_on_chip=True)


# Issue 24's bar (>= 90 % of copy at T >= 4096, by the model) is out of reach of every design the model can price,
# built or not (multicast, partials in distributed shared memory, the tile on chip, any of their combinations), at
# these points: split-d pays five dependent round trips (3.75 us at the assumed 750 ns, a ceiling of 81-89 % on
# the H200's 16-31 us), and with one program per row tile the H200 loses more to bytes (the second read of h, or
# W_in re-read per short tile) or to one SM's feed. docs/kernels.md, "The bar".
BAR_OUT_OF_REACH = {("H200", 4096, 4096): 0.81, ("H200", 4096, 8192): 0.89, ("H200", 8192, 4096): 0.89}


def test_where_no_modelled_design_reaches_the_bar():
    out_of_reach = {}
    for card in CARDS.values():
        for T, d in itertools.product((4096, 8192), (4096, 8192)):
            shape = Shape.of(T, d, 2, *RESIDUAL[True])
            best, _ = best_unbuilt(shape, card)
            assert best.time_us <= best_steer(shape, card).time_us  # the shipped kernel is one of the designs
            if best.fraction_of_copy < 0.9:
                out_of_reach[(card.name, T, d)] = round(best.fraction_of_copy, 2)
                split_ceiling = best.ideal_us / (best.ideal_us + round_trips(2) * card.latency_ns / 1e3)
                assert split_ceiling < 0.9
    assert out_of_reach == BAR_OUT_OF_REACH


def test_decode_splits_d_over_many_programs():
    for card in CARDS.values():
        for d in (2048, 4096, 8192):
            pred = best_steer(Shape.of(1, d, 2, 64, 8, 16, 8), card)
            assert pred.config.SPLIT >= 8 and pred.grid >= 16, pred.config  # not one program streaming W_in
            assert pred.time_us < 6.0
        delta = predict_apply_delta(1, 4096, 2, 1, card)
        assert delta.hbm_bytes == 2 * 4096 * 2 + 4096 * 4


def test_generic_card_from_device_properties():
    h200 = card_from_properties("NVIDIA H200", 132, 60 * MiB)
    assert h200.peak_gbps == 4800.0 and h200.l2_bytes == 60 * MiB
    assert card_from_properties("NVIDIA H100 80GB HBM3", 132, 50 * MiB).peak_gbps == 3350.0
    other = card_from_properties("NVIDIA RTX 6000 Ada Generation", 142, 96 * MiB)
    assert other.sms == 142 and other.l2_bytes == 96 * MiB
    shape = Shape.of(8192, 4096, 2, 64, 8)
    assert best_steer(shape, other).config is not None


def test_interpreter_pins_one_config():
    shape = Shape.of(8192, 4096, 2, 64, 8)
    assert steer_config(shape, interpreting=True) == steer_config(Shape.of(3, 40, 4, 4, 2), interpreting=True)


def test_split_d_can_be_switched_off(monkeypatch):
    shape = Shape.of(1, 4096, 2, 64, 8, 16, 8)  # decode: the model splits d over many programs
    assert steer_config(shape).SPLIT > 1
    monkeypatch.setenv("FINESTEER_SPLIT_D", "0")
    config = steer_config(shape)
    assert config.SPLIT == 1
    assert best_steer(shape, allow_split=False).config == config


def test_tall_tile_bytes_by_hand():
    """Issue 24 item 6, by hand: T = 8192, d = 4096, bf16, r = 64, K = 8, m = 16, k = 8 (88 stored W_in columns, 16
    coefficients) in 128 x 64 tiles split 6 over d (the H200's pick): 64 row tiles, so W_in, mu and W_out cross L2 64
    times (128 times in 64-row tiles), and the fp32 partial sums of every row of each tile and slice are written and
    read back."""
    shape = Shape.of(8192, 4096, 2, 64, 8, 16, 8)
    config = dataclasses.replace(TALL_TILE, SPLIT=6)
    assert config == Config(128, 64, 8, 4, SPLIT=6) == best_steer(shape, CARDS["H200"]).config
    pred = predict_steer(shape, config, CARDS["H200"])
    h = 8192 * 4096 * 2
    w_in = 4096 * 88 * 2 + 4096 * 4
    w_out = 16 * 4096 * 2
    partials = 8192 * 6 * 90 * 4  # per row and slice: 88 columns + ||xc||^2 (plain and scaled)
    coef = 64 * 128 * 17 * 4 * 7  # 16 coefficients + the gate per row, written once, read by each of the 6 slices
    assert pred.l2_bytes == 3 * h + 64 * (w_in + w_out) + 2 * partials + coef
    assert pred.hbm_bytes == 2 * h + w_in + w_out + partials // 2
    # one program per SM: lag = ceil(132 / 6) + 1 = 23 tiles, 24 tiles of 1 MiB between a row's two reads of h
    assert pred.second_read_l2 and pred.working_set == 24 * 128 * 4096 * 2
    sixty_four = predict_steer(shape, Config(64, 128, 8, 3, SPLIT=4), CARDS["H200"])
    # half the weights' re-reads (-56 MB) against 1.5x the split's partial sums (+12 MB): 43 MB less through L2
    assert sixty_four.l2_bytes - pred.l2_bytes == pytest.approx(43e6, rel=0.03)


# Issue 24 item 6 and "the bar" (>= 90 % of copy bandwidth at T >= 4096 on both cards): the picks' predicted % of copy
# bandwidth, bf16, r = 64, K = 8, without and with the MLP (m = 16, k = 8), at 0.7x, 1x and 1.3x the assumed L2
# bandwidth (8.4 TB/s, no data sheet gives it), then under the `hide_ramp` bound (no dependent round trips: not what
# programmatic dependent launch gives, whose wait precedes every memory access) at 1x.
# H100: HBM-bound, the 64-row picks unchanged at 1x (the tall tile's larger split costs HBM bytes there); H200: the
# tall tile picked everywhere here, split 6 (d = 4096) or 12 (d = 8192).
TALL_PREDICTIONS = {  # (card, residual, T, d): (% at L2 x0.7, x1, x1.3, x1 under hide_ramp)
    ("H100 SXM", False, 4096, 4096): (82, 83, 83, 97),
    ("H100 SXM", False, 4096, 8192): (85, 89, 89, 97),
    ("H100 SXM", False, 8192, 4096): (88, 89, 89, 97),
    ("H100 SXM", False, 8192, 8192): (88, 93, 93, 97),
    ("H100 SXM", True, 4096, 4096): (78, 83, 83, 96),
    ("H100 SXM", True, 4096, 8192): (80, 89, 89, 96),
    ("H100 SXM", True, 8192, 4096): (83, 89, 89, 96),
    ("H100 SXM", True, 8192, 8192): (83, 92, 92, 96),
    ("H200", False, 4096, 4096): (58, 77, 77, 95),
    ("H200", False, 4096, 8192): (62, 85, 85, 95),
    ("H200", False, 8192, 4096): (61, 85, 85, 95),
    ("H200", False, 8192, 8192): (64, 90, 90, 95),
    ("H200", True, 4096, 4096): (56, 74, 77, 89),
    ("H200", True, 4096, 8192): (61, 81, 84, 89),
    ("H200", True, 8192, 4096): (61, 80, 84, 89),
    ("H200", True, 8192, 8192): (64, 84, 89, 89),
}


def test_tall_tile_predictions_with_the_l2_bandwidth_uncertainty():
    got = {}
    for card in CARDS.values():
        for residual, T, d in itertools.product(RESIDUAL, (4096, 8192), (4096, 8192)):
            shape = Shape.of(T, d, 2, *RESIDUAL[residual])
            row = []
            for factor in (0.7, 1.0, 1.3):
                scaled = dataclasses.replace(card, l2_gbps=card.l2_gbps * factor)
                pick = best_steer(shape, scaled)
                row.append(round(100 * pick.fraction_of_copy))
                if factor == 1.0:
                    at_assumed = pick
            ramp = predict_steer(shape, at_assumed.config, card, hide_ramp=True)
            got[(card.name, residual, T, d)] = (*row, round(100 * ramp.fraction_of_copy))
            sixty_four = min((predict_steer(shape, c, card) for c, _ in steer_candidates(shape, card)
                              if c.BLOCK_T <= 64), key=lambda p: p.time_us)
            if card.name == "H200":  # the tall tile: fewer L2 bytes and a better prediction than any 64-row layout
                assert at_assumed.config.BLOCK_T == TALL_TILE.BLOCK_T
                assert at_assumed.l2_bytes < 0.95 * sixty_four.l2_bytes
                assert at_assumed.fraction_of_copy >= sixty_four.fraction_of_copy + 0.04
            else:
                assert at_assumed.config.BLOCK_T == 64 and at_assumed.bound == "HBM"
    assert got == TALL_PREDICTIONS
    # the bar, by the model: not met as built (83-93 % on the H100 and 74-90 % on the H200: the round trips, and on
    # the H200 L2); met only under the no-round-trip bound, and then on the H200 without the MLP only (89 % with it)
    assert min(v[1] for v in got.values()) < 90
    ramp = {k: v[3] for k, v in got.items()}
    assert min(v for k, v in ramp.items() if k[0] == "H100 SXM" or not k[1]) >= 90
    assert max(v for k, v in ramp.items() if k[0] == "H200" and k[1]) == 89


def test_tall_tile_only_where_ptxas_counted_its_registers():
    """The heuristic offers the 128-row tile only for layouts `ptxas_table` holds it for (the formula's registers are
    not trusted there), never unsplit, never in fp32."""
    for card in CARDS.values():
        for sizes in ((32, 8, 16, 8), (8, 4, 0, 0)):  # 64- and 16-column accumulators: never compiled tall
            assert all(c.BLOCK_T <= 64 for c, _ in steer_candidates(Shape.of(8192, 4096, 2, *sizes), card))
        fp32 = Shape.of(8192, 4096, 4, *RESIDUAL[True])
        assert all(c.BLOCK_T <= 32 for c, _ in steer_candidates(fp32, card))
        tall = [(c, res) for c, res in steer_candidates(Shape.of(8192, 4096, 2, *RESIDUAL[True]), card)
                if c.BLOCK_T == TALL_TILE.BLOCK_T]
        assert {c.SPLIT for c, _ in tall} == set(TALL_SPLITS)
        assert all(c == dataclasses.replace(TALL_TILE, SPLIT=c.SPLIT) and res.measured for c, res in tall)
