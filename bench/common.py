"""What every benchmark shares: the data subset, the runners, peak memory, results files.

Not a test and not part of the zhlora package: benchmark scripts import it as
`from common import ...` (they run as `python bench/NAME.py`, so bench/ is on sys.path).

Fair comparison, the rules every script follows:
  - one data subset, written once to bench/.work/data/: `--steps x --batch_size` rows
    drawn from the generated set (data/train.json) and ../shared/datasets/alpaca_zh_demo.json
    (real long answers) in their proportion of the two files, with a fixed seed;
  - every runner trains exactly one epoch over it, so every runner processes the same
    samples: `--steps` optimizer steps without packing (fewer rows with packing, the
    same tokens), and tokens per second compare the same work;
  - each repeat is a fresh subprocess, so its peak RSS (os.wait4) is its own;
  - figures are the median over repeats, with min and max beside it.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"  # scratch: data subset, run folders, logs (gitignored)
RESULTS = BENCH / "results"
GENERATED = REPO / "data" / "train.json"
ALPACA_ZH = REPO.parent / "shared" / "datasets" / "alpaca_zh_demo.json"
DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model; resolved to its cached safetensors folder


WORKLOADS = {
    # name: what the rows are (README table); results of a workload other than mixed get its name as a suffix
    "mixed": "data/train.json and alpaca_zh_demo.json in their proportion (short and long answers)",
    "alpaca_zh_demo": "alpaca_zh_demo.json alone (long answers: 78% of the tokens are supervised)",
}


def add_common_args(parser, steps: int = 30, repeats: int = 3) -> None:
    """The flags every benchmark takes. 30 steps by default, so that the one cold first step,
    which every runner pays and every runner's timing includes, weighs 1/30 of a run."""
    parser.add_argument("--workload", default="mixed", choices=list(WORKLOADS),
                        help="; ".join(f"{k}: {v}" for k, v in WORKLOADS.items()).replace("%", "%%"))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or folder (default: the embedded model)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps (unpacked) = rows / batch_size")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)


def model_folder(name: str) -> str:
    """The folder all runners load (zhlora converts the embedded GGUF once, here)."""
    from zhlora.models import resolve_model_path

    return str(Path(resolve_model_path(name)).resolve())


def child_env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def bf16_supported(device: str) -> bool:
    """bf16 helps on a CPU with native bf16 dot products (AVX512-BF16 or AMX), or a GPU that has it."""
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_variants(text: str, repeats: int, known: list[str]) -> dict[str, int]:
    """--variants a,b:1 -> {"a": repeats, "b": 1}: a variant may run fewer repeats than --repeats
    (one run of a slow setting whose peak RSS is all that is needed, say)."""
    out = {}
    for item in text.split(","):
        name, _, count = item.partition(":")
        if name not in known:
            raise SystemExit(f"[bench] unknown variant {name!r}: choose from {', '.join(known)}")
        out[name] = int(count) if count else repeats
    return out


def switch_variants(device: str) -> dict[str, list[str]]:
    """One zhlora variant per speed switch, each adding one switch to the one before, so each
    row of the table shows that switch's effect (zhlora_compile, zhlora_packing, zhlora_fast_dropout
    and zhlora_low_memory each add theirs to zhlora_fastest; zhlora_packing_fast_dropout adds two).
    zhlora_fastest is the quick start's setting (configs/quick_start.yaml: bf16 weights and
    autocast; jemalloc and the fused cross-entropy are defaults). Every variant names its
    allocator and loss path: training.allocator=auto would take jemalloc wherever it is installed."""
    bf16 = bf16_supported(device)
    default = ["training.allocator=system", "training.fused_cross_entropy=false"]
    autocast = default + (["training.mixed_precision=bf16"] if bf16 and device == "cpu" else [])
    weights = autocast + (["model.dtype=bfloat16"] if bf16 else [])
    jemalloc = [o for o in weights if o != "training.allocator=system"] + ["training.allocator=jemalloc"]
    fastest = [o for o in jemalloc if o != "training.fused_cross_entropy=false"] + ["training.fused_cross_entropy=true"]
    return {"zhlora_default": default, "zhlora_fast": autocast, "zhlora_bf16_weights": weights,
            "zhlora_jemalloc": jemalloc, "zhlora_fastest": fastest,
            "zhlora_compile": fastest + ["training.torch_compile=true"],
            "zhlora_packing": fastest + ["training.packing=true"],
            "zhlora_fast_dropout": fastest + ["training.fast_dropout=true"],
            "zhlora_packing_fast_dropout": fastest + ["training.packing=true", "training.fast_dropout=true"],
            "zhlora_low_memory": fastest + ["training.gradient_checkpointing=true"]}


# ---------------------------------------------------------------- data


def build_subset(n: int, seed: int, workload: str = "mixed") -> list[dict]:
    """n alpaca rows: for `mixed`, generated and alpaca_zh_demo in their files' proportion
    (stratified); for `alpaca_zh_demo`, drawn from that file alone."""
    files = (ALPACA_ZH,) if workload == "alpaca_zh_demo" else (GENERATED, ALPACA_ZH)
    for path in files:
        if not path.is_file():
            hint = ("run `python data/prepare_data.py --config configs/quick_start.yaml` (or the quick start) first"
                    if path == GENERATED else "shared/ datasets missing")
            raise SystemExit(f"[bench] {path} not found: {hint}")
    generated = [] if workload == "alpaca_zh_demo" else json.loads(GENERATED.read_text(encoding="utf-8"))
    alpaca = json.loads(ALPACA_ZH.read_text(encoding="utf-8"))
    if n > len(alpaca) + len(generated):
        raise SystemExit(f"[bench] {n} rows asked for, the {workload} workload has {len(alpaca) + len(generated)}")
    rng = random.Random(seed)
    n_alpaca = round(n * len(alpaca) / (len(alpaca) + len(generated)))
    rows = rng.sample(alpaca, n_alpaca) + rng.sample(generated, n - n_alpaca)
    rng.shuffle(rows)
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in rows]


def write_subset(n: int, seed: int, workload: str = "mixed", folder: Path = WORK / "data") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train_{workload}_n{n}_seed{seed}.json"
    path.write_text(json.dumps(build_subset(n, seed, workload), ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def token_counts(data_file: Path, model: str, max_length: int) -> dict:
    """Tokens of the subset as zhlora encodes it: the same for every zhlora variant.

    `supervised` counts labels != -100 after the shift (what the loss averages over);
    `sum_sq_len` is sum of each sample's length squared, for attention FLOPs (mfu.py).
    """
    from zhlora.formatting import IGNORE_INDEX, encode_sample
    from zhlora.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    rows = json.loads(Path(data_file).read_text(encoding="utf-8"))
    samples = [s for s in (encode_sample(r, tokenizer, "auto", max_length) for r in rows) if s is not None]
    lengths = [len(s["input_ids"]) for s in samples]
    return {"samples": len(samples), "dropped": len(rows) - len(samples), "tokens": sum(lengths),
            "supervised": sum(sum(l != IGNORE_INDEX for l in s["labels"][1:]) for s in samples),
            "padded_to_max_length": len(samples) * max_length, "sum_sq_len": sum(n * n for n in lengths),
            "at_max_length": sum(n >= max_length for n in lengths)}


# ---------------------------------------------------------------- subprocesses


def run_measured(command: list[str], log: Path, cwd: Path = REPO, env: dict | None = None) -> dict:
    """Run a command to the end; its exit code, wall seconds and peak RSS (MB) from os.wait4.

    wait4 gives this child's own peak resident memory (and that of any process it
    waited for), so repeats never inherit each other's peak.
    """
    from zhlora.cpu_share import CpuShare

    log.parent.mkdir(parents=True, exist_ok=True)
    share = CpuShare()  # cpu_others_share: what other programs took meanwhile (zhlora/cpu_share.py)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env={**child_env(), **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    result = {"returncode": proc.returncode, "wall_seconds": time.perf_counter() - started,
              "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "log": str(log.relative_to(REPO)),
              "cpu_others_share": share.others()}
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise SystemExit(f"[bench] failed ({proc.returncode}): {' '.join(command)}\n" + "\n".join(tail))
    return result


def zhlora_overrides(args, model: str, data_file: Path, out_dir: Path) -> list[str]:
    """key=value overrides shared by every zhlora run of a benchmark (one epoch, no eval, no checkpoints)."""
    return [f"model.name={model}", f"model.device={args.device}", f"data.train_file={data_file}",
            f"data.val_file={WORK / 'no-val.json'}",  # a missing file: no evaluation inside the timing
            f"data.max_length={args.max_length}", f"training.batch_size={args.batch_size}",
            f"training.learning_rate={args.learning_rate}", "training.num_epochs=1", "training.max_steps=-1",
            f"training.seed={args.seed}", "training.logging_steps=1", "training.eval_steps=1000000",
            "training.save_steps=1000000", f"output.dir={out_dir}", "output.overwrite=true"]


def run_zhlora(args, model: str, data_file: Path, name: str, extra: list[str]) -> dict:
    """One zhlora training in a fresh process (`zhlora train`); figures from its train_summary.json.

    zhlora's own timing starts at the first (cold) optimizer step and excludes model loading,
    data encoding and the final save.
    """
    out_dir = WORK / "runs" / name
    command = [sys.executable, "-m", "zhlora.cli", "train", "--config", str(REPO / "configs" / "default.yaml"),
               *zhlora_overrides(args, model, data_file, out_dir), *extra]
    measured = run_measured(command, WORK / "logs" / f"{name}.log")
    summary = json.loads((out_dir / "train_summary.json").read_text(encoding="utf-8"))
    seconds = summary["wall_seconds"] - summary["eval_and_save_seconds"]
    return {**measured, "train_seconds": seconds, "steps": summary["steps"],
            "supervised": round(summary["supervised_tokens_per_s"] * seconds),
            "final_loss": summary["final_loss"], "mixed_precision": summary["mixed_precision"],
            "allocator": summary.get("allocator"),
            "peak_gpu_mb": summary["peak_memory_mb"] if args.device == "cuda" else None}


# ---------------------------------------------------------------- figures and results


def figures(run: dict, supervised: int, tokens: int) -> dict:
    """Per-run throughput from a runner's training seconds and the tokens it processed."""
    return {"supervised_tokens_per_s": supervised / run["train_seconds"], "tokens_per_s": tokens / run["train_seconds"],
            "seconds_per_step": run["train_seconds"] / max(1, run["steps"]), "peak_rss_mb": run["peak_rss_mb"],
            "train_seconds": run["train_seconds"], "steps": run["steps"]}


APPEND_HELP = ("add this invocation's runs to the earlier runs of the same variants (same data, settings and "
               "machine) instead of replacing them: how bench/side_by_side.sh interleaves zhlora and LLaMA-Factory")


def earlier_runs(name: str, data_file: str, settings: dict, runs: dict, here: dict, meaning: dict,
                 append: bool = False) -> dict:
    """{variant: runs} kept from the last result file NAME.json, when that file measured the same data
    with the same settings on this machine: the variants this invocation did not run (`--variants a,b`
    adds or renews rows without dropping the rest) and, with append, also the earlier runs of those it
    did (their repeats add up). Only variants whose recorded definition (settings.overrides) is still
    `meaning[variant]`: a switch added since makes an old row another setting. Each run keeps its date."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    same = earlier.get("machine") == here and earlier.get("data", {}).get("file") == data_file and all(
        earlier.get("settings", {}).get(k) == v for k, v in settings.items() if k != "repeats")
    if not same:
        return {}
    recorded = earlier["settings"].get("overrides", {})
    return {v: r for v, r in earlier.get("runs", {}).items()
            if recorded.get(v) == meaning.get(v) and (append or v not in runs)}


def others_share_if_idle(share) -> float | None:
    """What other programs took of the CPU since `share` (a zhlora.cpu_share.CpuShare) began, or
    None, said on stdout, when it was too much: a contended timing is dropped, never printed."""
    from zhlora.cpu_share import is_shared

    others = share.others()
    if is_shared(others):
        print(f"[bench] others took {others} of the CPU: timings dropped, run again on an idle machine")
        return None
    return others


def idle_runs(runs: list[dict]) -> list[dict]:
    """The runs during which other programs took at most cpu_share.SHARED_ABOVE of the CPU; a run
    with no reading (measured before it was recorded, or no /proc/stat) counts."""
    from zhlora.cpu_share import SHARED_ABOVE

    return [r for r in runs if (r.get("cpu_others_share") or 0.0) <= SHARED_ABOVE]


def median_of(runs: list[dict]) -> dict:
    """Median of each numeric figure over repeats, plus [min, max] of the headline one.

    A run during which other programs took more than cpu_share.SHARED_ABOVE of the CPU is left
    out (it stays in the result's `runs`, and `dropped` counts it); runs measured before the
    share was recorded have none and count. If every run was shared, the figures are those of
    all runs and `repeats` is 0; summarize.paired pairs idle runs only."""
    kept = idle_runs(runs)
    used = kept or runs
    keys = [k for k, v in used[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {k: statistics.median(r[k] for r in used if k in r) for k in keys}
    sup = [r["supervised_tokens_per_s"] for r in used if "supervised_tokens_per_s" in r]
    if sup:
        out["supervised_tokens_per_s_range"] = [min(sup), max(sup)]
    out["repeats"], out["dropped"] = len(kept), len(runs) - len(kept)
    return out


def machine(device: str = "cpu") -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "bf16_native": bf16_supported("cpu"), "python": platform.python_version(), "torch": torch.__version__,
            "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import peft
        import transformers

        info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    except ImportError:
        pass
    return info


def result_name(name: str, device: str, workload: str = "mixed") -> str:
    """CPU results on the mixed workload keep the plain name; another workload or a GPU gets a
    suffix (train_throughput_alpaca_zh_demo.json, mfu_cuda.json), so none overwrites another."""
    return name + ("" if workload == "mixed" else f"_{workload}") + ("" if device == "cpu" else f"_{device}")


def write_result(name: str, data: dict) -> Path:
    """Print the result as one JSON line and write bench/results/NAME.json."""
    data = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **data}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(data, ensure_ascii=False))
    return path
