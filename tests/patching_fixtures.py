"""Fixtures and the model cache shared by the test files that patch tiny models. A test file imports the fixtures
it wants (``from patching_fixtures import get_model, one_thread, no_patch_left_behind``): pytest then applies the
autouse ones to that file only."""
import pytest
import torch

from finesteer import unpatch_model
from tiny_models import tiny_model

_MODELS: dict = {}  # one tiny model per architecture, shared by those files; tests leave them unpatched


def get_model(arch: str) -> torch.nn.Module:
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch)
    return _MODELS[arch]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all thread overhead: on the shared 2-core machine one thread runs them several times
    faster. Restored after the file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_patch_left_behind():
    yield
    for arch, model in _MODELS.items():
        assert unpatch_model(model) == 0, f"{arch}: a test left a FineSteer patch behind"


@pytest.fixture
def torch_backend(monkeypatch):
    """The exact torch reference, and fast under TRITON_INTERPRET (request it, or mark a file with it)."""
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
