"""Steer your own model: load a local transformers model, fit a FineSteer steerer on your own prompt files, save it,
then patch the model and show, for a few held-out prompts of each kind, the gate's decision and the replies with
and without steering.

    python examples/own_model.py --model path/to/model-folder --targets targets.jsonl --benign benign.jsonl

``--model`` is a local Hugging Face folder with safetensors weights and a tokenizer (or a ``.gguf`` file); nothing
is downloaded. The JSONL files hold one prompt per line, ``{"prompt": "..."}`` or a bare JSON string: targets are
the prompts the gate should open for (e.g. requests your model should refuse), benign ones those it should leave
alone. Both are split 50/25/25 into fit / calibration / test parts, so the reported gate rates are held out. The
shift the experts learn is the safety recipe's (refusing minus complying completions); for other behaviours pass
your own completions to `finesteer.fitting.recipes.fit_recipe`.
"""
from __future__ import annotations

import argparse

import torch

import finesteer
from finesteer.fitting import data
from finesteer.fitting.held_out import anchor_activations, gate_scores
from finesteer.fitting.recipes import FitOptions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model folder (or .gguf file)")
    parser.add_argument("--targets", required=True, help="JSONL of prompts to steer")
    parser.add_argument("--benign", required=True, help="JSONL of prompts to leave alone")
    parser.add_argument("--layer", type=int, default=None, help="decoder layer to steer (default: the middle one)")
    parser.add_argument("--out", default="my-steerer.safetensors", help="where to save the steerer")
    parser.add_argument("--epochs", type=int, default=400, help="maximum MoSE training epochs")
    parser.add_argument("--alpha", type=float, default=None,
                        help="steering strength when generating (default: the one the fit stores, 2)")
    parser.add_argument("--show", type=int, default=3, help="held-out prompts of each kind shown with their replies")
    args = parser.parse_args(argv)

    model, tokenizer = finesteer.load_model(args.model)
    targets, benign = data.load_jsonl(args.targets), data.load_jsonl(args.benign)
    options = FitOptions(n_target=len(targets), n_benign=len(benign), epochs=args.epochs)
    steerer = finesteer.safety_steerer(model, tokenizer, layer=args.layer, targets=targets, benign=benign,
                                       options=options, model_name=args.model)
    steerer.save(args.out)
    gate = steerer.metadata["metrics"]["gate"]["test"]
    print(f"saved {args.out}: layer {steerer.layer}, {steerer.params.num_experts} experts; held-out gate TPR "
          f"{gate['tpr']:.0%}, FPR {gate['fpr']:.0%}")

    # a few prompts of each kind that the fit never saw (its test split), each with the gate's decision: where the
    # gate stays shut the steered reply is the unsteered one, token for token (query mode)
    shown = [(kind, p) for kind, ps in (("target", targets), ("benign", benign))
             for p in data.split_prompts(data.subsample(ps, len(ps), options.seed), options.fractions,
                                         options.seed).test.prompts[:args.show]]
    anchors = anchor_activations(model, tokenizer, [p for _, p in shown], steerer.layer, options, progress=False)
    _, gate_open = gate_scores(steerer, anchors)
    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True) for _, p in shown]

    def replies() -> list:
        return [model.generate(**x, max_new_tokens=24, do_sample=False)[0, x["input_ids"].shape[1]:] for x in inputs]

    with torch.no_grad():
        plain = replies()
        with finesteer.patch_model(model, finesteer.Steerer.load(args.out), mode="query", alpha=args.alpha):
            steered = replies()
    for (kind, prompt), opened, a, b in zip(shown, gate_open.tolist(), plain, steered):
        print(f"[{kind}] {prompt}\n  gate {'OPEN: steered' if opened else 'shut: left alone'}")
        print(f"  unsteered: {tokenizer.decode(a, skip_special_tokens=True)}")
        print(f"  steered:   {tokenizer.decode(b, skip_special_tokens=True)}"
              + ("  (identical)" if a.equal(b) else ""))


if __name__ == "__main__":
    main()
