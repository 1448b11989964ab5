"""Verdicts are computed from the runs' own rows and seeds, and timings only from runs that had the CPU alone."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zhlora.config import ConfigError
from zhlora.cpu_share import SHARED_ABOVE, CpuShare, busy_seconds, is_shared, others_share
from zhlora.experiment_compare import compare, group_scores, seed_interval, timed_costs, verdict

TASKS = ["num2cn", "digits", "extreme", "cn2num"] * 10  # 40 headline rows, plus self_cognition below


def write_run(folder: Path, correct: list[bool], test_loss: float) -> Path:
    folder.mkdir(parents=True)
    rows = [{"task": t, "instruction": f"q{i}", "input": "", "exact_match": ok, "similarity": 1.0 if ok else 0.5,
             "loss": test_loss if ok else 2 * test_loss, "loss_tokens": 4} for i, (t, ok) in enumerate(zip(TASKS, correct))]
    rows.append({"task": "self_cognition", "instruction": "你是谁", "input": "", "exact_match": None, "similarity": 0.0})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "evaluation_results.json").write_text(json.dumps({"test_loss": test_loss}), encoding="utf-8")
    return folder


def test_a_clear_gain_is_higher_and_a_tie_is_same(tmp_path):
    weak = [write_run(tmp_path / "weak" / f"seed{s}", [i % 4 == 0 for i in range(40)], 2.0 + s / 100) for s in range(3)]
    strong = [write_run(tmp_path / "strong" / f"seed{s}", [i % 4 != 3 for i in range(40)], 1.5 + s / 100)
              for s in range(3)]
    same = [write_run(tmp_path / "same" / f"seed{s}", [i % 4 == 0 for i in range(40)], 2.0 + s / 100) for s in range(3)]
    gain = compare(strong, weak)
    assert gain["exact_match"]["diff"] == pytest.approx(0.5) and gain["exact_match"]["verdict"] == "higher"
    assert gain["exact_match"]["rows"] == 40  # self_cognition is scored apart, as in the headline
    assert gain["test_loss"]["diff"] == pytest.approx(-0.5) and gain["test_loss"]["verdict"] == "lower"
    tie = compare(same, weak)
    assert tie["exact_match"]["diff"] == 0 and tie["exact_match"]["verdict"] == "same"


def test_a_group_is_compared_on_its_own_rows_and_its_own_loss(tmp_path):
    # weak is right on every digits row (i % 4 == 1), strong on none: the group verdict turns around
    weak = [write_run(tmp_path / "weak" / f"seed{s}", [i % 4 == 1 for i in range(40)], 2.0 + s / 100) for s in range(3)]
    strong = [write_run(tmp_path / "strong" / f"seed{s}", [i % 4 in (0, 2, 3) for i in range(40)], 2.0 + s / 100)
              for s in range(3)]
    assert compare(strong, weak)["exact_match"]["verdict"] == "higher"
    digits = compare(strong, weak, tasks=["digits"])
    assert digits["exact_match"]["rows"] == 10 and digits["exact_match"]["diff"] == -1.0
    assert digits["test_loss"]["diff"] > 0 and digits["test_loss"]["verdict"] == "higher"  # wrong rows cost 2x
    assert group_scores(weak[0], ["digits"])["test_loss"] == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="no test row of the tasks"):  # a misspelt task is not a blank column
        group_scores(weak[0], ["digit"])


def test_one_seed_gives_no_loss_interval_and_mismatched_rows_are_refused(tmp_path):
    a = [write_run(tmp_path / "a" / "seed1", [True] * 40, 1.0)]
    b = [write_run(tmp_path / "b" / "seed1", [False] * 40, 2.0)]
    assert compare(a, b)["test_loss"]["verdict"] == "unknown"
    assert seed_interval([1.0, 2.0], [0.0, 0.0])["ci"][0] < 0 < seed_interval([1.0, 1.1], [0.0, 0.0])["ci"][0]
    other = tmp_path / "c" / "seed1"
    write_run(other, [True] * 40, 1.0)
    text = (other / "predictions.jsonl").read_text().replace('"q3"', '"another question"')
    (other / "predictions.jsonl").write_text(text)
    with pytest.raises(ValueError, match="different test rows"):
        compare([other], b)


def test_verdict_reads_only_the_interval():
    assert verdict([0.01, 0.2]) == "higher" and verdict([-0.2, -0.01]) == "lower"
    assert verdict([-0.01, 0.2]) == "same" and verdict(None) == "unknown"


def test_times_come_only_from_runs_that_had_the_cpu_alone():
    alone = [{"supervised_tokens_per_s": v, "seconds_per_step": 1.0, "peak_memory_mb": 100.0 + v,
              "cpu_others_share": 0.01} for v in (10.0, 12.0, 11.0)]
    shared = {"supervised_tokens_per_s": 3.0, "seconds_per_step": 9.0, "peak_memory_mb": 900.0,
              "cpu_others_share": SHARED_ABOVE + 0.3}
    costs = timed_costs([*alone, shared])
    assert costs["timed_runs"] == 3 and costs["supervised_tokens_per_s"] == 11.0
    assert costs["supervised_tokens_per_s_range"] == [10.0, 12.0] and costs["peak_memory_mb"] == 111.0
    too_few = timed_costs([*alone[:2], shared, {"supervised_tokens_per_s": 5.0}])  # unknown share counts as shared
    assert too_few["timed_runs"] == 2 and too_few["supervised_tokens_per_s"] is None
    assert too_few["peak_memory_mb_range"] is None


def test_cpu_share_is_a_fraction_and_unknown_counts_as_shared():
    share = CpuShare()
    sum(i * i for i in range(200_000))  # some work of our own, which is not "others"
    measured = share.others()
    if Path("/proc/stat").is_file():
        assert measured is not None and 0.0 <= measured <= 1.0
    assert is_shared(None) and is_shared(SHARED_ABOVE + 0.01) and not is_shared(0.0)


def test_others_share_counts_our_time_out_and_stays_within_0_and_1():
    assert others_share(busy=3.0, own=2.0, wall=2.0, n_cores=2) == 0.25
    # CI once measured 1.054 over a 20 ms window: 4 busy ticks of 10 ms against 38 ms of core time
    assert others_share(busy=0.04, own=0.0, wall=0.019, n_cores=2) == 1.0
    assert others_share(busy=0.01, own=0.02, wall=0.019, n_cores=2) == 0.0


def test_busy_time_counts_only_the_cores_we_may_run_on():
    stat = ("cpu  900 0 100 5000 0 0 0 0 0 0\n"
            "cpu0 100 0 0 2000 0 0 0 0 0 0\n"
            "cpu1 300 0 100 1000 0 0 0 0 0 0\n"
            "cpu2 500 0 0 2000 0 0 0 0 0 0\n"
            "intr 12345\n")
    tick = os.sysconf("SC_CLK_TCK")
    assert busy_seconds(stat, allowed={0, 1}) == 500 / tick  # cpu2's work is not on our cores
    assert busy_seconds(stat, allowed={2}) == 500 / tick
    assert busy_seconds(stat, allowed={7}) is None
