"""The README's "Serve many users" example is examples/serve_many.py, and it runs: every user gets the same tokens
from generate and from continuous batching."""
import os
import re
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_many_example_is_the_readme_section_and_runs(capsys, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    script = open(os.path.join(ROOT, "examples", "serve_many.py"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Serve many users", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1).strip()
    assert block == script.split('"""', 2)[2].strip()
    runpy.run_path(os.path.join(ROOT, "examples", "serve_many.py"), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if "generate [" in line]
    assert len(lines) == 3
    for line in lines:
        generated, served = re.findall(r"\[[\d, ]+\]", line)
        assert generated == served, line
