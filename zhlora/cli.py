"""The `zhlora` command: one subcommand per stage of the guide, each listed by `zhlora --help`.

    zhlora prepare  [--source PATH[:N]] [--output_dir data] [key=value ...]
    zhlora validate PATH [PATH ...]
    zhlora doctor   [--config FILE] [key=value ...]
    zhlora train    [--config FILE] [key=value ...]
    zhlora distill  [--config FILE] [key=value ...]                 (training.distill_teacher set)
    zhlora evaluate --model_path outputs                            (zhlora/evaluate.py)
    zhlora plot     [--output_dir outputs]                          (zhlora/plots.py)
    zhlora demo     --model_path outputs --mode interactive|batch   (zhlora/chat.py)
    zhlora serve    --model_path outputs [--port 8000]              (zhlora/server.py)
    zhlora experiment configs/experiments/r_ablation.yaml           (zhlora/experiment.py)
    zhlora params   --model Qwen/Qwen2.5-0.5B-Instruct --ranks 8,16  (zhlora/params.py)
    zhlora merge    --model_path outputs --output merged            (zhlora/merge.py)
    zhlora merge-adapters --adapters a=runs/a,b=runs/b --weights 0.5,0.5 --output merged
    zhlora export   --model_path outputs --format gguf --output export  (zhlora/export.py)

Every subcommand that reads a config takes `--config` (default configs/default.yaml when it
exists) and `key=value` overrides such as `lora.r=32`. A command module gives
`add_arguments(parser)` and `run(args) -> int`; this file builds the one parser from them.
main() is the one place that turns a user's error (zhlora.errors.ZhloraError) into one line,
`zhlora COMMAND: error: message`, and its exit status (2; 1 for a stopped training); any other
exception is a bug in zhlora and keeps its traceback.

Command modules import torch and transformers inside run(), not at the top, so that
`zhlora --help` answers at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zhlora import allocator, chat, evaluate, experiment, export, merge, params, plots, server
from zhlora.config import ConfigError, load_config
from zhlora.errors import ZhloraError

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


def prepare_arguments(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--source", action="append", default=[],
                   help="alpaca/sharegpt file, folder or HF dataset id; PATH:0.5 takes a ratio, PATH:200 a "
                        "count; `generated[:N]` adds the built-in tasks (repeatable)")
    p.add_argument("--output_dir", default="data")
    p.add_argument("--num_samples", type=int, default=None, help="generated samples (data.num_samples)")
    p.add_argument("--columns", default=None, help="map field names: question=instruction,answer=output")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the sources, e.g. gbk")
    p.add_argument("--no_stats", action="store_true", help="skip token statistics (no tokenizer load)")


def cmd_prepare(args) -> int:
    from zhlora.models import load_tokenizer
    from zhlora.prepare import prepare

    cfg = _load(args)
    if args.num_samples:
        cfg.data.num_samples = args.num_samples
    tokenizer = None if args.no_stats else load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    prepare(cfg, args.source, args.output_dir, _columns(args.columns), args.encoding, tokenizer)
    return 0


def validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+")
    p.add_argument("--columns", default=None)
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--max_problems", type=int, default=200)
    p.add_argument("--max_chars", type=int, default=None,
                   help="count samples longer than this many characters as over-long")


def cmd_validate(args) -> int:
    from zhlora.data import validate_paths

    return validate_paths(args.paths, columns=_columns(args.columns), encoding=args.encoding,
                          max_problems=args.max_problems, max_chars=args.max_chars)


def cmd_doctor(args) -> int:
    from zhlora.doctor import run_doctor

    return run_doctor(_load(args), color=sys.stdout.isatty())


def _load_training(args):
    """The config of train/distill; started from the command line, the process first takes the
    allocator the config asks for (zhlora/allocator.py: it may start itself again)."""
    cfg = _load(args)
    if args.entry:
        allocator.use(cfg.training.allocator)
    return cfg


def cmd_train(args) -> int:
    from zhlora.train import train
    from zhlora.training.setup import end_process_group

    train(_load_training(args))
    end_process_group()  # a torchrun worker: before exit, not at it
    return 0


def cmd_distill(args) -> int:
    from zhlora.train import train
    from zhlora.training.setup import end_process_group

    cfg = _load_training(args)
    if not cfg.training.distill_teacher:
        raise ConfigError("training.distill_teacher: distill needs a teacher (a model or a run folder)")
    train(cfg)
    end_process_group()
    return 0


# name, one-line purpose (what `zhlora --help` shows), add_arguments, run
COMMANDS = [
    ("prepare", "build data/chinese_instructions.json and the train/val/test splits", prepare_arguments, cmd_prepare),
    ("validate", "report every problem in data files as PATH:LINE: FIELD: problem", validate_arguments, cmd_validate),
    ("doctor", "show a rendered sample with its mask and check the setup", _config_args, cmd_doctor),
    ("train", "LoRA (or full) fine-tuning", _config_args, cmd_train),
    ("distill", "knowledge distillation: train with training.distill_teacher set", _config_args, cmd_distill),
    ("evaluate", "score a trained run on its test split, beside the base model", evaluate.add_arguments,
     evaluate.run),
    ("plot", "draw a run's logged files as PNGs beside them", plots.add_arguments, plots.run),
    ("demo", "chat with a trained run, interactive or batch", chat.add_arguments, chat.run),
    ("serve", "an OpenAI-compatible API and a chat page for a trained run", server.add_arguments, server.run),
    ("experiment", "train and evaluate a grid of settings over seeds, compared in one table",
     experiment.add_arguments, experiment.run),
    ("params", "trainable and total parameters of a LoRA setting, from the model's config alone",
     params.add_arguments, params.run),
    ("merge", "fold a LoRA adapter into the base model", merge.add_arguments, merge.run),
    ("merge-adapters", "weighted merge of LoRA adapters into one", merge.add_adapter_arguments,
     merge.run_adapters),
    ("export", "GGUF for llama.cpp and Ollama: merged model, LoRA adapter, Modelfile", export.add_arguments,
     export.run),
]
# Commands whose positionals may come after options too: `zhlora experiment X.yaml --output_dir D lora.r=8`.
INTERMIXED = {"experiment"}


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser. It refuses an unknown argument itself, so the message shows this
    command's usage (`zhlora plot: error: unrecognized arguments: ...`), not the top-level one;
    with `intermixed` set, positionals may sit among the options, as in parse_intermixed_args."""

    intermixed = False
    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # (Python 3.11) parse_known_intermixed_args calls parse_known_args itself
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            parse = self.parse_known_intermixed_args if self.intermixed else super().parse_known_args
            namespace, extras = parse(args, namespace)
        finally:
            self._inside = False
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhlora", description="LoRA fine-tuning on Chinese instruction data")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                                parser_class=SubcommandParser)
    for name, purpose, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=purpose, description=purpose)
        p.intermixed = name in INTERMIXED
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None, entry: bool = False) -> int:
    """Run one command. entry=True only where a process starts for it (the `zhlora` command,
    training/train.py): such a process may be started again with another allocator."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.entry = entry
    try:
        return args.func(args)
    except ZhloraError as err:  # the user's input; anything else is a bug and keeps its traceback
        print(f"zhlora {args.command}: {err.verb}: {err}", file=sys.stderr)
        return err.exit_code


def entry() -> int:
    """The `zhlora` console command."""
    return main(entry=True)


if __name__ == "__main__":
    sys.exit(entry())
