"""The README's first example as a script (tests/test_examples.py checks that both hold the same code, and runs it)."""
import tempfile

import torch

import finesteer
from finesteer_kernels import SteerParams, apply_coef, steer, synthesize

d = 64
torch.manual_seed(0)
params = SteerParams(
    basis=torch.linalg.qr(torch.randn(d, 4))[0],   # gate subspace S (d x r, orthonormal)
    mean=torch.zeros(d), tau=0.5,                   # steer rows with >= 50 % of their centred energy in span(S)
    experts=torch.randn(3, d),                      # K = 3 steering experts
    router_weight=torch.randn(d, 3) / 8, router_bias=torch.zeros(3),
    alpha=2.0,
)
h = torch.randn(2, 10, d)                           # (batch, tokens, hidden)
h[:, 3] = 5 * params.basis[:, 0]                    # token 3 lies in the gate subspace
out = steer(h, params)                              # token mode: every row gates and routes on itself
print("rows changed per sequence:", (out != h).any(-1).sum(-1).tolist())

coef = synthesize(h[:, -1], params)                 # query mode: decide once from the anchor (last) row ...
rows = torch.arange(2)[:, None].expand(2, 10)       # ... (row i of h belongs to sequence rows[i]) ...
out_q = apply_coef(h, coef, params, rows)           # ... and add that vector to every row of the sequence
print("query-mode gate per sequence:", (coef.abs().sum(-1) > 0).tolist())

steerer = finesteer.Steerer(params=params, layer=12, model="example")
with tempfile.TemporaryDirectory() as tmp:
    steerer.save(f"{tmp}/example.safetensors")
    print(finesteer.Steerer.load(f"{tmp}/example.safetensors"))
