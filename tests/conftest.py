"""Shared fixtures: a tiny random Llama model with a character-level Chinese tokenizer.

Built in the test session (no hub, no download): 2 layers, hidden size 64, a
vocabulary of the characters in a small Chinese corpus plus ChatML special tokens,
and SmolLM2's chat template. Saved as a normal Hugging Face folder so every code
path that loads "a local folder" is exercised.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# Larger than the usual 0.02 so logits are not near-uniform and LoRA can move them
# within a few dozen steps (the loss-falls tests).
INIT_RANGE = 0.2
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(corpus: str, chat_template: str | None = CHATML_TEMPLATE):
    """A character-level tokenizer: one token per character, specials kept whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(corpus + "".join(chr(c) for c in range(32, 127)) + "\n\t"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model_dir(path: Path, chat_template: str | None = CHATML_TEMPLATE, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhlora.tasks import generate_samples

    rows = generate_samples(400, seed=1)
    corpus = "".join(r["instruction"] + r["input"] + r["output"] for r in rows)
    corpus += "你好请问今天天气怎么样谢谢再见很长一二三四五六七八九十百千万亿零两"
    corpus += (Path(__file__).resolve().parents[1] / "zhlora" / "templates" / "alpaca.json").read_text("utf-8")
    tokenizer = build_tokenizer(corpus, chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=INIT_RANGE)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from zhlora.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """Generated tasks split into train/val/test (300 rows), as data/prepare_data.py writes them."""
    from zhlora.config import load_config
    from zhlora.prepare import prepare

    folder = tmp_path_factory.mktemp("data")
    prepare(load_config(None, ["data.num_samples=300"]), [], folder)
    return folder


def tiny_overrides(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """key=value overrides that point a run at the tiny model and data."""
    return [f"model.name={model_dir}", f"data.train_file={data_dir / 'train.json'}",
            f"data.val_file={data_dir / 'val.json'}", f"data.test_file={data_dir / 'test.json'}",
            f"output.dir={output_dir}", "training.learning_rate=1e-2", "training.logging_steps=1",
            "training.eval_steps=10",
            # every family of the tiny data, also where a subprocess in the repo root reads
            # configs/default.yaml (which keeps five): both sides of a resume ask the same
            "data.tasks=[]", *extra]


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """A finished LoRA run on the tiny model (what training/train.py leaves in outputs/)."""
    from zhlora.config import load_config
    from zhlora.train import train

    out = tmp_path_factory.mktemp("run") / "outputs"
    train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, out, "training.max_steps=30",
                                           "lora.target_modules=all-linear", "training.eval_steps=10")))
    return out


REPO = Path(__file__).resolve().parents[1]


def load_make_reports():
    """scripts/make_reports.py as a module (one copy per session: its parameter counts are cached)."""
    if "make_reports" not in sys.modules:
        sys.path.append(str(REPO / "scripts"))  # its sections: scripts/report_sections/
        spec = importlib.util.spec_from_file_location("make_reports", REPO / "scripts" / "make_reports.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_reports"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_reports"]
