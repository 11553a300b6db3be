"""The one layer criterion (`finesteer.studies.steer_layers`): ``--layer auto`` in fit, demo and eval and
`finesteer layers` all keep the candidate layer with the most steered refusals on the recipe's calibration
prompts. End to end on the real SmolLM2-135M-Instruct, scaled down (tiny fits, two layers, two tokens); the rule
itself on made-up rows. The op runs on the PyTorch backend (FINESTEER_BACKEND=torch)."""
from __future__ import annotations

import json

import pytest

from finesteer import cli
from finesteer.fitting.held_out import held_out_prompts
from finesteer.fitting.recipes import FitOptions
from finesteer.studies.steer_layers import choose, default_layers


def _row(layer, refusal, fpr=0.02, criterion=0.8):
    return {"layer": layer, "refusal_steered": refusal, "gate_fpr": fpr, "gate_criterion": criterion}


def test_choose_prefers_steered_refusal_then_the_gate_criterion_then_the_earlier_layer():
    rows = [_row(15, 0.90, criterion=0.80), _row(27, 0.25, criterion=0.86), _row(21, 0.74)]
    assert choose(rows, 0.03)["layer"] == 15  # the gate criterion alone would take 27
    tied = [_row(18, 0.9, criterion=0.80), _row(24, 0.9, criterion=0.85)]
    assert choose(tied, 0.03)["layer"] == 24  # tie on refusal: the gate criterion breaks it
    assert choose([_row(24, 0.9), _row(18, 0.9)], 0.03)["layer"] == 18  # full tie: the earlier layer
    # a layer whose gate lets too many benign calibration prompts through is out, whatever it refuses
    assert choose([_row(15, 0.95, fpr=0.20), _row(18, 0.80)], 0.03)["layer"] == 18
    assert choose([_row(15, 0.95, fpr=0.20), _row(18, 0.80, fpr=0.10)], 0.03)["layer"] == 15  # none within: all
    assert choose([_row(15, 0.95, fpr=0.05), _row(18, 0.80, fpr=0.02)], None)["layer"] == 18  # logistic: 3 %


def test_layers_study_scores_calibration_prompts_and_picks_the_best_steered_refusal(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    out = tmp_path / "results"
    code = cli.main(["layers", "--n-target", "24", "--n-benign", "16", "--sharegpt", "8", "--epochs", "15", "--quiet",
                     "--layers", "2,1", "--max-new-tokens", "2", "--cache-dir", str(tmp_path / "steerers"),
                     "--out", str(out)])
    assert code == 0
    results = json.loads((out / "layers.json").read_text())
    rows = results["rows"]
    assert [r["layer"] for r in rows] == [1, 2]
    for r in rows:
        assert all(0 <= r[k] <= 1 for k in ("gate_tpr", "gate_fpr", "refusal_steered", "refusal_unsteered"))
        assert 0 <= r["gate_criterion"] <= 1
    assert len({r["refusal_unsteered"] for r in rows}) == 1  # one unsteered baseline for every layer
    assert results["chosen"]["layer"] == choose(rows, 0.03)["layer"]
    calibration = held_out_prompts(FitOptions(n_target=24, n_benign=16, sharegpt=8), split="calibration")
    test = held_out_prompts(FitOptions(n_target=24, n_benign=16, sharegpt=8))
    assert results["data"]["harmful"]["n"] == len(calibration[0]) and results["data"]["split"] == "calibration"
    assert results["data"]["harmful"]["sources"] == calibration[0].counts()
    assert not set(calibration[0].prompts + calibration[1].prompts) & set(test[0].prompts + test[1].prompts)
    table = (out / "layers.md").read_text()
    assert f"| **{results['chosen']['layer']}** |" in table and (out / "layers.png").stat().st_size > 1000


def test_fit_layer_auto_uses_the_steering_judge_and_records_why(tmp_path, monkeypatch):
    """`finesteer fit --layer auto` keeps the judge's layer and writes its evidence into the file's metadata."""
    from finesteer import Steerer
    from finesteer.fitting import recipes

    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    monkeypatch.setattr(recipes, "steering_candidates", lambda n_layers: [1, 2])  # two cheap layers, not 15-27
    path = tmp_path / "auto.safetensors"
    code = cli.main(["fit", "--layer", "auto", "--n-target", "24", "--n-benign", "16", "--sharegpt", "8",
                     "--epochs", "5", "--num-experts", "1", "--quiet", "--out", str(path)])
    assert code == 0
    steerer = Steerer.load(path)
    choice = steerer.metadata["layer_choice"]
    assert choice["candidates"] == [1, 2] and choice["chosen"] == steerer.layer
    assert [r["layer"] for r in choice["rows"]] == [1, 2]
    assert steerer.layer == choose(choice["rows"], steerer.metadata["options"]["max_fpr"])["layer"]
    assert choice["data"]["split"] == "calibration" and f"layer {steerer.layer}" in choice["why"]
    assert set(choice["gate_criterion"]["scores"]) == {"1", "2"}


def test_default_layers_are_the_second_half_of_the_gate_studys_candidates():
    assert default_layers(30) == [15, 18, 21, 24, 27]
    assert default_layers(3) == [1]
