"""The bank kernel's bytes model (`finesteer_kernels.bank_perf_model`) and the launches `bank_kernel.bank_launch`
picks with it (issue 24 item 7: <= 1.1x the ideal HBM bytes at T >= 4096 without a slower prediction). Plain
Python: no kernel runs here; what the kernel compiles to is checked in tests/test_bank_kernels.py."""
import dataclasses

import pytest

from benchmarks.bank_bench import mix_layout, mix_shapes
from finesteer_kernels.bank_kernel import BANK_CONFIGS, bank_launch as launch_under_interpreter, bank_shape
from finesteer_kernels.bank_perf_model import bounded_programs, persistent_ctas_per_sm, predict_bank
from finesteer_kernels.perf_model import CARDS, Config


def mixed_bank(T: int, d: int, S: int) -> tuple:
    """(one `Shape` per steerer of the issue's S-steerer mix with its share of the T rows, the bank's layout)."""
    shapes = mix_shapes(T, d, S)
    return shapes, mix_layout(shapes)


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
    assert picked.second_read_l2
    assert picked.hbm_bytes <= 1.1 * picked.ideal_bytes, picked
    assert plain.hbm_bytes >= 1.3 * plain.ideal_bytes  # what the bound removes: h read a second time from HBM
    assert picked.time_us <= plain.time_us * 1.001, (picked, plain)


@pytest.mark.parametrize("S", [1, 4, 16])
@pytest.mark.parametrize("T", [4096, 8192, 16384])
def test_at_d8192_the_target_is_met_unless_every_launch_meeting_it_is_predicted_slower(T, S):
    """32-row tiles of d = 8192 are 512 KiB: half of L2 holds 50 (H100) or 60 (H200) of them, so the bounded grid
    leaves most SMs idle and is predicted slower than the plain grid. Split-d reads h once: the pick on the H100,
    and on the H200 at T = 4096; from T = 8192 the H200's split, L2-bound on its partial sums, is predicted over
    5 % slower for the bank's widest steerer (what the host chooses by), so the pick stays one program per tile
    (1.45-1.5x the ideal bytes: docs/kernels.md). Checked as the rule, not the outcome: a pick above 1.1x only
    where every launch that meets 1.1x is predicted over 5 % slower for the widest steerer."""
    from finesteer_kernels.bank_kernel import DEEP_CONFIGS, HBM_FIRST, SPLIT_CONFIGS

    d = 8192
    shapes, layout = mixed_bank(T, d, S)
    for card in CARDS.values():
        launch = bank_launch(T, d, layout, 2, card)
        picked = predict_bank(shapes, launch.config, card, programs=launch.programs)
        plain = best_plain(shapes, T, card)
        bound = predict_bank(shapes, Config(32, 128, 8, 4), card, programs=bounded_programs(32, d, 2, card))
        assert bound.time_us > plain.time_us and launch.programs is None
        assert picked.time_us <= plain.time_us * 1.001
        if picked.hbm_bytes > 1.1 * picked.ideal_bytes:
            widest = [bank_shape(T, d, layout, 2)]
            chosen = predict_bank(widest, launch.config, card).time_us
            others = [predict_bank(widest, c, card) for c in SPLIT_CONFIGS[2]]
            others += [predict_bank(widest, c, card, programs=bounded_programs(c.BLOCK_T, d, 2, card))
                       for c in BANK_CONFIGS[2] + DEEP_CONFIGS[2]]
            for other in others:
                assert other.hbm_bytes > 1.1 * other.ideal_bytes or other.time_us > (1 + HBM_FIRST) * chosen
    if T == 4096:  # as the docs have it today
        assert all(bank_launch(T, d, layout, 2, card).config.SPLIT == 8 for card in CARDS.values())


@pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))
@pytest.mark.parametrize("d", [576, 4096, 8192])
def test_decode_splits_d(monkeypatch, card, d):
    """At decode sizes one program per tile streams a whole W_in alone; split-d spreads it over 8 programs (at
    d = 576 there is little to spread: no slower, 1 row ties)."""
    for T in (1, 16):
        shapes, layout = mixed_bank(T, d, 1)
        launch = bank_launch(T, d, layout, 2, card)
        picked = predict_bank(shapes, launch.config, card)
        assert picked.time_us <= best_plain(shapes, T, card).time_us * 1.001
        if d >= 4096:
            assert launch.config.SPLIT == 8 and picked.time_us < 0.3 * best_plain(shapes, T, card).time_us
    monkeypatch.setenv("FINESTEER_SPLIT_D", "0")  # split-d switched off: one program per tile
    assert bank_launch(16, d, layout, 2, card).config.SPLIT == 1


@pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))
def test_bounded_programs_fill_half_of_l2(card):
    for block_t, d, elem in ((16, 4096, 2), (32, 4096, 2), (32, 8192, 2), (16, 4096, 4), (32, 576, 2)):
        tile = block_t * d * elem
        p = bounded_programs(block_t, d, elem, card)
        assert p * tile <= card.l2_bytes // 2 < (p + 1) * tile


def test_persistent_variant_occupancy_and_small_batches_keep_one_program_per_tile():
    card = CARDS["H100 SXM"]
    assert persistent_ctas_per_sm(Config(32, 128, 8, 4), 2, card, 4) == 1
    assert persistent_ctas_per_sm(Config(16, 128, 4, 3), 2, card, 4) == 2
    assert persistent_ctas_per_sm(Config(16, 64, 8, 3), 4, card, 4) == 2
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
