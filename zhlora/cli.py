"""The `zhlora` command: one subcommand per stage of the guide.

    zhlora prepare  [--source PATH[:N]] [--output_dir data] [key=value ...]
    zhlora validate PATH [PATH ...]
    zhlora doctor   [--config FILE] [key=value ...]
    zhlora train    [--config FILE] [key=value ...]
    zhlora evaluate --model_path outputs      (zhlora/evaluate.py)
    zhlora plot     [--output_dir outputs]    (zhlora/plots.py)
    zhlora demo     --model_path outputs --mode interactive|batch   (zhlora/chat.py)
    zhlora merge    --model_path outputs --output merged            (zhlora/merge.py)

Every subcommand that reads a config takes `--config` (default configs/default.yaml
when it exists) and `key=value` overrides such as `lora.r=32`. Errors in the user's
input are printed as one line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zhlora.config import ConfigError, load_config

DEFAULT_CONFIG = Path("configs/default.yaml")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml if present)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.r=32")


def _load(args):
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return load_config(path, args.overrides)


def _columns(text: str | None) -> dict | None:
    """--columns question=instruction,answer=output -> {"question": "instruction", ...}"""
    if not text:
        return None
    pairs = [item.split("=", 1) for item in text.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise ConfigError(f"--columns {text}: write theirs=ours pairs, e.g. question=instruction,answer=output")
    return {theirs.strip(): ours.strip() for theirs, ours in pairs}


def cmd_prepare(args) -> int:
    from zhlora.models import load_tokenizer
    from zhlora.prepare import prepare

    cfg = _load(args)
    if args.num_samples:
        cfg.data.num_samples = args.num_samples
    tokenizer = None if args.no_stats else load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    prepare(cfg, args.source, args.output_dir, _columns(args.columns), args.encoding, tokenizer)
    return 0


def cmd_validate(args) -> int:
    from zhlora.data import validate_paths

    return validate_paths(args.paths, columns=_columns(args.columns), encoding=args.encoding,
                          max_problems=args.max_problems, max_chars=args.max_chars)


def cmd_doctor(args) -> int:
    from zhlora.doctor import run_doctor

    return run_doctor(_load(args), color=sys.stdout.isatty())


def cmd_train(args) -> int:
    from zhlora.train import train

    train(_load(args))
    return 0


def cmd_distill(args) -> int:
    from zhlora.train import train

    cfg = _load(args)
    if not cfg.training.distill_teacher:
        raise ConfigError("training.distill_teacher: distill needs a teacher (a model or a run folder)")
    train(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhlora", description="LoRA fine-tuning on Chinese instruction data")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build data/chinese_instructions.json and the train/val/test splits")
    _config_args(p)
    p.add_argument("--source", action="append", default=[],
                   help="alpaca/sharegpt file, folder or HF dataset id; PATH:0.5 takes a ratio, PATH:200 a "
                        "count; `generated[:N]` adds the built-in tasks (repeatable)")
    p.add_argument("--output_dir", default="data")
    p.add_argument("--num_samples", type=int, default=None, help="generated samples (data.num_samples)")
    p.add_argument("--columns", default=None, help="map field names: question=instruction,answer=output")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the sources, e.g. gbk")
    p.add_argument("--no_stats", action="store_true", help="skip token statistics (no tokenizer load)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("validate", help="report every problem in data files as PATH:LINE: FIELD: problem")
    p.add_argument("paths", nargs="+")
    p.add_argument("--columns", default=None)
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--max_problems", type=int, default=200)
    p.add_argument("--max_chars", type=int, default=None,
                   help="count samples longer than this many characters as over-long")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("doctor", help="show a rendered sample with its mask and check the setup")
    _config_args(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("train", help="LoRA (or full) fine-tuning")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="knowledge distillation: train with training.distill_teacher set")
    _config_args(p)
    p.set_defaults(func=cmd_distill)
    return parser


# Stages with many options of their own parse their own arguments (see each module's main).
DELEGATED = {"evaluate": "zhlora.evaluate", "plot": "zhlora.plots", "demo": "zhlora.chat",
             "serve": "zhlora.server", "experiment": "zhlora.experiment", "params": "zhlora.params",
             "merge": "zhlora.merge", "merge-adapters": "zhlora.merge:main_adapters"}


def main(argv: list[str] | None = None) -> int:
    import importlib

    from zhlora.data import DataError
    from zhlora.formatting import TemplateError
    from zhlora.models import ModelSourceError
    from zhlora.train import TrainingError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        module, _, function = DELEGATED[argv[0]].partition(":")
        return getattr(importlib.import_module(module), function or "main")(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelSourceError, TemplateError) as err:
        print(f"zhlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"zhlora {args.command}: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
