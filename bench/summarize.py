"""Gather bench/results/*.json into bench/results/summary.json and print a Markdown table for the README.

    python bench/summarize.py            # after the benchmarks below have written their results
    python bench/summarize.py --readme   # also write the table into README.md, between its BENCH markers

Headline keys (each a number, or null when its benchmark has not run yet):
  speedup_vs_baseline      zhlora_fast / tutorial baseline, supervised tokens/s (train_throughput.json)
  speedup_vs_llamafactory  zhlora_fast / LLaMA-Factory's best variant, supervised tokens/s
                           (peer_llamafactory.json, zhlora side from train_throughput.json)
  mfu                      zhlora training FLOPs/s / measured matmul peak (mfu.json)
  speedup_batched          batched greedy / one-by-one sampling, generated tokens/s (generation.json)
  peak_rss_ratio           zhlora_fast / baseline peak RSS (target: <= 1)
with the machine and the date. GPU results (NAME_cuda.json) go under "cuda".
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from common import REPO, RESULTS

BEGIN, END = "<!-- BEGIN GENERATED: bench (python bench/summarize.py --readme) -->", "<!-- END GENERATED: bench -->"

TARGETS = {"speedup_vs_baseline": (">=", 3.0), "speedup_vs_llamafactory": (">=", 1.5), "mfu": (">=", 0.5),
           "speedup_batched": (">=", 4.0), "peak_rss_ratio": ("<=", 1.0)}
COMMANDS = ["python bench/train_throughput.py", "bash bench/peer_llamafactory.sh", "python bench/generation.py",
            "python bench/mfu.py", "python bench/summarize.py"]


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def headline(suffix: str = "") -> dict:
    train, peer = load("train_throughput" + suffix), load("peer_llamafactory" + suffix)
    gen, mfu = load("generation" + suffix), load("mfu" + suffix)
    out = {k: None for k in TARGETS}
    sources = [r for r in (train, peer, gen, mfu) if r]
    if train and "baseline" in train["median"] and "zhlora_fast" in train["median"]:
        fast, base = train["median"]["zhlora_fast"], train["median"]["baseline"]
        out["speedup_vs_baseline"] = fast["supervised_tokens_per_s"] / base["supervised_tokens_per_s"]
        out["peak_rss_ratio"] = fast["peak_rss_mb"] / base["peak_rss_mb"]
    if train and peer and "zhlora_fast" in train["median"]:
        best = peer["median"][peer["best"]]
        out["speedup_vs_llamafactory"] = (train["median"]["zhlora_fast"]["supervised_tokens_per_s"]
                                          / best["supervised_tokens_per_s"])
    if mfu:
        out["mfu"] = mfu["mfu"]
    if gen:
        out["speedup_batched"] = gen["speedup_batched"]
    out["machine"] = sources[0]["machine"] if sources else None
    out["date"] = max(r["date"] for r in sources) if sources else None
    out["sources"] = {r["benchmark"]: r["date"] for r in sources}
    return out


def met(key: str, value) -> str:
    if value is None:
        return "not run"
    op, target = TARGETS[key]
    return "met" if (value >= target if op == ">=" else value <= target) else "missed"


def markdown(summary: dict, suffix: str = "") -> str:
    m = summary["machine"] or {}
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    lines = [f"Machine: {where}, torch {m.get('torch', '?')}; date {summary['date']}.", "",
             "| figure | value | target | |", "| --- | --- | --- | --- |"]
    for key, (op, target) in TARGETS.items():
        value = summary[key]
        shown = "-" if value is None else (f"{100 * value:.1f}%" if key == "mfu" else f"{value:.2f}x")
        goal = f"{op} {100 * target:.0f}%" if key == "mfu" else f"{op} {target}x"
        lines.append(f"| {key} | {shown} | {goal} | {met(key, value)} |")
    train, peer = load("train_throughput" + suffix), load("peer_llamafactory" + suffix)
    rows = []
    if train:
        rows += [(v, f) for v, f in train["median"].items()]
    if peer:
        rows += [(v, f) for v, f in peer["median"].items()]
    if rows:
        lines += ["", "| training (median) | supervised tok/s | total tok/s | s/step | peak RSS MB |",
                  "| --- | --- | --- | --- | --- |"]
        for variant, f in rows:
            lines.append(f"| {variant} | {f['supervised_tokens_per_s']:.1f} | {f['tokens_per_s']:.1f} | "
                         f"{f['seconds_per_step']:.2f} | {f['peak_rss_mb']:.0f} |")
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
    summary = headline()
    cuda = headline("_cuda")
    if cuda["sources"]:
        summary["cuda"] = cuda
    summary["summarized"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown(summary) + (f"\n\nGPU (--device cuda):\n\n{markdown(cuda, '_cuda')}" if cuda["sources"] else "")
    print(table)
    if "--readme" in argv:
        write_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
