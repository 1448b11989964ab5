"""The benchmark scripts' bookkeeping (bench/, not run here): which runs a ratio may divide, and
how --append adds repeats. The benchmarks themselves print figures and are never timed in tests."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402  (bench/common.py)
import summarize  # noqa: E402


def runs_at(*stamps: str, speed: float = 100.0) -> list[dict]:
    return [{"date": f"2026-11-30T{t}:00+00:00", "supervised_tokens_per_s": speed} for t in stamps]


def test_the_ratio_pairs_each_run_with_the_peer_run_made_nearest_to_it():
    # the machine doubles its speed between the rounds: both tools alike
    ours = runs_at("10:00", speed=300.0) + runs_at("10:20", speed=600.0) + runs_at("10:40", speed=620.0)
    theirs = runs_at("10:05", speed=100.0) + runs_at("10:25", speed=200.0) + runs_at("10:45", speed=200.0)
    train, peer = {"runs": {"a": ours}}, {"runs": {"lf": theirs}}
    pairs = summarize.paired(train, "a", peer, "lf")
    assert pairs == {"x": pytest.approx(3.0), "range": [pytest.approx(3.0), pytest.approx(3.1)], "pairs": 3}
    theirs[0]["cpu_others_share"] = 0.5  # a shared run pairs with nothing; ours at 10:00 takes 10:25's
    assert summarize.paired(train, "a", peer, "lf")["range"][0] == pytest.approx(1.5)
    assert summarize.paired(train, "a", {"runs": {"lf": runs_at("12:00")}}, "lf") is None  # an hour apart
    assert summarize.paired(train, "a", {"runs": {"lf": [{"supervised_tokens_per_s": 1.0}]}}, "lf") is None  # no date
    assert summarize.span_words(summarize.span(train, "a")) == "2026-11-30 10:00-10:40"


def test_a_ratio_across_hours_is_reported_apart_not_as_not_run():
    median = {"supervised_tokens_per_s": 300.0}
    train = {"median": {"zhlora_fastest": {**median, "repeats": 3}},
             "runs": {"zhlora_fastest": runs_at("10:00", speed=300.0)}}
    peer = {"best": "lf", "median": {"lf": {"supervised_tokens_per_s": 100.0}}, "runs": {"lf": runs_at("12:00")}}
    assert summarize.over_peer(train, peer, "zhlora_fastest") is None
    peer["runs"]["lf"] = runs_at("10:10")
    assert summarize.over_peer(train, peer, "zhlora_fastest") == pytest.approx(3.0)
    assert summarize.met("speedup_vs_llamafactory", None, {"apart": ["speedup_vs_llamafactory"]}) == "not side by side"
    assert summarize.met("speedup_vs_llamafactory", None, {}) == "not run"


def test_append_adds_repeats_and_a_changed_variant_drops_its_old_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    here, settings = {"cpu": "x"}, {"steps": 30, "repeats": 1}
    (tmp_path / "r.json").write_text(json.dumps({
        "machine": here, "data": {"file": "d.json"}, "settings": {**settings, "overrides": {"a": ["x=1"], "b": ["y=1"]}},
        "runs": {"a": runs_at("10:00"), "b": runs_at("10:01")}}), encoding="utf-8")
    now = {"a": runs_at("10:30")}
    assert common.earlier_runs("r", "d.json", settings, now, here, {"a": ["x=1"], "b": ["y=1"]}) == \
        {"b": runs_at("10:01")}  # replace: a's old run goes, b is kept
    assert common.earlier_runs("r", "d.json", settings, now, here, {"a": ["x=1"], "b": ["y=1"]}, append=True) == \
        {"a": runs_at("10:00"), "b": runs_at("10:01")}
    assert common.earlier_runs("r", "d.json", settings, now, here, {"a": ["x=1"], "b": ["y=2"]}, append=True) == \
        {"a": runs_at("10:00")}  # b now means another setting
    assert common.earlier_runs("r", "other.json", settings, now, here, {"a": ["x=1"]}, append=True) == {}


def test_the_best_variant_is_chosen_by_its_paired_ratio_not_by_a_faster_hour():
    steady = runs_at("10:00", "10:20", "10:40", speed=250.0)
    peer = {"best": "lf", "runs": {"lf": runs_at("10:05", "10:25", "10:45")
                                   + runs_at("11:05", "11:25", "11:45", speed=200.0)}}
    train = {"runs": {"zhlora_packing": steady,  # 2.5x its neighbours
                      "zhlora_compile": runs_at("11:00", "11:20", "11:40", speed=300.0),  # 1.5x, in a faster hour
                      "zhlora_fastest": runs_at("10:01", speed=900.0)}}  # one pair: never picked
    assert summarize.best_of(train, peer) == "zhlora_packing"
    assert summarize.best_of(train, None) is None


def test_generation_measured_on_another_processor_says_where(monkeypatch):
    """The VM's processor can change between benchmarks: the table then names where generation ran."""
    gen = {"machine": {"cpu": "Intel Xeon"}, "date": "2026-12-01T02:51:33+00:00",
           "settings": {"rows": 64, "dtype": "torch.float32"},
           "median": {"one_by_one_greedy": {"tokens_per_s": 20.0, "tokens_per_s_range": [19.0, 21.0]}},
           "ratio_to_one_by_one_greedy": {}, "same_text": {}}
    monkeypatch.setattr(summarize, "load", lambda name: gen if name == "generation" else None)
    results = summarize.load_results()
    summary = {**{key: None for key in summarize.TARGETS}, "machine": {"cpu": "AMD EPYC", "cores": 2},
               "date": "2026-12-06T12:32:00+00:00", "measured": {"mixed": {}, "alpaca_zh_demo": {}}}
    assert "Generation measured on Intel Xeon, 2026-12-01T02:51:33+00:00." in summarize.markdown(summary, results)
    summary["machine"]["cpu"] = "Intel Xeon"
    assert "Generation measured on" not in summarize.markdown(summary, results)


def test_a_contended_timing_is_dropped_not_printed(capsys):
    from common import others_share_if_idle
    from zhlora.cpu_share import SHARED_ABOVE

    class Share:
        def __init__(self, value):
            self.value = value

        def others(self):
            return self.value

    assert others_share_if_idle(Share(0.0)) == 0.0
    assert others_share_if_idle(Share(SHARED_ABOVE * 2)) is None
    assert "timings dropped" in capsys.readouterr().out
