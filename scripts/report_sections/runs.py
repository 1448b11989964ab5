"""The runs a learner makes: the quick start, the default run, the learning curves and the FAQ's pairs."""
from __future__ import annotations

import json
from pathlib import Path

from zhlora.metrics import SCORED_APART

from .common import (NOT_YET, REGENERATE, date_words, fmt, machine_words, read_json, read_results, read_yaml, table,
                     timed_cell, zh_label)

# 常见问题: each problem is two runs under runs/faq/ whose commands the guide shows (a test checks
# that every folder below appears in a command of the guide). Figures come from their RUN_FILES.
FAQ = [("不收敛：学习率过大", "lr_high", "lr_ok",
        [("first_loss", "首个训练 loss"), ("max_grad_norm", "训练日志中最大的 grad_norm（裁剪前）"),
         ("final_loss", "最后训练 loss"), ("final_eval_loss", "验证 loss")]),
       ("生成效果差：训练太少", "steps_10", "steps_100",
        [("exact_match", "精确匹配"), ("avg_similarity", "字符相似度"), ("final_loss", "最后训练 loss")]),
       ("内存不足：batch 太大", "mem_batch16", "mem_accum8",
        [("peak_memory_mb", "峰值内存 MB"), ("seconds_per_step", "秒/步"), ("final_loss", "最后训练 loss")]),
       ("训练太慢：fp32、不分组", "slow_fp32", "fast_bf16_packing",
        # tokens/s, not s/step: packing makes each step longer (more tokens), which is the point
        [("supervised_tokens_per_s", "有监督 token/s"), ("peak_memory_mb", "峰值内存 MB")])]
# The FAQ's time and memory figures follow the timing rule: the median (range) of 3+ runs that had the CPU
# alone, from configs/experiments/faq_timing.yaml (its points are the FAQ's commands), never one run.
FAQ_TIMED = ("peak_memory_mb", "seconds_per_step", "supervised_tokens_per_s")
FAQ_TIMING_POINTS = {"mem_batch16": "batch_size=16_max_steps=10",
                     "mem_accum8": "batch_size=2_gradient_accumulation_steps=8_gradient_checkpointing=True_"
                                   "max_steps=10",
                     "slow_fp32": "mixed_precision=no_group_by_length=False_max_steps=20",
                     "fast_bf16_packing": "mixed_precision=bf16_packing=True_max_steps=20"}


QUICK_START_EXTRA = ("demo_heldout.jsonl", "quick_start_timing.json")
# Wall seconds of each of the guide's steps 2-4 run one after another ({"prepare", "train", "evaluate", "total"}).
MAIN_PATH_TIMING = "main_path_timing.json"  # outputs/ files beyond RUN_FILES
STAGES = [("prepare", "第二步 数据"), ("train", "第三步 训练"), ("evaluate", "第四步 评估"), ("plot", "第五步 画图"),
          ("demo", "第六步 演示")]
# The metrics the quick-start section shows, each defined once, in Chinese, for a learner.
DEFINED = ["exact_match", "success_rate", "avg_similarity", "test_loss"]  # defined once: the guide's step 4


def section_quick_start(root: Path, data: Path, link: str) -> str:
    folder = data / "outputs"
    summary, results = read_json(folder / "train_summary.json"), read_json(folder / "evaluation_results.json")
    if summary is None:
        return f"{NOT_YET} 运行 `python quick_start.py`，" + REGENERATE
    timing = read_json(folder / "quick_start_timing.json") or {}
    lines = [f"`outputs/` 中的一次运行（模型 `{summary.get('model')}`，设备 `{summary.get('device')}`，"
             f"混合精度 `{summary.get('mixed_precision')}`）：", ""]
    if timing:
        share = timing.get("cpu_others_share")
        alone = ("" if share is None else
                 f"运行期间其他程序占用 CPU {100 * share:.1f}%（{'独占，计时有效' if share <= 0.05 else '有干扰，计时仅供参考'}）；")
        lines += [f"总用时 {timing['total'] / 60:.1f} 分钟（一次运行）：" + "，".join(
            f"{zh} {timing[key]:.0f} 秒" for key, zh in STAGES if key in timing) + "。" + alone
            + (f"评估占总用时的 {100 * timing['evaluate'] / timing['total']:.0f}%。" if "evaluate" in timing else ""), ""]
    repeated = read_json(data / "bench" / "quick_start.json")
    if repeated and (repeated.get("repeats") or 0) >= 3:
        lines += [quick_start_repeats(repeated), ""]
    lines += [*table(["训练", "数值"], [
        ["可训练参数", f"{summary['trainable_params']:,} / {summary['total_params']:,} "
                      f"（{summary['trainable_percent']:.2f}%）"],
        ["步数", str(summary.get("steps"))], ["秒/步", fmt(summary.get("seconds_per_step"))],
        ["最后训练 loss / 验证 loss", f"{fmt(summary.get('final_loss'))} / {fmt(summary.get('final_eval_loss'))}"],
        ["峰值内存 MB", f"{fmt(summary.get('peak_memory_mb'))}（{summary.get('peak_memory_kind', '')}）"],
        ["adapter 大小 MB", fmt(summary.get("adapter_size_mb") or summary.get("model_size_mb"))]]), ""]
    if results is None:
        lines.append(f"评估：{NOT_YET} 运行 `python training/evaluate.py --model_path outputs`，" + REGENERATE)
    else:
        lines += quick_start_results(results)
    lines += demo_examples(folder / "demo_heldout.jsonl")
    lines += ["", *(f"![{p.stem}]({link}/outputs/{p.name})" for p in sorted(folder.glob("*.png")))]
    return "\n".join(lines).rstrip()


def quick_start_repeats(bench: dict) -> str:
    """The quick start run from scratch 3 or more times (bench/quick_start.py): median (range) of each
    stage over the runs that had the CPU alone, and evaluation's share of the whole."""
    def cell(key: str, scale: float = 1.0, unit: str = " 秒", digits: int = 0) -> str:
        low, high = bench[f"{key}_range"]
        return f"{bench[key] * scale:.{digits}f}{unit}（{low * scale:.{digits}f}–{high * scale:.{digits}f}）"
    return (f"`python bench/quick_start.py` 在空闲的机器上从头运行 {bench['repeats']} 次"
            f"（{machine_words(bench['machine']) + '，' if bench.get('machine') else ''}{date_words(bench.get('date'))}），"
            f"中位数（范围）：总用时 {cell('total', 1 / 60, ' 分钟', 1)}，"
            + "，".join(f"{zh} {cell(key)}" for key, zh in STAGES if bench.get(key) is not None)
            + f"；评估占总用时的 {cell('evaluate_share', 100, '%', 1)}。")


def task_rows(results: dict) -> list[list[str]]:
    """One row per task with an exact match: task, rows scored, base, LoRA, the LoRA side's 95% interval."""
    base = results.get("baseline", {})
    rows = []
    for task, row in results.get("per_task", {}).items():
        if "exact_match" not in row:
            continue
        name = f"{task}（单独计分）" if task in SCORED_APART else task
        before = base.get("per_task", {}).get(task, {}).get("exact_match")
        rows.append([name, str(row.get("n_exact", row["n"])), fmt(before),
                     fmt(row["exact_match"]), _plain_interval(row.get("exact_match_ci"))])
    return rows


def quick_start_results(results: dict) -> list[str]:
    """The per-task table (base -> LoRA), the headline metrics with paired intervals, the definitions."""
    base, agree = results.get("baseline", {}), results.get("forced_vs_generated", {})
    rows = task_rows(results)
    lines = [f"评估：测试集全部 {results.get('num_samples')} 行。这些问题训练时没有出现过，但问法与训练相同"
             "（训练从没见过的问法见下面的演示）。有唯一正确答案的任务每行都用教师强制判定精确匹配，"
             f"self_cognition 按真实生成判定；共有 {results.get('num_generated')} 行真的贪心生成（max_new_tokens "
             f"{results.get('settings', {}).get('max_new_tokens')}），用于示例、相似度和“作答并停止”。"
             "精确匹配、作答并停止和相似度都不含单独计分的 self_cognition（它在各任务表里单独一行）；测试损失含全部行。", "",
             *table(["任务", "行数", "微调前（基座）", "微调后（LoRA）", "微调后的 95% 区间"], rows), ""]
    if agree.get("rows"):
        lines += [f"教师强制与真实生成的一致性：在同时生成了的 {agree['rows']} 行上，两种判定有 {agree['agree']} 行一致"
                  + (f"（只有生成判对 {agree['generated_only']} 行，只有教师强制判对 {agree['forced_only']} 行）"
                     if "generated_only" in agree else "") + "。教师强制要求逐 token 一致，比按文本规范化后的比较更严。", ""]
    lines += table(["指标", "微调前（基座）", "微调后（LoRA）", "差", "差的 95% 区间（逐行配对）"],
                   [[zh_label(k), fmt(base.get(k)), fmt(results.get(k)),
                     "-" if results.get(k) is None or base.get(k) is None else f"{results[k] - base[k]:+.3f}",
                     _interval((results.get("delta_ci") or {}).get(k))]
                    for k in DEFINED if k in results])
    return [*lines, "", "各指标的定义见“第四步：评估”的指标表。"]


def demo_examples(path: Path, per_task: int = 1) -> list[str]:
    """Held-out questions (phrasings training never used) answered before and after fine-tuning."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    tally = [[t, str(sum(r["task"] == t for r in rows)), str(sum(r["base_correct"] for r in rows if r["task"] == t)),
              str(sum(r["correct"] for r in rows if r["task"] == t))] for t in tasks]
    shown = [r for t in tasks for r in [r for r in rows if r["task"] == t][:per_task]]
    lines = ["", "`python examples/demo.py --model_path outputs --mode batch` 用训练时从未出现过的问法提问"
                 "（`zhlora/resources/heldout_phrasings_zh.json`），微调前后各答一遍：", "",
             *table(["任务", "题数", "微调前答对", "微调后答对"], tally), "",
             *table(["问题", "参考答案", "微调前（基座）", "微调后（LoRA）"],
                    [[_cell_text(f"{r['instruction']} {r['input']}".strip()), _cell_text(r["output"]),
                      _cell_text(r["base_response"]), _cell_text(r["response"])] for r in shown])]
    return lines


def _cell_text(text: str, limit: int = 60) -> str:
    """One table cell: no line breaks or pipes, long answers cut with an ellipsis."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


def _plain_interval(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def section_default_run(root: Path, data: Path, link: str) -> str:
    """The guide's main path (configs/default.yaml), run once as the guide writes it."""
    folder = data / "default_run"
    summary, results = read_json(folder / "train_summary.json"), read_json(folder / "evaluation_results.json")
    if summary is None or results is None:
        return (f"{NOT_YET} 按第二到第四步运行（`python data/prepare_data.py`、`python training/train.py`、"
                "`python training/evaluate.py --model_path outputs`），把 `outputs/` 复制到 `runs/default_run/`，"
                + REGENERATE)
    cfg = read_yaml(folder / "config.yaml") or {}
    training, data_cfg = cfg.get("training", {}), cfg.get("data", {})
    stages = read_json(folder / MAIN_PATH_TIMING)
    rows = task_rows(results)
    if stages:
        time_line = (f"三步一共用了 {stages['total'] / 60:.0f} 分钟：第二步 数据 {stages['prepare']:.0f} 秒，第三步 训练 "
                     f"{stages['train'] / 60:.1f} 分钟，第四步 评估 {stages['evaluate'] / 60:.1f} 分钟。")
    else:
        time_line = f"评估用了 {results.get('seconds', 0) / 60:.1f} 分钟。"
    return "\n".join([
        f"`configs/default.yaml`：{data_cfg.get('num_samples')} 条数据（{'、'.join(data_cfg.get('tasks') or ['全部任务'])}），"
        f"{training.get('num_epochs', 0):g} 个 epoch，batch {training.get('batch_size')}，"
        f"学习率 {training.get('learning_rate')}，`{','.join(cfg.get('lora', {}).get('target_modules', []))}`，"
        f"设备 `{summary.get('device')}`，混合精度 `{summary.get('mixed_precision')}`。"
        f"训练 {summary['steps']} 步，{fmt(summary['seconds_per_step'])} 秒/步；训练的 {summary['wall_seconds'] / 60:.1f} 分钟里有 "
        f"{summary['eval_and_save_seconds'] / 60:.1f} 分钟在算验证 loss 和存检查点。" + time_line,
        "",
        f"测试集 {results['num_samples']} 行（训练没见过的问题，问法与训练相同），教师强制判定精确匹配：", "",
        *table(["任务", "行数", "微调前（基座）", "微调后（LoRA）", "微调后的 95% 区间"], rows), "",
        f"合计（不含单独计分的任务）：基座 {fmt(results['baseline']['exact_match'])}，微调后 {fmt(results['exact_match'])}，"
        f"差的 95% 区间 {_interval(results.get('delta_ci', {}).get('exact_match'))}；测试损失 "
        f"{fmt(results['baseline'].get('test_loss'))} → {fmt(results.get('test_loss'))}。"])


def section_learning_curves(root: Path, data: Path, link: str) -> str:
    points = read_json(data / "learning_curves" / "curves.json")
    if not points:
        return f"{NOT_YET} 运行 `python scripts/learning_curves.py`，" + REGENERATE
    tasks = list(points[0]["tasks"])
    rows = []
    for p in points:
        setting = "全量微调" if p["method"] == "full" else f"LoRA {p['target_modules']}"
        diff = "（基准）" if "diff_ci" not in p else f"{p['diff_vs_reference']:+.3f} {_interval(p['diff_ci'])}"
        rows.append([setting, f"{p['learning_rate']:g}", str(p["steps"]), fmt(p["exact_match"]),
                     _plain_interval(p["exact_match_ci"]), diff, *(fmt(p["tasks"][t]["exact_match"]) for t in tasks)])
    n = points[0]["rows"]
    return "\n".join([
        f"每行是一次独立训练（batch 8，学习率按各自总步数预热并线性衰减），在同一份留出测试集上评估；"
        f"“精确匹配”是四类任务共 {n} 行的合计，区间为 95% Wilson 区间；“之差”是与参照设置（LoRA all-linear、"
        "学习率 1e-3、200 步）在同一批测试行上逐行配对的自助法区间，区间不含 0 才算有差别；各任务一列（self_cognition 单独计分）。"
        "由 `python scripts/learning_curves.py` 生成。", "",
        *table(["设置", "学习率", "步数", "精确匹配", "95% 区间", "与参照设置之差（逐行配对 95% 区间）", *tasks], rows), "",
        f"![learning_curves]({link.rsplit('/', 1)[0]}/learning_curves.png)", "",
        "逐个和参照设置比（结论由区间决定，不是手写的）：", "",
        *(f"- {curve_verdict(p)}" for p in points if "diff_ci" in p)])


def curve_verdict(point: dict) -> str:
    """One sentence per setting: better, worse, or no difference, by whether the paired interval excludes 0."""
    name = ("全量微调" if point["method"] == "full" else f"LoRA {point['target_modules']}") + \
        f"、学习率 {point['learning_rate']:g}、{point['steps']} 步"
    low, high = point["diff_ci"]
    if low > 0:
        word = f"比参照设置高 {point['diff_vs_reference']:.3f}"
    elif high < 0:
        word = f"比参照设置低 {-point['diff_vs_reference']:.3f}"
    else:
        word = "与参照设置相当（区间含 0，不能说谁更好）"
    return f"{name}：精确匹配 {fmt(point['exact_match'])}，{word}，配对 95% 区间 {_interval(point['diff_ci'])}。"


def _interval(ci: list[float] | None) -> str:
    """evaluate.py's delta_ci entry, signed like the difference beside it: "[+0.250, +0.550]"."""
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def faq_figures(folder: Path) -> dict | None:
    """The figures a 常见问题 row shows, from a run folder's files (None: never run)."""
    history_path = folder / "training_history.jsonl"
    if not history_path.is_file():
        return None
    history = [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [h["loss"] for h in history if "loss" in h]
    summary = read_json(folder / "train_summary.json") or {}
    results = read_json(folder / "evaluation_results.json") or {}
    norms = [h["grad_norm"] for h in history if "grad_norm" in h]
    figures = {"first_loss": losses[0] if losses else None, "max_grad_norm": max(norms, default=None),
               **summary, **results}
    if not summary:  # stopped early (a NaN loss stops training): say where
        last = max((h.get("step", 0) for h in history), default=0)
        figures["stopped"] = f"第 {last} 步后停止，无 train_summary.json"
    return figures


def _faq_cell(figures: dict | None, key: str) -> str:
    if figures is None:
        return "未测量"
    value = figures.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(value)
    return figures.get("stopped", "-")


def _faq_timed_cell(timing: dict, case: str, key: str) -> str:
    """A time or memory cell of the FAQ: faq_timing's median (range) for this case, or why there is none."""
    return timed_cell(timing.get(FAQ_TIMING_POINTS.get(case), {}), key, 3 if key == "seconds_per_step" else 1) or "待测"


def section_faq(root: Path, data: Path, link: str) -> str:
    rows, missing = [], []
    timing = {r["point"]: r for r in read_results(data / "experiments" / "faq_timing") or []}
    for title, before, after, shown in FAQ:
        runs = [faq_figures(data / "faq" / before), faq_figures(data / "faq" / after)]
        missing += [f"`runs/faq/{name}`" for name, figures in zip((before, after), runs) if figures is None]
        rows += [[title, label, *(_faq_timed_cell(timing, case, key) if key in FAQ_TIMED else _faq_cell(run, key)
                                  for case, run in zip((before, after), runs))] for key, label in shown]
    lines = table(["问题", "指标", "之前", "之后"], rows)
    lines += ["", "时间与峰值内存按计时规则：`zhlora experiment configs/experiments/faq_timing.yaml` 把这两组命令各在空闲机器上"
              "跑 3 次，取独占 CPU 的运行的中位数（范围）；“待测”表示还没有这样的 3 次。其余指标来自上面命令的单次运行。"]
    if missing:
        lines += ["", f"{NOT_YET} 缺少的运行：{'、'.join(missing)}。运行上面各问题的命令，{REGENERATE}"]
    return "\n".join(lines)
