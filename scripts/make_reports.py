"""Write the project's measured figures into docs/: docs/results/performance.md and the
generated sections of docs/guide.md. No figure in them is typed by hand.

    python scripts/make_reports.py               # snapshot the results found, then write the reports
    python scripts/make_reports.py --no_collect  # rewrite the reports from the committed snapshot only
    python scripts/make_reports.py --check       # exit 1 if a report differs from what the snapshot gives

Two stages, handing over through files:
1. collect. Run outputs live where git does not look (runs/, outputs/ are ignored; bench/results/
   belongs to the benchmarks). Their result files are copied byte for byte into docs/results/data/,
   which git keeps:
       runs/<experiment>/results.csv, results.md, *.png     -> data/experiments/<experiment>/
       runs/<experiment>/<point>/seed*/RUN_FILES            -> data/experiments/<experiment>/<point>/seed*/
       outputs/RUN_FILES, QUICK_START_EXTRA, outputs/*.png  -> data/outputs/
       runs/default_run/RUN_FILES, main_path_timing.json    -> data/default_run/
       runs/faq/<case>/RUN_FILES                            -> data/faq/<case>/
       runs/adapters_eval/{report.md,evaluation_results.json} -> data/advanced/adapters_eval/
       runs/distill{,_labels_only}/RUN_FILES                -> data/advanced/distill{,_labels_only}/
       bench/results/*.json                                 -> data/bench/
       export/{export_report.json,verify_report.json}       -> data/export/
   An absent source leaves its snapshot alone, so a fresh clone may run this script without
   losing the committed numbers; a present source replaces its whole snapshot folder.
2. render. Only the snapshot, zhlora/lora.py and the model configs that ship in
   zhlora/resources/model_configs/ are read (parameter counts: zhlora.params on the meta device,
   offline). performance.md is written whole; in the guide only the text between
   `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->` is replaced. A result
   that is missing is said plainly, with the command that produces it.

Longer than STYLE's ~350 lines because each section is its own small renderer; they share
only the helpers at the top.
"""
from __future__ import annotations

import argparse
import ast
import csv
import difflib
import json
import math
import re
import shutil
import sys
from functools import lru_cache
from pathlib import Path

from zhlora.files import write_atomic
from zhlora.metrics import LABELS, SCORED_APART, share_scale

REPO = Path(__file__).resolve().parents[1]
GUIDE, REPORT, SNAPSHOT = Path("docs/guide.md"), Path("docs/results/performance.md"), Path("docs/results/data")
RUN_FILES = ("config.yaml", "train_summary.json", "evaluation_results.json", "training_history.jsonl")
MARKER = re.compile(r"(<!-- BEGIN GENERATED: ([\w-]+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)
NOTE = "<!-- 本节由 scripts/make_reports.py 生成，请勿手改；改数据后重新运行它 -->"
NOT_YET = "**尚未测量。**"
REGENERATE = "再运行 `python scripts/make_reports.py`。"
MB = 2 ** 20

# Parameter counts: (model, overrides, the guide's claim). SmolLM2 is the embedded model; its shipped
# config.json is the one the GGUF was made from, so the count does not depend on a local cache.
QWEN, SMOL = "Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
SETTINGS = [("training.method=full",), ("lora.r=8",), ("lora.r=16",), ("lora.r=32",),
            ("lora.r=16", "lora.target_modules=all-linear")]
CLAIMS = {(QWEN, "training.method=full"): 500e6, (QWEN, "lora.r=16"): 1e6, (QWEN, "lora.r=32"): 2e6}
CLAIM_TOLERANCE = 0.15  # "about 1M": within 15%

# The guide's claims for LoRA against full fine-tuning, and when we call each one met.
THRESHOLDS = {"params": 0.9975, "time": 0.37, "memory": 0.275, "storage_mb": 10.0}

# Benchmarks (issue 7): summary.json key -> (meaning, target), and the commands that fill bench/results/.
# key: (meaning, op, target); a target that is a string names the summary key it is compared with
BENCH_TARGETS = {
    "mfu": ("训练的模型 FLOPs 利用率（占实测 bf16 矩阵乘峰值的比例）", ">=", 0.6),
    "speedup_vs_llamafactory": ("训练有监督 token/s，相对 LLaMA-Factory 在本机的最好设置（混合数据）", ">=", 2.5),
    "speedup_vs_llamafactory_alpaca_zh_demo": ("同上，只用 alpaca_zh_demo.json（长答案）", ">=", 2.5),
    "speedup_low_memory_vs_llamafactory": ("省内存设置（梯度检查点）的速度，相对 LLaMA-Factory 最好设置", ">=", 2.0),
    "speedup_low_memory_vs_llamafactory_default": ("省内存设置的速度，相对 LLaMA-Factory 默认设置（同一内存标准）", ">=", 2.0),
    "peak_rss_mb_low_memory": ("省内存设置的峰值 RSS（MB），不超过 LLaMA-Factory 默认设置", "<=",
                               "llamafactory_default_peak_rss_mb"),
    "speedup_batched": ("生成 token/s：补位批量贪心 vs 逐条贪心", ">=", 8.0),
    "same_text_batched": ("补位批量与逐条贪心文本相同的比例", ">=", 1.0)}
BENCH_COMMANDS = ["python bench/train_throughput.py", "bash bench/peer_llamafactory.sh", "bash bench/side_by_side.sh",
                  "python bench/mfu.py [--workload alpaca_zh_demo] [--variant zhlora_compile] --from_throughput",
                  "python bench/generation.py --run_dir outputs --profile [--dtype float32]",
                  "python bench/summarize.py"]

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
                     "mem_accum8": "batch_size=2_gradient_accumulation_steps=8_gradient_checkpointing=True_max_steps=10",
                     "slow_fp32": "mixed_precision=no_group_by_length=False_max_steps=20",
                     "fast_bf16_packing": "mixed_precision=bf16_packing=True_max_steps=20"}
EXPERIMENT_ORDER = ["baseline", "r_ablation", "lr_ablation", "data_size", "datasets", "target_modules",
                    "lora_vs_full"]
# Sweeps whose figures another section shows, not 实验建议: faq_timing's points differ in steps and
# batch on purpose (they are the FAQ's commands) and score 8 test rows, so a quality table of them
# would compare nothing.
SHOWN_ELSEWHERE = {"faq_timing"}


# ---- reading ------------------------------------------------------------------------------------

def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def number(text):
    """A results.csv cell (text, empty when there is no value) as a float, or None."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def fmt(value, digits: int = 3) -> str:
    """One style for every figure: thousands separators for big numbers, `-` where there is none."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def span(values, digits: int = 1) -> str:
    """A measured range as 'low–high' (empty when none was recorded)."""
    return "–".join(fmt(v, digits) for v in values or [])


def mean_std(row: dict, metric: str) -> str:
    mean, std = number(row.get(f"{metric}_mean")), number(row.get(f"{metric}_std"))
    return fmt(mean) + ("" if std is None else f" ± {fmt(std)}")


def read_results(folder: Path) -> list[dict] | None:
    """results.csv rows, each with the config, train summary and evaluation of its first seed."""
    path = folder / "results.csv"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        seeds = sorted((folder / row["point"]).glob("seed*"))
        first = seeds[0] if seeds else folder / row["point"] / "missing"
        row["config"] = read_yaml(first / "config.yaml") or {}
        row["summary"] = read_json(first / "train_summary.json") or {}
        row["evaluation"] = read_json(first / "evaluation_results.json") or {}
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


# ---- collect ------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".md", ".csv")


def without_machine_paths(text: str, root: Path) -> str:
    """A result file's text with this machine's paths made relative: the repository's to the repo
    (runs/x, not /home/me/zhlora/runs/x), the home folder's to ~ (~/.cache/zhlora/...)."""
    for prefix, short in ((str(root.resolve()) + "/", ""), (str(root) + "/", ""), (str(Path.home()) + "/", "~/")):
        text = text.replace(prefix, short)
    return text


def _replace(root: Path, target: Path, base: Path, files: list[Path]) -> list[str]:
    """Make target hold exactly these files (paths kept relative to base); text files lose this
    machine's absolute paths (without_machine_paths), so no committed result names one."""
    shutil.rmtree(target, ignore_errors=True)
    for f in files:
        dest = target / f.relative_to(base)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix in TEXT_SUFFIXES:
            dest.write_text(without_machine_paths(f.read_text(encoding="utf-8"), root), encoding="utf-8")
        else:
            shutil.copyfile(f, dest)
    return [str(f) for f in files]


def _run_files(folder: Path) -> list[Path]:
    return [folder / name for name in RUN_FILES if (folder / name).is_file()]


def collect(root: Path) -> list[str]:
    """Copy the result files found into the snapshot; returns the sources copied."""
    data, copied = root / SNAPSHOT, []
    for results in sorted((root / "runs").glob("*/results.csv")):
        exp = results.parent
        files = [f for f in sorted(exp.iterdir()) if f.suffix in (".csv", ".md", ".png")
                 or f.name == "comparisons.json"]
        # predictions.jsonl too: the paired verdicts (comparisons.json) are computed from its rows
        files += [f for seed in sorted(exp.glob("*/seed*"))
                  for f in [*_run_files(seed), seed / "predictions.jsonl"] if f.is_file()]
        copied += _replace(root, data / "experiments" / exp.name, exp, files)
    outputs = root / "outputs"
    if (outputs / "train_summary.json").is_file():
        extra = [outputs / name for name in QUICK_START_EXTRA if (outputs / name).is_file()]
        copied += _replace(root, data / "outputs", outputs, _run_files(outputs) + extra + sorted(outputs.glob("*.png")))
    default_run = root / "runs" / "default_run"
    if (default_run / "evaluation_results.json").is_file():
        timing = [default_run / MAIN_PATH_TIMING] if (default_run / MAIN_PATH_TIMING).is_file() else []
        copied += _replace(root, data / "default_run", default_run, _run_files(default_run) + timing)
    for case in sorted((root / "runs" / "faq").glob("*/training_history.jsonl")):
        copied += _replace(root, data / "faq" / case.parent.name, case.parent, _run_files(case.parent))
    adapters = root / "runs" / "adapters_eval"
    if (adapters / "report.md").is_file():
        copied += _replace(root, data / "advanced" / "adapters_eval", adapters,
                           [adapters / n for n in ("report.md", "evaluation_results.json") if (adapters / n).is_file()])
    for name in ("distill", "distill_labels_only"):
        run = root / "runs" / name
        if (run / "evaluation_results.json").is_file():
            copied += _replace(root, data / "advanced" / name, run, _run_files(run))
    bench = sorted((root / "bench" / "results").glob("*.json"))
    if bench:
        copied += _replace(root, data / "bench", root / "bench" / "results", bench)
    export = root / "export"
    if (export / "verify_report.json").is_file():
        copied += _replace(root, data / "export", export, [export / n for n in EXPORT_FILES if (export / n).is_file()])
    return copied


# ---- sections -----------------------------------------------------------------------------------

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


def timed(row: dict, name: str) -> float | None:
    """A results.csv time or memory figure under the timing rule: the median of 3 or more runs that
    had the CPU alone (experiment_compare.timed_costs), else None; older tables had no such rule."""
    return number(row.get(name)) if (number(row.get("timed_runs")) or 0) >= 3 else None


def claim_time(lora: dict, full: dict) -> tuple | None:
    tl, tf, nf = timed(lora, "seconds_per_step"), timed(full, "seconds_per_step"), number(full["trainable_params"])
    if not (tl and tf and nf):
        return None
    ratio = tl / tf
    ok = ratio <= THRESHOLDS["time"]
    return ("每步秒数", timed_cell(lora, "seconds_per_step", 3), timed_cell(full, "seconds_per_step", 3), f"{ratio:.2f}", "1/3",
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
    return ("峰值内存 MB", timed_cell(lora, "peak_memory_mb", 0), timed_cell(full, "peak_memory_mb", 0), f"{ratio:.2f}", "1/4",
            _verdict(ok), why)


def claim_storage(lora: dict, full: dict) -> tuple | None:
    sl, sf, nl = number(lora.get("adapter_size_mb")), number(full.get("model_size_mb")), number(lora["trainable_params"])
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
        return (f"{METRIC_WORDS[metric]} 全量 − LoRA = {r['diff']:+.3f}" + (f"，95% 区间 [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
                + f" → {names[r.get('verdict', 'unknown')]}") if r.get("diff") is not None else ""

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
    full["comparison"] = compared.get("points", {}).get(full["point"]) if compared.get("reference") == lora["point"] else None
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


def machine_words(m: dict | None) -> str:
    """The machine of a benchmark in words: CPU, cores, memory, torch."""
    if not isinstance(m, dict):
        return "未记录"
    where = m.get("gpu") or f"{m.get('cpu', '?')}，{m.get('cores', '?')} 核"
    return f"{where}，内存 {m.get('memory_gb', '?')} GB，torch {m.get('torch', '?')}"


def date_words(stamp: str | None) -> str:
    """'2026-11-30T17:13:16+00:00' -> '2026 年 11 月 30 日'."""
    match = re.match(r"(\d{4})-(\d{2})-(\d{2})", stamp or "")
    return f"{match[1]} 年 {int(match[2])} 月 {int(match[3])} 日" if match else "未记录"


def bench_targets(summary: dict) -> list[str]:
    rows = []
    for key, (meaning, op, target) in BENCH_TARGETS.items():
        value = summary.get(key)
        value = value if isinstance(value, (int, float)) else None
        bar = summary.get(target) if isinstance(target, str) else target
        bar = bar if isinstance(bar, (int, float)) else None
        met = "-" if value is None or bar is None else (
            "达到" if (value >= bar if op == ">=" else value <= bar) else "未达到")
        apart = key in (summary.get("apart") or [])  # both sides ran, but not in the same hours
        rows.append([f"`{key}`", meaning, "不是同时段测的，不作比较" if apart else NOT_YET if value is None else fmt(value, 2),
                     f"{'≥' if op == '>=' else '≤'} {fmt(bar, 2)}", met])
    return table(["键", "含义", "实测", "目标", ""], rows)


def bench_training(folder: Path, suffix: str, measured: dict) -> list[str]:
    """One row per runner: supervised tok/s (median, range), ratio to LLaMA-Factory's best (the median
    of runs paired in time, and their range: summary.json's `measured`, from bench/summarize.py;
    none for rows never run near it), peak RSS, when."""
    ours, peer = read_json(folder / f"train_throughput{suffix}.json"), read_json(folder / f"peer_llamafactory{suffix}.json")
    results = [(r, name) for r in (ours, peer) if r for name in r.get("median", {})]
    if not results:
        return []
    rows = []
    for result, name in results:
        f, when = result["median"][name], measured.get(name, {})
        pairs = when.get("x_llamafactory_best")
        rows.append([f"`{name}`", fmt(f["supervised_tokens_per_s"], 1), span(f.get("supervised_tokens_per_s_range")),
                     f"{fmt(pairs['x'], 2)}（{span(pairs['range'], 2)}）" if pairs else "-",
                     fmt(f["peak_rss_mb"], 0), str(f.get("repeats", "-")), when.get("span", "-")])
    return table(["训练方式", "监督 token/s（中位数）", "范围", "相对 LLaMA-Factory 最好设置（配对中位数与范围）", "峰值 RSS MB",
                  "重复次数", "测量时间（UTC）"], rows)


def section_bench(root: Path, data: Path, link: str) -> str:
    folder = data / "bench"
    summary = read_json(folder / "summary.json")
    if not isinstance(summary, dict):
        return (f"{NOT_YET} `bench/results/` 里还没有结果。运行 " + "、".join(f"`{c}`" for c in BENCH_COMMANDS)
                + "，" + REGENERATE)
    lines = [f"机器：{machine_words(summary.get('machine'))}；日期：{date_words(summary.get('date'))}。"
             "每个数字是空闲机器上至少 3 次重复的中位数（只跑一次的行注明重复次数 1）。这台虚拟机的速度在不同时段能差到"
             "一倍，所以 zhlora 与 LLaMA-Factory 是交替运行的（`bash bench/side_by_side.sh`）。相对 LLaMA-Factory "
             "最好设置的倍数是配对算的：zhlora 的每次运行除以时间上离它最近的那次 LLaMA-Factory 运行（相隔不超过 30 "
             "分钟），再取中位数；附近没有 LLaMA-Factory 运行的行不给倍数。", "", *bench_targets(summary)]
    for title, suffix, workload in (("混合数据（生成任务 + alpaca_zh_demo.json）", "", "mixed"),
                                    ("只用 alpaca_zh_demo.json（长答案）", "_alpaca_zh_demo", "alpaca_zh_demo")):
        rows = bench_training(folder, suffix, (summary.get("measured") or {}).get(workload, {}))
        if rows:
            lines += ["", f"训练，{title}，30 步 × batch 4，最长 512 token：", "", *rows]
    for gen in (read_json(folder / "generation.json"), read_json(folder / "generation_float32.json")):
        if isinstance(gen, dict):
            lines += bench_generation(gen, summary)
    return "\n".join(lines)


def bench_generation(gen: dict, summary: dict) -> list[str]:
    """The guide's table of one generation result (the run's dtype, or fp32), after a blank line."""
    rows = [[f"`{mode}`", fmt(f["tokens_per_s"], 1), fmt(gen["ratio_to_one_by_one_greedy"].get(mode), 2),
             "-" if mode not in gen["same_text"] else f"{100 * gen['same_text'][mode]:.1f}%"]
            for mode, f in gen["median"].items()]
    # the VM's processor can change between two benchmarks: then say where generation ran
    other = (gen.get("machine") or {}).get("cpu") != (summary.get("machine") or {}).get("cpu")
    where = f"（在 {machine_words(gen.get('machine'))} 上测得，{date_words(gen.get('date'))}）" if other else ""
    bf16 = gen["settings"].get("dtype") == "torch.bfloat16"
    differs = min(gen["same_text"].values(), default=1.0) < 1.0
    why = ("bf16 权重下，一批行与单独一行的求和顺序不同；某一步最好的两个 token 的 logit 相差不到一个 bf16 精度单位"
           "（logit 在 28 附近时是 0.125）时，就可能选到另一个，所以少数行的文本不同。fp32 权重下只有相差约 1e-5 "
           "才会这样（`python bench/generation.py --run_dir outputs --dtype float32`）。") if bf16 and differs else ""
    return ["", f"生成，测试集前 {gen['settings']['rows']} 条，贪心，最多 {gen['settings']['max_new_tokens']} "
                f"个新 token，批大小 {gen['settings']['batch_size']}，{'bf16' if bf16 else 'fp32'} 权重{where}：", "",
            *table(["方式", "token/s", "相对逐条", "与逐条文本相同"], rows), *(["", why] if why else [])]


QUICK_START_EXTRA = ("demo_heldout.jsonl", "quick_start_timing.json")
# Wall seconds of each of the guide's steps 2-4 run one after another ({"prepare", "train", "evaluate", "total"}).
MAIN_PATH_TIMING = "main_path_timing.json"  # outputs/ files beyond RUN_FILES
STAGES = [("prepare", "第二步 数据"), ("train", "第三步 训练"), ("evaluate", "第四步 评估"), ("plot", "第五步 画图"),
          ("demo", "第六步 演示")]
# The metrics the quick-start section shows, each defined once, in Chinese, for a learner.
DEFINED = ["exact_match", "success_rate", "avg_similarity", "test_loss"]  # defined once: the guide's step 4


def zh_label(key: str) -> str:
    """A metric's Chinese name with its results key: 精确匹配（exact_match）."""
    return f"{LABELS[key][0]}（{key}）"


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
        rows.append([name, str(row.get("n_exact", row["n"])), fmt(base.get("per_task", {}).get(task, {}).get("exact_match")),
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
                "`python training/evaluate.py --model_path outputs`），把 `outputs/` 复制到 `runs/default_run/`，" + REGENERATE)
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
METRIC_WORDS = {"exact_match": "精确匹配", "avg_similarity": "字符相似度", "test_loss": "测试 loss"}


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


def timed_cell(row: dict, name: str, digits: int = 1) -> str:
    """A time or memory cell: the median (range) of the runs that had the CPU alone, or empty."""
    value = timed(row, name)
    if value is None:
        return ""
    low, _, high = (row.get(f"{name}_range") or "").partition("~")  # experiment.collect writes "low~high"
    return fmt(value, digits) + (f"（{span([number(low), number(high)], digits)}）" if high else "")


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
    names = sorted(names - SHOWN_ELSEWHERE, key=lambda n: (EXPERIMENT_ORDER.index(n) if n in EXPERIMENT_ORDER else 99, n))
    lines = ["各表的指标：精确匹配（exact_match，答案与参考逐字相同的比例，0-1）、字符相似度（avg_similarity，"
             "0-1）、测试 loss（test_loss，测试集回答部分每个 token 的平均交叉熵，越低越好），均为各种子的均值 ± 标准差。"
             "速度（监督 token/s）与峰值内存只取独占 CPU 的运行（`train_summary.json` 的 `cpu_others_share` ≤ 0.05），"
             "至少 3 次时给中位数（范围），否则留空。" + same_setting_speeds(data), ""]
    for name in names:
        size = _experiment_size(configs / f"{name}.yaml")
        lines += [f"#### {name}", "", f"`zhlora experiment configs/experiments/{name}.yaml`" + (f" {size}" if size else ""), ""]
        rows = read_results(data / "experiments" / name)
        where = _run_devices(data / "experiments" / name)
        lines += [where, ""] if where else []
        if not rows:
            lines += [f"{NOT_YET} 运行上面的命令，{REGENERATE}", ""]
            continue
        lines += table(["点", "种子数", "精确匹配", "字符相似度", "测试 loss", "可训练参数", "监督 token/s", "峰值内存 MB",
                        "保存大小 MB"],
                       [[f"`{r['point']}`", r.get("seeds", ""), mean_std(r, "exact_match"), mean_std(r, "avg_similarity"),
                         mean_std(r, "test_loss"), fmt(number(r.get("trainable_params"))),
                         timed_cell(r, "supervised_tokens_per_s"), timed_cell(r, "peak_memory_mb", 0),
                         fmt(number(r.get("adapter_size_mb")) or number(r.get("model_size_mb")))] for r in rows])
        compared = read_json(data / "experiments" / name / "comparisons.json")
        verdicts = verdict_lines(compared)
        lines += ["", *([*verdicts, ""] if verdicts else []), *group_sections(rows, compared)]
        lines += [f"![{p.stem}]({link}/experiments/{name}/{p.name})"
                  for p in sorted((data / "experiments" / name).glob("*.png"))]
        lines.append("")
    return "\n".join(lines).rstrip() or "`configs/experiments/` 中没有实验。"


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
                f"training.distill_teacher=outputs output.dir=runs/distill` 与 `zhlora evaluate --model_path runs/distill`，"
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


SECTIONS = {"default_run": section_default_run, "learning_curves": section_learning_curves, "lora_code": section_lora_code, "task_adapters": section_task_adapters, "distill": section_distill, "params": section_params, "lora_vs_full": section_lora_vs_full,
            "bench": section_bench, "quick_start": section_quick_start, "faq": section_faq,
            "experiments": section_experiments, "export": section_export, "tuning": section_tuning}


# ---- documents ----------------------------------------------------------------------------------

def render_report(root: Path) -> str:
    data = root / SNAPSHOT
    parts = ["# 性能分析：LoRA 与全量微调（实测）", "",
             "本文件由 `python scripts/make_reports.py` 从 `docs/results/data/`（实验输出的快照）生成，"
             "请勿手改。每个说法旁边是本项目在内置模型上的实测值，以及它在这个规模下为什么成立或不成立。", "",
             "## LoRA 与全量微调", "", section_lora_vs_full(root, data, "data"), "",
             "## 可训练参数（由模型 config 计算）", "", section_params(root, data, "data"), "",
             "## 速度基准（bench/）", "", section_bench(root, data, "data"), ""]
    return "\n".join(parts)


def render_guide(root: Path, text: str) -> str:
    """The guide with every generated section replaced by what the snapshot gives now."""
    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in SECTIONS:
            raise KeyError(f"{GUIDE}: unknown generated section {name!r}; known: {', '.join(SECTIONS)}")
        body = SECTIONS[name](root, root / SNAPSHOT, "results/data")
        return f"{match.group(1)}{NOTE}\n\n{body}\n\n{match.group(4)}"

    return MARKER.sub(fill, text)


def expected_files(root: Path) -> dict[Path, str]:
    files = {root / REPORT: render_report(root)}
    if (root / GUIDE).is_file():
        files[root / GUIDE] = render_guide(root, (root / GUIDE).read_text(encoding="utf-8"))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/results/performance.md and docs/guide.md's "
                                                 "generated sections from run outputs.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    parser.add_argument("--no_collect", action="store_true", help="render from the committed snapshot only")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not (args.check or args.no_collect):
        copied = collect(root)
        print(f"[make_reports] snapshot: {len(copied)} files copied into {SNAPSHOT}/")
    try:
        files = expected_files(root)
    except KeyError as err:
        print(f"make_reports: error: {err.args[0]}", file=sys.stderr)
        return 2
    stale = []
    for path, text in files.items():
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old == text:
            continue
        stale.append(path)
        if args.check:
            diff = difflib.unified_diff(old.splitlines(), text.splitlines(), str(path), "generated", lineterm="", n=1)
            print("\n".join(list(diff)[:40]))
        else:
            write_atomic(path, text)
            print(f"[make_reports] wrote {path.relative_to(root)}")
    if args.check and stale:
        print(f"make_reports: out of date: {', '.join(str(p.relative_to(root)) for p in stale)}; run "
              "python scripts/make_reports.py --no_collect (or without it, to take new results) and commit",
              file=sys.stderr)
        return 1
    if not stale:
        print("[make_reports] reports are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
