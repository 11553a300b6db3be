"""A query-mode decode step costs at most 2 top-level ATen ops per steered layer over the unpatched step on the CPU
backend (torch.profiler): the prefill cached each sequence's ``delta = coef @ W_out``, so a decode step only adds
it (`finesteer_kernels.apply_delta_`), and the hooks build no index tensors. The Triton backend (here the
interpreter) makes it one op per layer, the custom op ``finesteer::apply_delta_``."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from finesteer.patching import patch_model
from op_cases import random_params
from tiny_models import random_ids, tiny_model


def top_level_ops(fn) -> list:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.cpu_parent is None]


def decode_step_ops(model, handle_factory, with_mask: bool) -> tuple:
    """Top-level ops of one decode step of ``model`` (after a prefill), unpatched and patched, and the logits."""
    ids = random_ids(2, 5, seed=1)
    mask = torch.ones(2, 6, dtype=torch.long) if with_mask else None

    def run(patched: bool):
        handle = handle_factory(model) if patched else None
        try:
            with torch.no_grad():
                prefill = model(input_ids=ids, attention_mask=None if mask is None else mask[:, :5], use_cache=True)
                token = prefill.logits[:, -1:].argmax(-1)
                step = lambda: model(input_ids=token, cache=prefill.cache, attention_mask=mask,  # noqa: E731
                                     use_cache=True)
                step()  # warm: first calls may run one-time work
                prefill = model(input_ids=ids, attention_mask=None if mask is None else mask[:, :5], use_cache=True)
                ops = top_level_ops(step)
                return ops, step().logits
        finally:
            if handle is not None:
                handle.remove()

    plain_ops, plain_logits = run(False)
    patched_ops, patched_logits = run(True)
    return plain_ops, patched_ops, plain_logits, patched_logits


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layers", [(1,), (0, 1, 2)], ids=["1 layer", "3 layers"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no mask", "2-D mask"])
def test_query_decode_step_adds_at_most_two_ops_per_steered_layer(backend, layers, with_mask, monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", backend)
    model = tiny_model("llama")
    params = random_params(64, 4, 3, "relu", seed=2).replace(tau=0.0)  # gate open: every row is edited

    def patch(m):
        return patch_model(m, {layer: params for layer in layers}, mode="query")

    plain, patched, plain_logits, patched_logits = decode_step_ops(model, patch, with_mask)
    extra = len(patched) - len(plain)
    print(f"{backend} {len(layers)} layer(s): {len(plain)} ops unpatched, {len(patched)} patched (+{extra})")
    assert extra <= 2 * len(layers), sorted(set(patched) - set(plain))
    if backend == "triton":
        assert patched.count("finesteer::apply_delta_") == len(layers) and extra == len(layers)
    assert not torch.allclose(plain_logits, patched_logits)  # the step really was steered


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layers", [(1,), (0, 1, 2)], ids=["1 layer", "3 layers"])
def test_fused_norm_decode_step_adds_no_more_ops_than_the_separate_edit(backend, layers, monkeypatch):
    """fuse_norm (issue 14): on the Triton backend each steered layer's decode step is one op,
    ``finesteer::apply_delta_rmsnorm_``, in place of the next norm's own ops, so the patched step has fewer
    top-level ops than the unpatched one; on the torch backend the same count as the separate edit."""
    monkeypatch.setenv("FINESTEER_BACKEND", backend)
    model = tiny_model("llama")
    params = random_params(64, 4, 3, "relu", seed=2).replace(tau=0.0)
    steerers = {layer: params for layer in layers}
    plain, separate, _, separate_logits = decode_step_ops(
        model, lambda m: patch_model(m, steerers, mode="query"), with_mask=True)
    _, fused, _, fused_logits = decode_step_ops(
        model, lambda m: patch_model(m, steerers, mode="query", fuse_norm=True), with_mask=True)
    print(f"{backend} {len(layers)} layer(s): {len(plain)} ops unpatched, {len(separate)} separate, {len(fused)} fused")
    assert len(fused) <= len(separate)
    if backend == "triton":
        assert fused.count("finesteer::apply_delta_rmsnorm_") == len(layers) and len(fused) < len(plain)
    torch.testing.assert_close(fused_logits, separate_logits, rtol=1e-5, atol=1e-5)
