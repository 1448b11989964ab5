"""Every number evaluate.py reports, each defined once, here.

    scores = [score_sample(task, prediction, reference, finished, n_tokens, seconds), ...]
    summary = summarize(scores)      # the headline means, bootstrap CIs and per-task table

Metrics (the keys of evaluation_results.json; DEFINITIONS below is read from this table):

    success_rate        share of samples whose answer is non-empty and whose generation ended with
                        EOS / end-of-turn within max_new_tokens (Generation.finished); in [0, 1]
    avg_similarity      mean character similarity: difflib.SequenceMatcher(autojunk=False).ratio() =
                        2 * matched chars / (len(pred) + len(ref)) on tasks.normalize_text of both; in [0, 1]
    avg_generation_time mean seconds per sample = each batch's wall time / its batch size (depends on
                        --batch_size and the device)
    avg_length          mean answer length in characters (the decoded text, special tokens removed)
    avg_length_tokens   mean generated tokens per sample, the stop token included when it came
    bleu_4              mean character BLEU-4 x 100: nltk sentence_bleu([list(ref)], list(pred)) with
                        SmoothingFunction().method3, as LLaMA-Factory's ComputeSimilarity
    rouge_1             mean ROUGE-1 F x 100 on jieba words: rouge_chinese Rouge().get_scores of the
                        space-joined jieba.cut of pred and ref, as LLaMA-Factory's ComputeSimilarity
    rouge_2             as rouge_1, word bigrams
    rouge_l             as rouge_1, longest common word subsequence (rouge-chinese's summary-level LCS)
    exact_match         share of checkable samples (tasks.CHECKABLE_TASKS) whose answer passes
                        tasks.check_answer; null when the split holds none; per task in per_task
    test_loss           mean cross-entropy per supervised token (train.compute_loss, answer and stop
                        tokens unless data.train_on_prompt) over the same test rows
    perplexity          exp(test_loss)

Policies:
  - punctuation is kept for bleu_4 and rouge_*, and neither side is normalised, exactly as
    LLaMA-Factory does, so our numbers can be compared with its predict_results.json; each
    per-sample bleu/rouge is rounded to 4 decimals as it does. avg_similarity normalises
    (NFKC, whitespace collapsed) but keeps punctuation too.
  - an empty answer (after strip) scores 0 on avg_similarity, bleu_4 and rouge_* and fails
    success_rate; so does an empty reference (LLaMA-Factory: rouge 0 when either side cuts to
    no word). Two empty strings are never "identical" (difflib would say 1.0).
  - short answers: with character 3- and 4-grams missing, a perfect "12" gets bleu_4 = 59.46 and
    a one-word answer gets rouge_2 = 0. For checkable tasks read exact_match first.
  - ci: percentile bootstrap of the mean (bootstrap_ci), 1000 resamples, seed 0, 95%.
"""
from __future__ import annotations

import difflib
import logging
import math
import re

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from zhlora.tasks import CHECKABLE_TASKS, check_answer, normalize_text

jieba.setLogLevel(logging.WARNING)  # silence its "Building prefix dict ..." on first use


def _read_definitions(doc: str) -> dict[str, str]:
    """The metric table of the module docstring as {name: one line}."""
    definitions: dict[str, str] = {}
    table = doc.split("Metrics (")[1].split("Policies:")[0]
    for line in table.splitlines():
        start = re.match(r"^ {4}(\w+)\s+(.+)$", line)  # continuation lines start with 24 spaces
        if start:
            name = start.group(1)
            definitions[name] = start.group(2).strip()
        elif definitions and line.startswith(" " * 24) and line.strip():
            definitions[name] += " " + line.strip()
    return definitions


DEFINITIONS: dict[str, str] = _read_definitions(__doc__)
HEADLINE = ["success_rate", "avg_similarity", "avg_generation_time", "avg_length", "avg_length_tokens",
            "bleu_4", "rouge_1", "rouge_2", "rouge_l", "exact_match"]
CI_METRICS = ["success_rate", "avg_similarity", "exact_match", "bleu_4", "rouge_l"]
# headline metric -> the per-sample score it averages
_PER_SAMPLE = {"success_rate": "success", "avg_similarity": "similarity", "avg_generation_time": "generation_time",
               "avg_length": "length", "avg_length_tokens": "length_tokens", "bleu_4": "bleu_4",
               "rouge_1": "rouge_1", "rouge_2": "rouge_2", "rouge_l": "rouge_l", "exact_match": "exact_match"}


def success(prediction: str, finished: bool) -> bool:
    return finished and bool(prediction.strip())


def similarity(prediction: str, reference: str) -> float:
    pred, ref = normalize_text(prediction), normalize_text(reference)
    if not pred or not ref:
        return 0.0
    return difflib.SequenceMatcher(None, pred, ref, autojunk=False).ratio()


def bleu_4(prediction: str, reference: str) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    score = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return round(float(score) * 100, 4)  # nltk returns the int 0 when nothing matches


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """{"rouge_1", "rouge_2", "rouge_l"}: F-scores x 100 on jieba words."""
    hypothesis, target = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    if not hypothesis.split() or not target.split():
        return {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    scores = Rouge().get_scores(hypothesis, target)[0]
    return {key.replace("-", "_"): round(value["f"] * 100, 4) for key, value in scores.items()}


def exact_match(task: str, prediction: str, reference: str) -> bool | None:
    """tasks.check_answer for a checkable task; None for the others (open_qa, user data)."""
    return check_answer(task, prediction, reference) if task in CHECKABLE_TASKS else None


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp(710) overflows a float


def score_sample(task: str, prediction: str, reference: str, finished: bool, n_tokens: int,
                 seconds: float) -> dict:
    """Every per-sample score of one answer (what predictions.jsonl and summarize read)."""
    return {"task": task, "success": success(prediction, finished), "similarity": similarity(prediction, reference),
            "bleu_4": bleu_4(prediction, reference), **rouge(prediction, reference),
            "exact_match": exact_match(task, prediction, reference), "length": len(prediction),
            "length_tokens": n_tokens, "generation_time": seconds}


def bootstrap_ci(values, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap of the mean: resample `values` with replacement n times (numpy
    default_rng(seed)), take the alpha/2 and 1 - alpha/2 percentiles of the n means."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if np.all(values == values[0]):  # every resample has this mean; skip float rounding in the sum
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n, values.size))].mean(axis=1)
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(scores: list[dict]) -> dict:
    """Headline means, `ci` (95% bootstrap) and `per_task` for a list of score_sample dicts."""
    column = {name: [float(s[key]) for s in scores if s[key] is not None] for name, key in _PER_SAMPLE.items()}
    summary = {name: _mean(column[name]) for name in HEADLINE}
    summary["num_samples"] = len(scores)
    summary["ci"] = {name: list(bootstrap_ci(column[name])) if column[name] else None for name in CI_METRICS}
    per_task = {}
    for task in sorted({s["task"] for s in scores}):
        mine = [s for s in scores if s["task"] == task]
        row = {"n": len(mine), "avg_similarity": _mean([s["similarity"] for s in mine]),
               "rouge_l": _mean([s["rouge_l"] for s in mine])}
        if task in CHECKABLE_TASKS:
            row["exact_match"] = _mean([float(s["exact_match"]) for s in mine])
        per_task[task] = row
    summary["per_task"] = per_task
    return summary
