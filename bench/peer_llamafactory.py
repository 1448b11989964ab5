"""The peer: LLaMA-Factory's `llamafactory-cli train` on the same model, data and LoRA as zhlora.

    bash bench/peer_llamafactory.sh                  # installs LLaMA-Factory in its own venv, then runs this
    python bench/peer_llamafactory.py --lf_venv bench/.venv-llamafactory --template smollm2 [--steps 6 --repeats 3]

Steps (each LLaMA-Factory process is a fresh subprocess of its own venv's CLI):
  1. the benchmark subset (common.py) is written as an alpaca file with a
     dataset_info.json, the format LLaMA-Factory reads;
  2. LLaMA-Factory tokenises it once into `tokenized_path` (its own template and
     cutoff rule), and its venv's python counts the supervised and total tokens there:
     the exact tokens every later run trains on;
  3. each variant trains one epoch (--steps steps of --batch_size), LoRA r=16
     alpha=32 dropout 0.05 on q_proj,v_proj, cutoff_len=max_length, lr as zhlora:
       lf_default     its defaults (fp32, gradient checkpointing on),
       lf_bf16        bf16: true,
       lf_bf16_no_gc  bf16 and disable_gradient_checkpointing (often its fastest on a CPU);
     seconds = `train_runtime` from its train_results.json (the HF Trainer's loop,
     whose first step is cold); peak RSS from os.wait4, as for every benchmark here;
  4. writes bench/results/peer_llamafactory.json and prints zhlora / LLaMA-Factory,
     taking zhlora's figures from bench/results/train_throughput.json (run it first,
     with the same --steps, --batch_size and --max_length).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from common import (APPEND_HELP, REPO, RESULTS, WORK, add_common_args, earlier_runs, figures, machine, median_of,
                    model_folder, parse_variants, result_name, run_measured, write_result, write_subset)
from summarize import paired

LF = WORK / "lf"
VARIANTS = {
    "lf_default": {},
    "lf_bf16": {"bf16": True},
    "lf_bf16_no_gc": {"bf16": True, "disable_gradient_checkpointing": True},
}


def lf_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def lf_transformers_major(venv: Path) -> int:
    out = subprocess.run([lf_python(venv), "-c", "import transformers; print(transformers.__version__)"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().split(".")[0])


def compatible_model(model: str, major: int) -> str:
    """The model folder as the peer's transformers can read it.

    zhlora's cache is written by transformers 5, whose config.json nests rope_theta in
    `rope_parameters` and names the tokenizer class `TokenizersBackend`; transformers 4
    would silently fall back to rope_theta=10000 and fail on the class. For a 4.x peer,
    a copy with those two fields spelled the 4.x way (weights linked, not copied).
    """
    if major >= 5:
        return model
    src, dst = Path(model), LF / "model-transformers4"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return str(dst)


def write_yaml(path: Path, values: dict) -> None:
    lines = [f"{k}: {json.dumps(v)}" for k, v in values.items()]  # JSON scalars are valid YAML
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def base_config(args, model: str, output_dir: Path) -> dict:
    return {
        "model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target": "q_proj,v_proj",
        "dataset": "zhlora_bench", "dataset_dir": str(LF), "template": args.template,
        "cutoff_len": args.max_length, "tokenized_path": str(LF / "tokenized"), "output_dir": str(output_dir),
        "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "plot_loss": False, "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "learning_rate": args.learning_rate, "num_train_epochs": 1.0, "lr_scheduler_type": "linear",
        "warmup_ratio": 0.1, "seed": args.seed, "dataloader_num_workers": 0,
        **({"use_cpu": True} if args.device == "cpu" else {}),  # bf16 on a CPU is refused without it
    }


def cpu_only(device: str) -> dict:
    """LLaMA-Factory takes a visible GPU whenever there is one: hide it for a CPU run."""
    return {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}


def cli(venv: Path) -> str:
    return str(venv / "bin" / "llamafactory-cli")


def count_tokenized(path: str) -> None:
    """Runs in the peer's venv: tokens of LLaMA-Factory's own tokenised train split."""
    from datasets import load_from_disk

    data = load_from_disk(path)
    train = data["train"] if "train" in data else data
    tokens = sum(len(ids) for ids in train["input_ids"])
    supervised = sum(sum(l != -100 for l in labels[1:]) for labels in train["labels"])
    print(json.dumps({"samples": len(train), "tokens": tokens, "supervised": supervised}))


def write_peer_result(args, venv: Path, data_file: Path, counts: dict, runs: dict) -> None:
    """results/peer_llamafactory*.json: this invocation's runs plus the earlier ones it keeps
    (common.earlier_runs, --append), medians, and zhlora / LLaMA-Factory from train_throughput's file
    (summarize.paired, as summary.json has it)."""
    where = str(venv.relative_to(REPO)) if venv.is_relative_to(REPO) else venv.name  # no absolute path in results
    here = machine(args.device)
    settings = {"model": args.model, "workload": args.workload, "steps": args.steps, "batch_size": args.batch_size,
                "first_step": "included (train_runtime)", "cutoff_len": args.max_length,
                "learning_rate": args.learning_rate, "repeats": args.repeats, "template": args.template,
                "lora": "r16 a32 d0.05 q_proj,v_proj"}
    result_file = result_name("peer_llamafactory", args.device, args.workload)
    kept = earlier_runs(result_file, data_file.name, settings, runs, here, VARIANTS, args.append)
    for variant, earlier in kept.items():
        runs[variant] = earlier + runs.get(variant, [])
    medians = {v: median_of(r) for v, r in runs.items()}
    best = max(medians, key=lambda v: medians[v]["supervised_tokens_per_s"])
    result = {"machine": here, "lf_venv": where, "settings": {**settings, "overrides": {v: VARIANTS[v] for v in runs}},
              "data": {"file": data_file.name, **counts}, "median": medians, "best": best, "runs": runs}
    ours_file = RESULTS / f"{result_name('train_throughput', args.device, args.workload)}.json"
    if ours_file.is_file():
        ours = json.loads(ours_file.read_text())
        # the ratio summary.json reports: each zhlora run over the LLaMA-Factory run nearest to it
        result["zhlora_over_llamafactory"] = {
            f"{z}/{v}": pairs for z in ours["median"] if z != "baseline" for v in medians
            if (pairs := paired(ours, z, result, v))}
        print("[bench] supervised tokens/s, zhlora / LLaMA-Factory (median of runs paired in time, range):")
        for key, pairs in result["zhlora_over_llamafactory"].items():
            print(f"    {key:32s} {pairs['x']:.2f}x ({pairs['range'][0]:.2f}-{pairs['range'][1]:.2f}), "
                  f"{pairs['pairs']} pairs")
    else:
        print(f"[bench] {ours_file} not found: run bench/train_throughput.py for the zhlora side of the ratio")
    write_result(result_file, result)


def tokenize_once(args, venv: Path, model: str) -> dict:
    """Tokenise the subset once into tokenized_path (one training step, not timed: 0.9.5 trains on
    after saving) and count its tokens; later runs load the saved set, so all train the same tokens."""
    for stale in (LF / "tokenized", WORK / "runs" / "lf-tokenize"):
        shutil.rmtree(stale, ignore_errors=True)
    write_yaml(LF / "tokenize.yaml", {**base_config(args, model, WORK / "runs" / "lf-tokenize"), "max_steps": 1})
    run_measured([cli(venv), "train", str(LF / "tokenize.yaml")], WORK / "logs" / "lf-tokenize.log",
                 env=cpu_only(args.device))
    if not (LF / "tokenized").is_dir():
        raise SystemExit(f"[bench] LLaMA-Factory wrote no {LF / 'tokenized'}: see bench/.work/logs/lf-tokenize.log")
    out = subprocess.run([lf_python(venv), __file__, "--count_tokenized", str(LF / "tokenized")],
                         capture_output=True, text=True, check=True, cwd=REPO)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[bench] LLaMA-Factory tokenised: {counts}")
    return counts


def run_variant(args, venv: Path, model: str, variant: str, repeat: int, counts: dict) -> dict:
    """Train one variant once, timed; its figures (supervised tok/s, s/step, peak RSS, loss, date)."""
    name = f"{variant}-{args.workload}-{args.device}-{repeat}"
    output_dir = WORK / "runs" / name
    shutil.rmtree(output_dir, ignore_errors=True)
    write_yaml(LF / f"{name}.yaml", {**base_config(args, model, output_dir), **VARIANTS[variant]})
    measured = run_measured([cli(venv), "train", str(LF / f"{name}.yaml")], WORK / "logs" / f"{name}.log",
                            env=cpu_only(args.device))
    metrics = json.loads((output_dir / "train_results.json").read_text())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    run = {**measured, "train_seconds": metrics["train_runtime"], "steps": state["global_step"]}
    fig = figures(run, counts["supervised"], counts["tokens"])
    fig["final_loss"] = metrics.get("train_loss")
    fig["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if measured.get("cpu_others_share") is not None:  # zhlora/cpu_share.py: others' share of the CPU
        fig["cpu_others_share"] = measured["cpu_others_share"]
    print(f"[bench] {name}: {fig['supervised_tokens_per_s']:.1f} supervised tok/s, "
          f"{fig['seconds_per_step']:.2f} s/step, peak RSS {fig['peak_rss_mb']:.0f} MB")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--lf_venv", default=str(REPO / "bench" / ".venv-llamafactory"))
    parser.add_argument("--template", default="", help="LLaMA-Factory template (default: picked by the .sh)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--append", action="store_true", help=APPEND_HELP)
    parser.add_argument("--count_tokenized", default="", help=argparse.SUPPRESS)  # internal: see count_tokenized
    args = parser.parse_args(argv)
    if args.count_tokenized:
        count_tokenized(args.count_tokenized)
        return 0
    venv = Path(args.lf_venv).resolve()
    if not Path(cli(venv)).is_file():
        raise SystemExit(f"[bench] {cli(venv)} not found: run `bash bench/peer_llamafactory.sh` (it installs it)")
    if not args.template:
        raise SystemExit("[bench] --template is required (bench/peer_llamafactory.sh picks one)")

    model = compatible_model(model_folder(args.model), lf_transformers_major(venv))
    data_file = write_subset(args.steps * args.batch_size, args.seed, args.workload)
    LF.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_file, LF / "train.json")
    (LF / "dataset_info.json").write_text(json.dumps({"zhlora_bench": {
        "file_name": "train.json", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}, indent=2))
    counts = tokenize_once(args, venv, model)
    plan = parse_variants(args.variants, args.repeats, list(VARIANTS))
    runs: dict[str, list[dict]] = {v: [] for v in plan}
    for repeat in range(max(plan.values())):  # repeats interleaved: a slow phase hits every variant
        for variant in [v for v in plan if repeat < plan[v]]:
            runs[variant].append(run_variant(args, venv, model, variant, repeat, counts))
    write_peer_result(args, venv, data_file, counts, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
