"""The guide's LoRA code listing, its parameter counts, and its claims for LoRA against full fine-tuning."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

from .common import (MB, METRIC_WORDS, NOT_YET, REGENERATE, fmt, mean_std, number, read_json, read_results, table,
                     timed, timed_cell)

# Parameter counts: (model, overrides, the guide's claim). SmolLM2 is the embedded model; its shipped
# config.json is the one the GGUF was made from, so the count does not depend on a local cache.
QWEN, SMOL = "Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
SETTINGS = [("training.method=full",), ("lora.r=8",), ("lora.r=16",), ("lora.r=32",),
            ("lora.r=16", "lora.target_modules=all-linear")]
CLAIMS = {(QWEN, "training.method=full"): 500e6, (QWEN, "lora.r=16"): 1e6, (QWEN, "lora.r=32"): 2e6}
CLAIM_TOLERANCE = 0.15  # "about 1M": within 15%

# The guide's claims for LoRA against full fine-tuning, and when we call each one met.
THRESHOLDS = {"params": 0.9975, "time": 0.37, "memory": 0.275, "storage_mb": 10.0}


def section_lora_code(root: Path, data: Path, link: str) -> str:
    """The LoRALinear class of zhlora/lora.py, as the file has it now."""
    path = root / "zhlora" / "lora.py"
    if not path.is_file():
        return "找不到 `zhlora/lora.py`。"
    source = path.read_text(encoding="utf-8")
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "LoRALinear"), None)
    if node is None:
        return "`zhlora/lora.py` 中没有 `LoRALinear` 类。"
    lines = source.splitlines()[node.lineno - 1:node.end_lineno]
    return "\n".join([f"`zhlora/lora.py` 第 {node.lineno}-{node.end_lineno} 行：", "", "```python", *lines, "```"])


@lru_cache(maxsize=None)
def param_count(model: str, overrides: tuple[str, ...]) -> tuple[int, int, int]:
    """(trainable, total with adapter, base model) from the model's config alone (zhlora params)."""
    from zhlora.config import load_config
    from zhlora.params import count, model_config

    return count(model_config(model)[0], load_config(None, list(overrides)))


def _setting_text(overrides: tuple[str, ...]) -> str:
    if "training.method=full" in overrides:
        return "全量微调"
    values = dict(o.split("=", 1) for o in overrides)
    return f"LoRA r={values['lora.r']}, {values.get('lora.target_modules', 'q_proj,v_proj')}"


def section_params(root: Path, data: Path, link: str) -> str:
    lines = ["由模型的 `config.json` 在 meta 设备上建出模型后计数（不下载权重，离线可算；同 "
             "`zhlora params --model NAME lora.r=16`），配置随包附带于 `zhlora/resources/model_configs/`。"
             "LoRA 默认 `lora_alpha=32`、`target_modules=[q_proj, v_proj]`；“占全部”是可训练参数 / "
             "（模型 + adapter），与训练时打印的一致；大小按 fp32 每参数 4 字节。", ""]
    rows = []
    for model in (QWEN, SMOL):
        for overrides in SETTINGS:
            trainable, total, base = param_count(model, overrides)
            claim = CLAIMS.get((model, overrides[0])) if len(overrides) == 1 else None
            verdict = "-"
            if claim:
                off = trainable / claim - 1
                verdict = f"约 {claim / 1e6:g}M：{'相符' if abs(off) <= CLAIM_TOLERANCE else '不符'}（{off:+.0%}）"
            name = model if model == QWEN else "smollm2-135m-instruct（内置）"
            rows.append([name, _setting_text(overrides), f"{trainable:,}", f"{100 * trainable / total:.3f}%",
                         f"{trainable * 4 / MB:,.1f}", verdict])
    lines += table(["模型", "设置", "可训练参数", "占全部", "大小 MB", "指南的说法"], rows)
    q16, s16 = param_count(QWEN, ("lora.r=16",)), param_count(SMOL, ("lora.r=16",))
    lines += ["", f"“参数减少 99.8%”：Qwen2.5-0.5B 上 r=16、q_proj+v_proj 训练 {q16[0]:,} 个参数，是全量 "
              f"{q16[2]:,} 个的 {q16[0] / q16[2]:.2%}，即减少 {1 - q16[0] / q16[2]:.2%}；内置的 SmolLM2-135M "
              f"同样设置减少 {1 - s16[0] / s16[2]:.2%}。一个 in×out 的矩阵，LoRA 训练 r·(in+out) 个参数，"
              f"占 r·(in+out)/(in·out)：模型越宽（hidden 896 对 576），这个份额越小。"]
    return "\n".join(lines)


def _pick(rows: list[dict], method: str) -> dict | None:
    return next((r for r in rows if (r.get("training.method") or r["config"].get("training", {}).get("method"))
                 == method), None)


def _verdict(ok: bool) -> str:
    return "成立" if ok else "不成立"


def claim_params(lora: dict, full: dict) -> tuple | None:
    nl, nf = number(lora["trainable_params"]), number(full["trainable_params"])
    if not (nl and nf):
        return None
    cfg = lora["config"].get("lora", {})
    r, targets = cfg.get("r", "?"), cfg.get("target_modules", [])
    overrides = (f"lora.r={r}", f"lora.target_modules={','.join(targets)}",
                 f"lora.use_dora={str(cfg.get('use_dora', False)).lower()}") if cfg else ("lora.r=16",)
    qwen = param_count(QWEN, overrides)  # the same setting on a wider model
    saved, qwen_saved = 1 - nl / nf, 1 - qwen[0] / qwen[2]
    ok = saved >= THRESHOLDS["params"]
    return ("可训练参数", f"{nl:,.0f}", f"{nf:,.0f}", f"{nl / nf:.2%}", "减少 99.8%", _verdict(ok),
            f"LoRA（r={r}，{'+'.join(targets)}）训练 {nl:,.0f} 个，全量 {nf:,.0f} 个，减少 {saved:.2%}。"
            f"份额 r·(in+out)/(in·out) 随模型变宽而变小：同样设置在 Qwen2.5-0.5B（更宽）上减少 {qwen_saved:.2%}，"
            + ("99.8% 对 0.5B 量级的模型成立，" if qwen_saved >= THRESHOLDS["params"] else "0.5B 量级的模型也达不到 99.8%，")
            + ("在这个模型上也成立。" if ok else "在这个更窄的模型上达不到。"))


def claim_time(lora: dict, full: dict) -> tuple | None:
    tl, tf, nf = timed(lora, "seconds_per_step"), timed(full, "seconds_per_step"), number(full["trainable_params"])
    if not (tl and tf and nf):
        return None
    ratio = tl / tf
    ok = ratio <= THRESHOLDS["time"]
    return ("每步秒数", timed_cell(lora, "seconds_per_step", 3), timed_cell(full, "seconds_per_step", 3),
            f"{ratio:.2f}", "1/3",
            _verdict(ok),
            f"实测 LoRA 一步是全量的 {ratio:.2f}。前向约占一步计算的 1/3，反向 2/3（一半求输入的梯度 dX，一半求权重的"
            f"梯度 dW）；冻结的层仍要算 dX 才能把梯度传回更早的层，LoRA 只省掉 dW，所以单看计算量一步约是全量的 2/3，"
            f"另外省掉 {nf:,.0f} 个参数的 AdamW 更新。"
            + ("实测达到 1/3。" if ok else "同样 batch 下到不了 1/3；“1/3 时间”要靠省下的内存换来更大的 batch 或更少的卡。")
            + ("实测还高于 2/3：多出的是两种方法都要付、不随可训练参数减少的开销（数据整理、softmax 与损失、框架调度），"
               "模型越小，它们占一步的比例越大。" if ratio > 2 / 3 else ""))


def claim_memory(lora: dict, full: dict) -> tuple | None:
    ml, mf = timed(lora, "peak_memory_mb"), timed(full, "peak_memory_mb")
    nl, nf = number(lora["trainable_params"]), number(full["trainable_params"])
    if not (ml and mf and nl and nf):
        return None
    ratio = ml / mf
    ok = ratio <= THRESHOLDS["memory"]
    on_gpu = "cuda" in str(full["summary"].get("device", ""))
    width = 2 if on_gpu and full["config"].get("model", {}).get("dtype") != "float32" else 4  # bytes per value
    state = 4 * width * nf / MB  # full: weights + gradients + AdamW's two moments
    lora_state = (width * nf + 4 * width * nl) / MB  # LoRA: frozen weights + the same four for A and B
    rest = mf - state
    why = (f"实测 LoRA 峰值是全量的 {ratio:.2f}（{full['summary'].get('peak_memory_kind', '峰值内存')}）。全量微调为每个"
           f"参数存权重、梯度和 AdamW 的两个矩（各 {width} 字节），约 {state:,.0f} MB；LoRA 只存权重和 A、B 的这四份，"
           f"约 {lora_state:,.0f} MB：只看这些，比值约是 1/4。")
    if rest > 0:
        why += (f"全量峰值 {mf:,.0f} MB 中其余约 {rest:,.0f} MB 是激活值和运行时（PyTorch、分词器、数据），两种方法都要付；"
                f"按此估 LoRA 约 {rest + lora_state:,.0f} MB，实测 {ml:,.0f} MB。"
                + ("" if ok else "模型越小、序列越短，这部分占比越大，1/4 越难达到。"))
    else:
        why += "实测峰值比这个估计还低，估计不适用（权重不是按上述字节数存放）。"
    return ("峰值内存 MB", timed_cell(lora, "peak_memory_mb", 0), timed_cell(full, "peak_memory_mb", 0),
            f"{ratio:.2f}", "1/4",
            _verdict(ok), why)


def claim_storage(lora: dict, full: dict) -> tuple | None:
    sl, sf = number(lora.get("adapter_size_mb")), number(full.get("model_size_mb"))
    nl = number(lora["trainable_params"])
    if not (sl and sf and nl):
        return None
    ok = sl <= THRESHOLDS["storage_mb"]
    return ("保存大小 MB", fmt(sl), fmt(sf), f"{sl / sf:.2%}", "几 MB", _verdict(ok),
            f"adapter 只存 lora_A、lora_B（{nl:,.0f} 个参数 × 4 字节 ≈ {nl * 4 / MB:.1f} MB），全量微调要存整个模型 "
            f"{sf:,.0f} MB，是 adapter 的 {sf / sl:,.0f} 倍。“几 MB”按 {THRESHOLDS['storage_mb']:g} MB 以内算"
            + ("，成立。" if ok else "，这里超过了。"))


def claim_quality(lora: dict, full: dict) -> tuple | None:
    """The quality claim, judged by comparisons.json (full minus LoRA, experiment_compare.py): a side is
    better only where the 95% interval of the difference excludes 0."""
    el, ef = number(lora.get("exact_match_mean")), number(full.get("exact_match_mean"))
    compared = full.get("comparison") or {}
    if el is None or ef is None or not compared:
        return None
    words = {"higher": "全量更好", "lower": "LoRA 更好", "same": "相当", "unknown": "无法判断"}
    loss_words = {"higher": "LoRA 更好", "lower": "全量更好", "same": "相当", "unknown": "无法判断"}  # lower loss wins

    def said(metric: str, names: dict) -> str:
        r = compared.get(metric) or {}
        ci = r.get("ci")
        interval = f"，95% 区间 [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        return (f"{METRIC_WORDS[metric]} 全量 − LoRA = {r['diff']:+.3f}{interval}"
                f" → {names[r.get('verdict', 'unknown')]}") if r.get("diff") is not None else ""

    verdict = words[(compared.get("exact_match") or {}).get("verdict", "unknown")]
    train_l, train_f = lora["config"].get("training", {}), full["config"].get("training", {})
    samples = lora["evaluation"].get("settings", {}).get("max_samples") or "全部"
    parts = [x for x in (said("exact_match", words), said("avg_similarity", words), said("test_loss", loss_words)) if x]
    return ("精确匹配", mean_std(lora, "exact_match"), mean_std(full, "exact_match"), f"{el - ef:+.3f}", "接近全量", verdict,
            f"两者都训练 {lora['summary'].get('steps', '?')} 步（batch {train_l.get('batch_size', '?')}），学习率 LoRA "
            f"{train_l.get('learning_rate', '?')}、全量 {train_f.get('learning_rate', '?')}；测试集前 {samples} 条，贪心解码，"
            f"{lora.get('seeds', '?')} 个种子。" + "；".join(parts) + "（精确匹配与字符相似度逐行配对，测试 loss 按种子配对）。")


CLAIMS_CHECKED = [claim_params, claim_time, claim_memory, claim_storage, claim_quality]


def claims(lora: dict, full: dict) -> list[tuple]:
    """(figure, LoRA, full, ratio, claim, verdict, why) for each claim the rows can speak to."""
    return [c for c in (check(lora, full) for check in CLAIMS_CHECKED) if c]


def section_lora_vs_full(root: Path, data: Path, link: str) -> str:
    rows = read_results(data / "experiments" / "lora_vs_full")
    lora, full = (_pick(rows, "lora"), _pick(rows, "full")) if rows else (None, None)
    if not (lora and full):
        return f"{NOT_YET} 运行 `zhlora experiment configs/experiments/lora_vs_full.yaml`，{REGENERATE}"
    compared = read_json(data / "experiments" / "lora_vs_full" / "comparisons.json") or {}
    same_reference = compared.get("reference") == lora["point"]
    full["comparison"] = compared.get("points", {}).get(full["point"]) if same_reference else None
    model = lora["summary"].get("model") or lora["config"].get("model", {}).get("name", "?")
    lines = [f"`zhlora experiment configs/experiments/lora_vs_full.yaml`，模型 `{model}`，设备 "
             f"`{lora['summary'].get('device', '?')}`，混合精度 `{lora['summary'].get('mixed_precision', '?')}`。"
             "数据：`docs/results/data/experiments/lora_vs_full/`。"
             + ("每步秒数与峰值内存是独占 CPU 的运行的中位数（括号里是范围），比值用中位数算。"
                if timed(lora, "seconds_per_step") and timed(full, "seconds_per_step") else ""), ""]
    checked = claims(lora, full)
    lines += table(["指标", "LoRA", "全量微调", "LoRA / 全量", "指南的说法", "在此规模"],
                   [list(c[:6]) for c in checked])
    lines += ["", *(f"- **{c[0]}**：{c[6]}" for c in checked)]
    if not all(timed(r, "seconds_per_step") for r in (lora, full)):
        lines.append("- **每步时间与峰值内存**：这里只报告至少 3 次独占 CPU 的运行的中位数（计时规则），这份结果还没有，"
                     "所以不比较；在空闲机器上删除 `runs/lora_vs_full` 后重新运行上面的实验即可补上（已完成的运行不会重跑）。")
    pareto = data / "experiments" / "lora_vs_full" / "quality_vs_peak_memory.png"
    if pareto.is_file():
        lines += ["", f"![质量与峰值内存]({link}/experiments/lora_vs_full/{pareto.name})"]
    return "\n".join(lines)
