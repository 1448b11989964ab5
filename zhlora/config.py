"""One typed config for every zhlora command, loaded from YAML with key=value overrides.

    cfg = load_config("configs/default.yaml", ["lora.r=32", "training.max_steps=5"])

Sections follow the guide: model, data, lora, training, output. An unknown key is
refused with the nearest valid key ("lora.rank: unknown key; did you mean lora.r?"),
a wrong type or a value out of range with the key and the rule. The resolved config
is written next to every output (`save_config`), so a run can always be repeated.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zhlora.errors import ZhloraError
from zhlora.files import write_atomic


class ConfigError(ZhloraError, ValueError):
    """A config key, type or value that zhlora refuses; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # embedded default; or a hub id, a folder, a .gguf file
    dtype: str = "auto"  # auto: bf16 on a CUDA GPU that supports it, else fp32 (never fp16 on CPU)
    device: str = "auto"  # auto | cpu | cuda
    template: str = "auto"  # auto: the model's chat template, alpaca for base models without one
    trust_remote_code: bool = False  # runs code from the model repo: off unless asked
    num_hidden_layers: int = 0  # 0: all; N: keep N evenly spaced layers (a smaller student to distil into)


@dataclass
class DataConfig:
    train_file: str = "data/train.json"
    val_file: str = "data/val.json"
    test_file: str = "data/test.json"
    num_samples: int = 3000  # generated samples (the guide suggests 1000-10000)
    val_ratio: float = 0.05
    test_ratio: float = 0.05
    max_length: int = 512  # tokens per sample; longer samples are truncated (see formatting.py)
    train_on_prompt: bool = False  # False: prompt tokens get label -100, only answers are learned
    tasks: list[str] = field(default_factory=list)  # built-in families; empty = all (rows of your own data always stay: tasks.selected)


@dataclass
class LoraConfig:
    r: int = 16
    lora_alpha: int = 32  # usually 2 * r; the update is scaled by lora_alpha / r
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    use_dora: bool = False
    use_rslora: bool = False  # scale by lora_alpha / sqrt(r) instead of lora_alpha / r
    backend: str = "peft"  # peft | scratch (zhlora/lora.py, for learning)


@dataclass
class TrainingConfig:
    method: str = "lora"  # lora | full
    learning_rate: float = 2e-4
    batch_size: int = 4
    num_epochs: float = 3
    warmup_ratio: float = 0.1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_steps: int = -1  # > 0 overrides num_epochs
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16 (fp16 only on CUDA)
    packing: bool = False  # padding-free packing; samples never attend to each other
    group_by_length: bool = True  # batches of similar length waste less compute on padding
    supervised_logits: bool = True  # output layer only where a token is trained: same loss, less time
    fused_cross_entropy: bool = True  # loss from hidden states in chunks, never all logits at once (zhlora/loss.py)
    fast_dropout: bool = False  # LoRA dropout masks from 64-bit random words, on bf16 inputs (training/dropout.py)
    torch_compile: bool = False  # compile each decoder layer (inductor): pays on long runs of long rows (bench/README.md)
    allocator: str = "auto"  # auto | system | jemalloc: malloc of a CPU training process (zhlora/allocator.py)
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int = 100
    progressive: list[str] = field(default_factory=list)  # grow LoRA: ["16@100", "32@200"] = r 16 after step 100...
    resume: str = "false"  # false | true (last checkpoint in output.dir) | a checkpoint path
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb
    distill_teacher: str = ""  # a model or run folder: loss = alpha*CE + (1-alpha)*T^2*KL (distill.py)
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    distill_top_k: int = 0  # > 0: cache the teacher's top-k logits on disk instead of keeping it loaded


@dataclass
class OutputConfig:
    dir: str = "outputs"
    overwrite: bool = False  # refuse to write into a folder that already holds a finished run


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Value rules: key -> (test, rule shown to the user).
_RULES = {
    "lora.r": (lambda v: v > 0, "must be > 0"),
    "lora.lora_alpha": (lambda v: v > 0, "must be > 0"),
    "lora.lora_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "lora.target_modules": (lambda v: len(v) > 0, "must name at least one module, or all-linear"),
    "lora.backend": (lambda v: v in ("peft", "scratch"), "must be peft or scratch"),
    "model.dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "must be auto, float32, bfloat16 or float16"),
    "model.device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "must be auto, cpu or cuda[:N]"),
    "model.template": (lambda v: v in ("auto", "alpaca"), "must be auto or alpaca"),
    "data.num_samples": (lambda v: v > 0, "must be > 0"),
    "data.val_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "data.test_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "data.max_length": (lambda v: v >= 16, "must be >= 16"),
    "training.method": (lambda v: v in ("lora", "full"), "must be lora or full"),
    "training.learning_rate": (lambda v: v > 0, "must be > 0"),
    "training.batch_size": (lambda v: v > 0, "must be > 0"),
    "training.num_epochs": (lambda v: v > 0, "must be > 0"),
    "training.warmup_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "training.gradient_accumulation_steps": (lambda v: v > 0, "must be > 0"),
    "training.max_steps": (lambda v: v == -1 or v > 0, "must be -1 (use num_epochs) or > 0"),
    "training.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "training.max_grad_norm": (lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    "training.mixed_precision": (lambda v: v in ("auto", "no", "bf16", "fp16"), "must be auto, no, bf16 or fp16"),
    "training.allocator": (lambda v: v in ("auto", "system", "jemalloc"), "must be auto, system or jemalloc"),
    "training.logging_steps": (lambda v: v > 0, "must be > 0"),
    "training.eval_steps": (lambda v: v > 0, "must be > 0"),
    "training.save_steps": (lambda v: v > 0, "must be > 0"),
    "training.progressive": (lambda v: all(re.fullmatch(r"\d+@\d+", item) for item in v),
                             "items are R@STEP, e.g. [16@100, 32@200] (grow to r=16 after step 100)"),
    "model.num_hidden_layers": (lambda v: v >= 0, "must be >= 0 (0 keeps every layer)"),
    "training.distill_alpha": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "training.distill_temperature": (lambda v: v > 0, "must be > 0"),
    "training.distill_top_k": (lambda v: v >= 0, "must be >= 0 (0: keep the teacher loaded)"),
    "training.report_to": (lambda v: set(v) <= {"tensorboard", "wandb"}, "may hold only tensorboard and wandb"),
}

# Rules between keys, checked at load so a wrong pair fails in a second, not after the model
# loads: (test on the whole config, the key the message names, the rule shown).
_PAIR_RULES = [
    (lambda c: c.data.val_ratio + c.data.test_ratio < 1,
     "data.val_ratio + data.test_ratio", "must leave rows for training (sum < 1)"),
    (lambda c: not (c.training.distill_teacher and c.training.packing),
     "training.distill_teacher", "distillation needs training.packing=false"),
    (lambda c: not c.training.progressive or (c.training.method == "lora" and c.lora.backend == "peft"),
     "training.progressive", "needs training.method=lora and lora.backend=peft"),
]

# String fields whose "off" choice is not spelled false: YAML's `no` and `off` arrive as False.
_OFF_WORDS = {"training.mixed_precision": "no"}


def _all_keys() -> list[str]:
    sections = typing.get_type_hints(Config)
    return [f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)]


def _nearest(key: str, keys: list[str]) -> str | None:
    """The valid key closest to a mistyped one: whole key first, then the name alone."""
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    names = {k.split(".")[1]: k for k in keys}
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(names), n=1, cutoff=0.5)
    return names[close[0]] if close else None


def _coerce(key: str, value, hint):
    """Convert a YAML or command-line value to the field's type, or refuse with the key named."""
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):  # "q_proj,v_proj" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads `resume: true` and `mixed_precision: no` as booleans
            value = str(value).lower()
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        value = str(value)
        return _OFF_WORDS.get(key, value) if value == "false" else value
    try:  # int and float: accept "2e-4" and 3 (for a float), refuse 0.5 for an int
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError
        if hint is int:
            if float(number) != int(number):
                raise ValueError
            return int(number)
        return float(number)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None


def _set(cfg: Config, key: str, value) -> None:
    section_name, _, name = key.partition(".")
    keys = _all_keys()
    if key not in keys:
        near = _nearest(key, keys)
        raise ConfigError(f"{key}: unknown key" + (f"; did you mean {near}?" if near else ""))
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    setattr(section, name, _coerce(key, value, hints[name]))


def _check_rules(cfg: Config) -> None:
    for key, (test, rule) in _RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not test(value):
            raise ConfigError(f"{key}: {value!r} {rule}")
    for test, key, rule in _PAIR_RULES:
        if not test(cfg):
            raise ConfigError(f"{key}: {rule}")


def parse_override(text: str) -> tuple[str, object]:
    """`lora.r=32` -> ("lora.r", 32); values are read as YAML, so lists and numbers work."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override is written key=value, e.g. lora.r=32")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then key=value overrides; every value checked."""
    cfg = Config()
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected sections model, data, lora, training, output")
        for section, values in raw.items():
            if not isinstance(values, dict):
                sections = [f.name for f in dataclasses.fields(Config)]
                close = difflib.get_close_matches(str(section), sections, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{section}: expected a section of keys{hint}")
            for name, value in values.items():
                _set(cfg, f"{section}.{name}", value)
    for text in overrides or []:
        _set(cfg, *parse_override(text))
    _check_rules(cfg)
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (for example a run's saved config.yaml)."""
    cfg = Config()
    for section, values in raw.items():
        for name, value in (values or {}).items():
            _set(cfg, f"{section}.{name}", value)
    _check_rules(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False))

