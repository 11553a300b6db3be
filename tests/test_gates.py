"""Gate variants on planted data where the paper's SCS fails by construction: the targets vary most along
directions the benign rows share, and differ from them only along a small discriminative subspace. The contrastive
and linear gates recover that subspace; thresholds (logistic, Neyman-Pearson) do what they say; the linear gate in
the op's cone form decides like its linear score, in float64 and in the op's fp32 reference; layer selection and
leave-one-source-out use calibration rows only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import finesteer_kernels
from finesteer.fitting import fit as F
from finesteer.fitting import gates as G
from finesteer.fitting import layer_selection as LS
from finesteer.studies import transfer as T
from finesteer_kernels import SteerParams, reference

D = 32


def planted(n: int, seed: int, shift: float = 4.0) -> dict:
    """Shared: 4 directions with std 6 in both classes. Discriminative: a 2-dim subspace V0 where targets sit
    ``shift`` away from the benign mean (std 1 inside it). Everything else: std 1 noise."""
    g = torch.Generator().manual_seed(99)  # the planted structure is fixed; ``seed`` draws the samples
    Q = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    shared, V0 = Q[:, :4], Q[:, 4:6]
    centre = 3.0 * torch.randn(D, generator=g)
    s = torch.Generator().manual_seed(seed)

    def draw(offset: torch.Tensor) -> torch.Tensor:
        return centre + offset + 6.0 * torch.randn(n, 4, generator=s) @ shared.T + torch.randn(n, D, generator=s)

    direction = (V0 @ torch.tensor([1.0, 1.0])) / math.sqrt(2)
    return dict(targets=draw(shift * direction), benign=draw(torch.zeros(D)), V0=V0, shared=shared)


@pytest.fixture(scope="module")
def data():
    return planted(400, 1), planted(200, 2), planted(300, 3)


def fit(kind, data, **options):
    f, c, t = data
    return G.fit_gate(kind, f["targets"], f["benign"], c["targets"], c["benign"],
                      test=(t["targets"], t["benign"]), **options)


def largest_angle_deg(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle between span(A) and span(B) (orthonormal columns, A no wider than B)."""
    cosines = torch.linalg.svdvals(A.double().T @ B.double()).clamp(max=1.0)
    return math.degrees(math.acos(float(cosines.min())))


def test_scs_fails_by_construction(data):
    scs = fit("scs", data)
    # its subspace is the shared high-variance one, not the discriminative one
    assert largest_angle_deg(data[0]["shared"], scs.basis) < 20
    assert scs.test.auc < 0.75


def test_contrastive_gate_recovers_the_discriminative_subspace(data):
    gate = fit("contrastive", data)
    assert torch.allclose(gate.basis.T @ gate.basis, torch.eye(gate.r), atol=1e-5)
    assert gate.details["rank_search"] is not None
    # the target-vs-benign mean shift lies in V0: the top contrastive direction is inside V0
    assert largest_angle_deg(gate.basis[:, :1], data[0]["V0"]) < 15
    assert torch.allclose(gate.mean, data[0]["benign"].mean(0), atol=1e-5)  # mu = benign mean
    # (the ratio form caps it: a target's shift is a small share of its energy, most of which is shared variance)
    assert gate.test.auc > 0.97 and gate.test.tpr > 0.7 and gate.test.fpr < 0.05


def test_linear_gate_direction_and_cone_decide_like_the_linear_score(data):
    gate = fit("linear", data)
    assert gate.r == 1
    assert largest_angle_deg(gate.basis, data[0]["V0"]) < 20
    assert gate.test.auc > 0.97 and gate.test.tpr > 0.85 and gate.test.fpr < 0.1
    # the energy ratio about the far apex is monotone in w.h: same ranking as the linear score
    H = torch.cat([data[2]["targets"], data[2]["benign"]]).double()
    linear_score = (H @ gate.basis.double())[:, 0].numpy()
    ratio = G.energy_ratio(H, gate.basis, gate.mean).numpy()
    assert spearmanr(linear_score, ratio).correlation > 0.9999
    # the op's own fp32 gate (reference) agrees with the float64 decision on rows not at the threshold
    params = SteerParams(basis=gate.basis, mean=gate.mean, tau=gate.tau, experts=torch.zeros(1, D))
    on = reference.gate(H.float(), params) > 0
    clear = np.abs(ratio / gate.tau - 1) > 1e-4
    assert clear.mean() > 0.95
    assert torch.equal(on[torch.from_numpy(clear)], torch.from_numpy(ratio >= gate.tau)[torch.from_numpy(clear)])


def test_linear_gate_survives_16_bit_kernels(data):
    """The apex is ~1e4 away along a coordinate whose weight is exactly zero in the basis and in the experts'
    inputs, so kernels that round h - mu and the weights to 16 bits (the Triton interpreter here, tensor cores on a
    GPU) decide as the float64 score of the rounded rows does, and route as the reference."""
    f = data[0]
    gate = fit("linear", data)
    k = gate.details["apex_coordinate"]
    assert gate.basis[k, 0] == 0 and gate.mean[k] < -1e3
    mose = F.fit_mose(f["targets"], torch.randn(len(f["targets"]), D), num_experts=2, epochs=3, ignore_inputs=(k,))
    assert mose.router_weight[k].abs().max() == 0 and mose.res_in_weight[:, k].abs().max() == 0
    params = mose.params(gate)
    H = torch.cat([data[2]["targets"][:40], data[2]["benign"][:40]])
    for dtype in (torch.float32, torch.bfloat16):
        x = H.to(dtype)
        assert finesteer_kernels.select_backend(x) == "triton"
        ratio = G.energy_ratio(x.double(), gate.basis, gate.mean)
        clear = (ratio / gate.tau - 1).abs() > 1e-3
        coef = finesteer_kernels.synthesize(x, params)
        assert torch.equal((coef.abs().sum(-1) > 0)[clear], (ratio >= gate.tau)[clear])
        expected = reference.synthesize(x, params)
        assert torch.allclose(coef, expected, atol=0.05 if dtype == torch.bfloat16 else 1e-4, rtol=0.02)


def test_neyman_pearson_threshold_is_the_lowest_with_at_most_that_fpr(data):
    gate = fit("contrastive", data, max_fpr=0.05)
    assert gate.rule == {"method": "max_fpr", "max_fpr": 0.05, "per_source": False}
    cal = data[1]
    sb = G.energy_ratio(cal["benign"], gate.basis, gate.mean).numpy()
    assert gate.calibration.fpr <= 0.05
    allowed = int(math.floor(0.05 * len(sb)))
    assert (sb >= gate.tau).sum() <= allowed
    next_lower = np.sort(sb)[::-1][allowed]  # lowering tau to it would let one more benign row through
    assert next_lower < gate.tau and (sb >= next_lower).sum() == allowed + 1
    strict = fit("contrastive", data, max_fpr=0.0)
    assert strict.calibration.fpr == 0.0 and strict.tau > gate.tau


def test_per_source_threshold_holds_the_fpr_on_every_benign_source():
    """A pool with an easy benign source lets a hard one through far above the target; the per-source rule keeps
    every source within it, at the cost of the pooled rule's lower threshold."""
    rng = np.random.default_rng(0)
    share = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731 - gate scores are energy shares in [0, 1]
    targets = share(rng.normal(3.0, 1.0, 400))
    hard, easy = share(rng.normal(1.5, 1.0, 100)), share(rng.normal(-4.0, 1.0, 300))
    scores = np.r_[hard, easy]
    labels = ["hard"] * 100 + ["easy"] * 300
    pooled, rule = G.calibrate(targets, scores, max_fpr=0.03)
    assert rule["per_source"] is False and (hard >= pooled).mean() > 0.1  # 12 allowed, all spent on the hard one
    tau, rule = G.calibrate(targets, scores, max_fpr=0.03, benign_sources=labels)
    assert rule == {"method": "max_fpr", "max_fpr": 0.03, "per_source": True, "binding_source": "hard"}
    assert (hard >= tau).mean() <= 0.03 and (easy >= tau).mean() <= 0.03 and tau > pooled
    assert tau == G.neyman_pearson_threshold(targets, hard, 0.03)
    with pytest.raises(ValueError, match="benign_sources: expected one label per benign calibration row"):
        G.calibrate(targets, scores, max_fpr=0.03, benign_sources=labels[:-1])


def test_fits_are_deterministic(data):
    for kind in G.GATES:
        a, b = fit(kind, data), fit(kind, data)
        assert torch.equal(a.basis, b.basis) and torch.equal(a.mean, b.mean) and a.tau == b.tau


@pytest.mark.parametrize("call, match", [
    (lambda f, c: G.fit_gate("pca", f["targets"], f["benign"], c["targets"], c["benign"]), "gate: expected one of"),
    (lambda f, c: G.fit_gate("linear", f["targets"], f["benign"], c["targets"], c["benign"], r=2), "rank 1"),
    (lambda f, c: G.fit_gate("contrastive", f["targets"], f["benign"], c["targets"], c["benign"], max_fpr=1.5),
     r"max_fpr: expected a share in \[0, 1\)"),
    (lambda f, c: G.fit_gate("contrastive", f["targets"], None, c["targets"], c["benign"]),
     "H_benign: expected a torch.Tensor"),
    (lambda f, c: G.fit_gate("contrastive", f["targets"], f["benign"][:, :5], c["targets"], c["benign"]),
     "H_benign: expected 32 columns"),
])
def test_bad_input_names_the_argument(data, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(data[0], data[1])


def sources(seed_base: int, informative: bool) -> dict:
    """Three harmful and two benign sources; at the informative 'layer' each harmful source is shifted along V0
    (with its own extra offset), at the other the classes do not differ."""
    out = {}
    for i, name in enumerate(("h1", "h2", "h3", "b1", "b2")):
        harmful = informative and name.startswith("h")
        d = planted(120, seed_base + i, shift=4.0 if harmful else 0.0)
        out[name] = d["targets"] + (0.5 * i if harmful else 0.0)
    return out


def test_layer_selection_and_leave_one_source_out_use_calibration_rows_only():
    layers = {3: sources(10, informative=False), 7: sources(10, informative=True)}
    splits = {name: LS.split_indices(120, i) for i, name in enumerate(layers[3])}
    harmful_sources = ["h1", "h2", "h3"]
    best, scores = LS.select_layer("linear", layers, splits, harmful_sources)
    assert best == 7 and scores[7] > 0.95 > 0.7 > scores[3]
    # the criterion never reads test rows: poisoning them changes nothing
    poisoned = {layer: {s: r.clone() for s, r in rows.items()} for layer, rows in layers.items()}
    for rows in poisoned.values():
        for s, r in rows.items():
            r[splits[s][2]] = 1e3 * torch.randn(len(splits[s][2]), D)
    assert LS.select_layer("linear", poisoned, splits, harmful_sources)[1] == scores
    # leave-one-source-out: the held-out source is not used at all (poisoning it changes nothing)
    rows = layers[7]
    harmful = {s: r for s, r in rows.items() if s in harmful_sources}
    benign = {s: r for s, r in rows.items() if s not in harmful_sources}
    gate = LS.fit_without("linear", harmful, benign, splits, ["h2"])
    poisoned_h2 = {**harmful, "h2": torch.full_like(harmful["h2"], 1e3)}
    again = LS.fit_without("linear", poisoned_h2, benign, splits, ["h2"])
    assert torch.equal(gate.basis, again.basis) and gate.tau == again.tau
    rates = LS.held_out_rates(gate, harmful, benign, splits, "h2")
    assert rates["side"] == "harmful" and rates["n"] == 120 and rates["tpr"] > 0.8 and rates["auc"] > 0.95
    folds = {s: LS.held_out_rates(LS.fit_without("linear", harmful, benign, splits, [s]), harmful, benign, splits, s)
             for s in rows}
    m = LS.macro(folds)
    assert m["tpr"] == pytest.approx(np.mean([folds[s]["tpr"] for s in harmful_sources]))
    assert m["fpr"] == pytest.approx(np.mean([folds[s]["fpr"] for s in ("b1", "b2")]))


def test_a_side_with_one_source_is_never_left_out():
    """The truthfulness recipe has one target source (the user's file): it stays in every fit."""
    rows = sources(30, informative=True)
    one_harmful = {"h1": rows["h1"]}
    benign = {"b1": rows["b1"], "b2": rows["b2"]}
    splits = {name: LS.split_indices(120, i) for i, name in enumerate(rows)}
    assert LS.held_out_candidates(one_harmful) == [] and LS.held_out_candidates(benign) == ["b1", "b2"]
    assert LS.source_held_out_auc("linear", one_harmful, benign, splits) > 0.9
    single = {"b1": rows["b1"]}
    plain = LS.fit_without("linear", one_harmful, single, splits).calibration.auc
    assert LS.source_held_out_auc("linear", one_harmful, single, splits) == plain


def test_transfer_study_tables_and_plot(tmp_path):
    """`finesteer transfer`'s study on planted rows: one informative and one uninformative 'layer'."""
    layers = {3: sources(10, informative=False), 7: sources(10, informative=True)}
    names = list(layers[3])
    sizes = [(s, 120) for s in names]
    acts = {layer: torch.stack([torch.cat([rows[s] for s in names])] * len(T.POOLS), dim=1)
            for layer, rows in layers.items()}
    results = T.study(acts, sizes, ["h1", "h2", "h3"], gates=("scs", "linear"), candidate_layers=(3, 7),
                      fixed_layer=3, progress=False)
    assert results["chosen"] == {"gate": "linear", "layer": 7, "by": results["chosen"]["by"]}
    for kind in ("scs", "linear"):
        folds = results["gates"][kind]["folds"]
        assert set(folds) == set(names) and all(f["layer"] in (3, 7) for f in folds.values())
    assert [p["max_fpr"] for p in results["tradeoff"]] == list(T.FPR_TARGETS)
    tprs = [p["tpr"] for p in results["tradeoff"]]
    assert tprs == sorted(tprs)  # a looser FPR target never lowers the TPR
    results.update(model="planted")
    paths = T.write_outputs(results, tmp_path)
    table = paths["table"].read_text()
    assert table.count("| scs |") == 6 and table.count("| linear |") == 6  # 3 threshold rules x (auto, fixed)
    assert "| linear | max FPR 0.03 per source | 3 |" in table
    assert "**linear** at layer 7" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_study_never_sees_the_prompts_demo_and_eval_score():
    """`finesteer transfer` picks demo's and eval's default gate and layer, so its pools leave out their test
    splits (the real prompt sets from the data wheels)."""
    from finesteer.fitting import data as D
    from finesteer.fitting.held_out import scored_prompts
    from finesteer.fitting.layer_selection import source_pools

    scored = scored_prompts()
    harmful, benign = source_pools(exclude=scored)
    pooled = {D.normalize(p) for side in (harmful, benign) for ps in side.values() for p in ps.prompts}
    assert len(scored) > 250 and len(pooled) > 1000
    assert not pooled & {D.normalize(p) for p in scored}
    unfiltered = source_pools()
    assert any(D.normalize(p) in {D.normalize(q) for q in scored}
               for side in unfiltered for ps in side.values() for p in ps.prompts)  # the exclusion does something
