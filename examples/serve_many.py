"""Serve many users, each with their own steering, in one batch (the README's "Serve many users" example).

A tiny random model stands in for yours; with a real one, load your fitted steerers with finesteer.Steerer.load."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

import finesteer
from finesteer_kernels import SteerParams

torch.manual_seed(0)
config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2)
model = AutoModelForCausalLM.from_config(config).eval()
model.generation_config.pad_token_id = 0
d = config.hidden_size
polite = finesteer.Steerer(SteerParams(experts=torch.randn(1, d), alpha=2.0), layer=1)          # a CAA vector
expert = finesteer.Steerer(SteerParams(experts=torch.randn(4, d), router_weight=torch.randn(d, 4) / 8,
                                       alpha=2.0), layer=2)                                      # 4 routed experts
bank = finesteer.SteererBank({"polite": polite, "expert": expert})

prompts = [[5, 17, 33, 9], [7, 7, 19, 3], [11, 90, 4, 25]]
ids = torch.tensor(prompts)
users = ["polite", "expert", None]                                  # one steerer (or none) per request
with torch.no_grad(), finesteer.patch_model(model, bank, mode="query") as handle:
    handle.assign(users)                                            # generate: one name per row
    batch = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    served = model.generate_batch(prompts, steerers=users, warmup=False,   # continuous batching: per request
                                  generation_config=GenerationConfig(max_new_tokens=5, do_sample=False,
                                                                     eos_token_id=-1, pad_token_id=0),
                                  continuous_batching_config=ContinuousBatchingConfig(max_batch_tokens=32,
                                                                                      num_blocks=8, page_size=16))
for user, row, out in zip(users, batch, served.values()):
    print(f"{str(user):>6}: generate {row[-5:].tolist()}  continuous batching {out.generated_tokens}")
