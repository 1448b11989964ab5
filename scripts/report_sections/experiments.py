"""实验建议 and 参数调优技巧: the experiment sweeps, their paired verdicts, and the advice they test."""
from __future__ import annotations

import math
from pathlib import Path

from zhlora.metrics import share_scale

from .common import (METRIC_WORDS, NOT_YET, REGENERATE, fmt, mean_std, number, read_json, read_results, read_yaml,
                     table, timed, timed_cell)

EXPERIMENT_ORDER = ["baseline", "r_ablation", "lr_ablation", "data_size", "datasets", "target_modules",
                    "lora_vs_full"]
# Sweeps whose figures another section shows, not 实验建议: faq_timing's points differ in steps and
# batch on purpose (they are the FAQ's commands) and score 8 test rows, so a quality table of them
# would compare nothing.
SHOWN_ELSEWHERE = {"faq_timing"}


def _experiment_size(path: Path) -> str:
    """The size of an experiment, in Chinese, computed from its YAML (points x seeds, steps, test rows)."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        return ""
    points = math.prod(len(v) for v in (raw.get("grid") or {}).values())
    seeds = 1 if raw.get("baseline_only") else len(raw.get("seeds") or [None])
    steps = next((o.split("=", 1)[1] for o in raw.get("overrides") or [] if o.startswith("training.max_steps=")), None)
    rows = (raw.get("evaluate") or {}).get("max_samples")
    tested = f"各在{'全部' if rows is None else f' {rows} 条'}测试行上评估"
    if raw.get("baseline_only"):
        return f"（不训练，只评估未训练的基座；{tested}）"
    length = f"，每次 {steps} 步" if steps else ""
    return f"（{points} 个点 × {seeds} 个种子 = {points * seeds} 次训练{length}；{tested}）"


def _run_devices(folder: Path) -> str:
    """A sentence when an experiment's runs trained somewhere other than a CPU (train_summary.json's
    `device`), since every other table of the guide comes from the 2-core CPU."""
    summaries = [read_json(p) or {} for p in sorted(folder.glob("*/seed*/train_summary.json"))]
    elsewhere = sorted({f"`{s.get('device')}`，{s.get('mixed_precision')} 混合精度" for s in summaries
                        if s.get("device") not in (None, "cpu")})
    if not elsewhere:
        return ""
    return (f"本实验的训练与评估在 GPU 上运行（{'；'.join(elsewhere)}，见各次的 `train_summary.json`），"
            "不是其他各表所用的 2 核 CPU：同样的设置与种子，换了硬件，数值会有细小差别，所以只在本表内部比较。")


VERDICT_WORDS = {"higher": "更高", "lower": "更低", "same": "相当（区间含 0）", "unknown": "无法判断（不足两个种子）"}


def verdict_lines(comparisons: dict | None, group: str | None = None) -> list[str]:
    """One sentence per point against the reference: each metric's difference, its 95% interval and
    the verdict the interval gives (experiment_compare.py); nothing is ranked by hand. With a group,
    the same over that group's test rows alone."""
    if not comparisons:
        return []
    seeds = len(comparisons.get("seeds") or [])
    points = comparisons["groups"][group]["points"] if group else comparisons["points"]
    where = f"只看 {group} 组的测试行，" if group else ""
    lines = [f"{where}与参照点 `{comparisons['reference']}` 逐个比较（精确匹配与字符相似度：同一批测试行逐行配对，"
             "每行先对种子取平均，区间反映测试题的抽样误差；测试 loss：按种子配对的 t 区间；95% 区间不含 0 才算有差别"
             + ("；只有 1 个种子，换种子带来的波动不在区间里" if seeds == 1 else "") + "）：", ""]
    for point, result in points.items():
        lines.append(f"- `{point}`：" + "；".join(f"{said} → {VERDICT_WORDS[verdict]}"
                                                for said, verdict in differences(result)) + "。")
    return lines


def differences(result: dict) -> list[tuple[str, str]]:
    """(「精确匹配 +0.098 [+0.049, +0.152]」, verdict) for each metric of one point's comparison
    with the reference that has a difference; the callers word the verdict their own way."""
    said = []
    for metric, word in METRIC_WORDS.items():
        r = result.get(metric) or {}
        if r.get("diff") is not None:
            ci = r.get("ci")
            said.append((f"{word} {r['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""), r["verdict"]))
    return said


GROUP_METRICS = {"exact_match": "精确匹配", "avg_similarity": "字符相似度", "rouge_l": "ROUGE-L（0-1）", "test_loss": "测试 loss"}


def group_sections(rows: list[dict], comparisons: dict | None) -> list[str]:
    """For an experiment with `groups`: per group, a table of its metrics over that group's test rows
    alone (metric@group columns of results.csv; a metric no row of the group has is left out) and
    the group's verdicts."""
    lines = []
    for group, tasks in ((comparisons or {}).get("groups") or {}).items():
        shown = [m for m in GROUP_METRICS if any(number(r.get(f"{m}@{group}_mean")) is not None for r in rows)]
        lines += [f"只看 {group} 组的测试行（任务：{'、'.join(tasks['tasks'])}）：", ""]
        lines += table(["点", *(GROUP_METRICS[m] for m in shown)],
                       [[f"`{r['point']}`", *(mean_std(scaled(r, f"{m}@{group}"), f"{m}@{group}") for m in shown)]
                        for r in rows])
        lines += ["", *verdict_lines(comparisons, group), ""]
    return lines


def scaled(row: dict, metric: str) -> dict:
    """The row with this metric's mean and std on the 0-1 scale of the shares (metrics.share_scale)."""
    return {**row, **{f"{metric}{end}": share_scale(metric, number(row.get(f"{metric}{end}")))
                      for end in ("_mean", "_std")}}


# The same setting measured in two experiments (the quick start's LoRA at 100 steps): how far apart two
# timed medians of one setting fall, so that speeds are compared within a table only.
SAME_SETTING = (("r_ablation", "r=16_lora_alpha=32"), ("lora_vs_full", "method=lora_learning_rate=0.001"))


def same_setting_speeds(data: Path) -> str:
    speeds = []
    for name, point in SAME_SETTING:
        row = next((r for r in read_results(data / "experiments" / name) or [] if r["point"] == point), None)
        speed = timed(row, "supervised_tokens_per_s") if row else None
        if speed is None:
            return ""
        speeds.append(speed)
    (a_name, a_point), (b_name, b_point) = SAME_SETTING
    return (f"速度只在同一张表内比较：{a_name} 的 `{a_point}` 与 {b_name} 的 `{b_point}` 是同一个设置，在不同时间各测了 3 次，"
            f"都独占 CPU，中位数却是 {speeds[0]:.1f} 与 {speeds[1]:.1f} 监督 token/s，相差 {abs(speeds[0] / speeds[1] - 1):.0%}。"
            "跨表的速度差别在这个幅度以内不算数。")


def section_experiments(root: Path, data: Path, link: str) -> str:
    configs = root / "configs" / "experiments"
    names = {p.stem for p in configs.glob("*.yaml")} | {p.name for p in (data / "experiments").glob("*") if p.is_dir()}
    names = sorted(names - SHOWN_ELSEWHERE,
                   key=lambda n: (EXPERIMENT_ORDER.index(n) if n in EXPERIMENT_ORDER else 99, n))
    lines = ["各表的指标：精确匹配（exact_match，答案与参考逐字相同的比例，0-1）、字符相似度（avg_similarity，"
             "0-1）、测试 loss（test_loss，测试集回答部分每个 token 的平均交叉熵，越低越好），均为各种子的均值 ± 标准差。"
             "速度（监督 token/s）与峰值内存只取独占 CPU 的运行（`train_summary.json` 的 `cpu_others_share` ≤ 0.05），"
             "至少 3 次时给中位数（范围），否则留空。" + same_setting_speeds(data), ""]
    for name in names:
        size = _experiment_size(configs / f"{name}.yaml")
        command = f"`zhlora experiment configs/experiments/{name}.yaml`" + (f" {size}" if size else "")
        lines += [f"#### {name}", "", command, ""]
        rows = read_results(data / "experiments" / name)
        where = _run_devices(data / "experiments" / name)
        lines += [where, ""] if where else []
        if not rows:
            lines += [f"{NOT_YET} 运行上面的命令，{REGENERATE}", ""]
            continue
        lines += table(["点", "种子数", "精确匹配", "字符相似度", "测试 loss", "可训练参数", "监督 token/s", "峰值内存 MB",
                        "保存大小 MB"],
                       [[f"`{r['point']}`", r.get("seeds", ""), mean_std(r, "exact_match"),
                         mean_std(r, "avg_similarity"), mean_std(r, "test_loss"),
                         fmt(number(r.get("trainable_params"))), timed_cell(r, "supervised_tokens_per_s"), timed_cell(r, "peak_memory_mb", 0),
                         fmt(number(r.get("adapter_size_mb")) or number(r.get("model_size_mb")))] for r in rows])
        compared = read_json(data / "experiments" / name / "comparisons.json")
        verdicts = verdict_lines(compared)
        lines += ["", *([*verdicts, ""] if verdicts else []), *group_sections(rows, compared)]
        lines += [f"![{p.stem}]({link}/experiments/{name}/{p.name})"
                  for p in sorted((data / "experiments" / name).glob("*.png"))]
        lines.append("")
    return "\n".join(lines).rstrip() or "`configs/experiments/` 中没有实验。"


# 参数调优技巧: each knob's advice from the seed guide beside what its experiment measured. The
# sentences read comparisons.json (experiment_compare.py) only: a difference is named only where its
# 95% interval excludes 0, and whether the advice holds is decided by holds(), never by hand.
# (knob, experiment, the seed's advice, the points whose comparison decides it, the metrics the rule reads,
#  holds(verdicts of those points) -> bool). A missing or "unknown" verdict of any metric read: no judgement.


def _better(v: dict) -> bool:  # exact match or similarity higher, or test loss lower
    return v.get("exact_match") == "higher" or v.get("avg_similarity") == "higher" or v.get("test_loss") == "lower"


def _worse(v: dict) -> bool:
    return v.get("exact_match") == "lower" or v.get("avg_similarity") == "lower" or v.get("test_loss") == "higher"


RULE_METRICS = ("exact_match", "test_loss")
TUNING = [
    ("r", "r_ablation", "从 8 或 16 开始；任务简单、数据少时，更大的 r 往往只带来更多参数而没有更好的效果",
     ["r=32_lora_alpha=64"], RULE_METRICS, lambda v: not _better(v[0])),
    ("学习率", "lr_ablation", "LoRA 用比全量微调大的学习率，默认 2e-4（配合 3 个 epoch）",
     ["learning_rate=0.0003", "learning_rate=0.0001"], RULE_METRICS, lambda v: not any(_worse(x) for x in v)),
    ("target_modules", "target_modules", "q_proj、v_proj 最省；效果不够时再试全部注意力投影或 all-linear",
     ["target_modules=all-linear"], RULE_METRICS, lambda v: _better(v[0])),
    ("数据量", "data_size", "没有结论，只建议在固定计算量下量一量：更多不重复的数据，还是把少量数据重复几遍",
     [], (), None),
    ("数据集", "datasets", "没有结论，只建议比较生成的任务、现成的中文指令数据（alpaca_zh_demo.json）和两者混合",
     [], (), None),
    ("LoRA 与全量微调", "lora_vs_full", "LoRA 的效果接近全量微调",
     ["method=full_learning_rate=5e-05"], ("exact_match", "avg_similarity", "test_loss"), lambda v: not _better(v[0])),
]
HOLDS_WORDS = {True: "原建议在这里成立", False: "原建议在这里不成立", None: ""}
TUNING_MEANING = {  # what "holds" means for each knob, so the judgement can be checked against the rule
    "r": "（判据：r=32 比 r=16 的精确匹配不更高、测试 loss 不更低）",
    "学习率": "（判据：3e-4 与 1e-4 的精确匹配都不比 1e-3 低、测试 loss 都不比它高；它们离原默认 2e-4 最近）",
    "target_modules": "（判据：all-linear 比 q_proj,v_proj 精确匹配更高或测试 loss 更低，即“效果不够时再加层”确有可加之处）",
    "LoRA 与全量微调": "（判据：全量微调在精确匹配、字符相似度、测试 loss 上都不比 LoRA 好）",
}


SHORT_VERDICTS = {"higher": "更高", "lower": "更低", "same": "相当", "unknown": "无法判断"}


def comparison_words(result: dict) -> str:
    """One point's differences from the reference, each with its interval and verdict word."""
    return "，".join(f"{said}（{SHORT_VERDICTS[verdict]}）" for said, verdict in differences(result))


def section_tuning(root: Path, data: Path, link: str) -> str:
    lines = []
    for knob, name, advice, deciding, read, holds in TUNING:
        compared = read_json(data / "experiments" / name / "comparisons.json")
        head = f"- **{knob}**（`configs/experiments/{name}.yaml`）：原指南：{advice}。"
        if not compared and (data / "experiments" / name / "results.csv").is_file():
            lines.append(f"{head}“实验建议”里这个实验的表来自旧的运行，没有逐个比较（comparisons.json），这里不下结论；"
                         f"删除 `runs/{name}` 后运行 `zhlora experiment configs/experiments/{name}.yaml`，{REGENERATE}")
            continue
        if not compared:
            lines.append(f"{head}{NOT_YET} 运行 `zhlora experiment configs/experiments/{name}.yaml`，{REGENERATE}")
            continue
        points = compared["points"]
        verdicts = [{m: (points[p].get(m) or {}).get("verdict") for m in METRIC_WORDS} for p in deciding if p in points]
        lines.append(f"{head}实测（{len(compared['seeds'])} 个种子，与参照点 `{compared['reference']}` 比较，"
                     "95% 区间不含 0 才算有差别）：")
        lines += [f"  - `{point}`：{comparison_words(result)}。" for point, result in points.items()]
        for group, part in (compared.get("groups") or {}).items():  # the same, on one group's test rows alone
            lines += [f"  - 只看 {group} 组的测试行，`{point}`：{comparison_words(result)}。"
                      for point, result in part["points"].items()]
        known = holds and len(verdicts) == len(deciding) and all(v[m] not in (None, "unknown") for v in verdicts
                                                                 for m in read)
        verdict = holds(verdicts) if known else None
        if HOLDS_WORDS[verdict]:
            lines.append(f"  - {HOLDS_WORDS[verdict]}{TUNING_MEANING.get(knob, '')}。")
    return "\n".join(lines)
