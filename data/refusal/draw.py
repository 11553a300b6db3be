"""Draw the refusal-labelling sample from an eval run's replies (a one-off; the sample is committed as replies.jsonl).

Source: results/eval_generations.json at the commit recorded in each row ("source"). Replies are deduplicated by
(prompt, text) so a benign reply that steering left unchanged is drawn once, then drawn per stratum (prompt group x
method, alphas pooled) with a fixed seed. Each prompt goes wholly to the dev or the held-out half (seeded), so no
pattern tuned on dev sees a held-out prompt.

    python data/refusal/draw.py results/eval_generations.json <commit> > data/refusal/replies.jsonl
"""
import json
import random
import sys

PER_STRATUM = {"harmful": 36, "benign": 20, "overrefusal": 20}
SEED = 25

path, commit = sys.argv[1], sys.argv[2]
run = json.loads(open(path, encoding="utf-8").read())
groups = run["prompts"]["group"]
rng = random.Random(SEED)
prompt_ids = list(range(len(groups)))
rng.shuffle(prompt_ids)
heldout = set(prompt_ids[: len(prompt_ids) // 2])

strata, seen = {}, set()
for key, replies in run["replies"].items():
    method, alpha = key.split("@")
    for pid, text in enumerate(replies):
        if (pid, text) in seen:
            continue
        seen.add((pid, text))
        row = {"prompt_id": pid, "group": groups[pid], "method": method,
               "alpha": None if alpha == "None" else float(alpha), "reply": text}
        strata.setdefault((groups[pid], method), []).append(row)

sample = []
for (group, method), rows in sorted(strata.items()):
    sample += rng.sample(rows, min(PER_STRATUM[group], len(rows)))
rng.shuffle(sample)  # so the labeller reads strata mixed, not method by method
for i, row in enumerate(sample):
    row = {"id": i, **row, "split": "heldout" if row["prompt_id"] in heldout else "dev",
           "source": f"results/eval_generations.json@{commit[:7]}"}
    print(json.dumps(row, ensure_ascii=False))
