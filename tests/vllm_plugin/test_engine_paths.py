"""The plugin under vLLM's scheduler and parallelism, on a tiny random-weight Llama (4 heads of 64, so two tensor-parallel
ranks split them): preemption and recompute under a small KV cache, chunked prefill in both modes, and
tensor_parallel_size=2 equal to one process. Eager engines: these paths do not depend on the compile."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import finesteer
from finesteer_kernels import SteerParams
from engines import engine, reference_tokens

STEPS = 32
BASE = dict(max_model_len=128, block_size=32, enforce_eager=True, skip_tokenizer_init=True)
CHUNK = 32
CHUNKED = dict(BASE, max_num_batched_tokens=CHUNK)  # prompts split into 32-token chunks
# whole prompts (no chunking) and a KV cache of 5 blocks, too small for the batch: preemption and recompute
PREEMPTING = dict(BASE, max_num_batched_tokens=128, enable_chunked_prefill=False, num_gpu_blocks_override=5,
                  disable_log_stats=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=0)  # no EOS: fixed lengths
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(256, 2, generator=g))[0]
    steerers = {"gated": finesteer.Steerer(SteerParams(basis=basis, tau=0.03, experts=3 * torch.randn(2, 256, generator=g),
                                                       router_weight=torch.randn(256, 2, generator=g)), layer=1),
                "push": finesteer.Steerer(SteerParams(experts=3 * torch.randn(1, 256, generator=g)), layer=2)}
    files = tmp_path_factory.mktemp("tiny-steerers")
    for name, steerer in steerers.items():
        steerer.save(files / f"{name}.safetensors")
    return model, str(folder), files


def prompts():
    g = torch.Generator().manual_seed(2)
    lengths = [5, 9, 20, 70, 3, 40, 11, 90]  # 70 and 90 span several 32-token chunks
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]


NAMES = ["gated", None, "push", "gated", "push", None, "gated", "push"]


def run(llm, ids_list, names):
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, detokenize=False,
                             extra_args=None if n is None else {"steerer": n}) for n in names]
    return [list(o.outputs[0].token_ids) for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids_list],
                                                               params)]


def hf_reference(model, ids, file, mode):
    class Ids:  # reference_tokens takes a tokenizer; token ids need none
        def __call__(self, ids, **_):
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    return reference_tokens(model, Ids(), ids, file, mode=mode, max_tokens=STEPS)[0]


@pytest.fixture(scope="module")
def one_process(tiny, compile_cache):
    with engine({"FINESTEER_VLLM_STEERERS": str(tiny[2])}, compile_cache, model=tiny[1], **PREEMPTING) as llm:
        yield llm


def reference(model, files, ids, name, mode="query"):
    return hf_reference(model, ids, None if name is None else files / f"{name}.safetensors", mode)


def test_preemption_recompute_and_batching_equal_patch_model(one_process, tiny):
    model, _, files = tiny
    batch = prompts()
    got = run(one_process, batch, NAMES)
    assert got == [reference(model, files, ids, name) for ids, name in zip(batch, NAMES)]
    assert got == [run(one_process, [ids], [n])[0] for ids, n in zip(batch, NAMES)]  # each alone
    unsteered = run(one_process, batch, [None] * len(batch))
    assert any(a != b for a, b, n in zip(got, unsteered, NAMES) if n == "push")
    stats = {m.name: m for m in one_process.get_metrics()}
    assert stats["vllm:num_preemptions"].value > 0  # the small KV cache forced preemption and recompute


def test_tensor_parallel_two_ranks_equal_one_process(one_process, tiny, compile_cache):
    env = {"FINESTEER_VLLM_STEERERS": str(tiny[2]), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with engine(env, compile_cache, model=tiny[1], tensor_parallel_size=2, distributed_executor_backend="mp",
                **PREEMPTING) as tp:
        assert run(tp, prompts(), NAMES) == run(one_process, prompts(), NAMES)


def test_query_mode_under_chunked_prefill(tiny, compile_cache):
    """A prompt that fits in one chunk equals patch_model; a longer one runs, its chunks before the anchor's
    unsteered (docs/serving.md). Alone, so no other request shares the step's token budget."""
    model, folder, files = tiny
    with engine({"FINESTEER_VLLM_STEERERS": str(files)}, compile_cache, model=folder, **CHUNKED) as llm:
        for ids, name in zip(prompts(), NAMES):
            got = run(llm, [ids], [name])[0]
            if len(ids) <= CHUNK:
                assert got == reference(model, files, ids, name), (len(ids), name)
            else:
                assert len(got) == STEPS


def test_token_mode_under_chunked_prefill_equals_patch_model(tiny, compile_cache):
    """Token mode edits every row on its own hidden state, so chunking and batching change nothing."""
    model, folder, files = tiny
    with engine({"FINESTEER_VLLM_STEERERS": str(files), "FINESTEER_VLLM_MODE": "token"}, compile_cache,
                model=folder, **CHUNKED) as llm:
        got = run(llm, prompts(), NAMES)
    assert got == [reference(model, files, ids, name, "token") for ids, name in zip(prompts(), NAMES)]


@pytest.mark.parametrize("layer, d, message", [(9, 256, "act past the served model's 4 decoder layers"),
                                              (1, 32, "fitted for hidden size 32, but the served model has hidden "
                                                      "size 256")])
def test_a_steerer_that_does_not_fit_stops_start_up(tiny, compile_cache, tmp_path, capfd, layer, d, message):
    finesteer.Steerer(SteerParams(experts=torch.randn(1, d)), layer=layer).save(tmp_path / "bad.safetensors")
    with pytest.raises(Exception):
        with engine({"FINESTEER_VLLM_STEERERS": str(tmp_path)}, compile_cache, model=tiny[1], **CHUNKED):
            pass
    captured = capfd.readouterr()  # the worker's traceback, printed by vLLM's processes
    assert message in captured.out + captured.err
