"""pytest-benchmark set-up for ``pytest benchmarks/ --benchmark-only``.

The benchmark files are collected only when asked for (``--benchmark-only``, or a path inside benchmarks/ on the
command line), so a bare ``pytest`` at the repository root stays the test suite. On a CPU the benchmarks use one
intra-op thread (the machine is shared; a second OpenMP thread waiting for a busy core turns microseconds into
milliseconds) and never run the Triton kernels (the interpreter is not timed).
"""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
HERE = Path(__file__).resolve().parent


def _requested(config) -> bool:
    if config.getoption("benchmark_only", default=False):
        return True
    for arg in config.invocation_params.args:
        path = Path(str(arg).split("::")[0])
        if path.exists() and (path.resolve() == HERE or HERE in path.resolve().parents):
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and collection_path.suffix == ".py" and not _requested(config):
        return True
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(1)
    return torch.device("cpu")
