"""plots.py: every PNG from small synthetic run files, missing files skipped, Chinese drawn."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import random
import warnings
from pathlib import Path

import pytest

from zhlora import cli, plots

PNGS = ["training_loss.png", "learning_rate.png", "grad_norm.png", "metrics_comparison.png",
        "per_task_exact_match.png", "generation_length_hist.png", "generation_time_hist.png"]
HAS_MPLFONTS = importlib.util.find_spec("mplfonts") is not None
needs_font = pytest.mark.skipif(not HAS_MPLFONTS, reason="the CJK font package is not installed: pip install mplfonts")
TASKS = ["num2cn", "cn2num", "arithmetic", "open_qa"]


def _metrics(scale: float, rng: random.Random) -> dict:
    """A summary shaped like metrics.summarize's, with every score times `scale`."""
    shares = {"success_rate": 0.9, "avg_similarity": 0.7, "exact_match": 0.6}
    hundreds = {"bleu_4": 55.0, "rouge_1": 62.0, "rouge_2": 40.0, "rouge_l": 58.0}
    summary = {k: v * scale for k, v in {**shares, **hundreds}.items()}
    summary.update(avg_generation_time=0.4 / scale, avg_length=18.0 * scale, avg_length_tokens=12.0 * scale,
                   test_loss=0.9 / scale, perplexity=math.exp(0.9 / scale), num_samples=40)
    summary["ci"] = {k: [summary[k] * 0.9, min(summary[k] * 1.1, 1.0 if k in shares else 100.0)]
                     for k in ["success_rate", "avg_similarity", "exact_match", "bleu_4", "rouge_l"]}
    summary["per_task"] = {t: {"n": 10, "avg_similarity": 0.7 * scale, "rouge_l": 58.0 * scale,
                               **({} if t == "open_qa" else {"exact_match": min(1.0, rng.random() * scale)})}
                           for t in TASKS}
    return summary


def write_run(out: Path, baseline: bool = True, evaluation: bool = True) -> Path:
    """training_history.jsonl, evaluation_results.json and predictions.jsonl, as the stages write them."""
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(5, 205, 5):  # 200 steps, logged every 5, evaluated every 50
        warmup = min(1.0, step / 20)
        lr = 2e-4 * warmup * 0.5 * (1 + math.cos(math.pi * step / 200))
        lines.append({"step": step, "epoch": step / 80, "loss": 2.5 * math.exp(-step / 60) + 0.6 + rng.gauss(0, 0.12),
                      "learning_rate": lr, "grad_norm": 1.5 * math.exp(-step / 100) + 0.3 + abs(rng.gauss(0, 0.2)),
                      "tokens_per_s": 410.0, "supervised_tokens_per_s": 160.0})
        if step % 50 == 0:
            lines.append({"step": step, "eval_loss": 2.4 * math.exp(-step / 60) + 0.75})
    (out / plots.HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    if not evaluation:
        return out
    results = _metrics(1.0, rng)
    if baseline:
        results["baseline"] = _metrics(0.5, rng)
        results["delta"] = {k: results[k] - results["baseline"][k] for k in plots.SCORES | plots.OTHERS}
    (out / plots.RESULTS_FILE).write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    rows = []
    for k in range(40):
        task = TASKS[k % len(TASKS)]
        row = {"task": task, "prediction": "一千二百三十四" * rng.randint(1, 4),
               "generation_time": 0.2 + 0.05 * (k // 8) + rng.random() * 0.1, "finished": k % 7 != 0,
               "exact_match": None if task == "open_qa" else rng.random() < 0.6}
        if baseline:
            row["baseline_prediction"] = "我不知道。" * rng.randint(1, 9)
        rows.append(row)
    (out / plots.PREDICTIONS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
    return out


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), f"{path.name} was not written"
    assert path.stat().st_size > 10_000, f"{path.name} is only {path.stat().st_size} bytes"
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and min(image.size) > 300


def _glyph_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


@pytest.mark.parametrize("baseline", [True, False])
def test_plot_run_writes_every_png(tmp_path, baseline):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = plots.plot_run(write_run(tmp_path, baseline=baseline))
    assert sorted(p.name for p in written) == sorted(PNGS)
    for name in PNGS:
        _assert_png(tmp_path / name)
    assert _glyph_warnings(caught) == []


def test_missing_evaluation_files_are_skipped(tmp_path, capsys):
    written = plots.plot_run(write_run(tmp_path, evaluation=False))
    assert sorted(p.name for p in written) == ["grad_norm.png", "learning_rate.png", "training_loss.png"]
    out = capsys.readouterr().out
    assert "evaluation_results.json not found" in out and "predictions.jsonl not found" in out


def test_empty_folder_plots_nothing(tmp_path, capsys):
    assert plots.plot_run(tmp_path) == []
    assert cli.main(["plot", "--output_dir", str(tmp_path)]) == 0
    assert "nothing to plot" in capsys.readouterr().out


def test_main_refuses_a_missing_folder(tmp_path, capsys):
    assert cli.main(["plot", "--output_dir", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_torn_last_history_line_is_skipped(tmp_path):
    write_run(tmp_path, evaluation=False)
    with open(tmp_path / plots.HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write('{"step": 205, "lo')  # training is mid-write
    rows = plots.read_log(tmp_path / plots.HISTORY_FILE)
    assert rows[-1]["step"] == 200


def test_no_checkable_task_skips_per_task_plot(tmp_path):
    write_run(tmp_path)
    results = json.loads((tmp_path / plots.RESULTS_FILE).read_text(encoding="utf-8"))
    results["per_task"] = {"open_qa": {"n": 10, "avg_similarity": 0.5, "rouge_l": 40.0, "exact_match": None}}
    results["exact_match"] = None
    del results["baseline"]
    (tmp_path / plots.RESULTS_FILE).write_text(json.dumps(results), encoding="utf-8")
    names = {p.name for p in plots.plot_run(tmp_path)}
    assert "metrics_comparison.png" in names and "per_task_exact_match.png" not in names


def test_ema_starts_at_the_first_value_and_smooths():
    smoothed = plots.ema([1.0, 0.0, 1.0, 0.0], weight=0.5)
    assert smoothed.tolist() == [1.0, 0.5, 0.75, 0.375]


@needs_font
def test_cjk_font_is_found():
    from matplotlib import font_manager

    family = plots.cjk_font()
    assert family == "Noto Sans CJK SC"
    path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    assert Path(path).name == "NotoSansCJKsc-Regular.otf"


def _render_warnings(families: list[str]) -> list[str]:
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(record=True) as caught, plt.rc_context({"font.sans-serif": families}):
        warnings.simplefilter("always")
        fig, ax = plt.subplots()
        ax.set_title("训练损失 (training loss) −0.5 壹仟贰佰 繁體")
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    return _glyph_warnings(caught)


def test_the_glyph_check_sees_missing_chinese():
    """The control: matplotlib's own DejaVu Sans has no Chinese, and the check says so."""
    assert _render_warnings(["DejaVu Sans"])


@needs_font
def test_chinese_text_renders_without_missing_glyphs():
    assert _render_warnings([plots.cjk_font()]) == []


def test_without_a_cjk_font_labels_are_english(tmp_path, monkeypatch):
    """No boxes either way: with no Chinese font the labels drop their Chinese half."""
    monkeypatch.setattr(plots, "cjk_font", lambda: None)
    assert plots.make_label(False)("训练损失", "training loss") == "training loss"
    assert plots.make_label(True)("训练损失", "training loss") == "训练损失 (training loss)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(plots.plot_run(write_run(tmp_path))) == len(PNGS)
    assert _glyph_warnings(caught) == []


def test_value_labels_stay_clear_of_error_bars():
    import matplotlib.pyplot as plt

    from zhlora.plots import _bars

    fig, ax = plt.subplots()
    # a tall bar (label inside, under its whisker), a short bar with a whisker and a bar whose whisker
    # reaches near the bottom (labels above the whisker), a bar without CI (label on top)
    _bars(ax, [0, 1, 2, 3], [80.0, 2.0, 18.0, 50.0], None, [[70.0, 90.0], [0.0, 9.0], [5.0, 31.0], None],
          [None] * 4, lambda zh, en: en)
    placed = {t.get_text(): t for t in ax.texts}
    assert placed["80.0"].get_position()[1] == 35.0 and placed["80.0"].get_color() == "white"
    assert placed["2.0"].xy[1] == 9.0  # anchored at the whisker's top, not inside the 2-high bar
    assert placed["18.0"].xy[1] == 31.0  # 0..5 under the whisker is too little room for the text
    assert placed["50.0"].xy[1] == 50.0
    plt.close(fig)

    fig, ax = plt.subplots()  # low scores on a fixed 0-105 axis: 0..8 under the whisker is too little room there
    _bars(ax, [0], [20.0], None, [[8.0, 22.0]], [None], lambda zh, en: en, top=105)
    assert ax.texts[0].xy[1] == 22.0
    plt.close(fig)


def test_metric_labels_come_from_metrics_and_say_what_success_rate_is(tmp_path, monkeypatch):
    """success_rate is drawn next to exact match: its tick must read "answered & stopped", not "success"."""
    from zhlora import metrics

    texts, save = [], plots.save_png

    def keep_texts(fig, path, **kwargs):  # read the figure's text before save_png closes it
        texts.extend(t.get_text() for ax in fig.axes for t in [*ax.get_xticklabels(), ax.title])
        return save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "save_png", keep_texts)
    plots.plot_run(write_run(tmp_path))
    label = plots.make_label(plots.cjk_font() is not None)  # as plot_run labels: English alone without a font
    for key in ("success_rate", "exact_match", "avg_similarity", "test_loss"):
        assert label(*metrics.LABELS[key], sep="\n") in texts, key
    assert any("answered & stopped" in t for t in texts)
    assert not any("成功" in t or "success" in t for t in texts)
    assert any("Wilson" in t for t in texts)  # the title says which interval the error bars are
