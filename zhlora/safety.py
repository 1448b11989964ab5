"""Checks for files that may come from a stranger, run before anything loads them.

    check_adapter_folder("outputs_math", model.config)      # raises AdapterError, or returns
    check_model_folder("outputs_full")                      # a full fine-tune's weights

Two dangers, two checks:
1. Code. A pickle file (`adapter_model.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`: what
   torch.save writes) can run any Python code when it is loaded. Adapters and checkpoints
   are read as safetensors only (tensors and a JSON header, nothing to execute). A pickle is
   refused unless the caller passes allow_pickle (the demo's --allow_pickle), and even then
   it is read with torch.load(weights_only=True), which refuses anything but tensors
   (PEFT's own loader uses weights_only=True too). trust_remote_code, which runs a model
   repository's Python files, is off by default everywhere and is not taken from a run
   folder's config.yaml (see run_trust_remote_code).
2. A misfit. PEFT puts an adapter on any model whose module names match and fails later,
   or not at all, if only the base model's name differs. Refused here, naming both sides:
   another base model (names compared loosely: `Qwen/Qwen2.5-0.5B-Instruct` ==
   `/models/qwen2.5-0.5b-instruct`), a rank `r` that the weights do not have, target
   modules the base model lacks, or weight shapes that do not fit its layers (another
   hidden size). The weights are not loaded for this: safetensors' header holds the shapes.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from zhlora.errors import ZhloraError

# torch is imported inside the three checks that use it: `zhlora --help` imports this module
# (through the --adapters parser of demo, serve, evaluate and merge-adapters) and need not wait for it.

SAFE_ADAPTER = "adapter_model.safetensors"
PICKLE_ADAPTER = "adapter_model.bin"  # the name PEFT falls back to when there is no safetensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


class AdapterError(ZhloraError, RuntimeError):
    """An adapter or model folder zhlora will not load; the message says why and what to do."""


def adapter_name_problem(name: str) -> str | None:
    """Why PEFT cannot safely hold an adapter under this name, or None.

    PEFT tells an adapter's weights apart by substrings of their keys; a name that is part of
    the parameter prefix `lora_` ("a", "lo", "lora", ...) makes it miss them on loading and keep
    freshly initialised weights instead (huggingface/peft#2252; it only warns).
    """
    if name in "lora_":
        return (f"the adapter name {name!r} is part of PEFT's parameter prefix 'lora_', which makes PEFT "
                "load fresh weights instead of the saved ones (huggingface/peft#2252); pick another name")
    return None


def check_adapter_folder(path, base_model_config, allow_pickle: bool = False,
                         base_model=None) -> dict[str, tuple[int, ...]]:
    """Refuse an adapter folder that is pickle-based (unless allow_pickle) or does not fit the
    base model described by base_model_config (a transformers config). Pass the loaded
    base_model too when there is one; otherwise an empty copy is built on the meta device
    (no memory) to list its layers. Returns the weights' shapes by tensor name."""
    folder = Path(path)
    config = _adapter_config(folder)
    shapes = weight_shapes(folder, allow_pickle)
    ours = getattr(base_model_config, "name_or_path", "") or ""
    theirs = config.get("base_model_name_or_path") or ""
    if ours and theirs and model_key(ours) != model_key(theirs):
        raise AdapterError(f"{folder}: the adapter was trained on base model {theirs!r}, but this run's base model "
                           f"is {ours!r}; load it onto the model it was trained on (or, if both are the same "
                           "model under two names, set base_model_name_or_path in its adapter_config.json)")
    modules = _module_shapes(base_model if base_model is not None else _skeleton(base_model_config))
    if modules is not None:
        _check_targets(folder, config, modules, ours)
    _check_weights(folder, config, shapes, modules, base_model_config, ours)
    return shapes


def check_model_folder(path, allow_pickle: bool = False) -> None:
    """A full fine-tune's folder: safetensors weights, or pickle weights only if allowed."""
    folder = Path(path)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise AdapterError(_pickle_message(folder, pickles))


def run_trust_remote_code(cfg, trust_remote_code: bool) -> None:
    """A run folder's config.yaml may come from a stranger: its model.trust_remote_code=true
    would run the model repository's Python code. Only the caller's own flag turns it on."""
    if cfg.model.trust_remote_code and not trust_remote_code:
        print(f"[zhlora] note: the run's config.yaml sets model.trust_remote_code=true ({cfg.model.name}); "
              "loading with it off (code from a model repository runs only when you ask for it)", file=sys.stderr)
    cfg.model.trust_remote_code = bool(trust_remote_code)


def model_key(name: str) -> str:
    """A model's name reduced for a loose comparison: the last path part (for a Hugging Face
    cache path, the repo name), lower case, letters and digits only, without the 12-hex key
    zhlora adds to converted GGUF folders.

    'Qwen/Qwen2.5-0.5B-Instruct', '/models/qwen2.5-0.5b-instruct/' and
    '~/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/ab12' all give
    'qwen2505binstruct'.
    """
    parts = [p for p in re.split(r"[\\/]+", str(name).strip()) if p]
    if "snapshots" in parts[1:]:
        parts = parts[:parts.index("snapshots")]
    last = parts[-1] if parts else ""
    if last.startswith("models--"):
        last = last.split("--")[-1]
    last = re.sub(r"-[0-9a-f]{12}$", "", last)
    return re.sub(r"[^0-9a-z]", "", last.lower())


def weight_shapes(folder: Path, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header (nothing loaded), or from a pickle
    read with weights_only=True when allowed."""
    import torch
    from safetensors import SafetensorError, safe_open

    safe = folder / SAFE_ADAPTER
    if safe.is_file():
        try:
            with safe_open(str(safe), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError) as err:
            raise AdapterError(f"{safe}: not a readable safetensors file ({err}); an interrupted save?") from None
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise AdapterError(f"{folder}: no {SAFE_ADAPTER}: the adapter's weights are missing (an interrupted save?)")
    if not allow_pickle:
        raise AdapterError(_pickle_message(folder, pickles))
    if PICKLE_ADAPTER not in pickles:
        raise AdapterError(f"{folder}: no {SAFE_ADAPTER} or {PICKLE_ADAPTER} (found {', '.join(pickles)})")
    try:
        state = torch.load(folder / PICKLE_ADAPTER, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends: anything but plain tensors
        raise AdapterError(f"{folder / PICKLE_ADAPTER}: refused by torch.load(weights_only=True), so it holds "
                           f"more than tensors ({type(err).__name__}); do not load it") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise AdapterError(f"{folder / PICKLE_ADAPTER}: expected a dict of tensors")
    return {key: tuple(value.shape) for key, value in state.items()}


def _pickle_message(folder: Path, pickles: list[str]) -> str:
    return (f"{folder}: the weights are pickle files ({', '.join(pickles)}), and loading a pickle can run any "
            f"code its author put in it. zhlora reads safetensors only. If you trust the author, pass "
            "--allow_pickle (allow_pickle=True) to read it with torch.load(weights_only=True), or convert it "
            "once with safetensors.torch.save_file")


def _adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{folder}: no adapter_config.json; not a LoRA adapter folder (or its save was interrupted)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type') if isinstance(config, dict) else config!r}: "
                           "zhlora loads LoRA adapters only")
    return config


def _skeleton(base_model_config):
    """The base model's layers without weights (meta device): names and shapes only."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(base_model_config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, ImportError, OSError):  # a custom architecture: not listable
        return None


def _module_shapes(model) -> dict[str, tuple[int, int] | None] | None:
    """Module name -> (in_features, out_features) for linear and embedding layers, else None."""
    import torch

    if model is None:
        return None
    shapes = {}
    for name, module in model.named_modules():
        module = getattr(module, "base_layer", module)  # a layer PEFT already wrapped (another adapter)
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            shapes[name] = (module.num_embeddings, module.embedding_dim)
        elif name:
            shapes[name] = None
    return shapes


def _targets_match(target_modules, name: str) -> bool:
    """PEFT's rule: a regex string must match the whole name; list items match its last parts."""
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def _check_targets(folder: Path, config: dict, modules: dict, ours: str) -> None:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        if targets != "all-linear" and not any(_targets_match(targets, n) for n in modules):
            raise AdapterError(f"{folder}: target_modules {targets!r} matches no module of the base model {ours}")
        return
    missing = [t for t in targets if not any(_targets_match([t], n) for n in modules)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, shape in modules.items() if shape is not None})
        raise AdapterError(f"{folder}: the adapter's target_modules {sorted(targets)} include {missing}, which the "
                           f"base model {ours} does not have (its layers: {', '.join(linear)}); it was trained "
                           "on another architecture")


def _rank_for(config: dict, module: str) -> int:
    for key, rank in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):  # PEFT's rank_pattern rule
            return int(rank)
    return int(config.get("r", 8))


def _check_weights(folder: Path, config: dict, shapes: dict, modules, base_config, ours: str) -> None:
    """Every lora_A has its lora_B, ranks are r, and in/out sizes fit the base model's layer."""
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = shape
    if not pairs:
        raise AdapterError(f"{folder}: the weights hold no lora_A/lora_B tensors (an empty or interrupted save)")
    hidden = getattr(base_config, "hidden_size", None)
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{folder}: {module} has only {', '.join(parts)}; the weights are incomplete")
        (rank_a, fan_in), (fan_out, rank_b) = parts["lora_A"][-2:], parts["lora_B"][-2:]
        rank = _rank_for(config, module)
        if rank_a != rank or rank_b != rank:
            raise AdapterError(f"{folder}: adapter_config.json says r={rank}, but {module}'s lora_A / lora_B "
                               f"have rank {rank_a} / {rank_b}; the config and the weights do not belong together")
        if modules is None:
            continue
        if module not in modules:
            raise AdapterError(f"{folder}: the adapter has weights for {module}, which the base model {ours} "
                               "does not have; it was trained on another architecture or depth")
        base = modules[module]
        if base is not None and (fan_in, fan_out) != base:
            raise AdapterError(f"{folder}: {module} in the adapter maps {fan_in} -> {fan_out} features, in the "
                               f"base model {ours} it maps {base[0]} -> {base[1]} (hidden_size={hidden}); the "
                               "adapter was trained on a model of another size")
