"""Run under ``torchrun --nproc_per_node 2`` by tests/test_serving_devices.py: load a tiny model saved in FOLDER with
``tp_plan="auto"`` (gloo on the CPU), patch a SteererBank, generate a mixed batch in both modes and write rank 0's
tokens and logits to OUT (safetensors)."""
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from finesteer import SteererBank, Steerer, patch_model


def main(folder: str, steerer_files: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
    rank = dist.get_rank()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "DTensor", f"tensor parallelism did not shard the weights: {type(weight)}"
    names = steerer_files.split(",")
    steerers = {os.path.basename(p).split(".")[0]: Steerer.load(p) for p in names}
    assignment = list(steerers) + [None]  # two steerers and an unsteered row
    ids = torch.tensor([[5, 17, 33, 9, 41], [7, 7, 19, 3, 60], [11, 90, 4, 25, 8]])
    results = {}
    for mode in ("query", "token"):
        with torch.no_grad(), patch_model(model, SteererBank(steerers), mode=mode) as handle:
            handle.assign(assignment)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        results[f"{mode}_tokens"] = gen.sequences.contiguous()
        results[f"{mode}_logits"] = torch.stack(gen.logits, 1).contiguous()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results["query_tokens"].tolist())
    assert all(g == gathered[0] for g in gathered), "ranks disagree"
    if rank == 0:
        save_file(results, out)
    # Both ranks reach teardown together: a rank tearing gloo down while the other still has work pending aborted
    # the process at exit ("terminate called without an active exception") about once in four loaded runs.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
