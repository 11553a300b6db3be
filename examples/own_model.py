"""Steer your own model: load a local transformers model, fit a FineSteer steerer on your own prompt files, save it,
then patch the model and generate with and without steering.

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
from finesteer.fitting.recipes import FitOptions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model folder (or .gguf file)")
    parser.add_argument("--targets", required=True, help="JSONL of prompts to steer")
    parser.add_argument("--benign", required=True, help="JSONL of prompts to leave alone")
    parser.add_argument("--layer", type=int, default=None, help="decoder layer to steer (default: the middle one)")
    parser.add_argument("--out", default="my-steerer.safetensors", help="where to save the steerer")
    parser.add_argument("--epochs", type=int, default=400, help="maximum MoSE training epochs")
    parser.add_argument("--alpha", type=float, default=1.0, help="steering strength when generating")
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

    prompt = targets.prompts[0]
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        with finesteer.patch_model(model, finesteer.Steerer.load(args.out), mode="query", alpha=args.alpha):
            steered = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    start = inputs["input_ids"].shape[1]
    print(f"prompt:    {prompt}")
    print(f"unsteered: {tokenizer.decode(plain[0, start:], skip_special_tokens=True)}")
    print(f"steered:   {tokenizer.decode(steered[0, start:], skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
