"""The three kernels compile for Hopper (sm_90) without a GPU: bf16, d = 4096, the configurations the GPU heuristics
pick for prefill and decode. Asserts no register spills and tensor-core instructions (HGMMA/HMMA) in the prefill
configurations; prints registers and shared memory.

The kernels must be real JIT functions, not the interpreter's, so the compiling runs in a subprocess without
TRITON_INTERPRET (this file run as a script prints one JSON line per kernel configuration).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

D = 4096
SHAPES = {  # name: (r, K, m, k) of the packed layout; m = k = 0: no residual MLP
    "typical": (64, 8, 16, 8),  # FACTS.md's performance arithmetic
    "widest": (128, 32, 40, 16),  # largest acceptance sizes: W_in padded to 256 columns
    "caa": (0, 1, 0, 0),  # a plain control vector: no pass 1 at all
}
# (kernel, shape, rows, in_place, must use tensor cores, with a row mask)
CASES = [
    ("steer", "typical", 8192, False, True, False),  # prefill
    ("steer", "typical", 8192, True, True, False),
    ("steer", "typical", 8192, True, True, True),  # in place with padding rows masked out
    ("steer", "typical", 512, False, True, False),  # mid-size: 32-row tiles
    ("steer", "typical", 1, False, False, False),  # decode
    ("steer", "widest", 8192, False, True, False),
    ("steer", "widest", 1, False, False, False),
    ("steer", "caa", 8192, False, True, False),
    ("synthesize", "typical", 16, False, False, False),
    ("synthesize", "widest", 16, False, False, False),
    ("apply", "typical", 8192, False, True, False),
    ("apply", "typical", 64, False, False, False),
]


def _compile_all() -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from finesteer_kernels.apply_kernel import apply_kernel
    from finesteer_kernels.kernel_common import (INTERPRETING, W_IN_ALIGN, apply_config, coef_config, layout_of,
                                                 native_dot, padded)
    from finesteer_kernels.steer_kernel import steer_kernel
    from finesteer_kernels.synthesize_kernel import synthesize_kernel
    from op_cases import random_params

    assert not INTERPRETING
    triton_dir = os.path.dirname(triton.__file__)
    bin_dir = os.path.join(triton_dir, "backends", "nvidia", "bin")
    target = GPUTarget("cuda", 90, 32)
    layouts = {}
    for name, (r, K, m, k) in SHAPES.items():
        params = random_params(D, r, K, "relu" if m else None, m=m, k=k)
        packed = params.pack_centred(torch.bfloat16, "cpu", W_IN_ALIGN)
        layouts[name] = layout_of(packed, "relu")
    divisible = [["tt.divisibility", 16]]
    for kernel_name, shape, rows, in_place, needs_tc, keep in CASES:
        layout = layouts[shape]
        if kernel_name == "apply":
            fn, config = apply_kernel, apply_config(rows, D, interpreting=False)
            sig = dict(h_ptr="*bf16", out_ptr="*bf16", coef_ptr="*fp32", seq_ptr="*i64", w_out_ptr="*bf16",
                       n_rows="i32", n_seq="i32", d="i32")
            consts = dict(NC=layout.n_coef, NCP=padded(layout.n_coef), IN_PLACE=in_place)
            aligned = [0, 1, 2, 3, 4, 7]
        else:
            config = coef_config(rows, layout, interpreting=False)
            consts = layout.constexprs()
            if kernel_name == "steer":
                fn = steer_kernel
                sig = dict(h_ptr="*bf16", out_ptr="*bf16", w_in_ptr="*bf16", w_out_ptr="*bf16", mean_ptr="*fp32",
                           consts_ptr="*fp32", keep_ptr="*u8" if keep else "*fp32")
                consts.update(IN_PLACE=in_place, HAS_KEEP=keep)
                aligned = [0, 1, 2, 3, 4, 5, 6, 8]
            else:
                fn = synthesize_kernel
                sig = dict(h_ptr="*bf16", coef_ptr="*fp32", w_in_ptr="*bf16", mean_ptr="*fp32", consts_ptr="*fp32")
                aligned = [0, 1, 2, 3, 4, 6]
            sig.update(n_rows="i32", d="i32", tau="fp32", eps="fp32", scale="fp32")
        consts.update(NATIVE_DOT=native_dot(torch.bfloat16), BLOCK_T=config.BLOCK_T, BLOCK_D=config.BLOCK_D)
        sig.update({c: "constexpr" for c in consts})
        src = ASTSource(fn, sig, consts, attrs={(i,): divisible for i in aligned})  # the JIT's 16-byte alignment
        compiled = triton.compile(src, target=target,
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        with tempfile.TemporaryDirectory() as tmp:
            ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            ptxas = subprocess.run([os.path.join(bin_dir, "ptxas-blackwell"), "-v", "--gpu-name", "sm_90a", ptx,
                                    "-o", os.path.join(tmp, "v.cubin")], capture_output=True, text=True, check=True)
            sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True,
                                  text=True, check=True).stdout
        report = ptxas.stderr + ptxas.stdout
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
        print(json.dumps(dict(
            kernel=kernel_name, shape=shape, rows=rows, in_place=in_place, keep=keep, needs_tc=needs_tc,
            config=config._asdict(), registers=int(re.search(r"Used (\d+) registers", report).group(1)),
            spill_bytes=sum(spills), stack_bytes=int(re.search(r"(\d+) bytes stack frame", report).group(1)),
            shared_bytes=compiled.metadata.shared, hgmma=len(re.findall(r"\bHGMMA\b", sass)),
            hmma=len(re.findall(r"\bHMMA\b", sass)), ldg128=len(re.findall(r"LDG\.E\.128", sass)))), flush=True)


def test_kernels_compile_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__)),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(CASES)
    for res in results:
        print(f"{res['kernel']:>10} {res['shape']:>7} rows={res['rows']:<5} in_place={res['in_place']!s:<5} "
              f"row_mask={res['keep']!s:<5} "
              f"{res['config']} regs={res['registers']} spill={res['spill_bytes']}B stack={res['stack_bytes']}B "
              f"smem={res['shared_bytes']}B HGMMA={res['hgmma']} HMMA={res['hmma']} LDG.128={res['ldg128']}")
    for res in results:
        assert res["spill_bytes"] == 0, res
        assert res["registers"] <= 255, res
        if res["needs_tc"]:
            assert res["hgmma"] + res["hmma"] > 0, f"no tensor-core instructions: {res}"


if __name__ == "__main__":
    _compile_all()
