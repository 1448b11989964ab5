"""Named LoRA adapters in one model: the one adapter path of demo, serve, evaluate and merge-adapters.

    --adapters math=runs/math,zh=runs/zh          # the same as --adapters math=runs/math --adapters zh=runs/zh

    pairs = parse_adapters(args.adapters)                    # [("math", Path("runs/math")), ...]
    model, tokenizer, cfg = load_run_with_adapters("outputs", pairs)  # the run's own adapter is "default"
    model, tokenizer, cfg = load_adapters(pairs)             # no run of its own: the first adapter's (evaluate)
    with answering_as(model, "math") as m: ...               # that adapter answers
    with answering_as(model, "base") as m: ...               # every adapter off: exactly the base weights

Every adapter lives in one PeftModel under its name, so the base weights are in memory once
and switching (PEFT's set_adapter / disable_adapter) copies no weights. "default" names the
run's own adapter and "base" the model with every adapter switched off, so neither can name
an extra adapter. Each folder gets the check the run's own adapter gets (zhlora/safety.py):
no pickle unless allowed, targets and shapes that fit this base model.
"""
from __future__ import annotations

import argparse
import re
from contextlib import contextmanager
from pathlib import Path

from zhlora import safety
from zhlora.config import ConfigError, load_config
from zhlora.generation import load_run

RESERVED = ("base", "default")  # the run's own adapter, and every adapter switched off


def add_adapters_argument(parser: argparse.ArgumentParser, purpose: str, required: bool = False) -> None:
    """`--adapters NAME=PATH`, the same option on every command; `purpose` says what they are for here."""
    parser.add_argument("--adapters", action="append", default=None, required=required, metavar="NAME=PATH",
                        help=f"{purpose}; repeat the flag or join with commas: a=runs/a,b=runs/b")


def parse_adapters(values: list[str] | None) -> list[tuple[str, Path]]:
    """["math=runs/math,zh=runs/zh", "code=runs/code"] -> [("math", Path("runs/math")), ...]

    Checks the names only (nothing is read from disk, so a typo fails before any model loads):
    letters, digits, _ and -; not base or default; no name twice; one PEFT can load.
    """
    pairs: list[tuple[str, Path]] = []
    for item in (part.strip() for value in values or [] for part in value.split(",")):
        if not item:
            continue
        name, _, path = (part.strip() for part in item.partition("="))
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or not path:
            raise ConfigError(f"--adapters {item}: write name=path (name: letters, digits, _ and -), "
                              "e.g. math=runs/math")
        if name in RESERVED:
            raise ConfigError(f"--adapters {item}: the name {name} is taken (base and default are reserved)")
        if name in [n for n, _ in pairs]:
            raise ConfigError(f"--adapters {item}: the name {name} is given twice")
        if safety.adapter_name_problem(name):
            raise ConfigError(f"--adapters {item}: {safety.adapter_name_problem(name)}")
        pairs.append((name, Path(path)))
    if values and not pairs:
        raise ConfigError("--adapters: no adapter given; write name=path,name=path")
    return pairs


def require_adapter_folder(name: str, path: Path) -> None:
    """A cheap look before the model loads: the folder must hold a LoRA adapter."""
    if not (Path(path) / "adapter_config.json").is_file():
        raise safety.AdapterError(f"--adapters {name}={path}: {path}/adapter_config.json not found; is it a LoRA "
                                  "run folder? (a full fine-tune is a whole model, not an adapter)")


def attach_adapters(model, adapters: list[tuple[str, Path]], allow_pickle: bool = False):
    """Load each (name, folder) adapter into the PeftModel `model` under its name; returns model."""
    base = model.get_base_model()
    for name, path in adapters:
        safety.check_adapter_folder(path, base.config, allow_pickle, base_model=base)  # no pickles, fits this base
        try:
            model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, OSError) as err:  # what the check cannot foresee
            raise safety.AdapterError(f"--adapters {name}={path}: cannot load it onto this base model: {err}") from err
    return model


def load_run_with_adapters(model_path: str | Path, adapters: list[tuple[str, Path]], allow_pickle: bool = False,
                           device: str | None = None):
    """(model, tokenizer, cfg): the run at model_path (its adapter named "default"), each extra
    (name, folder) adapter attached beside it. A full fine-tune comes back alone; with adapters
    it is refused (there is no PeftModel to hold them)."""
    from peft import PeftModel

    for name, path in adapters:
        require_adapter_folder(name, path)  # before the model load: a typo fails in a second
    model, tokenizer, cfg = load_run(model_path, device, allow_pickle)
    if adapters and not isinstance(model, PeftModel):
        raise safety.AdapterError(f"--adapters: {model_path} is a full fine-tune; adapters need a LoRA run")
    attach_adapters(model, adapters, allow_pickle)
    return model.eval(), tokenizer, cfg


def load_adapters(adapters: list[tuple[str, Path]], device: str | None = None, allow_pickle: bool = False):
    """(model, tokenizer, cfg): the base model loaded once, every (name, run folder) adapter in one
    PeftModel under its name; cfg is the first run's.

    The runs must share their base model (config.yaml's model.name, compared loosely as
    safety.model_key does); each adapter also passes safety.check_adapter_folder.
    """
    runs = [(name, Path(path), load_config(Path(path) / "config.yaml")) for name, path in adapters]
    first_name, first_path, first_cfg = runs[0]
    for name, path, cfg in runs:
        if safety.adapter_name_problem(name):
            raise safety.AdapterError(f"{name}={path}: {safety.adapter_name_problem(name)}")
        require_adapter_folder(name, path)
        if safety.model_key(cfg.model.name) != safety.model_key(first_cfg.model.name):
            raise safety.AdapterError(
                f"{name}={path} was trained on base model {cfg.model.name!r}, but {first_name}={first_path} on "
                f"{first_cfg.model.name!r}: adapters loaded together must share one base model")
    model, tokenizer, cfg = load_run(first_path, device, allow_pickle, adapter_name=first_name)
    attach_adapters(model, [(name, path) for name, path, _ in runs[1:]], allow_pickle)
    return model.eval(), tokenizer, cfg


@contextmanager
def answering_as(model, name: str, base=None):
    """The model that answers as `name`: that adapter of `model`, made active, or "base".

    "base" is `model` with every adapter disabled (exactly the base weights, no second copy),
    or `base` where one was loaded beside a full fine-tune, which has no adapter to switch off.
    A full fine-tune answers as "default" by being itself.
    """
    from peft import PeftModel

    if name != "base":
        if isinstance(model, PeftModel):
            model.set_adapter(name)
        yield model
    elif base is not None:
        yield base
    else:
        with model.disable_adapter():
            yield model
