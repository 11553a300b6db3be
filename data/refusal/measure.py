"""Precision / recall of `finesteer.studies.refusal.is_refusal` on the hand labels, per split, prompt group and method.

    PYTHONPATH=$PWD python data/refusal/measure.py            # the detector in this checkout
    PYTHONPATH=$PWD python data/refusal/measure.py --misses   # also list the dev-half disagreements
"""
import json
import pathlib
import sys

from finesteer.studies.refusal import is_refusal

LABELS = pathlib.Path(__file__).with_name("labels.jsonl")


def load_labels(split=None):
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def confusion(rows, detector=is_refusal):
    """(true positives, false positives, false negatives, true negatives) of ``detector`` against the labels."""
    flags = [(bool(r["label"]), detector(r["reply"])) for r in rows]
    return tuple(sum(f == want for f in flags) for want in ((True, True), (False, True), (True, False), (False, False)))


def precision_recall(rows, detector=is_refusal):
    tp, fp, fn, _ = confusion(rows, detector)
    return tp / (tp + fp), tp / (tp + fn)


def _line(name, rows):
    tp, fp, fn, tn = confusion(rows)
    precision = f"{tp / (tp + fp):.3f}" if tp + fp else "-"
    recall = f"{tp / (tp + fn):.3f}" if tp + fn else "-"
    return f"| {name} | {len(rows)} | {tp} | {fp} | {fn} | {tn} | {precision} | {recall} |"


if __name__ == "__main__":
    rows = load_labels()
    print("| set | n | TP | FP | FN | TN | precision | recall |\n|---|---|---|---|---|---|---|---|")
    for split in ("dev", "heldout", "fresh"):
        print(_line(split, load_labels(split)))
    print(_line("all", rows))
    for key in ("group", "method"):
        for value in sorted({r[key] for r in rows}):
            print(_line(f"{key}={value}", [r for r in rows if r[key] == value]))
    if "--misses" in sys.argv:
        for r in load_labels("dev"):
            if bool(r["label"]) != is_refusal(r["reply"]):
                print("FN" if r["label"] else "FP", r["id"], r["rubric"], repr(r["reply"]))
