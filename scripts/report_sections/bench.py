"""The speed benchmarks: bench/results/summary.json and the result files beside it, in Chinese."""
from __future__ import annotations

from pathlib import Path

from .common import NOT_YET, REGENERATE, date_words, fmt, machine_words, read_json, span, table

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
                  "python bench/generation.py --dtype {float32,bfloat16} --profile", "python bench/summarize.py"]


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
    ours = read_json(folder / f"train_throughput{suffix}.json")
    peer = read_json(folder / f"peer_llamafactory{suffix}.json")
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
    for name in ("generation", "generation_float32", "generation_base_bfloat16", "generation_base_float32"):
        gen = read_json(folder / f"{name}.json")
        if isinstance(gen, dict):
            lines += bench_generation(gen, summary)
    return "\n".join(lines)


def bench_generation(gen: dict, summary: dict) -> list[str]:
    """The guide's table of one generation result (the adapter or the base model; the run's dtype,
    or fp32), after a blank line."""
    rows = [[f"`{mode}`", fmt(f["tokens_per_s"], 1), fmt(gen["ratio_to_one_by_one_greedy"].get(mode), 2),
             "-" if mode not in gen["same_text"] else f"{100 * gen['same_text'][mode]:.1f}%"]
            for mode, f in gen["median"].items()]
    # the VM's processor can change between two benchmarks: then say where generation ran
    other = (gen.get("machine") or {}).get("cpu") != (summary.get("machine") or {}).get("cpu")
    where = f"（在 {machine_words(gen.get('machine'))} 上测得，{date_words(gen.get('date'))}）" if other else ""
    bf16 = gen["settings"].get("dtype") == "torch.bfloat16"
    base = gen.get("benchmark", "").startswith("generation_base")  # no adapter: bench/generation.py --dtype D
    who = "基座模型（不加 LoRA）" if base else "快速上手训练出的 LoRA"
    one = gen["median"].get("one_by_one_greedy")
    length = f"，平均每条答案 {one['new_tokens'] / gen['settings']['rows']:.0f} 个 token" if one else ""
    differs = min(gen["same_text"].values(), default=1.0) < 1.0
    why = ("bf16 权重下，一批行与单独一行的求和顺序不同；某一步最好的两个 token 的 logit 相差不到一个 bf16 精度单位"
           "（logit 在 28 附近时是 0.125）时，就可能选到另一个，从那一步起这一行的文本就不同了；答案越长，遇到这种步的机会越多。"
           f"fp32 权重下只有相差约 1e-5 才会这样（`python bench/generation.py{'' if base else ' --run_dir outputs'} "
           "--dtype float32`）。"
           ) if bf16 and differs else ""
    return ["", f"生成，{who}，测试集前 {gen['settings']['rows']} 条，贪心，最多 {gen['settings']['max_new_tokens']} "
                f"个新 token{length}，批大小 {gen['settings']['batch_size']}，{'bf16' if bf16 else 'fp32'} 权重{where}：", "",
            *table(["方式", "token/s", "相对逐条", "与逐条文本相同"], rows), *(["", why] if why else [])]
