"""Gather bench/results/*.json into bench/results/summary.json and print a Markdown table for the README.

    python bench/summarize.py            # after the benchmarks below have written their results
    python bench/summarize.py --readme   # also write the table into README.md, between its BENCH markers

Headline keys (each a number, or null when its benchmark has not run yet):
  mfu                           training FLOPs/s / measured bf16 matmul peak, the highest of zhlora_fastest,
                                zhlora_compile and zhlora_fast_dropout on both workloads (MFU_FILES);
                                mfu_variant names it
  speedup_vs_llamafactory       zhlora's best variant (FASTEST) / LLaMA-Factory's
                                best variant, supervised tokens/s, on the mixed workload
                                (train_throughput.json, peer_llamafactory.json): the median over
                                zhlora's runs of each one's ratio to the LLaMA-Factory run made
                                nearest to it (`paired`); `compared` names both
  speedup_vs_llamafactory_alpaca_zh_demo   the same on alpaca_zh_demo.json alone (*_alpaca_zh_demo.json)
  speedup_low_memory_vs_llamafactory       zhlora_low_memory / LLaMA-Factory's best, alpaca_zh_demo
  speedup_low_memory_vs_llamafactory_default   the same against LLaMA-Factory's default (lf_default), whose
                                memory it is held to
  peak_rss_mb_low_memory        zhlora_low_memory's peak RSS on alpaca_zh_demo, beside
  llamafactory_default_peak_rss_mb         LLaMA-Factory's default (lf_default) there: the bar it must stay under
  speedup_batched               refilled batches / one prompt at a time, greedy tokens/s (generation.json)
  same_text_batched             share of rows whose refilled text equals the one-by-one text
  speedup_batched_float32, same_text_batched_float32   the same with fp32 weights
                                (generation_float32.json), where only a ~1e-5 tie can change a token
  speedup_batched_base_model[_float32], same_text_batched_base_model[_float32]   the same rows answered
                                by the base model (generation_base_bfloat16.json, generation_base_float32.json):
                                its answers run to the token limit, where batching pays most (no target)
with the machine and the date. GPU results (NAME_cuda.json) go under "cuda".
"""
from __future__ import annotations

import json
import statistics
import sys
from datetime import datetime, timedelta, timezone

from common import REPO, RESULTS, idle_runs

BEGIN, END = "<!-- BEGIN GENERATED: bench (python bench/summarize.py --readme) -->", "<!-- END GENERATED: bench -->"
ALPACA = "_alpaca_zh_demo"
TARGETS = {"mfu": (">=", 0.6), "speedup_vs_llamafactory": (">=", 2.5),
           "speedup_vs_llamafactory_alpaca_zh_demo": (">=", 2.5), "speedup_low_memory_vs_llamafactory": (">=", 2.0),
           "speedup_low_memory_vs_llamafactory_default": (">=", 2.0),
           "peak_rss_mb_low_memory": ("<=", "llamafactory_default_peak_rss_mb"), "speedup_batched": (">=", 8.0),
           "same_text_batched": (">=", 1.0)}
COMMANDS = ["python bench/train_throughput.py [--workload alpaca_zh_demo]",
            "bash bench/peer_llamafactory.sh [--workload alpaca_zh_demo]",
            "bash bench/side_by_side.sh [--workload alpaca_zh_demo]",
            "python bench/mfu.py [--workload alpaca_zh_demo] [--variant zhlora_compile] --from_throughput",
            "python bench/generation.py --run_dir outputs --profile [--dtype float32]",
            "python bench/generation.py --dtype {float32,bfloat16} --profile", "python bench/summarize.py"]


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# the quick start's setting, and it with one or two switches more (compiled layers, packing, cheaper
# dropout masks): the best one counts
FASTEST = ("zhlora_fastest", "zhlora_compile", "zhlora_packing", "zhlora_fast_dropout", "zhlora_packing_fast_dropout")
# bench/mfu.py [--workload alpaca_zh_demo] [--variant zhlora_compile] --from_throughput: the highest counts
MFU_FILES = {"mfu": "zhlora_fastest, mixed", "mfu_zhlora_compile": "zhlora_compile, mixed",
             "mfu_zhlora_fast_dropout": "zhlora_fast_dropout, mixed",
             "mfu_alpaca_zh_demo": "zhlora_fastest, alpaca_zh_demo",
             "mfu_zhlora_compile_alpaca_zh_demo": "zhlora_compile, alpaca_zh_demo",
             "mfu_zhlora_fast_dropout_alpaca_zh_demo": "zhlora_fast_dropout, alpaca_zh_demo"}


def best_of(train: dict | None, peer: dict | None, variants=FASTEST) -> str | None:
    """The variant among `variants` with the highest paired ratio to LLaMA-Factory's best, of those
    with 3 pairs or more (None if none has): a single run is shown in the table but never picked.
    By the paired ratio, not by the median tok/s: rows measured in a faster hour of this VM would
    win on their medians alone."""
    ratios = {v: paired(train, v, peer, peer and peer["best"]) for v in variants}
    ranked = [v for v, r in ratios.items() if r and r["pairs"] >= 3]
    return max(ranked, key=lambda v: ratios[v]["x"]) if ranked else None


def over_peer(train: dict | None, peer: dict | None, variant: str | None,
              peer_variant: str | None = None) -> float | None:
    """zhlora variant / LLaMA-Factory's variant (default: its best), supervised tokens/s: the median
    of the paired ratios (see paired), None when either is missing or no run of one was made near a
    run of the other."""
    peer_variant = peer_variant or (peer and peer["best"])
    pairs = paired(train, variant, peer, peer_variant)
    return pairs["x"] if pairs else None


def paired(train: dict | None, variant: str | None, peer: dict | None, peer_variant: str | None) -> dict | None:
    """Each idle run of `variant` divided by the idle run of `peer_variant` made nearest to it in
    time (within SLACK): {"x": median ratio, "range": [min, max], "pairs": n}, or None without a pair.
    Pairs, not one median over another: this VM's speed drifts by 2x within an hour (on 2026-12-01
    LLaMA-Factory's best ran at 55.2 and at 139.9 tok/s), and two runs of one round of
    bench/side_by_side.sh meet the machine in the same state."""
    if not (train and peer and variant and peer_variant):
        return None
    theirs = [r for r in idle_runs(peer.get("runs", {}).get(peer_variant, [])) if r.get("date")]
    ratios = []
    for run in (r for r in idle_runs(train.get("runs", {}).get(variant, [])) if r.get("date")):
        when = datetime.fromisoformat(run["date"])
        near = min(theirs, key=lambda r: abs(datetime.fromisoformat(r["date"]) - when), default=None)
        if near and abs(datetime.fromisoformat(near["date"]) - when) <= SLACK:
            ratios.append(run["supervised_tokens_per_s"] / near["supervised_tokens_per_s"])
    if not ratios:
        return None
    return {"x": statistics.median(ratios), "range": [min(ratios), max(ratios)], "pairs": len(ratios)}


# the result files the summary reads: {key: file name without the device suffix}
RESULT_FILES = {"train": "train_throughput", "peer": "peer_llamafactory", "train_a": "train_throughput" + ALPACA,
                "peer_a": "peer_llamafactory" + ALPACA, "gen": "generation", "gen32": "generation_float32",
                "gen_base": "generation_base_bfloat16", "gen_base32": "generation_base_float32"}


def load_results(suffix: str = "") -> dict:
    """Every result file the summary and its table read, loaded once: {key of RESULT_FILES: result
    or None, "mfus": [(result, MFU_FILES label)] of the MFU files there are}."""
    results = {key: load(name + suffix) for key, name in RESULT_FILES.items()}
    results["mfus"] = [(r, label) for r, label in ((load(name + suffix), label) for name, label in MFU_FILES.items())
                       if r]
    return results


def headline(results: dict) -> dict:
    """summary.json's figures from load_results' files."""
    train, peer, train_a, peer_a, gen, gen32, gen_base, gen_base32 = (results[key] for key in RESULT_FILES)
    mfus = results["mfus"]
    mfu, mfu_label = max(mfus, key=lambda pair: pair[0]["mfu"]) if mfus else (None, None)
    out = {k: None for k in TARGETS}
    sources = [r for r in (train, peer, train_a, peer_a, gen, gen32, gen_base, gen_base32, *(r for r, _ in mfus)) if r]
    out["mfu"] = mfu["mfu"] if mfu else None
    out["mfu_variant"] = mfu_label
    out["speedup_vs_llamafactory"] = over_peer(train, peer, best_of(train, peer))
    out["speedup_vs_llamafactory_alpaca_zh_demo"] = over_peer(train_a, peer_a, best_of(train_a, peer_a))
    out["compared"] = {"zhlora": {"mixed": best_of(train, peer), "alpaca_zh_demo": best_of(train_a, peer_a)},
                       "llamafactory": {"mixed": peer and peer["best"], "alpaca_zh_demo": peer_a and peer_a["best"]}}
    out["speedup_low_memory_vs_llamafactory"] = over_peer(train_a, peer_a, "zhlora_low_memory")
    out["speedup_low_memory_vs_llamafactory_default"] = over_peer(train_a, peer_a, "zhlora_low_memory", "lf_default")
    if train_a and "zhlora_low_memory" in train_a["median"]:
        out["peak_rss_mb_low_memory"] = train_a["median"]["zhlora_low_memory"]["peak_rss_mb"]
    out["llamafactory_default_peak_rss_mb"] = (peer_a["median"]["lf_default"]["peak_rss_mb"]
                                               if peer_a and "lf_default" in peer_a["median"] else None)
    for key, result in (("", gen), ("_float32", gen32), ("_base_model", gen_base), ("_base_model_float32", gen_base32)):
        if result:
            out["speedup_batched" + key] = result["speedup_batched"]
            out["same_text_batched" + key] = result["same_text"].get("batched_refill")
    out["measured"] = {"mixed": measured(train, peer), "alpaca_zh_demo": measured(train_a, peer_a)}
    # ratios left out because their two sides were not measured side by side (not "not run")
    ran = {"speedup_vs_llamafactory": (train, peer), "speedup_vs_llamafactory_alpaca_zh_demo": (train_a, peer_a),
           "speedup_low_memory_vs_llamafactory": (train_a, peer_a),
           "speedup_low_memory_vs_llamafactory_default": (train_a, peer_a)}
    out["apart"] = [key for key, (ours, theirs) in ran.items() if out[key] is None and ours and theirs]
    out["machine"] = sources[0]["machine"] if sources else None
    out["date"] = max(r["date"] for r in sources) if sources else None
    out["sources"] = {r["benchmark"]: r["date"] for r in sources}
    return out


def met(key: str, value, summary: dict) -> str:
    op, target = TARGETS[key]
    target = summary.get(target) if isinstance(target, str) else target  # a bar measured beside it
    if key in summary.get("apart", []):
        return "not side by side"
    if value is None or target is None:
        return "not run"
    return "met" if (value >= target if op == ">=" else value <= target) else "missed"


def shown(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("mfu", "same_text_batched"):
        return f"{100 * value:.1f}%"
    return f"{value:.0f} MB" if key.endswith("_mb") or key.endswith("_mb_low_memory") else f"{value:.2f}x"


def goal(key: str, summary: dict) -> str:
    op, target = TARGETS[key]
    if isinstance(target, str):
        return f"{op} {shown(target, summary.get(target))} (LLaMA-Factory default)"
    return f"{op} {shown(key, target)}"


# A zhlora run is paired with LLaMA-Factory's run made nearest to it, at most this far apart: one
# round of side_by_side.sh runs each variant once, so the two may be minutes apart.
SLACK = timedelta(minutes=30)


def span(result: dict | None, variant: str) -> tuple[str, str] | None:
    """(first, last) ISO date of a variant's runs, or None when none recorded one."""
    dates = sorted(run["date"] for run in (result or {}).get("runs", {}).get(variant, []) if run.get("date"))
    return (dates[0], dates[-1]) if dates else None


def span_words(pair: tuple[str, str] | None) -> str:
    """'2026-12-01 02:37-02:46' (UTC), or the two full stamps when the span crosses midnight."""
    if not pair:
        return "-"
    first, last = pair
    return f"{first[:10]} {first[11:16]}-{last[11:16]}" if first[:10] == last[:10] else f"{first[:16]}-{last[:16]}"


def measured(train: dict | None, peer: dict | None) -> dict:
    """{variant: {"span": words, "x_llamafactory_best": paired(...) or None}} for every row of both
    tables (scripts/make_reports.py reads this rather than working it out again)."""
    best = peer and peer["best"]
    return {variant: {"span": span_words(span(result, variant)),
                      "x_llamafactory_best": paired(result, variant, peer, best)}
            for result in (train, peer) if result for variant in result.get("median", {})}


def training_rows(result: dict | None, rows_measured: dict) -> list[str]:
    """One row per variant; `x LF best` (median of paired runs, their range) only for rows with a run
    near one of LLaMA-Factory's best (see paired)."""
    rows = []
    for variant, f in (result or {}).get("median", {}).items():
        when = rows_measured.get(variant, {})
        pairs = when.get("x_llamafactory_best")
        ratio = f"{pairs['x']:.2f}x ({pairs['range'][0]:.2f}-{pairs['range'][1]:.2f})" if pairs else "-"
        rows.append(f"| {variant} | {f['supervised_tokens_per_s']:.1f} | {f['supervised_tokens_per_s_range'][0]:.1f}-"
                    f"{f['supervised_tokens_per_s_range'][1]:.1f} | {ratio} | {f['tokens_per_s']:.1f} | "
                    f"{f['seconds_per_step']:.2f} | {f['peak_rss_mb']:.0f} | {f['repeats']} | "
                    f"{when.get('span', '-')} |")
    return rows


def generation_rows(gen: dict, m: dict) -> list[str]:
    """The generation table of one result file (the run's dtype, or fp32), after a blank line."""
    lines = []
    where = (gen.get("machine") or {}).get("cpu")  # a result file from before machines were recorded has none
    if where != m.get("cpu"):  # the VM's processor changed between the two benchmarks
        lines += ["", f"Generation measured on {where}, {gen.get('date')}."]
    who = "the base model" if gen.get("benchmark", "").startswith("generation_base") else "the adapter"
    lines += ["", f"| generation, {who}, {gen['settings']['rows']} rows, {gen['settings']['dtype']} (median) | "
                  "tokens/s | range | x one by one | same text |", "| --- | --- | --- | --- | --- |"]
    for mode, f in gen["median"].items():
        ratio, same = gen["ratio_to_one_by_one_greedy"].get(mode), gen["same_text"].get(mode)
        lines.append(f"| {mode} | {f['tokens_per_s']:.1f} | {f['tokens_per_s_range'][0]:.1f}-"
                     f"{f['tokens_per_s_range'][1]:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{'-' if same is None else f'{100 * same:.1f}%'} |")
    return lines


def markdown(summary: dict, results: dict) -> str:
    """The README's table: the headline figures against their targets, then one table per result file."""
    m = summary["machine"] or {}
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    lines = [f"Machine: {where}, torch {m.get('torch', '?')}; date {summary['date']}.", "",
             "| figure | value | target | |", "| --- | --- | --- | --- |"]
    for key in TARGETS:
        value = summary[key]
        lines.append(f"| {key} | {shown(key, value)} | {goal(key, summary)} | {met(key, value, summary)} |")
    for title, ours, peer, workload in (("mixed workload", "train", "peer", "mixed"),
                                        ("alpaca_zh_demo workload", "train_a", "peer_a", "alpaca_zh_demo")):
        when = summary["measured"][workload]
        rows = training_rows(results[ours], when) + training_rows(results[peer], when)
        if rows:
            lines += ["", f"| training, {title} (median) | supervised tok/s | range | x LF best | total tok/s | "
                          "s/step | peak RSS MB | runs | measured (UTC) |", "| --- " * 9 + "|", *rows]
    for gen in (results["gen"], results["gen32"], results["gen_base"], results["gen_base32"]):
        lines += generation_rows(gen, m) if gen else []
    lines += ["", "Reproduce: " + "; ".join(f"`{c}`" for c in COMMANDS)]
    return "\n".join(lines)


def write_readme(table: str) -> None:
    """Replace what lies between the README's two BENCH markers with the table."""
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {BEGIN} ... {END} are missing")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")
    print(f"[bench] table written into {readme}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results, cuda_results = load_results(), load_results("_cuda")
    summary, cuda = headline(results), headline(cuda_results)
    if cuda["sources"]:
        summary["cuda"] = cuda
    summary["summarized"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown(summary, results) + (f"\n\nGPU (--device cuda):\n\n{markdown(cuda, cuda_results)}"
                                          if cuda["sources"] else "")
    print(table)
    if "--readme" in argv:
        write_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
