"""A repeng-style control model with FineSteer's op underneath: how another steering library plugs in.

repeng's ``ControlModel`` replaces chosen decoder layers by wrappers that add ``coeff * direction`` to the layer's
output at every non-padding position. This ``ControlModel`` keeps that interface (``set_control``, ``reset``,
``unwrap``, calls and ``generate`` go to the model) but uses forward hooks instead of wrappers (transformers 5
records hidden states with hooks of its own; wrapping a layer breaks that) and lets the op do the arithmetic:
``finesteer_kernels.synthesize`` makes the per-sequence coefficient, ``finesteer_kernels.apply_coef`` adds it to
every row, with padding rows mapped to -1 so they stay untouched.

It also shows the control-vector round trip: directions read repeng-style (mean difference of two prompts' last
hidden states at each layer) -> a GGUF control vector (the file llama.cpp's ``--control-vector`` reads) -> FineSteer
steerers -> the control model.

    python examples/repeng_style_control.py                 # a tiny random Llama, offline, in a second
    python examples/repeng_style_control.py --model DIR     # a transformers model folder with its tokenizer
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

import finesteer_kernels
from finesteer import Steerer
from finesteer.interop.interchange import export_gguf, import_gguf, import_vectors
from finesteer.patching.layers import find_decoder_layers


class ControlModel:
    """repeng's ControlModel interface on forward hooks and FineSteer's op.

    Layer ``i`` is ``find_decoder_layers(model)[i]`` and the control is added to its output, as in repeng (negative
    ids count from the end). The 2-D ``attention_mask`` of each forward call (passed by keyword, as ``generate``
    and tokenizer outputs do) says which positions are padding; without one every position is steered.
    """

    def __init__(self, model: torch.nn.Module, layer_ids):
        layers = find_decoder_layers(model)
        self.model = model
        self.layer_ids = sorted({i if i >= 0 else len(layers) + i for i in layer_ids})
        if not all(0 <= i < len(layers) for i in self.layer_ids):
            raise ValueError(f"layer_ids: {list(layer_ids)} out of range for {len(layers)} decoder layers")
        self._params: dict[int, finesteer_kernels.SteerParams] = {}
        self._mask = None
        self._handles = [model.register_forward_pre_hook(self._remember_mask, with_kwargs=True)]
        # prepend=True: steer before transformers' own recording hooks, so output_hidden_states shows the edit
        self._handles += [layers[i].register_forward_hook(self._steer_hook(i), prepend=True) for i in self.layer_ids]

    # ---- repeng's interface ----------------------------------------------------------------------------------
    def set_control(self, control, coeff: float = 1.0) -> None:
        """``control``: ``{layer: Steerer}`` (from `import_gguf` / `import_vectors`) or ``{layer: vector}``
        (repeng's ``ControlVector.directions``); it must cover every controlled layer. ``coeff`` scales it
        (negative inverts it), as repeng's ``coeff``."""
        if control and not isinstance(next(iter(control.values())), Steerer):
            control = import_vectors(control)
        missing = [i for i in self.layer_ids if i not in control]
        if missing:
            raise ValueError(f"control: no vector for controlled layers {missing}")
        device = next(self.model.parameters()).device
        self._params = {i: control[i].params.replace(alpha=coeff * control[i].params.alpha).to(device)
                        for i in self.layer_ids}

    def reset(self) -> None:
        self._params = {}

    def unwrap(self) -> torch.nn.Module:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # ---- hooks -----------------------------------------------------------------------------------------------
    def _remember_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _steer_hook(self, layer: int):
        def hook(module, args, output):
            params = self._params.get(layer)
            if params is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            batch, new_tokens, _ = h.shape
            rows = torch.arange(batch, device=h.device)[:, None].expand(batch, new_tokens)
            if self._mask is not None:  # the mask covers cached + new tokens; the new ones are its last columns
                rows = torch.where(self._mask[:, -new_tokens:].to(h.device) != 0, rows, -1)
            coef = finesteer_kernels.synthesize(h[:, -1], params)  # (batch, 1) = coeff for a control vector
            steered = finesteer_kernels.apply_coef(h, coef, params, rows)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        return hook


# ---- the demo ------------------------------------------------------------------------------------------------
def tiny_llama() -> torch.nn.Module:
    """A random-weight 3-layer Llama built from a config (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def last_token_hiddens(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """``[output of decoder layer i at the last position]`` for every layer i (hidden_states[i + 1])."""
    out = model(ids, output_hidden_states=True)
    return [h[0, -1] for h in out.hidden_states[1:]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a transformers model folder (default: a tiny random Llama)")
    parser.add_argument("--coeff", type=float, default=4.0, help="control strength (repeng's coeff)")
    parser.add_argument("--new-tokens", type=int, default=5, help="tokens to generate per prompt")
    args = parser.parse_args(argv)

    tokenizer = None
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        encode = lambda text: tokenizer(text, return_tensors="pt").input_ids  # noqa: E731
        model_hint = model.config.model_type
    else:
        model = tiny_llama()
        g = torch.Generator().manual_seed(1)
        encode = lambda text: torch.randint(3, 128, (1, 6 + len(text) % 5), generator=g)  # noqa: E731
        model_hint = "llama"
    n_layers = len(find_decoder_layers(model))
    controlled = list(range(1, n_layers))  # llama.cpp cannot steer layer 0, so neither does its file

    with torch.no_grad():
        # 1. directions, repeng-style: positive minus negative last-token hidden state, layer by layer
        pos = last_token_hiddens(model, encode("I am overjoyed, this is the best day of my life"))
        neg = last_token_hiddens(model, encode("I am miserable, this is the worst day of my life"))
        directions = {i: pos[i] - neg[i] for i in controlled}

        # 2. through a GGUF control vector file and back
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "happy.gguf")
            export_gguf(import_vectors(directions, model_hint=model_hint), path)
            steerers = import_gguf(path, model=model)
        exact = all(torch.equal(steerers[i].params.experts[0], directions[i].float()) for i in controlled)
        print(f"GGUF round trip of layers {controlled}: {'exact' if exact else 'NOT exact'}")

        # 3. a left-padded batch of two prompts through the control model
        a, b = encode("Tell me about your day."), encode("How do you feel?")
        width = max(a.shape[1], b.shape[1])
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for row, seq in enumerate((a[0], b[0])):
            ids[row, width - len(seq):], mask[row, width - len(seq):] = seq, 1
        control_model = ControlModel(model, controlled)
        base = control_model(ids, attention_mask=mask).logits
        control_model.set_control(steerers, coeff=args.coeff)
        steered = control_model(ids, attention_mask=mask).logits
        control_model.set_control(steerers, coeff=-args.coeff)
        inverted = control_model(ids, attention_mask=mask).logits
        real, pads = mask.bool(), ~mask.bool()
        print(f"coeff=+{args.coeff:g}: max |logit change| on real tokens {(steered - base)[real].abs().max():.3f}, "
              f"on padding {(steered - base)[pads].abs().max():.3g}")
        print(f"coeff=-{args.coeff:g}: max |logit change| on real tokens {(inverted - base)[real].abs().max():.3f}")

        # 4. greedy continuations without and with control
        for coeff in (0.0, args.coeff):
            control_model.set_control(steerers, coeff=coeff)
            out = control_model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
            new = out[:, width:]
            shown = tokenizer.batch_decode(new, skip_special_tokens=True) if tokenizer else new.tolist()
            print(f"generate, coeff={coeff:+g}: {shown}")
        control_model.unwrap()


if __name__ == "__main__":
    main()
