"""The advanced chapters: task adapters, distillation, and the export check."""
from __future__ import annotations

import math
from pathlib import Path

from zhlora.metrics import share_scale

from .common import NOT_YET, REGENERATE, fmt, number, read_json, span, table, zh_label

def section_task_adapters(root: Path, data: Path, link: str) -> str:
    """scripts/adapter_report.py's table, as it was written from `zhlora evaluate --adapters`."""
    report = data / "advanced" / "adapters_eval" / "report.md"
    if not report.is_file():
        return (f"{NOT_YET} 运行 `zhlora experiment configs/experiments/task_adapters.yaml`，再按该文件开头的注释合并、"
                f"评估（`zhlora evaluate --adapters ...`）并运行 `scripts/adapter_report.py`，{REGENERATE}")
    results = read_json(data / "advanced" / "adapters_eval" / "evaluation_results.json") or {}
    base = {name: r.get("baseline", {}).get("per_task", {}) for name, r in results.get("adapters", {}).items()}
    lines = ["每个 adapter 只在它自己的 `data.tasks` 的测试行上评分（`zhlora evaluate --adapters`，贪心解码）；"
             "合并列由 `zhlora merge-adapters --combination_type cat` 得到，命令与权重见 "
             "`configs/experiments/task_adapters.yaml` 开头的注释。", "",
             report.read_text(encoding="utf-8").strip()]
    row: dict[str, dict] = {}  # task -> the base model's scores, from the first adapter scored on it
    for per_task in base.values():
        for task, scores in per_task.items():
            row.setdefault(task, scores)
    tasks = sorted(row)
    if tasks:
        lines += ["", "基座模型（所有 adapter 关闭）在同样的行上，精确匹配 / 字符相似度：" + "，".join(
            f"{t} {fmt(row[t].get('exact_match'))} / {fmt(row[t].get('avg_similarity'))}" for t in tasks) + "。"]
    return "\n".join(lines)


def section_distill(root: Path, data: Path, link: str) -> str:
    """Student before (its own baseline: the cut model, no adapter) and after, beside the teacher."""
    student = read_json(data / "advanced" / "distill" / "evaluation_results.json")
    # The teacher as it was scored when the students were (the quick start has changed since):
    # data/advanced/distill_teacher/ keeps that evaluation; the current outputs/ only when it is absent.
    teacher = (read_json(data / "advanced" / "distill_teacher" / "evaluation_results.json")
               or read_json(data / "outputs" / "evaluation_results.json"))
    summary = read_json(data / "advanced" / "distill" / "train_summary.json") or {}
    # The same student trained on the labels alone (training.distill_teacher=): what the teacher adds.
    labels_only = read_json(data / "advanced" / "distill_labels_only" / "evaluation_results.json")
    if student is None or teacher is None:
        return (f"{NOT_YET} 运行 `python quick_start.py`（教师）、`zhlora distill --config configs/distill.yaml "
                "training.distill_teacher=outputs output.dir=runs/distill` 与 "
                "`zhlora evaluate --model_path runs/distill`，"
                + REGENERATE)
    metrics = ("exact_match", "success_rate", "avg_similarity", "rouge_l", "test_loss")

    def cells(results: dict) -> list[str]:  # rouge_l on the 0-1 scale of the others (the guide's step 4)
        return [fmt(share_scale(m, results.get(m))) for m in metrics]

    rows = [["学生，蒸馏前（抽层后的模型，无 adapter）", *cells(student.get("baseline", {}))],
            ["学生，蒸馏后", *cells(student)],
            *([["学生，只用标签训练（同样设置，不用教师）", *cells(labels_only)]] if labels_only else []),
            ["教师（当时的 outputs/：旧版快速上手，100 步、12 类任务，30 层）", *cells(teacher)]]
    settings = student.get("settings", {})
    lines = [f"学生：{summary.get('total_params', 0):,} 个参数，其中 LoRA 可训练 {summary.get('trainable_params', 0):,} 个；"
             f"训练 {summary.get('steps')} 步（时间和内存只跑了一次，按本指南的计时规则不列出）"
             f"。评估：测试集前 {settings.get('max_samples') or '全部'} 条，贪心解码。", "",
             *table(["模型", *map(zh_label, metrics)], rows)]
    losses = [number((r or {}).get("test_loss")) for r in (student, labels_only)]
    if all(x is not None and math.isfinite(x) for x in losses):  # said as measured: one run each, no verdict
        lines += ["", f"同样的学生、同样的步数，蒸馏后的测试 loss 是 {fmt(losses[0])}，只用标签训练是 {fmt(losses[1])}"
                  f"（差 {losses[0] - losses[1]:+.3f}）。两边各只训练了一次，这个差别有多少来自随机种子无法判断，"
                  "所以这里不下“教师有没有帮上忙”的结论。可以试的方向：学生的层数只有教师的一半，"
                  "KL 项分走了 1 − `training.distill_alpha` 的权重；更大的 `training.distill_alpha`（更信标签）、"
                  "更多步数或与学生差距更小的教师都值得多个种子地量一量。"]
    return "\n".join(lines)


EXPORT_FILES = ("export_report.json", "verify_report.json")


def section_export(root: Path, data: Path, link: str) -> str:
    """What `zhlora export` and scripts/verify_export.py measured on the quick-start run."""
    folder = data / "export"
    export, verify = read_json(folder / "export_report.json"), read_json(folder / "verify_report.json")
    if not (isinstance(export, dict) and isinstance(verify, dict)):
        return (f"{NOT_YET} 运行快速上手、`zhlora export --model_path outputs --format gguf --output export` 和 "
                f"`python scripts/verify_export.py`，{REGENERATE}")
    names = {"zhlora_one_by_one": "zhlora（PyTorch，逐条）", "zhlora_batched": "zhlora（PyTorch，补位批量）",
             "llama_merged": "llama.cpp，model.gguf", "llama_adapter": "llama.cpp，base.gguf + adapter.gguf"}
    pairs = {"llama_merged/zhlora_one_by_one": "llama.cpp 合并模型 与 zhlora",
             "llama_adapter/zhlora_one_by_one": "llama.cpp 基座 + adapter 与 zhlora",
             "llama_adapter/llama_merged": "llama.cpp 基座 + adapter 与 合并模型",
             "zhlora_batched/zhlora_one_by_one": "zhlora 补位批量 与 逐条"}
    lines = [f"快速上手的 adapter，导出为 `{export['outtype']}`：transformers 读回 `model.gguf`，与合并后的模型相比 logits "
             f"最大相差 {export['max_logit_diff']:.3g}。测试集前 {verify['rows']} 条，贪心，最多 {verify['max_new_tokens']} "
             f"个新 token，同样的提示 token（数据：`docs/results/data/export/`）：", "",
             *table(["比较", "回答逐字相同的比例"],
                    [[pairs.get(k, k), f"{100 * v:.1f}%"] for k, v in verify["same_text"].items()]), "",
             *table(["引擎", f"每秒生成 token（{verify.get('repeats', 1)} 次的中位数）", "范围"],
                    [[names.get(k, k), fmt(v, 1), span(verify.get("tokens_per_s_range", {}).get(k))]
                     for k, v in verify["tokens_per_s"].items()])]
    if verify["same_text"].get("llama_adapter/llama_merged", 1.0) < 0.9:
        lines += ["", "注意：在 ik_llama.cpp 里把 `adapter.gguf` 叠加到 `base.gguf` 上，回答与合并模型不一致；"
                      "`Modelfile` 默认用已经核对过的 `model.gguf`。"]
    return "\n".join(lines)
