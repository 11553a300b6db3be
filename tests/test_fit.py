"""Fitting on synthetic activations with planted structure: SCS recovers the subspace and separates held-out data,
MoSE finds the planted number of experts and beats the single-mean (CAA) baseline on held-out pairs; the fitted
Steerer round-trips through a file and the reference op; equal seeds give equal tensors; baselines fit into the op's
format."""
from __future__ import annotations

import math

import pytest
import torch

import finesteer
from finesteer.fitting import fit as F
from finesteer.fitting import gates as G
from finesteer_kernels import reference

D, R, K_PLANTED = 48, 3, 4


def planted(n: int, seed: int) -> dict:
    """Targets: mu0 + a 3-dim planted subspace S0 (scale 3) + small noise. Benign: mu0 + mostly outside S0.
    Delta: one of 4 modes, chosen by which of 4 latent directions the target's subspace coordinates align with
    most (so the router can read it off h), plus noise."""
    g = torch.Generator().manual_seed(1234)  # the planted structure is fixed; ``seed`` draws the samples
    S0 = torch.linalg.qr(torch.randn(D, R, generator=g))[0]
    mu0 = torch.randn(D, generator=g)
    modes = 6.0 * torch.linalg.qr(torch.randn(D, K_PLANTED, generator=g))[0].T  # (K, D), orthogonal, norm 6
    keys = torch.nn.functional.normalize(torch.randn(K_PLANTED, R, generator=g), dim=1)
    s = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, R, generator=s)
    targets = mu0 + z @ S0.T + 0.15 * torch.randn(n, D, generator=s)
    outside = torch.randn(n, D, generator=s)
    outside = outside - outside @ S0 @ S0.T
    benign = mu0 + 2.0 * outside + 0.3 * torch.randn(n, R, generator=s) @ S0.T
    mode = (z @ keys.T).argmax(1)
    delta = modes[mode] + 0.3 * torch.randn(n, D, generator=s)
    return dict(S0=S0, targets=targets, benign=benign, delta=delta, mode=mode)


@pytest.fixture(scope="module")
def fitted():
    fit_data, cal, test = planted(300, 1), planted(100, 2), planted(200, 3)
    scs = G.fit_scs(fit_data["targets"], cal["targets"], cal["benign"], test=(test["targets"], test["benign"]))
    mose = F.fit_mose(fit_data["targets"], fit_data["delta"], seed=0)
    return dict(scs=scs, mose=mose, fit=fit_data, test=test)


def largest_principal_angle_deg(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle between span(A) and the part of span(B) nearest to it (A: (d, a), B: (d, b),
    a <= b, both orthonormal)."""
    cosines = torch.linalg.svdvals(A.double().T @ B.double()).clamp(max=1.0)
    return math.degrees(math.acos(float(cosines.min())))


def test_scs_recovers_planted_subspace_and_separates_held_out(fitted):
    scs = fitted["scs"]
    assert scs.r == R  # the default rank (explained variance) finds the planted rank
    assert torch.allclose(scs.basis.T @ scs.basis, torch.eye(scs.r), atol=1e-5)
    assert largest_principal_angle_deg(fitted["fit"]["S0"], scs.basis) < 10.0
    # the reported rates are those of the fitted threshold on the calibration and test rows
    cal, test = planted(100, 2), fitted["test"]
    rate = lambda rows: float((F.energy_ratio(rows, scs.basis, scs.mean) >= scs.tau).double().mean())  # noqa: E731
    assert scs.calibration.tpr == pytest.approx(rate(cal["targets"]))
    assert scs.calibration.fpr == pytest.approx(rate(cal["benign"]))
    assert (scs.test.tpr, scs.test.fpr) == pytest.approx((rate(test["targets"]), rate(test["benign"])))
    assert scs.test.auc > 0.99
    assert scs.test.tpr > 0.85 and scs.test.fpr < 0.05
    assert scs.calibration.n_target == 100 and scs.test.n_benign == 200


def test_scs_threshold_starts_from_recall_and_moves_with_logistic_fit():
    data = planted(200, 5)
    cal = planted(100, 6)
    # noisy calibration: half the benign rows sit inside the subspace, so the classes overlap
    benign = torch.cat([cal["benign"][:50], cal["targets"][50:] + 0.5 * torch.randn(50, D)])
    scs = G.fit_scs(data["targets"], cal["targets"][:50], benign, recall=0.9)
    scores = F.energy_ratio(cal["targets"][:50], scs.basis, scs.mean)
    assert scs.rule["start"] == pytest.approx(float(torch.quantile(scores, 0.1)), rel=1e-6)
    assert scs.rule["method"] == "logistic" and scs.rule["converged"] and scs.rule["used"]
    assert scs.rule["w"] > 0
    assert scs.tau != scs.rule["start"]  # the logistic fit, not the start, sets tau


def test_mose_chooses_planted_k_and_beats_caa_on_held_out(fitted):
    mose, test = fitted["mose"], fitted["test"]
    report = mose.report
    assert report.num_experts == K_PLANTED
    assert set(report.calinski_harabasz) == set(range(2, 11))
    assert sum(report.cluster_sizes) == report.n_train == 240 and report.n_val == 60
    assert len(report.train_mse) == len(report.val_mse) >= 2
    assert report.best_val_mse == min(report.val_mse)
    assert report.best_val_mse < 0.35 * report.caa_val_mse
    caa = F.fit_caa(fitted["fit"]["delta"])
    held_out_mose = torch.mean((mose.predict(test["targets"]) - test["delta"]) ** 2)
    held_out_caa = torch.mean((reference.output_basis(caa.params)[0] - test["delta"]) ** 2)
    assert held_out_mose < 0.35 * held_out_caa  # noise floor 0.09, CAA ~0.65
    # each planted mode is close to one expert
    modes = torch.stack([test["delta"][test["mode"] == j].mean(0) for j in range(K_PLANTED)])
    cos = torch.nn.functional.normalize(modes, dim=1) @ torch.nn.functional.normalize(mose.experts, dim=1).T
    assert (cos.max(1).values > 0.95).all()


def test_mose_early_stops_on_validation_loss():
    data = planted(60, 7)  # few pairs, many epochs: the validation loss turns up and training stops there
    mose = F.fit_mose(data["targets"], data["delta"] + 2.0 * torch.randn(60, D), num_experts=2, hidden=64,
                      epochs=2000, patience=15, lr=1e-2, weight_decay=0.0, seed=3)
    r = mose.report
    assert r.stopped_early
    assert len(r.val_mse) - 1 == r.best_epoch + 15
    assert r.train_mse[-1] < r.train_mse[r.best_epoch]  # training kept improving after the best val epoch
    assert r.best_val_mse == min(r.val_mse)


def test_fitted_steerer_round_trips_and_reproduces_training_predictions(fitted, tmp_path):
    scs, mose, data = fitted["scs"], fitted["mose"], fitted["fit"]
    steerer = finesteer.Steerer(mose.params(scs, alpha=1.0), layer=3, model="synthetic", method="finesteer",
                                metadata={"scs": scs.report(), "mose": mose.report.as_dict()})
    path = tmp_path / "s.safetensors"
    steerer.save(path)
    loaded = finesteer.Steerer.load(path)
    assert loaded.metadata["mose"]["num_experts"] == K_PLANTED
    H = torch.cat([data["targets"][:20], data["benign"][:20]])
    out = reference.steer(H, loaded.params)
    gate = scs.gate(H).float()
    expected = H + gate[:, None] * mose.predict(H)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert gate[:20].mean() > 0.8 and gate[20:].sum() == 0
    assert torch.equal(reference.steer(H, steerer.params), out)


def test_same_seed_same_tensors_and_other_seed_differs():
    data = planted(120, 9)
    a = F.fit_mose(data["targets"], data["delta"], seed=4, epochs=30, num_experts=3)
    b = F.fit_mose(data["targets"], data["delta"], seed=4, epochs=30, num_experts=3)
    c = F.fit_mose(data["targets"], data["delta"], seed=5, epochs=30, num_experts=3)
    pa, pb, pc = a.params().tensors(), b.params().tensors(), c.params().tensors()
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa) and a.gamma == b.gamma
    assert not torch.equal(pa["router_weight"], pc["router_weight"])


def test_cast_baseline_threshold_and_format():
    data, cal, test = planted(200, 11), planted(100, 12), planted(100, 13)
    cast = F.fit_cast(data["targets"], data["benign"], data["delta"], cal["targets"], cal["benign"],
                      test=(test["targets"], test["benign"]))
    p = cast.params
    assert p.mean is None and p.r == 1 and p.num_experts == 1
    assert p.tau == pytest.approx(cast.report["theta"] ** 2)
    assert torch.allclose(p.experts[0], data["delta"].mean(0), atol=1e-5)
    # the threshold is the best-F1 one: no calibration score gives a higher F1
    st = F.energy_ratio(cal["targets"], p.basis, None).numpy()
    sb = F.energy_ratio(cal["benign"], p.basis, None).numpy()
    f1 = lambda t: 2 * (st >= t).sum() / (2 * (st >= t).sum() + (sb >= t).sum() + (st < t).sum())  # noqa: E731
    assert cast.report["calibration_f1"] == pytest.approx(max(f1(t) for t in list(st) + list(sb)))
    # the F1 of the saved gate (its stored basis) at its threshold: no calibration score sits on the threshold
    assert cast.report["calibration_f1"] == pytest.approx(f1(p.tau))
    gate_on = lambda rows: float((F.energy_ratio(rows, p.basis, None) >= p.tau).double().mean())  # noqa: E731
    assert cast.report["test"]["tpr"] == pytest.approx(gate_on(test["targets"]))
    assert cast.report["test"]["fpr"] == pytest.approx(gate_on(test["benign"]))


def test_best_f1_threshold_counts_scores_at_the_threshold_and_breaks_ties_low():
    """The gate opens at score >= threshold, so a score equal to a candidate cut counts as on (counting it as off
    reports the F1 of another cut); among equal F1s the lowest cut (the higher recall) wins; the threshold sits
    between calibration scores, never on one."""
    import numpy as np

    f1, tau = F._best_f1_threshold(np.array([0.2, 0.6, 0.8]), np.array([0.1, 0.4]))  # best cut: all of 0.2 and up
    assert (f1, tau) == (pytest.approx(6 / 7), pytest.approx(0.15))
    f1, tau = F._best_f1_threshold(np.array([0.3, 0.8]), np.array([0.5, 0.6]))  # cuts at 0.3 and 0.8 tie at 2/3
    assert (f1, tau) == (pytest.approx(2 / 3), pytest.approx(0.15))


def test_caa_is_the_mean_delta_without_gate():
    delta = torch.randn(30, 8)
    caa = F.fit_caa(delta)
    assert caa.params.basis is None and caa.params.num_experts == 1
    assert torch.allclose(caa.params.experts[0], delta.mean(0))


@pytest.mark.parametrize("call, match", [
    (lambda: G.fit_scs(torch.randn(10, 8), torch.randn(5, 7), torch.randn(5, 8)), "H_target_cal"),
    (lambda: G.fit_scs(torch.randn(10, 8), torch.randn(5, 8), torch.randn(5, 8), r=20), "r:"),
    (lambda: G.fit_scs(torch.randn(10, 8), torch.randn(5, 8), torch.randn(5, 8), recall=1.5), "recall"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(9, 8)), "Delta"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.full((10, 8), float("nan"))), "NaN"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(10, 8), activation="tanh"), "activation"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(10, 8), res_rank=4, hidden=0),
     r"hidden: expected an int >= 1 .* when res_rank > 0"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(10, 8), res_rank=-1), "res_rank: expected an int >= 0"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(10, 8), epochs=0), "epochs: expected a positive int"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(10, 8), batch_size=2.5), "batch_size: expected a positive"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(10, 8), lr=float("nan")), "lr: expected a positive finite"),
    (lambda: F.fit_mose(torch.randn(10, 8), torch.randn(10, 8), weight_decay=-1.0), "weight_decay: expected"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_mose_ignores_constant_anchor_dimensions():
    """A (nearly) constant training dimension has nothing to learn from: it must get zero input weights, not
    ``0.01 * randn / 1e-6``-sized ones that make any deviation at inference swing the router."""
    data = planted(120, 21)
    H = data["targets"].clone()
    H[:, 5] = 2.0 + 1e-8 * torch.randn(120)  # nearly constant
    H[:, 6] = 3.0  # exactly constant
    mose = F.fit_mose(H, data["delta"], num_experts=3, res_rank=2, hidden=8, epochs=20, seed=0)
    assert mose.report.constant_inputs == 2
    assert torch.equal(mose.router_weight[5:7], torch.zeros(2, 3))
    assert torch.equal(mose.res_in_weight[:, 5:7], torch.zeros(8, 2))
    # the other dimensions' weights stay at the scale of 1/std, and fp16 packing stays finite
    assert mose.router_weight.abs().max() < 100 and mose.res_in_weight.abs().max() < 100
    packed = mose.params().to(dtype=torch.float16).pack()
    assert torch.isfinite(packed.w_in).all()
    moved = H[:10].clone()
    moved[:, 5:7] += 1.0
    assert torch.allclose(mose.predict(moved), mose.predict(H[:10]), atol=1e-6)


def test_mose_without_residual_accepts_hidden_zero():
    data = planted(40, 22)
    mose = F.fit_mose(data["targets"], data["delta"], num_experts=2, res_rank=0, hidden=0, epochs=2)
    assert mose.res_in_weight is None and mose.report.hidden == 0


# ---- activations (tiny model, character tokenizer: no files needed) ----------------------------------------------
class CharTokenizer:
    """Enough of a tokenizer for the collectors: no chat template, BOS = 1, pad = 0."""

    chat_template = None
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 120 for c in text]}


def _hidden(model, ids: list, layer: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]


def test_anchor_activations_are_padding_free_and_stop_after_the_last_layer():
    from finesteer.fitting.activations import collect_activations
    from finesteer.patching.layers import find_decoder_layers
    from tiny_models import tiny_model

    model, tok = tiny_model("llama"), CharTokenizer()
    prompts = ["short", "a considerably longer prompt here", "mid length"]
    calls = []
    handle = find_decoder_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        acts = collect_activations(model, tok, prompts, [0, 1], batch_size=2, progress=False)
    finally:
        handle.remove()
    assert calls == []  # layer 2 never ran
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        for layer in (0, 1):
            assert torch.allclose(acts[layer][i], _hidden(model, ids, layer)[-1], atol=1e-5)


def test_completion_shifts_are_mean_completion_differences():
    from finesteer.fitting.activations import completion_shifts
    from tiny_models import tiny_model

    model, tok = tiny_model("qwen2", seed=1), CharTokenizer()
    prompts = ["how do I do x", "tell me y"]
    desired = ["no way", ["I refuse.", "Sorry, no."]]
    undesired = ["sure, step one", "ok"]
    shifts = completion_shifts(model, tok, prompts, desired, undesired, 1, batch_size=3, progress=False)
    for i, p in enumerate(prompts):
        pid = tok(p)["input_ids"]

        def side(completions):
            completions = [completions] if isinstance(completions, str) else completions
            means = [_hidden(model, pid + tok(c, add_special_tokens=False)["input_ids"], 1)[len(pid):].mean(0)
                     for c in completions]
            return torch.stack(means).mean(0)

        assert torch.allclose(shifts.delta[1][i], side(desired[i]) - side(undesired[i]), atol=1e-5)
        assert torch.allclose(shifts.anchors[1][i], _hidden(model, pid, 1)[-1], atol=1e-5)
    with pytest.raises(ValueError, match="desired"):
        completion_shifts(model, tok, prompts, ["x"], undesired, 1, progress=False)
    with pytest.raises(ValueError, match="layers"):
        completion_shifts(model, tok, prompts, desired, undesired, 3, progress=False)


def test_remove_group_means_keeps_overall_mean_and_within_group_variation():
    g = torch.Generator().manual_seed(0)
    within = torch.randn(40, 6, generator=g)
    groups = [i % 4 for i in range(40)]
    offsets = 5.0 * torch.randn(4, 6, generator=g)
    delta = within + offsets[groups]
    cleaned = F.remove_group_means(delta, groups)
    assert torch.allclose(cleaned.mean(0), delta.mean(0), atol=1e-5)
    centred = within - torch.stack([within[[i for i in range(40) if groups[i] == j]].mean(0) for j in range(4)])[groups]
    assert torch.allclose(cleaned - cleaned.mean(0), centred - centred.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        F.remove_group_means(delta, groups[:-1])


def test_layer_index_checks_share_one_helper_and_message():
    import numpy as np

    from finesteer.fitting import recipes
    from finesteer.fitting.activations import collect_activations
    from finesteer.interop.interchange import ControlVectorError, import_cast
    from finesteer.patching.layers import check_layer_index, num_layers
    from tiny_models import tiny_model

    model = tiny_model("llama")
    n, d = num_layers(model), model.config.hidden_size
    out_of_range = f"index {n} out of range for a model with {n} decoder layers"
    with pytest.raises(ValueError, match=f"layers: {out_of_range}"):
        collect_activations(model, CharTokenizer(), ["x"], n, progress=False)
    with pytest.raises(ValueError, match=rf"layers\[1\]: {out_of_range}"):
        collect_activations(model, CharTokenizer(), ["x"], [0, n], progress=False)
    with pytest.raises(ValueError, match=f"layer: {out_of_range}"):
        recipes._layers_to_collect(model, n)
    with pytest.raises(ControlVectorError, match=f"layer: {out_of_range}"):
        import_cast(torch.ones(d), torch.ones(d), 0.5, n, model=model)
    assert recipes._layers_to_collect(model, None) == [n // 2]
    layer = check_layer_index(np.int64(n - 1), n)
    assert layer == n - 1 and type(layer) is int
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(ValueError, match="where: expected a non-negative int"):
            check_layer_index(bad, n, "where")


def test_pooled_anchor_rows_and_the_activation_cache(tmp_path):
    from finesteer.fitting.activation_cache import cached_anchor_activations
    from finesteer.fitting.activations import collect_activations, collect_pooled_activations
    from tiny_models import tiny_model

    model, tok = tiny_model("llama"), CharTokenizer()
    prompts = ["short", "a considerably longer prompt here", "mid length"]
    pooled = collect_pooled_activations(model, tok, prompts, [0, 1], (1, 4, 100), batch_size=2, progress=False)
    for i, p in enumerate(prompts):
        hidden = _hidden(model, tok(p)["input_ids"], 1)
        for j, n in enumerate((1, 4, 100)):  # the mean of the last n prompt tokens (all of them when shorter)
            assert torch.allclose(pooled[1][i, j], hidden[-n:].mean(0), atol=1e-5)
    assert torch.equal(collect_activations(model, tok, prompts, [0, 1], batch_size=2, progress=False)[1],
                       pooled[1][:, 0])
    with pytest.raises(ValueError, match="pools: expected positive token counts"):
        collect_pooled_activations(model, tok, prompts, 0, (0,), progress=False)

    first = cached_anchor_activations(model, tok, prompts, [1, 0], model_name="tiny", pools=(1, 4), cache=tmp_path,
                                      progress=False)
    assert torch.allclose(first[1], pooled[1][:, :2], atol=1e-5)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    again = cached_anchor_activations(model, None, prompts, [0, 1], model_name="tiny", pools=(1, 4), cache=tmp_path)
    assert all(torch.equal(first[k], again[k]) for k in (0, 1))  # read back without running the model
    cached_anchor_activations(model, tok, prompts[:2], [0, 1], model_name="tiny", pools=(1, 4), cache=tmp_path,
                              progress=False)
    assert len(list(tmp_path.iterdir())) == 2  # other prompts, another key
    other = tiny_model("llama", seed=1)  # the same name and config, other weights: another key, not a stale read
    moved = cached_anchor_activations(other, tok, prompts, [0, 1], model_name="tiny", pools=(1, 4), cache=tmp_path,
                                      progress=False)
    assert len(list(tmp_path.iterdir())) == 3 and not torch.allclose(moved[1], first[1])
    cached_anchor_activations(model.to(torch.float64), tok, prompts, [0, 1], model_name="tiny", pools=(1, 4),
                              cache=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 4  # another dtype, another key


def test_recipe_with_layer_auto_fits_every_candidate_and_keeps_the_judges_choice(tmp_path):
    from finesteer.fitting import data as D
    from finesteer.fitting import defaults, recipes
    from tiny_models import tiny_model

    model = tiny_model("llama", num_hidden_layers=6)
    src = {s: D.Source(s, "user", "1", "f", "MIT") for s in ("h1", "h2", "b1", "b2")}
    targets = D.PromptSet("t", [f"how to do harm number {i}" for i in range(24)], ["h1"] * 12 + ["h2"] * 12, src)
    benign = D.PromptSet("b", [f"a kind question {i}?" for i in range(16)], ["b1"] * 8 + ["b2"] * 8, src)
    completions = {p: "no" for p in targets.prompts}
    seen = {}

    def judge(candidates):
        seen["candidates"] = candidates
        return 4, {"why": "the test's pick"}

    kwargs = dict(recipe="test", targets=targets, benign=benign, desired=completions,
                  undesired={p: "yes" for p in targets.prompts}, layer="auto", model_name="tiny",
                  activation_cache=str(tmp_path), progress=False,
                  options=recipes.FitOptions(n_target=24, n_benign=16, epochs=3, num_experts=1))
    with pytest.raises(ValueError, match="choose_layer"):
        recipes.fit_recipe(model, CharTokenizer(), **kwargs)
    steerer = recipes.fit_recipe(model, CharTokenizer(), choose_layer=judge, **kwargs)
    candidates = seen["candidates"]
    assert recipes.steering_candidates(6) == [3, 4] and sorted(candidates.steerers) == [3, 4]
    assert steerer.layer == 4 and steerer is candidates.steerers[4]
    assert candidates.steerers[3].layer == 3 and candidates.steerers[3].params.tau != steerer.params.tau
    t_cal, b_cal = candidates.anchors[3]
    assert len(t_cal) == len(candidates.target_calibration) and len(b_cal) == len(candidates.benign_calibration)
    assert set(candidates.gate_criterion) == {3, 4} and candidates.max_fpr == defaults.DEFAULT_MAX_FPR
    choice = steerer.metadata["layer_choice"]
    assert choice["why"] == "the test's pick" and choice["candidates"] == [3, 4]
    assert set(choice["gate_criterion"]["scores"]) == {"3", "4"}
    metrics = steerer.metadata["metrics"]
    assert metrics["gate"]["kind"] == defaults.DEFAULT_GATE and metrics["gate"]["rule"]["method"] == "max_fpr"
    assert set(metrics["transfer"]["per_source"]) == {"h1", "h2", "b1", "b2"}
    assert {r["side"] for r in metrics["transfer"]["per_source"].values()} == {"harmful", "benign"}
    assert len(list(tmp_path.iterdir())) == 1  # the anchor rows of both layers went to the activation cache
    bad = dict(kwargs, choose_layer=lambda c: (5, {}))
    with pytest.raises(ValueError, match="not one of the candidates"):
        recipes.fit_recipe(model, CharTokenizer(), **bad)
