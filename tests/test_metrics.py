"""Unit tests for zhlora.metrics: each metric against a value worked out by hand.

    python -m pytest tests/test_metrics.py -q

The BLEU and ROUGE expectations are computed in the comments from the n-gram counts,
not by calling the library the same way the code does, so a wrong call shows up.
"""
import math

import jieba
import numpy as np
import pytest

from zhlora import metrics
from zhlora.metrics import bleu_4, bootstrap_ci, exact_match, rouge, score_sample, similarity, success, summarize


# --- bleu_4: character BLEU-4 with NIST smoothing (nltk method3), x 100 ----------------

def test_bleu_one_character_differs():
    # 我喜欢猫 vs 我喜欢狗: p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> method3: 1 / (2^1 * 1) = 1/2;
    # same length, so no brevity penalty: (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = 0.125 ** 0.25
    assert bleu_4("我喜欢猫", "我喜欢狗") == pytest.approx(100 * 0.125 ** 0.25, abs=1e-4)


def test_bleu_brevity_penalty():
    # 一千二百 is a prefix of 一千二百三十四: every n-gram matches, BP = exp(1 - 7/4)
    assert bleu_4("一千二百", "一千二百三十四") == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-4)


def test_bleu_short_perfect_answer_is_not_100():
    # "12": p1 = p2 = 1, no 3- or 4-grams -> method3 gives 1/2 then 1/4: (1/8) ** (1/4)
    assert bleu_4("12", "12") == pytest.approx(100 * 0.125 ** 0.25, abs=1e-4)
    assert bleu_4("一千二百三十四", "一千二百三十四") == 100.0


def test_bleu_keeps_punctuation_and_scores_empty_as_zero():
    # 你好。 vs 你好: p1 = 2/3, p2 = 1/2, p3 = 0/1 -> 1/2, p4 = 0/1 -> 1/4; BP = 1 (longer)
    assert bleu_4("你好。", "你好") == pytest.approx(100 * (2 / 3 * 1 / 2 * 1 / 2 * 1 / 4) ** 0.25, abs=1e-4)
    assert bleu_4("", "你好") == 0.0
    assert bleu_4("   ", "你好") == 0.0
    assert bleu_4("你好", "") == 0.0
    assert isinstance(bleu_4("甲", "乙"), float)


# --- rouge: F x 100 on jieba words ---------------------------------------------------

def test_rouge_on_words():
    # the hand computation below rests on this segmentation
    assert list(jieba.cut("我喜欢猫")) == ["我", "喜欢", "猫"]
    assert list(jieba.cut("我喜欢狗")) == ["我", "喜欢", "狗"]
    scores = rouge("我喜欢猫", "我喜欢狗")
    # unigrams: 2 of 3 shared -> P = R = F = 2/3; bigrams: (我,喜欢) of 2 -> 1/2; LCS 我 喜欢 -> 2/3
    assert scores == pytest.approx({"rouge_1": 66.6667, "rouge_2": 50.0, "rouge_l": 66.6667}, abs=1e-4)
    assert rouge("我喜欢猫", "我喜欢猫") == {"rouge_1": 100.0, "rouge_2": 100.0, "rouge_l": 100.0}


def test_rouge_keeps_punctuation_and_scores_empty_as_zero():
    # ["。"] vs ["你好", "。"]: P = 1, R = 1/2 -> F = 2/3; punctuation is a word, as in LLaMA-Factory
    assert rouge("。", "你好。")["rouge_1"] == pytest.approx(66.6667, abs=1e-4)
    zeros = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    assert rouge("", "你好") == zeros
    assert rouge(" \n", "你好") == zeros
    assert rouge("你好", "") == zeros


# --- similarity: difflib ratio on normalised text --------------------------------------

def test_similarity():
    assert similarity("我喜欢猫", "我喜欢狗") == pytest.approx(2 * 3 / 8)  # 3 matched of 4 + 4 characters
    assert similarity("１２３", "123") == 1.0  # NFKC: full-width digits are digits
    assert similarity(" 你好\n世界 ", "你好 世界") == 1.0  # whitespace runs collapse
    assert similarity("", "你好") == 0.0
    assert similarity("", "") == 0.0  # never "identical" when there is no answer


def test_similarity_has_no_autojunk():
    # difflib's autojunk drops characters seen in > 1% of a 200+ character string; it is off
    long = "一二三四五" * 60
    assert similarity(long, long) == 1.0
    assert similarity(long + "六", long) == pytest.approx(2 * 300 / 601)


# --- success and exact match -------------------------------------------------------------

def test_success_needs_an_answer_and_a_stop():
    assert success("一千", finished=True)
    assert not success("一千", finished=False)  # ran out of max_new_tokens
    assert not success("  ", finished=True)  # stopped at once: empty answer


@pytest.mark.parametrize("task, prediction, reference, expected", [
    ("num2cn", "一千二百三十四。", "一千二百三十四", True),  # trailing 。 dropped
    ("num2cn", "一千二百三十五", "一千二百三十四", False),
    ("sort", "1, 3, 9", "[1, 3, 9]", True),  # sort compares the integers
    ("extreme", "9", "8", False),
    ("pinyin", "Wǒ Men", "wǒ men", True),  # pinyin ignores case
    ("cn2num", "１２３４", "1234", True),  # NFKC
    ("open_qa", "长城很长", "长城很长", None),  # not checkable
    ("user", "x", "x", None),  # user data without an oracle
])
def test_exact_match_per_task(task, prediction, reference, expected):
    assert exact_match(task, prediction, reference) is expected


# --- summarize -------------------------------------------------------------------------

def test_summarize_means_and_per_task():
    scores = [score_sample("num2cn", "一千", "一千", True, 3, 0.5),
              score_sample("num2cn", "一百", "一千", False, 8, 0.5),
              score_sample("open_qa", "我喜欢猫", "我喜欢狗", True, 5, 1.0)]
    summary = summarize(scores)
    assert summary["num_samples"] == 3
    assert summary["success_rate"] == pytest.approx(2 / 3)
    assert summary["exact_match"] == pytest.approx(1 / 2)  # over the 2 checkable samples only
    assert summary["avg_length"] == pytest.approx((2 + 2 + 4) / 3)
    assert summary["avg_length_tokens"] == pytest.approx((3 + 8 + 5) / 3)
    assert summary["avg_generation_time"] == pytest.approx(2 / 3)
    assert summary["avg_similarity"] == pytest.approx((1 + 0.5 + 0.75) / 3)
    per_task = dict(summary["per_task"]["num2cn"])
    assert per_task.pop("exact_match_ci") == pytest.approx(list(metrics.wilson_ci(1, 2)))
    assert per_task == pytest.approx({"n": 2, "n_exact": 2, "n_generated": 2, "exact_match": 0.5, "avg_similarity": 0.75,
                                      "rouge_l": np.mean([s["rouge_l"] for s in scores[:2]]), "test_loss": None})
    assert "exact_match" not in summary["per_task"]["open_qa"]
    assert set(summary["ci"]) == set(metrics.CI_METRICS)
    low, high = summary["ci"]["success_rate"]
    assert low <= summary["success_rate"] <= high


def test_a_tasks_test_loss_weighs_every_answer_token_the_same():
    rows = [{"loss": 1.0, "loss_tokens": 3}, {"loss": 3.0, "loss_tokens": 1}, {"loss": None, "loss_tokens": None}]
    assert metrics.token_mean_loss(rows) == pytest.approx((1.0 * 3 + 3.0) / 4)  # not (1 + 3) / 2
    assert metrics.token_mean_loss(rows[2:]) is None
    # a row scored but without a finite loss (a diverged model) leaves the part without one, as the whole
    assert metrics.token_mean_loss(rows + [{"loss": None, "loss_tokens": 5}]) is None
    assert metrics.token_mean_loss(rows + [{"loss": float("nan"), "loss_tokens": 5}]) is None


def test_scored_apart_tasks_stay_out_of_the_headline_exact_match():
    scores = [score_sample("num2cn", "一千", "一千", True, 3, 0.5),
              score_sample("num2cn", "一百", "一千", True, 3, 0.5),
              score_sample("self_cognition", "我是小知，zhlora 训练的。", "我是小知，由 zhlora 微调的中文助手。", True, 9, 0.5)]
    summary = summarize(scores)
    assert summary["exact_match"] == pytest.approx(1 / 2)  # the self_cognition hit is not in the average
    assert summary["per_task"]["self_cognition"]["exact_match"] == 1.0
    base = [score_sample(s["task"], "", "x", True, 1, 0.1) for s in scores]
    for b in base:
        b["exact_match"] = False if b["exact_match"] is not None else None
    assert metrics.delta_ci(scores, base)["exact_match"] == pytest.approx([0.0, 1.0])  # rows 1-2 only: (1, 0)


def test_summarize_without_checkable_samples():
    summary = summarize([score_sample("open_qa", "你好", "你好", True, 2, 0.1)])
    assert summary["exact_match"] is None
    assert summary["ci"]["exact_match"] is None


# --- bootstrap ---------------------------------------------------------------------------

def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = np.random.default_rng(1).integers(0, 2, size=100).astype(float)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert bootstrap_ci(values) == (low, high)
    assert bootstrap_ci(values, seed=1) != (low, high)
    # normal approximation for a proportion: mean +- 1.96 * sqrt(p (1 - p) / n)
    half = 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.02)
    assert high == pytest.approx(values.mean() + half, abs=0.02)
    assert bootstrap_ci(values, alpha=0.5)[1] - bootstrap_ci(values, alpha=0.5)[0] < high - low


def test_bootstrap_ci_degenerate_and_empty():
    assert bootstrap_ci([0.1] * 10) == (0.1, 0.1)
    assert bootstrap_ci([1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


# --- definitions -------------------------------------------------------------------------

def test_every_metric_is_defined_once_in_the_docstring():
    assert list(metrics.DEFINITIONS) == [*metrics.HEADLINE, "test_loss", "perplexity"]
    for name, line in metrics.DEFINITIONS.items():
        assert line and "\n" not in line, name
    assert metrics.perplexity(math.log(5.0)) == pytest.approx(5.0)
    assert metrics.perplexity(1000.0) == math.inf


# --- Wilson intervals for 0/1 rates, paired bootstrap for the delta ----------------------

Z95 = 1.959963984540054  # the 97.5% normal quantile


@pytest.mark.parametrize("k, n, expected", [
    (0, 48, (0.0, Z95 ** 2 / (48 + Z95 ** 2))),  # k = 0: upper = z^2 / (n + z^2) = 0.0741, never [0, 0]
    (48, 48, (48 / (48 + Z95 ** 2), 1.0)),  # k = n: lower = n / (n + z^2) = 0.9259
    (10, 50, (0.1124, 0.3304)),  # the textbook 10 of 50 (statsmodels proportion_confint(method="wilson"))
])
def test_wilson_ci(k, n, expected):
    assert metrics.wilson_ci(k, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_ci_refuses_impossible_counts():
    for k, n in [(0, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            metrics.wilson_ci(k, n)


def test_summarize_gives_rates_a_wilson_ci_and_scores_a_bootstrap_ci():
    # 48 checkable answers, none right, all stopped: the percentile bootstrap would say [0, 0] and [1, 1]
    scores = [score_sample("num2cn", "一百", "一千", True, 3, 0.1) for _ in range(47)]
    scores.append(score_sample("num2cn", "九千", "一千", True, 3, 0.1))
    summary = summarize(scores)
    assert summary["exact_match"] == 0.0 and summary["success_rate"] == 1.0
    assert summary["ci"]["exact_match"] == pytest.approx([0.0, 0.0741], abs=1e-4)
    assert summary["ci"]["success_rate"] == pytest.approx([0.9259, 1.0], abs=1e-4)
    # similarity is continuous: still the percentile bootstrap of its mean
    assert summary["ci"]["avg_similarity"] == list(bootstrap_ci([s["similarity"] for s in scores]))


def test_paired_bootstrap_ci_is_the_interval_of_the_mean_difference():
    # b is noisy; a is b plus 0.05 on every row. Unpaired, the two intervals overlap widely;
    # paired, every difference is 0.05 +- 0.01, so the interval sits tight around 0.05.
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, size=60)
    a = b + 0.05 + rng.normal(0, 0.01, size=60)
    low, high = metrics.paired_bootstrap_ci(a, b)
    assert 0.04 < low < (a - b).mean() < high < 0.06
    a_low, _ = bootstrap_ci(a)
    _, b_high = bootstrap_ci(b)
    assert a_low < b_high  # the unpaired intervals could not tell the models apart
    assert (low, high) == bootstrap_ci(a - b)  # the same resampling as `ci`, on the differences


def test_paired_bootstrap_ci_skips_unpaired_rows_and_refuses_mismatches():
    assert metrics.paired_bootstrap_ci([1.0, None, 0.0, 1.0], [0.0, 1.0, None, 0.0]) == (1.0, 1.0)
    assert metrics.paired_bootstrap_ci([None, 1.0], [0.0, None]) is None
    with pytest.raises(ValueError):
        metrics.paired_bootstrap_ci([1.0, 0.0], [1.0])


def test_delta_ci_pairs_the_same_rows_of_both_models():
    tuned = [score_sample("num2cn", "一千", "一千", True, 3, 0.1), score_sample("num2cn", "一千", "一千", True, 3, 0.1),
             score_sample("open_qa", "你好", "你好", True, 2, 0.1)]
    base = [score_sample("num2cn", "一百", "一千", False, 9, 0.1), score_sample("num2cn", "一百", "一千", False, 9, 0.1),
            score_sample("open_qa", "", "你好", True, 1, 0.1)]  # stopped at once: not "answered and stopped"
    ci = metrics.delta_ci(tuned, base)
    assert set(ci) == set(metrics.CI_METRICS)
    assert ci["exact_match"] == [1.0, 1.0]  # 2 checkable rows, both right vs both wrong; open_qa skipped
    assert ci["success_rate"] == [1.0, 1.0]  # every row: 1 - 0
    low, high = ci["avg_similarity"]  # row differences 0.5, 0.5, 1
    assert 0.5 <= low < 2 / 3 < high <= 1.0
    only_open = [score_sample("open_qa", "你好", "你好", True, 2, 0.1)]
    assert metrics.delta_ci(only_open, only_open)["exact_match"] is None
    with pytest.raises(ValueError, match="row 2"):
        metrics.delta_ci(tuned, base[:2] + [score_sample("sort", "1", "1", True, 1, 0.1)])


# --- display labels --------------------------------------------------------------------

def test_every_metric_has_one_bilingual_label():
    assert list(metrics.LABELS) == list(metrics.DEFINITIONS)
    for name, (zh, en) in metrics.LABELS.items():
        assert zh and en and en.isascii(), name
    # success_rate is "answered and stopped", not "correct": no 成功/success/correct in its label
    zh, en = metrics.LABELS["success_rate"]
    assert "停止" in zh and "stopped" in en and "成功" not in zh and "success" not in en
    assert metrics.metric_label("success_rate") == "作答并停止 answered & stopped (success_rate)"
    assert metrics.metric_label("exact_match") == "精确匹配 exact match (exact_match)"
    assert metrics.metric_label("bleu_4") == "BLEU-4 (bleu_4)"  # no "BLEU-4 BLEU-4"
    assert metrics.metric_label("success_rate", with_key=False) == "作答并停止 answered & stopped"  # beside the key
    assert metrics.metric_label("rouge_l", with_key=False) == "ROUGE-L"
