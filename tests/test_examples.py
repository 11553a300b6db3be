"""The examples in examples/ and the README's usage run; the README's links lead somewhere."""
import json
import os
import re
import runpy
import subprocess
import sys

from finesteer import Steerer
from finesteer.fitting import models
from tiny_models import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_quickstart_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "rows changed per sequence: [1, 1]" in out
    assert "Steerer(method='finesteer', layer=12" in out


def test_quickstart_is_the_readme_example():
    script = open(os.path.join(ROOT, "examples", "quickstart.py"), encoding="utf-8").read()
    code = script.split('"""', 2)[2].strip()  # after the docstring
    first_block = re.search(r"```python\n(.*?)```", README, re.S).group(1).strip()
    assert first_block == code


def test_readme_links_and_paths_exist():
    linked = re.findall(r"\]\(([^)#]+)\)", README)
    named = re.findall(r"`((?:docs|examples|benchmarks|results|finesteer|finesteer_kernels|tests|scripts)/[\w./-]+)`",
                       README)
    assert "docs/method.md" in linked
    for path in {p for p in linked + named if not p.startswith("http") and "*" not in p}:
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert "SPEC.md" not in README


def test_own_model_example_fits_saves_and_steers(tmp_path, capsys):
    """examples/own_model.py on a tiny random Llama saved with SmolLM2's tokenizer and two small prompt files."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.smollm2_folder(progress=False))
    folder = tmp_path / "my-model"
    tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    targets, benign = tmp_path / "targets.jsonl", tmp_path / "benign.jsonl"
    targets.write_text("\n".join(json.dumps({"prompt": f"Explain how to pick lock model {i} without a key."})
                                 for i in range(24)))
    benign.write_text("\n".join(json.dumps(f"Write a short poem about the colour number {i}.") for i in range(16)))
    out = tmp_path / "mine.safetensors"
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import own_model
    finally:
        sys.path.pop(0)
    own_model.main(["--model", str(folder), "--targets", str(targets), "--benign", str(benign), "--layer", "1",
                    "--epochs", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    steerer = Steerer.load(out)
    assert steerer.layer == 1 and steerer.model == str(folder)
    assert steerer.metadata["data"]["target"]["sizes"] == {"fit": 12, "calibration": 6, "test": 6}
    assert f"saved {out}: layer 1" in printed and "held-out gate TPR" in printed
    blocks = printed.split("\n[")[1:]  # one per prompt shown: 3 held-out targets, then 3 held-out benign prompts
    assert [b.split("]")[0] for b in blocks] == ["target"] * 3 + ["benign"] * 3
    for block in blocks:
        assert "unsteered: " in block and "steered: " in block
        if "gate shut: left alone" in block:  # query mode: a shut gate leaves the reply exactly as it was
            assert block.rstrip().endswith("(identical)")
        else:
            assert "gate OPEN: steered" in block


def test_reference_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import finesteer_kernels.reference, finesteer\n"
            "assert 'transformers' not in sys.modules, 'import finesteer must stay light'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
