"""How many parameters does LoRA train? Counted from the model's config alone, no weights.

    zhlora params --model Qwen/Qwen2.5-0.5B-Instruct --ranks 8,16,32
    zhlora params --model configs/quick_start.yaml lora.target_modules=all-linear lora.use_dora=true

The model is built on PyTorch's "meta" device: every tensor has a shape but no
storage, so even a 7B model is "built" in seconds with no memory. PEFT then wraps
it exactly as training does (adapter.apply_lora), and adapter.count_parameters
counts tied embeddings once. For one adapted nn.Linear(in, out) LoRA adds
A (r x in) and B (out x r): r * (in + out) parameters. Qwen2.5-0.5B's q_proj is
896 -> 896 and v_proj 896 -> 128, so r=16 on both in 24 layers gives
24 * 16 * (896 + 896 + 896 + 128) = 1,081,344 of 494,032,768 (0.22%).

--model is the embedded `smollm2-135m-instruct`, a local folder, a .gguf file, a
zhlora YAML config (its model.name and lora section) or a hub id. Offline, the
configs of the models the README names ship in zhlora/resources/model_configs/
(config.json only); any other hub id needs the network or the HF cache.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from zhlora.config import Config, ConfigError, load_config

SHIPPED_CONFIGS = Path(__file__).parent / "resources" / "model_configs"  # <org>--<name>/config.json
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what the GGUF was made from
BYTES_FP32 = 4


def model_config(name: str, trust_remote_code: bool = False):
    """(transformers config, where it was read) for a model source, without loading weights."""
    from transformers import AutoConfig

    from zhlora.models import EMBEDDED_MODELS, ModelSourceError, cache_root, is_converted

    if name in EMBEDDED_MODELS:
        cached = cache_root() / name
        if is_converted(cached):  # the exact config of the weights training uses
            return AutoConfig.from_pretrained(cached), str(cached / "config.json")
        name = EMBEDDED_HUB_IDS[name]
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"--model {name}: no such GGUF file")
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name), str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"--model {name}: folder has no config.json")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), str(path / "config.json")
    shipped = SHIPPED_CONFIGS / name.replace("/", "--") / "config.json"
    if name.count("/") == 1 and shipped.is_file():
        return AutoConfig.from_pretrained(shipped.parent), str(shipped)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), f"hub: {name}"
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"--model {name}: no config found ({err}). Offline, use a local folder, the "
                               f"embedded smollm2-135m-instruct or a shipped config: {shipped_names()}") from None


def shipped_names() -> list[str]:
    return sorted(p.name.replace("--", "/") for p in SHIPPED_CONFIGS.iterdir() if (p / "config.json").is_file())


def count(hf_config, cfg: Config) -> tuple[int, int, int]:
    """(trainable, total, base) parameters of the model hf_config describes, trained as cfg says.

    total includes the adapter (what PEFT and train.py divide by); base is the model alone.
    """
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from zhlora.adapter import apply_lora, count_parameters

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT asks transformers a deprecated question
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
        base = count_parameters(model)[1]
        return (*count_parameters(apply_lora(model, cfg)), base)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model source or a zhlora YAML config (default: configs/default.yaml's model)")
    parser.add_argument("--ranks", default=None, help="comma-separated r values, one row each, e.g. 8,16,32")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.target_modules=all-linear")


def settings(args) -> Config:
    """The zhlora config whose model and lora section are counted."""
    if args.model and args.model.endswith((".yaml", ".yml")):
        return load_config(args.model, args.overrides)
    default = Path("configs/default.yaml")
    cfg = load_config(default if default.is_file() else None, args.overrides)
    if args.model:
        cfg.model.name = args.model
    return cfg


def parse_ranks(text: str) -> list[int]:
    """"8,16,32" -> [8, 16, 32]"""
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise ConfigError(f"--ranks {text}: write whole numbers separated by commas, e.g. 8,16,32") from None
    if min(ranks) < 1:
        raise ConfigError(f"--ranks {text}: every r must be >= 1")
    return ranks


def run(args: argparse.Namespace) -> int:
    cfg = settings(args)
    ranks = parse_ranks(args.ranks) if args.ranks else [cfg.lora.r]
    if args.ranks and cfg.training.method == "full":
        raise ConfigError("--ranks: training.method=full trains every parameter; r does not apply")
    hf_config, source = model_config(cfg.model.name, cfg.model.trust_remote_code)
    rows = []
    for r in ranks:
        cfg.lora.r = r
        rows.append((r, *count(hf_config, cfg)))

    lora = cfg.lora
    print(f"model: {cfg.model.name}  (config: {source})")
    if cfg.training.method == "full":
        print("training.method=full: every parameter is trained")
    else:
        print(f"LoRA: target_modules={lora.target_modules} use_dora={lora.use_dora} backend={lora.backend}")
    size_name = "adapter MB (fp32)" if cfg.training.method == "lora" else "model MB (fp32)"
    print(f"{'r':>5} {'full parameters':>17} {'trainable':>13} {'percent':>9} {size_name:>18}")
    for r, trainable, total, base in rows:
        r_text = str(r) if cfg.training.method == "lora" else "-"
        print(f"{r_text:>5} {base:>17,} {trainable:>13,} {100 * trainable / total:>8.4f}% "
              f"{trainable * BYTES_FP32 / 2**20:>18.3f}")
    print("full parameters: the model alone, tied embeddings once; percent: trainable / all parameters "
          "including the adapter, as PEFT and train.py print it")
    return 0
