"""`patch_model`: steer a transformers causal LM at the output of some decoder layers, in forward and generate.

Each patched layer gets a forward hook on its output (registered first, so ``output_hidden_states`` records the
steered values). The module that owns the layer list gets a forward pre-hook that notes, once per forward, the
attention mask and how many tokens the cache already holds; from those and the number of new tokens the layer hook
tells a prefill from a decode step; a forward hook on the same module forgets them when the forward ends, so a
layer called on its own afterwards is not steered with a finished forward's mask. A cache that keeps its length in a
device tensor (a static cache) is not read: the handle counts the tokens fed to each cache object instead, in
forward and generate alike. All state (the per-sequence coefficients of query mode, the token counts) lives on the
`PatchHandle` and is dropped by `PatchHandle.remove`.

Threads: one patch serves one thread at a time. A forward, layer call or ``generate`` entering from a second thread
while another thread's is running raises RuntimeError, and so does a query-mode decode step in a thread other than
the one whose prefill made the cached coefficients; patch one model copy per thread instead.

Query mode (the paper's): a prefill synthesises ``coef`` at each row's anchor, the last non-padding token of the
prompt, caches ``coef`` and the per-sequence edit ``delta = coef @ W_out`` and adds delta to every non-padding
position; a decode step is then one op per steered layer, ``h + delta`` (`finesteer_kernels.apply_delta_`). Inside
``model.generate`` the prompt is what ``generate`` was given, so ``use_cache=False`` (which recomputes the whole
sequence every step) and assisted decoding keep the prompt's anchor. Token mode: every position gates and routes on
its own hidden state. See docs/patching.md.

The hooks only look at shapes, never at tensor values, so they do not synchronise with the device.

Modules: `patch` (`patch_model`, `unpatch_model`), `handle` (`PatchHandle`: the hooks and the query-mode state),
`forward_context` (what a forward looks like: mask, cache length, prefill or decode, anchors), `placement` (steerers
checked and moved to their layer's device), `fused_norm` (``fuse_norm=True``: the edit inside the next RMSNorm),
`bank` (`SteererBank`, `BankHandle`: a steerer per row or request), `continuous` (a bank inside transformers'
continuous batching), `wrappers` (instance methods wrapped so that they come off in any order).
"""
from .layers import find_decoder_layers
from .bank import BankHandle, SteererBank
from .handle import MODES, PatchHandle
from .patch import patch_model, unpatch_model

__all__ = ["patch_model", "unpatch_model", "PatchHandle", "BankHandle", "SteererBank", "find_decoder_layers",
           "MODES"]
