"""Draw a refusal-labelling sample from an eval run's replies (one-offs; the labelled samples are in labels.jsonl).

Source: results/eval_generations.json at the commit recorded in each row ("source"). Replies are deduplicated by
(prompt, text), so a benign reply that steering left unchanged is drawn once (and CAST's replies, equal to CAA's
on 200 of 202 prompts, mostly count as CAA's), then drawn per stratum (prompt group x method, alphas pooled) with
a fixed seed.

    # the first sample (seed 25): each prompt goes wholly to the dev or the held-out half
    python data/refusal/draw.py results/eval_generations.json 2a6023d
    # the fresh sample (seed 26): replies not in labels.jsonl, labelled after the detector was frozen
    python data/refusal/draw.py results/eval_generations.json 2a6023d --seed 26 --per-stratum 14 7 7 \
        --exclude data/refusal/labels.jsonl --split fresh
"""
import argparse
import json
import random

parser = argparse.ArgumentParser()
parser.add_argument("generations")
parser.add_argument("commit")
parser.add_argument("--seed", type=int, default=25)
parser.add_argument("--per-stratum", type=int, nargs=3, default=(36, 20, 20), metavar=("HARMFUL", "BENIGN", "OVER"))
parser.add_argument("--exclude", help="a labels.jsonl whose (prompt, reply) pairs are not drawn again")
parser.add_argument("--split", help="one split name for every row (default: dev / heldout by prompt)")
parser.add_argument("--first-id", type=int, default=0)
args = parser.parse_args()

run = json.loads(open(args.generations, encoding="utf-8").read())
groups = run["prompts"]["group"]
per_stratum = dict(zip(("harmful", "benign", "overrefusal"), args.per_stratum))
rng = random.Random(args.seed)
prompt_ids = list(range(len(groups)))
rng.shuffle(prompt_ids)
heldout = set(prompt_ids[: len(prompt_ids) // 2])

seen = set()
if args.exclude:
    for line in open(args.exclude, encoding="utf-8"):
        row = json.loads(line)
        seen.add((row["prompt_id"], row["reply"]))
strata = {}
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
    sample += rng.sample(rows, min(per_stratum[group], len(rows)))
rng.shuffle(sample)  # so the labeller reads strata mixed, not method by method
for i, row in enumerate(sample, start=args.first_id):
    split = args.split or ("heldout" if row["prompt_id"] in heldout else "dev")
    print(json.dumps({"id": i, **row, "split": split, "source": f"results/eval_generations.json@{args.commit[:7]}"},
                     ensure_ascii=False))
