"""The bank kernel's bytes model (`finesteer_kernels.bank_perf_model`) and the launches `bank_kernel.bank_launch`
picks with it (issue 24 item 7: <= 1.1x the ideal HBM bytes at T >= 4096 without a slower prediction). Plain
Python: no kernel runs here; what the kernel compiles to is checked in tests/test_bank_kernels.py."""
import dataclasses

import pytest

from finesteer_kernels.bank import BankLayout
from finesteer_kernels.bank_kernel import BANK_CONFIGS, bank_launch as launch_under_interpreter
from finesteer_kernels.bank_perf_model import bounded_programs, persistent_ctas_per_sm, predict_bank
from finesteer_kernels.perf_model import CARDS, Config, Shape, padded

# a bank of S steerers of mixed sizes (r, K, m, k), the widest r = 64, K = 8 with a 32-wide MLP
SIZES = [(64, 8, 32, 8), (16, 4, 0, 0), (0, 1, 0, 0), (32, 8, 16, 4)]


def mixed_bank(T: int, d: int, S: int) -> tuple:
    """(one `Shape` per steerer with its share of the T rows, the bank's `BankLayout`)."""
    shapes = [Shape.of(T // S + (i < T % S), d, 2, *SIZES[i % len(SIZES)]) for i in range(S)]
    layout = BankLayout(G=S + 2, NP=padded(max(s.w_in_cols for s in shapes)), MP=32, NC=16,
                        NCP=padded(max(s.n_coef for s in shapes)), W_IN_STRIDE=0, ANY_GATE=1, ANY_ROUTER=1,
                        ANY_RES=1)
    return shapes, layout


def bank_launch(*args, **kwargs):
    """What `bank_kernel.bank_launch` picks on a GPU (the tests run with TRITON_INTERPRET=1)."""
    return launch_under_interpreter(*args, **kwargs, interpreting=False)


def best_plain(shapes, T: int, card):
    """The fastest prediction with one program per row tile (the kernel before the bounded grid)."""
    fits = [c for c in BANK_CONFIGS[2] if c.BLOCK_T <= max(16, T)]
    return min((predict_bank(shapes, c, card) for c in fits), key=lambda p: p.time_us)


@pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))
@pytest.mark.parametrize("S", [1, 4, 16])
@pytest.mark.parametrize("T", [4096, 8192, 16384])
def test_picks_at_d4096_read_h_once_and_are_not_slower(card, S, T):
    d = 4096
    shapes, layout = mixed_bank(T, d, S)
    launch = bank_launch(T, d, layout, 2, card)
    picked = predict_bank(shapes, launch.config, card, programs=launch.programs)
    plain = best_plain(shapes, T, card)
    assert launch.programs is not None and picked.second_read_l2
    assert picked.hbm_bytes <= 1.1 * picked.ideal_bytes, picked
    assert plain.hbm_bytes >= 1.3 * plain.ideal_bytes  # what the bound removes: h read a second time from HBM
    assert picked.time_us <= plain.time_us * 1.001, (picked, plain)


@pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))
@pytest.mark.parametrize("T", [4096, 16384])
def test_at_d8192_the_bound_would_idle_sms_and_split_d_is_what_meets_the_target(card, T):
    """32-row tiles of d = 8192 are 512 KiB: half of L2 holds 50 (H100) or 60 (H200) of them, so the bounded grid
    leaves most SMs idle and is predicted slower; the pick keeps one program per tile (1.5x the bytes). Split-d
    (not built in the bank kernel) is the design that reads h once there without a slower prediction."""
    d, S = 8192, 4
    shapes, layout = mixed_bank(T, d, S)
    launch = bank_launch(T, d, layout, 2, card)
    picked = predict_bank(shapes, launch.config, card, programs=launch.programs)
    assert launch.programs is None and not picked.second_read_l2
    assert picked.hbm_bytes >= 1.4 * picked.ideal_bytes
    bound = Config(32, 128, 8, 4)
    assert predict_bank(shapes, bound, card, programs=bounded_programs(32, d, 2, card)).time_us > picked.time_us
    split = predict_bank(shapes, Config(32, 128, 8, 3, SPLIT=8), card)
    assert split.second_read_l2 and split.hbm_bytes <= 1.1 * split.ideal_bytes
    assert split.time_us < picked.time_us


@pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))
def test_bounded_programs_fill_half_of_l2(card):
    for block_t, d, elem in ((16, 4096, 2), (32, 4096, 2), (32, 8192, 2), (16, 4096, 4), (32, 576, 2)):
        tile = block_t * d * elem
        p = bounded_programs(block_t, d, elem, card)
        assert p * tile <= card.l2_bytes // 2 < (p + 1) * tile


def test_persistent_variant_occupancy_and_small_batches_keep_one_program_per_tile():
    card = CARDS["H100 SXM"]
    assert persistent_ctas_per_sm(Config(32, 128, 8, 4), card, 4) == 1
    assert persistent_ctas_per_sm(Config(16, 128, 4, 3), card, 4) == 2
    # a persistent launch's working set is its programs' tiles; below the bound the grid is one program per tile
    shapes, layout = mixed_bank(4096, 4096, 4)
    pred = predict_bank(shapes, Config(32, 128, 8, 4), card, programs=100)
    assert pred.grid == 100 and pred.working_set == 100 * 32 * 4096 * 2
    for T in (1, 16, 512, 2048):
        assert bank_launch(T, 4096, layout, 2, card).programs is None
    # synthesize_bank reads h once: never bounded
    assert bank_launch(16384, 4096, layout, 2, card, store_coef=True).programs is None


def test_plain_grid_counts_every_resident_tile_in_flight():
    card = CARDS["H100 SXM"]
    shapes, _ = mixed_bank(4096, 4096, 1)
    pred = predict_bank(shapes, Config(32, 128, 8, 3), card)
    assert pred.grid == 128 and pred.working_set == 128 * 32 * 4096 * 2 > card.l2_bytes // 2
    assert not pred.second_read_l2
    only = dataclasses.replace(shapes[0], rows=1024)
    assert predict_bank([only], Config(32, 128, 8, 3), card).second_read_l2  # 8 MiB in flight
