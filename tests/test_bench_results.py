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


def runs_at(*stamps: str) -> list[dict]:
    return [{"date": f"2026-11-30T{t}:00+00:00", "supervised_tokens_per_s": 100.0} for t in stamps]


def test_only_runs_made_in_the_same_hours_are_side_by_side():
    interleaved = summarize.span({"runs": {"a": runs_at("10:00", "10:20")}}, "a")
    peer = summarize.span({"runs": {"b": runs_at("10:05", "10:30")}}, "b")
    an_hour_later = summarize.span({"runs": {"b": runs_at("11:10", "11:15")}}, "b")
    assert summarize.beside(interleaved, peer)
    assert not summarize.beside(interleaved, an_hour_later)  # the 2026-11-30 mixed ratio's case
    assert not summarize.beside(interleaved, None)  # runs recorded without a date
    assert summarize.span_words(interleaved) == "2026-11-30 10:00-10:20"


def test_a_ratio_across_hours_is_reported_apart_not_as_not_run():
    median = {"supervised_tokens_per_s": 300.0}
    train = {"median": {"zhlora_fastest": {**median, "repeats": 3}}, "runs": {"zhlora_fastest": runs_at("10:00")}}
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
