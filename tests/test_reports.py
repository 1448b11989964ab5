"""scripts/make_reports.py on small fake repositories: the rows it writes for given results,
the verdict on each of the guide's claims, and plain "not yet measured" where results are absent."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import load_make_reports
from zhlora.config import load_config, save_config
from zhlora.experiment import write_csv
from zhlora.experiment_report import COSTS, QUALITY

REPO = Path(__file__).resolve().parents[1]


mr = load_make_reports()
SECTIONS = ["lora_code", "quick_start", "learning_curves", "default_run", "params", "lora_vs_full", "bench", "faq", "experiments", "task_adapters",
            "distill", "tuning"]


def fake_root(tmp_path: Path) -> Path:
    """A repository with a guide holding every generated section and two experiment YAMLs."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "guide.md").write_text(
        "# 指南\n\n" + "".join(f"## {n}\n\n<!-- BEGIN GENERATED: {n} -->\n<!-- END GENERATED: {n} -->\n\n"
                               for n in SECTIONS), encoding="utf-8")
    (root / "configs" / "experiments").mkdir(parents=True)
    for name in ("lora_vs_full.yaml", "r_ablation.yaml"):
        shutil.copy(REPO / "configs" / "experiments" / name, root / "configs" / "experiments" / name)
    return root


def row(point: str, grid: dict, quality: dict, **costs) -> dict:
    """A results.csv row as zhlora/experiment.py's collect makes it."""
    out = {"point": point, **grid, "seeds": 2}
    for name in QUALITY:
        mean, std = quality.get(name, (None, None))
        out[f"{name}_mean"], out[f"{name}_std"] = mean, std
    for name in COSTS:
        out[name] = costs.get(name)
    return out


def write_experiment(root: Path, name: str, rows: list[dict], overrides: dict[str, list[str]]) -> Path:
    """runs/<name>/results.csv and, per point, seed folders with config.yaml and the summaries."""
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    write_csv(rows, folder)
    for r in rows:
        for seed in (42, 43):
            run = folder / r["point"] / f"seed{seed}"
            run.mkdir(parents=True)
            save_config(load_config(None, overrides[r["point"]] + ["training.max_steps=30", "training.batch_size=8"]),
                        run / "config.yaml")
            (run / "train_summary.json").write_text(json.dumps(
                {"model": "smollm2-135m-instruct", "device": "cpu", "mixed_precision": "bf16", "steps": 30,
                 "peak_memory_kind": "process peak RSS"}), encoding="utf-8")
            (run / "evaluation_results.json").write_text(json.dumps({"settings": {"max_samples": 48}}), "utf-8")
    return folder


LORA = row("method=lora_learning_rate=0.001", {"training.method": "lora", "training.learning_rate": 0.001},
           {"exact_match": (0.40, 0.05), "test_loss": (0.9, 0.01)}, trainable_params=921_600, seconds_per_step=2.6,
           seconds_per_step_range="2.5~2.7", supervised_tokens_per_s=300.0, supervised_tokens_per_s_range="290~310",
           peak_memory_mb=1800.0, peak_memory_mb_range="1790~1810", timed_runs=3, adapter_size_mb=3.518)
FULL = row("method=full_learning_rate=5e-05", {"training.method": "full", "training.learning_rate": 5e-05},
           {"exact_match": (0.35, 0.05), "test_loss": (1.0, 0.02)}, trainable_params=134_515_008,
           seconds_per_step=6.0, seconds_per_step_range="5.9~6.1", supervised_tokens_per_s=130.0,
           supervised_tokens_per_s_range="120~140", peak_memory_mb=3900.0, peak_memory_mb_range="3890~3910",
           timed_runs=3, model_size_mb=513.2)
# comparisons.json as experiment_compare.compare writes it: full minus LoRA
FULL_VS_LORA = {"reference": LORA["point"], "seeds": [42, 43], "points": {FULL["point"]: {
    "exact_match": {"diff": -0.05, "ci": [-0.15, 0.04], "rows": 40, "verdict": "same", "paired_by": "row"},
    "avg_similarity": {"diff": 0.07, "ci": [0.02, 0.11], "rows": 40, "verdict": "higher", "paired_by": "row"},
    "test_loss": {"diff": -0.26, "ci": [-0.4, -0.1], "seeds": 2, "verdict": "lower", "paired_by": "seed"}}}}
RECIPES = {LORA["point"]: ["training.method=lora", "training.learning_rate=1e-3"],
           FULL["point"]: ["training.method=full", "training.learning_rate=5e-5"]}


def generated(text: str, name: str) -> str:
    return text.split(f"<!-- BEGIN GENERATED: {name} -->")[1].split(f"<!-- END GENERATED: {name} -->")[0]


def test_absent_results_are_said_plainly(tmp_path):
    root = fake_root(tmp_path)
    assert mr.main(["--root", str(root)]) == 0
    report = (root / "docs" / "results" / "performance.md").read_text(encoding="utf-8")
    guide = (root / "docs" / "guide.md").read_text(encoding="utf-8")
    assert report.count("尚未测量。") == 2  # LoRA vs full, and the benchmarks
    assert "`zhlora experiment configs/experiments/lora_vs_full.yaml`" in report
    assert "`python bench/train_throughput.py`" in report
    for name in ("lora_vs_full", "bench", "quick_start", "task_adapters", "distill"):
        assert "尚未测量" in generated(guide, name) and "|" not in generated(guide, name)  # no table, no number
    faq = generated(guide, "faq")
    timed = sum(key in mr.FAQ_TIMED for *_, shown in mr.FAQ for key, _ in shown)  # from faq_timing: "待测"
    assert faq.count("| 未测量 | 未测量 |") == sum(len(shown) for *_, shown in mr.FAQ) - timed > 0
    assert faq.count("| 待测 | 待测 |") == timed > 0 and "`runs/faq/lr_high`" in faq
    experiments = generated(guide, "experiments")
    assert "#### r_ablation" in experiments and experiments.count("尚未测量") == 2
    assert "找不到 `zhlora/lora.py`" in generated(guide, "lora_code")
    assert mr.main(["--root", str(root), "--check"]) == 0


def test_lora_vs_full_rows_beside_the_claims(tmp_path):
    root = fake_root(tmp_path)
    write_experiment(root, "lora_vs_full", [LORA, FULL], RECIPES)
    (root / "runs" / "lora_vs_full" / "comparisons.json").write_text(json.dumps(FULL_VS_LORA), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    report = (root / "docs" / "results" / "performance.md").read_text(encoding="utf-8")
    assert "| 可训练参数 | 921,600 | 134,515,008 | 0.69% | 减少 99.8% | 不成立 |" in report
    # time and memory: the median of the timed runs, with their range
    assert "| 每步秒数 | 2.600（2.500–2.700） | 6.000（5.900–6.100） | 0.43 | 1/3 | 不成立 |" in report
    assert "| 峰值内存 MB | 1,800（1,790–1,810） | 3,900（3,890–3,910） | 0.46 | 1/4 | 不成立 |" in report
    assert "每步秒数与峰值内存是独占 CPU 的运行的中位数（括号里是范围）" in report
    assert "| 保存大小 MB | 3.518 | 513.2 | 0.69% | 几 MB | 成立 |" in report
    assert "| 精确匹配 | 0.400 ± 0.050 | 0.350 ± 0.050 | +0.050 | 接近全量 | 相当 |" in report
    # each verdict is the interval's: a tie on exact match, full fine-tuning better on similarity and loss
    assert "精确匹配 全量 − LoRA = -0.050，95% 区间 [-0.150, +0.040] → 相当" in report
    assert "字符相似度 全量 − LoRA = +0.070，95% 区间 [+0.020, +0.110] → 全量更好" in report
    assert "测试 loss 全量 − LoRA = -0.260，95% 区间 [-0.400, -0.100] → 全量更好" in report
    assert (root / "docs" / "results" / "data" / "experiments" / "lora_vs_full" / "comparisons.json").is_file()
    # the reasons are computed from the same numbers: model state 16 B x 134.5M params ~ 2,053 MB
    assert "约 2,053 MB" in report and "减少 99.31%" in report and "是 adapter 的 146 倍" in report
    assert "同样设置在 Qwen2.5-0.5B（更宽）上减少 99.78%" in report  # r=16 on q_proj, v_proj, from its config
    snapshot = root / "docs" / "results" / "data" / "experiments" / "lora_vs_full"
    assert (snapshot / "results.csv").read_bytes() == (root / "runs" / "lora_vs_full" / "results.csv").read_bytes()
    assert (snapshot / LORA["point"] / "seed43" / "config.yaml").is_file()
    guide = (root / "docs" / "guide.md").read_text(encoding="utf-8")
    assert "| 可训练参数 | 921,600 |" in generated(guide, "lora_vs_full")


def test_the_snapshot_outlives_the_runs_and_check_catches_edits(tmp_path):
    root = fake_root(tmp_path)
    write_experiment(root, "lora_vs_full", [LORA, FULL], RECIPES)
    assert mr.main(["--root", str(root)]) == 0
    report = root / "docs" / "results" / "performance.md"
    before = report.read_text(encoding="utf-8")
    shutil.rmtree(root / "runs")  # a fresh clone: runs/ is not in git
    assert mr.main(["--root", str(root)]) == 0
    assert report.read_text(encoding="utf-8") == before
    assert mr.main(["--root", str(root), "--check"]) == 0
    report.write_text(before.replace("921,600", "900,000"), encoding="utf-8")  # typed by hand
    assert mr.main(["--root", str(root), "--check"]) == 1
    guide = root / "docs" / "guide.md"
    assert mr.main(["--root", str(root), "--no_collect"]) == 0  # puts it right
    guide.write_text(guide.read_text(encoding="utf-8").replace("| 0.69% |", "| 0.2% |", 1), encoding="utf-8")
    assert mr.main(["--root", str(root), "--check"]) == 1


def test_claims_that_hold_at_the_scale_they_come_from():
    """Qwen2.5-0.5B-like figures: 0.22% of the parameters, a third of the time, a quarter of the memory."""
    lora = {**row("lora", {}, {"exact_match": (0.5, None)}, trainable_params=1_081_344, seconds_per_step=1.0,
                  peak_memory_mb=1000.0, adapter_size_mb=4.1, timed_runs=3),
            "config": {"lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]}, "training": {}}, "summary": {},
            "evaluation": {}}
    full = {**row("full", {}, {"exact_match": (0.2, None)}, trainable_params=494_032_768, seconds_per_step=3.2,
                  peak_memory_mb=9000.0, model_size_mb=1884.0, timed_runs=3), "config": {}, "summary": {}, "evaluation": {}}
    assert "精确匹配" not in {c[0] for c in mr.claims(lora, full)}  # no comparisons.json: no quality verdict
    full["comparison"] = {"exact_match": {"diff": -0.3, "ci": [-0.45, -0.15], "verdict": "lower"}}
    verdicts = {c[0]: c[5] for c in mr.claims(lora, full)}
    assert verdicts == {"可训练参数": "成立", "每步秒数": "成立", "峰值内存 MB": "成立", "保存大小 MB": "成立",
                        "精确匹配": "LoRA 更好"}
    # times from fewer than 3 runs that had the CPU alone (the timing rule) are not compared at all
    untimed = {c[0] for c in mr.claims({**lora, "timed_runs": 2}, full)}
    assert "每步秒数" not in untimed and "峰值内存 MB" not in untimed and "可训练参数" in untimed


def test_bench_results_fill_the_speed_section(tmp_path):
    root = fake_root(tmp_path)
    results = root / "bench" / "results"
    results.mkdir(parents=True)
    machine = {"cpu": "Xeon", "cores": 2, "memory_gb": 23.5, "torch": "2.13.0+cpu", "python": "/usr/bin/python3"}
    paired = {"x": 2.5, "range": [2.25, 2.75], "pairs": 3}  # bench/summarize.paired
    measured = {"mixed": {"zhlora_fastest": {"span": "2025-01-01 10:00-10:20", "x_llamafactory_best": paired},
                          "zhlora_default": {"span": "2024-12-31 10:00-10:20", "x_llamafactory_best": None}}}
    (results / "summary.json").write_text(json.dumps(
        {"speedup_vs_llamafactory": 2.6, "speedup_vs_llamafactory_alpaca_zh_demo": 1.2, "mfu": 0.31,
         "peak_rss_mb_low_memory": 3300.0, "llamafactory_default_peak_rss_mb": 3061.0, "machine": machine,
         "date": "2025-01-01", "measured": measured, "apart": ["speedup_low_memory_vs_llamafactory"]}),
        encoding="utf-8")
    runner = {"supervised_tokens_per_s": 120.0, "supervised_tokens_per_s_range": [110.0, 130.0],
              "peak_rss_mb": 3500.0, "repeats": 3}
    (results / "train_throughput.json").write_text(json.dumps(
        {"median": {"zhlora_fastest": runner, "zhlora_default": runner}}), "utf-8")
    (results / "peer_llamafactory.json").write_text(json.dumps(
        {"best": "lf_bf16", "median": {"lf_bf16": {**runner, "supervised_tokens_per_s": 48.0}}}), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    report = (root / "docs" / "results" / "performance.md").read_text(encoding="utf-8")
    assert "机器：Xeon，2 核，内存 23.5 GB，torch 2.13.0+cpu；日期：2025 年 1 月 1 日。" in report
    assert "| 2.60 | ≥ 2.50 | 达到 |" in report and "| 1.20 | ≥ 2.50 | 未达到 |" in report
    assert "| 3,300 | ≤ 3,061 | 未达到 |" in report  # the bar is LLaMA-Factory's measured default
    assert "`speedup_batched` | 生成 token/s：补位批量贪心 vs 逐条贪心 | **尚未测量" in report
    assert "| `zhlora_fastest` | 120.0 | 110.0–130.0 | 2.50（2.25–2.75） | 3,500 | 3 | 2025-01-01 10:00-10:20 |" in report
    # a row not measured beside LLaMA-Factory's best gets no ratio to it (bench/side_by_side.sh)
    assert "| `zhlora_default` | 120.0 | 110.0–130.0 | - | 3,500 | 3 | 2024-12-31 10:00-10:20 |" in report
    assert "| 不是同时段测的，不作比较 |" in report
    assert "/usr/bin" not in report  # no machine path, no Python dict


def test_faq_before_and_after(tmp_path):
    root = fake_root(tmp_path)
    high, ok = root / "runs" / "faq" / "lr_high", root / "runs" / "faq" / "lr_ok"
    for folder, losses in ((high, [2.5, 7.0, 12.0]), (ok, [2.5, 1.2, 0.6])):
        folder.mkdir(parents=True)
        (folder / "training_history.jsonl").write_text("".join(
            json.dumps({"step": 5 * (i + 1), "loss": loss}) + "\n" for i, loss in enumerate(losses)), "utf-8")
    (ok / "train_summary.json").write_text(json.dumps({"final_loss": 0.6, "final_eval_loss": 0.7}), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    faq = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "faq")
    assert "| 不收敛：学习率过大 | 首个训练 loss | 2.500 | 2.500 |" in faq
    assert "| 不收敛：学习率过大 | 最后训练 loss | 第 15 步后停止，无 train_summary.json | 0.600 |" in faq
    assert "| 生成效果差：训练太少 | 精确匹配 | 未测量 | 未测量 |" in faq
    assert "`runs/faq/steps_10`" in faq and "`runs/faq/lr_ok`" not in faq


def test_experiment_table_and_computed_verdicts(tmp_path):
    root = fake_root(tmp_path)
    rows = [row("r=4_lora_alpha=8", {"lora.r": 4, "lora.lora_alpha": 8}, {"exact_match": (0.30, 0.01)},
                trainable_params=230_400, supervised_tokens_per_s=300.0, supervised_tokens_per_s_range="290~310",
                peak_memory_mb=1700.0, peak_memory_mb_range="1690~1720", timed_runs=3, adapter_size_mb=0.88),
            row("r=16_lora_alpha=32", {"lora.r": 16, "lora.lora_alpha": 32}, {"exact_match": (0.31, 0.02)},
                trainable_params=921_600, timed_runs=1, adapter_size_mb=3.52)]  # shared CPU: no time or memory
    write_experiment(root, "r_ablation", rows, {"r=4_lora_alpha=8": ["lora.r=4"], "r=16_lora_alpha=32": []})
    (root / "runs" / "r_ablation" / "quality_vs_r.png").write_bytes(b"\x89PNG fake")
    (root / "runs" / "r_ablation" / "comparisons.json").write_text(json.dumps(
        {"reference": "r=16_lora_alpha=32", "seeds": [42, 43], "points": {"r=4_lora_alpha=8": {
            "exact_match": {"diff": -0.01, "ci": [-0.08, 0.06], "verdict": "same"},
            "test_loss": {"diff": 0.2, "ci": [0.1, 0.3], "verdict": "higher"}}}}), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    experiments = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "experiments")
    assert ("| `r=4_lora_alpha=8` | 2 | 0.300 ± 0.010 | - | - | 230,400 | 300.0（290.0–310.0） | 1,700（1,690–1,720） "
            "| 0.880 |" in experiments)
    assert "| `r=16_lora_alpha=32` | 2 | 0.310 ± 0.020 | - | - | 921,600 |  |  | 3.520 |" in experiments
    assert "与参照点 `r=16_lora_alpha=32` 逐个比较" in experiments
    assert "- `r=4_lora_alpha=8`：精确匹配 -0.010 [-0.080, +0.060] → 相当（区间含 0）；测试 loss +0.200 [+0.100, +0.300] → 更高。" \
        in experiments
    assert "最高" not in experiments  # nothing is ranked by hand
    assert "![quality_vs_r](results/data/experiments/r_ablation/quality_vs_r.png)" in experiments
    assert (root / "docs" / "results" / "data" / "experiments" / "r_ablation" / "quality_vs_r.png").is_file()
    assert "#### lora_vs_full" in experiments and "尚未测量" in experiments.split("#### lora_vs_full")[1]


def test_tuning_advice_is_judged_by_its_rule_from_the_intervals(tmp_path):
    root = fake_root(tmp_path)
    points = {"r=16_lora_alpha=32": [], "r=32_lora_alpha=64": ["lora.r=32", "lora.lora_alpha=64"]}
    write_experiment(root, "r_ablation", [row(p, {}, {"exact_match": (0.5, 0.01)}) for p in points], points)

    def tuning(r32_exact_match: str) -> str:
        (root / "runs" / "r_ablation" / "comparisons.json").write_text(json.dumps(
            {"reference": "r=16_lora_alpha=32", "seeds": [42, 43, 44], "points": {"r=32_lora_alpha=64": {
                "exact_match": {"diff": 0.1, "ci": [0.05, 0.15] if r32_exact_match == "higher" else [-0.02, 0.2],
                                "verdict": r32_exact_match},
                "test_loss": {"diff": -0.1, "ci": [-0.3, 0.1], "verdict": "same"}}}}), "utf-8")
        assert mr.main(["--root", str(root)]) == 0
        return generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "tuning")

    better = tuning("higher")  # the larger r helped: "more parameters, nothing better" does not hold
    assert "`r=32_lora_alpha=64`：精确匹配 +0.100 [+0.050, +0.150]（更高），测试 loss -0.100 [-0.300, +0.100]" in better
    assert "原建议在这里不成立（判据：r=32 比 r=16 的精确匹配不更高、测试 loss 不更低）" in better
    assert "原建议在这里成立" in tuning("same")
    assert "**学习率**" in better and "尚未测量" in better.split("**学习率**")[1]  # no lr_ablation run yet


def verdicts(**metrics):
    return {m: {"diff": 0.1, "ci": [0.05, 0.15], "verdict": v} for m, v in metrics.items()}


@pytest.mark.parametrize("name, points, expected", [
    # the seed's default 2e-4 holds when the two nearest rates are no worse than 1e-3
    ("lr_ablation", {"learning_rate=0.0003": verdicts(exact_match="same", test_loss="same"),
                     "learning_rate=0.0001": verdicts(exact_match="lower", test_loss="same")}, "不成立"),
    ("lr_ablation", {"learning_rate=0.0003": verdicts(exact_match="same", test_loss="same"),
                     "learning_rate=0.0001": verdicts(exact_match="same", test_loss="same")}, "成立"),
    # LoRA close to full: holds unless full is better on a metric; LoRA better still holds
    ("lora_vs_full", {"method=full_learning_rate=5e-05": verdicts(exact_match="lower", avg_similarity="same",
                                                                  test_loss="higher")}, "成立"),
    ("lora_vs_full", {"method=full_learning_rate=5e-05": verdicts(exact_match="same", avg_similarity="higher",
                                                                  test_loss="same")}, "不成立"),
    # a verdict the rule reads is unknown (one seed): no judgement at all
    ("lora_vs_full", {"method=full_learning_rate=5e-05": verdicts(exact_match="same", avg_similarity="unknown",
                                                                  test_loss="same")}, None),
])
def test_tuning_rules(name, points, expected, tmp_path):
    root = fake_root(tmp_path)
    snapshot = root / "docs" / "results" / "data" / "experiments" / name
    snapshot.mkdir(parents=True)
    (snapshot / "comparisons.json").write_text(json.dumps({"reference": "ref", "seeds": [42, 43], "points": points}))
    text = mr.section_tuning(root, root / "docs" / "results" / "data", "results/data")
    line = next(b for b in text.split("\n- ") if f"`configs/experiments/{name}.yaml`" in b)
    if expected is None:
        assert "原建议在这里" not in line
    else:
        assert f"原建议在这里{expected}（判据" in line


def test_an_experiment_with_groups_gets_a_table_and_verdicts_per_group(tmp_path):
    root = fake_root(tmp_path)
    points = {"train_file=mixed": [], "train_file=alpaca": []}
    rows = [row(p, {}, {"exact_match": (0.5, 0.01)}) for p in points]
    for r, loss in zip(rows, (1.5, 1.2)):  # rouge_l as evaluate writes it, x 100
        r.update({"test_loss@alpaca_mean": loss, "test_loss@alpaca_std": 0.01, "rouge_l@alpaca_mean": 25.0,
                  "rouge_l@alpaca_std": None, "exact_match@alpaca_mean": None, "exact_match@alpaca_std": None})
    write_experiment(root, "datasets", rows, points)
    same = {"exact_match": {"diff": None}, "test_loss": {"diff": -0.3, "ci": [-0.4, -0.2], "verdict": "lower"}}
    (root / "runs" / "datasets" / "comparisons.json").write_text(json.dumps(
        {"reference": "train_file=mixed", "seeds": [42, 43], "points": {"train_file=alpaca": same},
         "groups": {"alpaca": {"tasks": ["user"], "points": {"train_file=alpaca": same}}}}), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    experiments = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "experiments")
    assert "只看 alpaca 组的测试行（任务：user）：" in experiments
    assert "| 点 | ROUGE-L（0-1） | 测试 loss |" in experiments  # no exact match: no row of the group has one
    assert "| `train_file=alpaca` | 0.250 | 1.200 ± 0.010 |" in experiments
    assert "只看 alpaca 组的测试行，与参照点 `train_file=mixed` 逐个比较" in experiments
    assert "测试 loss -0.300 [-0.400, -0.200] → 更低" in experiments.split("只看 alpaca 组的测试行，")[1]


def test_faq_times_come_from_the_timing_experiment_of_the_same_commands():
    """Every timed FAQ figure has its point in faq_timing.yaml, and that point runs the FAQ command's settings."""
    from zhlora.experiment import load_experiment, slug

    exp = load_experiment(REPO / "configs" / "experiments" / "faq_timing.yaml")
    points = {slug(p): p for p in exp.points()}
    cases = {name for _, before, after, shown in mr.FAQ for name in (before, after)
             if any(key in mr.FAQ_TIMED for key, _ in shown)}
    assert cases == set(mr.FAQ_TIMING_POINTS) and set(mr.FAQ_TIMING_POINTS.values()) == set(points)
    guide = (REPO / "docs" / "guide.md").read_text(encoding="utf-8")
    for case, point in mr.FAQ_TIMING_POINTS.items():
        command = next(line for line in guide.splitlines() if f"output.dir=runs/faq/{case}" in line)
        overrides = {a for a in shlex.split(command) if "=" in a and not a.startswith("output.dir=")}
        assert overrides == {f"{key}={str(value).lower()}" for key, value in points[point].items()}, case


def test_quick_start_section_from_outputs(tmp_path):
    root = fake_root(tmp_path)
    out = root / "outputs"
    out.mkdir()
    (out / "train_summary.json").write_text(json.dumps(
        {"model": "smollm2-135m-instruct", "device": "cpu", "mixed_precision": "bf16", "trainable_params": 921_600,
         "total_params": 135_436_608, "trainable_percent": 0.6805, "steps": 100, "seconds_per_step": 2.61,
         "supervised_tokens_per_s": 310.2, "final_loss": 0.41, "final_eval_loss": 0.45, "peak_memory_mb": 1834.0,
         "peak_memory_kind": "process peak RSS", "adapter_size_mb": 3.518}), encoding="utf-8")
    (out / "evaluation_results.json").write_text(json.dumps(
        {"exact_match": 0.5, "success_rate": 0.9, "test_loss": 0.5, "num_samples": 40, "num_generated": 12,
         "per_task": {"cn2num": {"n": 30, "exact_match": 0.6, "exact_match_ci": [0.42, 0.75]},
                      "open_qa": {"n": 4}, "self_cognition": {"n": 6, "exact_match": 1.0, "exact_match_ci": [0.61, 1.0]}},
         "forced_vs_generated": {"rows": 10, "agree": 9},
         "baseline": {"exact_match": 0.1, "success_rate": 0.2, "test_loss": 2.0,
                      "per_task": {"cn2num": {"exact_match": 0.0}, "self_cognition": {"exact_match": 0.0}}},
         "delta_ci": {"exact_match": [0.25, 0.55], "success_rate": None},
         "settings": {"max_samples": 48, "max_new_tokens": 48}}), encoding="utf-8")
    (out / "quick_start_timing.json").write_text(json.dumps({"prepare": 10, "train": 400, "evaluate": 90,
                                                             "plot": 5, "demo": 40, "total": 545}), encoding="utf-8")
    (out / "demo_heldout.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [
        {"task": "cn2num", "instruction": "麻烦写成数字。", "input": "四百二十", "output": "420",
         "base_response": "Four | hundred", "base_correct": False, "response": "420", "correct": True},
        {"task": "cn2num", "instruction": "这个是多少？", "input": "五", "output": "5",
         "base_response": "5", "base_correct": True, "response": "5", "correct": True}]), encoding="utf-8")
    assert mr.main(["--root", str(root)]) == 0
    section = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "quick_start")
    assert "| 可训练参数 | 921,600 / 135,436,608 （0.68%） |" in section
    # each metric by its bilingual label (zhlora.metrics.LABELS): success_rate is not "success";
    # the difference's paired 95% interval where evaluate.py gives one (not for test_loss)
    assert "| 精确匹配（exact_match） | 0.100 | 0.500 | +0.400 | [+0.250, +0.550] |" in section
    assert "| 作答并停止（success_rate） | 0.200 | 0.900 | +0.700 | - |" in section
    assert "| 测试损失（test_loss） | 2.000 | 0.500 | -1.500 | - |" in section
    # per task: n, base -> LoRA, LoRA's interval; open_qa has no exact match; self_cognition is apart
    assert "| cn2num | 30 | 0.000 | 0.600 | [0.420, 0.750] |" in section and "| open_qa |" not in section
    assert "| self_cognition（单独计分） | 6 | 0.000 | 1.000 | [0.610, 1.000] |" in section
    assert "总用时 9.1 分钟（一次运行）：第二步 数据 10 秒，第三步 训练 400 秒，第四步 评估 90 秒" in section
    assert "bench/quick_start.py" not in section  # no repeated timing yet
    assert "两种判定有 9 行一致" in section and "各指标的定义见“第四步：评估”的指标表。" in section
    # the held-out demo: the tally, then one example per task, a pipe inside an answer escaped
    assert "| cn2num | 2 | 1 | 2 |" in section
    assert "| 麻烦写成数字。 四百二十 | 420 | Four \\| hundred | 420 |" in section


def test_an_unknown_section_is_refused(tmp_path, capsys):
    root = fake_root(tmp_path)
    guide = root / "docs" / "guide.md"
    guide.write_text(guide.read_text(encoding="utf-8") + "<!-- BEGIN GENERATED: tabel -->\n<!-- END GENERATED: tabel -->\n",
                     encoding="utf-8")
    assert mr.main(["--root", str(root)]) == 2
    assert "unknown generated section 'tabel'" in capsys.readouterr().err


def test_task_adapter_report_and_distillation(tmp_path):
    root = fake_root(tmp_path)
    adapters = root / "runs" / "adapters_eval"
    adapters.mkdir(parents=True)
    (adapters / "report.md").write_text("| task | n | task adapter |\n|---|---|---|\n| s2t | 9 | 0.667 (s2t) |\n", "utf-8")
    (adapters / "evaluation_results.json").write_text(json.dumps({"adapters": {"s2t": {
        "baseline": {"per_task": {"s2t": {"exact_match": 0.0, "n": 9}}}}}}), "utf-8")
    distill, outputs = root / "runs" / "distill", root / "outputs"
    for folder, summary, results in (
            (root / "runs" / "distill_labels_only", {"seconds_per_step": 1.25, "peak_memory_mb": 2900.0},
             {"exact_match": 0.125, "test_loss": 2.5, "baseline": {}}),
            (distill, {"total_params": 70_000_000, "trainable_params": 2_000_000, "steps": 100,
                       "seconds_per_step": 1.5, "peak_memory_mb": 3000.0},
             {"exact_match": 0.25, "test_loss": 2.0, "settings": {"max_samples": 48},
              "baseline": {"exact_match": 0.0, "test_loss": 6.5}}),
            (outputs, {"trainable_params": 921_600, "total_params": 135_436_608, "trainable_percent": 0.68},
             {"exact_match": 0.5, "test_loss": 1.7, "baseline": {}})):
        folder.mkdir(parents=True)
        (folder / "train_summary.json").write_text(json.dumps(summary), "utf-8")
        (folder / "evaluation_results.json").write_text(json.dumps(results), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    guide = (root / "docs" / "guide.md").read_text(encoding="utf-8")
    task = generated(guide, "task_adapters")
    assert "| s2t | 9 | 0.667 (s2t) |" in task and "s2t 0.000" in task
    lines = generated(guide, "distill").splitlines()
    assert any(line.startswith("| 学生，蒸馏前") and "| 0.000 |" in line and "| 6.500 |" in line for line in lines)
    assert any(line.startswith("| 学生，蒸馏后") and "| 0.250 |" in line and "| 2.000 |" in line for line in lines)
    assert any(line.startswith("| 学生，只用标签") and "| 0.125 |" in line and "| 2.500 |" in line for line in lines)
    assert any(line.startswith("| 教师") and "| 0.500 |" in line for line in lines)
    assert "秒/步" not in generated(guide, "distill")  # one run each: no time figure (the timing rule)
    assert "蒸馏后的测试 loss 是 2.000，只用标签训练是 2.500（差 -0.500）" in generated(guide, "distill")
    assert "70,000,000" in generated(guide, "distill")
    header = next(line for line in lines if line.startswith("| 模型"))
    assert "| 作答并停止（success_rate） |" in header and "answered" not in header


@pytest.mark.parametrize("labels_only_loss, words", [(1.5, "只用标签训练是 1.500（差 +0.500）"), (None, None)])
def test_distillation_sentence_follows_the_numbers(tmp_path, labels_only_loss, words):
    root = fake_root(tmp_path)
    for name, loss in (("runs/distill", 2.0), ("runs/distill_labels_only", labels_only_loss), ("outputs", 1.7)):
        folder = root / name
        folder.mkdir(parents=True)
        summary = {"steps": 10, "trainable_params": 921_600, "total_params": 135_436_608, "trainable_percent": 0.68}
        (folder / "train_summary.json").write_text(json.dumps(summary), "utf-8")
        (folder / "evaluation_results.json").write_text(json.dumps({"test_loss": loss, "baseline": {}}), "utf-8")
    assert mr.main(["--root", str(root)]) == 0  # a labels-only run without a test loss must not stop the report
    text = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "distill")
    if words:
        assert words in text
    else:
        assert "只用标签训练是" not in text and "| 学生，只用标签训练（同样设置，不用教师） | - |" in text


def test_learning_curve_verdicts_follow_the_paired_intervals(tmp_path):
    root = fake_root(tmp_path)
    folder = root / "docs" / "results" / "data" / "learning_curves"
    folder.mkdir(parents=True)
    tasks = {"cn2num": {"n": 63, "exact_match": 0.5, "ci": [0.4, 0.6]}}

    def point(modules, lr, steps, em, diff=None, ci=None):
        out = {"method": "lora", "target_modules": modules, "learning_rate": lr, "steps": steps, "exact_match": em,
               "exact_match_ci": [em - 0.05, em + 0.05], "rows": 252, "tasks": tasks}
        return out if diff is None else {**out, "diff_vs_reference": diff, "diff_ci": ci}

    (folder / "curves.json").write_text(json.dumps([
        point("all-linear", 1e-3, 200, 0.647),
        point("q_proj,v_proj", 1e-3, 200, 0.397, -0.25, [-0.31, -0.19]),
        point("all-linear", 3e-3, 200, 0.66, 0.013, [-0.03, 0.05]),
        point("all-linear", 1e-3, 400, 0.75, 0.10, [0.05, 0.15])]), encoding="utf-8")
    assert mr.main(["--root", str(root), "--no_collect"]) == 0
    section = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "learning_curves")
    assert "| LoRA all-linear | 0.001 | 200 | 0.647 | [0.597, 0.697] | （基准） | 0.500 |" in section
    assert "LoRA q_proj,v_proj、学习率 0.001、200 步：精确匹配 0.397，比参照设置低 0.250" in section
    assert "学习率 0.003、200 步：精确匹配 0.660，与参照设置相当（区间含 0" in section  # a tie is no winner
    assert "400 步：精确匹配 0.750，比参照设置高 0.100，配对 95% 区间 [+0.050, +0.150]" in section


def test_the_snapshot_names_no_path_of_this_machine(tmp_path):
    """Result files often hold absolute paths (output.dir, a cached model); the snapshot makes them
    relative to the repository, or to ~, so docs/ never names this machine's folders."""
    root = fake_root(tmp_path)
    write_experiment(root, "lora_vs_full", [LORA, FULL], RECIPES)
    run = root / "runs" / "lora_vs_full" / LORA["point"] / "seed42"
    (run / "train_summary.json").write_text(json.dumps(
        {"model": str(Path.home() / ".cache" / "zhlora" / "m"), "dir": str(run)}), encoding="utf-8")
    assert mr.main(["--root", str(root)]) == 0
    copied = (root / "docs" / "results" / "data" / "experiments" / "lora_vs_full" / LORA["point"] / "seed42"
              / "train_summary.json").read_text(encoding="utf-8")
    assert str(root) not in copied and str(Path.home()) not in copied
    assert f'"runs/lora_vs_full/{LORA["point"]}/seed42"' in copied and '"~/.cache/zhlora/m"' in copied


def test_the_quick_start_timed_from_scratch_three_times(tmp_path):
    """bench/quick_start.py's medians and ranges join the quick-start section; fewer than 3 idle runs do not."""
    root = fake_root(tmp_path)
    (root / "outputs").mkdir()
    (root / "outputs" / "train_summary.json").write_text(json.dumps(
        {"model": "m", "device": "cpu", "trainable_params": 1, "total_params": 2, "trainable_percent": 50.0}), "utf-8")
    bench = {"date": "2026-12-01T01:00:00+00:00", "repeats": 3, "dropped": 1, "total": 360.0, "total_range": [350.0, 372.0],
             "prepare": 4.0, "prepare_range": [4.0, 5.0], "evaluate": 72.0, "evaluate_range": [70.0, 75.0],
             "evaluate_share": 0.2, "evaluate_share_range": [0.19, 0.21],
             "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gb": 23.5, "torch": "2.13.0+cpu"}}
    (root / "bench" / "results").mkdir(parents=True)
    (root / "bench" / "results" / "quick_start.json").write_text(json.dumps(bench), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    section = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "quick_start")
    assert ("`python bench/quick_start.py` 在空闲的机器上从头运行 3 次（AMD EPYC，2 核，内存 23.5 GB，torch 2.13.0+cpu，"
            "2026 年 12 月 1 日），中位数（范围）："
            "总用时 6.0 分钟（5.8–6.2），第二步 数据 4 秒（4–5），第四步 评估 72 秒（70–75）；评估占总用时的 20.0%（19.0–21.0）。"
            in section)
    (root / "bench" / "results" / "quick_start.json").write_text(json.dumps({**bench, "repeats": 2}), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    assert "bench/quick_start.py" not in generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "quick_start")


def test_an_experiment_run_on_a_gpu_says_so(tmp_path):
    root = fake_root(tmp_path)
    rows = [row("r=16_lora_alpha=32", {"lora.r": 16, "lora.lora_alpha": 32}, {"exact_match": (0.31, 0.02)},
                trainable_params=921_600, timed_runs=2, adapter_size_mb=3.52)]
    write_experiment(root, "r_ablation", rows, {"r=16_lora_alpha=32": []})
    for summary_file in (root / "runs" / "r_ablation").glob("*/seed*/train_summary.json"):
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        summary_file.write_text(json.dumps({**summary, "device": "cuda"}), "utf-8")
    assert mr.main(["--root", str(root)]) == 0
    experiments = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "experiments")
    r_ablation = experiments.split("#### r_ablation")[1].split("####")[0]
    assert "本实验的训练与评估在 GPU 上运行（`cuda`，bf16 混合精度" in r_ablation
    assert "GPU" not in experiments.split("#### lora_vs_full")[1].split("####")[0]


def test_the_faq_timing_sweep_stays_out_of_the_experiment_tables(tmp_path):
    root = fake_root(tmp_path)
    shutil.copy(REPO / "configs" / "experiments" / "faq_timing.yaml", root / "configs" / "experiments" / "faq_timing.yaml")
    assert mr.main(["--root", str(root)]) == 0
    assert "#### faq_timing" not in generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "experiments")


def test_one_setting_timed_in_two_experiments_bounds_cross_table_speed_claims(tmp_path):
    root = fake_root(tmp_path)
    timed_lora = dict(trainable_params=921_600, supervised_tokens_per_s=100.0, supervised_tokens_per_s_range="95~104",
                      timed_runs=3, adapter_size_mb=3.52)
    write_experiment(root, "r_ablation", [row("r=16_lora_alpha=32", {"lora.r": 16}, {"exact_match": (0.5, 0.1)},
                                              **timed_lora)], {"r=16_lora_alpha=32": []})
    write_experiment(root, "lora_vs_full", [{**LORA, "supervised_tokens_per_s": 80.0}, FULL], RECIPES)
    assert mr.main(["--root", str(root)]) == 0
    experiments = generated((root / "docs" / "guide.md").read_text(encoding="utf-8"), "experiments")
    assert ("r_ablation 的 `r=16_lora_alpha=32` 与 lora_vs_full 的 `method=lora_learning_rate=0.001` 是同一个设置"
            in experiments and "中位数却是 100.0 与 80.0 监督 token/s，相差 25%" in experiments)
