"""`finesteer layers` end to end on the real SmolLM2-135M-Instruct, scaled down (tiny fits, two layers, two tokens):
one row per layer, the choice follows its rule, and only the recipe's calibration split is scored (never the test
split `finesteer eval` reports on). The op runs on the PyTorch backend (FINESTEER_BACKEND=torch)."""
from __future__ import annotations

import json

from finesteer import cli
from finesteer.fitting.recipes import FitOptions
from finesteer.fitting.held_out import held_out_prompts
from finesteer.studies.steer_layers import default_layers


def test_layers_study_scores_calibration_prompts_and_picks_the_best_steered_refusal(tmp_path, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    out = tmp_path / "results"
    code = cli.main(["layers", "--n-target", "24", "--n-benign", "16", "--sharegpt", "8", "--epochs", "15", "--quiet",
                     "--layers", "2,1", "--max-new-tokens", "2", "--cache-dir", str(tmp_path / "steerers"),
                     "--out", str(out)])
    assert code == 0
    results = json.loads((out / "layers.json").read_text())
    rows = results["rows"]
    assert [r["layer"] for r in rows] == [2, 1]
    for r in rows:
        assert all(0 <= r[k] <= 1 for k in ("gate_tpr", "gate_fpr", "refusal_steered", "refusal_unsteered"))
    assert len({r["refusal_unsteered"] for r in rows}) == 1  # one unsteered baseline for every layer
    best = max(rows, key=lambda r: (r["refusal_steered"], -r["layer"]))
    assert results["chosen"]["layer"] == best["layer"]
    calibration = held_out_prompts(FitOptions(n_target=24, n_benign=16, sharegpt=8), split="calibration")
    test = held_out_prompts(FitOptions(n_target=24, n_benign=16, sharegpt=8))
    assert results["data"]["harmful"]["n"] == len(calibration[0]) and results["data"]["split"] == "calibration"
    assert results["data"]["harmful"]["sources"] == calibration[0].counts()
    assert not set(calibration[0].prompts + calibration[1].prompts) & set(test[0].prompts + test[1].prompts)
    table = (out / "layers.md").read_text()
    assert f"| **{best['layer']}** |" in table and (out / "layers.png").stat().st_size > 1000


def test_default_layers_are_the_second_half_of_the_gate_studys_candidates():
    assert default_layers(30) == [15, 18, 21, 24, 27]
    assert default_layers(3) == [1]
