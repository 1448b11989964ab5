"""Every number evaluate.py reports, each defined once, here.

    scores = [score_sample(task, prediction, reference, finished, n_tokens, seconds), ...]
    summary = summarize(scores)      # the headline means, 95% CIs and per-task table
    summary["delta_ci"] = delta_ci(scores, base_scores)  # fine-tuned minus base, paired by row

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
                        tasks.check_answer; null when the split holds none; per task in per_task.
                        evaluate.py scores a task with one right answer by teacher forcing (does
                        greedy decoding reproduce the reference and then stop?), every row, and
                        checks it against real generations on the rows it also generates
                        (forced_vs_generated). Every headline mean leaves out SCORED_APART
                        tasks (self_cognition: does the answer name the assistant and its maker?)
    test_loss           mean cross-entropy per answer token (answer and stop tokens, the prompt never)
                        over the same test rows, from the teacher-forcing pass; per task in per_task
                        (token_mean_loss over each row's loss and loss_tokens in predictions.jsonl)
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
  - ci, 95%: the 0/1 rates (RATES: success_rate, exact_match) get a Wilson score interval
    (wilson_ci), which stays inside [0, 1] and is not empty at 0 of 48 ([0, 0.074]; the percentile
    bootstrap says [0, 0] there). The continuous scores get the percentile bootstrap of the mean
    (bootstrap_ci), 1000 resamples, seed 0.
  - delta_ci, 95%: both models answer the same rows, so the interval of fine-tuned minus base is
    the bootstrap of the mean per-row difference (paired_bootstrap_ci): tighter than two separate
    intervals whenever both models find the same rows hard (var(a - b) = var a + var b - 2 cov).
  - success_rate says "answered and stopped", not "correct": LABELS gives every metric the one
    Chinese + English name that plots, reports and printed tables show.
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
DELTA_METRICS = [*HEADLINE, "test_loss", "perplexity"]  # reported fine-tuned, base, and their difference
CI_METRICS = ["success_rate", "avg_similarity", "exact_match", "bleu_4", "rouge_l"]
RATES = {"success_rate", "exact_match"}  # per-sample 0/1: their ci is Wilson's, not the bootstrap's
Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
# metric -> (中文, English): the one display name of each metric, wherever it is shown
LABELS: dict[str, tuple[str, str]] = {
    "success_rate": ("作答并停止", "answered & stopped"), "avg_similarity": ("字符相似度", "character similarity"),
    "avg_generation_time": ("平均生成时间/秒", "avg generation time, s"),
    "avg_length": ("平均长度/字", "avg length, chars"), "avg_length_tokens": ("平均长度/token", "avg length, tokens"),
    "bleu_4": ("BLEU-4", "BLEU-4"), "rouge_1": ("ROUGE-1", "ROUGE-1"), "rouge_2": ("ROUGE-2", "ROUGE-2"),
    "rouge_l": ("ROUGE-L", "ROUGE-L"), "exact_match": ("精确匹配", "exact match"),
    "test_loss": ("测试损失", "test loss"), "perplexity": ("困惑度", "perplexity")}
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


# Reported in per_task only: "who are you" is the classic first demo, not a skill to average in.
SCORED_APART = frozenset({"self_cognition"})


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    Unlike p ± z·sqrt(p(1-p)/n) or the bootstrap, it does not collapse to [0, 0] at k = 0."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_ci needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p, shrink = k / n, 1 + z * z / n
    center = (p + z * z / (2 * n)) / shrink
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    # at k = 0 (k = n) the bound is exactly 0 (1); float rounding would leave 2.8e-17 there
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def paired_bootstrap_ci(a_values, b_values, n: int = 1000, seed: int = 0,
                        alpha: float = 0.05) -> tuple[float, float] | None:
    """bootstrap_ci of mean(a - b) over the rows where both have a value (None: no such row).
    a_values[i] and b_values[i] must score the same row: resampling rows keeps each pair together."""
    if len(a_values) != len(b_values):
        raise ValueError(f"paired_bootstrap_ci needs one value per row on both sides, got {len(a_values)} "
                         f"and {len(b_values)}")
    diffs = [float(a) - float(b) for a, b in zip(a_values, b_values) if a is not None and b is not None]
    return bootstrap_ci(diffs, n=n, seed=seed, alpha=alpha) if diffs else None


def delta_ci(scores: list[dict], base_scores: list[dict]) -> dict[str, list[float] | None]:
    """{metric: [low, high]} of fine-tuned minus base for CI_METRICS, paired by row (score_sample dicts)."""
    for i, (mine, base) in enumerate(zip(scores, base_scores)):
        if mine["task"] != base["task"]:  # a shuffled or filtered side would pair unrelated answers
            raise ValueError(f"delta_ci: row {i} is {mine['task']} for one model and {base['task']} for the other")
    out = {}
    for name in CI_METRICS:
        key = _PER_SAMPLE[name]

        def values(side):  # the headline leaves SCORED_APART rows out; so does its delta
            return [None if s["task"] in SCORED_APART else s[key] for s in side]
        ci = paired_bootstrap_ci(values(scores), values(base_scores))
        out[name] = None if ci is None else list(ci)
    return out


def share_scale(metric: str, value):
    """A metric on the 0-1 scale of the other shares, for tables: rouge_l (and rouge_l@group) is
    written x 100, as rouge-chinese and LLaMA-Factory report it; the rest pass unchanged."""
    return value / 100 if metric.split("@")[0] == "rouge_l" and value is not None else value


def metric_label(name: str, with_key: bool = True) -> str:
    """"作答并停止 answered & stopped (success_rate)": LABELS' two names, then the results key
    (with_key=False leaves it out, for a line that prints the key already)."""
    zh, en = LABELS[name]
    text = zh if zh == en else f"{zh} {en}"
    return f"{text} ({name})" if with_key else text


def _ci(name: str, values: list[float]) -> list[float] | None:
    if not values:
        return None
    if name in RATES:
        return list(wilson_ci(round(sum(values)), len(values)))
    return list(bootstrap_ci(values))


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def token_mean_loss(scores: list[dict]) -> float | None:
    """Mean cross-entropy per answer token over rows carrying loss and loss_tokens (evaluate.score_row):
    the test loss of just these rows, every token weighing the same as in the whole test loss. None
    if a scored row has no finite loss (a diverged model: its file holds null), as the whole one would be."""
    if any(s.get("loss_tokens") and (s.get("loss") is None or not math.isfinite(s["loss"])) for s in scores):
        return None
    kept = [(s["loss"], s["loss_tokens"]) for s in scores if s.get("loss") is not None and s.get("loss_tokens")]
    tokens = sum(n for _, n in kept)
    return sum(loss * n for loss, n in kept) / tokens if tokens else None


def summarize(scores: list[dict]) -> dict:
    """Headline means, `ci` (95%: Wilson for RATES, bootstrap otherwise) and `per_task` for a list
    of score_sample dicts. A None score (a row that was not generated) is left out of its mean.
    The headline leaves out SCORED_APART tasks (every metric: their rows are always generated and
    would outweigh the rest); per_task has them, with n (rows), n_exact (rows with an exact-match
    verdict) and n_generated (rows behind the similarity and ROUGE means)."""
    headline = [s for s in scores if s["task"] not in SCORED_APART]
    column = {name: [float(s[key]) for s in headline if s[key] is not None] for name, key in _PER_SAMPLE.items()}
    summary = {name: _mean(column[name]) for name in HEADLINE}
    summary["num_samples"] = len(scores)
    summary["ci"] = {name: _ci(name, column[name]) for name in CI_METRICS}
    per_task = {}
    for task in sorted({s["task"] for s in scores}):
        mine = [s for s in scores if s["task"] == task]
        generated = [s for s in mine if s["similarity"] is not None]
        row = {"n": len(mine), "n_generated": len(generated),
               "avg_similarity": _mean([s["similarity"] for s in generated]),
               "rouge_l": _mean([s["rouge_l"] for s in generated]), "test_loss": token_mean_loss(mine)}
        if task in CHECKABLE_TASKS:
            hits = [float(s["exact_match"]) for s in mine if s["exact_match"] is not None]
            row["n_exact"], row["exact_match"], row["exact_match_ci"] = len(hits), _mean(hits), _ci("exact_match", hits)
        per_task[task] = row
    summary["per_task"] = per_task
    return summary
