"""The examples in examples/ and the README's usage run."""
import os
import runpy
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "rows changed per sequence: [1, 1]" in out
    assert "Steerer(method='finesteer', layer=12" in out


def test_reference_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import finesteer_kernels.reference, finesteer\n"
            "assert 'transformers' not in sys.modules, 'import finesteer must stay light'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
