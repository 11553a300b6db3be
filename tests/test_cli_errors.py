"""The command line's bad-input path: every expected error is one line ``finesteer: ...`` on stderr with a non-zero
exit status, found before anything expensive runs (no model is loaded: `load_model` fails the test if called);
``--debug`` and ``FINESTEER_DEBUG=1`` show the traceback instead. The options are checked against a tiny model
folder (3 layers, hidden size 64), read from its config.json only."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from finesteer import Steerer, SteerParams, cli
from finesteer.fitting import models
from tiny_models import save_word_tokenizer, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with a tiny model's config, weights and tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama").save_pretrained(folder)
    save_word_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def untokenized(tmp_path_factory):
    """A model folder without tokenizer files."""
    folder = tmp_path_factory.mktemp("no-tokenizer")
    tiny_model("llama").save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def nothing_expensive(monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.delenv("FINESTEER_DEBUG", raising=False)


def one_line_error(argv: list, capsys) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("finesteer: "), captured.err
    assert captured.out == ""
    return lines[0]


FIT_CASES = [  # {tmp}: an empty folder, {model}: the tiny model folder, {untokenized}: one without tokenizer files
    (["--out", "{tmp}/missing/s.safetensors"], "--out: cannot write .* the folder .*missing' does not exist"),
    (["--out", "{tmp}/notes.txt/s.safetensors"], "--out: cannot write .*: '.*notes.txt' is a file, not a folder"),
    (["--out", "{tmp}/notes.txt/deeper/s.safetensors"], "--out: cannot write .*: '.*notes.txt' is a file"),
    (["--model", "{untokenized}"], "--model: '.*no-tokenizer.*' holds no tokenizer that transformers can load "
                                   r"\(Couldn't instantiate .*\); copy the model's tokenizer files"),
    (["--targets", "{tmp}/binary.jsonl"], "--targets: '.*binary.jsonl' is not UTF-8 text .byte 0xf8 at offset 1.; "
                                          "expected a JSONL file"),
    (["--benign", "{tmp}/binary.jsonl"], "--benign: '.*binary.jsonl' is not UTF-8 text"),
    (["--out", "{tmp}"], "--out: .* is a folder"),
    (["--report", "{tmp}/missing/r.json"], "--report: cannot write"),
    (["--layer", "3"], r"--layer: index 3 out of range for a model with 3 decoder layers \(0..2\)"),
    (["--layer", "-1"], "--layer: expected a non-negative int"),
    (["--model", "{tmp}/no-such-model"], "--model: '.*no-such-model' does not exist"),
    (["--n-benign", "6"], "--n-benign: 6 prompts cannot be split .* use at least 9$"),
    (["--n-benign", "5"], "n_target, n_benign: need at least 12 targets and 6 benign"),
    (["--recipe", "truthfulness"], "--qa: required with --recipe truthfulness"),
    (["--targets", "{tmp}/none.jsonl"], "--targets: no such file"),
    (["--res-rank", "-1"], "--res-rank: expected an integer >= 0, got -1"),
    (["--alpha", "inf"], "--alpha: expected a finite number"),
]

EVAL_DEMO_CASES = [  # {out}: an eval output folder, {file}: a plain file, {steerers}: small steerer files
    (["eval", "--alphas", "1,x"], r"--alphas: expected comma-separated numbers, got '1,x'"),
    (["eval", "--alphas", "0.5,-1"], "--alphas: expected comma-separated positive finite strengths"),
    (["eval", "--methods", "none,caa,foo"], "--methods: unknown 'foo'; expected a comma-separated subset"),
    (["eval", "--methods", "caa,cast"], "--methods: must include 'none'"),
    (["eval", "--limit", "0"], "--limit: expected an integer >= 1, got 0"),
    (["eval", "--layer", "7"], "--layer: index 7 out of range"),
    (["eval", "--n-benign", "6"], "--n-benign: 6 prompts cannot be split"),
    (["eval", "--cache-dir", "{file}/sub"], "--cache-dir: cannot create the folder"),
    (["eval", "--out", "{file}"], "--out: .* is a file; give a folder"),
    (["demo", "--steerer", "{steerers}/missing.safetensors"], "--steerer: no such file"),
    (["demo", "--steerer", "{steerers}/narrow.safetensors"],
     "--steerer: .* fitted for hidden size 32, but .* has hidden size 64"),
    (["demo", "--steerer", "{steerers}/deep.safetensors"], r"--steerer: .* steers layer 5, but .* has layers 0..2"),
    (["demo", "--steerer", "{steerers}/one-past.safetensors"], r"--steerer: .* steers layer 3, but .* has layers 0..2"),
    (["demo", "--show", "0"], "--show: expected an integer >= 1"),
    (["demo", "--alpha", "-1"], "--alpha: expected a positive strength, got -1.0"),
    (["demo", "--alpha", "nan"], "--alpha: expected a finite number"),
    (["transfer", "--gates", "scs,foo"], "--gates: expected a comma-separated subset of scs,contrastive,linear"),
    (["transfer", "--cap", "0"], "--cap: expected an integer >= 1, got 0"),
    (["transfer", "--max-fpr", "1.5"], r"--max-fpr: expected a share in \[0, 1\), got 1.5"),
    (["transfer", "--out", "{file}"], "--out: .* is a file; give a folder"),
    (["layers", "--layers", "1,3"], r"--layers: index 3 out of range for a model with 3 decoder layers"),
    (["layers", "--layers", "1,1"], "--layers: expected distinct decoder layer indices"),
    (["layers", "--layers", "1,x"], "--layers: expected comma-separated decoder layer indices"),
    (["layers", "--alpha", "0"], "--alpha: expected a positive strength, got 0.0"),
    (["layers", "--max-new-tokens", "0"], "--max-new-tokens: expected an integer >= 1, got 0"),
    (["layers", "--out", "{file}"], "--out: .* is a file; give a folder"),
]


@pytest.fixture(scope="module")
def steerers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("steerers")
    Steerer(SteerParams(experts=torch.ones(1, 32)), layer=1, model="other").save(folder / "narrow.safetensors")
    Steerer(SteerParams(experts=torch.ones(1, 64)), layer=5, model="other").save(folder / "deep.safetensors")
    Steerer(SteerParams(experts=torch.ones(1, 64)), layer=3, model="other").save(folder / "one-past.safetensors")
    return str(folder)


@pytest.mark.parametrize("args, expected", FIT_CASES, ids=[" ".join(a) for a, _ in FIT_CASES])
def test_fit_errors_are_one_line_and_come_before_the_model_loads(args, expected, tiny, untokenized, tmp_path,
                                                                capsys):
    inputs = {"notes.txt": b"not a folder", "binary.jsonl": b"\x00\xf8\xff{}"}
    for name, content in inputs.items():
        (tmp_path / name).write_bytes(content)
    args = [a.format(tmp=tmp_path, untokenized=untokenized) for a in args]
    defaults = {"--model": tiny, "--out": f"{tmp_path}/s.safetensors"}
    extra = [x for option, value in defaults.items() if option not in args for x in (option, value)]
    line = one_line_error(["fit", *args, *extra], capsys)
    assert re.search(expected, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(inputs)  # nothing was written


@pytest.mark.parametrize("argv, expected", EVAL_DEMO_CASES, ids=[" ".join(a) for a, _ in EVAL_DEMO_CASES])
def test_eval_and_demo_errors_are_one_line_and_come_before_the_model_loads(argv, expected, tiny, steerers, tmp_path,
                                                                          capsys):
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file", steerers=steerers) for a in argv]
    extra = ["--out", str(tmp_path / "results")] if argv[0] in ("eval", "transfer", "layers") and "--out" not in argv else []
    line = one_line_error([*argv, "--model", tiny, *extra], capsys)
    assert re.search(expected, line), line
    assert not (tmp_path / "results").exists()


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    argv = ["fit", "--out", str(tmp_path / "missing" / "s.safetensors")]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(FileNotFoundError, match="--out: cannot write"):
            cli.main(debug_argv)
    monkeypatch.setenv("FINESTEER_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="--out: cannot write"):
        cli.main(argv)


def test_unexpected_errors_say_so_and_point_at_debug(monkeypatch, capsys):
    from finesteer.cli import preflight

    monkeypatch.setattr(preflight, "evaluation", lambda args, methods: {}["a bug"])
    line = one_line_error(["eval"], capsys)
    assert line == ("finesteer: unexpected KeyError: 'a bug' (run with --debug or FINESTEER_DEBUG=1 for the "
                    "traceback)")


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    """A KeyboardInterrupt raised inside a command (here from the preflight) ends with status 130, the shell's
    convention for SIGINT, and one line; --debug lets it propagate."""
    from finesteer.cli import preflight

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preflight, "evaluation", interrupted)
    capsys.readouterr()
    assert cli.main(["eval"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "finesteer: interrupted\n" and captured.out == ""
    with pytest.raises(KeyboardInterrupt):
        cli.main(["eval", "--debug"])


def test_a_finished_fit_is_kept_when_out_cannot_be_written_any_more(tiny, tmp_path, monkeypatch, capsys):
    """The --out folder removed while the fit ran: the fitted steerer goes to a temporary file, and the one error
    line says where, rather than losing minutes of work."""
    from finesteer.fitting import recipes

    out = tmp_path / "results" / "s.safetensors"
    out.parent.mkdir()
    fitted = Steerer(SteerParams(experts=torch.ones(1, 64)), layer=1, model="tiny",
                     metadata={"timings": {}, "recipe": "safety"})

    def fit_while_the_folder_goes(*args, **kwargs):
        out.parent.rmdir()
        return fitted

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(recipes, "run_recipe", fit_while_the_folder_goes)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    line = one_line_error(["fit", "--model", tiny, "--out", str(out), "--quiet"], capsys)
    match = re.fullmatch(r"finesteer: --out: cannot write '.*s.safetensors' \(.*\); the fitted steerer was saved to "
                         r"'(.*)' instead", line)
    assert match, line
    rescued = Steerer.load(match.group(1))
    assert torch.equal(rescued.params.experts, fitted.params.experts) and rescued.layer == 1


def test_a_real_process_prints_one_line_and_exits_non_zero(tmp_path):
    """Through the installed entry point's code path in a fresh interpreter: stderr is exactly one line."""
    argv = [sys.executable, "-m", "finesteer.cli", "fit", "--out", str(tmp_path / "missing" / "s.safetensors")]
    env = {k: v for k, v in os.environ.items() if k != "FINESTEER_DEBUG"}
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"finesteer: --out: cannot write '{tmp_path}/missing/s.safetensors': "
                                        f"the folder '{tmp_path}/missing' does not exist"]
    debug = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**env, "FINESTEER_DEBUG": "1"},
                           timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["eval"], ["fit"], ["transfer"], ["layers"]])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--debug" in text
    for markup in ("**", "``", "`", "(default: None)"):
        assert markup not in text, (command, markup)


def test_split_sizes_names_the_nearest_size_that_works():
    """Per-source rounding can leave a part empty at a size above the smallest that works; the error then names the
    nearest size that does (three benign sources of 150: 9 fails, 10 works; the default pools have no such gap)."""
    from finesteer.cli import preflight
    from finesteer.fitting import data
    from finesteer.fitting.recipes import FitOptions

    harmful = data.harmful_prompts()
    benign = data.combine("benign", data.rho_benign(), data.rho_overrefusal(),
                          data.sharegpt(limit=150, exclude=[harmful]))
    with pytest.raises(ValueError, match=r"--n-benign: 9 prompts .* use 10 \(the nearest size that works; the "
                                         r"smallest is 7\)"):
        preflight.split_sizes(FitOptions(n_target=400, n_benign=9), harmful, benign)
    preflight.split_sizes(FitOptions(n_target=400, n_benign=10), harmful, benign)
